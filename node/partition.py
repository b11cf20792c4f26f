"""One replica of one partition on this node: its log, its Raft group, its high watermark and
who waits on them.

The partition is one user of the replicated-state-machine seam (``node/stm.py``), which owns
the Raft group's callbacks. On the leader, a produce request becomes one proposal per record
batch (:meth:`Partition.propose`, stamped by ``StateMachine.propose_batches``). The driver
stores, replicates and commits it; the seam turns the callbacks into answers and this class
adds what a partition means:

* applying committed entries moves the high watermark (``log.end_offset_at_index``), which
  wakes fetch streams; the seam's term-checked waiters wake acks=all producers, whose batch
  counts only if the entry committed at its index is the one they proposed (same term): a
  new leader may have overwritten it, and then the producer hears NOT_LEADER and retries;
* stored entries (fsynced under flush=durable) wake acks=1 producers, again only if the
  stored entry at their index has their term;
* a truncated suffix fails the producers of the entries it removed;
* the log start is the group's, not each replica's (as Kafka's followers take the leader's
  log start): only the serving leader decides retention (:meth:`Partition.enforce_retention`,
  ``retention.ms`` by its segments' timestamps, ``retention.bytes`` by its log's size), and
  proposes the new start as a *log-start* control batch (:func:`log_start_batch`: invisible
  to consumers, one offset, like the NOOP of ``replica_storage``). Every replica applies it
  (:meth:`Partition.apply`) with ``PartitionLog.advance_start``: its logical log start
  becomes that offset, and it deletes its whole segments lying entirely below it. Segment
  boundaries differ between replicas, so the start may fall inside a local segment: the
  bytes below it stay stored (Raft may still send them) but reads, Fetch and ListOffsets
  EARLIEST see the logical start. A follower never deletes on its own clock; a follower
  that misses the control batch (a snapshot covers it) gets the start in the snapshot.

Only the leader serves reads, and only once it is *synced* (the seam's sync step: it has
applied the entries it holds from earlier terms): until then its high watermark may lag the
old leader's, and a consumer at the old high watermark would be told its offset is out of
range. Followers and nodes without a replica answer NOT_LEADER naming the leader.

Everything here runs on the event loop thread, except ``log.flush()``, which the driver runs
in a worker thread.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Final, Protocol

from tidelog.config import TopicConfig
from tidelog.errors import (
    LeaderNotAvailable,
    NodeUnavailable,
    NotEnoughReplicas,
    NotLeader,
    OffsetOutOfRange,
    RequestTimedOut,
    StorageError,
    TidelogError,
    UnknownTopic,
)
from tidelog.node.idempotence import PartitionIdempotence
from tidelog.node.raft.errors import NotRaftLeader as RaftNotLeader
from tidelog.node.raft.errors import ProposalDropped
from tidelog.node.raft.types import NONE, Entry, Role, Snapshot, SoftState
from tidelog.node.replica_storage import NOOP_SIZE, decode_snapshot
from tidelog.node.stm import BatchSpan, LostHow, StateMachine, UnappliableEntry
from tidelog.records import BatchHeader, decode_records, encode_batch, unpack_header

if TYPE_CHECKING:
    from tidelog.node.multiraft import MultiRaft, RaftGroup

log = logging.getLogger(__name__)


class LogLike(Protocol):
    """The part of node/log's PartitionLog a partition replica uses."""

    @property
    def log_start_offset(self) -> int: ...
    @property
    def stored_start_offset(self) -> int: ...
    @property
    def log_end_offset(self) -> int: ...
    @property
    def flushed_offset(self) -> int: ...
    @property
    def size_bytes(self) -> int: ...
    @property
    def segment_count(self) -> int: ...
    @property
    def first_index(self) -> int: ...
    @property
    def last_index(self) -> int: ...
    @property
    def last_term(self) -> int: ...

    def read(self, offset: int, max_bytes: int, *, upto: int | None = None) -> bytes: ...
    def offset_for_timestamp(self, timestamp_ms: int) -> tuple[int, int] | None: ...
    def term_at_index(self, raft_index: int) -> int | None: ...
    def end_offset_at_index(self, raft_index: int) -> int | None: ...
    def entries_by_index(self, lo: int, hi: int, max_bytes: int) -> list[bytes]: ...
    def append_stamped(self, batches: bytes | bytearray | memoryview) -> None: ...
    def truncate_suffix(self, offset: int) -> None: ...
    def reset(
        self, next_offset: int, last_index: int, last_term: int, *, log_start: int | None = None
    ) -> None: ...
    def flush(self) -> int: ...
    def enforce_retention(self, now_ms: int | None = None, *, below: int | None = None) -> int: ...
    def retention_point(
        self, now_ms: int | None = None, *, below: int | None = None
    ) -> int | None: ...
    def advance_start(self, offset: int) -> int: ...
    def maybe_roll(self, now_ms: int | None = None) -> bool: ...
    def update_config(self, config: TopicConfig) -> None: ...
    def close(self) -> None: ...
    def delete(self) -> None: ...


