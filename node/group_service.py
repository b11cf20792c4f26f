"""The Group service (proto/tidelog/v1/group.proto) on the client listener.

Authorization as Kafka's: finding a coordinator, heartbeats, member commits, offset fetches,
listing and describing groups are a client's (role ``client``); deleting a group and an
admin offset commit (no member id, epoch -1: ``tidelog group reset-offsets``) need ``admin``.

Any node answers FindCoordinator (from the cluster metadata, creating ``__consumer_offsets``
the first time); every other RPC is served by the coordinator only (node/group_coordinator.py)
and fails elsewhere with NOT_COORDINATOR. ListGroups lists the groups this node coordinates
(a client asks every node and merges).
"""

from __future__ import annotations

import contextlib

from tidelog.controller.groups.assignors import TP
from tidelog.controller.groups.records import offset_key
from tidelog.controller.groups.state import (
    CommitEntry,
    HeartbeatInput,
    decode_offset,
)
from tidelog.errors import InvalidRequest, TidelogError, UnknownGroup
from tidelog.node import rpc
from tidelog.node.auth import CLUSTER, Guard
from tidelog.node.group_coordinator import GroupRuntime
from tidelog.node.metrics import NodeMetrics
from tidelog.node.topics import TopicRegistry
from tidelog.v1 import group_pb2 as pb
from tidelog.v1 import group_pb2_grpc as pb_grpc


def _tps(items: list[pb.TopicPartitions]) -> frozenset[TP]:
    return frozenset((tp.topic, p) for tp in items for p in tp.partitions)


def _to_pb(tps: frozenset[TP]) -> list[pb.TopicPartitions]:
    by_topic: dict[str, list[int]] = {}
    for topic, partition in sorted(tps):
        by_topic.setdefault(topic, []).append(partition)
    return [pb.TopicPartitions(topic=t, partitions=ps) for t, ps in by_topic.items()]


def _peer_host(context: rpc.Context) -> str:
    peer = context.peer() or ""
    return peer[:200]


