"""The log cleaner: rewrites the closed segments of compacted partitions without the records
that a later record with the same key supersedes (Kafka's log compaction).

One run on one partition log (``plan`` on the log's thread, ``build`` anywhere, ``commit`` on
the log's thread; ``clean_now`` does the three in a row):

1. **Bounds.** The cleanable part of the log is the closed segments lying wholly below the
   high watermark (committed: Raft never truncates it) and, with ``min.compaction.lag.ms``,
   whose newest record is at least that old. The *dirty* part starts at the cleaner
   checkpoint (the first offset not cleaned yet). A run starts when the dirty part is at
   least ``min.cleanable.dirty.ratio`` of the cleanable part.
2. **Map.** The dirty batches are read in order into a map ``digest(key) -> latest offset``
   (16-byte BLAKE2b digests, as Kafka keeps MD5s). The map holds at most
   ``map_bytes / ENTRY_BYTES`` keys; when the next batch might not fit, the map ends at that
   batch (``map_end``) and the rest waits for the next run.
3. **Rewrite.** Every cleanable segment from the start of the log up to ``map_end`` is read
   again, oldest first. A record below ``map_end`` is dropped when the map has a later offset
   for its key, or when it is a tombstone (null value) whose timestamp is older than
   ``delete.retention.ms``; records from ``map_end`` on, keyless records and control batches
   are kept. A batch that lost records is re-encoded by :func:`records.compact_batch`: same
   header (stamps, offsets, timestamps, producer fields), a records block of the survivors
   with their offset deltas. **No batch is ever dropped**, even when no record survives (it
   stays as a header and an empty block): every Raft entry keeps its index, term, base and
   last offset, so whatever Raft asks of the log (``term_at_index``,
   ``end_offset_at_index``, ``entries_by_index`` for a lagging follower) gets the same
   answer and a batch that continues the log exactly as before.
4. **Swap.** Each rewritten segment is written to ``<base>.log.cleaned`` and fsynced, then
   ``PartitionLog.swap_cleaned`` renames it over the old file (oldest segment first, so a
   tombstone never goes before the older values it deletes), and finally the checkpoint
   moves to ``map_end``. A crash at any point leaves the old or the new file of each segment;
   a crash before the checkpoint only makes the next run clean the same records again.

Cleaning is deterministic given the log and the bounds (and the clock, for tombstones): the
replicas of a partition, each cleaning its own copy, serve the same records above the offsets
they have all cleaned.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from itertools import repeat
from pathlib import Path

from tidelog import records
from tidelog.errors import CorruptBatch, StorageError
from tidelog.node.io import FileSystem

from .partition_log import CLEANED_SUFFIX, PartitionLog
from .segment import NO_TIMESTAMP, Segment

log = logging.getLogger(__name__)

#: Bytes one key of the offset map is reckoned to cost in CPython: the dict slot, the 16-byte
#: digest object and the offset int (about 33 + 33 + 32 + dict overhead, rounded up).
ENTRY_BYTES = 128
DIGEST_BYTES = 16
#: Bytes gathered before one write of the new segment file.
WRITE_CHUNK_BYTES = 1024 * 1024

Hook = Callable[[str], None]


def _no_hook(_step: str) -> None:
    return None


def key_digest(key: bytes) -> bytes:
    """What the offset map holds for ``key``: the key itself when shorter than a digest (it
    cannot equal a digest, which is always DIGEST_BYTES long), else its BLAKE2b digest."""
    if len(key) < DIGEST_BYTES:
        return key
    return hashlib.blake2b(key, digest_size=DIGEST_BYTES).digest()


def is_compacted(policy: str) -> bool:
    return "compact" in policy.split(",")


class OffsetMap:
    """``digest(key) -> latest offset`` with a bounded number of keys."""

    __slots__ = ("_map", "capacity")

    def __init__(self, max_bytes: int) -> None:
        self.capacity = max(1, max_bytes // ENTRY_BYTES)
        self._map: dict[bytes | None, int] = {}

    def __len__(self) -> int:
        return len(self._map)

    def room_for(self, n: int) -> bool:
        return len(self._map) + n <= self.capacity

    def put(self, digest: bytes, offset: int) -> None:
        self._map[digest] = offset

    def put_batch(self, cols: records.KeyColumns) -> None:
        """Every keyed record of a batch, in offset order (the later offset wins)."""
        self._map.update(zip(_map_ids(cols.keys), cols.offsets, strict=True))
        self._map.pop(None, None)  # keyless records: never superseded

    @property
    def lookup(self) -> Callable[[bytes | None, int], int]:
        """``dict.get`` of the map (None, a keyless record, is never in it)."""
        return self._map.get  # type: ignore[return-value]

    def get(self, digest: bytes) -> int:
        return self._map.get(digest, -1)


class RateLimiter:
    """A token bucket over bytes (burst: one second's worth); 0 bytes/s means unlimited.
    ``take`` sleeps, so it runs where blocking is fine (the cleaner's worker thread)."""

    def __init__(
        self,
        bytes_per_second: int,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.rate = bytes_per_second
        self._clock = clock
        self._sleep = sleep
        self._tokens = float(bytes_per_second)
        self._at = clock()

    def take(self, n: int) -> None:
        if self.rate <= 0:
            return
        now = self._clock()
        self._tokens = min(float(self.rate), self._tokens + (now - self._at) * self.rate)
        self._at = now
        self._tokens -= n
        if self._tokens < 0:
            self._sleep(-self._tokens / self.rate)


@dataclass(frozen=True, slots=True)
class CleanerSettings:
    #: Bytes per second the cleaner reads plus writes, over all partitions; 0: unlimited.
    io_bytes_per_second: int = 0
    #: Memory for the key -> offset map of one run.
    map_bytes: int = 64 * 1024 * 1024
    #: How often the node looks for a partition to clean.
    interval_ms: int = 15_000


@dataclass(slots=True)
class CleanPlan:
    """What one run cleans, decided on the log's thread: the cleanable segments (oldest
    first), readers on duplicated descriptors (usable from another thread), the dirty
    start, the cleanable end and the topic's settings of the moment."""

    directory: Path
    fs: FileSystem
    #: Creates the cleaner's files (``PartitionLog.create_cleaned_file``).
    create: Callable[[Path], int]
    segments: list[Segment]
    readers: list[Segment]
    #: Where the dirty part starts in each segment (bytes below ``first_dirty``).
    dirty_starts: list[int]
    first_dirty: int
    end: int
    delete_retention_ms: int
    index_interval_bytes: int
    now_ms: int

    def close(self) -> None:
        for r in self.readers:
            r.close()
        self.readers = []


@dataclass(slots=True)
class Built:
    old: Segment
    new: Segment
    tmp: Path


@dataclass(slots=True)
class BuildResult:
    map_end: int
    built: list[Built] = field(default_factory=list)
    io_bytes: int = 0
    oldest_tombstone_ms: int | None = None


@dataclass(frozen=True, slots=True)
class CleanResult:
    segments_rewritten: int
    bytes_before: int
    bytes_after: int
    first_dirty: int
    cleaned_to: int


@dataclass(frozen=True, slots=True)
class DirtyView:
    cleanable_end: int
    clean_bytes: int
    dirty_bytes: int

    @property
    def ratio(self) -> float:
        total = self.clean_bytes + self.dirty_bytes
        return self.dirty_bytes / total if total else 0.0


def cleanable_segments(plog: PartitionLog, upto: int, now_ms: int) -> list[Segment]:
    """Closed segments wholly below ``upto`` (the high watermark) and, with
    ``min.compaction.lag.ms``, whose newest timestamp is at least that old; oldest first,
    stopping at the first that does not qualify."""
    lag = plog.config.min_compaction_lag_ms
    out: list[Segment] = []
    for seg in plog.closed_segments():
        if seg.next_offset > upto or seg.size == 0:
            break
        if lag > 0 and seg.max_timestamp != NO_TIMESTAMP and seg.max_timestamp > now_ms - lag:
            break
        out.append(seg)
    return out


def _position(seg: Segment, offset: int) -> int:
    """Bytes of ``seg`` below ``offset`` (a batch boundary or outside the segment)."""
    if offset <= seg.base_offset:
        return 0
    if offset >= seg.next_offset:
        return seg.size
    return seg.find(offset)[0]


def dirty_view(plog: PartitionLog, upto: int, now_ms: int) -> DirtyView:
    segs = cleanable_segments(plog, upto, now_ms)
    first_dirty = plog.cleaner_checkpoint
    clean = dirty = 0
    for seg in segs:
        below = _position(seg, first_dirty)
        clean += below
        dirty += seg.size - below
    end = segs[-1].next_offset if segs else plog.stored_start_offset
    return DirtyView(end, clean, dirty)


def tombstones_due(plog: PartitionLog, now_ms: int) -> bool:
    """Whether the cleaned part may hold a tombstone past ``delete.retention.ms``: the oldest
    the last run kept has expired, or no run has read the log since it was opened. Such a log
    is cleaned even when nothing is dirty, so tombstones never stay forever in a quiet log."""
    stats = plog.cleaner_stats
    if not stats.tombstones_known:
        return plog.cleaner_checkpoint > plog.stored_start_offset
    oldest = stats.oldest_tombstone_ts
    return oldest is not None and oldest <= now_ms - plog.config.delete_retention_ms


def plan(
    plog: PartitionLog, upto: int, now_ms: int, *, tombstones: bool | None = None
) -> CleanPlan | None:
    """What a run would clean now, or None when the cleanable part has nothing dirty (and,
    with ``tombstones`` (default: :func:`tombstones_due`), no tombstone may have expired)."""
    segs = cleanable_segments(plog, upto, now_ms)
    first_dirty = plog.cleaner_checkpoint
    if not segs:
        return None
    if segs[-1].next_offset <= first_dirty:
        if not (tombstones_due(plog, now_ms) if tombstones is None else tombstones):
            return None
        # A pass over the cleaned part alone: an empty map, expired tombstones go.
        first_dirty = segs[-1].next_offset
    fs = plog._fs
    readers: list[Segment] = []
    try:
        for seg in segs:
            r = Segment(
                seg.directory,
                seg.base_offset,
                fs.dup(seg.fd),
                first_index=seg.first_index,
                prev_term=0,
                index_interval_bytes=seg.index_interval_bytes,
                fs=fs,
            )
            r.size = seg.size
            r.next_offset = seg.next_offset
            readers.append(r)
    except BaseException:
        for r in readers:
            r.close()
        raise
    cfg = plog.config
    return CleanPlan(
        plog.directory,
        fs,
        plog.create_cleaned_file,
        segs,
        readers,
        [_position(seg, first_dirty) for seg in segs],
        first_dirty,
        segs[-1].next_offset,
        cfg.delete_retention_ms,
        cfg.index_interval_bytes,
        now_ms,
    )


def _batches(
    reader: Segment, limiter: RateLimiter, start: int = 0
) -> Iterable[tuple[records.BatchHeader, bytes]]:
    for _pos, h, buf, off in reader.walk(start, reader.size, bodies=True):
        limiter.take(h.size)
        yield h, bytes(buf[off : off + h.size])


def _columns(h: records.BatchHeader, data: bytes, where: Path) -> records.KeyColumns:
    try:
        return records.decode_key_columns(data, verify_crc=True)
    except CorruptBatch as exc:
        # Re-encoding would give a corrupt batch a fresh CRC: refuse to clean instead.
        raise StorageError(f"{where}: batch at offset {h.base_offset} is corrupt: {exc}") from exc


def build_map(p: CleanPlan, omap: OffsetMap, limiter: RateLimiter) -> tuple[int, int]:
    """Fill ``omap`` from the dirty batches; returns ``(map_end, bytes read)``."""
    read = 0
    for seg, reader, start in zip(p.segments, p.readers, p.dirty_starts, strict=True):
        if seg.next_offset <= p.first_dirty:
            continue
        for h, data in _batches(reader, limiter, start):
            read += h.size
            if h.is_control:
                continue
            if not omap.room_for(h.record_count) and len(omap):
                return h.base_offset, read
            omap.put_batch(_columns(h, data, seg.path))
    return p.end, read


def build(
    p: CleanPlan,
    settings: CleanerSettings,
    limiter: RateLimiter,
    hook: Hook = _no_hook,
) -> BuildResult:
    """Steps 2 and 3: the map, and a cleaned copy of each segment that loses records
    (written to a ``.cleaned`` file and fsynced). Touches no state of the log, so it may run
    in a worker thread; on failure the copies made so far are removed."""
    omap = OffsetMap(settings.map_bytes)
    map_end, read = build_map(p, omap, limiter)
    result = BuildResult(map_end, io_bytes=read)
    horizon = p.now_ms - p.delete_retention_ms
    try:
        for seg, reader in zip(p.segments, p.readers, strict=True):
            if seg.base_offset >= map_end:
                break
            b = _rewrite(p, seg, reader, omap, map_end, horizon, limiter, result, hook)
            if b is not None:
                result.built.append(b)
    except BaseException:
        discard(p.fs, result.built)
        raise
    return result


def _rewrite(
    p: CleanPlan,
    seg: Segment,
    reader: Segment,
    omap: OffsetMap,
    map_end: int,
    horizon: int,
    limiter: RateLimiter,
    result: BuildResult,
    hook: Hook,
) -> Built | None:
    fs = p.fs
    tmp = seg.path.with_name(seg.path.name + CLEANED_SUFFIX)
    fd = p.create(tmp)
    changed = False
    try:
        pending: list[bytes] = []
        pending_bytes = 0
        for h, data in _batches(reader, limiter):
            result.io_bytes += h.size
            out = data
            if not h.is_control and h.base_offset < map_end:
                cols = _columns(h, data, seg.path)
                keep = _survivors(cols, omap, map_end, horizon, result)
                if len(keep) != len(cols.offsets):
                    survivors: list[records.Record] = []
                    if keep:
                        recs = records.decode_records(data, verify_crc=False)
                        survivors = [recs[i] for i in keep]
                    out = records.compact_batch(h, survivors)
                    changed = True
            pending.append(out)
            pending_bytes += len(out)
            if pending_bytes >= WRITE_CHUNK_BYTES:
                _write_all(fs, fd, b"".join(pending), limiter)
                result.io_bytes += pending_bytes
                pending, pending_bytes = [], 0
        if not changed:
            fs.close(fd)
            fs.unlink(tmp)
            return None
        if pending:
            _write_all(fs, fd, b"".join(pending), limiter)
            result.io_bytes += pending_bytes
        fs.fdatasync(fd)
        hook("written")
        new = Segment(
            seg.directory,
            seg.base_offset,
            fd,
            first_index=seg.first_index,
            prev_term=0,
            index_interval_bytes=p.index_interval_bytes,
            fs=fs,
        )
        bad = new.recover(verify_crc=False, expect_index=seg.first_index, min_term=0, prev_term=0)
        if bad is not None or new.last_index != seg.last_index:
            raise StorageError(f"{tmp}: the cleaned copy does not read back: {bad}")
        new.seal()
        return Built(seg, new, tmp)
    except BaseException:
        with contextlib.suppress(OSError):
            fs.close(fd)
        fs.unlink(tmp)
        raise


def _map_ids(keys: list[bytes | None]) -> list[bytes | None]:
    return [k if k is None or len(k) < DIGEST_BYTES else key_digest(k) for k in keys]


def _survivors(
    cols: records.KeyColumns, omap: OffsetMap, map_end: int, horizon: int, result: BuildResult
) -> list[int]:
    """Indexes of the records of a batch that stay: not superseded by the map, not a
    tombstone older than ``horizon``; records from ``map_end`` on and keyless ones stay.
    (Every offset in the map lies below ``map_end``, so the map never supersedes those.)"""
    offsets = cols.offsets
    latest = list(map(omap.lookup, _map_ids(cols.keys), repeat(-1, len(offsets))))
    if not any(cols.tombstones):
        return [i for i, (last, o) in enumerate(zip(latest, offsets, strict=True)) if last <= o]
    keep: list[int] = []
    for i, (key, offset, last, tomb, ts) in enumerate(
        zip(cols.keys, offsets, latest, cols.tombstones, cols.timestamps, strict=True)
    ):
        if last > offset:
            continue
        if tomb:
            if key is not None and offset < map_end and ts <= horizon:
                continue
            old = result.oldest_tombstone_ms
            if old is None or ts < old:
                result.oldest_tombstone_ms = ts
        keep.append(i)
    return keep


def _write_all(fs: FileSystem, fd: int, data: bytes, limiter: RateLimiter) -> None:
    limiter.take(len(data))
    view = memoryview(data)
    while view:
        n = fs.write(fd, view)
        if n == 0:
            raise OSError("write wrote 0 bytes")
        view = view[n:]


def discard(fs: FileSystem, built: Iterable[Built]) -> None:
    for b in built:
        b.new.close()
        fs.unlink(b.tmp)


def commit(
    plog: PartitionLog, p: CleanPlan, res: BuildResult, hook: Hook = _no_hook
) -> CleanResult:
    """Step 4 on the log's thread: swap the copies in, oldest first, then move the
    checkpoint. Copies whose segment left the log meanwhile are discarded."""
    before = sum(b.old.size for b in res.built)
    after = 0
    swapped = 0
    i = 0
    try:
        for i, b in enumerate(res.built):  # noqa: B007 (i is read on failure)
            if plog.swap_cleaned(b.old, b.new, b.tmp, hook):
                swapped += 1
                after += b.new.size
            else:
                before -= b.old.size
    except BaseException:
        # The copy being swapped may be in place already: only its .cleaned file (if still
        # there) is removed; the descriptor stays with whoever holds the segment.
        p.fs.unlink(res.built[i].tmp)
        discard(p.fs, res.built[i + 1 :])
        raise
    hook("checkpoint")
    plog.set_cleaner_checkpoint(res.map_end)
    stats = plog.cleaner_stats
    stats.runs += 1
    stats.bytes_reclaimed += before - after
    stats.io_bytes += res.io_bytes
    stats.tombstone_age_ms = (
        0 if res.oldest_tombstone_ms is None else max(0, p.now_ms - res.oldest_tombstone_ms)
    )
    if res.map_end >= p.end:
        # The run read the whole cleanable part: its oldest kept tombstone is known.
        stats.oldest_tombstone_ts = res.oldest_tombstone_ms
        stats.tombstones_known = True
    log.info(
        "%s: cleaned offsets [%d, %d) against the keys of [%d, %d): %d segment(s) rewritten, "
        "%d bytes reclaimed",
        plog.directory,
        plog.stored_start_offset,
        res.map_end,
        p.first_dirty,
        res.map_end,
        swapped,
        before - after,
    )
    return CleanResult(swapped, before, after, p.first_dirty, res.map_end)


def update_view(plog: PartitionLog, upto: int, now_ms: int) -> DirtyView:
    """Refresh the dirty ratio and compaction lag of ``plog`` in its stats."""
    view = dirty_view(plog, upto, now_ms)
    stats = plog.cleaner_stats
    stats.dirty_ratio = view.ratio
    lag = 0
    if view.dirty_bytes:
        for seg in plog.closed_segments():
            if seg.next_offset > plog.cleaner_checkpoint:
                pos = _position(seg, plog.cleaner_checkpoint)
                first_ts = seg.header_at(pos).first_timestamp
                lag = max(0, now_ms - first_ts) if first_ts > 0 else 0
                break
    stats.compaction_lag_ms = lag
    return view


def clean_now(
    plog: PartitionLog,
    *,
    upto: int | None = None,
    now_ms: int | None = None,
    settings: CleanerSettings | None = None,
    limiter: RateLimiter | None = None,
    hook: Hook = _no_hook,
) -> CleanResult | None:
    """One run on the calling thread, whatever the dirty ratio (tests, tools). ``upto``
    defaults to the log end (a log that is its own authority)."""
    settings = settings or CleanerSettings()
    now = int(time.time() * 1000) if now_ms is None else now_ms
    p = plan(plog, plog.log_end_offset if upto is None else upto, now)
    if p is None:
        return None
    try:
        res = build(p, settings, limiter or RateLimiter(settings.io_bytes_per_second), hook)
    finally:
        p.close()
    return commit(plog, p, res, hook)


Source = Callable[[], Iterable[tuple[PartitionLog, int]]]


class LogCleaner:
    """The node's background cleaner: every ``interval_ms`` it cleans, one at a time, the
    compacted partition logs whose dirty ratio reached ``min.cleanable.dirty.ratio`` (most
    dirty first), and those whose cleaned part may hold an expired tombstone
    (:func:`tombstones_due`); the reading, decoding and writing run in a worker thread, the swaps on the
    event loop. ``source`` yields each open log with its high watermark."""

    def __init__(
        self,
        settings: CleanerSettings,
        source: Source,
        *,
        clock_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000,
    ) -> None:
        self.settings = settings
        self._source = source
        self._clock_ms = clock_ms
        self.limiter = RateLimiter(settings.io_bytes_per_second)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.settings.interval_ms / 1000)
            try:
                await self.run_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("log cleaner run failed")

    def candidates(self, now_ms: int) -> list[tuple[float, PartitionLog, int]]:
        out: list[tuple[float, PartitionLog, int]] = []
        for plog, hw in self._source():
            if not is_compacted(plog.config.cleanup_policy):
                continue
            try:
                view = update_view(plog, hw, now_ms)
            except (OSError, StorageError) as exc:
                log.warning("%s: cannot size the dirty part: %s", plog.directory, exc)
                continue
            if view.dirty_bytes and view.ratio >= plog.config.min_cleanable_dirty_ratio:
                out.append((view.ratio, plog, hw))
            elif view.cleanable_end > plog.stored_start_offset and tombstones_due(plog, now_ms):
                out.append((0.0, plog, hw))
        out.sort(key=lambda c: -c[0])
        return out

    async def run_once(self) -> int:
        """Clean every partition due now, one after the other; returns how many."""
        now = self._clock_ms()
        n = 0
        for _ratio, plog, hw in self.candidates(now):
            if await self.clean(plog, hw, now):
                n += 1
        return n

    async def clean(self, plog: PartitionLog, upto: int, now_ms: int) -> bool:
        try:
            p = plan(plog, upto, now_ms)
        except StorageError as exc:
            log.warning("%s: cannot plan a clean: %s", plog.directory, exc)
            return False
        if p is None:
            return False
        try:
            res = await asyncio.to_thread(build, p, self.settings, self.limiter)
        except (OSError, StorageError) as exc:
            log.warning("%s: cleaning failed, the log is unchanged: %s", plog.directory, exc)
            return False
        finally:
            p.close()
        try:
            commit(plog, p, res)
        except (OSError, StorageError) as exc:
            log.warning("%s: cleaning stopped at a swap: %s", plog.directory, exc)
            return False
        update_view(plog, upto, now_ms)
        return True


__all__ = [
    "ENTRY_BYTES",
    "CleanPlan",
    "CleanResult",
    "CleanerSettings",
    "LogCleaner",
    "OffsetMap",
    "RateLimiter",
    "build",
    "clean_now",
    "commit",
    "dirty_view",
    "is_compacted",
    "key_digest",
    "plan",
    "tombstones_due",
]
