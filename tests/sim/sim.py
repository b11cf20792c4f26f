"""One deterministic simulation run: a Raft cluster in one process, driven by one seed.

The run is a discrete-event loop over a simulated clock. Each step pops one event (a node's
tick, a message delivery, a disk sync completing, a client proposal, a fault) and handles it
the way a real driver would, then the checkers (``checkers.py``) see every change it caused.
A run has two phases:

1. Safety: crashes (losing or tearing unsynced writes), restarts, partitions (symmetric,
   asymmetric, the leader isolated), message loss, duplication and delay, leadership
   transfers, log compaction; invariants are checked throughout.
2. Liveness: every fault healed and every node up; the cluster must elect a leader, commit a
   fresh proposal and have every node apply it within a bound, else the run fails.

The membership profile (``run_seed(seed, membership=True)``, ``--membership``) adds one or
two spare nodes (new, empty replicas that know they are not voters) and, interleaved with
every other fault, random membership changes on the leader: add a learner (a spare, or a
node removed earlier, with its old log), promote a learner, remove a voter (the leader
included) or a learner. Its options come from a generator of their own, so the seeds of the
plain profile run exactly as before. Liveness then concerns the members of the leader's
configuration.

Every random choice comes from ``random.Random(seed)`` (via child generators drawn from it in
a fixed order), so a seed reproduces its run exactly.
"""

from __future__ import annotations

import dataclasses
import heapq
import random
import struct
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from tidelog.node.raft.core import RawNode
from tidelog.node.raft.errors import NotRaftLeader, ProposalDropped
from tidelog.node.raft.guard import refusal
from tidelog.node.raft.storage import NO_LIMIT_BYTES
from tidelog.node.raft.types import (
    ConfChangeKind,
    ConfState,
    EntryKind,
    Message,
    MessageKind,
    Ready,
    Role,
    Snapshot,
)

from . import core_adapter
from .checkers import GENESIS_HASH, Ack, Checker, InvariantViolation, LogShadow
from .disk import SimDisk
from .network import Network
from .options import (
    CLIENT_PENDING_MAX,
    CLIENT_TIMEOUT_TICKS,
    EVENTS_PER_RUN_MAX,
    LIVENESS_ELECTIONS_MAX,
    TICK_SKEW_UNITS_MAX,
    TICK_UNITS,
    SimOptions,
)

#: Inputs (messages, ticks, proposals) a node buffers while it cannot take them (paused, or
#: blocked in an fsync when the driver does not step during syncs); more are dropped, as a
#: full socket buffer or ticker channel would, which Raft tolerates like any loss.
INBOX_MAX = 512

# Event kinds, in the order they are handled when due at the same time.
_TICK = 0
_DELIVER = 1
_SYNC = 2
_PROPOSE = 3
_CRASH = 4
_RESTART = 5
_PARTITION = 6
_HEAL = 7
_TRANSFER = 8
_LIVENESS = 9
_READ = 10
_PAUSE = 11
_RESUME = 12
_READY = 13
_MEMBERSHIP = 14

#: The membership profile: mean ticks between two membership changes, drawn per seed.
MEMBERSHIP_EVERY_TICKS = (8, 15, 30)
#: The membership profile's safety phase lasts at most this many ticks.
MEMBERSHIP_SAFETY_TICKS_MAX = 400
#: At most this many voters (promotions stop there).
MEMBERSHIP_VOTERS_MAX = 6
#: At least this many (removals stop there): a one-voter group commits its own writes before
#: they are synced (``RawNode._append_entries``; nothing is applied or acknowledged before the
#: sync), which the checker, recording commits when the hard state is written, would take for
#: lost committed entries after a crash.
MEMBERSHIP_VOTERS_MIN = 2

_SNAPSHOT_DATA = struct.Struct(">QQ")

Trace = Callable[[str], None]


class _Tick:
    """A tick waiting in a node's inbox."""

    __slots__ = ()


_TICK_ITEM = _Tick()


@dataclass(frozen=True, slots=True)
class _Proposal:
    """A client's proposal waiting in a node's inbox (the request sits in its socket)."""

    client: int
    payload: bytes


_Input = Message | _Tick | _Proposal


def encode_state(applied: int, digest: int) -> bytes:
    """The state machine's snapshot: how far it applied and the digest of what it applied."""
    return _SNAPSHOT_DATA.pack(applied, digest)


def decode_state(data: bytes) -> tuple[int, int]:
    applied, digest = _SNAPSHOT_DATA.unpack(data)
    return int(applied), int(digest)


@dataclass(slots=True)
class SimNode:
    """A node's process (the core and the state machine, lost on a crash) and its disk
    (kept)."""

    id: int
    learner: bool
    disk: SimDisk
    rng: random.Random
    tick_period_units: int
    core: core_adapter.Core | None = None
    #: Bumped by each crash so a client's pending proposal to a dead process is not acked by
    #: the restarted one.
    incarnation: int = 0
    log: LogShadow = field(default_factory=LogShadow)
    applied: int = 0
    digest: int = GENESIS_HASH
    #: The Ready whose fsync is in progress: no ready() until it completes and is advanced.
    syncing: Ready | None = None
    #: Inputs that arrived while the node could not take them, handled in order (and then
    #: in one Ready: the batching a real driver gets from a busy loop) once it can.
    inbox: deque[_Input] = field(default_factory=deque)
    role: Role = Role.FOLLOWER
    term: int = 0
    #: Stopped (as by SIGSTOP, a long GC pause or a stalled VM): ticks and messages wait in
    #: the inbox, to be handled all at once, stale, when it resumes.
    paused: bool = False
    #: A ready() is scheduled for the end of the loop iteration (``ready_delay_units``).
    ready_scheduled: bool = False
    #: The commit index when it last became leader (commits above it are its own counting).
    lead_commit: int = 0
    #: The configuration the core believed in at the previous observation.
    conf_seen: ConfState | None = None

    @property
    def up(self) -> bool:
        return self.core is not None


