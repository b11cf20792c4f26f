"""Record batch format: round trips, the byte layout, and that every kind of damage is caught.

The layout is re-derived here with its own ``struct`` format rather than imported, so a change
to tidelog/records.py that silently changes the wire format fails these tests.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import crc32c
import lz4.frame
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tidelog import records
from tidelog.errors import BatchTooLarge, CorruptBatch
from tidelog.records import (
    BASE_OFFSET_AT,
    BATCH_LENGTH_AT,
    BATCH_OVERHEAD_BYTES,
    HEADER_SIZE,
    MAGIC,
    MAGIC_AT,
    RAFT_INDEX_AT,
    RAFT_TERM_AT,
    BatchHeader,
    Codec,
    Record,
    batch_end_offset,
    decode_batches,
    decode_records,
    decode_values,
    encode_batch,
    iter_headers,
    read_header,
    stamp,
    stamped_copy,
    validate_batch,
    validate_batches,
)

# The documented header, written out independently of the module under test.
SPEC_HEADER = struct.Struct("<qiqqbIhiqqqhii")
CRC_AT = 29
COVERED_FROM = 33

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

Headers = list[tuple[str, bytes | None]]


def reforge(buf: bytes, block: bytes | None = None, **fields: int) -> bytes:
    """The batch with header fields (and optionally the records block) replaced and a CRC
    that matches again: what a buggy client would send."""
    values = SPEC_HEADER.unpack_from(buf, 0)
    names = BatchHeader._fields
    new = dict(zip(names, values, strict=True))
    new.update(fields)
    body = buf[HEADER_SIZE:] if block is None else block
    if "batch_length" not in fields:
        new["batch_length"] = HEADER_SIZE - 12 + len(body)
    out = bytearray(SPEC_HEADER.pack(*(new[n] for n in names))) + body
    struct.pack_into("<I", out, CRC_AT, crc32c.crc32c(bytes(out[COVERED_FROM:])))
    return bytes(out)


def raw_block(buf: bytes) -> bytes:
    """The uncompressed records block of a batch, decompressed by the libraries directly."""
    codec = buf[33] & 0x07
    block = buf[HEADER_SIZE:]
    if codec == 1:
        return bytes(lz4.frame.decompress(block))
    if codec == 2:
        return zstandard.ZstdDecompressor().decompress(block)
    return block


def small_batch(codec: Codec = Codec.NONE) -> bytes:
    return encode_batch(
        [b"hello", None],
        keys=[b"k", None],
        timestamps_ms=[1_700_000_000_000, 1_700_000_000_007],
        headers=[[("trace", b"ab")], []],
        codec=codec,
        producer_id=42,
        producer_epoch=3,
        base_sequence=9,
    )


# ---------------------------------------------------------------------------------------------
# Layout


def test_constants() -> None:
    assert MAGIC == 2
    assert HEADER_SIZE == BATCH_OVERHEAD_BYTES == SPEC_HEADER.size == 73


def test_golden_layout_of_one_record() -> None:
    """Byte for byte what docs/wire-format.md describes."""
    buf = encode_batch(
        [b"val"],
        keys=[b"ke"],
        timestamps_ms=[1234],
        headers=[[("h", None)]],
        producer_id=5,
        producer_epoch=1,
        base_sequence=7,
        base_offset=10,
    )
    block = (
        struct.pack("<i", 0)  # ts_deltas
        + struct.pack("<i", 2)  # key_lens
        + struct.pack("<i", 3)  # value_lens
        + b"ke"
        + b"val"
        + struct.pack("<H", 1)  # header_counts
        + struct.pack("<H", 1)  # hkey_lens
        + struct.pack("<i", -1)  # hvalue_lens (null)
        + b"h"
    )
    covered = struct.pack("<hiqqqhii", 0x10, 0, 1234, 1234, 5, 1, 7, 1) + block
    expected = (
        struct.pack("<qiqqbI", 10, 61 + len(block), 0, 0, 2, crc32c.crc32c(covered)) + covered
    )
    assert buf == expected
    h = read_header(buf)
    assert h.size == len(buf) == HEADER_SIZE + len(block)
    assert (h.base_offset, h.last_offset, h.codec, h.has_headers, h.is_control) == (
        10,
        10,
        Codec.NONE,
        True,
        False,
    )


def test_header_properties() -> None:
    buf = encode_batch([b"a"] * 5, codec=Codec.ZSTD, control=True, base_offset=100)
    h = read_header(buf)
    assert h.record_count == 5 and h.last_offset_delta == 4 and h.last_offset == 104
    assert h.codec is Codec.ZSTD and h.is_control and not h.has_headers
    assert h.raft_term == 0 and h.raft_index == 0
    assert h.producer_id == -1 and h.producer_epoch == -1 and h.base_sequence == -1


def test_read_header_alone() -> None:
    buf = small_batch()
    with pytest.raises(CorruptBatch, match="truncated"):
        read_header(buf[:HEADER_SIZE])
    assert read_header(buf[:HEADER_SIZE], whole_batch=False) == read_header(buf)
    assert records.unpack_header(buf[:HEADER_SIZE]) == read_header(buf)
    with pytest.raises(CorruptBatch, match="magic"):
        read_header(b"\x00" * HEADER_SIZE, whole_batch=False)


def test_codec_parse() -> None:
    assert Codec.parse("lz4") is Codec.LZ4
    assert Codec.parse(" ZSTD ") is Codec.ZSTD
    assert Codec.parse("none") is Codec.NONE
    assert Codec.parse(Codec.LZ4) is Codec.LZ4
    with pytest.raises(ValueError, match=r"gzip.*none, lz4, zstd"):
        Codec.parse("gzip")


# ---------------------------------------------------------------------------------------------
# Round trips

blobs = st.one_of(st.none(), st.binary(max_size=64), st.binary(min_size=1000, max_size=5000))
header_lists = st.lists(
    st.tuples(st.text(max_size=8), st.one_of(st.none(), st.binary(max_size=16))), max_size=3
)


@st.composite
def batches(draw: st.DrawFn) -> dict[str, object]:
    n = draw(st.integers(min_value=1, max_value=30))
    values = draw(st.lists(blobs, min_size=n, max_size=n))
    keys = draw(st.one_of(st.none(), st.lists(blobs, min_size=n, max_size=n)))
    first = draw(st.integers(min_value=0, max_value=2**42))
    ts_kind = draw(st.sampled_from(["none", "int", "list"]))
    timestamps: int | list[int] | None = None
    if ts_kind == "int":
        timestamps = first
    elif ts_kind == "list":
        deltas = st.integers(min_value=-(2**31) + 1, max_value=2**31 - 1)
        timestamps = [first] + [
            first + d for d in draw(st.lists(deltas, min_size=n - 1, max_size=n - 1))
        ]
    headers = draw(st.one_of(st.none(), st.lists(header_lists, min_size=n, max_size=n)))
    return {
        "values": values,
        "keys": keys,
        "timestamps_ms": timestamps,
        "headers": headers,
        "codec": draw(st.sampled_from(list(Codec))),
        "control": draw(st.booleans()),
        "producer_id": draw(st.integers(min_value=-1, max_value=2**63 - 1)),
        "producer_epoch": draw(st.integers(min_value=-1, max_value=2**15 - 1)),
        "base_sequence": draw(st.integers(min_value=-1, max_value=2**31 - 1)),
        "base_offset": draw(st.integers(min_value=0, max_value=2**62)),
    }


@SETTINGS
@given(batches())
def test_round_trip(spec: dict[str, object]) -> None:
    values: list[bytes | None] = spec["values"]  # type: ignore[assignment]
    keys: list[bytes | None] | None = spec["keys"]  # type: ignore[assignment]
    headers: list[Headers] | None = spec["headers"]  # type: ignore[assignment]
    ts: int | list[int] | None = spec["timestamps_ms"]  # type: ignore[assignment]
    n = len(values)

    buf = encode_batch(**spec)  # type: ignore[arg-type]
    h = validate_batch(buf)
    assert h == read_header(buf)
    assert h.size == len(buf)
    assert h.record_count == n
    assert h.codec == spec["codec"] and h.is_control == spec["control"]
    assert h.has_headers == bool(headers and any(headers))
    assert (h.producer_id, h.producer_epoch, h.base_sequence, h.base_offset) == (
        spec["producer_id"],
        spec["producer_epoch"],
        spec["base_sequence"],
        spec["base_offset"],
    )

    recs = decode_records(buf)
    assert [r.offset for r in recs] == list(range(h.base_offset, h.base_offset + n))
    assert [r.value for r in recs] == values
    assert [r.key for r in recs] == (keys if keys is not None else [None] * n)
    assert [r.headers for r in recs] == (headers if headers is not None else [[]] * n)
    stamps = [r.timestamp_ms for r in recs]
    if isinstance(ts, list):
        assert stamps == ts
    elif isinstance(ts, int):
        assert stamps == [ts] * n
    else:
        assert len(set(stamps)) == 1
    assert h.first_timestamp == stamps[0] and h.max_timestamp == max(stamps)
    assert decode_values(buf) == values
    assert decode_records(memoryview(bytearray(buf))) == recs
    # Consumers never see control batches.
    assert decode_batches(buf) == ([] if spec["control"] else recs)


@SETTINGS
@given(
    batches(),
    st.integers(min_value=0, max_value=2**62),
    st.integers(0, 2**40),
    st.integers(0, 2**40),
)
def test_stamp_keeps_crc_valid(spec: dict[str, object], base: int, term: int, index: int) -> None:
    buf = bytearray(encode_batch(**spec))  # type: ignore[arg-type]
    crc_before = read_header(buf).crc
    stamp(buf, 0, base, term, index)
    h = validate_batch(buf)
    assert (h.base_offset, h.raft_term, h.raft_index, h.crc) == (base, term, index, crc_before)
    assert [r.offset for r in decode_records(buf)] == list(range(base, base + h.record_count))


def test_stamped_copy_equals_stamp_in_place_and_end_offset_reads_the_header() -> None:
    a, b = encode_batch([b"x"] * 3), encode_batch([b"y"] * 2, codec=Codec.LZ4)
    buf = a + b
    copy = stamped_copy(buf, len(a), len(b), 40, 7, 9)
    in_place = bytearray(b)
    stamp(in_place, 0, 40, 7, 9)
    assert copy == bytes(in_place)
    h = validate_batch(copy)
    assert (h.base_offset, h.raft_term, h.raft_index, h.record_count) == (40, 7, 9, 2)
    # The named positions are the header's fields (the struct layout decides them).
    assert copy[RAFT_TERM_AT : RAFT_TERM_AT + 8] == (7).to_bytes(8, "little")
    assert copy[RAFT_INDEX_AT : RAFT_INDEX_AT + 8] == (9).to_bytes(8, "little")
    assert copy[MAGIC_AT] == MAGIC and copy[BASE_OFFSET_AT] == 40
    assert int.from_bytes(copy[BATCH_LENGTH_AT:RAFT_TERM_AT], "little") == len(b) - 12
    assert batch_end_offset(copy) == 42 == h.base_offset + h.last_offset_delta + 1
    assert batch_end_offset(a + copy, len(a)) == 42


def test_stamp_in_place_through_memoryview_mid_buffer() -> None:
    a, b = encode_batch([b"x"] * 3), encode_batch([b"y"] * 2, codec=Codec.LZ4)
    buf = bytearray(a + b)
    view = memoryview(buf)
    stamp(view, 0, 0, 1, 1)
    stamp(view, len(a), 3, 1, 2)
    got = validate_batches(buf)
    assert [(pos, h.base_offset, h.raft_index) for pos, h in got] == [(0, 0, 1), (len(a), 3, 2)]
    assert [r.offset for r in decode_batches(buf)] == [0, 1, 2, 3, 4]


# Concatenations of whole batches are large inputs on purpose.
@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(st.lists(batches(), min_size=1, max_size=5))
def test_iter_headers_and_validate_batches_over_concatenations(
    specs: list[dict[str, object]],
) -> None:
    parts = [encode_batch(**s) for s in specs]  # type: ignore[arg-type]
    buf = b"".join(parts)
    positions = [sum(len(p) for p in parts[:i]) for i in range(len(parts))]
    walked = list(iter_headers(buf))
    assert [pos for pos, _ in walked] == positions
    assert [h.size for _, h in walked] == [len(p) for p in parts]
    assert validate_batches(buf) == walked
    assert list(iter_headers(buf, positions[-1])) == walked[-1:]


def test_decode_batches_from_mid_batch_skips_control() -> None:
    buf = bytearray()
    for base, n, control in [(0, 3, False), (3, 1, True), (4, 4, False), (8, 2, False)]:
        batch = bytearray(encode_batch([f"{base}+{i}".encode() for i in range(n)], control=control))
        stamp(batch, 0, base, 1, base + 1)
        buf += batch
    assert [r.offset for r in decode_batches(buf)] == [0, 1, 2, 4, 5, 6, 7, 8, 9]
    assert [r.offset for r in decode_batches(buf, min_offset=2)] == [2, 4, 5, 6, 7, 8, 9]
    assert [r.offset for r in decode_batches(buf, min_offset=6)] == [6, 7, 8, 9]
    assert decode_batches(buf, min_offset=6)[0].value == b"4+2"
    assert decode_batches(buf, min_offset=10) == []
    assert decode_batches(b"") == []


def test_decode_records_returns_control_records() -> None:
    buf = encode_batch([b"config"], control=True, timestamps_ms=5)
    assert decode_records(buf) == [Record(0, 5, None, b"config", [])]


def test_large_batch_round_trip() -> None:
    values = [bytes([i % 251]) * (i % 300) for i in range(20_000)]
    for codec in Codec:
        buf = encode_batch(values, keys=[str(i).encode() for i in range(20_000)], codec=codec)
        assert decode_values(buf) == values
        assert validate_batch(buf).record_count == 20_000


def test_zstd_frame_without_content_size_is_accepted() -> None:
    """Other producers' zstd libraries may not write the content size into the frame."""
    plain = encode_batch([b"abc"] * 10, timestamps_ms=1)
    block = zstandard.ZstdCompressor(write_content_size=False).compress(plain[HEADER_SIZE:])
    buf = reforge(plain, block=block, attributes=int(Codec.ZSTD))
    assert decode_values(buf) == [b"abc"] * 10


