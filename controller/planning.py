"""What the active controller should change next to heal and balance the cluster.

Pure functions of a ``ClusterState`` (and, for leaders, what the nodes report), so every
decision is unit tested without processes. The active controller (node/controller_node.py)
calls them on every monitor tick and proposes what they return:

- ``plan_moves``: replica moves. First the replicas of nodes that must be evacuated: a node
  dead past its reprovisioning deadline (``dead_since_ms + replica.reprovision.ms``; never
  held back) and a draining node (at most ``replica.moves.concurrent.max`` moves in progress
  at once). Each replica is replaced by ``pick_replacement`` (least loaded active node, never
  a second replica of the partition on one node, racks respected); the target keeps the
  other replicas in their order, so the preferred leader stays unless it is the one leaving.
  Then, with ``replica.balance.enable``, one replica at a time from the most loaded active
  node to the least loaded one while they differ by more than one (a node just added).
- ``plan_leader_transfers``: leadership moves from the node leading most to a replica
  leading at least two fewer, until no such pair is left (each node then leads about its
  share: at most ``ceil(P / N)`` where every partition can lead anywhere), at most ``budget``
  of them.
- ``move_stall`` / ``reprovision_stalls``: why a move is not progressing, for status.
- ``plan_controller_voters``: the next change of the controller group's own voters (group 0,
  whose configuration lives in its log): a voter dead past its reprovisioning deadline or
  draining is replaced by a live, active node that is not a voter (``pick_replacement``:
  least loaded, racks distinct), one change at a time under the core's rules: promote the
  new node (a learner of group 0 since it registered) once it is caught up, then remove the
  leaving voter (the leader hands leadership over first when it is the one leaving). The
  voter count it keeps is ``controller.voters``, or the odd count the group has (0).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Set
from dataclasses import dataclass, field

from tidelog.controller.commands import NODE_DRAINING, PartitionMove
from tidelog.controller.placement import NodeInfo, pick_replacement
from tidelog.controller.recovery import plan_refills
from tidelog.controller.settings import (
    CONTROLLER_VOTERS,
    MOVES_CONCURRENT_MAX,
    REPLICA_BALANCE_ENABLE,
    REPROVISION_MS,
    bool_setting,
    int_setting,
)
from tidelog.controller.state import NO_LEADER, ClusterState, NodeRecord, PartitionAssignment


@dataclass(frozen=True, slots=True)
class MovePlan:
    """Moves to propose, and the partitions that need one but have nowhere to go."""

    moves: tuple[PartitionMove, ...] = ()
    #: (topic, partition) -> why it cannot move ("no room: ...").
    stalled: Mapping[tuple[str, int], str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class LeaderTransfer:
    group_id: int
    from_node: int
    to_node: int


#: The kinds of ``VoterStep``.
VOTER_PROMOTE = "promote"
VOTER_REMOVE = "remove"
VOTER_TRANSFER = "transfer"
VOTER_WAIT = "wait"


@dataclass(frozen=True, slots=True)
class VoterStep:
    """The next change of the controller's voters: promote ``node`` (a caught-up learner),
    remove voter ``node``, transfer leadership to ``node`` first (the leader is leaving), or
    wait (``node`` is catching up, or 0: no node can take a vote). ``replaces``: the voter
    leaving (0 when the count is only refilled). ``why``: for status and the log."""

    kind: str
    node: int
    replaces: int
    why: str


def voter_target(state: ClusterState, voters: int) -> int:
    """The voter count the controller keeps: ``controller.voters``, or (0) the odd count of
    ``voters`` (a replacement in progress briefly has one more)."""
    setting = int(state.settings.get(CONTROLLER_VOTERS, "0") or "0")
    if setting:
        return setting
    return max(1, voters if voters % 2 else voters - 1)


def plan_controller_voters(
    state: ClusterState,
    voters: Set[int],
    self_id: int,
    now_ms: int,
    caught_up: Callable[[int], bool],
) -> VoterStep | None:
    """The next change of the controller group's ``voters`` on its leader ``self_id`` (see
    the module doc); None: nothing to change. ``caught_up(node)``: whether that member's log
    is close enough to the leader's to be promoted. Pure, for tests."""
    dead, draining = evacuating(state, now_ms)
    # Dead ones first: they count against the quorum now.
    leaving = sorted(v for v in voters if v in dead) + sorted(v for v in voters if v in draining)
    target = voter_target(state, len(voters))
    if len(voters) > target and leaving:
        node = leaving[0]
        why = "dead" if node in dead else "draining"
        if node == self_id:
            stay = sorted(v for v in voters if v not in leaving and caught_up(v))
            if not stay:
                return VoterStep(
                    VOTER_WAIT,
                    0,
                    node,
                    f"voter {node} ({why}, the leader) waits "
                    "for a caught-up voter to hand leadership to",
                )
            return VoterStep(
                VOTER_TRANSFER,
                stay[0],
                node,
                f"voter {node} ({why}) leaves: leadership to voter {stay[0]} first",
            )
        return VoterStep(VOTER_REMOVE, node, node, f"removing voter {node} ({why})")
    if not leaving and len(voters) >= target:
        for v in sorted(voters):
            record = state.nodes.get(v)
            deadline = None if record is None else reprovision_deadline_ms(state, record)
            if deadline is not None:
                return VoterStep(
                    VOTER_WAIT, 0, v,
                    f"voter {v} dead: replaced at its reprovisioning deadline ({deadline} ms)",
                )  # fmt: skip
        return None
    replaces = leaving[0] if leaving else 0
    keep = [v for v in voters if v not in leaving]
    choice = pick_replacement(keep, set(voters) | set(leaving), _candidates(state), _load(state))
    what = (
        f"voter {replaces} ({'dead' if replaces in dead else 'draining'})"
        if replaces
        else f"{target - len(voters)} missing voter(s) (controller.voters {target})"
    )
    if choice is None:
        return VoterStep(
            VOTER_WAIT,
            0,
            replaces,
            f"{what}: no live, active node that is not a voter can take a controller vote",
        )
    if not caught_up(choice):
        return VoterStep(
            VOTER_WAIT, choice, replaces, f"{what}: node {choice} catching up to take the vote"
        )
    return VoterStep(VOTER_PROMOTE, choice, replaces, f"{what}: promoting node {choice}")


