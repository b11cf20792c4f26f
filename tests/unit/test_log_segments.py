"""Partition log: segments, rolling, sparse indexes and reads."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from tests.unit.log_support import (
    SEGMENT_BYTES_MIN,
    Clock,
    batch,
    fill,
    offsets_of,
    open_log,
    read_all,
)
from tidelog.errors import OffsetOutOfRange, StorageError
from tidelog.node.log import PartitionLog
from tidelog.node.log.index import OFFSET_ENTRY_BYTES, TIME_ENTRY_BYTES, OffsetIndex
from tidelog.records import encode_batch, iter_headers


def test_roll_by_segment_bytes(tmp_path: Path) -> None:
    log = open_log(tmp_path, segment_bytes=SEGMENT_BYTES_MIN)
    ranges = fill(log, 60)
    assert ranges[0] == (0, 1) and ranges[-1] == (118, 119)
    assert log.log_end_offset == 120 and log.last_index == 60 and log.last_term == 1
    assert log.segment_count > 3
    bases = log.segment_base_offsets
    log.close()
    sizes = {}
    for base in bases:
        path = tmp_path / f"{base:020d}.log"
        sizes[base] = path.stat().st_size
        assert sizes[base] <= SEGMENT_BYTES_MIN
        first = next(iter_headers(path.read_bytes()))[1]
        assert first.base_offset == base
        assert (tmp_path / f"{base:020d}.index").exists()
        assert (tmp_path / f"{base:020d}.timeindex").exists()
    # Every segment but the last was filled as far as another batch would not fit.
    batch_size = len(batch(2))
    assert all(sizes[b] + batch_size > SEGMENT_BYTES_MIN for b in bases[:-1])
    log = open_log(tmp_path, segment_bytes=SEGMENT_BYTES_MIN)
    assert log.segment_base_offsets == bases
    assert read_all(log) == list(range(120))
    log.close()


def test_batch_larger_than_a_segment_gets_a_segment_of_its_own(tmp_path: Path) -> None:
    log = open_log(tmp_path, segment_bytes=SEGMENT_BYTES_MIN)
    fill(log, 2)
    big = batch(10, 1000)
    assert len(big) > SEGMENT_BYTES_MIN
    assert log.append(big, 1) == (4, 13)
    fill(log, 1)
    assert log.segment_base_offsets == [0, 4, 14]
    assert read_all(log) == list(range(16))
    log.close()


def test_roll_by_segment_ms(tmp_path: Path) -> None:
    clock = Clock()
    log = open_log(tmp_path, clock, segment_ms=1000)
    fill(log, 2)
    clock.now_ms += 999
    fill(log, 1)
    assert log.segment_count == 1
    assert not log.maybe_roll()
    clock.now_ms += 1
    fill(log, 1)
    assert log.segment_base_offsets == [0, 6]
    # The new segment's age counts from its first append.
    clock.now_ms += 500
    assert not log.maybe_roll()
    clock.now_ms += 500
    assert log.maybe_roll()
    assert log.segment_base_offsets == [0, 6, 8]
    # An empty active segment is never rolled; appends go into it.
    clock.now_ms += 10_000
    assert not log.maybe_roll()
    fill(log, 1)
    assert log.segment_base_offsets == [0, 6, 8]
    assert read_all(log) == list(range(10))
    log.close()


@pytest.mark.parametrize("interval", [0, 700, 4096, 1 << 20])
def test_read_from_every_offset(tmp_path: Path, interval: int) -> None:
    log = open_log(tmp_path, segment_bytes=8192, index_interval_bytes=interval)
    ranges = fill(log, 80, records=3)
    assert log.segment_count >= 3

    def check(log: PartitionLog) -> None:
        for base, last in ranges:
            for offset in range(base, last + 1):
                data = log.read(offset, 1)
                assert offsets_of(data) == [base, base + 1, base + 2], offset

    check(log)
    log.close()
    log = open_log(tmp_path, segment_bytes=8192, index_interval_bytes=interval)
    check(log)
    log.close()


def test_sparse_index_entries(tmp_path: Path) -> None:
    log = open_log(tmp_path, segment_bytes=1 << 20, index_interval_bytes=1000)
    fill(log, 50)
    size = log.size_bytes
    log.close()
    raw = (tmp_path / f"{0:020d}.index").read_bytes()
    assert len(raw) % OFFSET_ENTRY_BYTES == 0
    index = OffsetIndex.from_bytes(raw, size)
    assert index is not None
    # One entry per ~1000 bytes of batches, each at a batch start with the right offset.
    assert size // 1000 - 2 <= len(index) <= size // 1000 + 1
    data = (tmp_path / f"{0:020d}.log").read_bytes()
    starts = {pos: h.base_offset for pos, h in iter_headers(data)}
    for rel, pos in zip(index.rel_offsets, index.positions, strict=True):
        assert starts[pos] == rel
    gaps = [b - a for a, b in zip(index.positions, index.positions[1:], strict=False)]
    assert all(1000 <= g < 1000 + len(batch(2)) for g in gaps)
    assert len((tmp_path / f"{0:020d}.timeindex").read_bytes()) % TIME_ENTRY_BYTES == 0


@pytest.mark.parametrize("closed", [False, True])
def test_read_respects_max_bytes_and_upto(tmp_path: Path, closed: bool) -> None:
    clock = Clock()
    log = open_log(tmp_path, clock, segment_ms=1000)
    ranges = fill(log, 10)  # two records per batch: offsets 0..19
    if closed:
        # Reopened closed segments find batch boundaries by walking headers, not positions.
        clock.now_ms += 1000
        assert log.maybe_roll()
        fill(log, 1)
        log.close()
        log = open_log(tmp_path, clock, segment_ms=1000)
        assert log.segment_base_offsets == [0, 20]
    one = len(batch(2))
    assert offsets_of(log.read(0, 1)) == [0, 1]  # at least one batch
    assert offsets_of(log.read(0, one)) == [0, 1]
    assert offsets_of(log.read(0, 3 * one - 1)) == [0, 1, 2, 3]
    assert offsets_of(log.read(3, 3 * one)) == [2, 3, 4, 5, 6, 7]
    assert offsets_of(log.read(0, 1 << 20)) == list(range(20))
    # upto: only batches entirely below it.
    assert offsets_of(log.read(0, 1 << 20, upto=10)) == list(range(10))
    assert offsets_of(log.read(0, 1 << 20, upto=11)) == list(range(10))
    assert log.read(10, 1 << 20, upto=11) == b""  # straddles upto
    assert log.read(10, 1 << 20, upto=10) == b""
    assert log.read(12, 1 << 20, upto=10) == b""  # above the watermark, below the end
    assert log.read(20, 1 << 20, upto=20) == b""
    assert offsets_of(log.read(4, 1, upto=1 << 40)) == [4, 5]
    assert ranges[-1] == (18, 19)
    log.close()


def test_read_out_of_range_names_the_range(tmp_path: Path) -> None:
    log = open_log(tmp_path)
    fill(log, 3)
    with pytest.raises(OffsetOutOfRange) as info:
        log.read(7, 100, upto=4)
    assert "[0, 6]" in str(info.value)
    assert info.value.metadata == {"log_start_offset": "0", "high_watermark": "4"}
    with pytest.raises(OffsetOutOfRange):
        log.read(-1, 100)
    log.close()


def test_offset_for_timestamp(tmp_path: Path) -> None:
    clock = Clock()
    log = open_log(tmp_path, clock, segment_bytes=SEGMENT_BYTES_MIN, index_interval_bytes=600)
    # Timestamps mostly rising, with stragglers, and batches spanning several milliseconds.
    stamps = [1000 + 10 * i + (-25 if i % 7 == 3 else 0) for i in range(70)]
    batches = []
    for ts in stamps:
        data = encode_batch([b"x" * 100, b"y" * 100], timestamps_ms=[ts, ts + 3])
        base, _last = log.append(data, 1)
        batches.append((base, ts + 3))
    assert log.segment_count > 3

    def expected(t: int) -> tuple[int, int] | None:
        return next(((b, m) for b, m in batches if m >= t), None)

    probes = range(900, 1000 + 10 * 70 + 20, 3)
    for t in probes:
        assert log.offset_for_timestamp(t) == expected(t), t
    log.close()
    log = open_log(tmp_path, clock, segment_bytes=SEGMENT_BYTES_MIN, index_interval_bytes=600)
    for t in probes:
        assert log.offset_for_timestamp(t) == expected(t), t
    assert log.offset_for_timestamp(10**12) is None
    log.close()


def _closed_segment_files(directory: Path) -> list[Path]:
    logs = sorted(directory.glob("*.log"))
    return logs[:-1]


def test_damaged_index_files_are_rebuilt(tmp_path: Path) -> None:
    log = open_log(tmp_path, segment_bytes=SEGMENT_BYTES_MIN, index_interval_bytes=500)
    fill(log, 60)
    log.close()
    closed = _closed_segment_files(tmp_path)
    assert len(closed) >= 4
    originals = {
        p: p.read_bytes()
        for c in closed
        for p in (c.with_suffix(".index"), c.with_suffix(".timeindex"))
    }
    a, b, c, d = closed[:4]
    a.with_suffix(".index").unlink()
    b.with_suffix(".timeindex").write_bytes(b"\x01" * 5)  # torn length
    # c: a plausible index whose first entry names the wrong batch; open checks only the
    # last entry of each closed index, a read checks the entry it uses and heals the index.
    raw = bytearray(originals[c.with_suffix(".index")])
    raw[0:4] = (int.from_bytes(raw[0:4], "little") + 1).to_bytes(4, "little")
    c.with_suffix(".index").write_bytes(bytes(raw))
    # d: an index that stops early (a crash before it was fully written).
    d.with_suffix(".index").write_bytes(originals[d.with_suffix(".index")][:8])

    log = open_log(tmp_path, segment_bytes=SEGMENT_BYTES_MIN, index_interval_bytes=500)
    assert read_all(log) == list(range(120))
    for base in range(0, 120, 2):
        assert offsets_of(log.read(base, 1)) == [base, base + 1]
    log.close()
    for path, data in originals.items():
        assert path.read_bytes() == data, path


def test_wrong_index_entry_is_healed_on_read(tmp_path: Path) -> None:
    log = open_log(tmp_path, segment_bytes=SEGMENT_BYTES_MIN, index_interval_bytes=500)
    ranges = fill(log, 30)
    log.close()
    first = _closed_segment_files(tmp_path)[0]
    original = first.with_suffix(".index").read_bytes()
    # Swap the positions of the first two entries' batches: valid shape, wrong content.
    raw = bytearray(original)
    raw[4:8], raw[12:16] = raw[12:16], raw[4:8]
    raw[12:16] = (int.from_bytes(raw[4:8], "little") + 1).to_bytes(4, "little")
    index = OffsetIndex.from_bytes(bytes(raw), first.stat().st_size)
    assert index is not None  # shape is fine, so only a read can notice
    first.with_suffix(".index").write_bytes(bytes(raw))
    log = open_log(tmp_path, segment_bytes=SEGMENT_BYTES_MIN, index_interval_bytes=500)
    for base, _last in ranges:
        assert offsets_of(log.read(base, 1))[0] == base
    log.close()
    assert first.with_suffix(".index").read_bytes() == original


def test_one_write_per_append(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = open_log(tmp_path)
    calls: list[int] = []
    real = os.pwrite

    def counting(fd: int, data: bytes, offset: int, /) -> int:
        calls.append(len(data))
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", counting)
    three = batch(1, tag=1) + batch(5, tag=2) + batch(2, tag=3)
    assert log.append(three, 1) == (0, 7)
    assert calls == [len(three)]
    assert log.last_index == 3
    assert offsets_of(log.read(0, 1 << 20)) == list(range(8))
    log.close()


def test_failed_write_leaves_the_log_unchanged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = open_log(tmp_path)
    fill(log, 3)
    real = os.pwrite

    def half_then_full(fd: int, data: bytes, offset: int, /) -> int:
        real(fd, bytes(memoryview(data)[: len(data) // 2]), offset)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", half_then_full)
    with pytest.raises(StorageError, match="No space left"):
        log.append(batch(2), 1)
    monkeypatch.setattr(os, "pwrite", real)
    assert (log.log_end_offset, log.last_index) == (6, 3)
    assert (tmp_path / f"{0:020d}.log").stat().st_size == log.size_bytes
    assert log.append(batch(2), 1) == (6, 7)
    assert read_all(log) == list(range(8))
    log.close()
    log = open_log(tmp_path)
    assert read_all(log) == list(range(8))
    log.close()
