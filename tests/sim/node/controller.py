"""The controller group in the node simulation: the node's own ``Controller`` (Raft group 0
and its apply into ``ClusterState``), a workload of controller commands, and the checks.

What runs is production code: ``node.controller_node.Controller`` opened over a
``PartitionLog`` on the simulated disk, driven by the node's ``MultiRaft`` like every other
group (the same seams: virtual clock, simulated disk and fsync pool, simulated network).
Only the gRPC side of the controller (forwarding, heartbeats, liveness monitoring) is not
started: the workload proposes on the active controller as ``Controller.handle_forward``
does (the sync step, then ``propose``), and each node registers itself as
``Controller._register`` would.

:class:`WatchedController` watches the apply hook (``Controller._apply``) and reports every
applied entry to :class:`ControllerChecks`, which asserts, as the run goes:

* no node skips an entry: each start of a node applies indexes 1, 2, 3, ... (or from its
  snapshot on) without a gap;
* every node applied the same entry (term and bytes) and reached the same state (a CRC of
  ``ClusterState.snapshot()``, canonical bytes) at every index it applied, on every start;
* a command the controller acknowledged (``propose`` returned its index) is the command
  every node applies at that index.

After healing, every node must have applied the controller log up to its leader's last
index (convergence).
"""

from __future__ import annotations

import asyncio
import random
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from tidelog.controller.commands import (
    NODE_ACTIVE,
    NODE_DRAINING,
    AllocateProducerIds,
    AlterTopicConfig,
    Command,
    CreateTopic,
    DeleteTopic,
    LeaderHint,
    MarkNodeAlive,
    MarkNodeDead,
    MovePartitions,
    PartitionMove,
    RegisterNode,
    ReplicaReport,
    SetClusterConfig,
    SetNodeState,
    UpdatePartitionLeaders,
    UpdatePartitionReplicas,
    encode_command,
)
from tidelog.controller.settings import LEADER_BALANCE_ENABLE, MOVES_CONCURRENT_MAX
from tidelog.controller.state import ApplyResult
from tidelog.errors import NodeIdentityConflict, TidelogError
from tidelog.node.controller_bootstrap import Outcome, PeerAnswer, decide
from tidelog.node.controller_node import Controller
from tidelog.node.controller_snapshots import SNAPSHOT_FILE
from tidelog.node.raft.types import Entry, EntryKind, Role, Snapshot, SoftState
from tidelog.records import decode_values

if TYPE_CHECKING:
    from .sim import SimNode, Simulation

#: Where a node keeps the controller log on its simulated disk.
CONTROLLER_DIR = "controller"


class WatchedController(Controller):
    """The real Controller; every entry its apply hook sees is reported to the checks."""

    sim_node: SimNode
    #: The next index this start of the node must apply.
    next_apply: int = 1

    def on_role_change(self, soft: SoftState, was_leader: bool) -> None:
        super().on_role_change(soft, was_leader)
        if was_leader != (soft.role == Role.LEADER) and self.group is not None:
            raw = self.group.raw
            self.sim_node.sim.trace(
                f"node {self.node_id} controller: {soft.role.name} in term {raw.term} (log "
                f"ends at {raw.last_index()}, commit {raw.commit_index}, applied "
                f"{self.applied_index})"
            )
            if soft.role == Role.LEADER:
                self.sim_node.sim.controller_checks.elected(self)

    def restore_snapshot(self, snapshot: Snapshot) -> None:
        super().restore_snapshot(snapshot)
        self.sim_node.sim.controller_checks.restored(self, "installed from the leader")

    def _apply(self, e: Entry) -> ApplyResult | None:
        result = super()._apply(e)
        self.sim_node.sim.controller_checks.applied(self, e, result)
        return result