def reprovision_deadline_ms(state: ClusterState, node: NodeRecord) -> int | None:
    """When a dead node's replicas are rebuilt elsewhere (Unix ms); None: alive, or marked
    dead by a version that did not record when."""
    if node.alive or not node.dead_since_ms:
        return None
    return node.dead_since_ms + int_setting(state.settings, REPROVISION_MS)


def evacuating(state: ClusterState, now_ms: int) -> tuple[frozenset[int], frozenset[int]]:
    """(dead nodes past their reprovisioning deadline, draining nodes)."""
    dead = set()
    draining = set()
    for node in state.nodes.values():
        deadline = reprovision_deadline_ms(state, node)
        if deadline is not None and now_ms >= deadline:
            dead.add(node.node_id)
        elif node.state == NODE_DRAINING:
            draining.add(node.node_id)
    return frozenset(dead), frozenset(draining)


def _candidates(state: ClusterState) -> list[NodeInfo]:
    return [NodeInfo(i, state.nodes[i].rack) for i in state.active_node_ids()]


def _load(state: ClusterState) -> dict[int, int]:
    return dict(state.replica_counts())


def _replace_in(
    base: tuple[int, ...],
    leaving: Set[int],
    a: PartitionAssignment,
    nodes: list[NodeInfo],
    load: dict[int, int],
) -> tuple[int, ...] | None:
    """``base`` with each member of ``leaving`` replaced (in place, so order and the
    preferred leader are kept); None when one has no replacement."""
    out = list(base)
    for i, node_id in enumerate(base):
        if node_id not in leaving:
            continue
        keep = [r for r in out if r not in leaving]
        choice = pick_replacement(keep, a.hosts | set(out) | leaving, nodes, load)
        if choice is None:
            return None
        out[i] = choice
        load[choice] = load.get(choice, 0) + 1
    return tuple(out)


def plan_moves(state: ClusterState, now_ms: int) -> MovePlan:
    dead, draining = evacuating(state, now_ms)
    nodes = _candidates(state)
    load = _load(state)
    cap = int_setting(state.settings, MOVES_CONCURRENT_MAX)
    in_progress = sum(1 for _, a in state.assignments() if a.moving)
    moves: list[PartitionMove] = []
    stalled: dict[tuple[str, int], str] = {}
    for topic, a in state.assignments():
        base = a.target if a.target is not None else a.replicas
        must = set(base) & dead
        may = set(base) & draining
        if not must and not may:
            continue
        if not must and in_progress + len(moves) >= cap:
            continue  # draining waits for room under the cap; the dead do not wait
        leaving = must | may
        target = _replace_in(base, leaving, a, nodes, load)
        if target is None:
            who = ", ".join(str(i) for i in sorted(leaving))
            stalled[(topic, a.partition)] = (
                f"no room: no live, active node without a replica of it can replace node {who}"
            )
            continue
        moves.append(PartitionMove(a.group_id, target))
    # Partitions a force-recover left short of their replication factor (controller/recovery.py).
    planned = {m.group_id for m in moves}
    rfs = {name: t.replication_factor for name, t in state.topics.items()}
    for group_id, target in plan_refills(state.assignments(), rfs, nodes, load, planned):
        moves.append(PartitionMove(group_id, target))
    gone = dead | draining
    evacuated = not any(a.hosts & gone for _, a in state.assignments())
    if not moves and not stalled and bool_setting(state.settings, REPLICA_BALANCE_ENABLE):
        # Balance once nothing is left to evacuate (a dead node past its deadline that
        # holds nothing any more does not hold it back).
        if in_progress == 0 and evacuated:
            move = _balance_move(state, nodes, load)
            if move is not None:
                moves.append(move)
    return MovePlan(tuple(moves), stalled)


