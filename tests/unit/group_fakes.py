"""An in-process fake group coordinator for client tests (the real one: node/ on branch
groups, tested by its own suites and tests/integration/test_groups_live.py).

It follows the protocol's rules that matter to a member: a join gets an id and epoch 1; a
partition goes to a member only once no other member reports owning it (revoke first, then
assign); an assignment is sent only when it changed (absent = no change, empty = nothing); a
wrong epoch is FENCED_MEMBER_EPOCH, an unknown member UNKNOWN_MEMBER_ID; a commit is checked
against the member's epoch and what it may own (STALE_MEMBER_EPOCH, REVOKED); an admin commit
needs a group without members. The assignor is plain round-robin over sorted member ids.
"""

from __future__ import annotations

import itertools
import re
import time
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc import aio

from tests.support import free_port
from tests.unit.client_fakes import FakeBroker
from tidelog.client.group import topic_partitions
from tidelog.client.structs import TopicPartition
from tidelog.errors import (
    FencedMemberEpoch,
    GroupNotEmpty,
    InvalidSubscription,
    NotCoordinator,
    Revoked,
    StaleMemberEpoch,
    TidelogError,
    UnknownGroup,
    UnknownMemberId,
    trailing_metadata,
)
from tidelog.v1 import admin_pb2, admin_pb2_grpc, broker_pb2_grpc, group_pb2, group_pb2_grpc

Context = aio.ServicerContext[Any, Any]
HEARTBEAT_INTERVAL_MS = 30


@dataclass
class FakeMember:
    member_id: str
    epoch: int
    instance_id: str | None
    topics: list[str]
    pattern: str | None
    session_timeout_ms: int
    owned: set[TopicPartition] = field(default_factory=set)
    #: What the coordinator last sent it (None: nothing yet).
    sent: frozenset[TopicPartition] | None = None
    last_seen: float = field(default_factory=time.monotonic)


@dataclass
class FakeGroup:
    members: dict[str, FakeMember] = field(default_factory=dict)
    offsets: dict[TopicPartition, int] = field(default_factory=dict)
    epoch: int = 0