class GroupService(pb_grpc.GroupServicer):
    def __init__(
        self,
        runtime: GroupRuntime,
        registry: TopicRegistry,
        metrics: NodeMetrics,
        node_id: int,
        *,
        guard: Guard | None = None,
    ) -> None:
        self.runtime = runtime
        self.registry = registry
        self.metrics = metrics
        self.node_id = node_id
        self.guard = guard or Guard()

    @rpc.unary("FindCoordinator")
    async def FindCoordinator(
        self, request: pb.FindCoordinatorRequest, context: rpc.Context
    ) -> pb.FindCoordinatorResponse:
        self.guard.check(context, "FindCoordinator", CLUSTER)
        if not request.group_id:
            raise InvalidRequest("FindCoordinator needs a group id")
        try:
            node_id, address, partition = await self.runtime.find(request.group_id)
        except ValueError as exc:
            raise InvalidRequest(f"bad group id: {exc}") from None
        return pb.FindCoordinatorResponse(node_id=node_id, address=address, partition=partition)

    @rpc.unary("GroupHeartbeat")
    async def Heartbeat(
        self, request: pb.GroupHeartbeatRequest, context: rpc.Context
    ) -> pb.GroupHeartbeatResponse:
        self.guard.check(context, "GroupHeartbeat", CLUSTER)
        regex = (
            request.subscribed_topic_regex if request.HasField("subscribed_topic_regex") else None
        )
        names: tuple[str, ...] | None = None
        if request.subscription_set or request.subscribed_topic_names:
            names = tuple(request.subscribed_topic_names)
        req = HeartbeatInput(
            group_id=request.group_id,
            member_id=request.member_id,
            member_epoch=request.member_epoch,
            instance_id=request.group_instance_id
            if request.HasField("group_instance_id")
            else None,
            rack=request.rack_id if request.HasField("rack_id") else None,
            rebalance_timeout_ms=request.rebalance_timeout_ms
            if request.HasField("rebalance_timeout_ms")
            else None,
            topic_names=names,
            regex=regex,
            server_assignor=request.server_assignor
            if request.HasField("server_assignor")
            else None,
            owned=_tps(list(request.owned)) if request.owned_set or request.owned else None,
            session_timeout_ms=request.session_timeout_ms
            if request.HasField("session_timeout_ms")
            else None,
            client_host=_peer_host(context),
        )
        outcome = await self.runtime.heartbeat(req)
        answer = outcome.answer
        resp = pb.GroupHeartbeatResponse(
            member_id=answer.member_id,
            member_epoch=answer.member_epoch,
            heartbeat_interval_ms=answer.heartbeat_interval_ms,
        )
        if answer.assignment is not None:
            resp.assignment.CopyFrom(pb.GroupAssignment(partitions=_to_pb(answer.assignment)))
        return resp

    @rpc.unary("OffsetCommit")
    async def OffsetCommit(
        self, request: pb.OffsetCommitRequest, context: rpc.Context
    ) -> pb.OffsetCommitResponse:
        admin = not request.member_id and request.member_epoch == -1
        self.guard.check(context, "AdminOffsetCommit" if admin else "OffsetCommit", CLUSTER)
        if admin:
            for entry in request.offsets:
                # An admin commit names existing partitions (a member's are its assignment).
                if entry.partition >= self.runtime.topics().get(entry.topic, 0):
                    raise InvalidRequest(
                        f"no partition {entry.topic}/{entry.partition} to commit an offset for"
                    )
        entries = [CommitEntry(e.topic, e.partition, e.offset, e.metadata) for e in request.offsets]
        await self.runtime.commit(
            request.group_id, request.member_id, request.member_epoch, entries
        )
        return pb.OffsetCommitResponse()

    async def _committed(
        self, group_id: str, wanted: frozenset[TP] | None
    ) -> dict[TP, pb.OffsetEntry]:
        coord = await self.runtime.coordinator(group_id)
        await coord.read_table_ready()
        g = coord.state.groups.get(group_id)
        if g is None:
            return {}
        tps = sorted(g.offsets if wanted is None else g.offsets & wanted)
        table = coord.part.table
        assert table is not None
        rows = table.get_many([offset_key(group_id, t, p) for t, p in tps])
        out: dict[TP, pb.OffsetEntry] = {}
        for (topic, partition), row in zip(tps, rows, strict=True):
            if row is None:
                continue
            value = decode_offset(row.value)
            out[(topic, partition)] = pb.OffsetEntry(
                topic=topic, partition=partition, offset=value.offset, metadata=value.metadata
            )
        return out

    @rpc.unary("OffsetFetch")
    async def OffsetFetch(
        self, request: pb.OffsetFetchRequest, context: rpc.Context
    ) -> pb.OffsetFetchResponse:
        self.guard.check(context, "OffsetFetch", CLUSTER)
        wanted = _tps(list(request.partitions)) if request.partitions else None
        committed = await self._committed(request.group_id, wanted)
        return pb.OffsetFetchResponse(offsets=[committed[tp] for tp in sorted(committed)])

    @rpc.unary("ListGroups")
    async def ListGroups(
        self, request: pb.ListGroupsRequest, context: rpc.Context
    ) -> pb.ListGroupsResponse:
        self.guard.check(context, "ListGroups", CLUSTER)
        listings = []
        for coord in self.runtime.local_groups().values():
            for group_id, g in sorted(coord.state.groups.items()):
                listings.append(
                    pb.GroupListing(group_id=group_id, state=g.state_name, members=len(g.members))
                )
        return pb.ListGroupsResponse(groups=sorted(listings, key=lambda x: x.group_id))

    @rpc.unary("DescribeGroup")
    async def DescribeGroup(
        self, request: pb.DescribeGroupRequest, context: rpc.Context
    ) -> pb.DescribeGroupResponse:
        self.guard.check(context, "DescribeGroup", CLUSTER)
        coord = await self.runtime.coordinator(request.group_id)
        g = coord.state.groups.get(request.group_id)
        if g is None:
            raise UnknownGroup(
                f"group {request.group_id!r} does not exist (no members, no committed offsets)",
                group_id=request.group_id,
            )
        committed = await self._committed(request.group_id, None)
        resp = pb.DescribeGroupResponse(
            group_id=request.group_id,
            state=g.state_name,
            group_epoch=g.epoch,
            assignment_epoch=g.assignment_epoch,
            assignor=g.assignor,
            coordinator_node_id=self.node_id,
        )
        owners: dict[TP, str] = {}
        for member_id in sorted(g.members):
            meta = g.members[member_id]
            cur = g.current[member_id]
            owned = coord.state.reported_owned(request.group_id, member_id)
            for tp in cur.holds:
                owners[tp] = member_id
            member = pb.GroupMember(
                member_id=member_id,
                member_epoch=cur.epoch,
                client_host=meta.client_host,
                subscribed_topic_names=list(meta.topic_names),
                owned=_to_pb(owned),
                target=_to_pb(g.target.get(member_id, frozenset())),
            )
            if meta.instance_id is not None:
                member.group_instance_id = meta.instance_id
            if meta.regex is not None:
                member.subscribed_topic_regex = meta.regex
            resp.members.append(member)
        for tp in sorted(set(committed) | set(g.owner_of()) | set(self._subscribed(g.subscribed))):
            # End offset and lag from this node's replica (every node holds one when the
            # replication factor equals the cluster size); -1 when it holds none.
            end, start = -1, 0
            with contextlib.suppress(TidelogError):
                _, part = self.registry.partition(*tp)
                end, start = part.high_watermark, part.log_start_offset
            offset = committed[tp].offset if tp in committed else -1
            lag = max(0, end - max(offset, start)) if end >= 0 else -1
            resp.partitions.append(
                pb.PartitionLag(
                    topic=tp[0],
                    partition=tp[1],
                    committed_offset=offset,
                    end_offset=end,
                    lag=lag,
                    member_id=owners.get(tp, ""),
                )
            )
        return resp

    @staticmethod
    def _subscribed(subscribed: dict[str, int]) -> list[TP]:
        return [(t, p) for t, n in subscribed.items() for p in range(n)]

    @rpc.unary("DeleteGroup")
    async def DeleteGroup(
        self, request: pb.DeleteGroupRequest, context: rpc.Context
    ) -> pb.DeleteGroupResponse:
        self.guard.check(context, "DeleteGroup", CLUSTER)
        await self.runtime.delete(request.group_id)
        return pb.DeleteGroupResponse()
