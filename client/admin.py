"""Topic, consumer-group and cluster administration: create, delete, list, describe and
reconfigure topics; list, describe and delete groups, read and reset their committed offsets;
the cluster's shape: describe it, drain and remove nodes, reassign a partition's replicas, get
and set cluster-wide settings.

Every call goes to the first node that answers (the node forwards to whoever owns the
decision), and every failure comes back as the :mod:`tidelog.errors` class the node named,
so a caller can catch ``TopicExists`` or ``InvalidConfig`` rather than parse messages.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Literal

import grpc

from tidelog.client.connection import Connection, PemSource
from tidelog.client.group import RemoteCoordinator, topic_partitions
from tidelog.client.limits import RETRY_BACKOFF_MS_DEFAULT
from tidelog.client.metadata import ClusterMetadata, NodeInfo, TopicInfo
from tidelog.client.structs import TopicPartition
from tidelog.errors import (
    GroupNotEmpty,
    InvalidRequest,
    NodeUnavailable,
    TidelogError,
    UnknownGroup,
    UnknownPartition,
    from_rpc_error,
)
from tidelog.v1 import admin_pb2, broker_pb2, group_pb2, group_pb2_grpc

__all__ = [
    "Admin",
    "ClusterConfigEntry",
    "ClusterDescription",
    "ClusterView",
    "ForceRecoverReport",
    "GroupDescription",
    "GroupListing",
    "GroupMemberDescription",
    "NodeDescription",
    "OffsetResetPlan",
    "PartitionDescription",
    "PartitionLag",
    "PartitionMove",
    "ResetTo",
    "TopicDescription",
]

#: Deadline of one admin RPC: creating a replicated topic waits for its partitions' leaders.
ADMIN_REQUEST_TIMEOUT_MS = 30_000


@dataclass(frozen=True, slots=True)
class ForceRecoverReport:
    """What ``force_recover_partition`` did: the survivor whose log is kept (``chosen``),
    the new replicas, and what may be lost: records below ``kept_end_offset`` are kept
    (every one the survivors knew acknowledged is below ``known_acknowledged_end``);
    acknowledged records at ``kept_end_offset`` or past it, if the lost replicas had any,
    are lost. ``target``: the move restoring the replication factor (empty: none)."""

    topic: str
    partition: int
    chosen: int
    survivors: tuple[int, ...]
    lost_replicas: tuple[int, ...]
    kept_end_offset: int
    known_acknowledged_end: int
    target: tuple[int, ...]
    summary: str


@dataclass(frozen=True, slots=True)
class ControllerRecoveryReport:
    """What ``force_recover_controller`` did: the survivor whose controller log is kept
    (``chosen``, up to ``kept_index``), the voters now and those given up. Controller
    entries above ``kept_index`` up to ``known_committed_index`` were committed and are
    lost; ``voter_target``: the voter count reprovisioning refills to."""

    chosen: int
    survivors: tuple[int, ...]
    lost_voters: tuple[int, ...]
    kept_index: int
    known_committed_index: int
    voter_target: int
    summary: str


@dataclass(frozen=True, slots=True)
class PartitionDescription:
    partition: int
    leader: int
    replicas: tuple[int, ...]
    in_sync: tuple[int, ...]
    log_start_offset: int
    high_watermark: int
    size_bytes: int
    #: The leader's Raft term: Kafka's leader epoch (it grows with every new leader).
    leader_term: int
    #: A move in progress: the replicas the partition ends with (empty: none).
    target: tuple[int, ...] = ()
    #: Replicas being copied (from the leader): node id -> (bytes copied, bytes left).
    moving: dict[int, tuple[int, int]] = field(default_factory=dict)
    #: Why the move does not progress ("" when nothing is known to hold it up).
    stalled: str = ""

    @property
    def leader_epoch(self) -> int:
        """Kafka's name for :attr:`leader_term`."""
        return self.leader_term