@dataclass(slots=True)
class Client:
    id: int
    guess: int
    seq: int = 0
    #: payload -> (node, incarnation, time proposed, index the core gave it or 0 while the
    #: proposal waits in the node's inbox)
    pending: dict[bytes, tuple[int, int, int, int]] = field(default_factory=dict)


@dataclass(slots=True)
class RunStats:
    events: int = 0
    ticks: int = 0
    crashes: int = 0
    partitions: int = 0
    transfers: int = 0
    proposals: int = 0
    acks: int = 0
    elections: int = 0
    snapshots_installed: int = 0
    conf_changes: int = 0
    messages_sent: int = 0
    #: Messages raft/guard.py refused before the core (as node/multiraft.py does).
    messages_refused: int = 0
    liveness_ticks: int = 0


@dataclass(frozen=True, slots=True)
class RunResult:
    seed: int
    ok: bool
    invariant: str
    detail: str
    stats: RunStats
    options: SimOptions
    membership: bool = False

    @property
    def reproduce(self) -> str:
        flag = " --membership" if self.membership else ""
        flag += " --lazy-commit" if self.options.lazy_commit else ""
        return f"reproduce: .venv/bin/python -m tests.sim{flag} --seed {self.seed}"

    def line(self) -> str:
        """The one line a failing seed prints."""
        return f"{self.reproduce}  # {self.invariant}: {self.detail}"


