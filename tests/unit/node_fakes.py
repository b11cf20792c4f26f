"""An in-memory stand-in for node/log's PartitionLog, for the node's unit tests.

It keeps whole batches in a list and honours the same contract (offset stamping, whole
batches on read, ``upto``, flushed offset), and it can be told to make flush slow or fail,
which the real log cannot do on demand.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

from tidelog.config import TopicConfig
from tidelog.errors import OffsetOutOfRange
from tidelog.records import iter_headers, stamp


class FakeLog:
    def __init__(self, directory: Path | None = None, config: TopicConfig | None = None) -> None:
        self.directory = directory
        self.config = config
        self.entries: list[tuple[int, int, bytes, int]] = []  # base, last, bytes, max ts
        self.log_start_offset = 0
        self.log_end_offset = 0
        self.flushed_offset = 0
        self.flush_calls = 0
        self.flush_delay_s = 0.0
        self.flush_error: Exception | None = None
        self.flushing_now = 0
        self.closed = False
        self.deleted = False
        self.rolls = 0
        self.retention_runs = 0
        self._lock = threading.Lock()
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True)

    @property
    def size_bytes(self) -> int:
        return sum(len(e[2]) for e in self.entries)

    @property
    def segment_count(self) -> int:
        return 1

    def append(self, batches: bytes, raft_term: int) -> tuple[int, int]:
        buf = bytearray(batches)
        base = offset = self.log_end_offset
        with self._lock:
            for pos, h in iter_headers(buf):
                stamp(buf, pos, offset, raft_term, 0)
                last = offset + h.record_count - 1
                self.entries.append((offset, last, bytes(buf[pos : pos + h.size]), h.max_timestamp))
                offset = last + 1
            self.log_end_offset = offset
        return base, offset - 1

    def read(self, offset: int, max_bytes: int, *, upto: int) -> bytes:
        if not self.log_start_offset <= offset <= self.log_end_offset:
            raise OffsetOutOfRange(f"offset {offset} outside {self.log_start_offset}..")
        out: list[bytes] = []
        size = 0
        for _base, last, data, _ in self.entries:
            if last < offset:
                continue
            if last >= upto:
                break
            if out and size + len(data) > max_bytes:
                break
            out.append(data)
            size += len(data)
        return b"".join(out)

    def offset_for_timestamp(self, timestamp_ms: int) -> tuple[int, int] | None:
        for base, _, _, max_ts in self.entries:
            if max_ts >= timestamp_ms:
                return base, max_ts
        return None

    def flush(self) -> int:
        with self._lock:
            target = self.log_end_offset
            self.flushing_now += 1
        try:
            if self.flush_delay_s:
                time.sleep(self.flush_delay_s)
            if self.flush_error is not None:
                raise self.flush_error
            self.flush_calls += 1
            self.flushed_offset = max(self.flushed_offset, target)
            return self.flushed_offset
        finally:
            with self._lock:
                self.flushing_now -= 1

    def enforce_retention(self, now_ms: int) -> None:
        self.retention_runs += 1

    def maybe_roll(self, now_ms: int) -> None:
        self.rolls += 1

    def update_config(self, config: TopicConfig) -> None:
        self.config = config

    def close(self) -> None:
        assert self.flushing_now == 0, "closed while a flush runs"
        self.closed = True

    def delete(self) -> None:
        assert self.flushing_now == 0, "deleted while a flush runs"
        self.deleted = True
        self.closed = True
