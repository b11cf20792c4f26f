"""MultiRaft: one asyncio loop drives every Raft group of the node.

A node hosts thousands of groups (one per partition replica, plus the controller's group 0).
Driving each with its own tasks, timers and fsyncs would cost more than the data; instead:

* One **tick task** ticks every group every ``tick_ms`` (50 ms). Heartbeat interval and
  election timeout are converted to ticks; the election timeout is randomized over
  ``[T, 1.5T)`` (``Config.election_timeout_span_ticks``), which keeps failover near
  1.25 T on average. After a pause (SIGSTOP, a stalled machine) the task does not replay the
  missed ticks: a burst of ticks would make every follower campaign at once.
* One **ready loop** runs rounds. A round takes the Ready of every group that has one and
  processes them together, in the order of the Ready contract (``raft/types.py``):

  1. install snapshots; append the entries of every group to its log (truncating a
     conflicting suffix first); collect the changed hard states;
  2. make it durable at once: fsync every dirty log in worker threads (one job per group
     while there are few), concurrently, AND write every changed hard state in ONE RocksDB
     write batch (synced when a term or vote changed). This is the group commit across
     partitions: one round's fsyncs cover every request that arrived while the previous
     round ran. (The hand-off to a thread and back costs more than a small fsync on a
     loaded 2-core machine, 0.8-1.3 ms against 0.5-0.8 ms; fsyncing on the loop instead
     would save it but let one stalled disk freeze every group's heartbeats and timeouts,
     docs/latency.md);
  3. send each group's messages as soon as what they vouch for is durable: a leader's
     appends and heartbeats at once (a leader may write its log in parallel with
     replicating it, Raft thesis 10.2.1; it counts its own copy only once advanced), a
     follower's answers after its own fsync, anything after a term or vote change after the
     hard-state write;
  4. for each group, once its own writes are durable: apply its committed entries (through
     its handler), then ``advance``. A group never waits for another group's fsync.
     Committed entries that are all older than the Ready's new entries (earlier rounds of
     the group stored and fsynced them) are applied at once, in step 3, without waiting for
     the fsync of the new ones: under load a leader's followers answer while it fsyncs the
     next proposals, and those commits (the producers' answers) need not wait a round.

  Proposals, messages and ticks that arrive while a round waits for its fsyncs are picked up
  by the next round, so the busier the node, the more each fsync covers. The next round
  normally starts when the previous one ends; if one is still waiting after half a heartbeat
  interval (a stalled disk), the next starts beside it for the other groups, so one slow
  partition never silences the heartbeats, votes and commits of the rest of the node.

**Quiescence** (CockroachDB's quiesced ranges; on in the node, off by default here): a leader
whose group has nothing left to do (every member holds and has committed the whole log, no
read, transfer or change pending: ``RawNode.quiescable``) for two heartbeat intervals sends one
last heartbeat round marked ``QUIESCE_CONTEXT`` and stops ticking the group; a follower that
gets it while holding exactly the leader's log stops ticking too. A quiet group costs nothing
per tick and sends nothing. Any other message of the group, a proposal, a read or a campaign
wakes it. Liveness no longer comes from the group's heartbeats: the node wakes the quiet groups
a node leads when the controller marks that node dead or this node's stream to it breaks
(``wake_led_by``), and a quiet follower wakes by itself after ``quiet_max_ticks`` (30 election
timeouts) of silence, in case both signals were missed; woken followers elect one election
timeout later as usual. The controller's group 0 is never quiet.

Topics with ``flush=os`` skip step 2's fsync of their log (their hard state is still
written): an entry is then acknowledged, by a follower or to a producer, once it is in the
page cache. That survives the death of the process but not of the machine; a machine crash
can lose acknowledged records of such topics (as Kafka's default, which never fsyncs).

A group whose log fails to write or fsync is taken offline (its handler hears of it): it is
never advanced again, so nothing it failed to store is acknowledged.

Every message from a peer passes ``raft/guard.py`` before its group's core sees it: a sender
outside the group's configuration, a term far beyond the group's own, an APPEND or SNAPSHOT
not from the group's leader are dropped and counted (``tidelog_raft_messages_refused``). A
hard state that cannot be stored (a value out of the store's range, which the codec's bounds
already exclude) takes only its own group offline, never the others of the round.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, Final, Protocol

from tidelog.node import limits
from tidelog.node.metrics import NodeMetrics
from tidelog.node.raft.core import NEW_REPLICA, QUIESCE_CONTEXT, RawNode
from tidelog.node.raft.guard import MAX_TERM_GAP, refusal
from tidelog.node.raft.limits import Config
from tidelog.node.raft.types import (
    ConfState,
    Entry,
    HardState,
    Message,
    MessageKind,
    Ready,
    Role,
    Snapshot,
    SoftState,
)
from tidelog.node.raft_codec import decode_conf_change_batch
from tidelog.node.replica_storage import (
    LOSS_UNKNOWN,
    HardStateStore,
    RaftLogFile,
    ReplicaStorage,
)
from tidelog.node.trace import Tracer

log = logging.getLogger(__name__)

#: The controller's group (controller/state.py): never quiet, node liveness rests on it.
CONTROLLER_GROUP: Final = 0
#: How often (in ticks) quiet groups are looked at.
_QUIET_CHECK_TICKS: Final = 20
#: A partition follower's hard state whose only change is its commit index is stored at
#: most this often (with the next write that must go at once, or on its own after this
#: long), not by every round: a commit index is relearned from the leader, so a stored one
#: may lag. A leader stores its commit every round (see ``_round``).
COMMIT_STORE_INTERVAL_S: Final = 0.1

#: Messages kept for groups this node does not host yet (a topic whose creation the node
#: has not applied while the preferred leader already campaigns), and how long.
early_messages_max: Final = 10_000
early_message_ttl_ms: Final = 5_000
#: Payload bytes (entries, snapshots) those early messages may hold together; beyond it the
#: oldest group's are dropped, as beyond the count (whatever group ids a peer invents).
early_bytes_max: Final = 16 * 1024 * 1024
#: Per early message, on top of its payload (the message object itself).
_EARLY_OVERHEAD_BYTES: Final = 200
#: What a stored hard state can hold (``replica_storage.HardStateStore``; int64 elsewhere).
_TERM_MAX: Final = 2**63 - 1
_VOTE_MAX: Final = 2**31 - 1
#: Ticks a tick task may fall behind before it skips ahead instead of catching up.
tick_lag_max: Final = 2
#: Rounds running at once: one normally; more only while earlier ones wait on slow fsyncs
#: (each round holds other groups than the running ones, so this bounds stalled groups' cost).
rounds_in_flight_max: Final = 8
#: fsync jobs one round hands to the pool at most (one per group below it, so a stalled disk
#: holds up only its own group; groups share jobs beyond it).
fsync_jobs_per_round_max: Final = 64


@dataclass(frozen=True, slots=True)
class RaftTiming:
    """Raft timing in wall-clock units; ``config`` turns it into ticks."""

    tick_ms: int = 50
    heartbeat_interval_ms: int = 100
    election_timeout_ms: int = 1000

    def __post_init__(self) -> None:
        if self.tick_ms < 1:
            raise ValueError(f"tick_ms must be >= 1, got {self.tick_ms}")
        if self.heartbeat_interval_ms < self.tick_ms:
            raise ValueError(
                f"the heartbeat interval ({self.heartbeat_interval_ms} ms) must be at least "
                f"one tick ({self.tick_ms} ms)"
            )
        if self.election_timeout_ms < 2 * self.heartbeat_interval_ms:
            raise ValueError(
                f"the election timeout ({self.election_timeout_ms} ms) must be at least twice "
                f"the heartbeat interval ({self.heartbeat_interval_ms} ms), or followers "
                "campaign against a healthy leader"
            )

    def config(self, base: Config | None = None) -> Config:
        election = max(2, round(self.election_timeout_ms / self.tick_ms))
        heartbeat = max(1, round(self.heartbeat_interval_ms / self.tick_ms))
        heartbeat = min(heartbeat, election - 1)
        return replace(
            base or Config(),
            election_timeout_ticks=election,
            election_timeout_span_ticks=max(1, election // 2),
            heartbeat_interval_ticks=heartbeat,
        )


class Sender(Protocol):
    """Where messages for other nodes go (``node/transport.RaftTransport``)."""

    def send(self, to_node: int, group: int, msg: Message) -> None: ...


class GroupHandler(Protocol):
    """What a group's owner (a partition replica, the controller) hears from the driver.
    Every call happens on the event loop, inside a round, in the order listed."""

    def on_soft_state(self, group: RaftGroup, soft: SoftState) -> None:
        """The leader or the role changed (before this round's entries are stored)."""

    def on_snapshot(self, group: RaftGroup, snapshot: Snapshot) -> None:
        """The log was replaced by a snapshot (it now starts after ``snapshot.meta``)."""

    def on_truncated(self, group: RaftGroup, from_index: int) -> None:
        """Entries from ``from_index`` on were removed (a new leader overwrote them)."""

    def on_persisted(self, group: RaftGroup, last_index: int) -> None:
        """Entries up to ``last_index`` are stored (and fsynced unless flush=os)."""

    def on_committed(self, group: RaftGroup, entries: tuple[Entry, ...]) -> None:
        """``entries`` are committed, in order, contiguous with the previous call."""

    def on_storage_failure(self, group: RaftGroup, exc: BaseException) -> None:
        """The group's log failed; the group is offline from now on."""


class RaftGroup:
    """One group on this node: its core, its storage, its owner."""

    __slots__ = (
        "allowed_peers",
        "conf_listener",
        "durable",
        "failed",
        "group_id",
        "handler",
        "idle_ticks",
        "logged_conf",
        "quiet",
        "quiet_ticks",
        "raw",
        "reads",
        "removed",
        "storage",
        "trace_append_ns",
        "trace_round_ns",
    )

    def __init__(
        self,
        group_id: int,
        raw: RawNode,
        storage: ReplicaStorage,
        handler: GroupHandler,
        durable: bool,
    ) -> None:
        self.group_id = group_id
        self.raw = raw
        self.storage = storage
        self.handler = handler
        #: fsync the log in each round (flush=durable); False for flush=os.
        self.durable = durable
        self.removed = False
        self.failed = False
        #: ReadIndex requests pending in the core, by context: the confirmed read index,
        #: or -1 when the read was dropped (leadership lost, group gone).
        self.reads: dict[bytes, asyncio.Future[int]] = {}
        #: Quiescence (MultiRaft docstring): not ticked while quiet; ticks the leader found
        #: nothing to do, and ticks a follower has been quiet (counted by the slow check).
        self.quiet = False
        self.idle_ticks = 0
        self.quiet_ticks = 0
        #: A sampled APPEND's arrival and its round's start (node/trace.py), 0 when none.
        self.trace_append_ns = 0
        self.trace_round_ns = 0
        #: Membership changes through the log (partitions): the configuration in force is
        #: stored with the hard state (``HardStateStore.load_conf``). False: the owner
        #: passes the configuration at each start (the controller group).
        self.logged_conf = False
        #: Told the configuration in force each time it changed, once it is stored.
        self.conf_listener: Callable[[RaftGroup, ConfState], None] | None = None
        #: Senders the guard admits besides the members of the configuration in force (a
        #: logged group's replica may not know the current leader yet: raft/guard.py).
        self.allowed_peers: frozenset[int] = frozenset()

    def drop_reads(self) -> None:
        reads, self.reads = self.reads, {}
        for fut in reads.values():
            if not fut.done():
                fut.set_result(-1)

    @property
    def log(self) -> RaftLogFile:
        return self.storage.log

    @property
    def is_leader(self) -> bool:
        return self.raw.role == Role.LEADER

    def __repr__(self) -> str:
        return f"RaftGroup({self.group_id}, {self.raw!r})"


def _fsync_chunk(groups: list[RaftGroup]) -> list[tuple[RaftGroup, float, BaseException | None]]:
    """Runs in a worker thread: fsync each group's log once, timing each."""
    out: list[tuple[RaftGroup, float, BaseException | None]] = []
    for g in groups:
        t0 = time.perf_counter()
        try:
            g.storage.log.flush()
        except Exception as error:
            out.append((g, time.perf_counter() - t0, error))
        else:
            out.append((g, time.perf_counter() - t0, None))
    return out


class MultiRaft:
    """The node's Raft driver; see the module docstring."""

    def __init__(
        self,
        node_id: int,
        hard_states: HardStateStore,
        metrics: NodeMetrics,
        timing: RaftTiming | None = None,
        *,
        sender: Sender | None = None,
        threads: int = limits.flush_threads,
        rng: random.Random | None = None,
        executor: Executor | None = None,
        clock: Callable[[], float] = time.monotonic,
        max_term_gap: int = MAX_TERM_GAP,
        commit_store_interval_s: float = COMMIT_STORE_INTERVAL_S,
    ) -> None:
        """``executor`` runs the round's fsyncs and hard-state write (default: a pool of
        ``threads`` threads); ``clock`` is the monotonic clock of the early-message cache.
        Both are seams for the node simulation (tests/sim/node)."""
        self.node_id = node_id
        self.max_term_gap = max_term_gap
        self.timing = timing or RaftTiming()
        self._hard_states = hard_states
        self._metrics = metrics
        self._sender = sender
        self._rng = rng or random.Random()
        self._threads = threads
        self._pool: Executor = executor or ThreadPoolExecutor(
            threads, thread_name_prefix="tidelog-fsync"
        )
        # Hard states go through one thread of their own: written in round order (a later
        # round's state never lands before an earlier one's), and never queued behind the
        # rounds' fsyncs.
        self._hs_pool: Executor = executor or ThreadPoolExecutor(
            1, thread_name_prefix="tidelog-hardstate"
        )
        #: The latest hard-state write: the next one starts after it (whatever the executor).
        self._hs_tail: asyncio.Future[Any] | None = None
        #: Commit-only hard states waiting to be stored (COMMIT_STORE_INTERVAL_S; 0: none wait).
        self._commit_store_s = commit_store_interval_s
        self._deferred_hs: dict[int, HardState] = {}
        self._deferred_timer: asyncio.TimerHandle | None = None
        self._clock = clock
        self.groups: dict[int, RaftGroup] = {}
        # Insertion-ordered set of groups that may have a Ready.
        self._dirty: dict[RaftGroup, None] = {}
        self._wake = asyncio.Event()
        # Rounds running (one normally; more while a slow one waits, see _ready_loop), the
        # groups whose Ready one of them holds, and an event set when a group leaves one.
        self._rounds: set[asyncio.Task[None]] = set()
        self._in_round: set[RaftGroup] = set()
        self._left_round = asyncio.Event()
        self._round_overlap_s = (
            max(self.timing.tick_ms, self.timing.heartbeat_interval_ms // 2) / 1000
        )
        self._tick_task: asyncio.Task[None] | None = None
        self._ready_task: asyncio.Task[None] | None = None
        self._stopping = False
        self._early: dict[int, list[tuple[float, int, Message]]] = {}
        self._early_count = 0
        self._early_bytes = 0
        self.rounds = 0
        self._read_seq = 0
        #: Sees every SNAPSHOT from a group's leader before its core does: False holds it
        #: back (``node/catchup.py`` copies a streamed snapshot's data first, then delivers
        #: the message again, and lets it through once the copy is complete).
        self.snapshot_gate: Callable[[RaftGroup, Message], bool] | None = None
        #: The data directory is new, and may be a wiped one: every group started empty on
        #: it may have existed before, so it joins as NEW_REPLICA (no vote for a candidate
        #: with entries until caught up; see raft/core.py).
        self.new_directory = False
        #: The machine restarted since this data directory was last used (the owner compares
        #: boot ids: ``identity.machine_restarted``): the page cache is gone, so every flush=os
        #: group may have lost acknowledged entries, and so may the unsynced hard states that
        #: recorded them. Each such group opened in this run recovers before it votes again
        #: (``replica_storage.LOSS_UNKNOWN``).
        self.machine_restarted = False
        #: Samples follower APPENDs when set (``--trace-sample``; node/trace.py).
        self.tracer: Tracer | None = None
        #: Quiescence (module docstring): off unless the node turns it on (it also tells the
        #: driver when a peer is gone: ``wake_led_by``).
        self.quiesce = False
        self._active: dict[RaftGroup, None] = {}
        self._quiet: dict[RaftGroup, None] = {}
        timing = self.timing
        hb_ticks = max(1, timing.heartbeat_interval_ms // timing.tick_ms)
        #: A leader quiets its group after this many ticks with nothing to do.
        self.quiesce_after_ticks = 2 * hb_ticks
        #: A quiet follower that heard nothing for this long wakes and ticks again (in case
        #: its leader died unnoticed; it then campaigns one election timeout later).
        self.quiet_max_ticks = max(20, 30 * timing.election_timeout_ms // timing.tick_ms)
        self._tick_count = 0

    # ---- groups ----------------------------------------------------------------------------

    def set_sender(self, sender: Sender) -> None:
        self._sender = sender

    def add_group(
        self,
        group_id: int,
        partition_log: RaftLogFile,
        conf: ConfState,
        handler: GroupHandler,
        *,
        durable: bool,
        config: Config,
        applied: int | None = None,
        logged_conf: bool = False,
        bootstrap: bool = True,
    ) -> RaftGroup:
        """Start driving a group over ``partition_log`` (opened, recovered). ``applied``: the
        last index the owner has applied (default: the stored commit index, for owners whose
        state is derived from the log itself, like a partition's high watermark).
        ``logged_conf``: the group's membership changes through CONFIG entries (partitions):
        ``conf`` is only its initial configuration, the stored one wins once there is one.
        ``bootstrap``: on a new data directory, whether the group may be brand new (its new
        replicas may then elect one of their own); False when the owner knows it existed
        before the directory did (``RawNode(bootstrap=...)``)."""
        if group_id in self.groups:
            raise ValueError(f"raft group {group_id} is already running on this node")
        hs = self._hard_states.load(group_id)
        conf_index: int | None = None
        if logged_conf:
            stored_conf = self._hard_states.load_conf(group_id)
            if stored_conf is not None:
                conf_index, conf = stored_conf
        storage = ReplicaStorage(partition_log, hs, conf, conf_index=conf_index)
        if applied is None:
            applied = storage.hard_state().commit
        lost_to = storage.lost_to
        if lost_to == NEW_REPLICA and self._hard_states.formed(group_id):
            # It helped form the group brand new on this directory (settle): it never lost
            # anything, whatever the marker a restart before it was cleared left stored.
            lost_to = 0
        if self.new_directory and lost_to == 0 and hs.term == 0 and storage.last_index() == 0:
            lost_to = NEW_REPLICA
            # Stored at once: a restart before it caught up must still know.
            self._hard_states.save({group_id: replace(hs, commit=NEW_REPLICA)}, sync=True)
            if bootstrap:
                # The usual case on a node's first run (every group created then): no warning.
                log.info(
                    "raft group %d: new replica on a new data directory: it votes only for "
                    "candidates with an empty log until it has caught up with a leader",
                    group_id,
                )
            else:
                log.info(
                    "raft group %d: new replica of a group that may be older than this data "
                    "directory: it does not vote until it has caught up with a leader",
                    group_id,
                )
        if self.machine_restarted and not durable and lost_to == 0 and hs.term > 0:
            storage.mark_loss_unknown()
            lost_to = storage.lost_to
            stored = storage.hard_state()
            # Stored at once: a restart before it caught up must still know.
            self._hard_states.save(
                {group_id: replace(stored, commit=LOSS_UNKNOWN + stored.commit)}, sync=True
            )
            log.warning(
                "raft group %d (flush=os): the machine restarted, acknowledged entries after "
                "index %d may be lost; this replica does not vote until a leader caught it up",
                group_id,
                storage.last_index(),
            )
        if logged_conf:
            raw = RawNode(
                self.node_id,
                storage,
                self._rng,
                config,
                applied=applied,
                lost_to=lost_to,
                conf_decoder=decode_conf_change_batch,
                bootstrap=bootstrap,
            )
        else:
            raw = RawNode(
                self.node_id,
                storage,
                self._rng,
                config,
                applied=applied,
                lost_to=lost_to,
                bootstrap=bootstrap,
            )
        group = RaftGroup(group_id, raw, storage, handler, durable)
        group.logged_conf = logged_conf
        self.groups[group_id] = group
        self._active[group] = None
        early = self._early.pop(group_id, None)
        if early:
            self._forget_early(early)
            cutoff = self._clock() - early_message_ttl_ms / 1000
            for at, _frm, msg in early:
                if at >= cutoff:
                    self._step(group, msg)
        self.touch(group)
        return group

    def read_index(self, group: RaftGroup) -> asyncio.Future[int]:
        """A linearizable read point (Raft ReadIndex): resolves to the leader's commit index
        once a quorum confirmed it still leads, or to -1 if the read was dropped (leadership
        lost first). Raises the core's NotRaftLeader / ProposalDropped at once."""
        self._read_seq += 1
        ctx = b"%d:%d" % (self.node_id, self._read_seq)  # unique also at another leader
        group.raw.read_index(ctx)
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        group.reads[ctx] = fut
        self.touch(group)
        return fut

    def campaign(self, group: RaftGroup) -> None:
        group.raw.campaign()
        self.touch(group)

    def settle(self, group: RaftGroup) -> None:
        """The owner established that ``group`` is brand new and this new replica one of its
        first members (every first voter answered that it is fresh): everything it ever
        acknowledged is on this directory, so it is an ordinary replica from now on (it votes
        for any candidate whose log is up to date), after a restart too. Without it, a first
        voter that never received an entry (cut off while the others formed the group) would
        stay a new replica after a restart and never vote for the holder of the group's log."""
        if group.raw.lost_to != NEW_REPLICA:
            return
        self._hard_states.mark_formed(group.group_id)
        group.raw.lost_to = 0
        self.touch(group)

    def formed(self, group: RaftGroup) -> bool:
        """Whether :meth:`settle` was ever called for the group on this data directory."""
        return self._hard_states.formed(group.group_id)

    def touch(self, group: RaftGroup) -> None:
        """The group may have work (a proposal, a step): include it in the next round."""
        if group.quiet:
            self._unquiet(group)
        self._dirty[group] = None
        self._wake.set()

    # ---- quiescence ------------------------------------------------------------------------

    def _unquiet(self, group: RaftGroup) -> None:
        group.quiet = False
        group.idle_ticks = group.quiet_ticks = 0
        self._quiet.pop(group, None)
        if not group.removed:
            self._active[group] = None

    def _go_quiet(self, group: RaftGroup) -> None:
        group.quiet = True
        group.quiet_ticks = 0
        self._active.pop(group, None)
        self._quiet[group] = None

    def wake_led_by(self, node_id: int) -> int:
        """Node ``node_id`` is gone (the controller marked it dead, or its stream broke):
        the quiet groups it leads tick again, so they elect another leader. Returns how many."""
        woken = [g for g in self._quiet if g.raw.leader_id == node_id]
        for group in woken:
            self._unquiet(group)
        return len(woken)

    def peer_gone(self, node_id: int) -> int:
        """Node ``node_id`` died or its stream broke: the quiet groups it leads wake to elect
        (``wake_led_by``), and so do the quiet groups this node leads that it is a member of
        (a leader that lost its majority must notice, and step down by check-quorum)."""
        woken = self.wake_led_by(node_id)
        for group in [g for g in self._quiet if g.raw.role is Role.LEADER]:
            if node_id in group.raw.conf_state.members:
                group.raw.mark_unreachable(node_id)
                self._unquiet(group)
                woken += 1
        return woken

    @property
    def quiet_groups(self) -> int:
        return len(self._quiet)

    async def remove_group(self, group_id: int, *, forget: bool) -> RaftGroup | None:
        """Stop driving a group; returns once no round uses it (its log may then be closed).
        ``forget`` also deletes its hard state (the replica is gone for good)."""
        group = self.groups.pop(group_id, None)
        if group is None:
            return None
        group.removed = True
        group.drop_reads()
        self._dirty.pop(group, None)
        self._active.pop(group, None)
        self._quiet.pop(group, None)
        while group in self._in_round:
            await self._left_round.wait()
        waiting = self._deferred_hs.pop(group_id, None)
        if forget:
            self._hard_states.delete(group_id)  # and what waited is never stored after it
        elif waiting is not None:
            # A replica closed to be reopened (a restart of it) finds its latest commit.
            await asyncio.wait({self._queue_hard_states({group_id: waiting}, False, {})})
        return group

    def set_durable(self, group: RaftGroup, durable: bool) -> None:
        group.durable = durable

    # ---- messages from peers ------------------------------------------------------------------

    def deliver(self, from_node: int, items: list[tuple[int, Message]]) -> None:
        """The transport's callback: step each message into its group."""
        groups = self.groups
        for group_id, msg in items:
            group = groups.get(group_id)
            if group is None:
                self._keep_early(group_id, from_node, msg)
                continue
            self._step(group, msg)

    def _step(self, group: RaftGroup, msg: Message) -> None:
        if group.failed or msg.to != self.node_id:
            return
        refused = refusal(group.raw, msg, self.max_term_gap, also=group.allowed_peers)
        if refused is not None:
            self._metrics.raft_refused[refused].inc()
            log.debug(
                "raft group %d refused a %s of term %d from node %d: %s",
                group.group_id, msg.kind.name, msg.term, msg.frm, refused.value,
            )  # fmt: skip
            return
        gate = self.snapshot_gate
        if gate is not None and msg.kind == MessageKind.SNAPSHOT and not gate(group, msg):
            return
        try:
            group.raw.step(msg)
        except Exception:
            log.exception(
                "raft group %d rejected a %s from %d", group.group_id, msg.kind.name, msg.frm
            )
            return
        if msg.context == QUIESCE_CONTEXT:
            if msg.kind == MessageKind.HEARTBEAT and self.quiesce:
                raw = group.raw
                if (
                    raw.role == Role.FOLLOWER
                    and raw.leader_id == msg.frm
                    and raw.last_index() == msg.commit
                    and group.group_id != CONTROLLER_GROUP
                ):
                    self._go_quiet(group)
            # The answers to a quiesce round leave the leader quiet.
        elif group.quiet:
            self._unquiet(group)
        tracer = self.tracer
        if (
            tracer is not None
            and msg.kind == MessageKind.APPEND
            and msg.entries
            and not group.trace_append_ns
            and tracer.append_sampled()
        ):
            group.trace_append_ns = time.monotonic_ns()
        self._dirty[group] = None
        self._wake.set()

    @staticmethod
    def _early_size(msg: Message) -> int:
        size = _EARLY_OVERHEAD_BYTES + len(msg.context)
        if msg.entries:
            size += msg.size_bytes
        if msg.snapshot is not None:
            size += len(msg.snapshot.data)
        return size

    def _forget_early(self, messages: list[tuple[float, int, Message]]) -> None:
        self._early_count -= len(messages)
        self._early_bytes -= sum(self._early_size(m) for _at, _frm, m in messages)

    def _keep_early(self, group_id: int, from_node: int, msg: Message) -> None:
        size = self._early_size(msg)
        if size > early_bytes_max:
            return
        while self._early and (
            self._early_count >= early_messages_max or self._early_bytes + size > early_bytes_max
        ):
            # Drop the oldest group's messages: Raft resends what matters.
            oldest = next(iter(self._early))
            self._forget_early(self._early.pop(oldest))
        self._early.setdefault(group_id, []).append((self._clock(), from_node, msg))
        self._early_count += 1
        self._early_bytes += size

    # ---- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tick_task = loop.create_task(self._tick_loop(), name="raft-tick")
        self._ready_task = loop.create_task(self._ready_loop(), name="raft-ready")

    async def stop(self) -> None:
        """Stop ticking, finish the running round and one more for what is pending, stop."""
        self._stopping = True
        if self._tick_task is not None:
            self._tick_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._tick_task
            self._tick_task = None
        self._wake.set()
        if self._ready_task is not None:
            await self._ready_task
            self._ready_task = None
        while self._rounds:
            await asyncio.wait(set(self._rounds))
        if self._deferred_timer is not None:
            self._deferred_timer.cancel()
        self._store_deferred()  # what waited is stored before the node stops
        if self._hs_tail is not None:
            await asyncio.wait({self._hs_tail})
        self._pool.shutdown(wait=True)
        if self._hs_pool is not self._pool:
            self._hs_pool.shutdown(wait=True)

    def abort(self) -> None:
        """Stop at once, as a crash would: ticks, the ready loop and every running round
        are cancelled mid-way (the node simulation's crash; production code calls stop)."""
        for task in (self._tick_task, self._ready_task, *self._rounds):
            if task is not None:
                task.cancel()
        if self._deferred_timer is not None:
            self._deferred_timer.cancel()  # what waited is lost, as in a crash
            self._deferred_timer = None
        self._deferred_hs.clear()

    async def _tick_loop(self) -> None:
        loop = asyncio.get_running_loop()
        interval = self.timing.tick_ms / 1000
        next_at = loop.time() + interval
        while True:
            await asyncio.sleep(max(0.0, next_at - loop.time()))
            now = loop.time()
            next_at += interval
            if now - next_at > tick_lag_max * interval:
                next_at = now + interval  # paused or starved: skip, never burst
            self._tick_all()

    def _tick_all(self) -> None:
        dirty = self._dirty
        quiesce = self.quiesce
        after = self.quiesce_after_ticks
        going_quiet: list[RaftGroup] = []
        for group in self._active:
            if group.failed:
                continue
            raw = group.raw
            if quiesce and group.group_id != CONTROLLER_GROUP and raw.quiescable():
                group.idle_ticks += 1
                if group.idle_ticks >= after:
                    raw.quiesce()  # one last heartbeat round, then no ticks
                    going_quiet.append(group)
                    dirty[group] = None
                    continue
            else:
                group.idle_ticks = 0
            raw.tick()
            if raw.has_ready():
                dirty[group] = None
        for group in going_quiet:
            self._go_quiet(group)
        self._tick_count += 1
        if self._quiet and self._tick_count % _QUIET_CHECK_TICKS == 0:
            self._check_quiet()
        if dirty:
            self._wake.set()

    def _check_quiet(self) -> None:
        """Now and then: a quiet follower silent for ``quiet_max_ticks`` ticks ticks again
        (its leader may have died unnoticed). A quiet leader needs no check: whatever could
        give it work (a write, a read, a member's message, a change) wakes it."""
        waking = []
        step, limit, leader = _QUIET_CHECK_TICKS, self.quiet_max_ticks, Role.LEADER
        for group in self._quiet:
            if group.raw.role is leader:
                continue
            group.quiet_ticks += step
            if group.quiet_ticks >= limit:
                waking.append(group)
        for group in waking:
            self._unquiet(group)
        self._expire_early()

    def _expire_early(self) -> None:
        if not self._early:
            return
        cutoff = self._clock() - early_message_ttl_ms / 1000
        for group_id in [g for g, msgs in self._early.items() if msgs[-1][0] < cutoff]:
            self._forget_early(self._early.pop(group_id))

    # ---- rounds ------------------------------------------------------------------------------

    async def _ready_loop(self) -> None:
        loop = asyncio.get_running_loop()
        overlap_s = self._round_overlap_s
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self._stopping and not self._dirty:
                if not self._rounds:
                    return
                await asyncio.wait(set(self._rounds))  # they may leave work for one more
                self._wake.set()
                continue
            dirty, self._dirty = self._dirty, {}
            readies: list[tuple[RaftGroup, Ready]] = []
            for group in dirty:
                if group.removed or group.failed:
                    continue
                # A group whose last Ready is still in a running round has none (the core
                # holds it back until advance); it joins a later round.
                if group.raw.has_ready():
                    readies.append((group, group.raw.ready()))
            if not readies:
                if self._stopping:
                    self._wake.set()  # finish through the check above
                continue
            task = loop.create_task(self._run_round(readies), name="raft-round")
            self._rounds.add(task)
            task.add_done_callback(self._rounds.discard)
            # Group commit: the next round normally waits for this one, so that what arrives
            # meanwhile shares its fsyncs. A round still waiting after ``overlap_s`` (one
            # partition's disk stalls) no longer holds the others back: their heartbeats, vote
            # answers and commits go on in rounds of their own.
            done, _ = await asyncio.wait({task}, timeout=overlap_s)
            while not done and len(self._rounds) >= rounds_in_flight_max:
                done, _ = await asyncio.wait(self._rounds, return_when=asyncio.FIRST_COMPLETED)
            if self._stopping:
                self._wake.set()

    async def _run_round(self, readies: list[tuple[RaftGroup, Ready]]) -> None:
        groups = {group for group, _rd in readies}
        self._in_round |= groups
        try:
            await self._round(readies, groups)
        except Exception as exc:  # never let the driver die: every produce would hang
            log.exception("raft ready round failed")
            # A group whose Ready was not advanced can never make progress again, and what
            # it holds may not be durable: take it offline rather than hang it.
            for group in groups:
                self._fail(group, exc)
        finally:
            self._leave_round(groups)

    def _leave_round(self, groups: Iterable[RaftGroup]) -> None:
        left = False
        for group in groups:
            if group in self._in_round:
                self._in_round.discard(group)
                left = True
        if left:
            event, self._left_round = self._left_round, asyncio.Event()
            event.set()

    async def _round(self, readies: list[tuple[RaftGroup, Ready]], pending: set[RaftGroup]) -> None:
        """One round (see the module docstring). ``pending`` holds the groups not advanced
        yet; each group leaves it as soon as ITS writes are durable, not when the round's
        slowest fsync ends."""
        t0 = time.perf_counter()
        if self.tracer is not None:
            round_ns = time.monotonic_ns()
            for group, _rd in readies:
                if group.trace_append_ns and not group.trace_round_ns:
                    group.trace_round_ns = round_ns
        m = self._metrics
        hard_states: dict[int, HardState] = {}
        confs: dict[int, tuple[int, ConfState]] = {}
        sync_states = False
        to_fsync: list[RaftGroup] = []
        stored: list[tuple[RaftGroup, Ready, bool]] = []
        for group, rd in readies:
            handler = group.handler
            replaced: int | None = None
            if rd.soft_state is not None:
                handler.on_soft_state(group, rd.soft_state)
                if rd.soft_state.role != Role.LEADER and group.reads:
                    group.drop_reads()  # the core dropped them with its leadership
            try:
                if rd.snapshot is not None:
                    group.storage.install_snapshot(rd.snapshot)
                    handler.on_snapshot(group, rd.snapshot)
                if rd.entries:
                    truncated = group.storage.append(rd.entries)
                    if truncated is not None:
                        handler.on_truncated(group, truncated)
                        replaced = truncated
                    if group.durable:
                        to_fsync.append(group)
            except Exception as exc:
                self._fail(group, exc)
                self._leave_round((group,))
                pending.discard(group)
                continue
            vote_changed = False
            if rd.hard_state is not None:
                hs = rd.hard_state
                if not (0 <= hs.term <= _TERM_MAX and 0 <= hs.vote <= _VOTE_MAX) or not (
                    0 <= hs.commit <= _TERM_MAX
                ):
                    # Stored in one batch with every other group's: one bad value must not
                    # fail the write of the whole round.
                    self._fail(group, ValueError(f"hard state out of range: {hs}"))
                    self._leave_round((group,))
                    pending.discard(group)
                    continue
                before = group.storage.hard_state()
                vote_changed = before.term != hs.term or before.vote != hs.vote
                if replaced is not None and hs.commit >= replaced:
                    # The hard state and the log are separate files, written in parallel:
                    # a commit covering entries that replaced a stored suffix, stored before
                    # their fsync, would after a power loss cover the old suffix, and the
                    # restarted replica would serve it as committed. Store only the commit
                    # below the replaced entries (a lower stored commit is relearned from
                    # the leader; a commit beyond the log's end, when appended entries are
                    # lost, makes the replica a recovering one: both are safe).
                    hs = replace(hs, commit=max(before.commit, replaced - 1))
                if group.storage.loss_unknown:
                    # Recovering an unknown loss: the mark stays the evidence until caught up.
                    if group.raw.lost_to:
                        hs = replace(hs, commit=LOSS_UNKNOWN + hs.commit)
                    else:
                        group.storage.loss_unknown = False
                elif (stored_lost_to := group.raw.stored_lost_to) > hs.commit:
                    # Recovering lost entries: the stored commit stays the evidence of them
                    # (a new replica that has not caught up: the NEW_REPLICA marker).
                    hs = replace(hs, commit=stored_lost_to)
                group.storage.set_hard_state(rd.hard_state)
                conf_changed = rd.conf_state is not None and group.logged_conf
                # Stored and synced now when it holds a term or vote (Raft's persistent
                # state), a snapshot's commit, a configuration, or the evidence of lost
                # entries (an adjusted commit, a recovering replica). A commit-only change
                # is not synced, even in a round with entries (``rd.must_sync``): the entries
                # are durable through their log's own fsync and a lost commit index is
                # relearned from the leader. A partition follower's waits; a leader's goes now
                # (a leader restarted with entries beyond its stored commit appends an EMPTY
                # entry to commit them, and that takes an offset: a lone replica killed and
                # restarted would show a gap), and so does the controller's.
                must_store = (
                    vote_changed
                    or rd.snapshot is not None
                    or hs is not rd.hard_state
                    or conf_changed
                    or bool(group.raw.lost_to)
                )
                gid = group.group_id
                if (
                    must_store
                    or gid == CONTROLLER_GROUP
                    or group.raw.role == Role.LEADER
                    or self._commit_store_s <= 0
                ):
                    hard_states[gid] = hs
                    self._deferred_hs.pop(gid, None)
                    sync_states = sync_states or must_store
                else:
                    self._deferred_hs[gid] = hs
                if conf_changed and rd.conf_state is not None:
                    # The core hands a new configuration out with the hard state it goes
                    # with: both in the same write.
                    confs[gid] = (rd.conf_index, rd.conf_state)
                    group.storage.set_conf_state(rd.conf_state, rd.conf_index)
            stored.append((group, rd, vote_changed))

        loop = asyncio.get_running_loop()
        hs_fut: asyncio.Future[Any] | None = None
        if hard_states:
            # The commits waiting go with it (a later state of a group replaced its own).
            states = {**self._deferred_hs, **hard_states}
            self._deferred_hs.clear()
            hs_fut = self._queue_hard_states(states, sync_states, confs)
        elif self._deferred_hs and self._deferred_timer is None:
            self._deferred_timer = loop.call_later(self._commit_store_s, self._store_deferred)
        # One fsync job per group while there are few, so that one stalled disk holds up
        # only its own group; chunks of several beyond that, to bound the jobs per round.
        fsync_of: dict[RaftGroup, asyncio.Future[Any]] = {}
        if to_fsync:
            jobs = max(self._threads, fsync_jobs_per_round_max)
            size = -(-len(to_fsync) // jobs)
            for i in range(0, len(to_fsync), size):
                chunk = to_fsync[i : i + size]
                fut = loop.run_in_executor(self._pool, _fsync_chunk, chunk)
                for group in chunk:
                    fsync_of[group] = fut
            m.group_commits.inc()
            m.group_commit_partitions.observe(len(to_fsync))
            m.fsyncs.inc(len(to_fsync))

        # What each group's messages wait for. A message that depends on a vote or a term
        # waits for the hard state's write; a follower's answer (acknowledging entries)
        # waits for its own fsync. A leader's appends and heartbeats wait for nothing: a
        # leader may write its log in parallel with replicating it (Raft thesis 10.2.1),
        # because it counts its own copy only once this round advanced it. A commit-only
        # change of the hard state holds nothing back: the commit index is relearned from
        # the leader, so applying and answering need not wait for it to be stored (a
        # recovering group waits: its stored commit is the evidence of what it lost; so does
        # a group whose configuration in force changed, stored in the same write).
        waiting: dict[RaftGroup, tuple[Ready, set[asyncio.Future[Any]]]] = {}
        sent_early: set[RaftGroup] = set()
        applied_early: set[RaftGroup] = set()
        hs_awaited = False
        for group, rd, vote_changed in stored:
            deps: set[asyncio.Future[Any]] = set()
            if (
                rd.hard_state is not None
                and hs_fut is not None
                and (vote_changed or group.raw.lost_to or group.group_id in confs)
            ):
                deps.add(hs_fut)
                hs_awaited = True
            own = fsync_of.get(group)
            if own is not None:
                deps.add(own)
            waiting[group] = (rd, deps)
            leader = group.raw.role == Role.LEADER and rd.snapshot is None
            if not vote_changed and (leader or own is None):
                self._send(group, rd)
                sent_early.add(group)
            if own is not None and self._apply_early_ok(group, rd, deps, own):
                # Its committed entries were made durable by earlier rounds: apply them (and
                # answer their producers) now, not after this round's fsync of newer ones.
                self._apply(group, rd)
                applied_early.add(group)

        outstanding: set[asyncio.Future[Any]] = {f for _rd, deps in waiting.values() for f in deps}
        if hs_fut is not None and not hs_awaited:
            # Commit-only changes: the round does not wait, but a failed write still takes
            # its groups offline (the store is failing; a vote would not be stored either).
            failing = [self.groups[g] for g in states if g in self.groups]
            hs_fut.add_done_callback(functools.partial(self._hard_states_written, failing))
        failed_hs: BaseException | None = None
        while True:
            # Groups whose own writes are all done: send, apply and advance them now.
            for group in [g for g, (_rd, deps) in waiting.items() if not (deps & outstanding)]:
                rd, _deps = waiting.pop(group)
                if failed_hs is not None:
                    self._fail(group, failed_hs)
                elif not group.failed:
                    if group not in sent_early:
                        self._send(group, rd)
                    self._complete(group, rd, applied=group in applied_early)
                self._leave_round((group,))
                pending.discard(group)
            if not outstanding:
                break
            done = {f for f in outstanding if f.done()}
            if done:  # writes that ended meanwhile: no loop iteration for asyncio.wait
                outstanding -= done
            else:
                done, outstanding = await asyncio.wait(
                    outstanding, return_when=asyncio.FIRST_COMPLETED
                )
            for fut in done:
                error = fut.exception()
                if fut is hs_fut:
                    if error is not None:
                        # Votes and terms are not durable: nothing more of this round may
                        # leave the node.
                        log.error("cannot store raft hard states: %s", error)
                        failed_hs = error
                    continue
                if error is not None:
                    raise error
                result = fut.result()
                assert isinstance(result, list), result
                for group, seconds, failure in result:
                    m.fsync_latency.observe(seconds)
                    if failure is not None:
                        self._fail(group, failure)
        if self._dirty:
            self._wake.set()
        self.rounds += 1
        m.raft_ready_rounds.observe(time.perf_counter() - t0)
        m.raft_ready_groups.observe(len(readies))

    def _queue_hard_states(
        self,
        states: dict[int, HardState],
        sync: bool,
        confs: dict[int, tuple[int, ConfState]],
    ) -> asyncio.Future[Any]:
        """Start storing ``states`` after every write queued before (the new tail)."""
        fut = asyncio.get_running_loop().create_task(
            self._write_hard_states(states, sync, self._hs_tail, confs)
        )
        self._hs_tail = fut
        return fut

    async def _write_hard_states(
        self,
        states: dict[int, HardState],
        sync: bool,
        prev: asyncio.Future[Any] | None,
        confs: dict[int, tuple[int, ConfState]],
    ) -> None:
        """Store one round's hard states after the previous round's (in round order: a
        commit-only write may still be running when the group's next round stores a vote)."""
        if prev is not None and not prev.done():
            await asyncio.wait({prev})
        await asyncio.get_running_loop().run_in_executor(
            self._hs_pool, lambda: self._hard_states.save(states, sync=sync, confs=confs)
        )

    def _store_deferred(self) -> None:
        """Store the commit-only hard states that waited (COMMIT_STORE_INTERVAL_S), unsynced,
        after the writes before them."""
        self._deferred_timer = None
        if not self._deferred_hs:
            return
        states, self._deferred_hs = self._deferred_hs, {}
        fut = self._queue_hard_states(states, False, {})
        groups = [self.groups[g] for g in states if g in self.groups]
        fut.add_done_callback(functools.partial(self._hard_states_written, groups))

    def _hard_states_written(self, groups: list[RaftGroup], fut: asyncio.Future[Any]) -> None:
        error = None if fut.cancelled() else fut.exception()
        if error is None:
            return
        log.error("cannot store raft hard states: %s", error)
        for group in groups:
            self._fail(group, error)

    def _send(self, group: RaftGroup, rd: Ready) -> None:
        sender = self._sender
        if sender is None or not rd.messages:
            return
        gid = group.group_id
        try:
            for msg in rd.messages:
                sender.send(msg.to, gid, msg)
        except Exception:  # lost messages are retried by Raft; the group goes on
            log.exception("raft group %d: sending messages failed", gid)
        if group.trace_round_ns and self.tracer is not None:
            if any(msg.kind == MessageKind.APPEND_RESP for msg in rd.messages):
                self.tracer.follower(
                    group.trace_append_ns, group.trace_round_ns, time.monotonic_ns()
                )
                group.trace_append_ns = group.trace_round_ns = 0

    @staticmethod
    def _apply_early_ok(
        group: RaftGroup, rd: Ready, deps: set[asyncio.Future[Any]], own: asyncio.Future[Any]
    ) -> bool:
        """Whether ``rd``'s committed entries may be applied before its own fsync ends: they
        are all older than its new entries (stored and fsynced by earlier rounds of the
        group: a group has one Ready out at a time), and the Ready waits for nothing else
        (no vote, term, configuration or snapshot, no recovery of lost entries). On a leader
        this is every commit under load: its followers' answers arrive while it fsyncs the
        next proposals, and the commit need not wait for that fsync."""
        committed = rd.committed
        return (
            bool(committed)
            and bool(rd.entries)
            and committed[-1].index < rd.entries[0].index
            and deps == {own}
            and rd.snapshot is None
            and rd.conf_state is None
            and not group.raw.lost_to
            and not group.failed
        )

    def _apply(self, group: RaftGroup, rd: Ready) -> bool:
        """Hand ``rd``'s committed entries to the group's owner; False (the group is stopped)
        if applying them failed."""
        try:
            group.handler.on_committed(group, rd.committed)
        except Exception as exc:
            # A replicated state machine never skips an entry: advancing now would mark
            # the rest of this Ready applied on this node only. Stop the group instead.
            log.critical(
                "raft group %d stopped: applying its committed entries failed",
                group.group_id, exc_info=True,
            )  # fmt: skip
            self._metrics.apply_failures.inc()
            self._fail(group, exc, what="applying committed entries failed")
            return False
        return True

    def _complete(self, group: RaftGroup, rd: Ready, *, applied: bool = False) -> None:
        """The group's writes of ``rd`` are durable: tell its owner, apply (unless
        ``applied`` already), advance."""
        handler = group.handler
        try:
            if rd.conf_state is not None and group.conf_listener is not None:
                group.conf_listener(group, rd.conf_state)
            if rd.entries:
                handler.on_persisted(group, rd.entries[-1].index)
        except Exception as exc:
            log.critical(
                "raft group %d stopped: applying its committed entries failed",
                group.group_id, exc_info=True,
            )  # fmt: skip
            self._metrics.apply_failures.inc()
            self._fail(group, exc, what="applying committed entries failed")
            return
        if rd.committed and not applied and not self._apply(group, rd):
            return
        if rd.read_states and group.reads:
            for rs in rd.read_states:
                fut = group.reads.pop(rs.context, None)
                if fut is not None and not fut.done():
                    fut.set_result(rs.index)
        if not group.removed:
            group.raw.advance(rd)
            if rd.committed:
                self._trim_cache(group)
            self._dirty[group] = None
            self._wake.set()

    @staticmethod
    def _trim_cache(group: RaftGroup) -> None:
        """Keep cached entries only while someone may read them soon: not yet applied here,
        or (on a leader) not yet acknowledged by a follower."""
        raw = group.raw
        keep = raw.applied_index + 1
        if raw.role == Role.LEADER:
            for node, pr in raw.tracker.progress.items():
                if node != raw.id:
                    keep = min(keep, pr.match + 1)
        group.storage.trim_cache(keep)

    def _fail(self, group: RaftGroup, exc: BaseException, *, what: str = "storage failure") -> None:
        if group.failed:
            return
        group.failed = True
        group.drop_reads()
        self._metrics.groups_offline.inc()
        log.error("raft group %d taken offline: %s: %s", group.group_id, what, exc)
        try:
            group.handler.on_storage_failure(group, exc)
        except Exception:
            log.exception("raft group %d: storage failure handler failed", group.group_id)

    # ---- inspection --------------------------------------------------------------------------

    def leaders(self) -> Iterable[RaftGroup]:
        return (g for g in self.groups.values() if g.raw.role == Role.LEADER)


__all__ = [
    "GroupHandler",
    "MultiRaft",
    "RaftGroup",
    "RaftTiming",
    "Sender",
    "early_bytes_max",
    "early_message_ttl_ms",
    "early_messages_max",
]