#: ``node_id -> advertised address`` of a node, or None when unknown.
AddressOf = Callable[[int], "str | None"]

#: The key of the one record of a log-start control batch; its value is the new log start
#: (8 bytes, big-endian).
LOG_START_KEY: Final = b"tidelog-log-start"
_LOG_START_VALUE = struct.Struct(">Q")


def log_start_batch(offset: int) -> bytes:
    """The control batch a leader proposes to move the group's log start to ``offset``: one
    record (one offset), timestamp 0, no producer, so it is the same bytes on every replica
    and never a NOOP (``replica_storage.entry_kind``)."""
    return encode_batch(
        [_LOG_START_VALUE.pack(offset)], keys=[LOG_START_KEY], timestamps_ms=0, control=True
    )


def decode_log_start(data: bytes) -> int | None:
    """The log start a committed entry sets, or None if it is not a log-start batch.
    UnappliableEntry for a log-start batch this version cannot read."""
    if not data:
        return None
    h = unpack_header(data)
    if not h.is_control or h.size == NOOP_SIZE or h.producer_id >= 0:
        return None
    recs = decode_records(data, verify_crc=False)
    if not recs or recs[0].key != LOG_START_KEY:
        return None
    value = recs[0].value
    if len(recs) != 1 or value is None or len(value) != _LOG_START_VALUE.size:
        raise UnappliableEntry(
            f"log-start control batch at offset {h.base_offset} has {len(recs)} records and "
            f"a value of {len(value) if value is not None else 'no'} bytes"
        )
    return int(_LOG_START_VALUE.unpack(value)[0])


assert len(log_start_batch(0)) != NOOP_SIZE


def _floor_hw(lg: LogLike) -> int:
    """The high watermark nothing applied yet can be below: the log start, but no further
    than the log end (right after a snapshot, the leader's log start may lie beyond the
    entries this replica holds so far)."""
    return min(lg.log_start_offset, lg.log_end_offset)


