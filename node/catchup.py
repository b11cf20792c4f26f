"""Catch-up by streaming: a replica behind its leader's first retained Raft entry copies the
leader's log range and the partition's state in checksummed chunks, then installs them.

Raft's answer to a follower that needs entries the leader no longer holds is a snapshot. A
partition's snapshot (``node/replica_storage.py``, format 4) is *streamed*: its point is the
leader's applied index, and the Raft message carries only the range to copy (from the batch
holding the leader's logical log start to the offset after that index) and the names, sizes
and CRC-32Cs of its state parts (the idempotence state; later the compacted table). Nothing
large travels as one message.

* **Sender** (any replica holding the range; the leader in practice): the internal
  ``Cluster/CatchupRead`` RPC answers a range or a part from a position on, in chunks of at
  most :data:`CHUNK_BYTES`, each with its CRC-32C (:func:`log_chunks`, :func:`part_chunks`),
  at the node's recovery rate (:class:`RateLimiter` over ``replica.recovery.bytes.per.second``,
  shared by every copy the node sends), so a copy does not starve live traffic. The state
  parts of the snapshots a leader made are kept in memory for a while (:class:`PartStore`).
* **Receiver**: the driver's snapshot gate (``MultiRaft.snapshot_gate``) holds a streamed
  snapshot back from the core and starts a copy (:class:`CatchupManager`). The copy goes into
  a staging directory next to the partition's (``<partition>.catchup``): a partition log of its
  own (only whole, verified batches are appended, fsynced as they come) and one file per state
  part, plus ``catchup.json`` naming the target. After a crash of either side the copy resumes:
  the staged log's end is the offset to ask for next (committed batches are the same bytes on
  every replica, so any leader can answer it), a part continues from the bytes it holds. Once
  the range and every part are complete and verified, the held message is delivered again; the
  gate lets it through, the core restores the snapshot and the driver installs it:
  ``PartitionLog.adopt`` replaces the partition's log by the staged segments (renames), and the
  parts go to the owner. Until then the partition's log is untouched: the copied range is
  served only once the stream is complete and the Raft snapshot point installed.

A replica far behind a leader that still holds the entries it lacks (a learner added by a
move, a replica back after a long absence) catches up by plain Raft APPENDs, and those go at
the same rate: the core asks the group's :class:`LogThrottle` before each APPEND to a
follower lacking more than ``replica.recovery.lag.bytes`` of the leader's log (a learner, or a
voter while the voters keeping up are a majority without it) and retries at its next tick
when refused; the throttle draws on the node's one :class:`RateLimiter`. A follower a little
behind is never held back. The rate is read at every chunk and message (``Node.recovery_rate``:
the cluster setting when set, else the node's flag), so changing it changes copies under way.

State providers: a partition's state is a list of :class:`SnapshotPart` (name, size, CRC-32C,
a ``read(position, n)``), made when the leader makes the snapshot; the receiver gets each as
bytes (``ReplicaStorage.installed_parts``). The idempotence state is the part
``idempotence``; a compacted table would add its own parts (see :data:`StateProvider`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Final, Protocol

import crc32c
import grpc

from tidelog.config import TopicConfig
from tidelog.errors import StorageError
from tidelog.node.log.partition_log import PartitionLog
from tidelog.node.raft.types import Message, Snapshot, SnapshotMeta
from tidelog.node.replica_storage import (
    PartInfo,
    ReplicaStorage,
    StreamedRange,
    decode_snapshot,
    encode_streamed,
)
from tidelog.records import HEADER_SIZE, unpack_header
from tidelog.v1 import cluster_pb2

if TYPE_CHECKING:
    from tidelog.node.multiraft import MultiRaft, RaftGroup

log = logging.getLogger(__name__)

KIB: Final = 1024
MIB: Final = 1024 * KIB
#: Bytes of one chunk at most (the data of one CatchupChunk message).
CHUNK_BYTES: Final = 1 * MIB
#: The idempotence state of a streamed snapshot at most (it is kept in memory while copied).
STREAMED_STATE_BYTES_MAX: Final = 256 * MIB
#: The state part holding the partition's idempotence state.
IDEMPOTENCE_PART: Final = "idempotence"
#: How long a leader keeps the parts of a snapshot nobody reads, and how many per group.
parts_ttl_s: Final = 120.0
parts_per_group_max: Final = 4
#: Pause between attempts of a copy that failed (the leader moved, a chunk was refused).
retry_backoff_s: Final = 1.0
#: The staged log is fsynced (and its progress thereby kept) every this many bytes.
stage_flush_bytes: Final = 4 * MIB
STAGE_SUFFIX: Final = ".catchup"
STAGE_META: Final = "catchup.json"
_STAGE_LOG: Final = "log"
_STAGE_PARTS: Final = "parts"


class ChunkError(StorageError):
    """A chunk that cannot be accepted: wrong checksum, wrong position, a broken batch."""


# ---- chunks ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Chunk:
    position: int
    data: bytes
    crc32c: int


def make_chunk(position: int, data: bytes) -> Chunk:
    return Chunk(position, data, crc32c.crc32c(data))


def verify_chunk(chunk: Chunk, expected_position: int) -> None:
    """ChunkError unless ``chunk`` is the next one and its data matches its checksum."""
    if chunk.position != expected_position:
        raise ChunkError(f"chunk at byte {chunk.position}, expected byte {expected_position}")
    if len(chunk.data) > CHUNK_BYTES:
        raise ChunkError(f"chunk of {len(chunk.data)} bytes exceeds {CHUNK_BYTES}")
    if crc32c.crc32c(chunk.data) != chunk.crc32c:
        raise ChunkError(f"chunk at byte {chunk.position} fails its CRC-32C")


class StoredLog(Protocol):
    """The part of PartitionLog a sender reads."""

    def read(
        self, offset: int, max_bytes: int, *, upto: int | None = None, stored: bool = False
    ) -> bytes: ...


def log_chunks(
    lg: StoredLog, offset: int, end_offset: int, chunk_bytes: int = CHUNK_BYTES
) -> Iterator[Chunk]:
    """The stored batches from the one starting at ``offset`` up to ``end_offset``, as
    consecutive chunks of at most ``chunk_bytes`` (a batch may span chunks). ChunkError if no
    batch starts at ``offset``."""
    position = 0
    first = True
    buf = b""
    while offset < end_offset:
        data = lg.read(offset, chunk_bytes, upto=end_offset, stored=True)
        if not data:
            raise ChunkError(
                f"the log holds no whole batch from offset {offset} below {end_offset}"
            )
        h = unpack_header(data)
        if first and h.base_offset != offset:
            raise ChunkError(
                f"no batch starts at offset {offset} (the one holding it: {h.base_offset})"
            )
        first = False
        pos = 0
        while pos < len(data):
            h = unpack_header(data[pos : pos + HEADER_SIZE])
            pos += h.size
            offset = h.last_offset + 1
        buf += data
        while len(buf) >= chunk_bytes:
            yield make_chunk(position, buf[:chunk_bytes])
            position += chunk_bytes
            buf = buf[chunk_bytes:]
    if buf:
        yield make_chunk(position, buf)


class SnapshotPart(Protocol):
    """One state part of a streamed snapshot, on the leader."""

    @property
    def name(self) -> str: ...
    @property
    def size(self) -> int: ...
    @property
    def crc32c(self) -> int: ...

    def read(self, position: int, n: int) -> bytes: ...


@dataclass(frozen=True, slots=True)
class BytesPart:
    """A part held in memory (the idempotence state)."""

    name: str
    data: bytes
    crc32c: int = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "crc32c", crc32c.crc32c(self.data))

    @property
    def size(self) -> int:
        return len(self.data)

    def read(self, position: int, n: int) -> bytes:
        return self.data[position : position + n]


#: Adds a partition's own state parts to each streamed snapshot its leader makes: called with
#: the snapshot's Raft index; the parts must describe the state as of that index.
StateProvider = Callable[[int], list[SnapshotPart]]


def part_chunks(
    part: SnapshotPart, position: int, chunk_bytes: int = CHUNK_BYTES
) -> Iterator[Chunk]:
    if not 0 <= position <= part.size:
        raise ChunkError(f"part {part.name!r} has {part.size} bytes; asked from byte {position}")
    while position < part.size:
        data = part.read(position, min(chunk_bytes, part.size - position))
        if not data:
            raise ChunkError(f"part {part.name!r} ended early at byte {position}")
        yield make_chunk(position, data)
        position += len(data)


# ---- the rate ----------------------------------------------------------------------------


class RateLimiter:
    """A rate limit over a rate read at every call (``rate()`` bytes per second; 0 or less:
    unlimited), shared by concurrent callers. The schedule counts bytes: ``_reserved`` is
    what callers took, ``_paid`` what the rate has paid for since (it grows at the rate
    while anything is owed, and runs ahead of ``_reserved`` by at most the burst: an idle
    limiter lets at most one chunk or a tenth of a second of bytes through at once). So two
    copies together get the rate, not twice it, and a rate changed at run time applies from
    then on, to callers already waiting too (they wake at least every ``wake_s`` to look).
    ``clock`` and ``sleep`` are seams for the tests."""

    #: A waiting caller looks at the rate again at least this often.
    wake_s: Final = 0.25

    def __init__(
        self,
        rate: Callable[[], int],
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._rate = rate
        self._clock = clock
        self._sleep = sleep
        self._at = clock()
        self._reserved = 0.0
        self._paid = 0.0

    @staticmethod
    def burst_bytes(rate: int) -> int:
        """Bytes an idle limiter at ``rate`` lets through at once."""
        return max(CHUNK_BYTES, rate // 10)

    def _update(self) -> int:
        """Pay for the time since the last call at the current rate; returns the rate."""
        rate = self._rate()
        now = self._clock()
        if rate <= 0:
            self._paid = self._reserved
        else:
            ceiling = self._reserved + self.burst_bytes(rate)
            self._paid = min(self._paid + max(0.0, now - self._at) * rate, ceiling)
        self._at = now
        return rate

    async def acquire(self, n: int) -> None:
        """Reserve ``n`` bytes and wait until the schedule has paid for them."""
        self._update()
        self._reserved += n
        mine = self._reserved
        while True:
            rate = self._update()
            if rate <= 0 or self._paid >= mine:
                return
            await self._sleep(min((mine - self._paid) / rate, self.wake_s))

    def try_take(self, n: int) -> bool:
        """Take ``n`` bytes now if the schedule owes nothing (the burst not used up),
        without waiting: the Raft core's catch-up APPENDs ask here (``LogThrottle``) and
        retry at a later tick. A taken message may overdraw the schedule by itself: whoever
        comes next waits for it."""
        rate = self._update()
        if rate > 0 and self._paid < self._reserved:
            return False
        self._reserved += n
        if rate <= 0:
            self._paid = self._reserved
        return True


# ---- catching up by APPEND ------------------------------------------------------------------

#: The default of ``replica.recovery.lag.bytes``: a follower whose log lacks more than this
#: of its leader's is caught up at the recovery rate (twice the Raft in-flight window, which
#: bounds what a follower keeping up has outstanding).
RECOVERY_LAG_BYTES_DEFAULT: Final = 64 * MIB


class LaggingLog(Protocol):
    """The part of PartitionLog a throttle reads."""

    def bytes_after_index(self, raft_index: int) -> int: ...


class LogThrottle:
    """``raft.CatchupThrottle`` of one partition group: a follower whose log lacks more than
    ``lag_bytes()`` of the leader's (learners just added, replicas back after a long
    absence) is sent entries at the node's recovery rate, drawn from the same
    :class:`RateLimiter` as the streamed copies; one a little behind is not limited."""

    def __init__(
        self, lg: LaggingLog, limiter: RateLimiter, rate: Callable[[], int],
        lag_bytes: Callable[[], int],
    ) -> None:  # fmt: skip
        self._lg = lg
        self._limiter = limiter
        self._rate = rate
        self._lag_bytes = lag_bytes
        #: Entry bytes let through to followers far behind (metrics, tests).
        self.bytes_taken = 0

    def behind(self, match: int, last: int) -> bool:
        if match >= last or self._rate() <= 0:
            return False
        return not self.caught_up(match)

    def caught_up(self, match: int) -> bool:
        """Whether a follower whose log matches up to ``match`` lacks at most
        ``lag_bytes()`` (whatever the rate): a learner is promoted only then
        (node/membership.py), so a move never counts on a voter far behind."""
        return self._lg.bytes_after_index(match) <= self._lag_bytes()

    def take(self, nbytes: int) -> bool:
        if not self._limiter.try_take(nbytes):
            return False
        self.bytes_taken += nbytes
        return True


# ---- the leader's parts --------------------------------------------------------------------


class PartStore:
    """The state parts of the streamed snapshots this node made as a leader, by group and
    snapshot index, kept while read (and ``parts_ttl_s`` after)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._parts: dict[int, dict[int, tuple[float, dict[str, SnapshotPart]]]] = {}

    def put(self, group: int, index: int, parts: list[SnapshotPart]) -> None:
        now = self._clock()
        by_index = self._parts.setdefault(group, {})
        by_index[index] = (now, {p.name: p for p in parts})
        for i in [i for i, (at, _p) in by_index.items() if now - at > parts_ttl_s]:
            del by_index[i]
        while len(by_index) > parts_per_group_max:
            del by_index[min(by_index, key=lambda i: by_index[i][0])]

    def get(self, group: int, index: int, name: str) -> SnapshotPart | None:
        entry = self._parts.get(group, {}).get(index)
        if entry is None:
            return None
        self._parts[group][index] = (self._clock(), entry[1])
        return entry[1].get(name)

    def forget(self, group: int) -> None:
        self._parts.pop(group, None)