class Simulation:
    """One seed's run. ``run()`` never raises for a violation: it returns the result."""

    def __init__(
        self,
        seed: int,
        trace: Trace | None = None,
        opts: SimOptions | None = None,
        *,
        membership: bool = False,
        lazy_commit: bool = False,
    ) -> None:
        self.seed = seed
        rng = random.Random(seed)
        drawn = dataclasses.replace(SimOptions.draw(rng), lazy_commit=lazy_commit)
        #: ``opts`` overrides the drawn options (the steady-state measurement uses it); the
        #: draw still happens so the child generators stay the same.
        if opts is None and membership:
            # A shorter safety phase, so that a few hundred seeds fit CI's budget. And leader
            # stickiness (pre-vote or check-quorum, as the node always runs): without it a
            # removed server that never learns of its removal disrupts the group with ever
            # higher terms for good (thesis 4.2.3; seed 7000).
            drawn = dataclasses.replace(
                drawn,
                safety_ticks=min(drawn.safety_ticks, MEMBERSHIP_SAFETY_TICKS_MAX),
                pre_vote=drawn.pre_vote or not drawn.check_quorum,
            )
        self.opts = opts if opts is not None else drawn
        # Child generators in a fixed order: faults, network, disk, clients, then one per node.
        self._fault_rng = random.Random(rng.getrandbits(64))
        self._net_rng = random.Random(rng.getrandbits(64))
        self._disk_rng = random.Random(rng.getrandbits(64))
        self._client_rng = random.Random(rng.getrandbits(64))
        self._trace = trace
        opts = self.opts
        voters = list(range(1, opts.voters + 1))
        learners = list(range(opts.voters + 1, opts.voters + opts.learners + 1))
        self.voter_ids = voters
        self.conf = ConfState(voters=frozenset(voters), learners=frozenset(learners))
        self.nodes: dict[int, SimNode] = {}
        for nid in [*voters, *learners]:
            period = TICK_UNITS + rng.randint(-TICK_SKEW_UNITS_MAX, TICK_SKEW_UNITS_MAX)
            self.nodes[nid] = SimNode(
                id=nid,
                learner=nid in learners,
                disk=SimDisk(self.conf),
                rng=random.Random(rng.getrandbits(64)),
                tick_period_units=period,
            )
        self._membership = membership
        self.membership_every_ticks = 0
        self._member_rng = random.Random(0)
        if membership:
            # A generator of its own: the plain profile's draws stay as they were.
            mrng = random.Random(f"membership-{seed}")
            self._member_rng = random.Random(mrng.getrandbits(64))
            self.membership_every_ticks = mrng.choice(MEMBERSHIP_EVERY_TICKS)
            first = max(self.nodes) + 1
            for nid in range(first, first + mrng.randint(1, 2)):
                # A new replica: it knows the group and that it is no voter of it.
                conf = ConfState(self.conf.voters, self.conf.learners | {nid})
                period = TICK_UNITS + mrng.randint(-TICK_SKEW_UNITS_MAX, TICK_SKEW_UNITS_MAX)
                self.nodes[nid] = SimNode(
                    id=nid,
                    learner=True,
                    disk=SimDisk(conf),
                    rng=random.Random(mrng.getrandbits(64)),
                    tick_period_units=period,
                )
            self.voter_ids = sorted(self.nodes)  # clients may reach any node
        self.clients = [
            Client(id=c, guess=self._client_rng.choice(voters)) for c in range(opts.clients)
        ]
        #: payload -> client id, for acknowledging on apply.
        self._owner: dict[bytes, int] = {}
        self.net = Network(opts, self._net_rng)
        self.checker = Checker()
        self.stats = RunStats()
        self.now = 0
        self._events: list[tuple[int, int, int, int, object]] = []
        self._seq = 0
        self.safety_end = opts.safety_ticks * TICK_UNITS
        self.in_liveness = False
        self.liveness_start = 0
        self.liveness_deadline = 0
        #: The first proposal made after the liveness phase began, once acknowledged.
        self._liveness_ack: Ack | None = None
        #: read context -> the highest acknowledged index when the read was requested.
        self._reads: dict[bytes, int] = {}
        self._read_seq = 0

    # ---- events ------------------------------------------------------------------------

    def _at(self, when: int, kind: int, a: int = 0, obj: object = None) -> None:
        self._seq += 1
        heapq.heappush(self._events, (when, kind, self._seq, a, obj))

    def _log(self, text: str) -> None:
        if self._trace is not None:
            self._trace(f"{self.now:>7} {text}")

    def _mean_gap(self, every_ticks: int) -> int:
        return max(1, int(self._fault_rng.expovariate(1.0 / (every_ticks * TICK_UNITS))))

    def run(self) -> RunResult:
        try:
            self._run()
        except InvariantViolation as v:
            self._log(f"VIOLATION {v.invariant}: {v.detail}")
            return RunResult(
                self.seed, False, v.invariant, v.detail, self.stats, self.opts, self._membership
            )
        except Exception as e:  # the core (or the driver) crashed: also a failing seed
            detail = f"{type(e).__name__}: {e} at {_where(e)}"
            self._log(f"EXCEPTION {detail}")
            return RunResult(
                self.seed, False, "exception", detail, self.stats, self.opts, self._membership
            )
        return RunResult(self.seed, True, "", "", self.stats, self.opts, self._membership)

    def _run(self) -> None:
        opts = self.opts
        self._log(f"seed {self.seed}: {opts.describe()}")
        self.start()
        if opts.crash_every_ticks:
            self._at(self._mean_gap(opts.crash_every_ticks), _CRASH)
        if opts.partition_every_ticks:
            self._at(self._mean_gap(opts.partition_every_ticks), _PARTITION)
        if opts.transfer_every_ticks:
            self._at(self._mean_gap(opts.transfer_every_ticks), _TRANSFER)
        if opts.pause_every_ticks:
            self._at(self._mean_gap(opts.pause_every_ticks), _PAUSE)
        if opts.read_every_units:
            self._at(self._client_rng.randint(1, opts.read_every_units), _READ)
        if self.membership_every_ticks:
            self._at(self._member_gap(), _MEMBERSHIP)
        self._at(self.safety_end, _LIVENESS)
        self.run_until(None)

    def run_until(self, until: int | None) -> None:
        """Handles events in time order until ``until`` (or, when None, until the liveness
        phase succeeds); raises ``InvariantViolation`` on the first violation."""
        events = self._events
        while events:
            if until is not None and events[0][0] > until:
                self.now = until
                return
            when, kind, _, a, obj = heapq.heappop(events)
            self.now = when
            self.stats.events += 1
            if self.stats.events > EVENTS_PER_RUN_MAX:
                raise InvariantViolation(
                    "liveness", f"more than {EVENTS_PER_RUN_MAX} events (livelock?)"
                )
            if kind == _TICK:
                self._on_tick(a, obj)
            elif kind == _DELIVER:
                assert isinstance(obj, Message)
                self._on_deliver(obj)
            elif kind == _SYNC:
                self._on_sync_done(a, obj)
            elif kind == _PROPOSE:
                self._on_propose(a)
            elif kind == _CRASH:
                self._on_crash(a)
            elif kind == _RESTART:
                self._on_restart(a)
            elif kind == _PARTITION:
                self._on_partition()
            elif kind == _HEAL:
                self._on_heal()
            elif kind == _TRANSFER:
                self._on_transfer()
            elif kind == _LIVENESS:
                self._on_liveness_start()
            elif kind == _READ:
                self._on_read()
            elif kind == _PAUSE:
                self._on_pause()
            elif kind == _RESUME:
                self._on_resume(a, obj)
            elif kind == _READY:
                self._on_ready(a, obj)
            elif kind == _MEMBERSHIP:
                self._on_membership()
            if self.in_liveness and self._liveness_done():
                self.stats.liveness_ticks = (self.now - self.liveness_start) // TICK_UNITS
                self._log(f"liveness reached after {self.stats.liveness_ticks} ticks")
                return
            if self.in_liveness and self.now > self.liveness_deadline:
                raise InvariantViolation("liveness", self._liveness_failure())
        raise AssertionError("the event queue ran dry")  # ticks are always scheduled

    def start(self) -> None:
        """Boots every node and the clients, without faults (for measurements)."""
        for node in self.nodes.values():
            self._start(node)
        for c in self.clients:
            self._at(self._client_rng.randint(0, self.opts.propose_every_units), _PROPOSE, c.id)

    # ---- node lifecycle ----------------------------------------------------------------

    def _start(self, node: SimNode) -> None:
        """Starts a node's process from what its disk holds (first boot or restart)."""
        storage = node.disk.written
        first = storage.first_index()
        base_index = first - 1
        base_term = storage.term(base_index)
        last = storage.last_index()
        entries = storage.entries(first, last + 1, NO_LIMIT_BYTES) if last >= first else []
        hs = storage.hard_state()
        commit = hs.commit
        node.log = self.checker.on_restart(node.id, base_index, base_term, entries, commit, hs.term)
        node.applied, node.digest = 0, GENESIS_HASH
        if first > 1:
            applied, digest = decode_state(storage.snapshot().data)
            self.checker.on_restore(node.id, 0, applied, digest)
            node.applied, node.digest = applied, digest
        node.core = core_adapter.make_core(node.id, storage, self.opts, node.rng, node.applied)
        node.role, node.term = node.core.role, node.core.term
        index, conf = core_adapter.conf_of(node.core)
        self.checker.on_conf(self.now, node.id, index, conf, node.log)
        node.syncing = None
        node.inbox.clear()
        self._log(
            f"n{node.id} start: log ({base_index}, {last}] commit {commit} applied {node.applied}"
            f" term {storage.hard_state().term}"
        )
        when = self.now + node.rng.randint(1, node.tick_period_units)
        self._at(when, _TICK, node.id, node.incarnation)
        self._drive(node)

    def _on_crash(self, target: int) -> None:
        """Crashes ``target`` (a crash in the middle of its fsync) or, for the periodic crash
        (``target`` 0), a random node, then schedules the next periodic crash."""
        if self.in_liveness:
            return
        opts = self.opts
        if target:
            node = self.nodes[target]
            if node.up and (node.syncing is not None or node.disk.dirty):
                self._crash(node)
            return
        up = [n for n in self.nodes.values() if n.up]
        # Keep the crashes from taking the whole cluster down most of the time, but let them
        # take a majority down now and then (the cluster must then recover on restart).
        if up and (len(up) > len(self.nodes) // 2 + 1 or self._fault_rng.random() < 0.2):
            # Leaders half the time: their crashes make the interesting histories (a term's
            # entries on a minority, a new leader without them, the old one coming back).
            leader = self._leader()
            if leader is not None and self._fault_rng.random() < 0.5:
                self._crash(leader)
            else:
                self._crash(self._fault_rng.choice(up))
        self._at(self.now + self._mean_gap(opts.crash_every_ticks), _CRASH)

    def _crash(self, node: SimNode) -> None:
        """The process dies: the core, the state machine and unsynced writes are lost."""
        opts = self.opts
        torn = self._fault_rng.random() < opts.torn_write_rate
        was_syncing = node.syncing is not None
        loss = node.disk.crash(self._disk_rng, torn)
        node.core = None
        node.syncing = None
        node.paused = False
        node.ready_scheduled = False
        node.inbox.clear()
        node.incarnation += 1
        self.stats.crashes += 1
        self._log(
            f"n{node.id} CRASH (mid-sync {was_syncing}): lost {loss.ops_lost} unsynced "
            f"writes, tore {loss.entries_torn} entries"
        )
        # From a quick process restart (a few units) to a long outage.
        down = self._fault_rng.randint(1, opts.downtime_ticks_max * TICK_UNITS)
        self._at(self.now + down, _RESTART, node.id)

    def _on_pause(self) -> None:
        if self.in_liveness:
            return
        rng = self._fault_rng
        self._at(self.now + self._mean_gap(self.opts.pause_every_ticks), _PAUSE)
        leader = self._leader()
        candidates = [n for n in self.nodes.values() if n.up and not n.paused]
        if not candidates:
            return
        if leader is not None and not leader.paused and rng.random() < 0.5:
            node = leader
        else:
            node = rng.choice(candidates)
        node.paused = True
        length = rng.randint(1, 3 * self.opts.election_ticks * TICK_UNITS)
        self._log(f"n{node.id} PAUSE for {length} units")
        self._at(self.now + length, _RESUME, node.id, node.incarnation)

    def _on_resume(self, nid: int, incarnation: object) -> None:
        node = self.nodes[nid]
        if not node.up or node.incarnation != incarnation or not node.paused:
            return
        node.paused = False
        self._log(f"n{node.id} RESUME with {len(node.inbox)} stale messages")
        self._unblock(node)

    def _on_restart(self, nid: int) -> None:
        node = self.nodes[nid]
        if not node.up:
            self._start(node)
            self._observe(node)

    # ---- the driver: Ready handling exactly as the contract in types.Ready says --------

    def _takes_input(self, node: SimNode) -> bool:
        """Whether the node's loop can step an input now. While an fsync is in flight a
        driver may keep stepping (etcd's node loop does; the core must then cope with entries
        replaced before the Ready that carried them is advanced) or wait; seeds do both."""
        if node.paused:
            return False
        return node.syncing is None or self.opts.step_while_syncing

    def _input(self, node: SimNode, item: _Input) -> None:
        """An input reaches a running node: handled now, or queued until it can be."""
        if not self._takes_input(node):
            if len(node.inbox) < INBOX_MAX:
                node.inbox.append(item)
            elif isinstance(item, _Proposal):
                self.clients[item.client].pending.pop(item.payload, None)
            return
        self._handle(node, item)
        self._kick(node)

    def _handle(self, node: SimNode, item: _Input) -> None:
        core = node.core
        assert core is not None
        if isinstance(item, Message):
            if self._trace is not None and item.kind not in (
                MessageKind.HEARTBEAT,
                MessageKind.HEARTBEAT_RESP,
            ):
                self._log(_describe(item))
            # The node's driver refuses what raft/guard.py refuses before the core sees it;
            # the simulation checks that this costs neither safety nor liveness.
            members_only = not self.membership_every_ticks
            if isinstance(core, RawNode) and refusal(core, item, members_only=members_only):
                self.stats.messages_refused += 1
                return
            core.step(item)
        elif isinstance(item, _Tick):
            self.stats.ticks += 1
            core.tick()
        else:
            self._propose(node, item)
        self._observe(node)

    def _unblock(self, node: SimNode) -> None:
        """The node can run again: it steps every input that waited, then takes one Ready."""
        while node.inbox and node.up and self._takes_input(node):
            self._handle(node, node.inbox.popleft())
        self._drive(node)

    def _kick(self, node: SimNode) -> None:
        """New work for the node's loop: taken at once, or after ``ready_delay_units`` (the
        rest of a loop iteration) so that inputs arriving meanwhile share one Ready."""
        delay = self.opts.ready_delay_units
        if delay == 0:
            self._drive(node)
        elif not node.ready_scheduled:
            node.ready_scheduled = True
            when = self.now + node.rng.randint(0, delay)
            self._at(when, _READY, node.id, node.incarnation)

    def _on_ready(self, nid: int, incarnation: object) -> None:
        node = self.nodes[nid]
        if not node.up or node.incarnation != incarnation:
            return
        node.ready_scheduled = False
        self._drive(node)

    def _drive(self, node: SimNode) -> None:
        core = node.core
        while core is not None and node.syncing is None and not node.paused and core.has_ready():
            rd = core.ready()
            self._persist(node, rd)
            if rd.must_sync:
                delay = node.rng.randint(0, self.opts.sync_units_max)
                if delay > 0:
                    node.syncing = rd
                    self._at(self.now + delay, _SYNC, node.id, rd)
                    self._maybe_crash_soon(node, delay - 1)
                    return
                node.disk.sync()
            elif node.disk.dirty:
                self._maybe_crash_soon(node)
            self._complete(node, rd)

    def _maybe_crash_soon(self, node: SimNode, within_units: int = 2) -> None:
        """Sometimes schedules a crash while writes are not yet durable (in the middle of an
        fsync, or just after a write that needed none), the crashes that lose data."""
        rate = self.opts.mid_sync_crash_rate
        if rate and not self.in_liveness and self._fault_rng.random() < rate:
            self._at(self.now + self._fault_rng.randint(0, within_units), _CRASH, node.id)

    def _persist(self, node: SimNode, rd: Ready) -> None:
        disk, log, checker = node.disk, node.log, self.checker
        if rd.snapshot is not None and not rd.snapshot.is_empty:
            self._install_snapshot(node, rd.snapshot)
        if rd.entries:
            checker.on_append(node.id, log, rd.entries)
            disk.append(rd.entries)
        if rd.hard_state is not None:
            checker.on_commit(node.id, log, rd.hard_state.commit, rd.hard_state.term)
            disk.set_hard_state(rd.hard_state)
        if rd.conf_state is not None:
            disk.set_conf(rd.conf_state, rd.conf_index)
            checker.on_conf(self.now, node.id, rd.conf_index, rd.conf_state, log)
            self._log(
                f"n{node.id} configuration {sorted(rd.conf_state.voters)} learners "
                f"{sorted(rd.conf_state.learners)} from index {rd.conf_index}"
            )
        if log.confs and any(e.kind == EntryKind.CONFIG for e in rd.entries):
            checker.check_in_flight(node.id, log)

    def _install_snapshot(self, node: SimNode, snap: Snapshot) -> None:
        meta = snap.meta
        self.checker.on_install_snapshot(node.id, node.log, meta.index, meta.term, node.term)
        node.disk.install_snapshot(snap)
        applied, digest = decode_state(snap.data)
        if applied != meta.index:
            raise InvariantViolation(
                "state-machine-safety",
                f"node {node.id} got a snapshot at {meta.index} holding state at {applied}",
            )
        self.checker.on_restore(node.id, node.applied, applied, digest)
        node.applied, node.digest = applied, digest
        self.stats.snapshots_installed += 1
        self._log(f"n{node.id} installs snapshot at {meta.index} term {meta.term}")

    def _on_sync_done(self, nid: int, token: object) -> None:
        node = self.nodes[nid]
        rd = node.syncing
        if rd is None or rd is not token or not node.up:
            return  # crashed while syncing
        node.syncing = None
        node.disk.sync()
        self._complete(node, rd)
        self._unblock(node)

    def _complete(self, node: SimNode, rd: Ready) -> None:
        """After the writes are durable: send, apply, advance."""
        core = node.core
        assert core is not None
        self._send(node, rd.messages)
        for e in rd.committed:
            node.digest = self.checker.on_apply(node.id, node.applied, node.digest, e)
            node.applied = e.index
            if e.kind == EntryKind.NORMAL:
                self._maybe_ack(node, e.index, e.term, e.data)
        for rs in rd.read_states:
            # Kept after the first answer: the network may duplicate a request or an answer,
            # and every answer for a context must cover what was acknowledged before it.
            acked_before = self._reads.get(rs.context)
            if acked_before is None:
                raise InvariantViolation(
                    "read-linearizability", f"node {node.id} answered unknown read {rs.context!r}"
                )
            self.checker.on_read(node.id, rs.index, acked_before)
        core.advance(rd)
        every = self.opts.compact_every_entries
        if every and node.applied - node.disk.written.first_index() + 1 >= every:
            node.disk.compact(node.applied, encode_state(node.applied, node.digest))
            self.checker.on_compact(node.log, node.applied)
            self._log(f"n{node.id} compacts log up to {node.applied}")

    def _send(self, node: SimNode, messages: tuple[Message, ...]) -> None:
        durable = node.disk.durable
        for msg in messages:
            self.checker.on_send(node.id, msg, durable)
            self.stats.messages_sent += 1
            for when, m in self.net.send(self.now, msg):
                self._at(when, _DELIVER, 0, m)

    # ---- stepping ----------------------------------------------------------------------

    def _observe(self, node: SimNode) -> None:
        """Role and term checks after anything that may have changed them (and, on a leader,
        that what it newly committed is held by a majority of its configuration, as it was
        before the step or is now)."""
        core = node.core
        if core is None:
            return
        role, term = core.role, core.term
        if self.membership_every_ticks:
            conf_before = node.conf_seen
            node.conf_seen = core_adapter.conf_of(core)[1]
            if role == Role.LEADER and node.role == Role.LEADER and term == node.term:
                commit = core.commit_index
                if commit > node.lead_commit:
                    self._check_commit_quorum(node, commit, conf_before)
                    node.lead_commit = commit
        if role == node.role and term == node.term:
            return
        _index, conf = core_adapter.conf_of(core)
        self.checker.on_role(node.id, role, term, not conf.is_voter(node.id))
        if role == Role.LEADER:
            node.lead_commit = core.commit_index
            self.stats.elections += 1
            self._log(
                f"n{node.id} becomes LEADER of term {term} (last index {node.log.last_index})"
            )
            self.checker.on_new_leader(
                node.id,
                term,
                lambda i: core_adapter.log_term(core, i),
                core_adapter.log_first_index(core) - 1,
            )
        elif role != node.role:
            self._log(f"n{node.id} becomes {role.name} term {term}")
        node.role, node.term = role, term

    def _check_commit_quorum(self, node: SimNode, commit: int, before: ConfState | None) -> None:
        core = node.core
        assert core is not None
        term = core_adapter.log_term(core, commit)
        holders = {node.id}
        for other in self.nodes.values():
            st = other.disk.durable
            if commit < st.first_index():
                holders.add(other.id)  # compacted: only committed entries are
            elif commit <= st.last_index() and st.term(commit) == term:
                holders.add(other.id)
        _index, conf = core_adapter.conf_of(core)
        if before is not None and before != conf:
            voters = before.voters
            if len(holders & voters) * 2 > len(voters):
                return  # counted on the configuration before the step
        self.checker.on_leader_commit(node.id, core.term, conf, commit, holders)

    def _on_tick(self, nid: int, incarnation: object) -> None:
        node = self.nodes[nid]
        if not node.up or incarnation != node.incarnation:
            return  # a crash ends the tick chain; the restart starts a new one
        self._at(self.now + node.tick_period_units, _TICK, nid, incarnation)
        self._input(node, _TICK_ITEM)

    def _on_deliver(self, msg: Message) -> None:
        node = self.nodes.get(msg.to)
        delivered = node is not None and node.up and self.net.can_deliver(msg)
        if self.opts.transport_reports:
            self._report_transport(msg, delivered)
        if delivered:
            assert node is not None
            self._input(node, msg)

    def _report_transport(self, msg: Message, delivered: bool) -> None:
        """What a real transport tells the sender: a peer it could not reach, and whether a
        snapshot went through (lost ones are otherwise retried on the core's own timer)."""
        sender = self.nodes[msg.frm]
        core = sender.core
        if core is None or not self._takes_input(sender):
            return
        if msg.kind == MessageKind.SNAPSHOT:
            core.report_snapshot(msg.to, delivered)
        elif not delivered:
            core.report_unreachable(msg.to)
        else:
            return
        self._observe(sender)
        self._kick(sender)

    # ---- clients -----------------------------------------------------------------------

    def _on_propose(self, cid: int) -> None:
        client = self.clients[cid]
        rng = self._client_rng
        self._at(self.now + rng.randint(1, 2 * self.opts.propose_every_units), _PROPOSE, cid)
        if self.in_liveness and (cid != 0 or self._liveness_ack is not None):
            # The load stops when faults heal (only client 0 keeps one probe proposal going
            # until one is acknowledged), so the bound is not a throughput test.
            return
        timeout = CLIENT_TIMEOUT_TICKS * TICK_UNITS
        for payload, (_, _, when, _) in list(client.pending.items()):
            if self.now - when > timeout:
                del client.pending[payload]  # gives up; the entry may still commit later
        if len(client.pending) >= (1 if self.in_liveness else CLIENT_PENDING_MAX):
            return
        node = self.nodes[client.guess]
        if not node.up:
            client.guess = rng.choice(self.voter_ids)  # connection refused: try another
            return
        client.seq += 1
        pad = b"." * rng.randint(0, self.opts.payload_bytes_max)
        payload = b"c%d-%d" % (cid, client.seq) + pad
        client.pending[payload] = (node.id, node.incarnation, self.now, 0)
        self._owner[payload] = cid
        self._input(node, _Proposal(cid, payload))

    def _propose(self, node: SimNode, p: _Proposal) -> None:
        client = self.clients[p.client]
        pending = client.pending.get(p.payload)
        if pending is None:
            return  # the client gave up while the proposal waited
        core = node.core
        assert core is not None
        try:
            index = core.propose(p.payload)
        except ProposalDropped as e:
            del client.pending[p.payload]
            leader = e.leader_id
            if leader in self.nodes:
                client.guess = leader
            else:
                client.guess = self._client_rng.choice(self.voter_ids)
            return
        self.stats.proposals += 1
        client.pending[p.payload] = (*pending[:3], index)

    def _maybe_ack(self, node: SimNode, index: int, term: int, data: bytes) -> None:
        cid = self._owner.get(data)
        if cid is None:
            return
        client = self.clients[cid]
        pending = client.pending.get(data)
        if pending is None or pending[0] != node.id or pending[1] != node.incarnation:
            return
        del client.pending[data]
        if pending[3] != index:
            raise InvariantViolation(
                "linear-order",
                f"proposal {data!r} was given index {pending[3]} by node {node.id} "
                f"but applied at {index}",
            )
        chain = node.log.hash_at(index)
        assert chain is not None, "an applied entry is in the log until compaction"
        ack = Ack(index=index, term=term, chain=chain, payload=data, time=self.now)
        self.checker.on_ack(ack)
        self.stats.acks += 1
        if self.in_liveness and self._liveness_ack is None and pending[2] >= self.liveness_start:
            self._liveness_ack = ack
            # Every node must then apply it: the bound grows with how far behind the slowest
            # node is, at one entry per round trip (the worst flow-control window).
            self.liveness_deadline = max(
                self.liveness_deadline, self.now + self._liveness_bound(ack.index)
            )

    def _on_read(self) -> None:
        """A client asks a random node for a linearizable read; the index it gets back must
        cover every acknowledgement that happened before it asked."""
        rng = self._client_rng
        self._at(self.now + rng.randint(1, 2 * self.opts.read_every_units), _READ)
        node = self.nodes[rng.choice(list(self.nodes))]
        core = node.core
        if core is None or not self._takes_input(node):
            return
        self._read_seq += 1
        ctx = b"read-%d" % self._read_seq
        try:
            core.read_index(ctx)
        except ProposalDropped:
            return
        self._reads[ctx] = self.checker.acked_max_index
        self._observe(node)
        self._kick(node)

    # ---- network faults ----------------------------------------------------------------

    def _leader(self) -> SimNode | None:
        leaders = [n for n in self.nodes.values() if n.up and n.role == Role.LEADER]
        return max(leaders, key=lambda n: n.term) if leaders else None

    def _on_partition(self) -> None:
        if self.in_liveness:
            return
        opts = self.opts
        rng = self._fault_rng
        self._at(self.now + self._mean_gap(opts.partition_every_ticks), _PARTITION)
        if self.net.partitioned:
            return
        ids = list(self.nodes)
        kind = rng.choice(("symmetric", "asymmetric", "isolate-leader"))
        leader = self._leader()
        if kind == "isolate-leader" and leader is not None:
            self.net.isolate(leader.id, ids)
        else:
            rng.shuffle(ids)
            cut = rng.randint(1, len(ids) - 1)
            self.net.split(ids[:cut], ids[cut:], symmetric=kind != "asymmetric")
        self.stats.partitions += 1
        self._log(f"PARTITION {kind}: blocked {self.net.describe()}")
        heal = self.now + rng.randint(1, opts.partition_ticks_max) * TICK_UNITS
        self._at(heal, _HEAL)

    def _on_heal(self) -> None:
        if self.net.partitioned:
            self.net.heal()
            self._log("HEAL partition")

    def _on_transfer(self) -> None:
        if self.in_liveness:
            return
        rng = self._fault_rng
        self._at(self.now + self._mean_gap(self.opts.transfer_every_ticks), _TRANSFER)
        leader = self._leader()
        if leader is None or not self._takes_input(leader):
            return
        core = leader.core
        assert core is not None
        voters = sorted(core_adapter.conf_of(core)[1].voters - {leader.id})
        if not voters:
            return
        target = rng.choice(voters)
        self.stats.transfers += 1
        self._log(f"n{leader.id} TRANSFER leadership to n{target}")
        core.transfer_leadership(target)
        self._observe(leader)
        self._kick(leader)

    # ---- membership changes ------------------------------------------------------------

    def _member_gap(self) -> int:
        every = self.membership_every_ticks * TICK_UNITS
        return max(1, int(self._member_rng.expovariate(1.0 / every)))

    def _on_membership(self) -> None:
        """A random membership change on the leader: the core refuses what is not safe now
        (a change in flight, no entry of its term committed yet), as in the node."""
        if self.in_liveness:
            return
        rng = self._member_rng
        self._at(self.now + self._member_gap(), _MEMBERSHIP)
        leader = self._leader()
        if leader is None or not self._takes_input(leader):
            return
        core = leader.core
        assert core is not None
        conf = core_adapter.conf_of(core)[1]
        options: list[tuple[ConfChangeKind, int]] = []
        options += [(ConfChangeKind.ADD_LEARNER, n) for n in self.nodes if n not in conf.members]
        if len(conf.voters) < MEMBERSHIP_VOTERS_MAX:
            options += [(ConfChangeKind.PROMOTE, n) for n in sorted(conf.learners)]
        if len(conf.voters) > MEMBERSHIP_VOTERS_MIN:
            options += [(ConfChangeKind.REMOVE, n) for n in sorted(conf.voters)]
        options += [(ConfChangeKind.REMOVE, n) for n in sorted(conf.learners)]
        if not options:
            return
        kind, nid = rng.choice(options)
        try:
            index = core_adapter.propose_conf_change(core, kind, nid)
        except (ProposalDropped, NotRaftLeader, ValueError) as e:
            self._log(f"n{leader.id} membership {kind.name} n{nid} refused: {e}")
        else:
            self.stats.conf_changes += 1
            self._log(f"n{leader.id} proposes membership {kind.name} n{nid} at {index}")
        self._observe(leader)
        self._kick(leader)

    def _members(self) -> list[SimNode]:
        """The nodes liveness concerns: all of them, or (membership profile) the members of
        the configuration of the latest leader."""
        if not self.membership_every_ticks:
            return list(self.nodes.values())
        leader = self._leader()
        if leader is None or leader.core is None:
            return list(self.nodes.values())
        conf = core_adapter.conf_of(leader.core)[1]
        return [n for n in self.nodes.values() if n.id in conf.members]

    # ---- liveness ----------------------------------------------------------------------

    def _on_liveness_start(self) -> None:
        self.in_liveness = True
        self.liveness_start = self.now
        self.liveness_deadline = self.now + self._liveness_bound(0)  # for the restarts below
        self.net.heal()
        self.net.set_faults(False)
        self._log("LIVENESS phase: faults healed, all nodes up")
        for node in self.nodes.values():
            if not node.up:
                self._start(node)
                self._observe(node)
            elif node.paused:
                node.paused = False
                self._unblock(node)
        last = max(n.log.last_index for n in self.nodes.values())
        self.liveness_deadline = self.now + self._liveness_bound(last)

    def _liveness_bound(self, index: int) -> int:
        """Units allowed to get every node to ``index``: a few elections, plus the backlog
        at one entry per round trip (the narrowest flow-control window moves one entry per
        round trip, and the bound must not turn slow configurations into failures)."""
        opts = self.opts
        backlog = max(0, index - min(n.applied for n in self._members()))
        per_entry = 2 * (opts.latency_units_max + opts.sync_units_max) + TICK_UNITS
        return LIVENESS_ELECTIONS_MAX * opts.election_ticks * TICK_UNITS + backlog * per_entry

    def _liveness_done(self) -> bool:
        ack = self._liveness_ack
        if ack is None:
            return False
        return all(n.up and n.applied >= ack.index for n in self._members())

    def _liveness_failure(self) -> str:
        ack = self._liveness_ack
        states = ", ".join(
            f"n{n.id}:{n.role.name.lower()}/t{n.term}/applied{n.applied}"
            + ("/syncing" if n.syncing is not None else "")
            for n in self.nodes.values()
        )
        if ack is None:
            what = "no fresh proposal committed"
        else:
            what = f"proposal at {ack.index} committed but not applied everywhere"
        waited = (self.now - self.liveness_start) // TICK_UNITS
        return f"{what} within {waited} ticks of healing ({states})"


def _describe(msg: Message) -> str:
    text = f"n{msg.frm}->n{msg.to} {msg.kind.name} t{msg.term}"
    if msg.kind == MessageKind.APPEND:
        text += f" after ({msg.index},{msg.log_term}) +{len(msg.entries)} commit {msg.commit}"
    elif msg.kind == MessageKind.APPEND_RESP:
        text += f" index {msg.index}" + (f" REJECT hint {msg.reject_hint}" if msg.reject else "")
    elif msg.kind in (MessageKind.VOTE, MessageKind.PRE_VOTE):
        text += f" last ({msg.index},{msg.log_term})"
    elif msg.kind in (MessageKind.VOTE_RESP, MessageKind.PRE_VOTE_RESP):
        text += " REJECT" if msg.reject else " GRANT"
    elif msg.kind == MessageKind.SNAPSHOT and msg.snapshot is not None:
        text += f" at {msg.snapshot.meta.index}"
    return text


def _where(e: BaseException) -> str:
    """The innermost frame of an exception, as file:line, for the one-line report."""
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None:
        return "?"
    code = tb.tb_frame.f_code
    return f"{code.co_filename.rsplit('/', 1)[-1]}:{tb.tb_lineno} ({code.co_name})"


def run_seed(
    seed: int,
    trace: Trace | None = None,
    *,
    membership: bool = False,
    lazy_commit: bool = False,
) -> RunResult:
    return Simulation(seed, trace, membership=membership, lazy_commit=lazy_commit).run()