class ControllerChecks:
    """The controller invariants of the module docstring, checked at every apply."""

    def __init__(self, sim: Simulation) -> None:
        self.sim = sim
        #: index -> (entry term, CRC of its bytes, CRC of the state after it, node, start).
        self.at: dict[int, tuple[int, int, int, int, int]] = {}
        #: index -> CRC of the encoded command the controller acknowledged there.
        self.acked: dict[int, tuple[int, str]] = {}
        #: Acknowledged indexes only the wiped voters held at a majority wipe (not counted).
        self.lost_with_majority: set[int] = set()
        self.applies = 0
        self.snapshots_restored = 0
        self.proposed = 0
        self.acknowledged = 0
        self.rejected = 0

    def applied(self, ctl: WatchedController, e: Entry, result: ApplyResult | None) -> None:
        node = ctl.sim_node
        sim = self.sim
        self.applies += 1
        if e.index != ctl.next_apply:
            sim.violate(
                "controller skipped an entry",
                f"node {node.node_id} (start {node.incarnation}) applied controller index "
                f"{e.index} after {ctl.next_apply - 1}",
            )
        ctl.next_apply = e.index + 1
        digest = zlib.crc32(ctl.state.snapshot())
        # An EMPTY entry (a new leader's) carries no command: its bytes are b"" as the core
        # made it and a NOOP batch once stored (replica_storage.append), and a replica may
        # apply either (seed 229: one applied it from its unstable log, the others from
        # storage). Compared by kind, term and index, not by bytes.
        entry_crc = 0 if e.kind == EntryKind.EMPTY else zlib.crc32(e.data)
        mine = (e.term, entry_crc, digest, node.node_id, node.incarnation)
        seen = self.at.setdefault(e.index, mine)
        if seen[:2] != mine[:2]:
            sim.violate(
                "controller applied different entries",
                f"index {e.index}: node {node.node_id} (start {node.incarnation}) applied "
                f"term {e.term} crc {entry_crc:08x}; node {seen[3]} (start {seen[4]}) applied "
                f"term {seen[0]} crc {seen[1]:08x}",
            )
        elif seen[2] != digest:
            sim.violate(
                "controller states differ",
                f"after index {e.index}: node {node.node_id} (start {node.incarnation}) has "
                f"state crc {digest:08x}, node {seen[3]} (start {seen[4]}) {seen[2]:08x}: "
                f"{ctl.state.describe()}",
            )
        acked = self.acked.get(e.index)
        if acked is not None and e.kind != EntryKind.EMPTY and e.data:
            [value] = decode_values(e.data)
            if value is None or zlib.crc32(value) != acked[0]:
                sim.violate(
                    "acknowledged controller command lost",
                    f"index {e.index}: the controller acknowledged {acked[1]} there; node "
                    f"{node.node_id} applies another entry (term {e.term})",
                )

    def new_history(self) -> None:
        """Forget the controller history (see :func:`lost_with_majority`)."""
        self.at.clear()
        self.acked.clear()
        self.lost_with_majority.clear()

    def restored(self, ctl: WatchedController, how: str) -> None:
        """``ctl`` took a snapshot's state (at its start, or installed from the leader): it
        must be the state every node had after that index, and applying goes on after it."""
        node = ctl.sim_node
        index = ctl.snapshot_index
        self.snapshots_restored += 1
        node.sim.trace(f"node {node.node_id} controller: snapshot at index {index} {how}")
        ctl.next_apply = index + 1
        digest = zlib.crc32(ctl.state.snapshot())
        seen = self.at.get(index)
        if seen is not None and seen[2] != digest:
            self.sim.violate(
                "controller states differ",
                f"the snapshot at index {index} node {node.node_id} {how} has state crc "
                f"{digest:08x}; node {seen[3]} (start {seen[4]}) had {seen[2]:08x} there",
            )

    def elected(self, ctl: WatchedController) -> None:
        """A new active controller must hold every entry the controller acknowledged."""
        if not self.acked or ctl.group is None:
            return
        index = max(self.acked)
        term = self.at[index][0] if index in self.at else None
        raw = ctl.group.raw
        if term is not None and raw.term_at(index) != term:
            self.sim.violate(
                "a controller leader lacks committed entries",
                f"node {ctl.node_id} leads in term {raw.term} with a log ending "
                f"at {raw.last_index()}, without the entry {index} (term {term}) the "
                f"controller acknowledged ({self.acked[index][1]})",
            )

    def acknowledge(self, result: ApplyResult, command: Command) -> None:
        self.acknowledged += 1
        crc = zlib.crc32(encode_command(command))
        old = self.acked.setdefault(result.index, (crc, type(command).__name__))
        if old[0] != crc:
            self.sim.violate(
                "acknowledged controller command lost",
                f"index {result.index} acknowledged for {old[1]} and for {type(command).__name__}",
            )
        seen = self.at.get(result.index)
        if seen is None:
            self.sim.violate(
                "acknowledged controller command lost",
                f"{type(command).__name__} acknowledged at index {result.index}, which no "
                "node applied",
            )


