"""Record batches: the one binary format shared by producer, broker, log and consumer.

A batch is a fixed 73-byte little-endian header followed by a *columnar* records block
(see docs/wire-format.md). Columns let CPython encode and decode a whole batch with a
handful of C-level bulk operations (``array``, ``bytes.join``, slicing) instead of a Python
loop over varints per record: the cost is paid per batch, which is what makes a Python
broker fast enough. The broker itself only calls :func:`validate_batches` and
:func:`stamp`; it stores and serves the producer's bytes unchanged.

The CRC-32C covers bytes ``[33, end)``, everything after the CRC field: what the producer
wrote. The fields before it (base offset, length, Raft term and index) are written
by the node after the producer computed the CRC, so they cannot be covered by it; the
partition log checks them through offset and index continuity instead.
"""

from __future__ import annotations

import bisect
import enum
import gc
import struct
import sys
import threading
import time
from array import array
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import accumulate, pairwise, repeat
from typing import NamedTuple

import crc32c
import lz4.frame
import zstandard

from tidelog.errors import (
    BatchTooLarge,
    CorruptBatch,
    InvalidRecord,
    InvalidTimestamp,
    KeyRequired,
)

__all__ = [
    "BATCH_OVERHEAD_BYTES",
    "HEADER_SIZE",
    "MAGIC",
    "RECORDS_BLOCK_BYTES_MAX",
    "BatchHeader",
    "Codec",
    "KeyColumns",
    "ProduceLimits",
    "Record",
    "Scan",
    "batch_end_offset",
    "check_batches",
    "compact_batch",
    "declared_block_bytes",
    "decode_batches",
    "decode_key_columns",
    "decode_last_per_key",
    "decode_records",
    "decode_values",
    "encode_batch",
    "iter_headers",
    "read_header",
    "scan_batches",
    "stamp",
    "stamped_copy",
    "unpack_header",
    "validate_batch",
    "validate_batches",
]

MAGIC = 2
HEADER_SIZE = 73
BATCH_OVERHEAD_BYTES = HEADER_SIZE

# Byte positions of the header fields the node reads or writes without decoding the whole
# header (the layout is ``_HEADER`` below and docs/wire-format.md). Names end in ``_AT``.
#: ``base_offset`` (int64), stamped by the node.
BASE_OFFSET_AT = 0
#: ``batch_length`` (int32), the producer's.
BATCH_LENGTH_AT = 8
#: ``raft_term`` then ``raft_index`` (int64 each), stamped by the node.
RAFT_TERM_AT = 12
RAFT_INDEX_AT = 20
#: ``magic`` (int8): the first byte after the node-stamped fields.
MAGIC_AT = 28
#: ``last_offset_delta`` (int32), inside the CRC-covered part.
LAST_OFFSET_DELTA_AT = 35

#: Bytes before (and including) ``batch_length``; ``size = batch_length + LENGTH_PREFIX_SIZE``.
LENGTH_PREFIX_SIZE = 12
#: Where the CRC field starts and where the bytes it covers start.
CRC_OFFSET = 29
CRC_COVERED_FROM = 33

#: Largest records block a compressed batch may expand to. It bounds the memory a single
#: (possibly hostile) batch can make the broker allocate while validating it.
RECORDS_BLOCK_BYTES_MAX = 256 * 1024 * 1024
#: Column limits that follow from the column types (uint16 header counts and key lengths).
HEADERS_PER_RECORD_MAX = 0xFFFF
HEADER_KEY_BYTES_MAX = 0xFFFF
INT32_MAX = 2**31 - 1
INT32_MIN = -(2**31)

ATTR_CODEC_MASK = 0x07
ATTR_HAS_HEADERS = 0x10
ATTR_CONTROL = 0x20
#: Written by the log cleaner only: the records block starts with the number of records that
#: survived and their offset deltas (see :func:`compact_batch` and docs/wire-format.md).
ATTR_COMPACTED = 0x80
_ATTR_KNOWN = ATTR_CODEC_MASK | ATTR_HAS_HEADERS | ATTR_CONTROL | ATTR_COMPACTED

# base_offset, batch_length, raft_term, raft_index, magic, crc, attributes, last_offset_delta,
# first_timestamp, max_timestamp, producer_id, producer_epoch, base_sequence, record_count
_HEADER = struct.Struct("<qiqqbIhiqqqhii")
# The same header split at the CRC: the prefix the node owns and the CRC-covered rest.
_PREFIX = struct.Struct("<qiqqbI")
_COVERED = struct.Struct("<hiqqqhii")
_CRC = struct.Struct("<I")
_STAMP_OFFSET = struct.Struct("<q")
_STAMP_RAFT = struct.Struct("<qq")
_INT32 = struct.Struct("<i")

assert _HEADER.size == HEADER_SIZE
assert BATCH_LENGTH_AT == _STAMP_OFFSET.size == LENGTH_PREFIX_SIZE - 4
assert RAFT_INDEX_AT == RAFT_TERM_AT + 8 and MAGIC_AT == RAFT_TERM_AT + _STAMP_RAFT.size
assert LAST_OFFSET_DELTA_AT == CRC_COVERED_FROM + 2  # after the int16 attributes
assert _PREFIX.size == CRC_COVERED_FROM
assert _PREFIX.size + _COVERED.size == HEADER_SIZE
assert array("i").itemsize == 4 and array("H").itemsize == 2
assert RECORDS_BLOCK_BYTES_MAX <= INT32_MAX

_SWAP = sys.byteorder != "little"


class Codec(enum.IntEnum):
    """Compression of the records block (attribute bits 0-2)."""

    NONE = 0
    LZ4 = 1
    ZSTD = 2

    @classmethod
    def parse(cls, name: str | Codec) -> Codec:
        """The codec for a config or CLI value such as ``"lz4"`` (case-insensitive)."""
        if isinstance(name, Codec):
            return name
        try:
            return cls[name.strip().upper()]
        except KeyError:
            choices = ", ".join(c.name.lower() for c in cls)
            if name.strip().lower() in ("gzip", "snappy"):
                raise ValueError(
                    f"compression {name!r} is a Kafka codec tidelog does not implement: choose "
                    f"one of {choices} (zstd compresses better than gzip, lz4 is faster than "
                    "snappy)"
                ) from None
            raise ValueError(
                f"unknown compression codec {name!r}: choose one of {choices}"
            ) from None


