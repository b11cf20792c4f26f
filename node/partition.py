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

A replica of a compacted topic (``cleanup.policy`` with ``compact``) also keeps its table
(:attr:`Partition.table`, node/table.py): the latest value per key, which every replica
applies from the same committed entries in :meth:`Partition.apply`, prunes below a new log
start, clears when a snapshot replaces the log and rebuilds when applied records were
overwritten; retention (``delete``) does not apply to a topic that is only ``compact``.

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
import time
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
from tidelog.node.catchup import IDEMPOTENCE_PART
from tidelog.node.idempotence import PartitionIdempotence
from tidelog.node.membership import ConfChanged, MembershipDriver
from tidelog.node.raft.errors import NotRaftLeader as RaftNotLeader
from tidelog.node.raft.errors import ProposalDropped
from tidelog.node.raft.progress import ProgressState
from tidelog.node.raft.types import NONE, ConfState, Entry, Role, Snapshot, SoftState
from tidelog.node.replica_storage import NOOP_SIZE, decode_snapshot
from tidelog.node.stm import BatchSpan, LostHow, StateMachine, UnappliableEntry
from tidelog.node.table import PartitionTable
from tidelog.node.trace import ProduceSpan
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

    def read(
        self, offset: int, max_bytes: int, *, upto: int | None = None, stored: bool = False
    ) -> bytes: ...
    def offset_for_timestamp(self, timestamp_ms: int) -> tuple[int, int] | None: ...
    def term_at_index(self, raft_index: int) -> int | None: ...
    def end_offset_at_index(self, raft_index: int) -> int | None: ...
    def entries_by_index(self, lo: int, hi: int, max_bytes: int) -> list[bytes]: ...
    def bytes_after_index(self, raft_index: int) -> int: ...
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
#: Sampled requests a partition follows at most (more means they stopped committing).
_TRACED_MAX = 1024


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
        "_membership",
        "_stream_error",
        "_traced",
        "config",
        "elections_started",
        "elections_won",
        "group_id",
        "idempotence",
        "index",
        "log",
        "on_conf_changed",
        "replicas",
        "table",
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
        table: PartitionTable | None = None,
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
        #: The latest value per key (node/table.py), on every replica of a compacted topic
        #: (``cleanup.policy`` with ``compact``); None otherwise.
        self.table: PartitionTable | None = table
        # Sampled produce requests waiting here, by the Raft index of their last entry.
        self._traced: dict[int, ProduceSpan] = {}
        # Replica moves (node/membership.py).
        self._membership = MembershipDriver(f"{topic}/{index}")
        #: Told every committed configuration of the group (set by the node; see
        #: :meth:`set_target_replicas`).
        self.on_conf_changed: ConfChanged | None = None

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
        if self.table is not None:
            self.table.recover(self.log, self._hw)
        group.conf_listener = self._conf_committed
        # The guard admits the replicas the controller named, and (below) every target and
        # every configuration seen since: a lagging replica must hear the current leader.
        group.allowed_peers = frozenset(self.replicas) | group.raw.conf_state.members

    def set_table(self, table: PartitionTable | None) -> None:
        """``cleanup.policy`` changed: ``table`` (a new one, built here from the committed
        log) replaces the current one, which is dropped; None drops it."""
        old, self.table = self.table, table
        if old is not None:
            old.drop()
        if table is not None:
            table.recover(self.log, self._hw)

    # -- replica moves (node/membership.py) --------------------------------------------------

    def set_target_replicas(self, target: frozenset[int] | None) -> None:
        """The replica set this partition should end with (the controller's
        ``PartitionAssignment.target``; None: no move). On the leader the group's Raft
        configuration is driven there one safe change at a time (learners added, caught up,
        promoted, then the others removed; leadership handed over first if this node leaves);
        a follower only remembers it, for when it leads."""
        self._membership.set_target(None if target is None else frozenset(target))
        if target is not None and self.group is not None:
            self.group.allowed_peers |= frozenset(target)
        self._drive_membership()

    @property
    def target_replicas(self) -> frozenset[int] | None:
        return self._membership.target

    @property
    def conf_state(self) -> ConfState:
        """The group's configuration in force on this replica (a committed one)."""
        if self.group is None:
            return ConfState(voters=frozenset(self.replicas))
        return self.group.raw.conf_state

    def move_progress(
        self, streamed: Callable[[int], int] = lambda _node: 0
    ) -> dict[int, tuple[int, int]]:
        """On the leader, for each learner: (bytes of the leader's log it holds, bytes it
        still lacks); {} elsewhere or when no learner is catching up. A learner copying a
        streamed snapshot (node/catchup.py) holds what ``streamed(node)`` says was sent."""
        group = self.group
        if group is None or group.raw.role != Role.LEADER:
            return {}
        raw = group.raw
        lg = self.log
        size = lg.size_bytes
        out: dict[int, tuple[int, int]] = {}
        for node in sorted(raw.conf_state.learners):
            pr = raw.progress(node)
            match = pr.match if pr is not None else 0
            left = lg.bytes_after_index(match)
            if pr is not None and pr.state == ProgressState.SNAPSHOT:
                copied = min(size, streamed(node))
                out[node] = (copied, size - copied)
            else:
                out[node] = (size - left, left)
        return out

    def move_entries_left(self) -> int:
        """On the leader: the log entries its learners still lack, summed (0 elsewhere)."""
        group = self.group
        if group is None or group.raw.role != Role.LEADER:
            return 0
        raw = group.raw
        last = raw.last_index()
        left = 0
        for node in raw.conf_state.learners:
            pr = raw.progress(node)
            left += max(0, last - (pr.match if pr is not None else 0))
        return left

    def _conf_committed(self, group: RaftGroup, conf: ConfState) -> None:
        group.allowed_peers |= conf.members
        log.info(
            "%s/%d: configuration in force: voters %s, learners %s",
            self.topic, self.index, sorted(conf.voters), sorted(conf.learners),
        )  # fmt: skip
        callback = self.on_conf_changed
        if callback is not None:
            try:
                callback(self.topic, self.index, conf.voters, conf.learners)
            except Exception:
                log.exception("%s/%d: on_conf_changed failed", self.topic, self.index)
        self._drive_membership()

    def _drive_membership(self) -> None:
        group, raft = self.group, self._raft
        if group is None or raft is None or self._closed_error is not None:
            return
        self._membership.ensure_running(group, raft)

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
        for node in sorted(raw.conf_state.voters):
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
        for node in sorted(raw.conf_state.members):
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

    @property
    def follower_readable(self) -> bool:
        """A follower that heard from its leader within an election timeout and holds every
        entry it acknowledged: its high watermark is committed data, maybe behind the
        leader's (follower fetching, ``FetchRequest.allow_follower``)."""
        group = self.group
        if group is None or self.role != Role.FOLLOWER:
            return False
        raw = group.raw
        return (
            raw.leader_id != NONE
            and raw.election_elapsed < raw.cfg.election_timeout_ticks
            and not raw.recovering
        )

    def check_reading(self, allow_follower: bool) -> None:
        """For fetch streams: the serving leader, or (``allow_follower``) a readable follower."""
        if not allow_follower or self.serving:
            self.check_streaming()
            return
        if self._closed_error is not None:
            raise self._closed_error
        if self._stream_error is not None:
            raise self._stream_error
        if not self.follower_readable:
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

    # -- tracing (node/trace.py) ---------------------------------------------------------

    def trace(self, span: ProduceSpan) -> None:
        """Follow a sampled request's last entry through store, commit and apply."""
        if len(self._traced) >= _TRACED_MAX:
            self._traced.clear()  # entries that never committed (a lost leadership)
        self._traced[span.index] = span

    def _trace_mark(self, step: str, upto: int) -> None:
        now = time.monotonic_ns()
        done = []
        for index, span in self._traced.items():
            if index > upto:
                continue
            if step == "stored":
                span.stored = span.stored or now
            elif step == "committed":
                span.committed = span.committed or now
            else:
                span.applied = now
                done.append(index)
        for index in done:
            del self._traced[index]

    def on_persisted(self, group: RaftGroup, last_index: int) -> None:
        if self._traced:
            self._trace_mark("stored", last_index)
        super().on_persisted(group, last_index)

    def on_committed(self, group: RaftGroup, entries: tuple[Entry, ...]) -> None:
        traced = bool(self._traced)
        if traced:
            self._trace_mark("committed", entries[-1].index)
        super().on_committed(group, entries)
        if traced:
            self._trace_mark("applied", entries[-1].index)

    def on_role_change(self, soft: SoftState, was_leader: bool) -> None:
        term = self.term
        self._log_start_proposed = 0
        if soft.role == Role.LEADER:
            if not was_leader:
                self.idempotence.leadership_lost()  # proposals in flight are an old term's
                self.elections_won += 1
                log.info("%s/%d: this node leads, term %d", self.topic, self.index, term)
                self._drive_membership()
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
        streamed = False
        try:
            data = decode_snapshot(snapshot.data)
            state = data.state
            if data.stream is not None and self.group is not None:
                # A streamed snapshot (node/catchup.py): its state came as a copied part.
                streamed = True
                state = self.group.storage.installed_parts.get(IDEMPOTENCE_PART)
        except StorageError:
            state = None  # install_snapshot already refused bytes that are not ours
        idem.snapshot_installed(self.log.log_start_offset, state)
        idem.applied_index = max(idem.applied_index, snapshot.meta.index)
        self._advance_hw(_floor_hw(self.log))
        if streamed:
            # The copied records up to the snapshot's index are committed.
            end = self.log.end_offset_at_index(snapshot.meta.index)
            if end is not None:
                self._advance_hw(end)
        if self.table is not None:
            # The log holds nothing below the snapshot now: the table continues from there
            # (what the leader's table held below its log start it pruned too).
            lg = self.log
            self.table.clear(min(lg.log_start_offset, lg.log_end_offset))
            self.table.replay(lg, self._hw)

    def on_log_truncated(self, from_index: int) -> None:
        self.idempotence.truncated(from_index)
        table = self.table
        if table is not None:
            kept = self.log.end_offset_at_index(from_index - 1)
            if kept is not None and table.applied_offset > kept:
                # Only entries this replica lost (flush=os) can be committed and overwritten.
                table.rebuild(self.log, min(kept, self._hw), "applied records were overwritten")

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
        if self.table is not None:
            self.table.apply_entries([e.data for e in entries])
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
        if self.table is not None:
            self.table.prune_below(offset)
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
        if not self.config.retention_deletes:
            return None  # cleanup.policy=compact: no retention
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

    def check_fetch_offset(self, offset: int, *, follower: bool = False) -> None:
        """OffsetOutOfRange outside [log start, high watermark]; a follower read may also
        ask above its high watermark, which may trail the leader's (the stream waits)."""
        start, hw = self.log.log_start_offset, self._hw
        if not start <= offset <= hw and not (follower and offset > hw):
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
        self._membership.stop()
        self.fail_waiters(error)
        if self.table is not None:
            self.table.close()

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
