"""Force-recovering a partition that lost a majority for good (UNSAFE; controller/recovery.py
explains the steps and what may be lost).

Two sides: :func:`force_recover_partition` runs on the active controller (it asks the
survivors, records the new replica set, has them force their configuration, starts the move
back to the replication factor); :func:`serve_recover_replica` answers Cluster.RecoverReplica
on every node, for its own replica of the group.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Final

from tidelog.controller.commands import ForceRecoverPartition, MovePartitions, PartitionMove
from tidelog.controller.placement import NodeInfo
from tidelog.controller.recovery import (
    SurvivorLog,
    check_force_recover,
    choose_survivor,
    loss_report,
    refill_target,
)
from tidelog.errors import InvalidRequest, NodeUnavailable, TidelogError
from tidelog.v1 import admin_pb2, cluster_pb2

if TYPE_CHECKING:
    from tidelog.node.controller_node import Controller
    from tidelog.node.topics import TopicRegistry

log = logging.getLogger(__name__)

#: How long the controller waits for each survivor's answer.
recover_rpc_timeout_s: Final = 5.0


def recover_replica_method() -> str:
    from tidelog.node.controller_node import _CLUSTER_SERVICE

    return f"/{_CLUSTER_SERVICE}/RecoverReplica"


def serve_recover_replica(
    registry: TopicRegistry, node_id: int, request: cluster_pb2.RecoverReplicaRequest
) -> cluster_pb2.RecoverReplicaResponse:
    """This node's replica of ``request.group``: its log end, and (``force``) its Raft
    configuration forced to ``request.voters``."""
    part = registry.local_partition(request.group)
    if part is None or part.closed or part.group is None:
        return cluster_pb2.RecoverReplicaResponse(node_id=node_id, found=False)
    raw = part.group.raw
    if request.force:
        voters = frozenset(request.voters)
        if node_id not in voters:
            raise InvalidRequest(
                f"node {node_id} is asked to force voters {sorted(voters)} that leave it out"
            )
        log.warning(
            "%s/%d: FORCING the Raft configuration to voters %s through index %d "
            "(force-recover of a lost majority; was %s)",
            part.topic, part.index, sorted(voters), request.through_index,
            sorted(raw.conf_state.voters),
        )  # fmt: skip
        raw.force_configuration(voters, request.through_index)
        registry.touch_group(part)
    last = raw.last_index()
    return cluster_pb2.RecoverReplicaResponse(
        node_id=node_id,
        found=True,
        last_term=raw.term_at(last) or 0,
        last_index=last,
        log_end_offset=part.log.log_end_offset,
        high_watermark=part.high_watermark,
        voters=sorted(raw.conf_state.voters),
    )


async def _ask(
    controller: Controller, node_id: int, request: cluster_pb2.RecoverReplicaRequest
) -> cluster_pb2.RecoverReplicaResponse:
    address = controller.internal_address_of(node_id)
    if address is None:
        raise NodeUnavailable(f"node {node_id} has no known address")
    resp: cluster_pb2.RecoverReplicaResponse = await controller.ask_peer(
        address, "RecoverReplica", request, recover_rpc_timeout_s
    )
    return resp


async def force_recover_partition(
    controller: Controller, topic: str, partition: int
) -> admin_pb2.ForceRecoverPartitionResponse:
    """The active controller's side of ``tidelog partition force-recover`` (UNSAFE)."""
    state = controller.state
    a = state.partition(topic, partition)
    where = f"{topic}/{partition}"
    alive = {i: n.alive for i, n in state.nodes.items()}
    if a.target is not None:
        # A move in progress: the voters may be more than the replicas recorded.
        replicas = tuple(dict.fromkeys((*a.replicas, *a.target)))
    else:
        replicas = a.replicas
    survivors = check_force_recover(where, a.replicas, alive)
    answers = await asyncio.gather(
        *(
            _ask(controller, s, cluster_pb2.RecoverReplicaRequest(group=a.group_id))
            for s in survivors
        ),
        return_exceptions=True,
    )
    logs: list[SurvivorLog] = []
    for s, ans in zip(survivors, answers, strict=True):
        if isinstance(ans, BaseException):
            log.warning("%s: survivor %d did not answer (%s): left out", where, s, ans)
            continue
        if not ans.found:
            log.warning("%s: node %d holds no replica of it: left out", where, s)
            continue
        logs.append(
            SurvivorLog(s, ans.last_term, ans.last_index, ans.log_end_offset, ans.high_watermark)
        )
    if not logs:
        raise InvalidRequest(
            f"{where}: none of the live replicas {list(survivors)} answered with a replica of "
            "it; there is nothing to recover from"
        )
    chosen = choose_survivor(logs)
    kept = (chosen.node_id, *(s.node_id for s in logs if s.node_id != chosen.node_id))
    lost = [r for r in replicas if r not in kept]
    acked, summary = loss_report(where, chosen, logs, lost)
    log.warning("%s", summary)
    index = await controller._propose_checked(ForceRecoverPartition(a.group_id, kept))
    voters = sorted(kept)
    forced: list[int] = []
    for s in kept:
        try:
            await _ask(
                controller,
                s,
                cluster_pb2.RecoverReplicaRequest(
                    group=a.group_id, force=True, voters=voters, through_index=chosen.last_index
                ),
            )
        except TidelogError as err:
            log.warning("%s: forcing the configuration on node %d failed: %s", where, s, err)
        else:
            forced.append(s)
    if chosen.node_id not in forced:
        raise NodeUnavailable(
            f"{where}: the replica set is now {list(kept)} (controller index {index}), but "
            f"node {chosen.node_id} could not be told to force its configuration; run "
            "force-recover again"
        )
    record = state.topic(topic)
    nodes = [NodeInfo(i, state.nodes[i].rack) for i in state.active_node_ids()]
    target = refill_target(kept, record.replication_factor, nodes, state.replica_counts(), lost)
    if target is not None:
        try:
            await controller._propose_checked(MovePartitions((PartitionMove(a.group_id, target),)))
        except TidelogError as err:
            log.warning("%s: could not start the move to %s: %s", where, list(target), err)
            target = None
    if target is None:
        summary += (
            f"\n  replication factor {record.replication_factor} NOT restored yet: no live "
            "node without a replica can take one now; reprovisioning adds the missing "
            "replicas once one can (add a node, or bring the lost ones back)"
        )
    else:
        summary += f"\n  restoring the replication factor: moving to replicas {list(target)}"
    return admin_pb2.ForceRecoverPartitionResponse(
        topic=topic,
        partition=partition,
        chosen=chosen.node_id,
        survivors=list(kept),
        lost_replicas=lost,
        logs=[
            admin_pb2.SurvivorLog(
                node_id=s.node_id,
                last_term=s.last_term,
                last_index=s.last_index,
                log_end_offset=s.log_end_offset,
                high_watermark=s.high_watermark,
            )
            for s in logs
        ],
        kept_end_offset=chosen.log_end_offset,
        known_acknowledged_end=acked,
        target=list(target or ()),
        summary=summary,
    )


__all__ = ["force_recover_partition", "recover_replica_method", "serve_recover_replica"]