@dataclass(slots=True)
class Record:
    offset: int
    timestamp_ms: int
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes | None]]


class BatchHeader(NamedTuple):
    base_offset: int
    batch_length: int
    raft_term: int
    raft_index: int
    magic: int
    crc: int
    attributes: int
    last_offset_delta: int
    first_timestamp: int
    max_timestamp: int
    producer_id: int
    producer_epoch: int
    base_sequence: int
    record_count: int

    @property
    def size(self) -> int:
        """Total bytes of the batch, header included."""
        return self.batch_length + LENGTH_PREFIX_SIZE

    @property
    def last_offset(self) -> int:
        return self.base_offset + self.last_offset_delta

    @property
    def codec(self) -> Codec:
        return Codec(self.attributes & ATTR_CODEC_MASK)

    @property
    def is_control(self) -> bool:
        return bool(self.attributes & ATTR_CONTROL)

    @property
    def has_headers(self) -> bool:
        return bool(self.attributes & ATTR_HAS_HEADERS)

    @property
    def is_compacted(self) -> bool:
        """Rewritten by the log cleaner: fewer records than ``record_count`` may remain."""
        return bool(self.attributes & ATTR_COMPACTED)


# ---------------------------------------------------------------------------------------------
# Compression. zstandard contexts must not be shared between threads, and the node may run
# validation in a thread pool, so each thread keeps its own.

_local = threading.local()


def _zstd_compressor() -> zstandard.ZstdCompressor:
    comp: zstandard.ZstdCompressor | None = getattr(_local, "zc", None)
    if comp is None:
        comp = _local.zc = zstandard.ZstdCompressor(write_content_size=True)
    return comp


def _zstd_decompressor() -> zstandard.ZstdDecompressor:
    dec: zstandard.ZstdDecompressor | None = getattr(_local, "zd", None)
    if dec is None:
        dec = _local.zd = zstandard.ZstdDecompressor()
    return dec


def _compress(codec: Codec, block: bytes) -> bytes:
    if codec is Codec.LZ4:
        return bytes(lz4.frame.compress(block, store_size=True))
    if codec is Codec.ZSTD:
        return _zstd_compressor().compress(block)
    return block


def _decompress(
    codec: Codec, data: bytes | memoryview, where: int, budget: int | None = None
) -> bytes:
    """Expand a records block, refusing anything beyond RECORDS_BLOCK_BYTES_MAX (CorruptBatch)
    or the request's remaining ``budget`` (BatchTooLarge) before allocating it (a few bytes
    of zstd can claim gigabytes)."""
    limit = RECORDS_BLOCK_BYTES_MAX
    over: type[CorruptBatch | BatchTooLarge] = CorruptBatch
    what = "(RECORDS_BLOCK_BYTES_MAX)"
    if budget is not None and budget < limit:
        limit, over, what = budget, BatchTooLarge, "(what this request may still expand to)"
    try:
        if codec is Codec.LZ4:
            dec = lz4.frame.LZ4FrameDecompressor()
            out = dec.decompress(data, max_length=limit + 1)
            if len(out) > limit:
                raise over(
                    f"lz4 records block of batch at byte {where} expands past {limit} bytes {what}"
                )
            if not dec.eof:
                raise CorruptBatch(f"lz4 records block of batch at byte {where} is truncated")
            if dec.unused_data:
                raise CorruptBatch(
                    f"lz4 records block of batch at byte {where} has "
                    f"{len(dec.unused_data)} bytes after the end of its frame"
                )
            return bytes(out)
        if codec is Codec.ZSTD:
            declared = zstandard.frame_content_size(data)
            if declared > limit:
                raise over(
                    f"zstd records block of batch at byte {where} declares {declared} bytes, "
                    f"more than {limit} {what}"
                )
            try:
                # Without a declared size, max_output_size bounds what is produced.
                return _zstd_decompressor().decompress(
                    data, max_output_size=limit, allow_extra_data=False
                )
            except zstandard.ZstdError as exc:
                if declared >= 0:
                    raise
                raise CorruptBatch(
                    f"cannot decompress the zstd records block of batch at byte {where}: it "
                    f"is truncated or expands past {limit} bytes {what} ({exc})"
                ) from exc
    except (CorruptBatch, BatchTooLarge):
        raise
    except (RuntimeError, zstandard.ZstdError, ValueError) as exc:
        raise CorruptBatch(
            f"cannot decompress the {codec.name.lower()} records block of batch at byte "
            f"{where}: {exc}"
        ) from exc
    raise CorruptBatch(f"batch at byte {where} names unknown codec {int(codec)}")


def declared_block_bytes(buf: Buffer, pos: int, h: BatchHeader) -> int | None:
    """How many bytes the records block of the (checked) batch at ``pos`` is, decompressed,
    as the batch says without being decompressed: its own size uncompressed, the frame's
    content size for zstd and lz4, None when the frame does not say."""
    start = pos + HEADER_SIZE
    end = pos + h.size
    codec = h.attributes & ATTR_CODEC_MASK
    if codec == Codec.NONE:
        return end - start
    frame = memoryview(buf)[start:end]
    try:
        if codec == Codec.ZSTD:
            size = int(zstandard.frame_content_size(frame))
            return None if size < 0 else size
        size = int(lz4.frame.get_frame_info(bytes(frame[:32]))["content_size"])
        return size or None  # lz4 writes 0 when the size was not stored
    except (RuntimeError, zstandard.ZstdError, ValueError) as exc:
        raise CorruptBatch(
            f"the {Codec(codec).name.lower()} records block of batch at byte {pos} does not "
            f"start with a valid frame: {exc}"
        ) from None


