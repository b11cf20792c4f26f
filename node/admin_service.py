"""The Admin gRPC service: create, delete, describe and alter topics.

A thin adapter: the registry (node/topics.py) validates and applies; this module only maps
protobuf to and from it.
"""

from __future__ import annotations

from tidelog.node import rpc
from tidelog.node.identity import NodeIdentity
from tidelog.node.metrics import NodeMetrics
from tidelog.node.topics import NewTopic, Topic, TopicRegistry
from tidelog.v1 import admin_pb2 as pb
from tidelog.v1 import admin_pb2_grpc as pb_grpc


def describe(topic: Topic, node_id: int) -> pb.TopicDescription:
    return pb.TopicDescription(
        name=topic.name,
        replication_factor=topic.meta.replication_factor,
        configs=topic.effective_configs(),
        overrides=sorted(topic.meta.overrides),
        partitions=[
            pb.PartitionDescription(
                partition=p.index,
                leader=p.leader_id or -1,
                replicas=list(p.replicas),
                in_sync=p.in_sync(),
                log_start_offset=p.log_start_offset,
                high_watermark=p.high_watermark,
                size_bytes=p.log.size_bytes,
                leader_term=p.term,
            )
            for p in topic.partitions
        ],
    )


class AdminService(pb_grpc.AdminServicer):
    def __init__(
        self, registry: TopicRegistry, identity: NodeIdentity, metrics: NodeMetrics
    ) -> None:
        self.registry = registry
        self.identity = identity
        self.metrics = metrics

    @rpc.unary("CreateTopics")
    async def CreateTopics(
        self, request: pb.CreateTopicsRequest, context: rpc.Context
    ) -> pb.CreateTopicsResponse:
        specs = [
            NewTopic(t.name, t.partitions, t.replication_factor, dict(t.configs))
            for t in request.topics
        ]
        created = await self.registry.create(specs, validate_only=request.validate_only)
        return pb.CreateTopicsResponse(created=created)

    @rpc.unary("DeleteTopics")
    async def DeleteTopics(
        self, request: pb.DeleteTopicsRequest, context: rpc.Context
    ) -> pb.DeleteTopicsResponse:
        deleted = await self.registry.delete(list(request.names))
        return pb.DeleteTopicsResponse(deleted=deleted)

    @rpc.unary("DescribeTopics")
    async def DescribeTopics(
        self, request: pb.DescribeTopicsRequest, context: rpc.Context
    ) -> pb.DescribeTopicsResponse:
        names = list(dict.fromkeys(request.names))
        topics = [self.registry.topic(n) for n in names] if names else self.registry.topics()
        node_id = self.identity.node_id
        return pb.DescribeTopicsResponse(topics=[describe(t, node_id) for t in topics])

    @rpc.unary("AlterTopicConfig")
    async def AlterTopicConfig(
        self, request: pb.AlterTopicConfigRequest, context: rpc.Context
    ) -> pb.AlterTopicConfigResponse:
        topic = await self.registry.alter(request.topic, dict(request.set), list(request.delete))
        return pb.AlterTopicConfigResponse(topic=describe(topic, self.identity.node_id))
