"""What the client knows about the cluster: nodes, topics, partitions and their leaders.

Every client object (producer, consumer, admin) owns one :class:`ClusterMetadata`. It turns a
bootstrap list into a full view with the Metadata RPC and keeps one gRPC channel per node
address, so all requests to a node share one HTTP/2 connection. The view is refreshed on
demand: when a topic is not known yet, and when a request fails with NOT_LEADER or the node
is unreachable (the leader moved or died).

A leader failover must reach the client within a few tens of milliseconds of the cluster
knowing it, without the client hammering the dead node. Hence:

- :meth:`ClusterMetadata.wait_for_leader` lets a request that failed at a leader wait for
  that partition's leader to change (or for its own backoff to end), while one poller per
  client re-reads the metadata of the waited-for topics every LEADER_POLL_INTERVAL_MS;
- a NOT_LEADER answer that names the new leader updates the view at once
  (:meth:`ClusterMetadata.apply_leader_hint`), no refresh needed;
- a Metadata RPC has a short deadline and asks the node that answered last first, nodes
  found unreachable last, so a dead node costs one refused connection, not a refresh.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import grpc
import grpc.aio

from tidelog.client.connection import Connection
from tidelog.errors import (
    NodeUnavailable,
    NotLeader,
    TidelogError,
    TlsError,
    UnknownTopic,
    from_rpc_error,
)
from tidelog.v1 import admin_pb2_grpc, broker_pb2, broker_pb2_grpc

__all__ = [
    "GRPC_MESSAGE_BYTES_MAX",
    "LEADER_POLL_INTERVAL_MS",
    "ClusterMetadata",
    "NodeInfo",
    "PartitionInfo",
    "TopicInfo",
    "parse_bootstrap",
    "transport_failure",
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
#: Deadline of one Metadata RPC in the first pass over the nodes: a dead or black-holed node
#: costs at most this much before the next node is asked.
METADATA_REQUEST_TIMEOUT_MS = 500
#: Deadline of the second pass, made only when every node was merely slow in the first: a
#: loaded cluster still answers, just late.
METADATA_REQUEST_TIMEOUT_SLOW_MS = 5_000
#: How long an address that could not be reached is asked last (unless it answers again).
UNREACHABLE_MEMORY_MS = 10_000
#: How often metadata is re-read while a request waits for a partition's leader to change:
#: a new leader reaches the waiter within about this long of the cluster knowing it.
LEADER_POLL_INTERVAL_MS = 50
#: The slower pace once every waiter has waited LEADER_POLL_FAST_MS (no election takes that
#: long; the partition is probably down for good and polling fast would only load the nodes).
LEADER_POLL_INTERVAL_SLOW_MS = 250
LEADER_POLL_FAST_MS = 5_000

assert METADATA_REFRESH_INTERVAL_MIN_MS <= LEADER_POLL_INTERVAL_MS <= LEADER_POLL_INTERVAL_SLOW_MS
assert METADATA_REQUEST_TIMEOUT_MS <= METADATA_REQUEST_TIMEOUT_SLOW_MS

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

#: The trailer that carries a node's google.rpc.Status (and so tidelog's ErrorInfo).
_STATUS_DETAILS_KEY = "grpc-status-details-bin"


def parse_bootstrap(bootstrap: str | Sequence[str]) -> list[str]:
    """``"h1:9092,h2:9092"`` or a list of ``host:port`` strings, checked, in order."""
    items = bootstrap.split(",") if isinstance(bootstrap, str) else list(bootstrap)
    out: list[str] = []
    for raw in items:
        addr = raw.strip()
        if not addr:
            continue
        if not _is_address(addr):
            raise ValueError(
                f"bootstrap address {addr!r} is not host:port (for example 127.0.0.1:9092)"
            )
        out.append(addr)
    if not out:
        raise ValueError("the bootstrap list is empty: give at least one host:port")
    return out


def _is_address(addr: str) -> bool:
    host, sep, port = addr.rpartition(":")
    return bool(sep and host and port.isdigit() and 0 < int(port) < 65536)


def transport_failure(exc: grpc.aio.AioRpcError) -> bool:
    """The call never got a tidelog answer: refused, reset or timed out on the way (a node's
    own errors carry an ErrorInfo detail in the trailers)."""
    if exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return False
    trailers: Any = exc.trailing_metadata() or ()
    return not any(key == _STATUS_DETAILS_KEY for key, _ in trailers)


def _no_answer(
    what: str, tried: Sequence[str], last: TidelogError | None, connection: Connection
) -> NodeUnavailable:
    """The error of a request no node answered; a failed TLS handshake says so."""
    if isinstance(last, TlsError):
        return TlsError(f"{what}: no node answered at {', '.join(tried)}: {last}")
    hint = "is the cluster running and the bootstrap address right?"
    if connection.tls and connection.client_cert is None and "Socket closed" in str(last):
        # What a client sees when a node that requires client certificates refuses it.
        hint = (
            "the node closed the TLS connection: if it requires client certificates "
            "(--tls-client-ca), give client_cert= and client_key= (--tls-cert, --tls-key)"
        )
    return NodeUnavailable(f"{what}: no node answered at {', '.join(tried)} ({last}); {hint}")


def _moves_on(exc: grpc.aio.AioRpcError, err: TidelogError) -> bool:
    """Whether a request any node can answer should be tried at the next node."""
    return isinstance(err, NodeUnavailable) or exc.code() in (
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
    )


@dataclass(frozen=True, slots=True)
class NodeInfo:
    node_id: int
    address: str
    metrics_address: str
    alive: bool
    #: The node's failure domain (``--rack``); empty when it has none.
    rack: str = ""


@dataclass(frozen=True, slots=True)
class PartitionInfo:
    partition: int
    #: -1 when the partition has no leader right now.
    leader: int
    replicas: tuple[int, ...]
    in_sync: tuple[int, ...]
    #: The leader's Raft term, Kafka's leader epoch (-1: unknown); it grows with each leader.
    leader_epoch: int = -1


@dataclass(frozen=True, slots=True)
class TopicInfo:
    name: str
    partitions: tuple[PartitionInfo, ...]
    internal: bool

    @property
    def partition_count(self) -> int:
        return len(self.partitions)


@dataclass(eq=False, slots=True)
class _LeaderWaiter:
    """One caller of :meth:`ClusterMetadata.wait_for_leader`."""

    topic: str
    partition: int
    not_at: str | None
    since_s: float
    future: asyncio.Future[str]


class ClusterMetadata:
    """The cached cluster view plus the channels to reach it."""

    def __init__(
        self,
        bootstrap: str | Sequence[str],
        *,
        request_timeout_ms: int = METADATA_REQUEST_TIMEOUT_MS,
        connection: Connection | None = None,
    ) -> None:
        self.bootstrap = parse_bootstrap(bootstrap)
        #: Plaintext or TLS, certificate and token: how every channel is opened.
        self.connection = connection or Connection()
        self.request_timeout_ms = request_timeout_ms
        self.nodes: dict[int, NodeInfo] = {}
        self.topics: dict[str, TopicInfo] = {}
        self.controller_id = -1
        #: Why the answering node has no controller yet (a voter waiting for the others to
        #: form the cluster), or "".
        self.controller_waiting = ""
        self.cluster_id = ""
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._brokers: dict[str, broker_pb2_grpc.BrokerAsyncStub] = {}
        self._admins: dict[str, admin_pb2_grpc.AdminAsyncStub] = {}
        self._refreshing: asyncio.Task[None] | None = None
        #: The topics the running refresh asks for (None: all of them).
        self._refreshing_topics: frozenset[str] | None = None
        self._last_full_s = 0.0
        self._topic_refreshed_s: dict[str, float] = {}
        self._updated = 0
        self._closed = False
        #: The node that answered the last request any node could answer: asked first.
        self._last_good: str | None = None
        #: Address -> when it could not be reached (time.monotonic()); asked last for a while.
        self._unreachable: dict[str, float] = {}
        self._waiters: set[_LeaderWaiter] = set()
        self._poller: asyncio.Task[None] | None = None

    # -- channels -------------------------------------------------------------------------------

    def channel(self, address: str) -> grpc.aio.Channel:
        ch = self._channels.get(address)
        if ch is None:
            if self._closed:
                raise TidelogError("this client is closed")
            ch = self.connection.channel(address, _CHANNEL_OPTIONS)
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
        if self._poller is not None:
            self._poller.cancel()
        for w in self._waiters:
            if not w.future.done():
                w.future.set_exception(TidelogError("this client was closed"))
        channels, self._channels = list(self._channels.values()), {}
        self._brokers.clear()
        self._admins.clear()
        await asyncio.gather(*(ch.close(None) for ch in channels), return_exceptions=True)

    # -- which node to ask ----------------------------------------------------------------------

    def addresses(self) -> list[str]:
        """Where to send a request any node can answer: the node that answered last, the other
        live known nodes and the bootstrap list, and the nodes found unreachable lately last."""
        known = [n.address for n in self.nodes.values() if n.alive and n.address]
        order = list(dict.fromkeys([*known, *self.bootstrap]))
        if self._last_good in order:
            i = order.index(self._last_good)
            order = order[i:] + order[:i]
        if not self._unreachable:
            return order
        horizon = time.monotonic() - UNREACHABLE_MEMORY_MS / 1000
        for address, since in list(self._unreachable.items()):
            if since < horizon:
                del self._unreachable[address]
        good = [a for a in order if a not in self._unreachable]
        bad = sorted(
            (a for a in order if a in self._unreachable), key=self._unreachable.__getitem__
        )
        return good + bad

    def note_unreachable(self, address: str) -> None:
        """A request to ``address`` found no node there: ask it last for a while."""
        self._unreachable[address] = time.monotonic()
        if self._last_good == address:
            self._last_good = None

    def note_reachable(self, address: str) -> None:
        """``address`` answered: it is an ordinary candidate again."""
        if self._unreachable:
            self._unreachable.pop(address, None)

    def _recently_unreachable(self, address: str) -> bool:
        since = self._unreachable.get(address)
        return since is not None and time.monotonic() - since < UNREACHABLE_MEMORY_MS / 1000

    async def call_any(self, what: str, call: Callable[[str], Awaitable[T]]) -> T:
        """Run ``call(address)`` on the first node that answers.

        Only "cannot reach this node" moves on to the next address; any answer from a node,
        error or not, is the cluster's answer.
        """
        last: TidelogError | None = None
        for address in self.addresses():
            try:
                result = await call(address)
            except grpc.aio.AioRpcError as exc:
                err = from_rpc_error(exc)
                if not _moves_on(exc, err):
                    raise err from None
                if transport_failure(exc):
                    self.note_unreachable(address)
                last = err
                continue
            self._last_good = address
            self.note_reachable(address)
            return result
        raise _no_answer(what, self.addresses(), last, self.connection)

    # -- metadata -------------------------------------------------------------------------------

    @property
    def version(self) -> int:
        """Grows with every applied refresh or leader hint: tells a new view from the old."""
        return self._updated

    def topic(self, name: str) -> TopicInfo | None:
        return self.topics.get(name)

    def leader_address(self, topic: str, partition: int) -> str | None:
        info = self.topics.get(topic)
        if info is None or not 0 <= partition < len(info.partitions):
            return None
        node = self.nodes.get(info.partitions[partition].leader)
        return node.address if node is not None and node.address else None

    async def refresh(self, *, force: bool = True, topics: Iterable[str] | None = None) -> None:
        """Fetch the cluster view; concurrent callers share one RPC.

        With ``topics``, only those topics are asked for (plus the node list, which always
        comes along): the cheap refresh of a client waiting for a leader. ``force=False`` skips
        the RPC when what is asked for is younger than METADATA_REFRESH_INTERVAL_MIN_MS, the
        rate limit for error-driven refreshes.
        """
        wanted = frozenset(topics) if topics is not None else None
        if not wanted:
            wanted = None
        while (running := self._refreshing) is not None and not running.done():
            asked = self._refreshing_topics
            covered = asked is None or (wanted is not None and wanted <= asked)
            await asyncio.shield(running)
            if covered:
                return
        if not force and self._fresh(wanted):
            return
        self._refreshing_topics = wanted
        task = asyncio.get_running_loop().create_task(self._refresh(wanted))
        self._refreshing = task
        await asyncio.shield(task)

    def _fresh(self, wanted: frozenset[str] | None) -> bool:
        if not self._updated:
            return False
        now = time.monotonic()
        interval_s = METADATA_REFRESH_INTERVAL_MIN_MS / 1000
        if now - self._last_full_s < interval_s:
            return True
        if wanted is None:
            return False
        return all(now - self._topic_refreshed_s.get(t, 0.0) < interval_s for t in wanted)

    async def _refresh(self, wanted: frozenset[str] | None) -> None:
        request = broker_pb2.MetadataRequest(topics=sorted(wanted or ()))
        try:
            resp = await self._ask_any(request)
        except UnknownTopic:
            if wanted is None:
                raise
            # A topic asked for is gone (deleted): the whole view drops it.
            wanted = None
            resp = await self._ask_any(broker_pb2.MetadataRequest())
        self._apply(resp, wanted)

    async def _ask_any(self, request: broker_pb2.MetadataRequest) -> broker_pb2.MetadataResponse:
        """The first node's answer: each node gets a short deadline first, and only when every
        node timed out do the slow ones get a second, long one."""
        last: TidelogError | None = None
        slow: list[str] = []

        async def ask(address: str, timeout_ms: int) -> broker_pb2.MetadataResponse | None:
            nonlocal last
            try:
                resp: broker_pb2.MetadataResponse = await self.broker(address).Metadata(
                    request, timeout=timeout_ms / 1000
                )
            except grpc.aio.AioRpcError as exc:
                err = from_rpc_error(exc)
                if not _moves_on(exc, err):
                    raise err from None
                if transport_failure(exc):
                    self.note_unreachable(address)
                if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                    slow.append(address)
                last = err
                return None
            self._last_good = address
            self.note_reachable(address)
            return resp

        tried = self.addresses()
        for address in tried:
            if (resp := await ask(address, self.request_timeout_ms)) is not None:
                return resp
        if self.request_timeout_ms < METADATA_REQUEST_TIMEOUT_SLOW_MS:
            for address in list(slow):
                if (resp := await ask(address, METADATA_REQUEST_TIMEOUT_SLOW_MS)) is not None:
                    return resp
        raise _no_answer("metadata", tried, last, self.connection)

    def _apply(self, resp: broker_pb2.MetadataResponse, wanted: frozenset[str] | None) -> None:
        self.nodes = {
            n.node_id: NodeInfo(n.node_id, n.address, n.metrics_address, n.alive, n.rack)
            for n in resp.nodes
        }
        topics = {t.name: _topic_info(t) for t in resp.topics}
        now = time.monotonic()
        if wanted is None:
            self.topics = topics
            self._last_full_s = now
            self._topic_refreshed_s.clear()
        else:
            self.topics = {**self.topics, **topics}
            for name in topics:
                self._topic_refreshed_s[name] = now
        self.controller_id = resp.controller_id
        self.controller_waiting = resp.controller_waiting
        self.cluster_id = resp.cluster_id
        self._updated += 1
        self._wake_waiters(full=wanted is None)

    def apply_leader_hint(self, topic: str, partition: int, err: TidelogError) -> bool:
        """Adopt the leader a NOT_LEADER answer names, so that the retry goes straight there
        instead of waiting for the metadata to catch up. True when the partition's leader
        changed. A hint naming a node found unreachable lately is ignored: it comes from a
        node that has not noticed the old leader's death yet."""
        if not isinstance(err, NotLeader):
            return False
        info = self.topics.get(topic)
        if info is None or not 0 <= partition < len(info.partitions):
            return False
        raw_id = err.metadata.get("leader_id", "")
        address = err.metadata.get("leader_address", "")
        leader_id = int(raw_id) if raw_id.isdigit() else 0
        node = self.nodes.get(leader_id) if leader_id > 0 else None
        if node is None:
            if not _is_address(address):
                return False
            node = next((n for n in self.nodes.values() if n.address == address), None)
            if node is None:
                if leader_id <= 0:
                    return False
                node = NodeInfo(leader_id, address, "", True)
                self.nodes = {**self.nodes, leader_id: node}
        if not node.address or self._recently_unreachable(node.address):
            return False
        old = info.partitions[partition]
        if old.leader == node.node_id:
            return False
        parts = list(info.partitions)
        # The hint names the leader, not its term: the epoch is unknown until a refresh.
        parts[partition] = replace(old, leader=node.node_id, leader_epoch=-1)
        self.topics = {**self.topics, topic: replace(info, partitions=tuple(parts))}
        self._updated += 1
        self._wake_waiters()
        return True

    # -- waiting for leaders --------------------------------------------------------------------

    async def wait_for_leader(
        self,
        topic: str,
        partition: int,
        *,
        not_at: str | None = None,
        timeout_s: float | None = None,
        since_s: float | None = None,
    ) -> str | None:
        """The address of the partition's leader as soon as one is known that is not
        ``not_at`` (the node a request just failed at), or None when ``timeout_s`` passes
        first. Meanwhile the topic's metadata is re-read every LEADER_POLL_INTERVAL_MS (one
        poller for all waiters), so a retry that waits here goes to a new leader within about
        that long of the cluster electing it; ``since_s`` (time.monotonic()) is when the
        caller began waiting for this partition, across calls, so that a partition down for
        long is polled at the slower pace. Raises UnknownTopic when the topic is gone."""
        address = self.leader_address(topic, partition)
        if address is not None and address != not_at:
            return address
        if timeout_s is not None and timeout_s <= 0:
            return None
        if self._closed:
            raise TidelogError("this client is closed")
        loop = asyncio.get_running_loop()
        began_s = time.monotonic() if since_s is None else since_s
        waiter = _LeaderWaiter(topic, partition, not_at, began_s, loop.create_future())
        self._waiters.add(waiter)
        if self._poller is None or self._poller.done():
            self._poller = loop.create_task(self._poll_leaders(), name="metadata leader poll")
        try:
            if timeout_s is None:
                return await waiter.future
            try:
                return await asyncio.wait_for(asyncio.shield(waiter.future), timeout_s)
            except TimeoutError:
                return None
        finally:
            self._waiters.discard(waiter)
            if not waiter.future.done():
                waiter.future.cancel()
            elif not waiter.future.cancelled():
                waiter.future.exception()  # retrieved: no "never retrieved" warning

    async def _poll_leaders(self) -> None:
        while self._waiters:
            topics = {w.topic for w in self._waiters}
            try:
                await self.refresh(force=False, topics=topics)
            except TidelogError as err:
                log.debug("metadata refresh while waiting for leaders failed: %s", err)
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug or a closing channel: keep the waiters served
                log.exception("metadata refresh while waiting for leaders failed")
            self._wake_waiters()
            if not self._waiters:
                break
            youngest_s = max(w.since_s for w in self._waiters)
            fast = time.monotonic() - youngest_s < LEADER_POLL_FAST_MS / 1000
            interval_ms = LEADER_POLL_INTERVAL_MS if fast else LEADER_POLL_INTERVAL_SLOW_MS
            await asyncio.sleep(interval_ms / 1000)

    def _wake_waiters(self, *, full: bool = False) -> None:
        for w in self._waiters:
            if w.future.done():
                continue
            if full and w.topic not in self.topics:
                w.future.set_exception(
                    UnknownTopic(f"topic {w.topic!r} no longer exists", topic=w.topic)
                )
                continue
            address = self.leader_address(w.topic, w.partition)
            if address is not None and address != w.not_at:
                w.future.set_result(address)

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
            PartitionInfo(
                p.partition,
                p.leader,
                tuple(p.replicas),
                tuple(p.in_sync),
                p.leader_term if p.leader >= 0 else -1,
            )
            for p in parts
        ),
        internal=t.internal,
    )