# ---------------------------------------------------------------------------------------------
# Encoding


def _int32_column(values: list[int], what: str) -> array[int]:
    try:
        col = array("i", values)
    except OverflowError:
        bad = next(v for v in values if not INT32_MIN <= v <= INT32_MAX)
        raise ValueError(f"{what} {bad} does not fit in a signed 32-bit column") from None
    return col


def _column_bytes(col: array[int]) -> bytes:
    if _SWAP:
        col = array(col.typecode, col)
        col.byteswap()
    return col.tobytes()


def _lengths(items: Sequence[bytes | None], what: str) -> tuple[array[int], bytes]:
    """The length column (-1 for None) and the concatenated bytes of a key or value column."""
    if None in items:
        lens = [-1 if x is None else len(x) for x in items]
        data = b"".join([x for x in items if x is not None])
    else:
        lens = list(map(len, items))  # type: ignore[arg-type]
        data = b"".join(items)  # type: ignore[arg-type]
    return _int32_column(lens, f"{what} length"), data


def _encode_headers(headers: Sequence[Sequence[tuple[str, bytes | None]]], n: int) -> list[bytes]:
    if len(headers) != n:
        raise ValueError(f"got {len(headers)} header lists for {n} values: pass one per record")
    counts = [len(h) for h in headers]
    if counts and max(counts) > HEADERS_PER_RECORD_MAX:
        raise ValueError(
            f"a record has {max(counts)} headers, more than {HEADERS_PER_RECORD_MAX} "
            "(HEADERS_PER_RECORD_MAX)"
        )
    flat = [kv for h in headers for kv in h]
    hkeys = [k.encode() for k, _ in flat]
    klens = list(map(len, hkeys))
    if klens and max(klens) > HEADER_KEY_BYTES_MAX:
        raise ValueError(
            f"a header key is {max(klens)} bytes of UTF-8, more than {HEADER_KEY_BYTES_MAX} "
            "(HEADER_KEY_BYTES_MAX)"
        )
    vlens, vdata = _lengths([v for _, v in flat], "header value")
    return [
        _column_bytes(array("H", counts)),
        _column_bytes(array("H", klens)),
        _column_bytes(vlens),
        b"".join(hkeys),
        vdata,
    ]


def encode_batch(
    values: Sequence[bytes | None],
    keys: Sequence[bytes | None] | None = None,
    timestamps_ms: Sequence[int] | int | None = None,
    headers: Sequence[Sequence[tuple[str, bytes | None]]] | None = None,
    *,
    codec: Codec = Codec.NONE,
    producer_id: int = -1,
    producer_epoch: int = -1,
    base_sequence: int = -1,
    control: bool = False,
    base_offset: int = 0,
) -> bytes:
    """One batch holding ``values`` (with optional parallel ``keys``, timestamps, headers).

    ``timestamps_ms`` may be one int for every record, a sequence with one per record, or
    None for "now". The first record's timestamp is the batch's ``first_timestamp``; others
    are stored as signed 32-bit deltas from it, so one batch spans at most ~24 days.
    """
    n = len(values)
    if n == 0:
        raise ValueError("a batch needs at least one record")
    if n > INT32_MAX:
        raise ValueError(f"{n} records do not fit in one batch")
    codec = Codec(codec)

    if timestamps_ms is None or isinstance(timestamps_ms, int):
        first_ts = time.time_ns() // 1_000_000 if timestamps_ms is None else timestamps_ms
        max_ts = first_ts
        ts_col = bytes(4 * n)
    else:
        if len(timestamps_ms) != n:
            raise ValueError(f"got {len(timestamps_ms)} timestamps for {n} values")
        first_ts = timestamps_ms[0]
        deltas = [t - first_ts for t in timestamps_ms]
        ts_col = _column_bytes(_int32_column(deltas, "timestamp delta (ms)"))
        max_ts = first_ts + max(deltas)

    parts, has_headers = _columns(n, ts_col, keys, values, headers)
    attributes = int(codec) | (ATTR_HAS_HEADERS if has_headers else 0)
    if control:
        attributes |= ATTR_CONTROL
    return _assemble(
        parts,
        codec,
        attributes,
        n - 1,
        first_ts,
        max_ts,
        producer_id,
        producer_epoch,
        base_sequence,
        n,
        base_offset,
    )


def _columns(
    n: int,
    ts_col: bytes,
    keys: Sequence[bytes | None] | None,
    values: Sequence[bytes | None],
    headers: Sequence[Sequence[tuple[str, bytes | None]]] | None,
) -> tuple[list[bytes], bool]:
    """The columns of ``n`` records after ``ts_col``, and whether header columns are in."""
    if keys is None:
        key_lens_col = _column_bytes(array("i", [-1]) * n)
        key_data = b""
    else:
        if len(keys) != n:
            raise ValueError(f"got {len(keys)} keys for {n} values: pass one key (or None) each")
        key_lens, key_data = _lengths(keys, "key")
        key_lens_col = _column_bytes(key_lens)
    value_lens, value_data = _lengths(values, "value")

    parts = [ts_col, key_lens_col, _column_bytes(value_lens), key_data, value_data]
    if headers is not None and any(headers):
        parts += _encode_headers(headers, n)
        return parts, True
    if headers is not None and len(headers) != n:
        raise ValueError(f"got {len(headers)} header lists for {n} values: pass one per record")
    return parts, False