def lost_with_majority(sim: Simulation, victims: list[int]) -> None:
    """At a majority wipe: the acknowledged controller commands no surviving voter holds
    (in its log or its snapshot) are lost with the wiped voters whatever the protocol (a
    survivor that was down while they committed never got them): not counted."""
    from tidelog.node.log import PartitionLog

    from .sim import TOPIC_CONFIG

    disk_logs: dict[int, PartitionLog] = {}

    def disk_log(n: SimNode) -> PartitionLog:
        lg = disk_logs.get(n.node_id)
        if lg is None:  # down: its log as a restart recovers it
            path = Path(f"/node{n.node_id}/data/{CONTROLLER_DIR}")
            lg = disk_logs[n.node_id] = PartitionLog(path, TOPIC_CONFIG, fs=n.disk)
        return lg

    def holds(n: SimNode, index: int, term: int) -> bool:
        ctl = n.controller
        if n.up and ctl is not None and ctl.group is not None:
            # What its log file holds, not what its core holds unstored (a stalled fsync's
            # entries are lost by a crash of this node whatever the protocol).
            return index <= ctl.snapshot_index or ctl.group.storage.stored_term(index) == term
        lg = disk_log(n)
        return index < lg.first_index or lg.term_at_index(index) == term

    def has_entries(n: SimNode) -> bool:
        ctl = n.controller
        if n.up and ctl is not None and ctl.group is not None:
            return bool(ctl.snapshot_index or ctl.group.storage.last_index())
        return disk_log(n).last_index > 0

    survivors = [
        n for n in sim.nodes.values()
        if n.node_id in sim.controller_voters and n.node_id not in victims
    ]  # fmt: skip
    checks = sim.controller_checks
    if checks.at and not any(has_entries(n) for n in survivors):
        # Every node that kept its disk never got a single controller entry (it was down
        # since the first start): nothing anywhere shows a cluster existed, so the voters
        # form a new one when all are up (node/controller_bootstrap.py, docs/operations.md).
        # The old history is gone with the wiped voters: checks start a new one.
        sim.trace(
            "controller: no node that kept its disk holds a controller entry: the whole "
            f"history ({len(checks.acked)} acknowledged commands) is lost with the wiped "
            "voters; a new cluster may form, checked as a new history"
        )
        checks.new_history()
        return
    for index in sorted(checks.acked):
        term = checks.at[index][0]
        if not any(holds(n, index, term) for n in survivors):
            checks.lost_with_majority.add(index)
    if checks.lost_with_majority:
        sim.trace(
            f"controller: {len(checks.lost_with_majority)} acknowledged command(s) were on "
            "the wiped voters only: lost with them, not counted"
        )


def check_unavailable(sim: Simulation) -> None:
    """The controller was left without a leader after a majority wipe: every command it
    acknowledged must still be in the log of a voter that kept its disk."""
    from .sim import Violation

    survivors = [
        n for n in sim.nodes.values() if n.node_id in sim.controller_voters
        and n.node_id not in sim.majority_wiped and n.controller is not None
        and n.controller.group is not None
    ]  # fmt: skip
    checks = sim.controller_checks
    for index, (_crc, what) in sorted(checks.acked.items()):
        if index in checks.lost_with_majority:
            continue
        term = checks.at[index][0]
        if not any(n.controller.group.raw.term_at(index) == term for n in survivors):  # type: ignore[union-attr]
            raise Violation(
                "acknowledged controller command lost",
                f"{what} acknowledged at index {index} (term {term}) is in no surviving "
                f"voter's log (survivors up: {[n.node_id for n in survivors]})",
            )


def open_controller(
    node: SimNode, voters: tuple[int, ...], snapshot_entries: int
) -> WatchedController:
    """Open group 0 on ``node`` as ``node/server.py`` does: its log, and a snapshot of the
    state (and a truncation of the log) every ``snapshot_entries`` applied entries."""
    from tidelog.node.log import PartitionLog

    from .sim import TOPIC_CONFIG

    sim = node.sim
    raft = node.raft
    assert raft is not None
    ctl = WatchedController(
        node.node_id,
        {v: f"n{v}:internal" for v in voters},
        raft,
        "sim",
        directory_id=node.directory_id,
        snapshot_entries=snapshot_entries,
    )
    ctl.sim_node = node
    ctl.snapshot_fs = node.disk
    ctl.next_apply = 1
    lg = PartitionLog(
        Path(f"/node{node.node_id}/data/{CONTROLLER_DIR}"),
        TOPIC_CONFIG,
        clock_ms=sim.clock_ms,
        fs=node.disk,
    )
    data = Path(f"/node{node.node_id}/data")
    node.disk.makedirs(data)
    ctl.open(lg, data / SNAPSHOT_FILE)
    if ctl.snapshot_index:
        sim.controller_checks.restored(ctl, "restored at the start")
    return ctl