def make_streamed_snapshot(
    lg: PartitionLog,
    storage: ReplicaStorage,
    applied_index: int,
    parts: Callable[[int], list[SnapshotPart]],
) -> tuple[Snapshot, list[SnapshotPart]] | None:
    """A format-4 snapshot at ``applied_index`` over ``lg`` and its parts, or None when the
    log does not hold what it needs (then the caller's snapshot has no range)."""
    index = applied_index
    if index < lg.first_index or index > lg.last_index:
        return None
    term = lg.term_at_index(index)
    end = lg.end_offset_at_index(index)
    if term is None or end is None:
        return None
    logical = lg.log_start_offset
    if logical >= end:
        start, prev_index, prev_term = end, index, term
        logical = end
    else:
        head = lg.read(logical, 1, upto=end, stored=True)
        if not head:
            return None
        h = unpack_header(head)
        start, prev_index = h.base_offset, h.raft_index - 1
        pt = lg.term_at_index(prev_index)
        if pt is None:
            return None
        prev_term = pt
    made = parts(index)
    info = tuple(PartInfo(p.name, p.size, p.crc32c) for p in made)
    data = encode_streamed(StreamedRange(start, logical, end, prev_index, prev_term, info))
    return Snapshot(SnapshotMeta(index, term, storage.conf_state()), data), made