def _assemble(
    parts: list[bytes],
    codec: Codec,
    attributes: int,
    last_offset_delta: int,
    first_ts: int,
    max_ts: int,
    producer_id: int,
    producer_epoch: int,
    base_sequence: int,
    record_count: int,
    base_offset: int,
) -> bytes:
    """Header, CRC and (compressed) block of a batch made of the block ``parts``."""
    if codec is Codec.NONE:
        block_parts = parts
        block_len = sum(map(len, parts))
    else:
        block = b"".join(parts)
        if len(block) > RECORDS_BLOCK_BYTES_MAX:
            raise ValueError(
                f"records block of {len(block)} bytes exceeds {RECORDS_BLOCK_BYTES_MAX} "
                "(RECORDS_BLOCK_BYTES_MAX): send smaller batches"
            )
        block_parts = [_compress(codec, block)]
        block_len = len(block_parts[0])

    batch_length = HEADER_SIZE - LENGTH_PREFIX_SIZE + block_len
    if batch_length > INT32_MAX:
        raise ValueError(f"batch of {batch_length} bytes is too large for one batch")
    try:
        covered = _COVERED.pack(
            attributes,
            last_offset_delta,
            first_ts,
            max_ts,
            producer_id,
            producer_epoch,
            base_sequence,
            record_count,
        )
        prefix = _PREFIX.pack(base_offset, batch_length, 0, 0, MAGIC, 0)
    except struct.error as exc:
        raise ValueError(
            f"a header field is out of range ({exc}): producer_id and timestamps are int64, "
            f"producer_epoch int16, base_sequence int32 (got producer_id={producer_id}, "
            f"producer_epoch={producer_epoch}, base_sequence={base_sequence}, "
            f"first_timestamp={first_ts}, base_offset={base_offset})"
        ) from None
    crc = crc32c.crc32c(covered)
    for part in block_parts:
        crc = crc32c.crc32c(part, crc)
    prefix = prefix[:CRC_OFFSET] + _CRC.pack(crc)
    return b"".join([prefix, covered, *block_parts])


def compact_batch(h: BatchHeader, survivors: Sequence[Record]) -> bytes:
    """The batch ``h`` rewritten by the log cleaner to hold only ``survivors`` (records of
    that batch, in offset order; possibly none).

    Everything the header says stays as it was: the stamps (base offset, Raft term and index),
    ``last_offset_delta`` and ``record_count`` (the offsets the batch spans), the timestamps,
    producer id, epoch and base sequence, the codec and the control bit; the ``compacted``
    attribute is set. The records block starts with the number of survivors and their offset
    deltas, then the usual columns of the survivors. Offsets are therefore kept exactly (gaps
    where records were removed), and whatever reads only headers (Raft, idempotence, offset
    lookups) reads the same values as before the cleaning.
    """
    deltas = [r.offset - h.base_offset for r in survivors]
    if any(b <= a for a, b in pairwise(deltas)) or (
        deltas and not 0 <= deltas[0] <= deltas[-1] <= h.last_offset_delta
    ):
        raise ValueError(
            f"survivors of batch [{h.base_offset}, {h.last_offset}] must be its own records "
            "in offset order"
        )
    n = len(survivors)
    first_ts = h.first_timestamp
    ts_col = _column_bytes(
        _int32_column([r.timestamp_ms - first_ts for r in survivors], "timestamp delta (ms)")
    )
    parts, has_headers = _columns(
        n,
        ts_col,
        [r.key for r in survivors],
        [r.value for r in survivors],
        [r.headers for r in survivors],
    )
    parts[:0] = [_INT32.pack(n), _column_bytes(array("i", deltas))]
    attributes = (h.attributes & ~ATTR_HAS_HEADERS) | ATTR_COMPACTED
    if has_headers:
        attributes |= ATTR_HAS_HEADERS
    batch = _assemble(
        parts,
        h.codec,
        attributes,
        h.last_offset_delta,
        first_ts,
        h.max_timestamp,
        h.producer_id,
        h.producer_epoch,
        h.base_sequence,
        h.record_count,
        h.base_offset,
    )
    buf = bytearray(batch)
    stamp(buf, 0, h.base_offset, h.raft_term, h.raft_index)
    return bytes(buf)


# ---------------------------------------------------------------------------------------------
# Headers and validation

Buffer = bytes | bytearray | memoryview


def unpack_header(buf: Buffer, pos: int = 0) -> BatchHeader:
    """The 73 header bytes at ``pos`` as fields, without any check (struct.error if short):
    for code that inspects headers it has already validated."""
    return BatchHeader._make(_HEADER.unpack_from(buf, pos))


def read_header(buf: Buffer, pos: int = 0, *, whole_batch: bool = True) -> BatchHeader:
    """The header of the batch at ``pos``, checked for self-consistency but not its CRC.

    ``whole_batch=False`` accepts a buffer that holds only the header (a log scan that reads
    headers alone); then the caller must check that ``size`` bytes really follow.
    """
    avail = len(buf) - pos
    if avail < HEADER_SIZE:
        raise CorruptBatch(
            f"truncated batch at byte {pos}: {avail} bytes left, a header needs {HEADER_SIZE}"
        )
    h = BatchHeader._make(_HEADER.unpack_from(buf, pos))
    if h.magic != MAGIC:
        raise CorruptBatch(
            f"batch at byte {pos} has magic {h.magic}, expected {MAGIC} "
            "(not a tidelog v2 record batch, or a corrupt one)"
        )
    if h.batch_length < HEADER_SIZE - LENGTH_PREFIX_SIZE:
        raise CorruptBatch(
            f"batch at byte {pos} has batch_length {h.batch_length}, less than the "
            f"{HEADER_SIZE - LENGTH_PREFIX_SIZE} bytes of header that follow the field"
        )
    if h.record_count < 1:
        raise CorruptBatch(f"batch at byte {pos} has record_count {h.record_count}, needs >= 1")
    if h.last_offset_delta != h.record_count - 1:
        raise CorruptBatch(
            f"batch at byte {pos} has last_offset_delta {h.last_offset_delta} but record_count "
            f"{h.record_count} (expected last_offset_delta = record_count - 1)"
        )
    if h.attributes & ~_ATTR_KNOWN:
        raise CorruptBatch(
            f"batch at byte {pos} sets unknown attribute bits {h.attributes & ~_ATTR_KNOWN:#x}"
        )
    if h.attributes & ATTR_CODEC_MASK > Codec.ZSTD:
        raise CorruptBatch(
            f"batch at byte {pos} names unknown compression codec {h.attributes & ATTR_CODEC_MASK}"
        )
    if whole_batch and h.size > avail:
        raise CorruptBatch(
            f"truncated batch at byte {pos}: header says {h.size} bytes, only {avail} present"
        )
    return h