@dataclass(frozen=True, slots=True)
class TopicDescription:
    name: str
    replication_factor: int
    partitions: tuple[PartitionDescription, ...]
    #: The effective configuration: overrides and node defaults.
    configs: dict[str, str] = field(default_factory=dict)
    #: The keys of ``configs`` that are overrides set on this topic.
    overrides: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class NodeDescription:
    node_id: int
    address: str
    rack: str
    alive: bool
    #: "active" or "draining".
    state: str
    replicas: int
    leaders: int
    #: Unix ms; 0 when alive (or not known).
    dead_since_ms: int
    reprovision_deadline_ms: int
    #: "topic/p: why" for each replica that cannot be moved off it.
    stalled: tuple[str, ...]
    controller_voter: bool


@dataclass(frozen=True, slots=True)
class PartitionMove:
    topic: str
    partition: int
    replicas: tuple[int, ...]
    target: tuple[int, ...]
    stalled: str


@dataclass(frozen=True, slots=True)
class ClusterDescription:
    controller_id: int
    nodes: tuple[NodeDescription, ...]
    moves: tuple[PartitionMove, ...]
    #: The controller group's voters (its committed configuration).
    controller_voters: tuple[int, ...] = ()
    #: A controller voter change in progress ("" when none).
    controller_voter_change: str = ""


@dataclass(frozen=True, slots=True)
class ClusterConfigEntry:
    key: str
    value: str
    default: str
    is_default: bool
    doc: str
    #: "cluster" or "topic default".
    kind: str


def _move(m: admin_pb2.PartitionMove) -> PartitionMove:
    return PartitionMove(m.topic, m.partition, tuple(m.replicas), tuple(m.target), m.stalled)


def _entries(entries: Sequence[admin_pb2.ClusterConfigEntry]) -> list[ClusterConfigEntry]:
    return [
        ClusterConfigEntry(e.key, e.value, e.default, e.is_default, e.doc, e.kind) for e in entries
    ]


@dataclass(frozen=True, slots=True)
class ClusterView:
    cluster_id: str
    controller_id: int
    nodes: tuple[NodeInfo, ...]
    topics: tuple[TopicInfo, ...]
    #: Why the node that answered has no controller yet (waiting for the controller voters to
    #: form the cluster), or "".
    controller_waiting: str = ""


@dataclass(frozen=True, slots=True)
class GroupListing:
    group_id: str
    #: "empty", "stable", "reconciling" or "dead".
    state: str
    members: int
    #: The node that answered for it (its coordinator).
    coordinator_node_id: int


@dataclass(frozen=True, slots=True)
class GroupMemberDescription:
    member_id: str
    group_instance_id: str | None
    member_epoch: int
    client_host: str
    #: The subscribed topic names, or the pattern.
    subscription: tuple[str, ...] | str
    #: What the member reported it owns, and what the coordinator wants it to own.
    owned: tuple[TopicPartition, ...]
    target: tuple[TopicPartition, ...]


@dataclass(frozen=True, slots=True)
class PartitionLag:
    topic: str
    partition: int
    #: None when nothing was committed.
    committed_offset: int | None
    end_offset: int
    lag: int
    #: The member that owns it, "" if none.
    member_id: str


@dataclass(frozen=True, slots=True)
class GroupDescription:
    group_id: str
    state: str
    group_epoch: int
    assignment_epoch: int
    assignor: str
    coordinator_node_id: int
    members: tuple[GroupMemberDescription, ...]
    partitions: tuple[PartitionLag, ...]


#: Where ``reset_group_offsets`` moves a group: ("earliest", 0), ("latest", 0), ("offset", N),
#: ("datetime", TIMESTAMP_MS) or ("shift", N).
ResetTo = tuple[Literal["earliest", "latest", "offset", "datetime", "shift"], int]


@dataclass(frozen=True, slots=True)
class OffsetResetPlan:
    topic: str
    partition: int
    #: The committed offset now (None: nothing committed).
    current: int | None
    new: int


