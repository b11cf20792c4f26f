"""Helpers shared by the partition log tests (test_log_*.py)."""

from __future__ import annotations

from pathlib import Path

from tidelog.config import TopicConfig
from tidelog.node.log import PartitionLog
from tidelog.records import decode_batches, encode_batch, iter_headers, validate_batch

#: The smallest segment.bytes the topic config accepts.
SEGMENT_BYTES_MIN = 4096


class Clock:
    """A settable millisecond clock injected as ``clock_ms``."""

    def __init__(self, now_ms: int = 1_000_000) -> None:
        self.now_ms = now_ms

    def __call__(self) -> int:
        return self.now_ms


def config(**overrides: int | str) -> TopicConfig:
    """``config(segment_bytes=4096)`` -> TopicConfig with ``segment.bytes=4096``."""
    return TopicConfig.from_overrides({k.replace("_", "."): str(v) for k, v in overrides.items()})


def batch(records: int = 1, value_bytes: int = 100, ts: int = 1_000, tag: int = 0) -> bytes:
    """A batch of ``records`` values; values carry ``tag`` so tests can tell batches apart."""
    value = (b"%08d" % tag).ljust(value_bytes, b"v")
    return encode_batch([value] * records, timestamps_ms=ts)


def open_log(directory: Path, clock: Clock | None = None, **overrides: int | str) -> PartitionLog:
    return PartitionLog(directory, config(**overrides), clock_ms=clock or Clock())


def fill(
    log: PartitionLog,
    count: int,
    records: int = 2,
    value_bytes: int = 100,
    term: int = 1,
    ts0: int = 1_000,
) -> list[tuple[int, int]]:
    """Append ``count`` batches (timestamps ts0, ts0+1, ...) and return their offset ranges."""
    return [log.append(batch(records, value_bytes, ts=ts0 + i, tag=i), term) for i in range(count)]


def offsets_of(data: bytes) -> list[int]:
    """The record offsets in fetched bytes, after checking every batch's CRC and records."""
    for pos, _h in iter_headers(data):
        validate_batch(data, pos)
    return [r.offset for r in decode_batches(data)]


def read_all(log: PartitionLog) -> list[int]:
    """Every stored record offset, read segment by segment from the log start."""
    out: list[int] = []
    offset = log.log_start_offset
    while offset < log.log_end_offset:
        data = log.read(offset, 1 << 20)
        got = offsets_of(data)
        assert got and got[-1] >= offset
        out += [o for o in got if o >= offset]
        offset = got[-1] + 1
    return out


def headers(log: PartitionLog) -> list[tuple[int, int, int]]:
    """(base_offset, raft_index, raft_term) of every stored batch, via Raft reads."""
    out = []
    for data in log.entries_by_index(log.first_index, log.last_index + 1, 1 << 40):
        (_pos, h), *rest = list(iter_headers(data))
        assert not rest
        out.append((h.base_offset, h.raft_index, h.raft_term))
    return out