def _check_crc(buf: Buffer, pos: int, h: BatchHeader) -> None:
    computed = crc32c.crc32c(memoryview(buf)[pos + CRC_COVERED_FROM : pos + h.size])
    if computed != h.crc:
        raise CorruptBatch(
            f"CRC mismatch in batch at byte {pos}: stored {h.crc:#010x}, computed {computed:#010x}"
        )


def _raw_block(
    buf: Buffer, pos: int, h: BatchHeader, budget: int | None = None
) -> tuple[bytes, int, int]:
    """The uncompressed records block and the slice ``[start, end)`` of it that holds it.

    For an uncompressed batch in a ``bytes`` buffer this is the buffer itself, so slicing
    keys and values costs one copy each and the block is never copied as a whole.
    """
    start = pos + HEADER_SIZE
    end = pos + h.size
    codec = Codec(h.attributes & ATTR_CODEC_MASK)
    if codec is Codec.NONE:
        if isinstance(buf, bytes):
            return buf, start, end
        return bytes(buf[start:end]), 0, end - start
    block = _decompress(codec, memoryview(buf)[start:end], pos, budget)
    return block, 0, len(block)


def _int_column(typecode: str, raw: bytes) -> array[int]:
    col = array(typecode, raw)
    if _SWAP:
        col.byteswap()
    return col


# Every byte below 0x80: deleting these from the sign bytes of an int32 column leaves
# something only if a length is negative (checked on the little-endian bytes, any host).
_NON_NEGATIVE_SIGN_BYTES = bytes(range(0x80))


class _Lengths(NamedTuple):
    """A checked length column (-1 = null) and where its data lies in the block."""

    lens: array[int] | None  # None when every entry is null
    at: int
    total: int
    nulls: int


def _lengths_column(block: bytes, at: int, n: int, data_at: int, what: str, where: int) -> _Lengths:
    """Sums the column and rejects lengths below -1. Works on the raw bytes first because
    'all null' and 'no null' are the common cases and bytes operations are C-speed."""
    raw = block[at : at + 4 * n]
    if raw == b"\xff" * (4 * n):
        return _Lengths(None, data_at, 0, n)
    lens = _int_column("i", raw)
    if not raw[3::4].translate(None, _NON_NEGATIVE_SIGN_BYTES):
        return _Lengths(lens, data_at, sum(lens), 0)
    low = min(lens)
    if low < -1:
        raise CorruptBatch(f"batch at byte {where} has a {what} length of {low}")
    nulls = lens.count(-1)
    return _Lengths(lens, data_at, sum(lens) + nulls, nulls)


class _Layout(NamedTuple):
    """The checked columns of one records block (indexes are absolute in the block)."""

    ts: array[int] | None  # None when every record has first_timestamp
    keys: _Lengths
    values: _Lengths
    counts: array[int] | None  # None without headers
    hkey_lens: array[int]
    hvalues: _Lengths
    hkeys_at: int
    #: Records in the block: ``record_count``, or the survivors of a compacted batch.
    n: int = 0
    #: Offset delta of each record of a compacted batch (None: record i has delta i).
    offset_deltas: array[int] | None = None


def _compacted_prefix(
    h: BatchHeader, block: bytes, start: int, end: int, where: int
) -> tuple[int, array[int] | None, int]:
    """How many records the block holds, their offset deltas (None when implicit) and where
    the columns start, for a compacted batch: ``int32 live_count`` and ``live_count`` int32
    offset deltas, strictly increasing within ``[0, last_offset_delta]``."""
    if not h.is_compacted:
        return h.record_count, None, start
    if end - start < 4:
        raise CorruptBatch(f"compacted batch at byte {where} has no survivor count")
    (n,) = _INT32.unpack_from(block, start)
    if not 0 <= n <= h.record_count or start + 4 + 4 * n > end:
        raise CorruptBatch(
            f"compacted batch at byte {where} claims {n} surviving records of "
            f"{h.record_count} in a records block of {end - start} bytes"
        )
    deltas = _int_column("i", block[start + 4 : start + 4 + 4 * n])
    if n and (
        deltas[0] < 0
        or deltas[-1] > h.last_offset_delta
        or any(b <= a for a, b in pairwise(deltas))
    ):
        raise CorruptBatch(
            f"compacted batch at byte {where} has offset deltas that are not increasing "
            f"within [0, {h.last_offset_delta}]"
        )
    return n, deltas, start + 4 + 4 * n


def _layout(h: BatchHeader, block: bytes, start: int, end: int, where: int) -> _Layout:
    """Parse the columns and check that they imply exactly the block's length: this is the
    record-count check, as a wrong count shifts every column boundary."""
    n, deltas, start = _compacted_prefix(h, block, start, end, where)
    block_len = end - start
    fixed = 12 * n + (2 * n if h.has_headers else 0)
    if block_len < fixed:
        raise CorruptBatch(
            f"batch at byte {where} claims record_count {n}, which needs at least {fixed} bytes "
            f"of columns, but its records block is {block_len} bytes"
        )
    ts_raw = block[start : start + 4 * n]
    # Comparing with a zeroed copy is a memcmp; strip() would walk the bytes one by one.
    ts = None if ts_raw == bytes(4 * n) else _int_column("i", ts_raw)
    keys = _lengths_column(block, start + 4 * n, n, start + 12 * n, "key", where)
    values_at = keys.at + keys.total
    values = _lengths_column(block, start + 8 * n, n, values_at, "value", where)
    at = values_at + values.total
    counts = None
    hkey_lens = array("H")
    hvalues = _Lengths(None, at, 0, 0)
    hkeys_at = at
    if h.has_headers:
        if at + 2 * n > end:
            raise _length_mismatch(h, where, block_len, at + 2 * n - start)
        counts = _int_column("H", block[at : at + 2 * n])
        nh = sum(counts)
        at += 2 * n
        if at + 6 * nh > end:
            raise _length_mismatch(h, where, block_len, at + 6 * nh - start)
        hkey_lens = _int_column("H", block[at : at + 2 * nh])
        hkeys_at = at + 6 * nh
        hvalues_at = hkeys_at + sum(hkey_lens)
        hvalues = _lengths_column(block, at + 2 * nh, nh, hvalues_at, "header value", where)
        at = hvalues_at + hvalues.total
    if at != end:
        raise _length_mismatch(h, where, block_len, at - start)
    implied_max = h.first_timestamp + (0 if ts is None or not n else max(ts))
    # A compacted batch keeps the max_timestamp of all the records it once held.
    if implied_max != h.max_timestamp and not (
        deltas is not None and implied_max <= h.max_timestamp
    ):
        raise CorruptBatch(
            f"batch at byte {where} has max_timestamp {h.max_timestamp} but its records "
            f"imply {implied_max}"
        )
    return _Layout(ts, keys, values, counts, hkey_lens, hvalues, hkeys_at, n, deltas)


