"""Recovering a partition that lost a majority of its replicas for good (UNSAFE).

Raft keeps a partition unavailable while a majority of its voters is down: that is what
makes an acknowledged record safe. When that majority is gone for good (disks lost), the
operator may give up the records only the lost replicas held and go on with the survivors
(``tidelog partition force-recover TOPIC/P --from-survivors``). The active controller:

1. finds the survivors: the live nodes among the partition's replicas. It refuses when there
   is none, or when a majority is still alive (Raft recovers by itself then);
2. asks each survivor for its log end (Cluster.RecoverReplica) and chooses the most
   up-to-date one (:func:`choose_survivor`: highest last log term, then last index, then the
   lowest node id). By Raft's leader completeness, its log holds every entry any survivor
   knew committed;
3. records the new replica set (:class:`ForceRecoverPartition`, the chosen survivor first and
   preferred leader), so nodes that come back later delete their old replicas;
4. has every survivor force its Raft configuration to the survivors
   (``RawNode.force_configuration``, CONFIG entries up to the chosen survivor's last index
   ignored), after which the chosen one wins an election and commits its whole log;
5. starts a move back to the replication factor (:func:`refill_target`) when there are live
   nodes to take the missing replicas (reprovisioning, as for a dead node).

What may be lost (:func:`loss_report`): the chosen survivor holds offsets below its log end
offset E; every record a survivor knew acknowledged (below its high watermark) is below E and
kept. Records the lost replicas acknowledged at E or past it are lost, and how far that went
cannot be known from the survivors: only the lost replicas (and the producers that got the
acknowledgements) knew. Records the survivor holds past the old high watermark, never
acknowledged, become committed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from tidelog.controller.commands import ForceRecoverPartition
from tidelog.controller.placement import NodeInfo, pick_replacement
from tidelog.errors import InvalidRequest, UnknownPartition

if TYPE_CHECKING:
    from tidelog.controller.state import PartitionAssignment

#: The replica-set change is recorded with the leader hint cleared (no leader is known).
_NO_LEADER = 0


@dataclass(frozen=True, slots=True)
class SurvivorLog:
    """What one surviving replica holds (Cluster.RecoverReplica)."""

    node_id: int
    last_term: int
    last_index: int
    log_end_offset: int
    high_watermark: int


def survivors_of(replicas: Sequence[int], alive: Mapping[int, bool]) -> tuple[int, ...]:
    """The replicas on live nodes, in replica order."""
    return tuple(r for r in replicas if alive.get(r, False))


def check_force_recover(
    where: str, replicas: Sequence[int], alive: Mapping[int, bool]
) -> tuple[int, ...]:
    """The survivors of a partition with ``replicas``; raise when force-recovering it is
    not needed (a majority is alive) or impossible (no survivor)."""
    survivors = survivors_of(replicas, alive)
    dead = [r for r in replicas if r not in survivors]
    if not survivors:
        raise InvalidRequest(
            f"{where}: no replica survives (replicas {list(replicas)} are all on dead nodes); "
            "there is nothing to recover from: bring one of them back"
        )
    if len(survivors) * 2 > len(replicas):
        raise InvalidRequest(
            f"{where}: a majority of its replicas is alive ({list(survivors)} of "
            f"{list(replicas)}); Raft recovers by itself, force-recover is not needed"
            + (f" (dead: {dead})" if dead else "")
        )
    return survivors


def choose_survivor(logs: Sequence[SurvivorLog]) -> SurvivorLog:
    """The most up-to-date survivor: highest last term, then last index, then lowest id."""
    if not logs:
        raise ValueError("no survivor to choose from")
    return max(logs, key=lambda s: (s.last_term, s.last_index, -s.node_id))


def check_command(
    c: ForceRecoverPartition, replicas: Sequence[int], registered: Mapping[int, object]
) -> None:
    """Raise unless the command can apply to a partition whose replicas are ``replicas``."""
    if not c.survivors or len(set(c.survivors)) != len(c.survivors):
        raise InvalidRequest(f"force-recover needs distinct survivors, got {list(c.survivors)}")
    outside = [s for s in c.survivors if s not in replicas]
    if outside:
        raise InvalidRequest(
            f"force-recover survivors {outside} are not replicas of the partition "
            f"(replicas {list(replicas)})"
        )
    unknown = [s for s in c.survivors if s not in registered]
    if unknown:
        raise UnknownPartition(f"force-recover survivors {unknown} are not registered nodes")


def recovered_assignment(a: PartitionAssignment, c: ForceRecoverPartition) -> PartitionAssignment:
    """The assignment after the command: the survivors as replicas, the chosen one first and
    preferred leader, no move, no leader known."""
    return replace(
        a,
        replicas=tuple(c.survivors),
        preferred_leader=c.survivors[0],
        target=None,
        leader=_NO_LEADER,
    )


def refill_target(
    survivors: Sequence[int],
    rf: int,
    nodes: Sequence[NodeInfo],
    load: Mapping[int, int],
    exclude: Sequence[int] = (),
) -> tuple[int, ...] | None:
    """Survivors plus the nodes placement picks for the missing replicas (racks respected,
    least loaded first); None when the survivors already make ``rf`` or no node is free."""
    out = list(survivors)
    if len(out) >= rf:
        return None
    counts = dict(load)
    while len(out) < rf:
        choice = pick_replacement(out, set(out) | set(exclude), nodes, counts)
        if choice is None:
            return None
        out.append(choice)
        counts[choice] = counts.get(choice, 0) + 1
    return tuple(out)


def plan_refills(
    assignments: Sequence[tuple[str, PartitionAssignment]],
    rf_of: Mapping[str, int],
    nodes: Sequence[NodeInfo],
    load: dict[int, int],
    skip: set[int],
) -> list[tuple[int, tuple[int, ...]]]:
    """(group, target) moves for partitions with fewer replicas than their replication
    factor and no move in progress (left so by a force-recover that found no free node):
    reprovisioning fills them once live nodes can take the missing replicas. Groups in
    ``skip`` (already moved by the plan) are left alone; ``load`` is updated."""
    out = []
    for topic, a in assignments:
        rf = rf_of[topic]
        if a.target is not None or len(a.replicas) >= rf or a.group_id in skip:
            continue
        target = refill_target(a.replicas, rf, nodes, load)
        if target is None:
            continue
        for node_id in target[len(a.replicas) :]:
            load[node_id] = load.get(node_id, 0) + 1
        out.append((a.group_id, target))
    return out


def loss_report(
    where: str, chosen: SurvivorLog, logs: Sequence[SurvivorLog], lost_replicas: Sequence[int]
) -> tuple[int, str]:
    """(known acknowledged end, the account printed to the operator)."""
    acked = max(s.high_watermark for s in logs)
    end = chosen.log_end_offset
    lines = [
        f"{where}: FORCE-RECOVERED from node {chosen.node_id} (last term {chosen.last_term}, "
        f"last index {chosen.last_index}); replicas dropped: {list(lost_replicas)}",
        f"  kept: offsets below {end} (node {chosen.node_id}'s log end offset)",
        f"  every record the survivors knew acknowledged (below {acked}) is kept",
        f"  POSSIBLY LOST: acknowledged records at offsets {end} and above, if the lost "
        f"replicas {list(lost_replicas)} acknowledged any; how many cannot be known from the "
        f"survivors (producers that got acknowledgements for offsets >= {end} lost them)",
    ]
    if end > acked:
        lines.append(
            f"  offsets {acked}..{end - 1} were held but not known acknowledged; they are "
            "committed now"
        )
    for s in logs:
        if s.node_id != chosen.node_id and s.log_end_offset > end:
            lines.append(
                f"  node {s.node_id} held offsets up to {s.log_end_offset - 1} of an older "
                f"term (last term {s.last_term}); those past {end - 1} are discarded"
            )
    return acked, "\n".join(lines)


__all__ = [
    "SurvivorLog",
    "check_command",
    "check_force_recover",
    "choose_survivor",
    "loss_report",
    "plan_refills",
    "recovered_assignment",
    "refill_target",
    "survivors_of",
]