# ---------------------------------------------------------------------------------------------
# Encoder input errors


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"values": []}, "at least one record"),
        ({"values": [b"a"], "keys": [b"a", b"b"]}, "2 keys for 1 values"),
        ({"values": [b"a"], "timestamps_ms": [1, 2]}, "2 timestamps for 1 values"),
        ({"values": [b"a"], "headers": [[], []]}, "2 header lists for 1 values"),
        ({"values": [b"a"], "headers": [[("x", b"")], []]}, "2 header lists for 1 values"),
        ({"values": [b"a", b"b"], "timestamps_ms": [0, 2**31]}, "signed 32-bit"),
        ({"values": [b"a"], "headers": [[("k" * 70_000, None)]]}, "HEADER_KEY_BYTES_MAX"),
        ({"values": [b"a"], "headers": [[("k", None)] * 70_000]}, "HEADERS_PER_RECORD_MAX"),
        ({"values": [b"a"], "producer_epoch": 2**15}, "producer_epoch=32768"),
        ({"values": [b"a"], "producer_id": -(2**63) - 1}, "out of range"),
        ({"values": [b"a"], "timestamps_ms": 2**63}, "out of range"),
    ],
)
def test_encode_rejects_bad_input(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        encode_batch(**kwargs)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# Corruption


@pytest.mark.parametrize("codec", list(Codec))
def test_every_single_bit_flip_in_crc_covered_part_is_detected(codec: Codec) -> None:
    buf = small_batch(codec)
    validate_batch(buf)
    for byte in range(CRC_AT, len(buf)):
        for bit in range(8):
            damaged = bytearray(buf)
            damaged[byte] ^= 1 << bit
            with pytest.raises(CorruptBatch):
                validate_batch(damaged)
            with pytest.raises(CorruptBatch):
                validate_batches(damaged)
            with pytest.raises(CorruptBatch):
                decode_records(damaged)


def test_crc_mismatch_message_names_both_values() -> None:
    buf = bytearray(small_batch())
    buf[-1] ^= 0xFF
    with pytest.raises(
        CorruptBatch,
        match=r"CRC mismatch in batch at byte 0: stored 0x[0-9a-f]{8}, computed 0x[0-9a-f]{8}",
    ):
        validate_batch(buf)
    # Decoding without the CRC check is possible (the log verified it on append), but a
    # consumer that asks for it gets the same error.
    with pytest.raises(CorruptBatch, match="CRC mismatch"):
        decode_batches(buf)
    decode_records(buf, verify_crc=False)


@pytest.mark.parametrize("codec", list(Codec))
def test_any_other_batch_length_is_caught(codec: Codec) -> None:
    good = small_batch(codec)
    true_length = len(good) - 12
    next_batch = encode_batch([b"next"])
    candidates = set(range(-5, len(good) + len(next_batch) + 80))
    candidates |= {-(2**31), 2**31 - 1, 2**16, 2**24}
    candidates.discard(true_length)
    for length in sorted(candidates):
        damaged = bytearray(good)
        struct.pack_into("<i", damaged, 8, length)
        for buf in (bytes(damaged), bytes(damaged) + next_batch):
            with pytest.raises(
                CorruptBatch,
                match=r"truncated|CRC mismatch|trailing garbage|magic|batch_length|record_count|last_offset_delta|attribute|codec",
            ):
                validate_batches(buf)


def test_wrong_magic_is_caught() -> None:
    for magic in range(-128, 128):
        if magic == MAGIC:
            continue
        damaged = bytearray(small_batch())
        struct.pack_into("<b", damaged, 28, magic)
        with pytest.raises(CorruptBatch, match=f"magic {magic}, expected 2"):
            read_header(damaged)
        with pytest.raises(CorruptBatch, match="magic"):
            validate_batches(damaged)


@pytest.mark.parametrize("codec", list(Codec))
@pytest.mark.parametrize("n", [1, 2, 7, 100])
@pytest.mark.parametrize("delta", [-1, 1, 2, 50])
def test_wrong_record_count_with_valid_crc_is_caught(codec: Codec, n: int, delta: int) -> None:
    """A buggy client computes a correct CRC over a wrong count: the block length check
    catches it because every column boundary moves."""
    if n + delta < 1:
        return
    good = encode_batch([b"v%d" % i for i in range(n)], keys=[b"k"] * n, codec=codec)
    wrong = reforge(good, record_count=n + delta, last_offset_delta=n + delta - 1)
    with pytest.raises(CorruptBatch, match=rf"record_count {n + delta}") as err:
        validate_batch(wrong)
    assert "bytes" in str(err.value)
    with pytest.raises(CorruptBatch):
        decode_records(wrong)
    with pytest.raises(CorruptBatch):
        decode_values(wrong)
    # Only the record check catches it; the header alone is self-consistent.
    assert validate_batch(wrong, check_records=False).record_count == n + delta


def test_inconsistent_header_counts_are_caught() -> None:
    good = small_batch()
    with pytest.raises(CorruptBatch, match="last_offset_delta 5 but record_count 2"):
        validate_batch(reforge(good, last_offset_delta=5))
    with pytest.raises(CorruptBatch, match="record_count 0"):
        validate_batch(reforge(good, record_count=0, last_offset_delta=-1))
    with pytest.raises(CorruptBatch, match="record_count -3"):
        validate_batch(reforge(good, record_count=-3, last_offset_delta=-4))


def test_bad_attributes_are_caught() -> None:
    good = small_batch()
    with pytest.raises(CorruptBatch, match="unknown compression codec 3"):
        validate_batch(reforge(good, attributes=0x13))
    with pytest.raises(CorruptBatch, match="unknown attribute bits 0x40"):
        validate_batch(reforge(good, attributes=0x50))
    # has_headers cleared: the header columns become unexplained trailing block bytes.
    with pytest.raises(CorruptBatch, match="records block is"):
        validate_batch(reforge(good, attributes=0x00))


def test_bad_columns_with_valid_crc_are_caught() -> None:
    good = encode_batch([b"abc", b"de"], keys=[b"k", b"l"], timestamps_ms=[10, 12])
    block = bytearray(good[HEADER_SIZE:])
    struct.pack_into("<i", block, 8 + 4, -2)  # key_lens[1] = -2
    with pytest.raises(CorruptBatch, match="key length of -2"):
        validate_batch(reforge(good, block=bytes(block)))

    with pytest.raises(CorruptBatch, match="max_timestamp 99 but its records imply 12"):
        validate_batch(reforge(good, max_timestamp=99))

    hdr = encode_batch([b"a"], headers=[[("ok", b"1")]])
    hblock = bytearray(hdr[HEADER_SIZE:])
    key_at = hblock.index(b"ok1")
    hblock[key_at] = 0xFF  # not UTF-8
    forged = reforge(hdr, block=bytes(hblock))
    validate_batch(forged)  # header keys are only decoded by consumers
    with pytest.raises(CorruptBatch, match="header key that is not UTF-8"):
        decode_records(forged)


@pytest.mark.parametrize("codec", [Codec.LZ4, Codec.ZSTD])
def test_undecompressable_block_is_caught(codec: Codec) -> None:
    good = small_batch(codec)
    block = good[HEADER_SIZE:]
    for damaged in (block[:-3], block + b"junk", b"\x00" * len(block)):
        with pytest.raises(CorruptBatch, match=codec.name.lower()):
            validate_batch(reforge(good, block=damaged))


@pytest.mark.parametrize("codec", [Codec.LZ4, Codec.ZSTD])
def test_decompression_is_bounded(codec: Codec, monkeypatch: pytest.MonkeyPatch) -> None:
    buf = encode_batch([b"x" * 100] * 1000, codec=codec)
    assert len(buf) < 2000
    monkeypatch.setattr(records, "RECORDS_BLOCK_BYTES_MAX", 10_000)
    with pytest.raises(CorruptBatch, match="RECORDS_BLOCK_BYTES_MAX"):
        validate_batch(buf)


def test_batch_too_large() -> None:
    buf = small_batch()
    assert validate_batch(buf, max_bytes=len(buf)).size == len(buf)
    with pytest.raises(
        BatchTooLarge, match=rf"{len(buf)} bytes, more than the limit of {len(buf) - 1}"
    ):
        validate_batch(buf, max_bytes=len(buf) - 1)
    with pytest.raises(BatchTooLarge):
        validate_batches(encode_batch([b"a"]) + buf, max_bytes=len(buf) - 1)


def test_validate_batches_rejects_empty_and_trailing_garbage() -> None:
    with pytest.raises(CorruptBatch, match="0 bytes"):
        validate_batches(b"")
    buf = small_batch()
    for extra in (1, 5, HEADER_SIZE - 1):
        with pytest.raises(CorruptBatch, match=f"{extra} bytes of trailing garbage"):
            validate_batches(buf + b"\x00" * extra)
    with pytest.raises(CorruptBatch, match="magic"):
        validate_batches(buf + b"\x00" * HEADER_SIZE)
    with pytest.raises(CorruptBatch, match="truncated"):
        validate_batches(buf[:-1])
    with pytest.raises(CorruptBatch, match="truncated"):
        validate_batches(buf[:40])
    with pytest.raises(CorruptBatch, match="truncated"):
        list(iter_headers(buf + buf[:10]))


@SETTINGS
@given(st.binary(max_size=400))
def test_garbage_only_ever_raises_corrupt_batch(garbage: bytes) -> None:
    for fn in (validate_batches, decode_batches):
        try:
            fn(garbage)
        except CorruptBatch:
            pass


@SETTINGS
@given(
    st.sampled_from(list(Codec)),
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=4),
)
def test_forged_crc_damage_raises_corrupt_batch_or_decodes(
    codec: Codec, edits: Sequence[tuple[int, int]]
) -> None:
    """Damage behind a recomputed CRC (a hostile or buggy client) must never escape as
    anything but CorruptBatch, whichever function meets it."""
    good = bytearray(small_batch(codec))
    for where, value in edits:
        good[COVERED_FROM + where % (len(good) - COVERED_FROM)] = value
    struct.pack_into("<I", good, CRC_AT, crc32c.crc32c(bytes(good[COVERED_FROM:])))
    for fn in (validate_batch, decode_records, decode_values, decode_batches):
        try:
            fn(bytes(good))
        except CorruptBatch:
            pass