async def form(node: SimNode, incarnation: int) -> None:
    """What ``Controller._form_loop`` does, without gRPC: a voter on an empty data directory
    asks the other voters (reachable: up and not cut off either way) whether they are fresh,
    and acts on the same decision (``controller_bootstrap.decide``) until it is made."""
    sim = node.sim
    # Its own stream, derived without drawing from the simulation's: seeds keep the runs they
    # had before this step existed.
    rng = random.Random(f"{sim.options.seed}/form/{node.node_id}/{incarnation}")
    # As long as the node runs, not only while the workload does: the node's own loop does
    # not stop when the faults do (a voter still waiting at the heal, or restarted by it,
    # must go on asking, or the controller never forms: controller seeds 168, 399, 501).
    while node.incarnation == incarnation and node.up:
        ctl = node.controller
        if ctl is None or not ctl.forming:
            return
        answers: dict[int, PeerAnswer | None] = {}
        for peer_id in sorted(ctl.voter_ids - {node.node_id}):
            peer = sim.nodes[peer_id]
            cut = (node.node_id, peer_id) in sim.net.cut or (peer_id, node.node_id) in sim.net.cut
            if peer.up and peer.controller is not None and not cut:
                answers[peer_id] = PeerAnswer(peer.controller.fresh, peer.controller.cluster_id)
        decision = decide(node.node_id, ctl.voter_ids, answers)
        if decision.outcome is not Outcome.WAIT or decision.reason != ctl.waiting:
            sim.trace(f"controller bootstrap on node {node.node_id}: {decision}")
        ctl.resolve_bootstrap(decision)
        await asyncio.sleep(rng.uniform(0.05, 0.2))


def registration(node: SimNode) -> RegisterNode:
    return RegisterNode(
        node.node_id,
        f"n{node.node_id}:9092",
        directory_id=node.directory_id,
        internal_address=f"n{node.node_id}:internal",
    )


async def register(node: SimNode, incarnation: int) -> None:
    """What ``Controller._register`` does, without gRPC: propose this node's registration on
    whoever is the active controller until this node applied it."""
    sim = node.sim
    rng = random.Random(sim.rng.random())
    started = sim.loop.time()
    while node.incarnation == incarnation and node.up:  # the node's lifetime, as form()
        ctl = node.controller
        if ctl is None or ctl.registered.is_set():
            return
        lead = sim.controller_leader()
        if lead is not None:
            result = await propose(sim, lead, registration(node), timeout_s=1.0)
            refused = result is not None and isinstance(result.error, NodeIdentityConflict)
            old = lead.state.nodes.get(node.node_id)
            if (
                refused
                and old is not None
                and old.alive
                and sim.loop.time() - started > lead.node_dead_ms / 1000
            ):
                # What the active controller's liveness check does (not started here): an
                # incarnation whose registration is refused sends no heartbeats, so the old
                # one it replaces (a wiped disk) falls silent and is marked dead after
                # node.dead.ms; only then is the new data directory accepted.
                await propose(sim, lead, MarkNodeDead(node.node_id, at_ms=sim.clock_ms()))
        await asyncio.sleep(rng.uniform(0.05, 0.2))


async def propose(
    sim: Simulation, ctl: WatchedController, command: Command, timeout_s: float = 1.5
) -> ApplyResult | None:
    """As ``Controller.handle_forward``: the sync step, then propose and wait until applied;
    an acknowledged command is recorded for the checks."""
    checks = sim.controller_checks
    try:
        await ctl.sync(timeout_s)
        checks.proposed += 1
        result = await ctl.propose(command, timeout_s)
    except TidelogError:
        return None
    if result.error is not None:
        checks.rejected += 1
    sim.trace(
        f"controller: {type(command).__name__} acknowledged at index {result.index} by node "
        f"{ctl.node_id}" + (f" (rejected: {result.error.message})" if result.error else "")
    )
    checks.acknowledge(result, command)
    return result