def _tp_tuple(entries: Sequence[group_pb2.TopicPartitions]) -> tuple[TopicPartition, ...]:
    return tuple(sorted(TopicPartition(e.topic, p) for e in entries for p in e.partitions))


def _group_description(resp: group_pb2.DescribeGroupResponse) -> GroupDescription:
    return GroupDescription(
        group_id=resp.group_id,
        state=resp.state,
        group_epoch=resp.group_epoch,
        assignment_epoch=resp.assignment_epoch,
        assignor=resp.assignor,
        coordinator_node_id=resp.coordinator_node_id,
        members=tuple(
            GroupMemberDescription(
                member_id=m.member_id,
                group_instance_id=m.group_instance_id if m.HasField("group_instance_id") else None,
                member_epoch=m.member_epoch,
                client_host=m.client_host,
                subscription=m.subscribed_topic_regex
                if m.HasField("subscribed_topic_regex")
                else tuple(m.subscribed_topic_names),
                owned=_tp_tuple(m.owned),
                target=_tp_tuple(m.target),
            )
            for m in sorted(resp.members, key=lambda m: m.member_id)
        ),
        partitions=tuple(
            PartitionLag(
                topic=p.topic,
                partition=p.partition,
                committed_offset=p.committed_offset if p.committed_offset >= 0 else None,
                end_offset=p.end_offset,
                lag=p.lag,
                member_id=p.member_id,
            )
            for p in sorted(resp.partitions, key=lambda p: (p.topic, p.partition))
        ),
    )


def _description(t: admin_pb2.TopicDescription) -> TopicDescription:
    return TopicDescription(
        name=t.name,
        replication_factor=t.replication_factor,
        partitions=tuple(
            PartitionDescription(
                partition=p.partition,
                leader=p.leader,
                replicas=tuple(p.replicas),
                in_sync=tuple(p.in_sync),
                log_start_offset=p.log_start_offset,
                high_watermark=p.high_watermark,
                size_bytes=p.size_bytes,
                leader_term=p.leader_term,
                target=tuple(p.target),
                moving={m.node_id: (m.copied, m.left) for m in p.moving},
                stalled=p.stalled,
            )
            for p in sorted(t.partitions, key=lambda p: p.partition)
        ),
        configs=dict(t.configs),
        overrides=tuple(t.overrides),
    )


def _names(names: str | Sequence[str]) -> list[str]:
    return [names] if isinstance(names, str) else list(names)


