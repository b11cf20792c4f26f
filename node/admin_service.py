"""The Admin gRPC service: create, delete, describe and alter topics; describe the cluster,
drain and remove nodes, reassign partitions, get and set cluster settings.

Changes go through the active controller (``Controller``: here, or forwarded to it), which
validates and applies them; this node then waits until it applied the change itself and set
up its replicas, so the next request to it (a Produce to the new topic, a Metadata) sees the
change. Descriptions come from this node's copy of the metadata and its local replicas.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from tidelog.controller.commands import NODE_DRAINING
from tidelog.controller.planning import move_stall, reprovision_deadline_ms, reprovision_stalls
from tidelog.controller.settings import (
    RECOVERY_BYTES_PER_SECOND,
    SettingInfo,
    check_known,
    describe_settings,
    int_setting,
)
from tidelog.controller.state import ClusterState, PartitionAssignment
from tidelog.errors import InvalidRequest
from tidelog.node import rpc
from tidelog.node.auth import CLUSTER, Guard, Resource
from tidelog.node.catchup import CatchupManager
from tidelog.node.controller_node import Controller, TopicSpec, admin_timeout_ms
from tidelog.node.identity import NodeIdentity
from tidelog.node.metrics import NodeMetrics, ShapeStats
from tidelog.node.topics import Topic, TopicRegistry
from tidelog.v1 import admin_pb2 as pb
from tidelog.v1 import admin_pb2_grpc as pb_grpc


def describe(topic: Topic, registry: TopicRegistry) -> pb.TopicDescription:
    """Log figures (offsets, size) come from this node's replica when it holds one: from the
    leader they are exact, from a follower they trail a little, elsewhere they are 0."""
    partitions = []
    state = registry.cluster_state
    for a in topic.record.partitions:
        v = registry.view(a)
        local = v.local
        progress = registry.move_progress(local) if local is not None else {}
        partitions.append(
            pb.PartitionDescription(
                partition=a.partition,
                leader=v.leader,
                replicas=list(a.replicas),
                in_sync=v.in_sync,
                log_start_offset=local.log_start_offset if local else 0,
                high_watermark=local.high_watermark if local else 0,
                size_bytes=local.log.size_bytes if local else 0,
                leader_term=v.term,
                target=list(a.target or ()),
                moving=[
                    pb.ReplicaProgress(node_id=n, copied=c, left=left)
                    for n, (c, left) in sorted(progress.items())
                ],
                stalled=_stall(state, a, v.leader > 0, progress, registry.catchup),
            )
        )
    return pb.TopicDescription(
        name=topic.name,
        replication_factor=topic.replication_factor,
        configs=topic.effective_configs(),
        overrides=sorted(topic.overrides),
        partitions=partitions,
    )


def _stall(
    state: ClusterState,
    a: PartitionAssignment,
    has_leader: bool,
    progress: dict[int, tuple[int, int]],
    catchup: CatchupManager | None = None,
) -> str:
    """Why the move does not progress; "rate limit" while a learner lacks more than
    ``replica.recovery.lag.bytes`` (its copy goes at the recovery rate, this node's own)."""
    why = move_stall(state, a, has_leader)
    if why or a.target is None:
        return why
    if catchup is not None:
        rate, lag = catchup.rate(), catchup.lag_bytes()
    else:
        rate, lag = int_setting(state.settings, RECOVERY_BYTES_PER_SECOND), 0
    if rate and any(left > lag for _copied, left in progress.values()):
        return f"rate limit: copying at most {rate} bytes/s (replica.recovery.bytes.per.second)"
    return ""


def _entries(infos: Iterable[SettingInfo]) -> list[pb.ClusterConfigEntry]:
    return [
        pb.ClusterConfigEntry(
            key=i.key,
            value=i.value,
            default=i.default,
            is_default=i.is_default,
            doc=i.doc,
            kind=i.kind,
        )
        for i in infos
    ]


def describe_cluster(
    state: ClusterState, controller_id: int, voters: Iterable[int], now_ms: int
) -> pb.DescribeClusterResponse:
    """Nodes (replicas, leaders, states, reprovisioning deadlines, what cannot move off
    them) and the moves in progress, from this node's copy of the metadata."""
    voter_ids = set(voters)
    counts = state.replica_counts()
    leaders = state.leader_counts()
    stalls = reprovision_stalls(state, now_ms)
    nodes = []
    for node_id, n in sorted(state.nodes.items()):
        stuck = [
            f"{t}/{p}: {why}"
            for (t, p), why in sorted(stalls.items())
            if node_id in state.partition(t, p).hosts
        ]
        nodes.append(
            pb.NodeDescription(
                node_id=node_id,
                address=n.address,
                rack=n.rack or "",
                alive=n.alive,
                state=n.state,
                replicas=counts.get(node_id, 0),
                leaders=leaders.get(node_id, 0),
                dead_since_ms=n.dead_since_ms,
                reprovision_deadline_ms=reprovision_deadline_ms(state, n) or 0,
                stalled=stuck,
                controller_voter=node_id in voter_ids,
            )
        )
    moves = [
        pb.PartitionMove(
            topic=t,
            partition=a.partition,
            replicas=list(a.replicas),
            target=list(a.target or ()),
            stalled=move_stall(state, a, a.leader != 0),
        )
        for t, a in state.assignments()
        if a.target is not None
    ]
    return pb.DescribeClusterResponse(nodes=nodes, moves=moves, controller_id=controller_id)


def shape_stats(
    state: ClusterState,
    registry: TopicRegistry,
    now_ms: int,
    controller: Controller | None = None,
) -> ShapeStats:
    """The cluster's shape for the metrics scrape (node/metrics.py)."""
    counts = state.replica_counts()
    leaders = state.leader_counts()
    nodes = {}
    for node_id, n in list(state.nodes.items()):
        deadline = reprovision_deadline_ms(state, n)
        nodes[node_id] = (
            counts.get(node_id, 0),
            leaders.get(node_id, 0),
            n.alive,
            n.state == NODE_DRAINING,
            (deadline or 0) / 1000,
        )
    assignments = state.assignments()
    moving = [a for _, a in assignments if a.target is not None]
    held = sum(1 for a in moving if move_stall(state, a, a.leader != 0))
    stalled = held + len(reprovision_stalls(state, now_ms))
    entries_left = bytes_left = bytes_copied = 0
    for part in registry.partitions():
        entries_left += part.move_entries_left()
        for copied, lacking in registry.move_progress(part).values():
            bytes_copied += copied
            bytes_left += lacking
    voters: frozenset[int] = frozenset()
    in_progress = False
    if controller is not None:
        voters = frozenset(controller.voter_ids)
        change = controller.voter_change_now()
        # A dead voter waiting for its deadline is not a change in progress yet.
        in_progress = bool(change) and "reprovisioning deadline" not in change
    return ShapeStats(
        nodes,
        len(moving),
        stalled,
        entries_left,
        controller_voters=voters,
        controller_voter_change=in_progress,
        move_bytes_left=bytes_left,
        move_bytes_copied=bytes_copied,
    )


class AdminService(pb_grpc.AdminServicer):
    def __init__(
        self,
        registry: TopicRegistry,
        controller: Controller,
        identity: NodeIdentity,
        metrics: NodeMetrics,
        *,
        guard: Guard | None = None,
    ) -> None:
        #: Who may call what (node/auth.py); the default lets everyone do everything.
        self.guard = guard or Guard()
        self.registry = registry
        self.controller = controller
        self.identity = identity
        self.metrics = metrics

    def _check(self, context: rpc.Context, operation: str, topics: Iterable[str]) -> None:
        """The caller may run ``operation`` on every topic named (on the cluster if none)."""
        names = list(dict.fromkeys(topics))
        if not names:
            self.guard.check(context, operation, CLUSTER)
        for name in names:
            self.guard.check(context, operation, Resource.topic(name))

    async def _caught_up(self, index: int) -> None:
        timeout_s = admin_timeout_ms / 1000
        await self.controller.wait_applied(index, timeout_s)
        await self.registry.wait_reconciled(index, timeout_s)

    @rpc.unary("CreateTopics")
    async def CreateTopics(
        self, request: pb.CreateTopicsRequest, context: rpc.Context
    ) -> pb.CreateTopicsResponse:
        self._check(context, "CreateTopics", [t.name for t in request.topics])
        specs = [
            TopicSpec(t.name, t.partitions, t.replication_factor, dict(t.configs))
            for t in request.topics
        ]
        created, index = await self.controller.create_topics(
            specs, validate_only=request.validate_only
        )
        if not request.validate_only:
            await self._caught_up(index)
        return pb.CreateTopicsResponse(created=created)

    @rpc.unary("DeleteTopics")
    async def DeleteTopics(
        self, request: pb.DeleteTopicsRequest, context: rpc.Context
    ) -> pb.DeleteTopicsResponse:
        self._check(context, "DeleteTopics", request.names)
        deleted, index = await self.controller.delete_topics(list(request.names))
        await self._caught_up(index)
        return pb.DeleteTopicsResponse(deleted=deleted)

    @rpc.unary("DescribeTopics")
    async def DescribeTopics(
        self, request: pb.DescribeTopicsRequest, context: rpc.Context
    ) -> pb.DescribeTopicsResponse:
        self._check(context, "DescribeTopics", request.names)
        names = list(dict.fromkeys(request.names))
        topics = self.registry.topics(names or None)
        return pb.DescribeTopicsResponse(topics=[describe(t, self.registry) for t in topics])

    @rpc.unary("AlterTopicConfig")
    async def AlterTopicConfig(
        self, request: pb.AlterTopicConfigRequest, context: rpc.Context
    ) -> pb.AlterTopicConfigResponse:
        self._check(context, "AlterTopicConfig", [request.topic])
        index = await self.controller.alter_topic_config(
            request.topic, dict(request.set), list(request.delete)
        )
        await self._caught_up(index)
        topic = self.registry.topic(request.topic)
        return pb.AlterTopicConfigResponse(topic=describe(topic, self.registry))

    @rpc.unary("CreatePartitions")
    async def CreatePartitions(
        self, request: pb.CreatePartitionsRequest, context: rpc.Context
    ) -> pb.CreatePartitionsResponse:
        self._check(context, "CreatePartitions", [request.topic])
        index = await self.controller.create_partitions(
            request.topic, request.total_count, validate_only=request.validate_only
        )
        if not request.validate_only:
            await self._caught_up(index)
        topic = self.registry.topic(request.topic)
        return pb.CreatePartitionsResponse(topic=describe(topic, self.registry))

    @rpc.unary("DescribeCluster")
    async def DescribeCluster(
        self, request: pb.DescribeClusterRequest, context: rpc.Context
    ) -> pb.DescribeClusterResponse:
        self._check(context, "DescribeCluster", [])
        c = self.controller
        resp = describe_cluster(c.state, c.leader_id, c.voter_ids, int(time.time() * 1000))
        resp.controller_voters.extend(sorted(c.voter_ids))
        resp.controller_voter_change = c.voter_change_now()
        return resp

    @rpc.unary("DrainNode")
    async def DrainNode(
        self, request: pb.DrainNodeRequest, context: rpc.Context
    ) -> pb.DrainNodeResponse:
        self._check(context, "DrainNode", [])
        count, index = await self.controller.drain_node(request.node_id, cancel=request.cancel)
        await self._caught_up(index)
        return pb.DrainNodeResponse(replicas=count)

    @rpc.unary("RemoveNode")
    async def RemoveNode(
        self, request: pb.RemoveNodeRequest, context: rpc.Context
    ) -> pb.RemoveNodeResponse:
        self._check(context, "RemoveNode", [])
        index = await self.controller.remove_node(request.node_id)
        await self._caught_up(index)
        return pb.RemoveNodeResponse()

    @rpc.unary("ReassignPartition")
    async def ReassignPartition(
        self, request: pb.ReassignPartitionRequest, context: rpc.Context
    ) -> pb.ReassignPartitionResponse:
        self._check(context, "ReassignPartition", [request.topic])
        index = await self.controller.reassign_partition(
            request.topic, request.partition, list(request.replicas), cancel=request.cancel
        )
        await self._caught_up(index)
        state = self.controller.state
        a = state.partition(request.topic, request.partition)
        return pb.ReassignPartitionResponse(
            move=pb.PartitionMove(
                topic=request.topic,
                partition=a.partition,
                replicas=list(a.replicas),
                target=list(a.target or ()),
                stalled=move_stall(state, a, a.leader != 0),
            )
        )

    @rpc.unary("ForceRecoverPartition")
    async def ForceRecoverPartition(
        self, request: pb.ForceRecoverPartitionRequest, context: rpc.Context
    ) -> pb.ForceRecoverPartitionResponse:
        """UNSAFE: recover a partition that lost a majority for good (node/recovery.py)."""
        self._check(context, "ForceRecoverPartition", [request.topic])
        if not request.from_survivors:
            raise InvalidRequest(
                "force-recover must be asked with from_survivors (--from-survivors): it gives "
                "up what only the lost replicas held"
            )
        resp = await self.controller.force_recover_partition(request.topic, request.partition)
        await self._caught_up(resp.applied_index)
        return resp.force_recover

    @rpc.unary("ForceRecoverController")
    async def ForceRecoverController(
        self, request: pb.ForceRecoverControllerRequest, context: rpc.Context
    ) -> pb.ForceRecoverControllerResponse:
        """UNSAFE: recover the controller after it lost a majority of its voters for good
        (node/controller_recovery.py). Served by the node asked: there is no controller."""
        from tidelog.node.controller_recovery import force_recover_controller

        self._check(context, "ForceRecoverController", [])
        if not request.from_survivors:
            raise InvalidRequest(
                "force-recover-controller must be asked with from_survivors "
                "(--from-survivors): it gives up what only the lost voters held"
            )
        return await force_recover_controller(self.controller)

    @rpc.unary("GetClusterConfig")
    async def GetClusterConfig(
        self, request: pb.GetClusterConfigRequest, context: rpc.Context
    ) -> pb.GetClusterConfigResponse:
        self._check(context, "GetClusterConfig", [])
        keys = list(dict.fromkeys(request.keys))
        check_known(tuple(keys))
        infos = describe_settings(self.controller.state.settings)
        if keys:
            by_key = {i.key: i for i in infos}
            infos = [by_key[k] for k in keys]
        return pb.GetClusterConfigResponse(entries=_entries(infos))

    @rpc.unary("SetClusterConfig")
    async def SetClusterConfig(
        self, request: pb.SetClusterConfigRequest, context: rpc.Context
    ) -> pb.SetClusterConfigResponse:
        self._check(context, "SetClusterConfig", [])
        index = await self.controller.set_cluster_config(dict(request.set), list(request.delete))
        await self._caught_up(index)
        changed = set(request.set) | set(request.delete)
        infos = [i for i in describe_settings(self.controller.state.settings) if i.key in changed]
        return pb.SetClusterConfigResponse(entries=_entries(infos))
