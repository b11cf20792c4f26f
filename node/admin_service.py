"""The Admin gRPC service: create, delete, describe and alter topics.

Changes go through the active controller (``Controller``: here, or forwarded to it), which
validates and applies them; this node then waits until it applied the change itself and set
up its replicas, so the next request to it (a Produce to the new topic, a Metadata) sees the
change. Descriptions come from this node's copy of the metadata and its local replicas.
"""

from __future__ import annotations

from collections.abc import Iterable

from tidelog.node import rpc
from tidelog.node.auth import CLUSTER, Guard, Resource
from tidelog.node.controller_node import Controller, TopicSpec, admin_timeout_ms
from tidelog.node.identity import NodeIdentity
from tidelog.node.metrics import NodeMetrics
from tidelog.node.topics import Topic, TopicRegistry
from tidelog.v1 import admin_pb2 as pb
from tidelog.v1 import admin_pb2_grpc as pb_grpc


def describe(topic: Topic, registry: TopicRegistry) -> pb.TopicDescription:
    """Log figures (offsets, size) come from this node's replica when it holds one: from the
    leader they are exact, from a follower they trail a little, elsewhere they are 0."""
    partitions = []
    for a in topic.record.partitions:
        v = registry.view(a)
        local = v.local
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
            )
        )
    return pb.TopicDescription(
        name=topic.name,
        replication_factor=topic.replication_factor,
        configs=topic.effective_configs(),
        overrides=sorted(topic.overrides),
        partitions=partitions,
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