class FakeGroupService(group_pb2_grpc.GroupServicer):
    def __init__(self, broker: FakeBroker) -> None:
        self.broker = broker
        self.groups: dict[str, FakeGroup] = {}
        self._ids = itertools.count(1)
        #: Every (member id, owned after the heartbeat) a member reported, for the checks.
        self.reports: list[tuple[str, frozenset[TopicPartition]]] = []
        #: Where FindCoordinator points (None: this node), and how many more Group calls to
        #: answer NOT_COORDINATOR (a coordinator that moved away).
        self.coordinator: str | None = None
        self.refuse = 0
        self.find_calls = 0
        self.heartbeat_calls = 0

    async def _abort(self, context: Context, err: TidelogError) -> None:
        await context.abort(err.code, err.message, trailing_metadata=trailing_metadata(err))

    def _partitions(self, m: FakeMember) -> list[TopicPartition]:
        topics = m.topics
        if m.pattern is not None:
            topics = [t for t in self.broker.topics if re.fullmatch(m.pattern, t)]
        return [
            TopicPartition(t, p)
            for t in sorted(topics)
            for p in range(self.broker.topics.get(t, 0))
        ]

    def _targets(self, g: FakeGroup) -> dict[str, set[TopicPartition]]:
        ids = sorted(g.members)
        out: dict[str, set[TopicPartition]] = {i: set() for i in ids}
        every = sorted({tp for m in g.members.values() for tp in self._partitions(m)})
        for n, tp in enumerate(every):
            wanting = [i for i in ids if tp in self._partitions(g.members[i])]
            if wanting:
                out[wanting[n % len(wanting)]].add(tp)
        return out

    def _expire(self, g: FakeGroup) -> None:
        now = time.monotonic()
        for mid, m in list(g.members.items()):
            if (now - m.last_seen) * 1000 > m.session_timeout_ms:
                del g.members[mid]

    async def FindCoordinator(
        self, request: group_pb2.FindCoordinatorRequest, context: Context
    ) -> group_pb2.FindCoordinatorResponse:
        self.find_calls += 1
        return group_pb2.FindCoordinatorResponse(
            node_id=1, address=self.coordinator or self.broker.address
        )

    async def Heartbeat(
        self, request: group_pb2.GroupHeartbeatRequest, context: Context
    ) -> group_pb2.GroupHeartbeatResponse:
        self.heartbeat_calls += 1
        if self.refuse > 0:
            self.refuse -= 1
            await self._abort(context, NotCoordinator(f"not the coordinator of {request.group_id}"))
        g = self.groups.setdefault(request.group_id, FakeGroup())
        self._expire(g)
        m: FakeMember | None
        if request.member_epoch in (-1, -2):
            g.members.pop(request.member_id, None)
            g.epoch += 1
            return group_pb2.GroupHeartbeatResponse(
                member_id=request.member_id, member_epoch=request.member_epoch
            )
        if request.member_epoch == 0:
            if request.HasField("subscribed_topic_regex"):
                try:
                    re.compile(request.subscribed_topic_regex)
                except re.error as exc:
                    await self._abort(context, InvalidSubscription(f"bad regex: {exc}"))
            mid = request.member_id or f"member-{next(self._ids)}"
            m = FakeMember(
                member_id=mid,
                epoch=1,
                instance_id=request.group_instance_id
                if request.HasField("group_instance_id")
                else None,
                topics=list(request.subscribed_topic_names),
                pattern=request.subscribed_topic_regex
                if request.HasField("subscribed_topic_regex")
                else None,
                session_timeout_ms=request.session_timeout_ms or 45_000,
            )
            g.members[mid] = m
            g.epoch += 1
        else:
            m = g.members.get(request.member_id)
            if m is None:
                await self._abort(context, UnknownMemberId(f"no member {request.member_id}"))
            assert m is not None
            if request.member_epoch != m.epoch:
                await self._abort(
                    context, FencedMemberEpoch(f"epoch {request.member_epoch} is not {m.epoch}")
                )
            if request.subscription_set:
                m.topics = list(request.subscribed_topic_names)
        m.last_seen = time.monotonic()
        if request.owned_set:
            m.owned = {TopicPartition(e.topic, p) for e in request.owned for p in e.partitions}
            self.reports.append((m.member_id, frozenset(m.owned)))
        target = self._targets(g)[m.member_id]
        taken = {tp for other in g.members.values() if other is not m for tp in other.owned} | {
            tp
            for other in g.members.values()
            if other is not m and other.sent is not None
            for tp in other.sent
        }
        may_own = frozenset(tp for tp in target if tp not in taken or tp in m.owned)
        resp = group_pb2.GroupHeartbeatResponse(
            member_id=m.member_id,
            member_epoch=m.epoch,
            heartbeat_interval_ms=HEARTBEAT_INTERVAL_MS,
        )
        # What it keeps of what it was sent, plus what is free: never more than its target.
        if m.sent is None or may_own != m.sent:
            m.epoch += 1
            m.sent = may_own
            resp.member_epoch = m.epoch
            resp.assignment.CopyFrom(
                group_pb2.GroupAssignment(partitions=topic_partitions(may_own))
            )
        return resp

    async def OffsetCommit(
        self, request: group_pb2.OffsetCommitRequest, context: Context
    ) -> group_pb2.OffsetCommitResponse:
        g = self.groups.setdefault(request.group_id, FakeGroup())
        if not request.member_id:
            if g.members:
                await self._abort(context, GroupNotEmpty(f"group {request.group_id} has members"))
        else:
            m = g.members.get(request.member_id)
            if m is None:
                await self._abort(context, UnknownMemberId(f"no member {request.member_id}"))
            assert m is not None
            if request.member_epoch != m.epoch:
                await self._abort(context, StaleMemberEpoch(f"epoch is {m.epoch}"))
            for e in request.offsets:
                tp = TopicPartition(e.topic, e.partition)
                if tp not in m.owned and (m.sent is None or tp not in m.sent):
                    await self._abort(context, Revoked(f"{tp} is not {m.member_id}'s"))
        for e in request.offsets:
            g.offsets[TopicPartition(e.topic, e.partition)] = e.offset
        return group_pb2.OffsetCommitResponse()

    async def OffsetFetch(
        self, request: group_pb2.OffsetFetchRequest, context: Context
    ) -> group_pb2.OffsetFetchResponse:
        g = self.groups.get(request.group_id, FakeGroup())
        wanted = {TopicPartition(e.topic, p) for e in request.partitions for p in e.partitions}
        return group_pb2.OffsetFetchResponse(
            offsets=[
                group_pb2.OffsetEntry(topic=tp.topic, partition=tp.partition, offset=o)
                for tp, o in sorted(g.offsets.items())
                if not wanted or tp in wanted
            ]
        )

    async def ListGroups(
        self, request: group_pb2.ListGroupsRequest, context: Context
    ) -> group_pb2.ListGroupsResponse:
        return group_pb2.ListGroupsResponse(
            groups=[
                group_pb2.GroupListing(
                    group_id=gid,
                    state="stable" if g.members else "empty",
                    members=len(g.members),
                )
                for gid, g in sorted(self.groups.items())
            ]
        )

    async def DescribeGroup(
        self, request: group_pb2.DescribeGroupRequest, context: Context
    ) -> group_pb2.DescribeGroupResponse:
        g = self.groups.get(request.group_id)
        if g is None:
            await self._abort(context, UnknownGroup(f"group {request.group_id!r} does not exist"))
        assert g is not None
        self._expire(g)
        owner = {tp: m.member_id for m in g.members.values() for tp in m.owned}
        tps = sorted(set(g.offsets) | set(owner))
        return group_pb2.DescribeGroupResponse(
            group_id=request.group_id,
            state="stable" if g.members else "empty",
            group_epoch=g.epoch,
            assignment_epoch=g.epoch,
            assignor="uniform",
            coordinator_node_id=1,
            members=[
                group_pb2.GroupMember(
                    member_id=m.member_id,
                    member_epoch=m.epoch,
                    client_host="127.0.0.1",
                    subscribed_topic_names=m.topics,
                    owned=topic_partitions(m.owned),
                    target=topic_partitions(m.sent or ()),
                )
                for m in g.members.values()
            ],
            partitions=[
                group_pb2.PartitionLag(
                    topic=tp.topic,
                    partition=tp.partition,
                    committed_offset=g.offsets.get(tp, -1),
                    end_offset=len(self.broker.log(tp.topic, tp.partition)),
                    lag=len(self.broker.log(tp.topic, tp.partition)) - g.offsets.get(tp, 0),
                    member_id=owner.get(tp, ""),
                )
                for tp in tps
            ],
        )

    async def DeleteGroup(
        self, request: group_pb2.DeleteGroupRequest, context: Context
    ) -> group_pb2.DeleteGroupResponse:
        g = self.groups.get(request.group_id)
        if g is None:
            await self._abort(context, UnknownGroup(f"group {request.group_id!r} does not exist"))
        assert g is not None
        if g.members:
            await self._abort(context, GroupNotEmpty(f"group {request.group_id!r} has members"))
        del self.groups[request.group_id]
        return group_pb2.DeleteGroupResponse()