# ---- the receiver's stage ------------------------------------------------------------------


@dataclass(slots=True)
class Target:
    """The streamed snapshot a stage is copying."""

    index: int
    term: int
    start_offset: int
    logical_start: int
    end_offset: int
    prev_index: int
    prev_term: int
    parts: list[tuple[str, int, int]]
    leader: int
    complete: bool = False

    @classmethod
    def of(cls, meta: SnapshotMeta, r: StreamedRange, leader: int) -> Target:
        return cls(
            meta.index, meta.term, r.start_offset, r.logical_start, r.end_offset,
            r.prev_index, r.prev_term, [(p.name, p.size, p.crc32c) for p in r.parts], leader,
        )  # fmt: skip


def stage_dir(partition_dir: Path) -> Path:
    return partition_dir.with_name(partition_dir.name + STAGE_SUFFIX)


class Stage:
    """The receiver's copy of one streamed snapshot in progress (see the module docstring).
    Every method does blocking file I/O (callers run them in a worker thread)."""

    def __init__(self, directory: Path, config: TopicConfig) -> None:
        self.dir = directory
        self._config = config
        self.target: Target | None = None
        self.log: PartitionLog | None = None
        self._pending = bytearray()
        self._unflushed = 0

    # -- lifecycle

    def load(self) -> Target | None:
        """The target a previous run was copying (None: nothing usable)."""
        try:
            raw = json.loads((self.dir / STAGE_META).read_text())
            raw["parts"] = [tuple(p) for p in raw["parts"]]
            self.target = Target(**raw)
        except (OSError, ValueError, TypeError, KeyError):
            self.target = None
        return self.target

    def begin(self, target: Target) -> int:
        """Copy toward ``target``, keeping what the stage holds if it is part of the
        target's range; returns the offset to copy from."""
        old = self.target if self.target is not None else self.load()
        keep = False
        if old is not None and (self.dir / _STAGE_LOG).is_dir():
            lg = self.log or PartitionLog(self.dir / _STAGE_LOG, self._config)
            self.log = lg
            # The staged batches are committed ones (the same bytes on every replica): they
            # serve a new target whose logical start they reach and whose range they continue.
            keep = (
                lg.stored_start_offset <= target.logical_start
                and target.start_offset <= lg.log_end_offset <= target.end_offset
            )
            if old.index != target.index:
                # Other parts: drop the copied ones (their CRCs differ).
                shutil.rmtree(self.dir / _STAGE_PARTS, ignore_errors=True)
        if not keep:
            self.discard()
            self.dir.mkdir(parents=True, exist_ok=True)
            lg = PartitionLog(self.dir / _STAGE_LOG, self._config)
            lg.reset(target.start_offset, target.prev_index, target.prev_term)
            self.log = lg
        target.complete = False
        self.target = target
        self._write_meta()
        (self.dir / _STAGE_PARTS).mkdir(exist_ok=True)
        self._pending.clear()
        assert self.log is not None
        return self.log.log_end_offset

    def discard(self) -> None:
        if self.log is not None:
            with contextlib.suppress(Exception):
                self.log.close()
            self.log = None
        shutil.rmtree(self.dir, ignore_errors=True)
        self.target = None

    def _write_meta(self) -> None:
        assert self.target is not None
        tmp = self.dir / (STAGE_META + ".tmp")
        with open(tmp, "w") as f:
            json.dump(asdict(self.target), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.dir / STAGE_META)

    # -- the log range

    @property
    def log_end(self) -> int:
        assert self.log is not None
        return self.log.log_end_offset

    def accept_log(self, chunk: Chunk, expected_position: int) -> None:
        """Verify a chunk of the range and append the whole batches it completes."""
        verify_chunk(chunk, expected_position)
        assert self.log is not None and self.target is not None
        buf = self._pending
        buf += chunk.data
        pos = 0
        end = self.target.end_offset
        while len(buf) - pos >= HEADER_SIZE:
            h = unpack_header(bytes(buf[pos : pos + HEADER_SIZE]))
            if h.size < HEADER_SIZE:
                raise ChunkError(f"a batch of {h.size} bytes at offset {h.base_offset}")
            if len(buf) - pos < h.size:
                break
            if h.last_offset >= end:
                raise ChunkError(f"batch at offset {h.base_offset} lies beyond the range end {end}")
            pos += h.size
        if pos:
            try:
                self.log.append_stamped(bytes(buf[:pos]))
            except ValueError as exc:
                raise ChunkError(f"copied batches do not continue the staged log: {exc}") from exc
            del buf[:pos]
            self._unflushed += pos
            if self._unflushed >= stage_flush_bytes:
                self.flush()

    def flush(self) -> None:
        if self.log is not None:
            self.log.flush()
        self._unflushed = 0

    # -- parts

    def part_path(self, name: str) -> Path:
        safe = name.replace("/", "%2F")
        return self.dir / _STAGE_PARTS / safe

    def part_size(self, name: str) -> int:
        try:
            return self.part_path(name).stat().st_size
        except FileNotFoundError:
            return 0

    def accept_part(self, name: str, chunk: Chunk, expected_position: int) -> None:
        verify_chunk(chunk, expected_position)
        path = self.part_path(name)
        with open(path, "ab") as f:
            if f.tell() != chunk.position:
                f.truncate(chunk.position)
                f.seek(chunk.position)
            f.write(chunk.data)
            f.flush()
            os.fsync(f.fileno())

    def check_part(self, name: str, size: int, crc: int) -> bool:
        """Whether the part is complete and matches; a mismatching one is removed."""
        path = self.part_path(name)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            data = b""
        if len(data) == size and crc32c.crc32c(data) == crc:
            return True
        if len(data) >= size:
            path.unlink(missing_ok=True)
        return False

    def mark_complete(self) -> None:
        assert self.target is not None and self.log is not None
        if self._pending:
            raise ChunkError(f"the range ends inside a batch ({len(self._pending)} bytes left)")
        if self.log.log_end_offset != self.target.end_offset:
            raise ChunkError(
                f"the copy ends at offset {self.log.log_end_offset}, the range at "
                f"{self.target.end_offset}"
            )
        self.flush()
        self.target.complete = True
        self._write_meta()

    def install_into(self, lg: PartitionLog) -> dict[str, bytes]:
        """Adopt the staged log into ``lg`` and return the parts' bytes; the stage is gone."""
        assert self.target is not None and self.log is not None
        parts = {name: self.part_path(name).read_bytes() for name, _s, _c in self.target.parts}
        self.log.close()
        self.log = None
        # No longer a copy to resume: a crash during the adoption empties the log instead.
        (self.dir / STAGE_META).unlink(missing_ok=True)
        lg.adopt(self.dir / _STAGE_LOG, logical_start=self.target.logical_start)
        self.discard()
        return parts