def _length_mismatch(h: BatchHeader, where: int, actual: int, implied: int) -> CorruptBatch:
    return CorruptBatch(
        f"batch at byte {where}: records block is {actual} bytes but record_count "
        f"{h.record_count} and the column lengths imply {implied} bytes"
    )


def validate_batch(
    buf: Buffer,
    pos: int = 0,
    *,
    max_bytes: int | None = None,
    check_records: bool = True,
) -> BatchHeader:
    """Everything the broker checks before it accepts a batch: header, size limit, CRC, and
    (with ``check_records``) that the records block holds exactly ``record_count`` records,
    decompressing it if needed."""
    h = read_header(buf, pos)
    if max_bytes is not None and h.size > max_bytes:
        raise BatchTooLarge(
            f"batch at byte {pos} is {h.size} bytes, more than the limit of {max_bytes}: "
            "send smaller batches or raise the topic's max.message.bytes"
        )
    _check_crc(buf, pos, h)
    if check_records:
        _layout(h, *_raw_block(buf, pos, h), pos)
    return h


@dataclass(frozen=True, slots=True)
class ProduceLimits:
    """What a produce request may hold beyond well-formed batches (see node/limits.py)."""

    #: Largest batch, compressed (the topic's max.message.bytes).
    batch_bytes_max: int
    #: Most records one batch may declare.
    batch_records_max: int
    #: Most bytes the compressed records blocks of one request may expand to, together.
    expanded_bytes_max: int
    #: Whether control batches (the node's own) are refused.
    refuse_control: bool = True


class Scan(NamedTuple):
    """What :func:`scan_batches` found: each batch's position and header, and how many
    bytes of records blocks a full check reads (decompressed; undeclared sizes count as the
    request's whole remaining allowance)."""

    headers: list[tuple[int, BatchHeader]]
    check_bytes: int


def scan_batches(buf: Buffer, limits: ProduceLimits) -> Scan:
    """The checks that cost O(batches), from the headers and the frames' declared sizes
    alone: a decompression bomb (millions of empty records in a few KiB) is refused here,
    in microseconds, before anything is decompressed. :func:`check_batches` does the rest."""
    end = len(buf)
    if end == 0:
        raise CorruptBatch("no record batch: the request carries 0 bytes of records")
    out: list[tuple[int, BatchHeader]] = []
    pos = 0
    expanded = 0
    check = 0
    while pos < end:
        if out and end - pos < HEADER_SIZE:
            raise CorruptBatch(
                f"{end - pos} bytes of trailing garbage after the last batch (at byte {pos})"
            )
        h = read_header(buf, pos)
        if h.size > limits.batch_bytes_max:
            raise BatchTooLarge(
                f"batch at byte {pos} is {h.size} bytes, more than the limit of "
                f"{limits.batch_bytes_max}: send smaller batches or raise the topic's "
                "max.message.bytes"
            )
        if h.record_count > limits.batch_records_max:
            raise BatchTooLarge(
                f"batch at byte {pos} declares {h.record_count} records, more than the limit "
                f"of {limits.batch_records_max} per batch: send smaller batches"
            )
        if limits.refuse_control and h.is_control:
            raise InvalidRecord(
                f"batch at byte {pos} is a control batch (attribute bit {ATTR_CONTROL:#x}); "
                "only the node writes those: clear the bit"
            )
        if h.is_compacted:
            raise InvalidRecord(
                f"batch at byte {pos} sets the compacted attribute bit {ATTR_COMPACTED:#x}; "
                "only the log cleaner writes such batches: clear the bit"
            )
        declared = declared_block_bytes(buf, pos, h)
        fixed = 12 * h.record_count + (2 * h.record_count if h.has_headers else 0)
        if declared is not None and declared < fixed:
            raise CorruptBatch(
                f"batch at byte {pos} claims record_count {h.record_count}, which needs at "
                f"least {fixed} bytes of columns, but its records block is {declared} bytes"
            )
        if h.codec is not Codec.NONE:
            left = limits.expanded_bytes_max - expanded
            if declared is not None and declared > left:
                raise BatchTooLarge(
                    f"batch at byte {pos} expands to {declared} bytes; the compressed batches "
                    f"of one request may expand to {limits.expanded_bytes_max} bytes together "
                    "(8 times the topic's max.message.bytes, at most the produce request "
                    "limit): send smaller batches"
                )
            expanded += declared if declared is not None else left
            check += declared if declared is not None else left
        else:
            check += h.size
        out.append((pos, h))
        pos += h.size
    return Scan(out, check)