def _draw_command(rng: random.Random, ctl: WatchedController, sim: Simulation) -> Command | None:
    """One controller command, valid against the active controller's state most of the time
    (as the controller validates and places them), sometimes not (apply then records the
    error: also state every node must agree on)."""
    st = ctl.state
    nodes = sorted(st.nodes)
    topics = sorted(st.topics)
    kind = rng.choice(
        (
            "create", "create", "delete", "alter", "add", "settings", "pids", "dead",
            "alive", "drain", "move", "hints", "reports",
        )
    )  # fmt: skip
    try:
        if kind == "create":
            name = f"c{rng.randint(0, 12)}"
            if name in st.topics or not st.active_node_ids() or rng.random() < 0.1:
                return CreateTopic(name, 1, 1, {}, [(rng.choice(nodes or [1]),)])
            rf = rng.randint(1, min(3, len(st.active_node_ids())))
            return st.prepare_create_topic(name, rng.randint(1, 3), rf)
        if kind == "delete" and topics:
            return DeleteTopic(rng.choice(topics))
        if kind == "alter" and topics:
            if rng.random() < 0.5:
                return AlterTopicConfig(
                    rng.choice(topics), {"retention.ms": str(rng.randint(1, 10) * 60_000)}
                )
            return AlterTopicConfig(rng.choice(topics), {}, ("retention.ms",))
        if kind == "add" and topics:
            name = rng.choice(topics)
            return st.prepare_add_partitions(name, len(st.topics[name].partitions) + 1)
        if kind == "settings":
            if rng.random() < 0.5:
                return SetClusterConfig({LEADER_BALANCE_ENABLE: rng.choice(("true", "false"))}, ())
            return SetClusterConfig(
                {MOVES_CONCURRENT_MAX: str(rng.randint(1, 8))}, (LEADER_BALANCE_ENABLE,)
            )
        if kind == "pids" and nodes:
            return AllocateProducerIds(rng.choice(nodes), rng.randint(1, 1000))
        if kind == "dead" and nodes:
            down = [n for n in nodes if n in sim.nodes and not sim.nodes[n].up]
            return MarkNodeDead(rng.choice(down or nodes), at_ms=sim.clock_ms())
        if kind == "alive" and nodes:
            return MarkNodeAlive(rng.choice(nodes))
        if kind == "drain" and nodes:
            return SetNodeState(rng.choice(nodes), rng.choice((NODE_ACTIVE, NODE_DRAINING)))
        assignments = st.assignments()
        if kind == "move" and assignments and len(nodes) >= 1:
            _topic, a = rng.choice(assignments)
            k = min(len(a.replicas), len(nodes))
            target = () if rng.random() < 0.2 else tuple(rng.sample(nodes, k))
            return MovePartitions((PartitionMove(a.group_id, target),))
        if kind == "hints" and assignments:
            _topic, a = rng.choice(assignments)
            leader = rng.choice(a.replicas)
            return UpdatePartitionLeaders(
                (LeaderHint(a.group_id, leader, a.leader_term + rng.randint(0, 2)),)
            )
        if kind == "reports" and assignments:
            _topic, a = rng.choice(assignments)
            voters = a.target if a.target is not None and rng.random() < 0.7 else a.replicas
            return UpdatePartitionReplicas(
                (ReplicaReport(a.group_id, rng.randint(1, 5), tuple(voters)),)
            )
    except TidelogError:
        return None
    return None


async def workload(sim: Simulation, wid: int) -> None:
    """Proposes controller commands on the active controller, a few in flight at a time."""
    rng = random.Random(sim.rng.random())
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[ApplyResult | None]] = set()
    while sim.running:
        await asyncio.sleep(rng.uniform(0.02, 0.12))
        ctl = sim.controller_leader()
        if ctl is None or not ctl.synced:
            continue
        command = _draw_command(rng, ctl, sim)
        if command is not None:
            task = loop.create_task(propose(sim, ctl, command))
            tasks.add(task)
            task.add_done_callback(tasks.discard)


def converged(sim: Simulation) -> bool:
    """The active controller committed its whole log and every node applied it."""
    lead = sim.controller_leader()
    if lead is None or lead.group is None:
        return False
    raw = lead.group.raw
    last = raw.last_index()
    if raw.commit_index != last:
        return False
    for node in sim.nodes.values():
        ctl = node.controller
        if ctl is None or ctl.group is None or ctl.group.failed or ctl.applied_index != last:
            return False
    return True


def describe(sim: Simulation) -> list[str]:
    out = []
    for node in sim.nodes.values():
        ctl = node.controller
        if ctl is None or ctl.group is None:
            out.append(f"controller/n{node.node_id}: down")
            continue
        raw = ctl.group.raw
        out.append(
            f"controller/n{node.node_id}: {raw.role.name} term {raw.term} last "
            f"{raw.last_index()} commit {raw.commit_index} applied {ctl.applied_index} "
            f"failed={ctl.group.failed} lost_to={raw.lost_to}"
        )
    return out


Starter = Callable[[], None]

__all__ = [
    "ControllerChecks",
    "WatchedController",
    "converged",
    "describe",
    "open_controller",
    "register",
    "workload",
]
