"""What the client knows about the cluster: nodes, topics, partitions and their leaders.

Every client object (producer, consumer, admin) owns one :class:`ClusterMetadata`. It turns a
bootstrap list into a full view with the Metadata RPC and keeps one gRPC channel per node
address, so all requests to a node share one HTTP/2 connection. The view is refreshed on
demand: when a topic is not known yet, and when a request fails with NOT_LEADER or the node
is unreachable (the leader moved or died).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import grpc
import grpc.aio

from tidelog.errors import (
    NodeUnavailable,
    TidelogError,
    UnknownTopic,
    from_rpc_error,
)
from tidelog.v1 import admin_pb2_grpc, broker_pb2, broker_pb2_grpc

__all__ = [
    "GRPC_MESSAGE_BYTES_MAX",
    "ClusterMetadata",
    "NodeInfo",
    "PartitionInfo",
    "TopicInfo",
    "parse_bootstrap",
]

log = logging.getLogger(__name__)

_MIB = 1024 * 1024
#: The node accepts produce requests up to 64 MiB and lets gRPC carry 8 MiB more so that an
#: oversized request meets tidelog's readable error instead of gRPC's bare one; the client's
#: channels allow the same, both ways (a fetch response may exceed max_bytes by one batch).
GRPC_MESSAGE_BYTES_MAX = 72 * _MIB
#: Fewest milliseconds between two metadata refreshes forced by errors: a burst of NOT_LEADER
#: answers for many partitions costs one Metadata RPC, not one per partition.
METADATA_REFRESH_INTERVAL_MIN_MS = 50
#: Deadline of one Metadata RPC; a node that does not answer in time is skipped.
METADATA_REQUEST_TIMEOUT_MS = 5_000

_CHANNEL_OPTIONS: list[tuple[str, int]] = [
    ("grpc.max_send_message_length", GRPC_MESSAGE_BYTES_MAX),
    ("grpc.max_receive_message_length", GRPC_MESSAGE_BYTES_MAX),
    # Notice a dead peer on an idle connection (a consumer waiting for data) within seconds.
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    # Reconnect quickly after a node restarts instead of gRPC's default 1 s..120 s backoff.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2_000),
]

T = TypeVar("T")


def parse_bootstrap(bootstrap: str | Sequence[str]) -> list[str]:
    """``"h1:9092,h2:9092"`` or a list of ``host:port`` strings, checked, in order."""
    items = bootstrap.split(",") if isinstance(bootstrap, str) else list(bootstrap)
    out: list[str] = []
    for raw in items:
        addr = raw.strip()
        if not addr:
            continue
        host, sep, port = addr.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(
                f"bootstrap address {addr!r} is not host:port (for example 127.0.0.1:9092)"
            )
        out.append(addr)
    if not out:
        raise ValueError("the bootstrap list is empty: give at least one host:port")
    return out


@dataclass(frozen=True, slots=True)
class NodeInfo:
    node_id: int
    address: str
    metrics_address: str
    alive: bool


@dataclass(frozen=True, slots=True)
class PartitionInfo:
    partition: int
    #: -1 when the partition has no leader right now.
    leader: int
    replicas: tuple[int, ...]
    in_sync: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class TopicInfo:
    name: str
    partitions: tuple[PartitionInfo, ...]
    internal: bool

    @property
    def partition_count(self) -> int:
        return len(self.partitions)


class ClusterMetadata:
    """The cached cluster view plus the channels to reach it."""

    def __init__(
        self,
        bootstrap: str | Sequence[str],
        *,
        request_timeout_ms: int = METADATA_REQUEST_TIMEOUT_MS,
    ) -> None:
        self.bootstrap = parse_bootstrap(bootstrap)
        self.request_timeout_ms = request_timeout_ms
        self.nodes: dict[int, NodeInfo] = {}
        self.topics: dict[str, TopicInfo] = {}
        self.controller_id = -1
        self.cluster_id = ""
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._brokers: dict[str, broker_pb2_grpc.BrokerAsyncStub] = {}
        self._admins: dict[str, admin_pb2_grpc.AdminAsyncStub] = {}
        self._refreshing: asyncio.Task[None] | None = None
        self._last_refresh_s = 0.0
        self._updated = 0
        self._closed = False

    # -- channels -------------------------------------------------------------------------------

    def channel(self, address: str) -> grpc.aio.Channel:
        ch = self._channels.get(address)
        if ch is None:
            if self._closed:
                raise TidelogError("this client is closed")
            ch = grpc.aio.insecure_channel(address, options=_CHANNEL_OPTIONS)
            self._channels[address] = ch
        return ch

    def broker(self, address: str) -> broker_pb2_grpc.BrokerAsyncStub:
        stub = self._brokers.get(address)
        if stub is None:
            stub = self._brokers[address] = broker_pb2_grpc.BrokerStub(self.channel(address))
        return stub

    def admin(self, address: str) -> admin_pb2_grpc.AdminAsyncStub:
        stub = self._admins.get(address)
        if stub is None:
            stub = self._admins[address] = admin_pb2_grpc.AdminStub(self.channel(address))
        return stub

    async def close(self) -> None:
        self._closed = True
        if self._refreshing is not None:
            self._refreshing.cancel()
        channels, self._channels = list(self._channels.values()), {}
        self._brokers.clear()
        self._admins.clear()
        await asyncio.gather(*(ch.close(None) for ch in channels), return_exceptions=True)

    def addresses(self) -> list[str]:
        """Where to send a request any node can answer: live known nodes, then the bootstrap."""
        known = [n.address for n in self.nodes.values() if n.alive and n.address]
        return list(dict.fromkeys([*known, *self.bootstrap]))

    async def call_any(self, what: str, call: Callable[[str], Awaitable[T]]) -> T:
        """Run ``call(address)`` on the first node that answers.

        Only "cannot reach this node" moves on to the next address; any answer from a node,
        error or not, is the cluster's answer.
        """
        last: TidelogError | None = None
        for address in self.addresses():
            try:
                return await call(address)
            except grpc.aio.AioRpcError as exc:
                err = from_rpc_error(exc)
                if not isinstance(err, NodeUnavailable) and exc.code() not in (
                    grpc.StatusCode.UNAVAILABLE,
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                ):
                    raise err from None
                last = err
        raise NodeUnavailable(
            f"{what}: no node answered at {', '.join(self.addresses())} ({last}); "
            "is the cluster running and the bootstrap address right?"
        )

    # -- metadata -------------------------------------------------------------------------------

    @property
    def version(self) -> int:
        """Grows with every applied refresh: lets waiters tell a new view from the old one."""
        return self._updated

    def topic(self, name: str) -> TopicInfo | None:
        return self.topics.get(name)

    def leader_address(self, topic: str, partition: int) -> str | None:
        info = self.topics.get(topic)
        if info is None or not 0 <= partition < len(info.partitions):
            return None
        node = self.nodes.get(info.partitions[partition].leader)
        return node.address if node is not None and node.address else None

    async def refresh(self, *, force: bool = True) -> None:
        """Fetch the whole cluster view; concurrent callers share one RPC.

        ``force=False`` skips the RPC when the last refresh is younger than
        METADATA_REFRESH_INTERVAL_MIN_MS, the rate limit for error-driven refreshes.
        """
        if self._refreshing is not None and not self._refreshing.done():
            await asyncio.shield(self._refreshing)
            return
        age_ms = (time.monotonic() - self._last_refresh_s) * 1000
        if not force and age_ms < METADATA_REFRESH_INTERVAL_MIN_MS and self._updated:
            return
        self._refreshing = asyncio.get_running_loop().create_task(self._refresh())
        await asyncio.shield(self._refreshing)

    async def _refresh(self) -> None:
        timeout_s = self.request_timeout_ms / 1000

        async def ask(address: str) -> broker_pb2.MetadataResponse:
            resp: broker_pb2.MetadataResponse = await self.broker(address).Metadata(
                broker_pb2.MetadataRequest(), timeout=timeout_s
            )
            return resp

        resp = await self.call_any("metadata", ask)
        self._apply(resp)

    def _apply(self, resp: broker_pb2.MetadataResponse) -> None:
        self.nodes = {
            n.node_id: NodeInfo(n.node_id, n.address, n.metrics_address, n.alive)
            for n in resp.nodes
        }
        self.topics = {t.name: _topic_info(t) for t in resp.topics}
        self.controller_id = resp.controller_id
        self.cluster_id = resp.cluster_id
        self._last_refresh_s = time.monotonic()
        self._updated += 1

    async def wait_for_topic(self, topic: str, *, wait_ms: int) -> TopicInfo:
        """The topic's metadata, refreshing until it shows up or ``wait_ms`` passed.

        A topic created a moment ago may not have reached the node that answers yet, so
        one miss is not final; after ``wait_ms`` it is.
        """
        info = self.topics.get(topic)
        if info is not None:
            return info
        deadline = time.monotonic() + wait_ms / 1000
        delay_s = 0.05
        while True:
            await self.refresh(force=False)
            info = self.topics.get(topic)
            if info is not None:
                return info
            if time.monotonic() >= deadline:
                raise UnknownTopic(
                    f"topic {topic!r} does not exist; create it with "
                    f"`tidelog topic create {topic} --partitions N`",
                    topic=topic,
                )
            await asyncio.sleep(min(delay_s, max(0.0, deadline - time.monotonic())))
            delay_s = min(delay_s * 2, 0.5)


def _topic_info(t: broker_pb2.TopicMetadata) -> TopicInfo:
    parts = sorted(t.partitions, key=lambda p: p.partition)
    return TopicInfo(
        name=t.name,
        partitions=tuple(
            PartitionInfo(p.partition, p.leader, tuple(p.replicas), tuple(p.in_sync)) for p in parts
        ),
        internal=t.internal,
    )
