"""The partition log: the storage of one partition replica, which is also its Raft log.

Every stored batch is one Raft entry. The node stamps three fields outside the producer's
CRC: ``base_offset`` (consumer offsets, contiguous per record), ``raft_term`` and
``raft_index`` (contiguous per batch, from 1). This module is the one place where Raft
indexes and consumer offsets are translated into each other (``term_at_index``,
``entries_by_index``, ``end_offset_at_index``).

On disk a partition is a directory of segments, ``<base_offset:020d>.log`` with sparse
``.index`` and ``.timeindex`` caches (see ``segment.py`` and ``index.py``), plus
``log_start.json``, written only when the front of the log moves (retention, prefix
truncation, reset, a new logical start): it remembers the Raft index and term just before the
first remaining batch, which Raft needs and which no remaining batch can tell, and the
*logical* log start.

Two starts: the *stored* start (``stored_start_offset``, the first segment's base offset,
where the Raft log begins) and the *logical* start (``log_start_offset``, at or above it),
below which offsets are out of range for reads even where the bytes are still stored. The
replicas of a partition agree on the logical start (the leader replicates it, see
``node/partition.py``); each deletes only whole segments below it, and their segment
boundaries differ, so the stored starts may differ. The logical start is persisted in
log_start.json before it takes effect.

``recovery_point`` (as Kafka's recovery-point checkpoint) holds an offset below which every
byte is known to be fsynced: written when the log is opened (after recovery fsynced it all)
and closed, and by the first flush after a segment rolled, lowered before a truncation or
reset cuts below it. Recovery checks the CRC of every batch of the last segment and of
each closed segment that ends beyond the recovery point (written since that fsync: under
``flush=os`` a power loss may have torn a batch whose header survived); closed segments below
it are opened from their indexes without reading their data. A log closed cleanly reads no
closed segment's data on the next start; after a crash, only segments rolled since the last
roll of a ``flush=durable`` log, or since the last start of a ``flush=os`` log.

Threads: every method runs on one thread (the node's event loop), except ``flush``, which a
worker thread may run concurrently. ``flush`` snapshots the end of the log under a lock,
fsyncs duplicated descriptors outside it (``os.fsync`` releases the GIL) and only then
advances ``flushed_offset``, so a segment closed or deleted meanwhile is harmless.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from bisect import bisect_right
from collections.abc import Callable, Sequence
from itertools import pairwise
from operator import attrgetter
from pathlib import Path
from typing import NamedTuple

from tidelog import records
from tidelog.config import TopicConfig
from tidelog.errors import OffsetOutOfRange, StorageError
from tidelog.node.io import REAL_FS, FileSystem
from tidelog.records import HEADER_SIZE

from .clean_state import CleanerStats
from .segment import (
    INDEX_SUFFIX,
    LOG_SUFFIX,
    NO_TIMESTAMP,
    RELATIVE_OFFSET_MAX,
    SEGMENT_BYTES_MAX,
    TIMEINDEX_SUFFIX,
    Segment,
    peek_header,
)

log = logging.getLogger(__name__)

START_FILE = "log_start.json"
RECOVERY_POINT_FILE = "recovery_point"
#: The log cleaner's checkpoint: the first offset it has not cleaned (see cleaner.py).
CLEANER_CHECKPOINT_FILE = "cleaner_checkpoint"
#: A segment the cleaner is writing; on open such a file is half a swap and is discarded.
CLEANED_SUFFIX = ".cleaned"
#: entries_by_index reads entries at least this large (on average) with one pread each.
ENTRY_OWN_READ_BYTES_MIN = 16 * 1024
_START_FILE_VERSION = 1
_SEGMENT_FILE_RE = re.compile(r"^(\d{20})(\.log|\.index|\.timeindex)$")

_by_base = attrgetter("base_offset")
_by_first_index = attrgetter("first_index")


class ContinuityError(ValueError):
    """A batch handed to ``append_stamped`` does not continue the log (offset, Raft index or
    term), or ``append`` was given a term older than the log's last term."""


class _Entry(NamedTuple):
    """A batch about to be stored: its place in the buffer and its stamped identity."""

    pos: int
    size: int
    base_offset: int
    last_offset: int
    raft_index: int
    raft_term: int
    max_timestamp: int


class _Start(NamedTuple):
    """Contents of ``log_start.json``. ``reset`` is set while a ``reset`` is in progress.
    ``log_start_offset`` is the stored start (first segment's base); ``logical_start_offset``
    the logical start (files of older versions lack it: then the stored start).
    ``prev_term`` -1: not known."""

    log_start_offset: int
    first_index: int
    prev_term: int
    reset: bool
    logical_start_offset: int


def wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