def check_batches(
    buf: Buffer,
    scan: Scan,
    limits: ProduceLimits,
    *,
    timestamp_min_ms: int | None = None,
    timestamp_max_ms: int | None = None,
    keys_required_by: str | None = None,
) -> None:
    """The checks that read the records (CRC, the columns, record timestamps within
    ``[timestamp_min_ms, timestamp_max_ms]``, with ``keys_required_by`` (a compacted topic's
    name) a key on every record): O(records), so the node runs them off its event loop for
    large requests. ``scan`` is what :func:`scan_batches` returned."""
    left = limits.expanded_bytes_max
    for pos, h in scan.headers:
        _check_crc(buf, pos, h)
        block, start, end = _raw_block(buf, pos, h, left)
        if h.codec is not Codec.NONE:
            left -= end - start
        lay = _layout(h, block, start, end, pos)
        if keys_required_by is not None and (lay.keys.lens is None or lay.keys.nulls):
            missing = h.record_count if lay.keys.lens is None else lay.keys.nulls
            raise KeyRequired(
                f"batch at byte {pos} has {missing} record(s) without a key, but topic "
                f"{keys_required_by!r} is compacted (cleanup.policy has compact): every "
                "record of a compacted topic needs a key; nothing of this request was stored"
            )
        if timestamp_max_ms is not None and h.max_timestamp > timestamp_max_ms:
            raise InvalidTimestamp(
                f"batch at byte {pos} has a record with timestamp {h.max_timestamp} ms, "
                f"{h.max_timestamp - timestamp_max_ms} ms later than the topic's "
                "message.timestamp.after.max.ms allows: check the producer's clock"
            )
        if timestamp_min_ms is not None:
            oldest = h.first_timestamp + (0 if lay.ts is None else min(lay.ts))
            if oldest < timestamp_min_ms:
                raise InvalidTimestamp(
                    f"batch at byte {pos} has a record with timestamp {oldest} ms, "
                    f"{timestamp_min_ms - oldest} ms earlier than the topic's "
                    "message.timestamp.before.max.ms allows: check the producer's clock"
                )


def iter_headers(buf: Buffer, pos: int = 0) -> Iterator[tuple[int, BatchHeader]]:
    """Each ``(position, header)`` of the batches laid end to end from ``pos`` (no CRC check)."""
    end = len(buf)
    while pos < end:
        h = read_header(buf, pos)
        yield pos, h
        pos += h.size


def validate_batches(buf: Buffer, *, max_bytes: int | None = None) -> list[tuple[int, BatchHeader]]:
    """Validate every batch of a produce request; any bad byte rejects the whole request."""
    end = len(buf)
    if end == 0:
        raise CorruptBatch("no record batch: the request carries 0 bytes of records")
    out: list[tuple[int, BatchHeader]] = []
    pos = 0
    while pos < end:
        if out and end - pos < HEADER_SIZE:
            raise CorruptBatch(
                f"{end - pos} bytes of trailing garbage after the last batch (at byte {pos})"
            )
        h = validate_batch(buf, pos, max_bytes=max_bytes)
        out.append((pos, h))
        pos += h.size
    return out


def stamp(
    buf: bytearray | memoryview, pos: int, base_offset: int, raft_term: int, raft_index: int
) -> None:
    """Write the node-owned fields in place; they lie outside the CRC, so it stays valid."""
    _STAMP_OFFSET.pack_into(buf, pos + BASE_OFFSET_AT, base_offset)
    _STAMP_RAFT.pack_into(buf, pos + RAFT_TERM_AT, raft_term, raft_index)


def stamped_copy(
    buf: Buffer, pos: int, size: int, base_offset: int, raft_term: int, raft_index: int
) -> bytes:
    """A copy of the ``size``-byte batch at ``pos`` with the node-owned fields stamped (as
    :func:`stamp` does in place), made with one join: ``batch_length`` between them and
    everything from ``magic`` on are the producer's bytes, kept as they are."""
    view = memoryview(buf)
    return b"".join(
        (
            _STAMP_OFFSET.pack(base_offset),
            view[pos + BATCH_LENGTH_AT : pos + RAFT_TERM_AT],
            _STAMP_RAFT.pack(raft_term, raft_index),
            view[pos + MAGIC_AT : pos + size],
        )
    )


def batch_end_offset(buf: Buffer, pos: int = 0) -> int:
    """The offset after the (stamped) batch at ``pos``: its base offset plus its record
    count (``last_offset_delta + 1``), read from two header fields."""
    (base,) = _STAMP_OFFSET.unpack_from(buf, pos + BASE_OFFSET_AT)
    (delta,) = _INT32.unpack_from(buf, pos + LAST_OFFSET_DELTA_AT)
    return int(base) + int(delta) + 1


# ---------------------------------------------------------------------------------------------
# Decoding


def _split(block: bytes, col: _Lengths, n: int) -> list[bytes | None]:
    """Cut consecutive byte strings out of ``block`` by a length column (-1 = None)."""
    lens = col.lens
    if lens is None:
        return [None] * n
    if not col.nulls:
        return [block[a:b] for a, b in pairwise(accumulate(lens, initial=col.at))]
    is_null = [x < 0 for x in lens]
    bounds = list(accumulate([0 if x < 0 else x for x in lens], initial=col.at))
    return [None if z else block[a:b] for z, a, b in zip(is_null, bounds, bounds[1:], strict=False)]


def _decode_block(h: BatchHeader, block: bytes, start: int, end: int, where: int) -> list[Record]:
    lay = _layout(h, block, start, end, where)
    n = lay.n
    first = h.first_timestamp
    timestamps: Iterable[int] = repeat(first, n) if lay.ts is None else [first + d for d in lay.ts]
    keys = _split(block, lay.keys, n)
    values = _split(block, lay.values, n)
    base = h.base_offset
    # Each record is two container objects (the Record and its headers list) that the cyclic
    # GC tracks; a 1000-record batch would trigger several generation-0 collections while
    # they are built, which costs about as much as building them. None of them can be part of
    # a cycle yet, so collection waits until the batch is done (one pass instead of several).
    pause_gc = gc.isenabled()
    if pause_gc:
        gc.disable()
    try:
        if lay.counts is None:
            headers: list[list[tuple[str, bytes | None]]] = [[] for _ in range(n)]
        else:
            headers = _decode_headers(block, lay, lay.counts, where)
        offsets: Iterable[int] = (
            range(base, base + n)
            if lay.offset_deltas is None
            else [base + d for d in lay.offset_deltas]
        )
        return list(map(Record, offsets, timestamps, keys, values, headers))
    finally:
        if pause_gc:
            gc.enable()