class Partition(StateMachine[None]):
    __slots__ = (
        "_address_of",
        "_closed_error",
        "_hw",
        "_log_start_proposed",
        "_stream_error",
        "config",
        "elections_started",
        "elections_won",
        "group_id",
        "idempotence",
        "index",
        "log",
        "replicas",
        "topic",
    )

    def __init__(
        self,
        topic: str,
        index: int,
        partition_log: LogLike,
        config: TopicConfig,
        *,
        group_id: int,
        replicas: Sequence[int],
        address_of: AddressOf = lambda _node: None,
    ) -> None:
        super().__init__()
        self.topic = topic
        self.index = index
        self.log = partition_log
        self.config = config
        self.group_id = group_id
        self.replicas = tuple(replicas)
        self._address_of = address_of
        # What the stored commit index covers; the commits of the running group move it.
        self._hw = _floor_hw(partition_log)
        # The highest log start this leader proposed in its term (0: none).
        self._log_start_proposed = 0
        # The seam's changed() event also fires when the high watermark moves and when the
        # partition closes or ends its streams.
        self._closed_error: TidelogError | None = None
        self._stream_error: TidelogError | None = None
        self.elections_started = 0
        self.elections_won = 0
        # Producer state and msg-id window, derived from the committed log (idempotence.py).
        self.idempotence = PartitionIdempotence(f"{topic}/{index}", config)

    def __repr__(self) -> str:
        return f"Partition({self.topic!r}, {self.index}, group={self.group_id}, hw={self._hw})"

    def attach(self, group: RaftGroup, raft: MultiRaft) -> None:
        """Bind to the running Raft group (right after ``MultiRaft.add_group``)."""
        super().attach(group, raft)
        # The snapshots this replica sends as leader carry the idempotence state.
        group.storage.state_source = self.snapshot_state
        end = self.log.end_offset_at_index(group.raw.commit_index)
        self._hw = max(self._hw, end if end is not None else _floor_hw(self.log))
        # The committed records after the restored snapshot (if any); later commits arrive
        # through apply().
        self.idempotence.recover(self.log, self._hw)
        self.idempotence.applied_index = group.raw.commit_index

    # -- state ---------------------------------------------------------------------------

    @property
    def high_watermark(self) -> int:
        """Offset one past the last committed record: what Fetch serves and LATEST returns."""
        return self._hw

    @property
    def log_start_offset(self) -> int:
        return self.log.log_start_offset

    @property
    def role(self) -> Role:
        return self.group.raw.role if self.group is not None else Role.FOLLOWER

    @property
    def term(self) -> int:
        return self.group.raw.term if self.group is not None else 0

    @property
    def leader_id(self) -> int:
        """The leader this replica knows of (``NONE`` when none)."""
        return self.group.raw.leader_id if self.group is not None else NONE

    @property
    def serving(self) -> bool:
        """Leader and synced (``StateMachine.synced``): its high watermark is the group's,
        so reads may be served."""
        return self.synced

    def in_sync(self) -> list[int]:
        """Replicas whose log holds everything committed (leader view; [] elsewhere). The
        caller drops replicas it knows dead: a follower that died while the partition was
        idle still matches the commit index."""
        group = self.group
        if group is None or group.raw.role != Role.LEADER:
            return []
        raw = group.raw
        commit = raw.commit_index
        out = []
        for node in self.replicas:
            pr = raw.progress(node)
            if node == raw.id or (pr is not None and pr.match >= commit):
                out.append(node)
        return out

    def follower_lags(self) -> list[tuple[int, int]]:
        """(follower, entries it lacks) on the leader; [] elsewhere."""
        group = self.group
        if group is None or group.raw.role != Role.LEADER:
            return []
        raw = group.raw
        last = raw.last_index()
        out = []
        for node in self.replicas:
            if node == raw.id:
                continue
            pr = raw.progress(node)
            if pr is not None:
                out.append((node, max(0, last - pr.match)))
        return out

    def check_open(self) -> None:
        if self._closed_error is not None:
            raise self._closed_error

    def check_streaming(self) -> None:
        """For fetch streams: also fails once the node ends its streams (shutdown) and when
        this replica stops being the serving leader."""
        if self._closed_error is not None:
            raise self._closed_error
        if self._stream_error is not None:
            raise self._stream_error
        if not self.serving:
            raise self.not_leader()

    def check_serving(self) -> None:
        self.check_open()
        if not self.serving:
            raise self.not_leader()

    def check_idempotence_ready(self) -> None:
        """For idempotent batches: serving, which (the seam's sync step) means the producer
        state has applied every entry of earlier terms."""
        self.check_serving()

    def not_leader(self) -> TidelogError:
        """NOT_LEADER naming the leader when one is known, else LEADER_NOT_AVAILABLE."""
        leader = self.leader_id
        where = f"{self.topic}/{self.index}"
        me = self.group.raw.id if self.group is not None else NONE
        if leader not in (NONE, me):
            address = self._address_of(leader)
            return NotLeader(
                f"{where}: this node is not the leader; node {leader} is"
                + (f" at {address}" if address else ""),
                leader_id=str(leader),
                leader_address=address or "",
            )
        return LeaderNotAvailable(
            f"{where}: no leader is available right now (an election is running); retry"
        )

    # -- producing -----------------------------------------------------------------------

    def propose(
        self,
        batches: bytes,
        headers: Sequence[tuple[int, BatchHeader]],
        on_proposed: Callable[[int, int, int, int], None] | None = None,
    ) -> tuple[int, int, int, int]:
        """Propose validated batches (their positions and headers in ``batches``) as one Raft
        entry each. Returns (base offset, last offset, last Raft index, term).
        All or none are proposed; ``on_proposed(i, base_offset, raft_index, term)`` is
        called for each batch once they are."""
        self.check_open()
        view = memoryview(batches)
        p = self.propose_batches(
            (BatchSpan(view, pos, h.size, h.record_count) for pos, h in headers),
            on_proposed=on_proposed,
        )
        return p.first_offset, p.last_offset, p.last_index, p.term

    async def wait_batches(
        self,
        entries: Sequence[tuple[int, int]],
        *,
        committed: bool,
        timeout_s: float,
        per_batch: bool = True,
    ) -> None:
        """Wait for the entries ``(index, term)`` of one produce request's batches, in
        request order: committed (acks=all) or stored on this leader (acks=1). A batch that
        was overwritten fails the request; if batches before it were stored (they are a
        prefix: an entry of a term cannot commit without the earlier entries of that term),
        the NOT_LEADER error says so in its metadata, ``batches_stored=N``, so the client
        retries only the rest. Timeouts as :meth:`wait_committed`. ``per_batch`` False:
        ``entries`` are not one per batch in request order (no ``batches_stored``)."""
        done, error = await self.wait_each(entries, timeout_s, committed=committed)
        if error is None:
            return
        if done == 0 or not per_batch or not isinstance(error, NotLeader):
            raise error
        n = len(entries)
        raise NotLeader(
            f"{error.message} (batches {done + 1}..{n} of the request; its first {done} "
            f"batch(es) were {'committed' if committed else 'stored'}: retry only the rest)",
            **error.metadata,
            batches_stored=str(done),
        )

    async def read_barrier(self, timeout_s: float) -> None:
        """Linearizable reads: return once this replica is confirmed (Raft ReadIndex: a
        heartbeat round a majority acknowledged) to still lead, and has applied everything
        committed before the call, so the high watermark covers every acknowledged record.
        NOT_LEADER if leadership is lost first; RequestTimedOut after ``timeout_s``."""
        self.check_serving()
        group, raft = self.group, self._raft
        if group is None or raft is None:
            raise self.not_leader()
        try:
            fut = raft.read_index(group)
        except RaftNotLeader:
            raise self.not_leader() from None
        except ProposalDropped as exc:
            raise self.dropped_error(exc) from None
        try:
            async with asyncio.timeout(timeout_s):
                index = await fut
                if index < 0:
                    raise self.not_leader()
                while self.applied_index < index:
                    changed = self.changed()
                    if self.applied_index >= index:
                        break
                    self.check_serving()
                    await changed.wait()
        except TimeoutError:
            raise RequestTimedOut(
                f"{self.topic}/{self.index}: leadership was not confirmed by a majority within "
                f"{timeout_s * 1000:.0f} ms; retry"
            ) from None
        finally:
            if not fut.done():
                fut.cancel()
            for ctx, f in list(group.reads.items()):
                if f is fut:
                    del group.reads[ctx]

    # -- the seam's hooks ----------------------------------------------------------------

    def not_leader_error(self) -> TidelogError:
        return self.not_leader()

    def dropped_error(self, exc: ProposalDropped) -> TidelogError:
        return NotEnoughReplicas(
            f"{self.topic}/{self.index}: the leader refused the batch for now: {exc.reason}"
        )

    def entry_lost_error(self, how: LostHow) -> TidelogError:
        leader_id = str(self.group.raw.leader_id or "") if self.group is not None else ""
        if how == "overwritten":
            text = "the batch was overwritten by a new leader's log; it was not committed, retry"
        else:
            text = "the batch was replaced by a new leader's entry and not committed; retry"
        return NotLeader(f"{self.topic}/{self.index}: {text}", leader_id=leader_id)

    def timeout_error(self, index: int, what: str, timeout_s: float) -> TidelogError:
        return RequestTimedOut(
            f"{self.topic}/{self.index}: a batch at raft index {index} was appended but not "
            f"{what} within {timeout_s * 1000:.0f} ms; it may still become visible"
        )

    # -- the seam's hooks: the state ------------------------------------------------------

    def on_role_change(self, soft: SoftState, was_leader: bool) -> None:
        term = self.term
        self._log_start_proposed = 0
        if soft.role == Role.LEADER:
            if not was_leader:
                self.idempotence.leadership_lost()  # proposals in flight are an old term's
                self.elections_won += 1
                log.info("%s/%d: this node leads, term %d", self.topic, self.index, term)
        else:
            if soft.role in (Role.PRE_CANDIDATE, Role.CANDIDATE):
                self.elections_started += 1
            if was_leader:
                log.info(
                    "%s/%d: no longer the leader (term %d, leader %s)",
                    self.topic, self.index, term, soft.leader_id or "unknown",
                )  # fmt: skip
            self.idempotence.leadership_lost()

    def snapshot_state(self, max_bytes: int) -> bytes:
        """The idempotence state for a Raft snapshot (``ReplicaStorage.state_source``), at
        most ``max_bytes``: a follower that installs it knows every producer the leader
        knows, so a retry after a failover to it is still recognized."""
        out = self.idempotence.bounded_snapshot(max_bytes)
        if out.producers_left_out or out.msg_ids_left_out:
            log.warning(
                "%s/%d: the idempotence state does not fit one snapshot of %d bytes: "
                "%d producer(s) and %d msg-id(s) left out (the follower installing it will "
                "not recognize their retries)",
                self.topic, self.index, max_bytes, out.producers_left_out,
                out.msg_ids_left_out,
            )  # fmt: skip
        return out.data

    def restore_snapshot(self, snapshot: Snapshot) -> None:
        idem = self.idempotence
        try:
            state = decode_snapshot(snapshot.data).state
        except StorageError:
            state = None  # install_snapshot already refused bytes that are not ours
        idem.snapshot_installed(self.log.log_start_offset, state)
        idem.applied_index = max(idem.applied_index, snapshot.meta.index)
        self._advance_hw(_floor_hw(self.log))

    def on_log_truncated(self, from_index: int) -> None:
        self.idempotence.truncated(from_index)

    def apply(self, entries: tuple[Entry, ...]) -> None:
        """A partition's state is its high watermark, its producer state (idempotence) and
        its log start: committed entries move all three."""
        last = entries[-1].index
        idem = self.idempotence
        log_start: int | None = None
        for e in entries:
            idem.apply_committed(e.data)
            s = decode_log_start(e.data)
            if s is not None:
                log_start = s if log_start is None else max(log_start, s)
        idem.applied_index = last
        idem.committed(last)
        end = self.log.end_offset_at_index(last)
        if end is not None:
            self._advance_hw(end)
        if log_start is not None:
            self._apply_log_start(log_start)

    def _apply_log_start(self, offset: int) -> None:
        """Every replica: the group's log start is ``offset`` now (the leader chose it below
        its high watermark, and the control batch carrying it is committed after it, so
        every entry below it is committed here too)."""
        before = self.log.log_start_offset
        if offset <= before:
            return  # an old start replayed after a restart, or a snapshot brought a later one
        deleted = self.log.advance_start(offset)
        log.info(
            "%s/%d: log start %d -> %d (the leader's), %d local segment(s) deleted",
            self.topic, self.index, before, offset, deleted,
        )  # fmt: skip
        self.notify()

    def enforce_retention(self, now_ms: int | None = None) -> int | None:
        """The serving leader only: if ``retention.ms`` / ``retention.bytes`` allow a later
        log start (never above the high watermark: what Raft has not committed stays),
        propose it as a log-start control batch and return it; None otherwise (a follower
        never decides, nor deletes on its own clock). Every replica deletes when the batch
        is applied. A refused proposal is retried at the next pass."""
        if self._closed_error is not None or not self.serving:
            return None
        point = self.log.retention_point(now_ms, below=self._hw)
        if point is None or point <= max(self.log.log_start_offset, self._log_start_proposed):
            return None
        buf = log_start_batch(point)
        try:
            self.propose_batches([BatchSpan(buf, 0, len(buf), 1)])
        except TidelogError as exc:
            log.info("%s/%d: log start %d not proposed: %s", self.topic, self.index, point, exc)
            return None
        self._log_start_proposed = point
        return point

    def on_storage_failure(self, group: RaftGroup, exc: BaseException) -> None:
        self.fail_storage(exc)

    def _advance_hw(self, offset: int) -> None:
        if offset <= self._hw:
            return
        self._hw = offset
        self.notify()

    # -- reads ---------------------------------------------------------------------------

    def check_fetch_offset(self, offset: int) -> None:
        start, hw = self.log.log_start_offset, self._hw
        if not start <= offset <= hw:
            raise OffsetOutOfRange(
                f"{self.topic}/{self.index}: offset {offset} is outside the log, "
                f"valid offsets are {start}..{hw} (log start offset..high watermark)",
                log_start_offset=str(start),
                high_watermark=str(hw),
            )

    def read(self, offset: int, max_bytes: int) -> bytes:
        """Whole committed batches from the one holding ``offset``; at least one batch."""
        self.check_open()
        self.check_fetch_offset(offset)
        return self.log.read(offset, max_bytes, upto=self._hw)

    def offset_for_timestamp(self, timestamp_ms: int) -> tuple[int, int]:
        """(offset, timestamp) of the first committed batch with a record at or after
        ``timestamp_ms``; (high watermark, -1) when there is none."""
        self.check_open()
        found = self.log.offset_for_timestamp(timestamp_ms)
        if found is None or found[0] >= self._hw:
            return self._hw, -1
        return found

    # -- configuration and lifecycle -----------------------------------------------------

    def update_config(self, config: TopicConfig) -> None:
        if self._closed_error is not None:
            return
        self.log.update_config(config)
        self.config = config
        self.idempotence.update_config(config)
        if self.group is not None and self._raft is not None:
            self._raft.set_durable(self.group, config.flush != "os")

    def fail(self, error: TidelogError) -> None:
        """Stop serving: every waiter and stream gets ``error`` (topic deleted, node stopping,
        disk failure). Idempotent; the first error wins."""
        if self._closed_error is not None:
            return
        self._closed_error = error
        self.fail_waiters(error)

    def end_streams(self, error: TidelogError) -> None:
        """End fetch streams (they get ``error``) but keep accepting and committing appends:
        the first step of a drain, so produce requests still in flight can finish."""
        if self._stream_error is None:
            self._stream_error = error
            self.notify()

    def close_for_shutdown(self) -> None:
        self.fail(NodeUnavailable(f"{self.topic}/{self.index}: the node is shutting down"))

    def close_for_delete(self) -> None:
        self.fail(UnknownTopic(f"topic {self.topic!r} was deleted"))

    def close_for_move(self) -> None:
        """This node no longer holds a replica (a reassignment moved it away)."""
        self.fail(
            NotLeader(f"{self.topic}/{self.index}: this node no longer holds a replica; retry")
        )

    def fail_storage(self, exc: BaseException) -> None:
        log.error(
            "%s/%d: storage failure, partition taken offline: %s", self.topic, self.index, exc
        )
        self.fail(StorageError(f"{self.topic}/{self.index}: storage failure: {exc}"))

    @property
    def closed(self) -> bool:
        return self._closed_error is not None


__all__ = ["AddressOf", "LogLike", "Partition"]
