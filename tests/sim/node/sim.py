"""The node-level simulation: the node's own code, several nodes in one process, one seed.

What runs is production code: ``node.multiraft.MultiRaft`` drives the groups, its Raft
storage is ``node.replica_storage.ReplicaStorage`` over ``node.log.PartitionLog`` files, and each
group's owner is a ``node.partition.Partition`` (propose, the acks=1 and acks=all waiters,
the high watermark, ``read``). What the simulation owns are the seams:

* time: :class:`~.loop.SimLoop`, an event loop on a virtual clock (``MultiRaft(clock=...)``
  and ``PartitionLog(clock_ms=...)`` read it too);
* the disk: :class:`~.disk.SimDisk` behind ``PartitionLog(fs=...)`` and
  :class:`~.disk.SimMetaStore` behind ``HardStateStore``;
* the fsync pool: :class:`~.loop.SimExecutor` (``MultiRaft(executor=...)``), whose delay
  is the fsync latency (and its stalls);
* the network: each node's ``Sender`` hands messages to :class:`Network`, which delivers
  them into the other node's ``MultiRaft.deliver`` after a delay, or drops them;
* randomness: one ``random.Random(seed)`` feeds everything, the Raft cores included.

A nemesis crashes nodes (process crash, or power loss that drops unsynced writes and
tears the last one), partitions and heals the network, stalls and fails fsyncs, and (when
the options say so) wipes a node's disk. In the ``move`` profile a mover also moves each
group's replicas at random moments (``Partition.set_target_replicas`` on every replica, as
the node does when it applies a controller target; a node named by a target opens a learner
replica), and the checks concern the group's final configuration. In the ``controller``
profiles every node also runs the controller's group 0 (``node.controller_node.Controller``
over the same seams, its snapshots included) under a workload of controller commands, checked
entry by entry (``controller.py``). In the ``wipe-majority`` profiles a majority of a group's
replicas lose their disks at once: nothing a survivor holds may be erased, and the group may
stay without a leader (the correct outcome). Producers send with acks=0, 1 and all to whoever
leads; consumers read committed records from the serving leader. Then everything heals,
the cluster must converge, and the checkers compare what clients were told with every
replica's final log (see :func:`check`).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import random
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from tidelog.config import TopicConfig
from tidelog.errors import (
    NodeUnavailable,
    NotEnoughReplicas,
    NotLeader,
    RequestTimedOut,
    StorageError,
    TidelogError,
)
from tidelog.node.identity import DIRECTORY_ID_KEY, machine_restarted
from tidelog.node.log import PartitionLog
from tidelog.node.metrics import NodeMetrics
from tidelog.node.multiraft import MultiRaft, RaftGroup, RaftTiming, _fsync_chunk
from tidelog.node.partition import Partition
from tidelog.node.raft.limits import Config
from tidelog.node.raft.types import ConfState, Message, Role, SoftState
from tidelog.node.raft_codec import decode_batch as decode_batch_pb
from tidelog.node.raft_codec import encode_batch as encode_batch_pb
from tidelog.node.replica_storage import HardStateStore
from tidelog.node.server import NODE_COLUMN
from tidelog.records import (
    HEADER_SIZE,
    decode_batches,
    encode_batch,
    read_header,
    unpack_header,
    validate_batches,
)
from tidelog.v1 import raft_pb2

from . import controller as ctlsim
from .disk import SimDisk, SimMetaStore
from .loop import SimExecutor, SimLoop

TOPIC = "t"
#: The id of every node's data directory at the first start (later ones: a wiped disk).
FIRST_DIRECTORY = "dir-1"
CLUSTER_ID = "sim"


# ---- options -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Options:
    seed: int
    nodes: int
    groups: int
    duration_s: float
    producers: int
    consumers: int
    drop: float
    crash_every_s: float
    power_loss: float
    partition_every_s: float
    stall_every_s: float
    fsync_fail_every_s: float
    wipe: float
    multi_batch: float
    flush_os: bool
    group_stall_every_s: float
    #: Run the controller group (Raft group 0, ``node/controller_node.py``) with a
    #: workload of controller commands, on this many voters (the other nodes learn).
    controller_voters: int = 0
    #: The controller snapshots its state every this many applied entries.
    controller_snapshot_entries: int = 10_000
    #: Wipe a majority of one group's replicas at once (profile ``wipe-majority``).
    wipe_majority: bool = False

    @classmethod
    def draw(cls, seed: int, rng: random.Random, profile: str = "default") -> Options:
        """``profile``: ``default``; ``wipe`` (a crash may also lose the whole disk);
        ``flush-os`` (the topic does not fsync its log: power losses lose acknowledged
        records, as documented, but the cluster must still heal); ``stall-one`` (no other
        fault: the fsyncs of ONE group stall on a node leading several, and the others
        must keep their leader); ``backpressure`` (leaders drop proposals beyond 2 KiB
        uncommitted, and most produce requests carry several batches); ``five`` (groups of
        five replicas, frequent fsync stalls: a new leader reaches a follower whose fsync
        of the old leader's entries is still running); ``move`` (four or five nodes, the
        default's faults, and replicas moved to random targets under load)."""
        if profile not in PROFILES:
            raise ValueError(f"unknown profile {profile!r}: use one of {PROFILES}")
        if profile == "move":
            return replace(cls.draw(seed, rng), nodes=rng.choice((4, 5)))
        if profile == "controller":
            o = cls.draw(seed, rng)
            # Fewer partition groups than the default (the controller is the subject),
            # and now and then a wiped disk (of a minority at a time).
            return replace(
                o,
                groups=1,
                controller_voters=3 if o.nodes == 3 else rng.choice((3, 5)),
                wipe=rng.choice((0.0, 0.0, 0.2)),
                controller_snapshot_entries=rng.choice((5, 12, 30, 10_000)),
            )
        if profile in ("wipe-majority", "wipe-majority-controller"):
            o = cls.draw(seed, rng)
            return replace(
                o,
                nodes=3,
                groups=1,
                duration_s=rng.uniform(2.0, 3.0),
                controller_voters=3 if profile == "wipe-majority-controller" else 0,
                wipe_majority=True,
                power_loss=0.0,
            )
        calm = rng.random() < 0.15 or profile == "stall-one"
        return cls(
            seed=seed,
            nodes=5 if profile == "five" else rng.choice((3, 3, 3, 5)),
            groups=rng.choice((2, 3)) if profile == "stall-one" else rng.choice((1, 1, 2)),
            duration_s=rng.uniform(1.5, 3.0),
            producers=rng.randint(1, 3),
            consumers=rng.randint(0, 2),
            drop=0.0 if calm else rng.choice((0.0, 0.01, 0.05)),
            crash_every_s=NEVER if calm else rng.uniform(0.7, 3.0),
            power_loss=rng.choice((0.0, 0.5, 1.0)),
            partition_every_s=NEVER if calm else rng.uniform(0.7, 3.0),
            stall_every_s=NEVER
            if calm
            else rng.uniform(0.2, 0.6)
            if profile == "five"
            else rng.uniform(0.8, 4.0),
            fsync_fail_every_s=NEVER if calm or rng.random() < 0.7 else rng.uniform(1.0, 4.0),
            wipe=rng.choice((0.1, 0.3)) if profile == "wipe" else 0.0,
            multi_batch=0.7 if profile == "backpressure" else rng.choice((0.0, 0.3)),
            flush_os=profile == "flush-os",
            group_stall_every_s=rng.uniform(0.5, 1.0) if profile == "stall-one" else NEVER,
        )

    def describe(self) -> str:
        return " ".join(f"{k}={getattr(self, k)}" for k in self.__slots__)


#: The period of a fault that does not happen.
NEVER = 99.0
TIMING = RaftTiming(tick_ms=10, heartbeat_interval_ms=30, election_timeout_ms=300)
RAFT_CONFIG = TIMING.config(Config(always_append_empty=False, lazy_commit=True))  # as topics.py
PROFILES = (
    "default",
    "wipe",
    "flush-os",
    "stall-one",
    "backpressure",
    "five",
    "move",
    "controller",
    "wipe-majority",
    "wipe-majority-controller",
)
#: The move profile: mean seconds between two replica moves.
MOVE_EVERY_S = 0.5
#: After an I/O error opening a replica's log, the node tries again this much later.
OPEN_RETRY_S = 0.2
#: The backpressure profile: a leader drops proposals beyond 2 KiB uncommitted.
RAFT_CONFIG_SMALL = replace(RAFT_CONFIG, max_msg_bytes=1024, max_uncommitted_bytes=2048)
TOPIC_CONFIG = TopicConfig.from_overrides({"segment.bytes": "4096", "index.interval.bytes": "256"})
TOPIC_CONFIG_OS = TopicConfig.from_overrides(
    {"segment.bytes": "4096", "index.interval.bytes": "256", "flush": "os"}
)


# ---- results -------------------------------------------------------------------------------


class Violation(Exception):
    def __init__(self, invariant: str, detail: str) -> None:
        super().__init__(f"{invariant}: {detail}")
        self.invariant = invariant
        self.detail = detail


@dataclass(slots=True)
class Stats:
    produced: int = 0
    acked_all: int = 0
    acked_one: int = 0
    refused: int = 0
    unknown: int = 0
    consumed: int = 0
    crashes: int = 0
    power_losses: int = 0
    partitions: int = 0
    stalls: int = 0
    fsync_failures: int = 0
    wipes: int = 0
    moves: int = 0
    messages: int = 0
    elections: int = 0
    virtual_s: float = 0.0
    #: Controller commands acknowledged, of them rejected by apply, entries applied.
    ctl_acked: int = 0
    ctl_rejected: int = 0
    ctl_applies: int = 0
    ctl_snapshots_restored: int = 0
    #: Groups left without a leader after a majority of replicas lost their disks.
    unavailable: str = ""


@dataclass(slots=True)
class RunResult:
    seed: int
    profile: str
    options: Options
    stats: Stats
    invariant: str = ""
    detail: str = ""
    trace: list[str] = field(default_factory=list)
    #: Every invariant the run broke (the first is ``invariant``), with its first detail.
    violations: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.invariant

    def line(self) -> str:
        profile = f" --profile {self.profile}" if self.profile != "default" else ""
        return (
            f"reproduce: .venv/bin/python -m tests.sim.node --seed {self.seed}{profile} -v  "
            f"# {self.invariant}: {self.detail}"
        )


# ---- network -------------------------------------------------------------------------------


class Network:
    """Delays, drops, reorders (independent delays) and partitions between nodes. Each
    message travels as the transport sends it: a ``RaftBatch`` encoded by
    ``node.raft_codec`` and decoded on arrival (without the per-stream heartbeat cache,
    as messages here are not one ordered stream)."""

    def __init__(self, sim: Simulation) -> None:
        self.sim = sim
        self.cut: set[tuple[int, int]] = set()
        #: Messages carrying entries, sent and not arrived yet (the records they hold are
        #: still somewhere after a power loss): id -> (group, message).
        self.in_flight: dict[int, tuple[int, Message]] = {}
        self._next_id = 0

    def send(self, frm: int, to: int, group: int, msg: Message) -> None:
        sim = self.sim
        sim.stats.messages += 1
        rng = sim.rng
        if (frm, to) in self.cut or rng.random() < sim.drop:
            return
        delay = rng.uniform(0.0005, 0.003)
        if rng.random() < 0.02:
            delay += rng.uniform(0.01, 0.2)  # a slow path: overtaken by later messages
        data = encode_batch_pb(frm, to, CLUSTER_ID, [(group, msg)]).SerializeToString()
        self._next_id += 1
        if msg.entries:
            self.in_flight[self._next_id] = (group, msg)
        sim.loop.call_later(delay, self._arrive, frm, to, data, self._next_id)

    def _arrive(self, frm: int, to: int, data: bytes, msg_id: int) -> None:
        self.in_flight.pop(msg_id, None)
        if (frm, to) in self.cut:
            return
        node = self.sim.nodes[to]
        if node.raft is not None and node.up:
            node.raft.deliver(frm, decode_batch_pb(raft_pb2.RaftBatch.FromString(data)))


class _Sender:
    def __init__(self, net: Network, node_id: int) -> None:
        self._net = net
        self._node_id = node_id

    def send(self, to_node: int, group: int, msg: Message) -> None:
        self._net.send(self._node_id, to_node, group, msg)


# ---- the partition with its promises watched --------------------------------------------


class WatchedLog(PartitionLog):
    """The real PartitionLog; a truncation remembers the terms of what it removed, so the
    partition can tell a conflict from identical entries cut and rewritten."""

    removed: dict[int, int]

    def truncate_suffix(self, offset: int) -> None:
        self.removed = {}
        if offset < self.log_end_offset:
            index = self.last_index
            while index >= self.first_index:
                end_before = self.end_offset_at_index(index - 1)
                term = self.term_at_index(index)
                if term is not None:
                    self.removed[index] = term
                if end_before is None or end_before <= offset:
                    break
                index -= 1
        super().truncate_suffix(offset)


class WatchedPartition(Partition):
    """The real Partition; the simulation only looks at the log at the moment each acks=1
    waiter is answered: the entry stored at its index must be the one it proposed."""

    __slots__ = ("sim_node",)
    sim_node: SimNode

    def on_soft_state(self, group: RaftGroup, soft: SoftState) -> None:
        was = self._sync_index is not None
        super().on_soft_state(group, soft)
        if was != (soft.role == Role.LEADER):
            raw = group.raw
            self.sim_node.sim.trace(
                f"node {self.sim_node.node_id} group {self.group_id}: {soft.role.name} in term "
                f"{raw.term} (log ends at {raw.last_index()}, commit {raw.commit_index})"
            )
            if soft.role == Role.LEADER:
                self.sim_node.sim.partition_elected(self, raw)

    def on_truncated(self, group: RaftGroup, from_index: int) -> None:
        lg = self.log
        if isinstance(lg, WatchedLog):
            old = lg.removed.get(from_index)
            new = lg.term_at_index(from_index)
            if old is not None and old == new:
                same = 0
                while lg.removed.get(from_index + same) == lg.term_at_index(from_index + same):
                    same += 1
                self.sim_node.sim.violate(
                    "identical entries truncated and rewritten",
                    f"node {self.sim_node.node_id} group {self.group_id}: the log was cut "
                    f"from raft index {from_index} though the {same} entries from there are "
                    f"the same entries (term {old}) rewritten (issue 8 defect 6)",
                )
        waiting = sum(
            1 for q in (self._commit_waiters, self._persist_waiters) for w in q
            if w.index >= from_index
        )  # fmt: skip
        self.sim_node.sim.trace(
            f"node {self.sim_node.node_id} group {self.group_id}: log truncated from raft "
            f"index {from_index} (term {group.raw.term}); {waiting} producer(s) told 'not "
            "committed'"
        )
        super().on_truncated(group, from_index)

    def on_persisted(self, group: RaftGroup, last_index: int) -> None:
        due = [w for w in self._persist_waiters if w.index <= last_index and not w.fut.done()]
        super().on_persisted(group, last_index)
        node: SimNode = self.sim_node
        for w in due:
            if not w.fut.done() or w.fut.cancelled() or w.fut.exception() is not None:
                continue
            stored = self.log.term_at_index(w.index)
            if stored != w.term:
                node.sim.violate(
                    "acks=1 answered for a record not stored",
                    f"node {node.node_id} group {self.group_id}: the waiter for raft index "
                    f"{w.index} of term {w.term} was told 'stored', but the log holds term "
                    f"{stored} there (issue 8 defect 1)",
                )


# ---- one node ------------------------------------------------------------------------------


class SimNode:
    def __init__(self, sim: Simulation, node_id: int) -> None:
        self.sim = sim
        self.node_id = node_id
        self.disk = SimDisk(random.Random(sim.rng.random()), f"node{node_id}")
        self.meta = SimMetaStore(random.Random(sim.rng.random()))
        self.metrics = NodeMetrics()
        self.up = False
        self.incarnation = 0
        self.raft: MultiRaft | None = None
        self.executor: SimExecutor | None = None
        self.parts: dict[int, WatchedPartition] = {}
        self.stall_until = 0.0
        #: Wiped, and maybe not caught up yet (see rebuilding).
        self.wiped = False
        #: The machine's boot (``/proc/sys/kernel/random/boot_id``): a power loss reboots it.
        self.boot = 1
        self.group_stall: dict[int, float] = {}
        #: Group 0 on this node (when the options run the controller).
        self.controller: ctlsim.WatchedController | None = None

    @property
    def directory_id(self) -> str:
        raw = self.meta.get(NODE_COLUMN, DIRECTORY_ID_KEY)
        return raw.decode() if raw is not None else ""

    def directory(self, group: int) -> Path:
        return Path(f"/node{self.node_id}/data/{TOPIC}/{group}")

    def fsync_delay(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> float:
        """How long a call in the fsync pool takes: a few ms, plus what is left of a stall
        of the whole disk, or of the disk of one group among those it fsyncs."""
        sim = self.sim
        base = sim.rng.uniform(0.0002, 0.004)
        now = sim.loop.time()
        until = self.stall_until
        if fn is _fsync_chunk and self.group_stall:
            for group in args[0]:
                until = max(until, self.group_stall.get(group.group_id, 0.0))
        if now < until:
            base += until - now
        return base

    def start(self) -> None:
        sim = self.sim
        self.incarnation += 1
        self.executor = SimExecutor(sim.loop, self.fsync_delay)
        raft = MultiRaft(
            self.node_id,
            HardStateStore(self.meta),  # type: ignore[arg-type]
            self.metrics,
            TIMING,
            sender=_Sender(sim.net, self.node_id),
            rng=random.Random(sim.rng.random()),
            executor=self.executor,
            clock=sim.loop.time,
        )
        # As node/server.py does: a data directory without an id is new (the first start,
        # or a wiped disk); every group started empty on it joins as a new replica.
        if self.meta.get(NODE_COLUMN, DIRECTORY_ID_KEY) is None:
            self.meta.put(NODE_COLUMN, DIRECTORY_ID_KEY, f"dir-{self.incarnation}".encode())
            assert self.incarnation > 1 or self.directory_id == FIRST_DIRECTORY
            raft.new_directory = True
        # As node/server.py does: a new boot id tells the node its page cache is gone.
        raft.machine_restarted = machine_restarted(self.meta, NODE_COLUMN, f"boot-{self.boot}")
        self.raft = raft
        self.parts = {}
        if sim.options.controller_voters:
            self.controller = ctlsim.open_controller(
                self, sim.controller_voters, sim.options.controller_snapshot_entries
            )
        for gid in sim.replicas:
            if self.node_id in sim.hosts[gid]:
                self.open_group(gid)
        self.up = True
        raft.start()
        sim.trace(f"node {self.node_id} started (incarnation {self.incarnation})")
        if self.controller is not None:
            sim.loop.create_task(ctlsim.register(self, self.incarnation))
            sim.loop.create_task(ctlsim.form(self, self.incarnation))

    def open_group(self, gid: int) -> None:
        """Open this node's replica of group ``gid`` (at start, or when a move names it)."""
        sim = self.sim
        raft = self.raft
        assert raft is not None
        replicas = sim.replicas[gid]
        try:
            lg = WatchedLog(
                self.directory(gid),
                sim.topic_config,
                clock_ms=sim.clock_ms,
                fs=self.disk,
            )
        except OSError as exc:
            if exc.errno != errno.EIO:
                sim.violate("log recovery failed", f"node {self.node_id} group {gid}: {exc!r}")
                raise
            # An injected fsync failure (fsync-fail): an I/O error of the disk, not a defect.
            # As node/topics.py does, the node reports it and opens the replica again later.
            sim.trace(f"node {self.node_id} group {gid}: cannot open the log ({exc}); retrying")
            incarnation = self.incarnation
            sim.loop.call_later(OPEN_RETRY_S, self._retry_open, gid, incarnation)
            return
        except Exception as exc:
            sim.violate("log recovery failed", f"node {self.node_id} group {gid}: {exc!r}")
            raise
        part = WatchedPartition(TOPIC, gid, lg, sim.topic_config, group_id=gid, replicas=replicas)
        part.sim_node = self
        moves = sim.profile == "move"
        voters = frozenset(replicas)
        # A replica opened for a move starts as a learner (it knows the initial group).
        learners = frozenset() if self.node_id in voters else frozenset({self.node_id})
        group = raft.add_group(
            gid,
            lg,
            ConfState(voters=voters, learners=learners),
            part,
            durable=not sim.options.flush_os,
            config=sim.raft_config,
            logged_conf=moves,
            # What the controller knows (node/topics.py): every group here was created on
            # the first data directories; on a later one (a wiped disk) it is older.
            bootstrap=self.directory_id == FIRST_DIRECTORY,
        )
        part.attach(group, raft)
        if moves:
            # Every node the controller named for the group since (its replicas and targets)
            # may talk to this replica (raft/guard.py).
            group.allowed_peers |= frozenset(sim.hosts[gid])
        self.parts[gid] = part
        target = sim.targets.get(gid)
        if target is not None:
            part.set_target_replicas(target)
        if group.raw.term == 0 and lg.last_index == 0 and replicas[0] == self.node_id:
            raft.campaign(group)

    def _retry_open(self, gid: int, incarnation: int) -> None:
        if (
            self.up
            and self.incarnation == incarnation
            and gid not in self.parts
            and self.node_id in self.sim.hosts[gid]
        ):
            self.open_group(gid)

    def rebuilding(self) -> bool:
        """Wiped and not yet caught up in every group it holds: another wipe now could take
        a majority of some group's replicas, a loss no replication protocol survives."""
        if not self.wiped:
            return False
        raft = self.raft
        if not self.up or raft is None or any(g.raw.lost_to for g in raft.groups.values()):
            return True
        self.wiped = False
        return False

    def crash(self, *, power: bool, wipe: bool = False) -> None:
        sim = self.sim
        self.up = False
        raft = self.raft
        if raft is not None:
            raft.abort()
        if self.executor is not None:
            self.executor.cancel_all()
        for part in self.parts.values():
            part.fail(NodeUnavailable("the simulated node crashed"))
        if self.controller is not None:
            self.controller.fail_waiters(NodeUnavailable("the simulated node crashed"))
            self.controller = None
        held = self.disk_records() if power and sim.options.flush_os else None
        what = self.disk.crash(power=power)
        self.boot += power
        if held is not None:
            sim.power_loss_took(self.node_id, held - self.disk_records())
        self.meta.crash(power=power)
        if wipe:
            self.disk.wipe()
            self.meta.wipe()
            self.wiped = True
            what = "disk wiped"
        self.raft = None
        self.parts = {}
        sim.stats.crashes += 1
        sim.stats.power_losses += power
        sim.trace(f"node {self.node_id} CRASHED: {what}")

    def disk_records(self) -> set[tuple[int, int, bytes]]:
        """(group, offset, value) of every record in this node's log files as its disk holds
        them (the page cache; after a power loss, what survived), up to a torn tail. Read
        from the files, not through a PartitionLog: opening one would recover it."""
        out: set[tuple[int, int, bytes]] = set()
        for gid in self.sim.hosts:
            d = str(self.directory(gid))
            try:
                names = self.disk.listdir(d)
            except FileNotFoundError:
                continue
            for name in names:
                if name.endswith(".log"):
                    data = self.disk.read_bytes(f"{d}/{name}")
                    out.update((gid, off, v) for off, v in _file_records(data))
        return out

    def disk_log(self, gid: int) -> PartitionLog:
        """This node's log of ``gid``: the open one, or (node down) recovered from its disk
        as a restart would."""
        part = self.parts.get(gid)
        if self.up and part is not None and isinstance(part.log, PartitionLog):
            return part.log
        return PartitionLog(self.directory(gid), self.sim.topic_config, fs=self.disk)

    def leader_part(self, gid: int) -> WatchedPartition | None:
        part = self.parts.get(gid)
        if self.up and part is not None and part.is_leader and not part.closed:
            return part
        return None


# ---- the client side record --------------------------------------------------------------


@dataclass(slots=True)
class Attempt:
    producer: int
    value: bytes
    group: int
    acks: int
    node: int
    sent_at: float
    outcome: str = "pending"  # ok, refused, failed, unknown, sent
    offset: int = -1
    index: int = -1
    term: int = -1
    detail: str = ""
    #: Batches in its produce request (they share one answer).
    batches: int = 1


# ---- the simulation -----------------------------------------------------------------------


class Simulation:
    def __init__(
        self, seed: int, *, profile: str = "default", trace: Callable[[str], None] | None = None
    ) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.profile = profile
        self.options = Options.draw(seed, random.Random(seed * 7919 + 1), profile)
        self.topic_config = TOPIC_CONFIG_OS if self.options.flush_os else TOPIC_CONFIG
        self.raft_config = RAFT_CONFIG_SMALL if profile == "backpressure" else RAFT_CONFIG
        self.loop = SimLoop()
        self.stats = Stats()
        self.net = Network(self)
        self.drop = self.options.drop
        self._trace_out = trace
        self.lines: list[str] = []
        self.violation: Violation | None = None
        self.violations: dict[str, str] = {}
        n = self.options.nodes
        self.nodes = {i: SimNode(self, i) for i in range(1, n + 1)}
        self.replicas: dict[int, tuple[int, ...]] = {}
        ids = list(range(1, n + 1))
        for g in range(1, self.options.groups + 1):
            if profile != "stall-one":  # there, one node is every group's preferred leader
                self.rng.shuffle(ids)
            self.replicas[g] = tuple(ids if profile == "five" else ids[:3])
        #: Nodes that hold a replica of each group: the initial replicas and every node a
        #: move named since (replicas are never deleted here: removed ones keep a prefix).
        self.hosts: dict[int, set[int]] = {g: set(r) for g, r in self.replicas.items()}
        #: The target each group's replicas were last told (move profile).
        self.targets: dict[int, frozenset[int]] = {}
        self.attempts: list[Attempt] = []
        self.observed: dict[tuple[int, int], bytes] = {}
        self.running = True
        #: The controller voters (when the options run the controller) and its checks.
        self.controller_voters = tuple(range(1, self.options.controller_voters + 1))
        self.controller_checks = ctlsim.ControllerChecks(self)
        #: Nodes the wipe-majority profile wiped (their logs start over).
        self.majority_wiped: set[int] = set()
        #: (group, value) of records only the wiped majority held (lost with it).
        self.lost_with_majority: set[tuple[int, bytes]] = set()
        #: Groups (and "controller") left without a leader after a majority wipe.
        self.unavailable: set[str] = set()
        #: (group, offset, value) of records a power loss under flush=os took from the last
        #: replica that held them (no log file, core or message in flight held them any
        #: more): the documented loss of flush=os, and nothing else, is excused.
        self.lost_in_power_loss: set[tuple[int, int, bytes]] = set()

    # ---- helpers ---------------------------------------------------------------------------

    def clock_ms(self) -> int:
        return 1_700_000_000_000 + int(self.loop.time() * 1000)

    def trace(self, line: str) -> None:
        text = f"{self.loop.time():9.4f}s {line}"
        self.lines.append(text)
        if self._trace_out is not None:
            self._trace_out(text)

    def violate(self, invariant: str, detail: str) -> None:
        """Record a broken invariant. The run goes on (the final checks are skipped): the
        first violation is the seed's result, later ones of other invariants are kept too."""
        if invariant not in self.violations:
            self.violations[invariant] = detail
            self.trace(f"VIOLATION {invariant}: {detail}")
        if self.violation is None:
            self.violation = Violation(invariant, detail)

    def controller_leader(self) -> ctlsim.WatchedController | None:
        best: ctlsim.WatchedController | None = None
        for node in self.nodes.values():
            ctl = node.controller
            if node.up and ctl is not None and ctl.is_leader and ctl.halted is None:
                if best is None or ctl.term > best.term:
                    best = ctl
        return best

    def power_loss_took(self, node_id: int, gone: set[tuple[int, int, bytes]]) -> None:
        """``gone``: the records node ``node_id``'s power loss removed from its disk. Those
        that no other node's log files, no running core's unstored entries and no message in
        flight hold are lost with it (flush=os: documented)."""
        if not gone:
            return
        held: set[tuple[int, int, bytes]] = set()
        for node in self.nodes.values():
            if node.node_id == node_id:
                continue
            held |= node.disk_records()
            if node.up and node.raft is not None:
                for gid, group in node.raft.groups.items():
                    _first, unstored = group.raw.unstored_entries()
                    held.update(_entry_records(gid, unstored))
        for gid, msg in self.net.in_flight.values():
            held.update(_entry_records(gid, msg.entries))
        lost = gone - held
        if lost:
            self.lost_in_power_loss |= lost
            self.trace(
                f"node {node_id}'s power loss took {len(lost)} record(s) from the last replica "
                f"holding them (flush=os, documented): "
                + ", ".join(f"g{g}@{o}={v!r}" for g, o, v in sorted(lost)[:8])
                + (" ..." if len(lost) > 8 else "")
            )

    def partition_elected(self, part: WatchedPartition, raw: Any) -> None:
        """A new leader must hold the last entry an acks=all producer was told is
        committed (by Log Matching, it then holds every committed entry before it too).
        Under flush=os, not those a power loss took from the last replica holding them
        (documented)."""
        best: Attempt | None = None
        for a in self.attempts:
            if (
                a.group == part.group_id
                and a.acks == -1
                and a.outcome == "ok"
                and ((a.group, a.value) not in self.lost_with_majority)
                and ((a.group, a.offset, a.value) not in self.lost_in_power_loss)
            ):
                if best is None or a.index > best.index:
                    best = a
        if best is None or best.index < raw.first_index():
            return
        if raw.term_at(best.index) != best.term:
            self.violate(
                "a leader lacks committed entries",
                f"group {part.group_id}: node {part.sim_node.node_id} leads in term "
                f"{raw.term} with a log ending at {raw.last_index()}, without raft index "
                f"{best.index} (term {best.term}) that acks=all acknowledged "
                f"({best.value!r})",
            )

    def leader(self, gid: int) -> WatchedPartition | None:
        best: WatchedPartition | None = None
        for node in self.nodes.values():
            part = node.leader_part(gid)
            if part is not None and (best is None or part.term > best.term):
                best = part
        return best

    # ---- workload --------------------------------------------------------------------------

    async def producer(self, pid: int) -> None:
        rng = random.Random(self.rng.random())
        seq = 0
        while self.running:
            await asyncio.sleep(rng.uniform(0.01, 0.06))
            gid = rng.choice(list(self.replicas))
            part = self.leader(gid)
            if part is None:
                continue
            acks = rng.choice((0, 1, -1, -1))
            n = 2 if rng.random() < self.options.multi_batch else 1
            if n > 1 and self.profile == "backpressure":
                n = rng.randint(2, 4)
            values = []
            for _ in range(n):
                seq += 1
                values.append(f"p{pid}-{seq}".encode())
            asyncio.get_running_loop().create_task(self.produce(pid, part, gid, acks, values))

    async def produce(
        self, pid: int, part: WatchedPartition, gid: int, acks: int, values: list[bytes]
    ) -> None:
        node = part.sim_node
        buf = b"".join(encode_batch([v], timestamps_ms=self.clock_ms()) for v in values)
        headers = validate_batches(buf)
        now = self.loop.time()
        attempts = [
            Attempt(pid, v, gid, acks, node.node_id, now, batches=len(values)) for v in values
        ]
        self.attempts += attempts
        self.stats.produced += len(values)
        try:
            base, _last, last_index, term = part.propose(buf, headers)
        except (NotLeader, NotEnoughReplicas, TidelogError) as exc:
            for a in attempts:
                a.outcome, a.detail = "refused", f"{type(exc).__name__}: {exc}"
            self.stats.refused += len(values)
            return
        first_index = last_index - len(values) + 1
        for i, a in enumerate(attempts):
            a.offset, a.index, a.term = base + i, first_index + i, term
        if acks == 0:
            for a in attempts:
                a.outcome = "sent"
            return
        try:
            # As the broker service waits: each batch's entry, in request order.
            await part.wait_batches(
                [(a.index, a.term) for a in attempts], committed=acks == -1, timeout_s=2.0
            )
        except NotLeader as exc:
            # The partition says: overwritten or replaced, not committed; all of them, or
            # all but the first batches_stored (those were committed, or stored for acks=1).
            stored = int(exc.metadata.get("batches_stored", "0"))
            if stored:
                self.trace(
                    f"producer {pid}: group {gid} node {node.node_id}: {stored} of "
                    f"{len(attempts)} batches stored, the rest overwritten (batches_stored)"
                )
            for i, a in enumerate(attempts):
                if i < stored:
                    a.outcome = "ok"
                else:
                    a.outcome, a.detail = "failed", str(exc)
            if acks == -1:
                self.stats.acked_all += stored
            else:
                self.stats.acked_one += stored
            return
        except (RequestTimedOut, NodeUnavailable, StorageError, TidelogError) as exc:
            for a in attempts:
                a.outcome, a.detail = "unknown", f"{type(exc).__name__}"
            self.stats.unknown += len(values)
            return
        for a in attempts:
            a.outcome = "ok"
        if acks == -1:
            self.stats.acked_all += len(values)
        else:
            self.stats.acked_one += len(values)

    async def consumer(self, cid: int, gid: int) -> None:
        rng = random.Random(self.rng.random())
        offset = 0
        while self.running:
            await asyncio.sleep(rng.uniform(0.005, 0.05))
            part = self.leader(gid)
            if part is None or not part.serving:
                continue
            if offset >= part.high_watermark:
                continue
            try:
                buf = part.read(offset, 16384)
            except TidelogError as exc:
                self.violate(
                    "consumer read failed",
                    f"group {gid} node {part.sim_node.node_id}: offset {offset}: {exc}",
                )
                return
            for rec in decode_batches(buf, min_offset=offset):
                assert rec.value is not None
                key = (gid, rec.offset)
                seen = self.observed.get(key)
                if seen is not None and seen != rec.value:
                    if (gid, rec.offset, seen) in self.lost_in_power_loss:
                        self.trace(
                            f"consumer: group {gid} offset {rec.offset} is {rec.value!r} now; "
                            f"{seen!r}, seen there before, was lost in a power loss (flush=os)"
                        )
                        self.observed[key] = rec.value
                        continue
                    self.violate(
                        "consumer saw two records at one offset",
                        f"group {gid} offset {rec.offset}: {seen!r} then {rec.value!r} "
                        f"(from node {part.sim_node.node_id})",
                    )
                self.observed[key] = rec.value
                self.stats.consumed += 1
                offset = rec.offset + 1
            # Control batches advance the offset too.
            for pos_h in _headers(buf):
                offset = max(offset, pos_h + 1)

    # ---- nemesis ---------------------------------------------------------------------------

    async def nemesis(self) -> None:
        o = self.options
        rng = random.Random(self.rng.random())
        loop = self.loop
        kinds: list[tuple[float, str]] = [
            (o.crash_every_s, "crash"),
            (o.partition_every_s, "partition"),
            (o.stall_every_s, "stall"),
            (o.fsync_fail_every_s, "fsync-fail"),
            (o.group_stall_every_s, "group-stall"),
        ]
        kinds = [(every, k) for every, k in kinds if every < NEVER]
        next_at = {k: loop.time() + rng.expovariate(1 / every) for every, k in kinds}
        every_of = {k: every for every, k in kinds}
        while self.running and next_at:
            kind = min(next_at, key=lambda k: next_at[k])
            await asyncio.sleep(max(0.0, next_at[kind] - loop.time()))
            if not self.running:
                return
            next_at[kind] = loop.time() + rng.expovariate(1 / every_of[kind])
            ids = list(self.nodes)
            # Leaders are the interesting victims: half the time the fault hits one.
            leaders = [
                p.sim_node.node_id for p in (self.leader(g) for g in self.replicas) if p is not None
            ]
            target = rng.choice(leaders) if leaders and rng.random() < 0.5 else rng.choice(ids)
            if kind == "crash":
                up = [i for i in ids if self.nodes[i].up]
                if len(up) <= len(ids) // 2:
                    continue
                victim = self.nodes[target if target in up else rng.choice(up)]
                power = rng.random() < o.power_loss
                # Raft's fault model: at most a minority of a group's replicas lose their
                # disk at a time, so one wiped node rebuilds before another is wiped.
                wipe = rng.random() < o.wipe and not any(
                    n.rebuilding() for n in self.nodes.values() if n is not victim
                )
                victim.crash(power=power, wipe=wipe)
                self.stats.wipes += wipe
                loop.call_later(rng.uniform(0.05, 1.0), self._restart, victim)
            elif kind == "partition":
                if self.net.cut:
                    continue
                rng.shuffle(ids)
                k = rng.randint(1, len(ids) // 2)
                side = {target} if rng.random() < 0.5 else set(ids[:k])
                one_way = rng.random() < 0.2
                for a in ids:
                    for b in ids:
                        if (a in side) != (b in side) and (not one_way or a in side):
                            self.net.cut.add((a, b))
                self.stats.partitions += 1
                self.trace(f"network partition: {sorted(side)} cut off{' (one way)' * one_way}")
                loop.call_later(rng.uniform(0.1, 1.5), self._heal)
            elif kind == "stall":
                node = self.nodes[target]
                node.stall_until = loop.time() + rng.uniform(0.1, 1.5)
                self.stats.stalls += 1
                self.trace(f"node {node.node_id}: fsyncs stall until {node.stall_until:.3f}")
            elif kind == "group-stall":
                self._stall_one_group(rng)
            elif kind == "fsync-fail":
                node = self.nodes[target]
                if node.up:
                    node.disk.fail_next_fsyncs = 1
                    self.stats.fsync_failures += 1
                    self.trace(f"node {node.node_id}: the next fsync fails")

    async def wipe_majority(self) -> None:
        """Profile ``wipe-majority``: once, a majority of the replicas of group 1 (and of
        the controller's voters, when it runs: the same three nodes) lose their whole data
        directory at once and restart on empty disks. Their directories are new (issue 8
        item 3): they are new replicas, which must not elect anyone lacking what the group
        committed. The group may stay without a leader: the correct outcome."""
        rng = random.Random(self.rng.random())
        o = self.options
        await asyncio.sleep(rng.uniform(0.35, 0.6) * o.duration_s)
        if not self.running:
            return
        victims = rng.sample(sorted(self.replicas[1]), len(self.replicas[1]) // 2 + 1)
        self.trace(f"MAJORITY WIPE: nodes {victims} lose their data directories")
        # What only the wiped replicas held is gone, whatever the protocol: not counted.
        # Everything a survivor holds must stay (no leader may erase it).
        survivors = [self.nodes[n] for n in self.replicas[1] if n not in victims]
        logs = [n.disk_log(1) for n in survivors]
        for a in self.attempts:
            if a.group == 1 and a.outcome == "ok" and a.acks == -1:
                if not any(lg.term_at_index(a.index) == a.term for lg in logs):
                    self.lost_with_majority.add((1, a.value))
        held = [set(self._log_records(lg).items()) for lg in logs]
        for (gid, off), v in self.observed.items():
            if gid == 1 and not any((off, v) in h for h in held):
                self.lost_with_majority.add((1, v))
        if self.lost_with_majority:
            self.trace(
                f"{len(self.lost_with_majority)} acknowledged or consumed record(s) were on "
                f"the wiped replicas only (nodes {[n.node_id for n in survivors]} never got "
                "them): lost with them, not counted"
            )
        if o.controller_voters:
            ctlsim.lost_with_majority(self, victims)
        for nid in victims:
            node = self.nodes[nid]
            if node.up:
                node.crash(power=True, wipe=True)
            else:
                node.disk.wipe()
                node.meta.wipe()
                node.wiped = True
                self.trace(f"node {nid} (down) disk wiped")
            self.stats.wipes += 1
            self.majority_wiped.add(nid)
            self.loop.call_later(rng.uniform(0.05, 0.5), self._restart, node)

    async def mover(self) -> None:
        """Moves a random group's replicas to a random set of three nodes, now and then, as
        the controller would: every node the target names hosts a replica, and every up
        replica is told the target (a restarted node is told at its start)."""
        rng = random.Random(self.rng.random())
        ids = sorted(self.nodes)
        while self.running:
            await asyncio.sleep(rng.expovariate(1 / MOVE_EVERY_S))
            if not self.running:
                return
            gid = rng.choice(sorted(self.replicas))
            target = frozenset(rng.sample(ids, 3))
            self.targets[gid] = target
            self.stats.moves += 1
            self.trace(f"group {gid}: move to {sorted(target)}")
            for nid in sorted(target - self.hosts[gid]):
                self.hosts[gid].add(nid)
                node = self.nodes[nid]
                if node.up and gid not in node.parts:
                    node.open_group(gid)
            for node in self.nodes.values():
                part = node.parts.get(gid)
                if node.up and part is not None and not part.closed:
                    part.set_target_replicas(target)

    def members(self, gid: int) -> list[int]:
        """The replicas the checks concern: the initial ones, or (move profile) the members
        of the configuration of the group's leader."""
        if self.profile != "move":
            return list(self.replicas[gid])
        lead = self.leader(gid)
        if lead is None or lead.group is None:
            return sorted(self.hosts[gid])
        return sorted(lead.group.raw.conf_state.members)

    def _stall_one_group(self, rng: random.Random) -> None:
        """Stall the fsyncs of one group on a node that leads others too; when the stall
        ends, those others must still be led by it in the same term."""
        now = self.loop.time()
        for node in self.nodes.values():
            if any(until > now for until in node.group_stall.values()):
                return
        by_node: dict[int, list[int]] = {}
        for gid in self.replicas:
            part = self.leader(gid)
            if part is not None:
                by_node.setdefault(part.sim_node.node_id, []).append(gid)
        choices = sorted(nid for nid, gids in by_node.items() if len(gids) >= 2)
        if not choices:
            return
        node = self.nodes[rng.choice(choices)]
        stalled = rng.choice(by_node[node.node_id])
        others = [(g, node.parts[g].term) for g in by_node[node.node_id] if g != stalled]
        length = rng.uniform(1.0, 1.5)
        node.group_stall[stalled] = now + length
        self.stats.stalls += 1
        self.trace(
            f"node {node.node_id}: fsyncs of group {stalled} stall for {length:.3f}s "
            f"(it also leads {[g for g, _t in others]})"
        )

        def check() -> None:
            for g, term in others:
                part = node.parts.get(g)
                if node.up and (part is None or not part.is_leader or part.term != term):
                    self.violate(
                        "a slow fsync of one group cost another group its leader",
                        f"node {node.node_id} led group {g} in term {term}; after a "
                        f"{length:.2f}s stall of group {stalled}'s fsyncs it "
                        f"{'leads in term ' + str(part.term) if part and part.is_leader else 'no longer leads'}"
                        " (issue 8 defect 5)",
                    )

        self.loop.call_later(length, check)

    def _restart(self, node: SimNode) -> None:
        if node.up:
            return
        try:
            node.start()
        except Exception as exc:
            self.violate("restart failed", f"node {node.node_id}: {exc!r}")

    def _heal(self) -> None:
        if self.net.cut:
            self.net.cut.clear()
            self.trace("network healed")

    # ---- the run ---------------------------------------------------------------------------

    async def main(self) -> None:
        o = self.options
        self.trace(f"seed {self.seed}: {o.describe()} replicas={self.replicas}")
        for node in self.nodes.values():
            node.start()
        loop = self.loop
        tasks = [loop.create_task(self.producer(p)) for p in range(o.producers)]
        tasks += [
            loop.create_task(self.consumer(c, gid))
            for c in range(o.consumers)
            for gid in self.replicas
        ]
        tasks.append(loop.create_task(self.nemesis()))
        if self.profile == "move":
            tasks.append(loop.create_task(self.mover()))
        if o.controller_voters:
            tasks += [loop.create_task(ctlsim.workload(self, w)) for w in range(2)]
        if o.wipe_majority:
            tasks.append(loop.create_task(self.wipe_majority()))
        await asyncio.sleep(o.duration_s)
        self.running = False
        self.trace("workload over: healing everything")
        self.net.cut.clear()
        self.drop = 0.0
        for node in self.nodes.values():
            node.stall_until = 0.0
            node.disk.fail_next_fsyncs = 0
        await asyncio.sleep(0.05)
        for node in self.nodes.values():
            if not node.up:
                self._restart(node)
            elif any(g.failed for g in node.raft.groups.values()):  # type: ignore[union-attr]
                # An operator restarts a node whose disk failed an fsync.
                self.trace(f"node {node.node_id}: restarted after a storage failure")
                node.crash(power=False)
                self._restart(node)
        await self.converge()
        for t in tasks:
            t.cancel()

    async def converge(self) -> None:
        deadline = self.loop.time() + 15.0
        while self.loop.time() < deadline:
            await asyncio.sleep(0.05)
            if self.violation is not None:
                return
            if all(self._converged(gid) for gid in self.replicas) and (
                not self.options.controller_voters or ctlsim.converged(self)
            ):
                return
        if self.majority_wiped and self._unavailable():
            return
        for gid in self.replicas:
            lead = self.leader(gid)
            if lead is None or lead.group is None:
                continue
            last = lead.group.raw.last_index()
            for nid in self.members(gid):
                part = self.nodes[nid].parts.get(gid)
                if part is not None and part.group is not None:
                    if part.group.raw.commit_index > last:
                        self.violate(
                            "a leader lacks committed entries",
                            f"group {gid}: node {lead.sim_node.node_id} leads in term "
                            f"{lead.term} with a log ending at {last}, node {nid} knows "
                            f"{part.group.raw.commit_index} committed",
                        )
                        return
        states = []
        for gid in self.replicas:
            for nid in self.members(gid):
                node = self.nodes[nid]
                part = node.parts.get(gid)
                if part is None or part.group is None:
                    states.append(f"g{gid}/n{nid}: down")
                    continue
                raw = part.group.raw
                states.append(
                    f"g{gid}/n{nid}: {raw.role.name} term {raw.term} last "
                    f"{raw.last_index()} commit {raw.commit_index} "
                    f"failed={part.group.failed}"
                )
        if self.options.controller_voters:
            states += ctlsim.describe(self)
        self.violate("no convergence after healing (15 s)", "; ".join(states))

    def _unavailable(self) -> bool:
        """After a majority wipe: whether every group that did not converge is one without
        a leader (it stays unavailable, the correct outcome: its committed entries are on a
        minority of replicas only); those are recorded in ``unavailable``."""
        stuck = {str(g) for g in self.replicas if not self._converged(g)}
        if self.options.controller_voters and not ctlsim.converged(self):
            stuck.add("controller")
        for name in stuck:
            if name == "controller":
                if self.controller_leader() is not None:
                    return False
            elif self.leader(int(name)) is not None:
                return False
        self.unavailable = stuck
        self.stats.unavailable = ",".join(sorted(stuck))
        self.trace(f"left without a leader after the majority wipe (correct): {sorted(stuck)}")
        return True

    def _converged(self, gid: int) -> bool:
        leader = self.leader(gid)
        if leader is None or not leader.serving or leader.group is None:
            return False
        raw = leader.group.raw
        last = raw.last_index()
        if raw.commit_index != last:
            return False
        if self.profile == "move" and raw.conf_change_pending:
            return False
        for nid in self.members(gid):
            part = self.nodes[nid].parts.get(gid)
            if part is None or part.group is None or part.group.failed:
                return False
            # Committed everywhere, and stored: a follower may hold an uncommitted suffix of
            # an old term (a leader appends no empty entry), which is no business of ours.
            # Stored means the core has nothing of the log up to ``last`` left to write: a
            # follower learns the commit with the entries that replace its old suffix, and
            # until its Ready is stored its log file still holds the old, uncommitted ones
            # (never applied: check() would compare those against the leader's).
            member = part.group.raw
            unstored_from, unstored = member.unstored_entries()
            if member.commit_index != last or part.log.last_index < last:
                return False
            if unstored and unstored_from <= last:
                return False
        return True

    # ---- checkers --------------------------------------------------------------------------

    def check(self) -> None:
        """After convergence: every replica's committed log identical; every acks=all
        record at its offset; no refused or failed record committed; every record a consumer
        saw still at its offset."""
        final: dict[int, dict[int, bytes]] = {}
        if "controller" in self.unavailable:
            ctlsim.check_unavailable(self)
        for gid in self.replicas:
            if str(gid) in self.unavailable:
                final[gid] = self._surviving_records(gid)
                continue
            ref: list[tuple[int, int, int]] | None = None
            ref_node = 0
            members = self.members(gid)
            others = sorted(self.hosts[gid] - set(members))
            for nid in [*members, *others]:
                part = self.nodes[nid].parts[gid]
                assert part.group is not None
                commit = part.group.raw.commit_index
                lg = part.log
                entries = lg.entries_by_index(lg.first_index, commit + 1, 1 << 40)
                digest = [
                    (unpack_header(d).raft_index, unpack_header(d).raft_term, zlib.crc32(d))
                    for d in entries
                ]
                if ref is None:
                    ref, ref_node = digest, nid
                    values: dict[int, bytes] = {}
                    for d in entries:
                        for rec in decode_batches(d):
                            assert rec.value is not None
                            values[rec.offset] = rec.value
                    final[gid] = values
                elif nid in others and digest == ref[: len(digest)]:
                    pass  # a replica removed from the group holds a prefix of its log
                elif digest != ref:
                    diff = next(
                        (i for i, (a, b) in enumerate(zip(digest, ref, strict=False)) if a != b),
                        min(len(digest), len(ref)),
                    )
                    raise Violation(
                        "committed logs differ",
                        f"group {gid}: node {nid} and node {ref_node} differ at entry #{diff}: "
                        f"{digest[diff : diff + 1]} vs {ref[diff : diff + 1]}",
                    )
        where: dict[tuple[int, bytes], int] = {}
        for gid, values in final.items():
            for off, v in values.items():
                if (gid, v) in where:
                    continue
                where[(gid, v)] = off
        for a in self.attempts:
            at = where.get((a.group, a.value))
            if str(a.group) in self.unavailable and a.outcome != "ok":
                continue  # the survivor's log holds uncommitted entries: no verdict on them
            if (a.group, a.value) in self.lost_with_majority:
                continue
            if (a.group, a.offset, a.value) in self.lost_in_power_loss:
                continue  # documented: flush=os lost it with the last replica holding it
            if a.outcome == "ok" and a.acks == -1:
                if at is None:
                    raise Violation(
                        "acknowledged record lost",
                        f"{a.value!r} (acks=all, group {a.group}, offset {a.offset}, raft "
                        f"index {a.index} term {a.term}, via node {a.node} at {a.sent_at:.3f}s)",
                    )
                if at != a.offset:
                    raise Violation(
                        "acknowledged record moved",
                        f"{a.value!r} acknowledged at offset {a.offset}, stored at {at}",
                    )
            elif a.outcome == "refused" and at is not None:
                raise Violation(
                    "a refused batch was committed",
                    f"{a.value!r} (acks={a.acks}, group {a.group}, via node {a.node} at "
                    f"{a.sent_at:.3f}s, one of a multi-batch request): refused with "
                    f"{a.detail!r}; it is at offset {at} (issue 8 defect 7)",
                )
            elif a.outcome == "failed" and at is not None:
                raise Violation(
                    "a batch of a request told 'not committed' was committed"
                    if a.batches > 1
                    else "record told 'not committed' was committed",
                    f"{a.value!r} (acks={a.acks}, group {a.group}, raft index {a.index} term "
                    f"{a.term}, via node {a.node} at {a.sent_at:.3f}s, batch of a request of "
                    f"{a.batches}): told {a.detail!r}; it is at offset {at}"
                    + (
                        " (issue 8 defect 7: a multi-batch request gets one answer)"
                        if a.batches > 1
                        else ""
                    ),
                )
        for (gid, off), v in self.observed.items():
            if (gid, v) in self.lost_with_majority or (gid, off, v) in self.lost_in_power_loss:
                continue
            got = final[gid].get(off)
            if got != v:
                raise Violation(
                    "a record a consumer saw is gone",
                    f"group {gid} offset {off}: consumer saw {v!r}, final log has {got!r}",
                )

    def _surviving_records(self, gid: int) -> dict[int, bytes]:
        """A group left without a leader: the records of the whole logs of the replicas
        that kept their disks (what acks=all acknowledged must all be there, at their
        offsets; two survivors must agree where their logs overlap)."""
        values: dict[int, bytes] = {}
        for nid in sorted(set(self.replicas[gid]) - self.majority_wiped):
            for off, v in self._log_records(self.nodes[nid].disk_log(gid)).items():
                old = values.setdefault(off, v)
                if old != v:
                    raise Violation(
                        "surviving replicas differ",
                        f"group {gid} offset {off}: {old!r} vs {v!r} (node {nid})",
                    )
        return values

    @staticmethod
    def _log_records(lg: PartitionLog) -> dict[int, bytes]:
        out: dict[int, bytes] = {}
        for d in lg.entries_by_index(lg.first_index, lg.last_index + 1, 1 << 40):
            for rec in decode_batches(d):
                assert rec.value is not None
                out[rec.offset] = rec.value
        return out

    def run(self) -> RunResult:
        loop = self.loop
        handler = _ErrorCapture(self)
        root = logging.getLogger("tidelog")
        root.addHandler(handler)
        old_level = root.level
        root.setLevel(logging.WARNING)
        try:
            asyncio.set_event_loop(loop)
            loop.run_until_complete(self.main())
            if self.violation is None:
                self.check()
        except Violation as v:
            self.violate(v.invariant, v.detail)
        except Exception as exc:
            import traceback

            self.violate("simulation crashed", "".join(traceback.format_exception(exc))[-1500:])
        finally:
            root.removeHandler(handler)
            root.setLevel(old_level)
            self.stats.virtual_s = loop.time()
            checks = self.controller_checks
            self.stats.ctl_acked = checks.acknowledged
            self.stats.ctl_rejected = checks.rejected
            self.stats.ctl_applies = checks.applies
            self.stats.ctl_snapshots_restored = checks.snapshots_restored
            _close(loop)
            asyncio.set_event_loop(None)
        found = self.violation
        result = RunResult(self.seed, self.profile, self.options, self.stats, trace=self.lines)
        if found is not None:
            result.invariant, result.detail = found.invariant, found.detail
            result.violations = dict(self.violations)
        return result


def _file_records(data: bytes) -> list[tuple[int, bytes]]:
    """(offset, value) of the data records of a segment file's batches, up to a torn tail."""
    out: list[tuple[int, bytes]] = []
    pos = 0
    while pos + HEADER_SIZE <= len(data):
        try:
            h = read_header(data, pos)
            if pos + h.size > len(data):
                break
            records = decode_batches(data[pos : pos + h.size])
        except (TidelogError, ValueError):
            break
        out.extend((r.offset, r.value) for r in records if r.value is not None)
        pos += h.size
    return out


def _entry_records(gid: int, entries: Any) -> set[tuple[int, int, bytes]]:
    """(group, offset, value) of the records of Raft entries (stamped batches)."""
    out: set[tuple[int, int, bytes]] = set()
    for e in entries:
        if e.data:
            for r in decode_batches(e.data):
                if r.value is not None:
                    out.add((gid, r.offset, r.value))
    return out


def _headers(buf: bytes) -> list[int]:
    """Last offsets of the batches in ``buf``."""
    from tidelog.records import iter_headers

    return [h.last_offset for _pos, h in iter_headers(buf)]


class _ErrorCapture(logging.Handler):
    """Node log lines at WARNING and above go to the trace; an exception the node's code
    logged (a round that failed, a message a core rejected) is a violation unless the
    simulation injected the fault that caused it."""

    def __init__(self, sim: Simulation) -> None:
        super().__init__(logging.WARNING)
        self.sim = sim

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        self.sim.trace(f"[{record.name.removeprefix('tidelog.')}] {msg}")
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            if isinstance(exc, OSError | StorageError):
                return
            self.sim.violate(
                "the node's code raised",
                f"{msg}: {type(exc).__name__}: {exc}",
            )


def _close(loop: SimLoop) -> None:
    with contextlib.suppress(Exception):
        for task in asyncio.all_tasks(loop):
            task.cancel()
        loop.run_until_complete(asyncio.sleep(0))
    with contextlib.suppress(Exception):
        loop.close()


def run_seed(
    seed: int, *, profile: str = "default", trace: Callable[[str], None] | None = None
) -> RunResult:
    return Simulation(seed, profile=profile, trace=trace).run()


__all__ = ["Options", "RunResult", "Simulation", "Stats", "run_seed"]