def _decode_headers(
    block: bytes, lay: _Layout, counts: array[int], where: int
) -> list[list[tuple[str, bytes | None]]]:
    nh = len(lay.hkey_lens)
    bounds = accumulate(lay.hkey_lens, initial=lay.hkeys_at)
    try:
        hkeys = [block[a:b].decode() for a, b in pairwise(bounds)]
    except UnicodeDecodeError as exc:
        raise CorruptBatch(
            f"batch at byte {where} has a header key that is not UTF-8: {exc}"
        ) from exc
    pairs = list(zip(hkeys, _split(block, lay.hvalues, nh), strict=True))
    return [pairs[a:b] for a, b in pairwise(accumulate(counts, initial=0))]


def decode_records(buf: Buffer, pos: int = 0, *, verify_crc: bool = True) -> list[Record]:
    """All records of the batch at ``pos`` (control batches included)."""
    h = read_header(buf, pos)
    if verify_crc:
        _check_crc(buf, pos, h)
    return _decode_block(h, *_raw_block(buf, pos, h), pos)


def decode_batches(buf: Buffer, *, min_offset: int = 0, verify_crc: bool = True) -> list[Record]:
    """The data records of consecutive batches, from ``min_offset`` on.

    A fetch may start in the middle of a batch (the broker serves whole batches), so records
    before ``min_offset`` are dropped here. Control batches are invisible to consumers.
    """
    out: list[Record] = []
    for pos, h in iter_headers(buf):
        if h.is_control or h.last_offset < min_offset:
            continue
        if verify_crc:
            _check_crc(buf, pos, h)
        records = _decode_block(h, *_raw_block(buf, pos, h), pos)
        if h.base_offset < min_offset:
            if h.is_compacted:
                records = [r for r in records if r.offset >= min_offset]
            else:
                records = records[min_offset - h.base_offset :]
        out += records
    return out


def decode_values(buf: Buffer, pos: int = 0, *, verify_crc: bool = True) -> list[bytes | None]:
    """Only the values of the batch at ``pos``: the fast path for consumers that ignore keys,
    timestamps and headers."""
    h = read_header(buf, pos)
    if verify_crc:
        _check_crc(buf, pos, h)
    block, start, end = _raw_block(buf, pos, h)
    lay = _layout(h, block, start, end, pos)
    return _split(block, lay.values, lay.n)


def decode_last_per_key(
    buf: Buffer, pos: int = 0, *, skip: int = 0, verify_crc: bool = True
) -> dict[bytes, tuple[int, int, bytes | None]]:
    """The last record per key of the batch at ``pos``, leaving out keyless records and
    those with an offset below ``base_offset + skip``: ``key -> (offset, timestamp_ms,
    value)``, value None for a tombstone. A cleaned (compacted) batch's offsets come from
    its offset deltas. Only the winners' values are cut out of the block: what a compacted
    table applies, at the cost of one dict insertion per record."""
    h = read_header(buf, pos)
    if verify_crc:
        _check_crc(buf, pos, h)
    block, start, end = _raw_block(buf, pos, h)
    lay = _layout(h, block, start, end, pos)
    n = lay.n
    deltas = lay.offset_deltas
    keys = _split(block, lay.keys, n)
    first_i = (skip if deltas is None else bisect.bisect_left(deltas, skip)) if skip > 0 else 0
    last = (
        {k: i for i, k in enumerate(keys) if i >= first_i}
        if first_i
        else dict(zip(keys, range(n), strict=True))
    )
    last.pop(None, None)  # type: ignore[call-overload]
    if not last:
        return {}
    vals = lay.values
    base, first = h.base_offset, h.first_timestamp
    ts = lay.ts

    def offset(i: int) -> int:
        return base + (i if deltas is None else deltas[i])

    out: dict[bytes, tuple[int, int, bytes | None]] = {}
    if vals.lens is None:
        for k, i in last.items():
            out[k] = (offset(i), first if ts is None else first + ts[i], None)  # type: ignore[index]
        return out
    lens = vals.lens
    bounds = list(
        accumulate([0 if x < 0 else x for x in lens] if vals.nulls else lens, initial=vals.at)
    )
    for k, i in last.items():
        value = None if lens[i] < 0 else block[bounds[i] : bounds[i + 1]]
        out[k] = (offset(i), first if ts is None else first + ts[i], value)  # type: ignore[index]
    return out


class KeyColumns(NamedTuple):
    """What the log cleaner needs of a batch's records, without building a Record each."""

    offsets: list[int]
    keys: list[bytes | None]
    #: Whether each record's value is null.
    tombstones: list[bool]
    timestamps: list[int]


def decode_key_columns(buf: Buffer, pos: int = 0, *, verify_crc: bool = True) -> KeyColumns:
    """Offsets, keys, null-value flags and timestamps of the batch at ``pos``."""
    h = read_header(buf, pos)
    if verify_crc:
        _check_crc(buf, pos, h)
    block, start, end = _raw_block(buf, pos, h)
    lay = _layout(h, block, start, end, pos)
    n = lay.n
    base = h.base_offset
    offsets = (
        list(range(base, base + n))
        if lay.offset_deltas is None
        else [base + d for d in lay.offset_deltas]
    )
    lens = lay.values.lens
    tombstones = [True] * n if lens is None else [x < 0 for x in lens]
    first = h.first_timestamp
    timestamps = [first] * n if lay.ts is None else [first + d for d in lay.ts]
    return KeyColumns(offsets, _split(block, lay.keys, n), tombstones, timestamps)
