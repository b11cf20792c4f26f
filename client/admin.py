"""Topic administration: create, delete, list, describe and reconfigure topics.

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

import grpc

from tidelog.client.connection import Connection, PemSource
from tidelog.client.metadata import ClusterMetadata, NodeInfo, TopicInfo
from tidelog.errors import NodeUnavailable, TidelogError
from tidelog.v1 import admin_pb2

__all__ = ["Admin", "ClusterView", "PartitionDescription", "TopicDescription"]

#: Deadline of one admin RPC: creating a replicated topic waits for its partitions' leaders.
ADMIN_REQUEST_TIMEOUT_MS = 30_000


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
class ClusterView:
    cluster_id: str
    controller_id: int
    nodes: tuple[NodeInfo, ...]
    topics: tuple[TopicInfo, ...]


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
        replication_factor: int = 1,
        configs: Mapping[str, str] | None = None,
        *,
        validate_only: bool = False,
    ) -> list[str]:
        """Create one topic (or several alike); returns the names created."""
        specs = [
            admin_pb2.TopicSpec(
                name=n,
                partitions=partitions,
                replication_factor=replication_factor,
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
        )