class PartitionLog:
    """Append-only segmented log of one partition replica; see the module docstring."""

    def __init__(
        self,
        directory: Path,
        config: TopicConfig,
        *,
        clock_ms: Callable[[], int] = wall_clock_ms,
        fs: FileSystem = REAL_FS,
    ) -> None:
        self._fs = fs
        self._dir = Path(directory)
        self._config = config
        self._clock_ms = clock_ms
        # Guards what flush() reads from another thread: the segment list, dirty flags,
        # the end of the log and flushed_offset.
        self._lock = threading.Lock()
        # One flush at a time, so _trunc_low belongs to exactly one flush.
        self._flush_lock = threading.Lock()
        self._segments: list[Segment] = []
        # Term of the entry at first_index - 1 (None when no file tells it).
        self._prev_term: int | None = 0
        # The logical log start (log_start_offset is the larger of it and the stored start).
        self._logical_start = 0
        self._size_bytes = 0
        self._dir_dirty = False
        self._closed = False
        self._flushed = 0
        # Lowest offset a truncation cut the log to since the running flush took its snapshot.
        self._trunc_low = 0
        # What RECOVERY_POINT_FILE holds (read by _recover). Written by flush (a worker
        # thread) and by truncations and resets (the owning thread), which hold this lock
        # throughout: a flush never records a point above a cut.
        self._recovery_point = 0
        self._rp_lock = threading.Lock()
        #: The log cleaner's first dirty offset (persisted in CLEANER_CHECKPOINT_FILE).
        self._cleaner_checkpoint = 0
        #: What the cleaner reports about this log (node/log/cleaner.py; metrics read it).
        self.cleaner_stats = CleanerStats()
        fs.makedirs(self._dir)
        try:
            self._recover()
        except BaseException:
            for seg in self._segments:
                seg.close()
            raise
        self._size_bytes = sum(s.size for s in self._segments)
        self._flushed = self._trunc_low = self.log_end_offset
        self._write_recovery_point(self._flushed)  # recovery fsynced everything
        self._cleaner_checkpoint = self._read_cleaner_checkpoint()
        # A log that lost its tail (flush=os after a power loss) gets those offsets again
        # from its leader, uncleaned: the checkpoint must not claim them.
        self._lower_cleaner_checkpoint(self.log_end_offset)

    # ---- state -------------------------------------------------------------------------

    @property
    def directory(self) -> Path:
        return self._dir

    @property
    def config(self) -> TopicConfig:
        return self._config

    @property
    def log_start_offset(self) -> int:
        """The logical log start: the first offset reads serve (at or above the stored start)."""
        return max(self._logical_start, self._segments[0].base_offset)

    @property
    def stored_start_offset(self) -> int:
        """The first offset still stored (the first segment's base): where the Raft log
        begins. Below ``log_start_offset`` when the logical start lies inside a segment."""
        return self._segments[0].base_offset

    @property
    def log_end_offset(self) -> int:
        return self._segments[-1].next_offset

    @property
    def flushed_offset(self) -> int:
        return self._flushed

    @property
    def last_term(self) -> int:
        return self._segments[-1].last_term

    @property
    def last_index(self) -> int:
        return self._segments[-1].last_index

    @property
    def first_index(self) -> int:
        return self._segments[0].first_index

    @property
    def size_bytes(self) -> int:
        return self._size_bytes

    @property
    def segment_count(self) -> int:
        return len(self._segments)

    @property
    def segment_base_offsets(self) -> list[int]:
        return [s.base_offset for s in self._segments]

    def __repr__(self) -> str:
        return (
            f"PartitionLog({str(self._dir)!r}, offsets [{self.log_start_offset}, "
            f"{self.log_end_offset}), indexes [{self.first_index}, {self.last_index}], "
            f"{self.segment_count} segments)"
        )

    # ---- appending ---------------------------------------------------------------------

    def append(self, batches: bytes | bytearray | memoryview, raft_term: int) -> tuple[int, int]:
        """Store already validated batches as the next Raft entries of ``raft_term``.

        The batches are stamped in a copy (the caller's buffer may be a gRPC message) and
        written with one ``pwrite``. Returns the first base offset and the last offset.
        """
        self._check_open()
        if raft_term < self.last_term:
            raise ContinuityError(
                f"cannot append in term {raft_term}: the log already holds term {self.last_term}"
            )
        buf = bytearray(batches)
        if not buf:
            raise ValueError("append() needs at least one batch, got 0 bytes")
        offset = first = self.log_end_offset
        index = self.last_index + 1
        entries: list[_Entry] = []
        for pos, h in records.iter_headers(buf):
            records.stamp(buf, pos, offset, raft_term, index)
            last = offset + h.last_offset_delta
            entries.append(_Entry(pos, h.size, offset, last, index, raft_term, h.max_timestamp))
            offset = last + 1
            index += 1
        self._store(buf, entries)
        return first, offset - 1

    def append_stamped(self, batches: bytes | bytearray | memoryview) -> None:
        """Store batches stamped elsewhere (a Raft follower storing the leader's entries).

        Each batch's CRC is checked (the bytes crossed the network), and each must continue
        the log: ``base_offset == log_end_offset``, ``raft_index == last_index + 1`` and a
        term no older than the last. Nothing is written unless all of them pass.
        """
        self._check_open()
        view = memoryview(batches)
        if not view:
            raise ValueError("append_stamped() needs at least one batch, got 0 bytes")
        offset = self.log_end_offset
        index = self.last_index + 1
        term = self.last_term
        entries: list[_Entry] = []
        pos = 0
        while pos < len(view):
            h = records.validate_batch(view, pos, check_records=False)
            where = f"batch at byte {pos} (raft index {h.raft_index})"
            if h.base_offset != offset:
                raise ContinuityError(
                    f"{where} has base_offset {h.base_offset}, the log continues at {offset}"
                )
            if h.raft_index != index:
                raise ContinuityError(
                    f"{where} has raft_index {h.raft_index}, the log continues at {index}"
                )
            if h.raft_term < term:
                raise ContinuityError(
                    f"{where} has raft_term {h.raft_term}, older than the log's term {term}"
                )
            entries.append(
                _Entry(pos, h.size, offset, h.last_offset, index, h.raft_term, h.max_timestamp)
            )
            offset = h.last_offset + 1
            index += 1
            term = h.raft_term
            pos += h.size
        self._store(view, entries)

    def _store(self, data: bytes | bytearray | memoryview, entries: Sequence[_Entry]) -> None:
        nbytes = len(data)
        if nbytes > SEGMENT_BYTES_MAX:
            raise ValueError(f"cannot append {nbytes} bytes at once: at most {SEGMENT_BYTES_MAX}")
        with self._lock:
            seg = self._segments[-1]
            now = self._clock_ms()
            if self._needs_roll(seg, nbytes, entries[-1].last_offset, now):
                self._roll()
                seg = self._segments[-1]
            if entries[-1].last_offset - seg.base_offset > RELATIVE_OFFSET_MAX:
                raise ValueError(
                    f"one append of offsets up to {entries[-1].last_offset} cannot start a "
                    f"segment at {seg.base_offset}: more than {RELATIVE_OFFSET_MAX} offsets"
                )
            if seg.created_ms is None:
                seg.created_ms = now
            at = seg.size
            # Dirty before the data lands: a concurrent flush that sees the new end also
            # sees that this segment needs an fsync.
            seg.dirty = True
            seg.write(data)
            for e in entries:
                seg.track(
                    at + e.pos,
                    e.size,
                    e.base_offset,
                    e.last_offset,
                    e.raft_index,
                    e.raft_term,
                    e.max_timestamp,
                )
            self._size_bytes += nbytes

    def _needs_roll(self, seg: Segment, nbytes: int, last_offset: int, now_ms: int) -> bool:
        if seg.size == 0:
            return False
        if seg.size + nbytes > min(self._config.segment_bytes, SEGMENT_BYTES_MAX):
            return True
        if last_offset - seg.base_offset > RELATIVE_OFFSET_MAX:
            return True
        return seg.created_ms is not None and now_ms - seg.created_ms >= self._config.segment_ms

    def _roll(self) -> None:
        """Seal the active segment and start an empty one at the end (lock held)."""
        old = self._segments[-1]
        old.seal()
        self._write_indexes(old)
        new = Segment.create(
            self._dir,
            old.next_offset,
            first_index=old.last_index + 1,
            prev_term=old.last_term,
            index_interval_bytes=self._config.index_interval_bytes,
            fs=self._fs,
        )
        self._segments.append(new)
        self._dir_dirty = True

    def roll(self) -> bool:
        """Seal the active segment now (unless it is empty), so that what it holds can be
        deleted as a whole later (the controller log after a snapshot)."""
        self._check_open()
        with self._lock:
            if self._segments[-1].size == 0:
                return False
            self._roll()
            return True

    def maybe_roll(self, now_ms: int | None = None) -> bool:
        """Roll by ``segment.ms`` even when nothing is appended, so that retention can
        delete old data of a partition that went quiet. An empty active segment stays."""
        self._check_open()
        now = self._clock_ms() if now_ms is None else now_ms
        with self._lock:
            seg = self._segments[-1]
            if seg.size == 0 or seg.created_ms is None:
                return False
            if now - seg.created_ms < self._config.segment_ms:
                return False
            self._roll()
            return True

    def _write_indexes(self, seg: Segment) -> None:
        try:
            seg.write_indexes()
        except OSError as exc:
            # Only a cache: the next open rebuilds it.
            log.warning("cannot write the indexes of %s (rebuilt on next open): %s", seg.path, exc)

    # ---- reading -----------------------------------------------------------------------

    def _out_of_range(self, offset: int, hw: int) -> OffsetOutOfRange:
        start, end = self.log_start_offset, self.log_end_offset
        return OffsetOutOfRange(
            f"offset {offset} is out of range [{start}, {end}] for the partition stored in "
            f"{self._dir.name}: seek to an offset in that range (the log start moves as "
            "retention deletes old segments)",
            log_start_offset=str(start),
            high_watermark=str(hw),
        )

    def read(
        self, offset: int, max_bytes: int, *, upto: int | None = None, stored: bool = False
    ) -> bytes:
        """Whole batches from the one holding ``offset`` on, all entirely below ``upto``
        (default: the log end), within one segment, as many as fit in ``max_bytes`` but at
        least one. A batch that straddles ``upto`` is not served (b"" if it is the first).
        ``stored``: offsets from the stored start on are served, not only from the logical
        start (a catch-up copy sends the batch holding the logical start whole)."""
        self._check_open()
        end = self.log_end_offset
        limit = end if upto is None else min(upto, end)
        floor = self.stored_start_offset if stored else self.log_start_offset
        if offset < floor or offset > end:
            raise self._out_of_range(offset, limit)
        if offset >= limit:
            return b""
        seg = self._segments[bisect_right(self._segments, offset, key=_by_base) - 1]
        pos, h = seg.find(offset)
        if h.last_offset >= limit:
            return b""
        # Bytes up to the batch holding `limit` (excluded), and within max_bytes.
        stop = seg.find(limit)[0] if limit < seg.next_offset else seg.size
        budget_end = pos + max(h.size, max_bytes)
        if budget_end >= stop:
            return seg.pread(stop - pos, pos)
        positions = seg.positions
        if positions is not None:
            # Batch boundaries are known: read exactly the batches that fit, no copy after.
            k = h.raft_index - seg.first_index
            end = positions[bisect_right(positions, budget_end, lo=k + 1) - 1]
            return seg.pread(end - pos, pos)
        want = budget_end - pos
        data = seg.pread(want, pos)
        cut = h.size
        while cut + HEADER_SIZE <= want:
            nxt = peek_header(data, cut, pos + cut)
            if cut + nxt.size > want or nxt.last_offset >= limit:
                break
            cut += nxt.size
        return data if cut == want else data[:cut]

    def offset_for_timestamp(self, timestamp_ms: int) -> tuple[int, int] | None:
        """The first batch whose max timestamp is >= ``timestamp_ms``: its base offset and
        that max timestamp, or None when no stored batch is that recent.

        Granularity is the batch: the offset returned may belong to a record older than
        ``timestamp_ms`` in the same batch (the consumer skips it when it decodes), as the
        broker never opens batches.
        """
        self._check_open()
        log_start = self.log_start_offset
        for seg in self._segments:
            if seg.size == 0 or seg.max_timestamp < timestamp_ms or seg.next_offset <= log_start:
                continue
            rel = seg.time_index.start_for(timestamp_ms)
            start, _h = seg.find(max(seg.base_offset + rel, log_start))
            for _pos, h, _buf, _off in seg.walk(start, seg.size):
                if h.max_timestamp >= timestamp_ms:
                    return h.base_offset, h.max_timestamp
            raise StorageError(
                f"{seg.path}: its newest timestamp is {seg.max_timestamp} but no batch after "
                f"offset {seg.base_offset + rel} reaches {timestamp_ms}"
            )
        return None

    # ---- Raft lookups ------------------------------------------------------------------

    def _segment_for_index(self, raft_index: int) -> Segment:
        return self._segments[bisect_right(self._segments, raft_index, key=_by_first_index) - 1]

    def term_at_index(self, raft_index: int) -> int | None:
        """Term of the entry at ``raft_index``; also of ``first_index - 1`` (the entry just
        before the log, when known). None outside that range."""
        self._check_open()
        if raft_index == self.last_index:
            return self.last_term
        if raft_index == self.first_index - 1:
            return self._prev_term
        if not self.first_index <= raft_index <= self.last_index:
            return None
        seg = self._segment_for_index(raft_index)
        pos = seg.ensure_positions()[raft_index - seg.first_index]
        return seg.header_at(pos).raft_term

    def end_offset_at_index(self, raft_index: int) -> int | None:
        """The offset after the entry at ``raft_index``: the high watermark once Raft has
        committed ``raft_index``. For ``first_index - 1``, the stored start. None outside."""
        self._check_open()
        if raft_index == self.last_index:
            return self.log_end_offset
        if raft_index == self.first_index - 1:
            return self.stored_start_offset
        if not self.first_index <= raft_index <= self.last_index:
            return None
        seg = self._segment_for_index(raft_index)
        pos = seg.ensure_positions()[raft_index - seg.first_index]
        return seg.header_at(pos).last_offset + 1

    def bytes_after_index(self, raft_index: int) -> int:
        """Bytes of the stored batches after the entry at ``raft_index`` (every stored byte
        below the log's first index, 0 from its last): what a follower whose log ends there
        still lacks."""
        self._check_open()
        segments = self._segments
        active = segments[-1]
        if raft_index >= active.last_index:
            return 0
        if raft_index >= active.first_index:  # the usual case: a follower keeping up
            j = raft_index - active.first_index + 1
            return active.size - active.ensure_positions()[j]
        if raft_index < segments[0].first_index:
            return self._size_bytes
        i = bisect_right(segments, raft_index, key=_by_first_index) - 1
        seg = segments[i]
        positions = seg.ensure_positions()
        j = raft_index - seg.first_index + 1
        pos = positions[j] if j < len(positions) else seg.size
        return seg.size - pos + sum(s.size for s in segments[i + 1 :])

    def entries_by_index(self, lo: int, hi: int, max_bytes: int) -> list[bytes]:
        """The batches of Raft entries ``[lo, hi)`` (``hi`` is capped at the log end), one
        ``bytes`` each, stopping before ``max_bytes`` would be exceeded but returning at least
        one entry when the range is not empty. Raises ValueError when ``lo`` is no longer
        stored (below ``first_index``): the caller needs a snapshot instead."""
        self._check_open()
        if lo < self.first_index:
            raise ValueError(
                f"raft index {lo} is no longer in the log (first index {self.first_index})"
            )
        hi = min(hi, self.last_index + 1)
        out: list[bytes] = []
        budget = max_bytes
        index = lo
        while index < hi:
            seg = self._segment_for_index(index)
            positions = seg.ensure_positions()
            j = index - seg.first_index
            k = min(hi, seg.last_index + 1) - seg.first_index
            start = positions[j]
            stop = j
            end = start
            while stop < k:
                nxt = positions[stop + 1] if stop + 1 < len(positions) else seg.size
                if nxt - start > budget and (out or stop > j):
                    break
                end = nxt
                stop += 1
            if stop == j:
                break
            bounds = [*positions[j:stop], end]
            if end - start >= (stop - j) * ENTRY_OWN_READ_BYTES_MIN:
                # Large entries: one pread each, rather than a big read sliced (copied) again.
                out += [seg.pread(b - a, a) for a, b in pairwise(bounds)]
            else:
                data = seg.pread(end - start, start)
                out += [data[a - start : b - start] for a, b in pairwise(bounds)]
            budget -= end - start
            index = seg.first_index + stop
            if stop < k:
                break
        return out

    # ---- truncation and retention ------------------------------------------------------

    def truncate_suffix(self, offset: int) -> None:
        """Drop every batch whose base offset is >= ``offset`` (Raft conflict truncation).
        ``offset`` must be a batch boundary between the stored start and the log end."""
        self._check_open()
        start, end = self.stored_start_offset, self.log_end_offset
        if offset == end:
            return
        if not start <= offset < end:
            raise ValueError(f"cannot truncate at offset {offset}: the log holds [{start}, {end})")
        i = bisect_right(self._segments, offset, key=_by_base) - 1
        seg = self._segments[i]
        pos, h = seg.find(offset)
        if h.base_offset != offset:
            raise ValueError(
                f"cannot truncate at offset {offset}: it lies inside the batch "
                f"[{h.base_offset}, {h.last_offset}]; truncate at {h.base_offset} or "
                f"{h.last_offset + 1}"
            )
        with self._rp_lock:
            # What is written after the cut is not fsynced: recovery must check it. (A flush
            # recording a point meanwhile waits, then sees the cut in _trunc_low.)
            if offset < self._recovery_point:
                self._write_recovery_point(offset)
            self._truncate_at(i, seg, pos, h, offset)
        self._lower_cleaner_checkpoint(offset)

    def _truncate_at(
        self, i: int, seg: Segment, pos: int, h: records.BatchHeader, offset: int
    ) -> None:
        with self._lock:
            doomed = self._segments[i + 1 :]
            del self._segments[i + 1 :]
            if pos == 0 and i > 0:
                doomed.insert(0, seg)
                del self._segments[i]
            else:
                prev_term = self._segments[i - 1].last_term if i else (self._prev_term or 0)
                seg.truncate(pos, h, prev_term)
            self._size_bytes = sum(s.size for s in self._segments)
            self._flushed = min(self._flushed, offset)
            self._trunc_low = min(self._trunc_low, offset)
            if doomed:
                self._dir_dirty = True
        for s in doomed:
            s.unlink()
        log.info(
            "%s: truncated the log at offset %d (raft index %d)", self._dir, offset, h.raft_index
        )

    def truncate_prefix(self, offset: int) -> int:
        """Delete the segments lying entirely below ``offset`` (never the active one), e.g.
        once a Raft snapshot covers them. Returns how many were deleted."""
        self._check_open()
        if offset > self.log_end_offset:
            raise ValueError(
                f"cannot truncate the log prefix below {offset}: the log ends at "
                f"{self.log_end_offset}"
            )
        n = 0
        while n < len(self._segments) - 1 and self._segments[n].next_offset <= offset:
            n += 1
        if n:
            self._drop_front(n)
        return n

    def enforce_retention(self, now_ms: int | None = None, *, below: int | None = None) -> int:
        """Delete the oldest closed segments while the oldest is past ``retention.ms`` (by
        its newest timestamp) or the log is larger than ``retention.bytes``. ``below``, when
        given, protects offsets at and above it (what Raft has not yet committed or
        snapshotted). The active segment is never deleted. Returns how many were deleted.

        This is :meth:`retention_point` and :meth:`advance_start` in one, for a log that is
        its own authority. A replicated partition never calls it: its leader decides with
        ``retention_point`` and every replica applies the replicated start with
        ``advance_start`` (``Partition.enforce_retention``)."""
        point = self.retention_point(now_ms, below=below)
        return 0 if point is None else self.advance_start(point)

    def retention_point(self, now_ms: int | None = None, *, below: int | None = None) -> int | None:
        """The log start that ``retention.ms`` / ``retention.bytes`` allow: the base offset
        of the first closed segment to keep, when retention would delete at least one segment
        (the one holding the logical start counts from there); None when it would delete
        nothing. ``below`` protects offsets at and above it; the active segment is always
        kept. Decides only: nothing is deleted."""
        self._check_open()
        if "delete" not in self._config.cleanup_policy.split(","):
            return None  # cleanup.policy=compact: the cleaner alone removes records
        now = self._clock_ms() if now_ms is None else now_ms
        retention_ms = self._config.retention_ms
        retention_bytes = self._config.retention_bytes
        segs = self._segments
        log_start = self.log_start_offset
        n = bisect_right(segs, log_start, key=_by_base) - 1
        if n >= len(segs) - 1:
            return None
        # Bytes from the logical start on.
        head = segs[n].find(log_start)[0] if log_start > segs[n].base_offset else 0
        size = sum(s.size for s in segs[n:]) - head
        point: int | None = None
        while n < len(segs) - 1:
            seg = segs[n]
            if below is not None and seg.next_offset > below:
                break
            expired = retention_ms >= 0 and now - self._newest_ms(seg) > retention_ms
            oversize = retention_bytes >= 0 and size > retention_bytes
            if not (expired or oversize):
                break
            size -= seg.size - head
            head = 0
            n += 1
            point = segs[n].base_offset
        return point

    def advance_start(self, offset: int) -> int:
        """Raise the logical log start to ``offset`` (never lowers it) and delete the closed
        segments lying entirely below it; the segment holding ``offset`` stays, its batches
        below ``offset`` out of range from now on. The new start is durable (log_start.json)
        before anything is deleted. Returns how many segments were deleted."""
        self._check_open()
        if offset > self.log_end_offset:
            raise ValueError(
                f"cannot move the log start to {offset}: the log ends at {self.log_end_offset}"
            )
        if offset <= self.log_start_offset:
            return 0
        segs = self._segments
        n = 0
        while n < len(segs) - 1 and segs[n].next_offset <= offset:
            n += 1
        if n:
            self._drop_front(n, logical_start=offset)
        else:
            first = segs[0]
            prev_term = -1 if self._prev_term is None else self._prev_term
            self._write_start(
                _Start(first.base_offset, first.first_index, prev_term, False, offset)
            )
            self._logical_start = offset
        log.info(
            "%s: the log start moved to offset %d (%d segment(s) deleted; the log is stored "
            "from offset %d)",
            self._dir,
            offset,
            n,
            self.stored_start_offset,
        )
        return n

    def _newest_ms(self, seg: Segment) -> int:
        if seg.max_timestamp != NO_TIMESTAMP:
            return seg.max_timestamp
        return self._fs.mtime_ns(seg.fd) // 1_000_000

    def _drop_front(self, n: int, *, logical_start: int = 0) -> None:
        """Delete the first ``n`` segments (and raise the logical start to ``logical_start``
        if it is higher). log_start.json is made durable first: a crash after it finishes
        the deletion on open; a crash before it leaves the log unchanged."""
        doomed = self._segments[:n]
        first = self._segments[n]
        prev_term = doomed[-1].last_term
        logical = max(logical_start, self._logical_start, first.base_offset)
        self._write_start(_Start(first.base_offset, first.first_index, prev_term, False, logical))
        with self._lock:
            del self._segments[:n]
            self._size_bytes = sum(s.size for s in self._segments)
            self._prev_term = prev_term
            self._logical_start = logical
            self._dir_dirty = True
        for s in doomed:
            s.unlink()

    def reset(
        self, next_offset: int, last_index: int, last_term: int, *, log_start: int | None = None
    ) -> None:
        """Empty the log and make it continue at ``next_offset`` / Raft index
        ``last_index + 1`` after term ``last_term`` (installing a Raft snapshot). The logical
        start becomes ``log_start`` (the leader's, at or above ``next_offset``; default
        ``next_offset``): the entries the leader sends next may lie below it."""
        self._check_open()
        logical = next_offset if log_start is None else log_start
        if logical < next_offset:
            raise ValueError(f"log start {logical} lies below the reset offset {next_offset}")
        with self._rp_lock:
            if next_offset < self._recovery_point:
                self._write_recovery_point(next_offset)
            self._reset(next_offset, last_index, last_term, logical)
        # Raft may send entries below the old checkpoint again: not cleaned.
        self._lower_cleaner_checkpoint(next_offset)

    def _reset(self, next_offset: int, last_index: int, last_term: int, logical: int) -> None:
        self._write_start(_Start(next_offset, last_index + 1, last_term, True, logical))
        with self._lock:
            doomed = self._segments
            self._segments = []
        for s in doomed:
            s.unlink()
        new = Segment.create(
            self._dir,
            next_offset,
            first_index=last_index + 1,
            prev_term=last_term,
            index_interval_bytes=self._config.index_interval_bytes,
            fs=self._fs,
        )
        self._fsync_dir()
        self._write_start(_Start(next_offset, last_index + 1, last_term, False, logical))
        with self._lock:
            self._segments = [new]
            self._logical_start = logical
            self._size_bytes = 0
            self._prev_term = last_term
            self._flushed = next_offset
            self._trunc_low = min(self._trunc_low, next_offset)
        log.info(
            "%s: reset to offset %d, raft index %d, log start %d",
            self._dir,
            next_offset,
            last_index + 1,
            logical,
        )

    # ---- the log cleaner's view (node/log/cleaner.py) ----------------------------------

    @property
    def cleaner_checkpoint(self) -> int:
        """The first offset the cleaner has not cleaned, within the stored log."""
        return min(max(self._cleaner_checkpoint, self.stored_start_offset), self.log_end_offset)

    def set_cleaner_checkpoint(self, offset: int) -> None:
        """Persist the cleaner's progress (atomically; a crash before it only costs a clean
        of the same records again, which removes nothing more)."""
        self._check_open()
        self._replace_file(CLEANER_CHECKPOINT_FILE, b"%d\n" % offset)
        self._cleaner_checkpoint = offset

    def _lower_cleaner_checkpoint(self, offset: int) -> None:
        """The log was cut at ``offset`` (truncation, reset, lost tail): what is written there
        next has not been cleaned. (Removing a tombstone is safe only once every older record
        of its key is gone, which holds for what lies below the checkpoint alone.)"""
        if self._cleaner_checkpoint > offset:
            self.set_cleaner_checkpoint(offset)

    def _read_cleaner_checkpoint(self) -> int:
        try:
            return max(0, int(self._fs.read_bytes(self._dir / CLEANER_CHECKPOINT_FILE)))
        except FileNotFoundError:
            return 0
        except (OSError, ValueError) as exc:
            log.warning("%s: ignoring unreadable %s: %s", self._dir, CLEANER_CHECKPOINT_FILE, exc)
            return 0

    def create_cleaned_file(self, path: Path) -> int:
        """Create (truncate) a file of the cleaner in the log's directory and return its
        descriptor; any thread. Refused once the log is closed, so nothing new appears in a
        directory that ``delete`` is removing."""
        with self._lock:
            self._check_open()
            return self._fs.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)

    def closed_segments(self) -> list[Segment]:
        """The segments other than the active one, oldest first (a copy of the list)."""
        return self._segments[:-1]

    def swap_cleaned(
        self, old: Segment, new: Segment, tmp: Path, hook: Callable[[str], None] | None = None
    ) -> bool:
        """Put the cleaned segment ``new`` (its file at ``tmp``, written and fsynced, same base
        offset, same batch headers) in place of the closed segment ``old``.

        On disk: the old index files go first (data without an index is re-indexed on open),
        then one rename replaces the data file, then the directory is fsynced and the new
        indexes are written (caches). A crash at any point leaves the old or the new data file
        under the segment's name, never neither; a stray ``.cleaned`` file is removed on open.
        Returns False (and removes ``tmp``) when ``old`` is no longer part of the log or
        changed since the cleaner read it (a deletion or reset meanwhile).
        """
        self._check_open()
        step = hook or (lambda _s: None)
        with self._lock:
            current = old in self._segments[:-1]
        if (
            not current
            or new.base_offset != old.base_offset
            or new.first_index != old.first_index
            or new.last_index != old.last_index
            or new.next_offset != old.next_offset
        ):
            new.close()
            self._fs.unlink(tmp)
            return False
        fs = self._fs
        step("unlink_indexes")
        for stale in (old.index_path, old.timeindex_path):
            fs.unlink(stale)
        step("rename")
        fs.replace(tmp, old.path)
        step("fsync_dir")
        self._fsync_dir()
        step("swap")
        with self._lock:
            i = self._segments.index(old)
            self._segments[i] = new
            self._size_bytes += new.size - old.size
        old.close()
        step("write_indexes")
        self._write_indexes(new)
        return True

    def adopt(self, source: Path, *, logical_start: int) -> None:
        """Replace the whole log by the segments of the closed log in ``source`` (a replica's
        catch-up copy, ``node/catchup.py``), whose logical start becomes ``logical_start``;
        ``source`` is left without segments. Renames only. A crash part-way leaves this log
        empty at the copy's start (log_start.json says a reset is in progress until the
        segments are in place), never a mix of the two."""
        self._check_open()
        if self._dir_dirty or any(s.dirty for s in self._segments):
            self.flush()
        src = PartitionLog(source, self._config, clock_ms=self._clock_ms, fs=self._fs)
        first = src._segments[0]
        start = _Start(
            first.base_offset,
            first.first_index,
            -1 if src._prev_term is None else src._prev_term,
            True,
            max(logical_start, first.base_offset),
        )
        end = src.log_end_offset
        src.close()
        names = [n for n in self._fs.listdir(source) if _SEGMENT_FILE_RE.match(n)]
        with self._rp_lock:
            self._write_start(start)
            with self._lock:
                doomed = self._segments
                self._segments = []
            for seg in doomed:
                seg.unlink()
            for name in names:
                self._fs.replace(Path(source) / name, self._dir / name)
            self._fsync_dir()
            self._write_start(start._replace(reset=False))
            self._write_recovery_point(end)
            self._recover()
            with self._lock:
                self._size_bytes = sum(s.size for s in self._segments)
                self._flushed = self._trunc_low = self.log_end_offset
                self._dir_dirty = False
        log.info(
            "%s: adopted a copied log: offsets [%d, %d), raft indexes [%d, %d], log start %d",
            self._dir, self.stored_start_offset, self.log_end_offset, self.first_index,
            self.last_index, self.log_start_offset,
        )  # fmt: skip

    # ---- durability --------------------------------------------------------------------

    def flush(self) -> int:
        """fsync what was appended since the last flush (and the directory if segments were
        created or deleted); returns the new ``flushed_offset``. Safe to run in a worker
        thread while the owning thread appends: only the snapshot is taken under the lock."""
        with self._flush_lock:
            with self._lock:
                if self._closed:
                    return self._flushed
                end = self.log_end_offset
                dirty = [s for s in self._segments if s.dirty]
                dir_dirty = self._dir_dirty
                if not dirty and not dir_dirty:
                    # Everything written was fsynced by earlier flushes (none is running).
                    self._flushed = end
                    return end
                fds = [self._fs.dup(s.fd) for s in dirty]
                for s in dirty:
                    s.dirty = False
                self._dir_dirty = False
                self._trunc_low = end
            try:
                for fd in fds:
                    self._fs.fdatasync(fd)
                if dir_dirty:
                    # A segment rolled (or went): record the new recovery point, made durable
                    # by the directory fsync this flush needs anyway.
                    self._advance_recovery_point(end)
                    self._fsync_dir()
            except OSError as exc:
                with self._lock:
                    for s in dirty:
                        s.dirty = True
                    self._dir_dirty = self._dir_dirty or dir_dirty
                raise StorageError(f"cannot fsync the log in {self._dir}: {exc}") from exc
            finally:
                for fd in fds:
                    self._fs.close(fd)
            with self._lock:
                self._flushed = max(self._flushed, min(end, self._trunc_low))
                return self._flushed

    def _fsync_dir(self) -> None:
        self._fs.fsync_dir(self._dir)

    # ---- configuration and lifecycle ---------------------------------------------------

    def update_config(self, config: TopicConfig) -> None:
        """Takes effect at the next append, roll or retention pass."""
        self._config = config
        for seg in self._segments:
            seg.index_interval_bytes = config.index_interval_bytes

    def close(self) -> None:
        """Write the index caches, fsync everything and close the files."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            segments = list(self._segments)
        try:
            for seg in segments:
                if seg.index_dirty:
                    self._write_indexes(seg)
            for seg in segments:
                if seg.dirty:
                    self._fs.fdatasync(seg.fd)
                    seg.dirty = False
            self._fsync_dir()
            self._flushed = segments[-1].next_offset
            self._write_recovery_point(self._flushed)
        except OSError as exc:
            raise StorageError(f"cannot fsync the log in {self._dir} on close: {exc}") from exc
        finally:
            for seg in segments:
                seg.close()

    def delete(self) -> None:
        """Close the log and remove its directory."""
        self.close()
        self._fs.rmtree(self._dir)

    def _check_open(self) -> None:
        if self._closed:
            raise StorageError(f"the partition log in {self._dir} is closed")

    # ---- log_start.json ----------------------------------------------------------------

    def _write_start(self, start: _Start) -> None:
        """Replace log_start.json atomically and durably (write, fsync, rename, fsync dir)."""
        doc = {"version": _START_FILE_VERSION, **start._asdict()}
        self._replace_file(START_FILE, json.dumps(doc, sort_keys=True).encode() + b"\n")

    def _write_recovery_point(self, offset: int, *, sync_dir: bool = True) -> None:
        if offset == self._recovery_point:
            return
        self._replace_file(RECOVERY_POINT_FILE, b"%d\n" % offset, sync_dir=sync_dir)
        self._recovery_point = offset

    def _advance_recovery_point(self, fsynced_end: int) -> None:
        """flush: everything below ``fsynced_end`` is fsynced, unless a truncation cut the
        log since the flush took its snapshot (the caller fsyncs the directory)."""
        with self._rp_lock:
            with self._lock:
                point = min(fsynced_end, self._trunc_low)
            if point > self._recovery_point:
                self._write_recovery_point(point, sync_dir=False)

    def _read_recovery_point(self) -> int:
        """0 when missing or unreadable: every closed segment is then checked."""
        try:
            value = int(self._fs.read_bytes(self._dir / RECOVERY_POINT_FILE))
        except FileNotFoundError:
            return 0
        except (OSError, ValueError) as exc:
            log.warning("%s: ignoring unreadable %s: %s", self._dir, RECOVERY_POINT_FILE, exc)
            return 0
        return max(0, value)

    def _replace_file(self, name: str, data: bytes, *, sync_dir: bool = True) -> None:
        """Replace file ``name`` atomically and durably (write, fsync, rename, fsync dir;
        without ``sync_dir`` the caller fsyncs the directory)."""
        path = self._dir / name
        tmp = path.with_name(name + ".tmp")
        fs = self._fs
        fd = fs.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[fs.write(fd, view) :]
            fs.fdatasync(fd)
        finally:
            fs.close(fd)
        fs.replace(tmp, path)
        if sync_dir:
            self._fsync_dir()

    def _read_start(self) -> _Start | None:
        path = self._dir / START_FILE
        try:
            doc = json.loads(self._fs.read_bytes(path))
            stored = int(doc["log_start_offset"])
            start = _Start(
                stored,
                int(doc["first_index"]),
                int(doc["prev_term"]),
                bool(doc.get("reset", False)),
                int(doc.get("logical_start_offset", stored)),
            )
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("%s: ignoring unreadable %s: %s", self._dir, START_FILE, exc)
            return None
        if (
            start.log_start_offset < 0
            or start.first_index < 1
            or start.prev_term < -1
            or start.logical_start_offset < start.log_start_offset
        ):
            log.warning("%s: ignoring %s with impossible values %s", self._dir, START_FILE, doc)
            return None
        return start

    # ---- recovery ----------------------------------------------------------------------

    def _recover(self) -> None:
        """Open the segments found in the directory and make them one valid log.

        1. log_start.json finishes an interrupted deletion or reset of the log's front.
        2. Closed segments below the recovery point are opened from their index files plus
           their tail; a segment whose index does not match is re-indexed from its headers.
           Closed segments ending beyond it are walked with CRC checks. One whose batches
           break the chain (torn, corrupt, gap) ends the log there.
        3. The last segment is walked with CRC checks and cut at the first torn, corrupt or
           non-continuing batch; an empty last segment (other than the first) is removed and
           the one before it gets the same check.
        4. Everything is fsynced once, so ``flushed_offset`` starts at the log end.
        """
        interval = self._config.index_interval_bytes
        start = self._read_start()
        self._fs.unlink(self._dir / (START_FILE + ".tmp"))
        self._fs.unlink(self._dir / (RECOVERY_POINT_FILE + ".tmp"))
        self._fs.unlink(self._dir / (CLEANER_CHECKPOINT_FILE + ".tmp"))
        self._recovery_point = recovery_point = self._read_recovery_point()
        files: dict[int, set[str]] = {}
        for name in sorted(self._fs.listdir(self._dir)):
            if name.endswith(CLEANED_SUFFIX):
                # Half a cleaner swap: the segment's own file is still the old one.
                log.info("%s: discarding %s of an interrupted clean", self._dir, name)
                self._fs.unlink(self._dir / name)
                continue
            m = _SEGMENT_FILE_RE.match(name)
            if m:
                files.setdefault(int(m.group(1)), set()).add(m.group(2))
        bases = sorted(b for b, kinds in files.items() if LOG_SUFFIX in kinds)
        for b, kinds in files.items():
            if LOG_SUFFIX not in kinds:
                for kind in kinds:
                    self._fs.unlink(self._dir / f"{b:020d}{kind}")

        if start is not None and start.reset:
            log.warning(
                "%s: finishing an interrupted reset to offset %d", self._dir, start.log_start_offset
            )
            for b in bases:
                self._unlink_files(b)
            bases = []
        elif start is not None and bases:
            if start.log_start_offset in bases:
                for b in [b for b in bases if b < start.log_start_offset]:
                    log.info("%s: finishing the deletion of segment %d", self._dir, b)
                    self._unlink_files(b)
                bases = [b for b in bases if b >= start.log_start_offset]
            else:
                log.warning(
                    "%s: %s says the log starts at %d but the segments start at %s; ignoring it",
                    self._dir,
                    START_FILE,
                    start.log_start_offset,
                    bases[:3],
                )
                start = None
                self._fs.unlink(self._dir / START_FILE)

        if not bases:
            base = start.log_start_offset if start else 0
            first_index = start.first_index if start else 1
            prev_term = start.prev_term if start and start.prev_term >= 0 else 0
            self._segments = [
                Segment.create(
                    self._dir,
                    base,
                    first_index=first_index,
                    prev_term=prev_term,
                    index_interval_bytes=interval,
                    fs=self._fs,
                )
            ]
            self._prev_term = prev_term
            self._logical_start = start.logical_start_offset if start else 0
            if start is not None and start.reset:
                self._fsync_dir()
                self._write_start(start._replace(reset=False))
            self._fsync_all()
            return

        # What the first segment must continue from.
        first_expect: int | None
        if start is not None:
            first_expect = start.first_index
            prev_term_known = start.prev_term if start.prev_term >= 0 else None
        elif bases[0] == 0:
            first_expect, prev_term_known = 1, 0
        else:
            first_expect, prev_term_known = None, None
        first_floor = prev_term_known or 0
        segs: list[Segment] = []
        self._segments = segs
        for b in bases:
            segs.append(Segment.open_existing(self._dir, b, interval, self._fs))

        # Closed segments, oldest first.
        expect_index, min_term = first_expect, first_floor
        i = 0
        while i < len(segs) - 1:
            seg = segs[i]
            # Written after the last known fsync: check every batch's CRC.
            checked = segs[i + 1].base_offset > recovery_point
            reason: str | None = "written after the recovery point: checking every batch"
            if not checked:
                reason = seg.load_closed(expect_index, min_term)
            if reason is not None:
                (log.info if checked else log.warning)(
                    "%s: re-indexing %s: %s", self._dir, seg.path.name, reason
                )
                bad = seg.recover(
                    verify_crc=checked,
                    expect_index=expect_index,
                    min_term=min_term,
                    prev_term=min_term,
                )
                if bad is not None:
                    self._cut_recovered(seg, bad.position, bad.reason)
                    self._drop_after(i, f"they follow a broken batch in {seg.path.name}")
                    break
            nxt = segs[i + 1]
            if nxt.base_offset != seg.next_offset:
                log.warning(
                    "%s: %s ends at offset %d but the next segment starts at %d",
                    self._dir,
                    seg.path.name,
                    seg.next_offset,
                    nxt.base_offset,
                )
                self._drop_after(i, "the log has a gap before them")
                break
            expect_index = seg.last_index + 1
            min_term = seg.last_term
            i += 1

        # The last segment, with CRCs.
        while True:
            last = segs[-1]
            prev = segs[-2] if len(segs) > 1 else None
            want = prev.last_index + 1 if prev else first_expect
            floor = prev.last_term if prev else first_floor
            bad = last.recover(verify_crc=True, expect_index=want, min_term=floor, prev_term=floor)
            if bad is not None:
                self._cut_recovered(last, bad.position, bad.reason)
            if last.size == 0 and prev is not None:
                log.warning("%s: removing empty last segment %s", self._dir, last.path.name)
                segs.pop()
                last.unlink()
                continue
            break

        if segs[0].size == 0 and first_expect is None:
            log.warning(
                "%s: the log starts at offset %d with no record of its Raft index; using 1",
                self._dir,
                segs[0].base_offset,
            )
        if segs[0].first_index == 1:
            prev_term_known = 0
        self._prev_term = prev_term_known
        # The logical start survives a restart; a log that lost its tail (flush=os after a
        # power loss) may end below it: then it starts at its end until the leader resends.
        logical = start.logical_start_offset if start is not None else 0
        self._logical_start = min(logical, segs[-1].next_offset)
        last = segs[-1]
        if last.size:
            first_ts = last.header_at(0).first_timestamp
            now = self._clock_ms()
            last.created_ms = first_ts if 0 < first_ts <= now else now
        for seg in segs[:-1]:
            if seg.index_dirty:
                self._write_indexes(seg)
        self._fsync_all()

    def _cut_recovered(self, seg: Segment, pos: int, reason: str) -> None:
        size = seg.file_size()
        log.warning(
            "%s: truncating %s at byte %d (of %d; %d bytes dropped), after offset %d / raft "
            "index %d: %s",
            self._dir,
            seg.path.name,
            pos,
            size,
            size - pos,
            seg.next_offset - 1,
            seg.last_index,
            reason,
        )
        seg.cut_file(pos)

    def _drop_after(self, i: int, why: str) -> None:
        doomed = self._segments[i + 1 :]
        del self._segments[i + 1 :]
        for s in doomed:
            log.warning("%s: deleting segment %s: %s", self._dir, s.path.name, why)
            s.unlink()

    def _unlink_files(self, base: int) -> None:
        for suffix in (LOG_SUFFIX, INDEX_SUFFIX, TIMEINDEX_SUFFIX):
            self._fs.unlink(self._dir / f"{base:020d}{suffix}")

    def _fsync_all(self) -> None:
        """After recovery: whatever the page cache held from before a crash becomes durable,
        so flushed_offset may start at the log end."""
        for seg in self._segments:
            self._fs.fdatasync(seg.fd)
            seg.dirty = False
        self._fsync_dir()


__all__ = [
    "CLEANED_SUFFIX",
    "CLEANER_CHECKPOINT_FILE",
    "RECOVERY_POINT_FILE",
    "START_FILE",
    "ContinuityError",
    "PartitionLog",
    "wall_clock_ms",
]