def _balance_move(
    state: ClusterState, nodes: list[NodeInfo], load: dict[int, int]
) -> PartitionMove | None:
    """One replica from the most loaded active node to the least loaded one that can take
    it, when they differ by more than one. Racks respected: the new node's rack is the
    leaving one's, or one no other replica of the partition uses."""
    rack = {n.id: n.rack for n in nodes}
    by_load = sorted(rack, key=lambda i: (-load.get(i, 0), i))
    for heavy in by_load:
        for light in reversed(by_load):
            if load.get(heavy, 0) - load.get(light, 0) <= 1:
                break
            for topic, p in sorted(state.replicas_on(heavy)):
                a = state.topics[topic].partitions[p]
                if light in a.hosts or a.moving:
                    continue
                others = {state.nodes[r].rack for r in a.replicas if r != heavy}
                if rack[light] is not None and rack[light] != rack[heavy] and rack[light] in others:
                    continue
                return PartitionMove(
                    a.group_id, tuple(light if r == heavy else r for r in a.replicas)
                )
    return None


def plan_leader_transfers(
    state: ClusterState,
    leaders: Mapping[int, int],
    budget: int,
    skip: Set[int] = frozenset(),
) -> list[LeaderTransfer]:
    """Transfers that even out leadership: ``leaders`` maps group id -> leading node (as
    reported; the state's hints for groups not in it). Only alive, active voters lead;
    moving groups and ``skip`` (transferred recently) are left alone."""
    eligible = set(state.active_node_ids())
    counts = dict.fromkeys(sorted(eligible), 0)
    led: dict[int, list[tuple[str, PartitionAssignment]]] = {i: [] for i in counts}
    for topic, a in state.assignments():
        leader = leaders.get(a.group_id, a.leader)
        if leader == NO_LEADER or leader not in counts:
            continue
        counts[leader] += 1
        led[leader].append((topic, a))
    out: list[LeaderTransfer] = []
    moved: set[int] = set()
    if not counts or max(counts.values()) - min(counts.values()) <= 1:
        return out  # balanced: the common case, decided without a scan
    while len(out) < budget:
        best: tuple[int, int, int, int, int] | None = None
        for u in sorted(counts, key=lambda i: (-counts[i], i)):
            for _topic, a in led[u]:
                if a.group_id in skip or a.group_id in moved or a.moving:
                    continue
                for v in a.replicas:
                    if v == u or v not in counts or counts[v] > counts[u] - 2:
                        continue
                    key = (counts[v], 0 if v == a.preferred_leader else 1, v, a.group_id, u)
                    if best is None or key < best:
                        best = key
            if best is not None:
                break
        if best is None:
            break
        _, _, v, group_id, u = best
        out.append(LeaderTransfer(group_id, u, v))
        moved.add(group_id)
        counts[u] -= 1
        counts[v] += 1
        entry = next(e for e in led[u] if e[1].group_id == group_id)
        led[u].remove(entry)
        led[v].append(entry)
    return out


def move_stall(state: ClusterState, a: PartitionAssignment, has_leader: bool) -> str:
    """Why the move of ``a`` does not progress, "" when nothing is known to hold it up."""
    if a.target is None:
        return ""
    down = [i for i in a.target if i not in a.replicas and not _alive(state, i)]
    if down:
        return f"target down: node {', '.join(map(str, down))} is dead"
    if not has_leader:
        return "waiting for a leader"
    return ""


def _alive(state: ClusterState, node_id: int) -> bool:
    node = state.nodes.get(node_id)
    return node is not None and node.alive


def reprovision_stalls(state: ClusterState, now_ms: int) -> dict[tuple[str, int], str]:
    """Partitions a dead node past its deadline (or a draining node) holds that cannot be
    moved: no room."""
    return dict(plan_moves(state, now_ms).stalled)


__all__ = [
    "VOTER_PROMOTE",
    "VOTER_REMOVE",
    "VOTER_TRANSFER",
    "VOTER_WAIT",
    "LeaderTransfer",
    "MovePlan",
    "VoterStep",
    "evacuating",
    "move_stall",
    "plan_controller_voters",
    "plan_leader_transfers",
    "plan_moves",
    "reprovision_deadline_ms",
    "reprovision_stalls",
    "voter_target",
]