# ---- the manager ---------------------------------------------------------------------------

#: Opens a CatchupRead stream to node ``node`` for ``request``: its chunks.
Reader = Callable[[int, cluster_pb2.CatchupReadRequest], AsyncIterator[cluster_pb2.CatchupChunk]]


@dataclass(slots=True)
class _Job:
    group_id: int
    stage: Stage
    latest: Message
    task: asyncio.Task[None] | None = None
    copied: int = 0


class CatchupManager:
    """Both sides of catch-up on one node (see the module docstring)."""

    def __init__(
        self,
        node_id: int,
        raft: MultiRaft,
        reader: Reader,
        rate: Callable[[], int],
        *,
        lag_bytes: Callable[[], int] = lambda: RECOVERY_LAG_BYTES_DEFAULT,
        cluster_id: Callable[[], str] = lambda: "",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.node_id = node_id
        self._raft = raft
        self._reader = reader
        self._cluster_id = cluster_id
        self.rate = rate
        self.lag_bytes = lag_bytes
        self.limiter = RateLimiter(rate, clock=clock)
        #: The APPEND throttle of each attached group (``LogThrottle``).
        self.throttles: dict[int, LogThrottle] = {}
        #: Bytes streamed to each (group, node) by CatchupRead (move progress, metrics).
        self.sent_to: dict[tuple[int, int], int] = {}
        self._appended_forgotten = 0
        self.parts = PartStore(clock)
        self._jobs: dict[int, _Job] = {}
        self._closed = False
        #: Bytes copied in (log and parts) and sent out, for metrics and tests.
        self.bytes_received = 0
        self.bytes_sent = 0
        self.installed = 0

    # -- leader side

    def attach(
        self,
        group: RaftGroup,
        applied_index: Callable[[], int],
        state: Callable[[int], bytes],
        providers: list[StateProvider] | None = None,
    ) -> None:
        """Make ``group``'s snapshots streamed ones and let it install them."""
        storage = group.storage
        lg = storage.log
        if not isinstance(lg, PartitionLog):
            return
        gid = group.group_id
        extra = list(providers or ())

        def parts(index: int) -> list[SnapshotPart]:
            out: list[SnapshotPart] = [BytesPart(IDEMPOTENCE_PART, state(STREAMED_STATE_BYTES_MAX))]
            for provider in extra:
                out.extend(provider(index))
            return out

        def maker() -> Snapshot | None:
            made = make_streamed_snapshot(lg, storage, applied_index(), parts)
            if made is None:
                return None
            snap, ps = made
            self.parts.put(gid, snap.meta.index, ps)
            log.info(
                "raft group %d: streamed snapshot at index %d for a follower behind the log's "
                "start (raft index %d)", gid, snap.meta.index, lg.first_index,
            )  # fmt: skip
            return snap

        storage.snapshot_maker = maker
        storage.stream_installer = lambda snap, r: self._install(group, lg, snap)
        throttle = LogThrottle(lg, self.limiter, self.rate, self.lag_bytes)
        self.throttles[gid] = throttle
        group.raw.catchup = throttle

    def forget(self, group_id: int) -> None:
        self.parts.forget(group_id)
        throttle = self.throttles.pop(group_id, None)
        if throttle is not None:
            self._appended_forgotten += throttle.bytes_taken
        for key in [k for k in self.sent_to if k[0] == group_id]:
            del self.sent_to[key]
        job = self._jobs.pop(group_id, None)
        if job is not None and job.task is not None:
            job.task.cancel()

    async def serve(
        self, request: cluster_pb2.CatchupReadRequest, lg: StoredLog | None
    ) -> AsyncIterator[cluster_pb2.CatchupChunk]:
        """The chunks of a CatchupRead, at the node's recovery rate. ``lg``: the log of the
        group's local replica (None: no replica here)."""
        if lg is None:
            raise ChunkError(f"no replica of raft group {request.group} on node {self.node_id}")
        if request.part:
            part = self.parts.get(request.group, request.snapshot_index, request.part)
            if part is None:
                raise ChunkError(
                    f"raft group {request.group}: no part {request.part!r} of a snapshot at "
                    f"index {request.snapshot_index} here (made by another leader, or expired)"
                )
            chunks: Iterator[Chunk] = part_chunks(part, request.position)
        else:
            chunks = log_chunks(lg, request.position, request.end_offset)
        key = (request.group, request.from_node)
        for chunk in chunks:
            await self.limiter.acquire(len(chunk.data))
            self.bytes_sent += len(chunk.data)
            self.sent_to[key] = self.sent_to.get(key, 0) + len(chunk.data)
            yield cluster_pb2.CatchupChunk(
                position=chunk.position, data=chunk.data, crc32c=chunk.crc32c
            )

    # -- receiver side

    def gate(self, group: RaftGroup, msg: Message) -> bool:
        """``MultiRaft.snapshot_gate``: a streamed snapshot passes once its copy is complete."""
        snap = msg.snapshot
        if snap is None:
            return True
        try:
            data = decode_snapshot(snap.data)
        except StorageError:
            return True  # the core's install refuses it
        if data.stream is None:
            return True
        gid = group.group_id
        job = self._jobs.get(gid)
        if job is not None:
            t = job.stage.target
            if (
                t is not None
                and t.complete
                and (t.index, t.term) == (snap.meta.index, snap.meta.term)
            ):
                return True
            job.latest = msg
            if job.task is None or job.task.done():
                self._start(job)
            return False
        lg = group.storage.log
        if not isinstance(lg, PartitionLog) or self._closed:
            return False
        job = _Job(gid, Stage(stage_dir(lg.directory), lg.config), msg)
        self._jobs[gid] = job
        self._start(job)
        return False

    def _start(self, job: _Job) -> None:
        job.task = asyncio.get_running_loop().create_task(
            self._run(job), name=f"catchup-{job.group_id}"
        )

    async def _run(self, job: _Job) -> None:
        while not self._closed:
            # Each attempt copies toward the newest snapshot the leader sent (what is staged
            # and still part of it is kept) and, once complete, delivers that message.
            msg = job.latest
            try:
                await self._copy(job, msg)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning(
                    "raft group %d: catch-up copy from node %d interrupted: %s; retrying",
                    job.group_id, msg.frm, exc,
                )  # fmt: skip
                await asyncio.sleep(retry_backoff_s)
                continue
            if self._jobs.get(job.group_id) is not job or job.group_id not in self._raft.groups:
                return
            # Deliver the snapshot again: the gate lets it through now.
            self._raft.deliver(msg.frm, [(job.group_id, msg)])
            return

    async def _copy(self, job: _Job, msg: Message) -> None:
        snap = msg.snapshot
        assert snap is not None
        r = decode_snapshot(snap.data).stream
        assert r is not None
        target = Target.of(snap.meta, r, msg.frm)
        stage = job.stage
        t = stage.target
        if t is not None and t.complete and (t.index, t.term) == (target.index, target.term):
            return
        offset = await asyncio.to_thread(stage.begin, target)
        t0 = time.monotonic()
        before = job.copied
        if offset < target.end_offset:
            log.info(
                "raft group %d: copying offsets [%d, %d) from node %d for a snapshot at index %d",
                job.group_id, offset, target.end_offset, msg.frm, target.index,
            )  # fmt: skip
            request = self._request(job.group_id, target, "", offset, target.end_offset)
            expected = 0
            async for pb in self._reader(msg.frm, request):
                chunk = Chunk(pb.position, pb.data, pb.crc32c)
                await asyncio.to_thread(stage.accept_log, chunk, expected)
                expected += len(chunk.data)
                job.copied += len(chunk.data)
                self.bytes_received += len(chunk.data)
            await asyncio.to_thread(stage.flush)
        for name, size, crc in target.parts:
            if await asyncio.to_thread(stage.check_part, name, size, crc):
                continue
            position = await asyncio.to_thread(stage.part_size, name)
            request = self._request(job.group_id, target, name, position, 0)
            async for pb in self._reader(msg.frm, request):
                chunk = Chunk(pb.position, pb.data, pb.crc32c)
                await asyncio.to_thread(stage.accept_part, name, chunk, position)
                position += len(chunk.data)
                job.copied += len(chunk.data)
                self.bytes_received += len(chunk.data)
            if not await asyncio.to_thread(stage.check_part, name, size, crc):
                raise ChunkError(f"state part {name!r} does not match its size and CRC-32C")
        await asyncio.to_thread(stage.mark_complete)
        log.info(
            "raft group %d: catch-up copy for the snapshot at index %d complete: %d bytes in "
            "%.1f s", job.group_id, target.index, job.copied - before, time.monotonic() - t0,
        )  # fmt: skip

    def _request(
        self, group: int, t: Target, part: str, position: int, end: int
    ) -> cluster_pb2.CatchupReadRequest:
        return cluster_pb2.CatchupReadRequest(
            from_node=self.node_id,
            cluster_id=self._cluster_id(),
            group=group,
            snapshot_index=t.index,
            snapshot_term=t.term,
            part=part,
            position=position,
            end_offset=end,
        )

    def _install(self, group: RaftGroup, lg: PartitionLog, snap: Snapshot) -> dict[str, bytes]:
        """``ReplicaStorage.stream_installer``, inside the driver's round."""
        job = self._jobs.get(group.group_id)
        t = None if job is None else job.stage.target
        if (
            job is None
            or t is None
            or not t.complete
            or (t.index, t.term) != (snap.meta.index, snap.meta.term)
        ):
            raise StorageError(
                f"raft group {group.group_id}: no complete copy for the snapshot at index "
                f"{snap.meta.index}"
            )
        parts = job.stage.install_into(lg)
        del self._jobs[group.group_id]
        self.installed += 1
        log.info(
            "raft group %d: installed the copied log [%d, %d) and %d state part(s) at raft "
            "index %d", group.group_id, lg.stored_start_offset, lg.log_end_offset, len(parts),
            snap.meta.index,
        )  # fmt: skip
        return parts

    @property
    def bytes_appended(self) -> int:
        """Entry bytes the throttles let through to followers far behind, since the start
        (groups forgotten since included)."""
        return self._appended_forgotten + sum(t.bytes_taken for t in list(self.throttles.values()))

    def progress(self) -> dict[int, int]:
        """Bytes copied so far by each running copy, by group."""
        return {gid: j.copied for gid, j in self._jobs.items()}

    async def close(self) -> None:
        self._closed = True
        tasks = [j.task for j in self._jobs.values() if j.task is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task
        for job in self._jobs.values():
            with contextlib.suppress(Exception):
                await asyncio.to_thread(job.stage.flush)
            if job.stage.log is not None:
                with contextlib.suppress(Exception):
                    job.stage.log.close()
        self._jobs.clear()


def grpc_reader(
    address_of: Callable[[int], str | None],
    channel: Callable[[str], grpc.aio.Channel],
    metadata: Callable[[str], tuple[tuple[str, str], ...] | None],
    method: str,
) -> Reader:
    """A :data:`Reader` over the internal Cluster service: ``channel`` opens a channel to an
    internal address (presenting this node's certificate), ``metadata`` gives a call's
    authentication metadata (``node/internal_auth.py``). One channel per copy attempt."""

    async def read(
        node: int, request: cluster_pb2.CatchupReadRequest
    ) -> AsyncIterator[cluster_pb2.CatchupChunk]:
        address = address_of(node)
        if address is None:
            raise ChunkError(f"node {node}'s internal address is not known")
        ch = channel(address)
        try:
            call = ch.unary_stream(
                method,
                request_serializer=cluster_pb2.CatchupReadRequest.SerializeToString,
                response_deserializer=cluster_pb2.CatchupChunk.FromString,
            )
            async for chunk in call(request, metadata=metadata(method)):
                yield chunk
        finally:
            await ch.close(None)

    return read


__all__ = [
    "CHUNK_BYTES",
    "IDEMPOTENCE_PART",
    "RECOVERY_LAG_BYTES_DEFAULT",
    "BytesPart",
    "CatchupManager",
    "Chunk",
    "ChunkError",
    "LogThrottle",
    "PartStore",
    "RateLimiter",
    "SnapshotPart",
    "Stage",
    "StateProvider",
    "log_chunks",
    "make_chunk",
    "make_streamed_snapshot",
    "part_chunks",
    "stage_dir",
    "verify_chunk",
]