class Admin:
    """``async with Admin("127.0.0.1:9092") as admin: await admin.create_topics("t", 3)``."""

    def __init__(
        self,
        bootstrap: str | Sequence[str],
        *,
        request_timeout_ms: int = ADMIN_REQUEST_TIMEOUT_MS,
        tls: bool = False,
        ca: PemSource | None = None,
        client_cert: PemSource | None = None,
        client_key: PemSource | None = None,
        token: str | None = None,
    ) -> None:
        connection = Connection.create(
            tls=tls, ca=ca, client_cert=client_cert, client_key=client_key, token=token
        )
        self._meta = ClusterMetadata(bootstrap, connection=connection)
        self._timeout_s = request_timeout_ms / 1000
        self._retry_backoff_ms = RETRY_BACKOFF_MS_DEFAULT

    async def __aenter__(self) -> Admin:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self._meta.close()

    async def create_topics(
        self,
        name: str | Sequence[str],
        partitions: int = 1,
        replication_factor: int | None = None,
        configs: Mapping[str, str] | None = None,
        *,
        validate_only: bool = False,
    ) -> list[str]:
        """Create one topic (or several alike); returns the names created.
        ``replication_factor`` None: the cluster's default, 3 replicas or every node alive
        when fewer are."""
        specs = [
            admin_pb2.TopicSpec(
                name=n,
                partitions=partitions,
                replication_factor=replication_factor or 0,
                configs=dict(configs or {}),
            )
            for n in _names(name)
        ]
        req = admin_pb2.CreateTopicsRequest(topics=specs, validate_only=validate_only)

        async def call(address: str) -> admin_pb2.CreateTopicsResponse:
            resp: admin_pb2.CreateTopicsResponse = await self._meta.admin(address).CreateTopics(
                req, timeout=self._timeout_s
            )
            return resp

        resp = await self._meta.call_any("create topics", call)
        return list(resp.created)

    async def delete_topics(self, names: str | Sequence[str]) -> list[str]:
        req = admin_pb2.DeleteTopicsRequest(names=_names(names))

        async def call(address: str) -> admin_pb2.DeleteTopicsResponse:
            resp: admin_pb2.DeleteTopicsResponse = await self._meta.admin(address).DeleteTopics(
                req, timeout=self._timeout_s
            )
            return resp

        resp = await self._meta.call_any("delete topics", call)
        return list(resp.deleted)

    async def describe_topics(
        self, names: str | Sequence[str] | None = None
    ) -> list[TopicDescription]:
        """Every topic (``names=None``) or the named ones, with offsets, sizes and configs."""
        req = admin_pb2.DescribeTopicsRequest(names=[] if names is None else _names(names))

        async def call(address: str) -> admin_pb2.DescribeTopicsResponse:
            resp: admin_pb2.DescribeTopicsResponse = await self._meta.admin(address).DescribeTopics(
                req, timeout=self._timeout_s
            )
            return resp

        resp = await self._meta.call_any("describe topics", call)
        await self._figures_from_leaders(resp)
        return sorted((_description(t) for t in resp.topics), key=lambda d: d.name)

    async def _figures_from_leaders(self, resp: admin_pb2.DescribeTopicsResponse) -> None:
        """Replace each partition's offsets and size with its leader's: a node answers with
        its own replica's figures, which trail on a follower and are 0 on a node without a
        replica. One DescribeTopics per leader node, for the topics it leads partitions of;
        a leader that does not answer leaves the first answer's figures."""
        if not self._meta.nodes:
            with contextlib.suppress(TidelogError):
                await self._meta.refresh()
        wanted: dict[int, set[str]] = {}
        for t in resp.topics:
            for p in t.partitions:
                if p.leader >= 0:
                    wanted.setdefault(p.leader, set()).add(t.name)

        async def ask(
            node_id: int, names: set[str]
        ) -> tuple[int, admin_pb2.DescribeTopicsResponse]:
            node = self._meta.nodes.get(node_id)
            if node is None:
                raise NodeUnavailable(f"node {node_id} is not in the metadata")
            req = admin_pb2.DescribeTopicsRequest(names=sorted(names))
            got: admin_pb2.DescribeTopicsResponse = await self._meta.admin(
                node.address
            ).DescribeTopics(req, timeout=self._timeout_s)
            return node_id, got

        answers = await asyncio.gather(
            *(ask(n, names) for n, names in wanted.items()), return_exceptions=True
        )
        exact: dict[tuple[str, int], admin_pb2.PartitionDescription] = {}
        for answer in answers:
            if isinstance(answer, BaseException):
                if not isinstance(answer, (TidelogError, grpc.RpcError)):
                    raise answer
                continue
            node_id, got = answer
            for t in got.topics:
                for p in t.partitions:
                    if p.leader == node_id:  # that node leads it: its figures are exact
                        exact[(t.name, p.partition)] = p
        for t in resp.topics:
            for p in t.partitions:
                better = exact.get((t.name, p.partition))
                if better is not None and better.leader_term >= p.leader_term:
                    p.log_start_offset = better.log_start_offset
                    p.high_watermark = better.high_watermark
                    p.size_bytes = better.size_bytes
                    p.leader = better.leader
                    p.leader_term = better.leader_term
                    del p.moving[:]
                    p.moving.extend(better.moving)
                    if better.stalled:
                        p.stalled = better.stalled

    async def alter_topic_config(
        self,
        topic: str,
        *,
        set: Mapping[str, str] | None = None,
        delete: Sequence[str] = (),
    ) -> TopicDescription:
        """Set and remove topic overrides in one step; returns the topic as it is now."""
        req = admin_pb2.AlterTopicConfigRequest(
            topic=topic, set=dict(set or {}), delete=list(delete)
        )

        async def call(address: str) -> admin_pb2.AlterTopicConfigResponse:
            resp: admin_pb2.AlterTopicConfigResponse = await self._meta.admin(
                address
            ).AlterTopicConfig(req, timeout=self._timeout_s)
            return resp

        resp = await self._meta.call_any("alter topic config", call)
        return _description(resp.topic)

    async def create_partitions(
        self, topic: str, total_count: int, *, validate_only: bool = False
    ) -> TopicDescription:
        """Grow ``topic`` to ``total_count`` partitions (Kafka's create_partitions); returns
        the topic as it is now. A topic never shrinks; records already stored stay where they
        are, so the keys of later records may map to other partitions than before."""
        if isinstance(total_count, bool) or not isinstance(total_count, int):
            raise TypeError(f"total_count must be an int, got {type(total_count).__name__}")
        req = admin_pb2.CreatePartitionsRequest(
            topic=topic, total_count=total_count, validate_only=validate_only
        )

        async def call(address: str) -> admin_pb2.CreatePartitionsResponse:
            resp: admin_pb2.CreatePartitionsResponse = await self._meta.admin(
                address
            ).CreatePartitions(req, timeout=self._timeout_s)
            return resp

        resp = await self._meta.call_any("create partitions", call)
        await self._meta.refresh(force=True)
        return _description(resp.topic)

    async def _any(self, what: str, rpc: str, request: object) -> object:
        async def call(address: str) -> object:
            method = getattr(self._meta.admin(address), rpc)
            return await method(request, timeout=self._timeout_s)

        return await self._meta.call_any(what, call)

    async def describe_cluster(self) -> ClusterDescription:
        """Nodes (replicas, leaders, states, reprovisioning deadlines) and moves in progress."""
        resp = await self._any(
            "describe cluster", "DescribeCluster", admin_pb2.DescribeClusterRequest()
        )
        assert isinstance(resp, admin_pb2.DescribeClusterResponse)
        nodes = tuple(
            NodeDescription(
                node_id=n.node_id,
                address=n.address,
                rack=n.rack,
                alive=n.alive,
                state=n.state,
                replicas=n.replicas,
                leaders=n.leaders,
                dead_since_ms=n.dead_since_ms,
                reprovision_deadline_ms=n.reprovision_deadline_ms,
                stalled=tuple(n.stalled),
                controller_voter=n.controller_voter,
            )
            for n in resp.nodes
        )
        return ClusterDescription(
            resp.controller_id,
            nodes,
            tuple(_move(m) for m in resp.moves),
            tuple(resp.controller_voters),
            resp.controller_voter_change,
        )

    async def drain_node(self, node_id: int, *, cancel: bool = False) -> int:
        """Move every replica off ``node_id`` (``cancel``: stop draining); returns how many
        replicas it holds now. The moves run in the background: watch describe_cluster."""
        req = admin_pb2.DrainNodeRequest(node_id=node_id, cancel=cancel)
        resp = await self._any("drain node", "DrainNode", req)
        assert isinstance(resp, admin_pb2.DrainNodeResponse)
        return resp.replicas

    async def remove_node(self, node_id: int) -> None:
        """Forget a dead or drained node that holds no replica."""
        await self._any("remove node", "RemoveNode", admin_pb2.RemoveNodeRequest(node_id=node_id))

    async def reassign_partition(
        self, topic: str, partition: int, replicas: Sequence[int] = (), *, cancel: bool = False
    ) -> PartitionMove:
        """Move a partition's replicas to ``replicas`` (the preferred leader first), or
        cancel its move in progress."""
        req = admin_pb2.ReassignPartitionRequest(
            topic=topic, partition=partition, replicas=list(replicas), cancel=cancel
        )
        resp = await self._any("reassign partition", "ReassignPartition", req)
        assert isinstance(resp, admin_pb2.ReassignPartitionResponse)
        return _move(resp.move)

    async def force_recover_partition(
        self, topic: str, partition: int, *, from_survivors: bool = False
    ) -> ForceRecoverReport:
        """UNSAFE: recover a partition that lost a majority of its replicas for good from
        the surviving replicas (``from_survivors`` must be set). Acknowledged records the
        lost replicas alone held are lost: see the report and docs/operations.md."""
        req = admin_pb2.ForceRecoverPartitionRequest(
            topic=topic, partition=partition, from_survivors=from_survivors
        )
        resp = await self._any("force-recover partition", "ForceRecoverPartition", req)
        assert isinstance(resp, admin_pb2.ForceRecoverPartitionResponse)
        return ForceRecoverReport(
            topic=resp.topic,
            partition=resp.partition,
            chosen=resp.chosen,
            survivors=tuple(resp.survivors),
            lost_replicas=tuple(resp.lost_replicas),
            kept_end_offset=resp.kept_end_offset,
            known_acknowledged_end=resp.known_acknowledged_end,
            target=tuple(resp.target),
            summary=resp.summary,
        )

    async def force_recover_controller(
        self, *, from_survivors: bool = False
    ) -> ControllerRecoveryReport:
        """UNSAFE: recover the controller after it lost a majority of its voters for good:
        its voters shrink to the nodes that answer the node asked (``from_survivors`` must
        be set). Committed metadata changes only the lost voters held are lost: see the
        report and docs/operations.md."""
        req = admin_pb2.ForceRecoverControllerRequest(from_survivors=from_survivors)
        resp = await self._any("force-recover controller", "ForceRecoverController", req)
        assert isinstance(resp, admin_pb2.ForceRecoverControllerResponse)
        return ControllerRecoveryReport(
            chosen=resp.chosen,
            survivors=tuple(resp.survivors),
            lost_voters=tuple(resp.lost_voters),
            kept_index=resp.kept_index,
            known_committed_index=resp.known_committed_index,
            voter_target=resp.voter_target,
            summary=resp.summary,
        )

    async def cluster_config(self, keys: Sequence[str] = ()) -> list[ClusterConfigEntry]:
        """Every cluster setting (or the named ones), with its value and default."""
        req = admin_pb2.GetClusterConfigRequest(keys=list(keys))
        resp = await self._any("get cluster config", "GetClusterConfig", req)
        assert isinstance(resp, admin_pb2.GetClusterConfigResponse)
        return _entries(resp.entries)

    async def set_cluster_config(
        self, set: Mapping[str, str] | None = None, delete: Sequence[str] = ()
    ) -> list[ClusterConfigEntry]:
        """Set and unset cluster settings in one step; returns the keys changed, as now."""
        req = admin_pb2.SetClusterConfigRequest(set=dict(set or {}), delete=list(delete))
        resp = await self._any("set cluster config", "SetClusterConfig", req)
        assert isinstance(resp, admin_pb2.SetClusterConfigResponse)
        return _entries(resp.entries)

    async def list_topics(self, *, internal: bool = False) -> list[str]:
        view = await self.metadata()
        return sorted(t.name for t in view.topics if internal or not t.internal)

    async def metadata(self) -> ClusterView:
        """Nodes, topics, partitions and leaders, as the cluster sees them now."""
        await self._meta.refresh()
        return ClusterView(
            cluster_id=self._meta.cluster_id,
            controller_id=self._meta.controller_id,
            nodes=tuple(sorted(self._meta.nodes.values(), key=lambda n: n.node_id)),
            topics=tuple(sorted(self._meta.topics.values(), key=lambda t: t.name)),
            controller_waiting=self._meta.controller_waiting,
        )

    # -- consumer groups ------------------------------------------------------------------------

    def _coordinator(self, group_id: str) -> RemoteCoordinator:
        return RemoteCoordinator(self._meta, group_id, self._retry_backoff_ms)

    async def list_groups(self) -> list[GroupListing]:
        """Every group of the cluster: each node lists the groups it coordinates, so every live
        node is asked and the answers merged (a group two nodes claim during a coordinator
        move is listed once, by the answer with more members)."""
        await self._meta.refresh()
        addresses = {n.node_id: n.address for n in self._meta.nodes.values() if n.alive}
        if not addresses:
            addresses = {-1 - i: a for i, a in enumerate(self._meta.bootstrap)}

        async def ask(node_id: int, address: str) -> tuple[int, group_pb2.ListGroupsResponse]:
            stub = group_pb2_grpc.GroupStub(self._meta.channel(address))
            try:
                resp: group_pb2.ListGroupsResponse = await stub.ListGroups(
                    group_pb2.ListGroupsRequest(), timeout=self._timeout_s
                )
            except grpc.aio.AioRpcError as exc:
                raise from_rpc_error(exc) from None
            return node_id, resp

        answers = await asyncio.gather(
            *(ask(n, a) for n, a in addresses.items()), return_exceptions=True
        )
        found: dict[str, GroupListing] = {}
        errors: list[TidelogError] = []
        for answer in answers:
            if isinstance(answer, BaseException):
                if not isinstance(answer, TidelogError):
                    raise answer
                errors.append(answer)
                continue
            node_id, resp = answer
            for g in resp.groups:
                old = found.get(g.group_id)
                if old is None or g.members > old.members:
                    found[g.group_id] = GroupListing(g.group_id, g.state, g.members, node_id)
        if errors and len(errors) == len(answers):
            raise errors[0]
        return sorted(found.values(), key=lambda g: g.group_id)

    async def describe_group(self, group_id: str) -> GroupDescription:
        """Members, their assignments, and per partition the committed offset, end offset and
        lag, from the group's coordinator. An unknown group raises UnknownGroup."""
        resp = await self._coordinator(group_id).describe(self._timeout_s * 1000)
        if resp.state == "dead":
            raise UnknownGroup(f"group {group_id!r} does not exist", group_id=group_id)
        return _group_description(resp)

    async def delete_group(self, group_id: str) -> None:
        """Delete a group without members and its committed offsets (GroupNotEmpty while it
        has members)."""
        await self._coordinator(group_id).delete(self._timeout_s * 1000)

    async def list_group_offsets(
        self, group_id: str, partitions: Sequence[TopicPartition] = ()
    ) -> dict[TopicPartition, int]:
        """The group's committed offsets (of ``partitions``, default all)."""
        request = group_pb2.OffsetFetchRequest(
            group_id=group_id, partitions=topic_partitions(partitions)
        )
        resp = await self._coordinator(group_id).fetch(request, self._timeout_s * 1000)
        return {TopicPartition(e.topic, e.partition): e.offset for e in resp.offsets}

    async def alter_group_offsets(
        self, group_id: str, offsets: Mapping[TopicPartition, int]
    ) -> None:
        """Set committed offsets of a group without members (the coordinator refuses it with
        GroupNotEmpty while the group has members, who own their partitions' progress)."""
        request = group_pb2.OffsetCommitRequest(
            group_id=group_id,
            member_id="",
            member_epoch=-1,
            offsets=[
                group_pb2.OffsetEntry(topic=tp.topic, partition=tp.partition, offset=o)
                for tp, o in sorted(offsets.items())
            ],
        )
        await self._coordinator(group_id).commit(request, self._timeout_s * 1000)

    async def reset_group_offsets(
        self,
        group_id: str,
        topic: str,
        to: ResetTo,
        *,
        partitions: Sequence[int] = (),
        execute: bool = False,
    ) -> list[OffsetResetPlan]:
        """Plan (and with ``execute``, apply) moving ``group_id``'s committed offsets of
        ``topic`` (or its ``partitions``): to the earliest or latest offset, an offset, the
        first record at or after a timestamp, or shifted by N from the committed offset (the
        end where nothing was committed). Every new offset is clamped into the partition's
        range, as Kafka's tool does. Refused with GroupNotEmpty while the group has members."""
        await self._refuse_active(group_id)
        info = await self._meta.wait_for_topic(topic, wait_ms=5_000)
        every = [p.partition for p in info.partitions]
        for p in partitions:
            if p not in every:
                raise UnknownPartition(
                    f"topic {topic!r} has partitions 0..{len(every) - 1}; there is no "
                    f"partition {p}",
                    topic=topic,
                )
        tps = [TopicPartition(topic, p) for p in (sorted(set(partitions)) or every)]
        current = await self.list_group_offsets(group_id, tps)
        kind, n = to
        starts = await self._list_offsets(tps, broker_pb2.OFFSET_SPEC_EARLIEST, 0)
        ends = await self._list_offsets(tps, broker_pb2.OFFSET_SPEC_LATEST, 0)
        if kind == "datetime":
            wanted = await self._list_offsets(tps, broker_pb2.OFFSET_SPEC_TIMESTAMP, n)
        plan: list[OffsetResetPlan] = []
        for tp in tps:
            if kind == "earliest":
                new = starts[tp]
            elif kind == "latest":
                new = ends[tp]
            elif kind == "offset":
                new = n
            elif kind == "datetime":
                new = wanted[tp]
            elif kind == "shift":
                new = current.get(tp, ends[tp]) + n
            else:
                raise InvalidRequest(f"unknown reset {kind!r}")
            new = min(max(new, starts[tp]), ends[tp])
            plan.append(OffsetResetPlan(tp.topic, tp.partition, current.get(tp), new))
        if execute:
            await self.alter_group_offsets(
                group_id, {TopicPartition(p.topic, p.partition): p.new for p in plan}
            )
        return plan

    async def _refuse_active(self, group_id: str) -> None:
        try:
            desc = await self.describe_group(group_id)
        except UnknownGroup:
            return  # a group nobody used yet: its offsets may be set
        if desc.members:
            raise GroupNotEmpty(
                f"group {group_id!r} has {len(desc.members)} active member"
                + ("" if len(desc.members) == 1 else "s")
                + ": stop its consumers before resetting its offsets",
                group_id=group_id,
            )

    async def _list_offsets(
        self, tps: Sequence[TopicPartition], spec: broker_pb2.OffsetSpec.ValueType, ts: int
    ) -> dict[TopicPartition, int]:
        """ListOffsets at each partition's leader (a refresh and another try when it moved)."""

        async def one(tp: TopicPartition) -> int:
            request = broker_pb2.ListOffsetsRequest(
                topic=tp.topic, partition=tp.partition, spec=spec, timestamp_ms=ts
            )
            last: TidelogError | None = None
            for attempt in range(5):
                address = self._meta.leader_address(tp.topic, tp.partition)
                if address is None:
                    await self._meta.refresh()
                    address = self._meta.leader_address(tp.topic, tp.partition)
                if address is not None:
                    try:
                        resp: broker_pb2.ListOffsetsResponse = await self._meta.broker(
                            address
                        ).ListOffsets(request, timeout=self._timeout_s)
                        return resp.offset
                    except grpc.aio.AioRpcError as exc:
                        last = from_rpc_error(exc)
                        if not last.retriable:
                            raise last from None
                await asyncio.sleep(0.1 * 2**attempt)
                await self._meta.refresh()
            raise last or NodeUnavailable(f"partition {tp} has no leader right now")

        got = await asyncio.gather(*(one(tp) for tp in tps))
        return dict(zip(tps, got, strict=True))