class FakeTopicAdmin(admin_pb2_grpc.AdminServicer):
    """CreateTopics only: adds the topic to the fake broker (for the group benchmark's check)."""

    def __init__(self, broker: FakeBroker) -> None:
        self.broker = broker

    async def CreateTopics(
        self, request: admin_pb2.CreateTopicsRequest, context: Context
    ) -> admin_pb2.CreateTopicsResponse:
        for t in request.topics:
            self.broker.topics[t.name] = t.partitions
        return admin_pb2.CreateTopicsResponse(created=[t.name for t in request.topics])

    async def DeleteTopics(
        self, request: admin_pb2.DeleteTopicsRequest, context: Context
    ) -> admin_pb2.DeleteTopicsResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not in the fake")
        raise AssertionError("unreachable")

    async def DescribeTopics(
        self, request: admin_pb2.DescribeTopicsRequest, context: Context
    ) -> admin_pb2.DescribeTopicsResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not in the fake")
        raise AssertionError("unreachable")

    async def AlterTopicConfig(
        self, request: admin_pb2.AlterTopicConfigRequest, context: Context
    ) -> admin_pb2.AlterTopicConfigResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not in the fake")
        raise AssertionError("unreachable")

    async def ForceRecoverPartition(
        self, request: admin_pb2.ForceRecoverPartitionRequest, context: Context
    ) -> admin_pb2.ForceRecoverPartitionResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not in the fake")
        raise AssertionError("unreachable")

    async def ForceRecoverController(
        self, request: admin_pb2.ForceRecoverControllerRequest, context: Context
    ) -> admin_pb2.ForceRecoverControllerResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not in the fake")
        raise AssertionError("unreachable")

    async def DescribeCluster(
        self, request: admin_pb2.DescribeClusterRequest, context: Context
    ) -> admin_pb2.DescribeClusterResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not in the fake")
        raise AssertionError("unreachable")

    async def DrainNode(
        self, request: admin_pb2.DrainNodeRequest, context: Context
    ) -> admin_pb2.DrainNodeResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not in the fake")
        raise AssertionError("unreachable")

    async def RemoveNode(
        self, request: admin_pb2.RemoveNodeRequest, context: Context
    ) -> admin_pb2.RemoveNodeResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not in the fake")
        raise AssertionError("unreachable")

    async def ReassignPartition(
        self, request: admin_pb2.ReassignPartitionRequest, context: Context
    ) -> admin_pb2.ReassignPartitionResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not in the fake")
        raise AssertionError("unreachable")

    async def GetClusterConfig(
        self, request: admin_pb2.GetClusterConfigRequest, context: Context
    ) -> admin_pb2.GetClusterConfigResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not in the fake")
        raise AssertionError("unreachable")

    async def SetClusterConfig(
        self, request: admin_pb2.SetClusterConfigRequest, context: Context
    ) -> admin_pb2.SetClusterConfigResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not in the fake")
        raise AssertionError("unreachable")

    async def CreatePartitions(
        self, request: admin_pb2.CreatePartitionsRequest, context: Context
    ) -> admin_pb2.CreatePartitionsResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not in the fake")
        raise AssertionError("unreachable")


class FakeGroupCluster:
    """``async with FakeGroupCluster({"t": 4}) as (broker, groups): ...``: one fake node that
    serves both the Broker and the Group service."""

    def __init__(self, topics: dict[str, int]) -> None:
        self.bootstrap = f"127.0.0.1:{free_port()}"
        self.broker = FakeBroker(self.bootstrap, dict(topics))
        self.groups = FakeGroupService(self.broker)
        self._server: aio.Server | None = None

    async def __aenter__(self) -> tuple[FakeBroker, FakeGroupService]:
        self._server = aio.server()
        broker_pb2_grpc.add_BrokerServicer_to_server(self.broker, self._server)
        group_pb2_grpc.add_GroupServicer_to_server(self.groups, self._server)
        admin_pb2_grpc.add_AdminServicer_to_server(FakeTopicAdmin(self.broker), self._server)
        self._server.add_insecure_port(self.bootstrap)
        await self._server.start()
        return self.broker, self.groups

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        await self._server.stop(grace=None)
