"""The node-to-node Raft transport: one long-lived gRPC stream to each peer carries the
messages of every Raft group the two nodes share.

Why this shape (see also proto/tidelog/v1/raft.proto, Framing):

* An RPC costs 130-400 us of CPU while data costs 1-3 us per KB, so per-message RPCs would
  cap a node at a few thousand Raft messages per second. :meth:`RaftTransport.send` only
  appends to the peer's outbox and never awaits; a flush scheduled with ``loop.call_soon``
  runs once after the current loop iteration, so everything the node's groups produced in
  that iteration for a peer leaves in one ``RaftBatch`` (heartbeats of all groups as packed
  columns), written on the peer's stream by the one sender task that owns it.
* The stream is one-way: the peer answers on its own stream to us. Raft needs no RPC
  replies, tolerates loss and reordering, and retries by itself, so the transport never
  retransmits: a write that fails loses its batch, and the sender reconnects with capped
  exponential backoff (50 ms .. 1 s).
* Memory stays bounded whatever the peer does: while it is down or slow, the outbox keeps at
  most ``outbox_messages_max`` messages and ``outbox_bytes_max`` bytes and drops the OLDEST
  beyond them, so that when the peer returns it first hears the freshest state (the latest
  heartbeats and votes) rather than a backlog Raft has already given up on.
* Receiving is the Raft service on the node's internal gRPC server (:meth:`add_servicer`):
  the stream's caller is authenticated (node/internal_auth.py: its TLS certificate or
  cluster-secret MAC names a node), each batch is checked (sent by that node, addressed to
  this node of this cluster, from a node that is one of our peers), decoded and handed to
  ``deliver`` on the event loop. A batch with an invalid value (``raft_codec.CodecError``: a
  node id below 1, a term beyond 2^63 - 1, ...) ends the stream with INVALID_ARGUMENT; a
  batch from a node that is not a peer (not a controller voter, not registered) is dropped
  and counted, the stream stays open (the sender may just be ahead of our metadata, and Raft
  resends).
* Metric series are labeled by peer only for peers (``set_peer``): nothing a caller claims
  creates a series, so invented sender ids cannot grow ``/metrics``.

Batches travel as bytes the transport serializes and parses itself, so the byte counters are
exact without a second walk over the message.

**Two carriers of the same batches.** Each node also serves them on a plain TCP listener
(:meth:`RaftTransport.listen`, node/raft_tcp.py; raft.proto, "The TCP listener"), because a
gRPC stream message costs four to five times the CPU of a socket write and adds 0.35-0.7 ms
to each round trip here, and an acks=all produce waits for an APPEND and its answer. Before
each connection the sender asks the peer's ``Raft.Endpoint`` (on the authenticated gRPC
channel) for the listener's port and connects there (TLS with the same certificates, or a
cluster-secret MAC over the listener's fresh nonce); a peer without one (port 0) gets the
gRPC stream as before. Both carriers check every batch in one place (:meth:`_receive`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, NoReturn

import grpc
from google.protobuf.message import DecodeError
from grpc import aio
from prometheus_client import CollectorRegistry, Counter

from tidelog.errors import InvalidRequest, TidelogError, trailing_metadata
from tidelog.node import limits, raft_tcp
from tidelog.node.internal_auth import InternalAuth, Mode, Unauthenticated
from tidelog.node.raft.types import Message
from tidelog.node.raft_codec import (
    CodecError,
    HeartbeatCache,
    decode_batch,
    encode_batch,
    wire_size_estimate,
)
from tidelog.node.raft_tcp import PeerRefused
from tidelog.v1 import raft_pb2

log = logging.getLogger(__name__)

KIB: Final = 1024
MIB: Final = 1024 * KIB

#: Messages and estimated bytes (``raft_codec.wire_size_estimate``) waiting for one peer;
#: beyond either the oldest are dropped. 100,000 is ten 100 ms heartbeat intervals of 10,000
#: groups; the bytes hold a few dozen full 1 MiB APPENDs.
outbox_messages_max: Final = 100_000
outbox_bytes_max: Final = 64 * MIB
#: Estimated bytes per RaftBatch: a flush larger than this leaves in several batches, so one
#: write never pins unbounded memory in gRPC. A single larger message travels alone.
batch_bytes_max: Final = 8 * MIB
#: A single message above this cannot travel (the receiver's gRPC limit): dropped, logged.
message_bytes_max: Final = limits.grpc_message_bytes_max - 1 * MIB
#: Reconnect backoff after a stream fails: doubles from min to max, back to min once a
#: stream has lived for ``stream_stable_ms`` (so a peer that accepts and then refuses us is
#: not hammered, and a refusal is not reported as a recovery every retry).
reconnect_backoff_min_ms: Final = 50
reconnect_backoff_max_ms: Final = 1_000
stream_stable_ms: Final = 1_000
#: HTTP/2 keepalive on peer channels: a peer that stops answering (paused, partitioned) is
#: detected without waiting for TCP. At or above the node server's minimum ping interval.
keepalive_time_ms: Final = 10_000
keepalive_timeout_ms: Final = 5_000
#: Bound on the "peer refused us" warnings remembered (to log each distinct refusal once).
refusals_logged_max: Final = 1_024
#: At most one warning about batches from non-peers per this interval.
unknown_peer_log_interval_ms: Final = 10_000
#: Why an inbound batch was refused: the values of the ``reason`` label (a fixed set).
REFUSAL_REASONS: Final = ("unknown_peer", "invalid", "mismatch")

assert 0 < reconnect_backoff_min_ms <= reconnect_backoff_max_ms <= stream_stable_ms
assert 0 < batch_bytes_max <= outbox_bytes_max
assert batch_bytes_max < message_bytes_max < limits.grpc_message_bytes_max
assert outbox_messages_max >= 1
assert keepalive_time_ms >= 5_000, "the node server rejects pings more often than every 5 s"

SERVICE_NAME: Final = raft_pb2.DESCRIPTOR.services_by_name["Raft"].full_name
STREAM_METHOD: Final = f"/{SERVICE_NAME}/Stream"
ENDPOINT_METHOD: Final = f"/{SERVICE_NAME}/Endpoint"
#: How long asking a peer for its TCP listener may take.
endpoint_timeout_ms: Final = 5_000
#: A sender whose socket buffer does not drain within this time gives the connection up
#: (a peer that stopped reading: paused, partitioned), as gRPC's keepalive would.
drain_timeout_ms: Final = keepalive_time_ms + keepalive_timeout_ms
_STREAM_CLOSED: Final = raft_pb2.StreamClosed().SerializeToString()
_STABLE_S: Final = stream_stable_ms / 1000

#: Options for a gRPC server that accepts peers' streams (the node's own server sets the
#: same message bound in node/server.py; tests and benchmarks use these).
GRPC_SERVER_OPTIONS: Final[Sequence[tuple[str, Any]]] = (
    ("grpc.max_receive_message_length", limits.grpc_message_bytes_max),
    ("grpc.max_send_message_length", limits.grpc_message_bytes_max),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.so_reuseport", 0),
)

_CHANNEL_OPTIONS: Final[Sequence[tuple[str, Any]]] = (
    ("grpc.max_send_message_length", limits.grpc_message_bytes_max),
    ("grpc.max_receive_message_length", limits.grpc_message_bytes_max),
    # gRPC's own reconnect backoff would otherwise reach 120 s and fail our calls fast
    # for that long; keep it within ours.
    ("grpc.initial_reconnect_backoff_ms", reconnect_backoff_min_ms),
    ("grpc.min_reconnect_backoff_ms", reconnect_backoff_min_ms),
    ("grpc.max_reconnect_backoff_ms", reconnect_backoff_max_ms),
    ("grpc.keepalive_time_ms", keepalive_time_ms),
    ("grpc.keepalive_timeout_ms", keepalive_timeout_ms),
    ("grpc.enable_retries", 0),
    # A fresh connection per attempt, not a subchannel shared with other channels.
    ("grpc.use_local_subchannel_pool", 1),
)

#: ``deliver(from_node, [(group, message), ...])``, called on the event loop per batch.
Deliver = Callable[[int, list[tuple[int, Message]]], None]
_Context = aio.ServicerContext[Any, Any]


class PeerMismatch(TidelogError):
    """A batch reached a node it was not addressed to (wrong node id or cluster)."""

    reason = "PEER_MISMATCH"
    code = grpc.StatusCode.FAILED_PRECONDITION


@dataclass(frozen=True, slots=True)
class PeerStatus:
    """What the transport knows about one peer, for status pages and tests."""

    node_id: int
    address: str
    #: A stream is open and the channel to the peer is READY.
    connected: bool
    queued_messages: int
    queued_bytes: int
    #: The last reason the stream to the peer failed (None until it first fails).
    last_error: str | None
    #: What carries the batches while connected: "tcp" (the peer's TCP listener) or
    #: "grpc-stream" (Raft.Stream); None while not connected.
    carrier: str | None = None


class PeerCounters:
    """Pre-bound children of one peer (``.labels`` costs more than the increment)."""

    __slots__ = (
        "batches_received",
        "batches_sent",
        "bytes_received",
        "bytes_sent",
        "dropped",
        "messages_received",
        "messages_sent",
    )

    def __init__(self, m: TransportMetrics, peer: str) -> None:
        self.batches_sent = m.batches_sent.labels(peer)
        self.messages_sent = m.messages_sent.labels(peer)
        self.bytes_sent = m.bytes_sent.labels(peer)
        self.batches_received = m.batches_received.labels(peer)
        self.messages_received = m.messages_received.labels(peer)
        self.bytes_received = m.bytes_received.labels(peer)
        self.dropped = m.dropped.labels(peer)


class TransportMetrics:
    """The transport's counters (``tidelog_raft_`` prefix, label ``peer`` = node id)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        def counter(name: str, doc: str) -> Counter:
            return Counter(f"tidelog_raft_{name}", doc, ["peer"], registry=registry)

        self.batches_sent = counter("batches_sent", "RaftBatch messages written to a peer.")
        self.messages_sent = counter(
            "messages_sent", "Raft messages written to a peer (each heartbeat counts)."
        )
        self.bytes_sent = counter("bytes_sent", "Serialized RaftBatch bytes written to a peer.")
        self.batches_received = counter("batches_received", "RaftBatch messages from a peer.")
        self.messages_received = counter(
            "messages_received", "Raft messages received from a peer (each heartbeat counts)."
        )
        self.bytes_received = counter(
            "bytes_received", "Serialized RaftBatch bytes received from a peer."
        )
        self.dropped = counter(
            "messages_dropped",
            "Raft messages to a peer never written: outbox full, stream failed, peer removed.",
        )
        self.unroutable = Counter(
            "tidelog_raft_messages_unroutable",
            "Raft messages for a node that was never a peer, dropped (no per-node series).",
            registry=registry,
        )
        refused = Counter(
            "tidelog_raft_batches_refused",
            "RaftBatch messages refused: from a node that is not a peer (dropped), invalid "
            "(stream ended), addressed to another node or cluster (stream ended).",
            ["reason"],
            registry=registry,
        )
        self.refused = {reason: refused.labels(reason) for reason in REFUSAL_REASONS}
        self._peers: dict[int, PeerCounters] = {}

    def peer(self, node_id: int) -> PeerCounters:
        """The counters of a peer, created on first use: call it for peers only (set_peer),
        never with an id a caller merely claims (the series would stay for good)."""
        c = self._peers.get(node_id)
        if c is None:
            c = self._peers[node_id] = PeerCounters(self, str(node_id))
        return c

    def known(self, node_id: int) -> PeerCounters | None:
        """The counters of a node that is or was a peer; None for any other id."""
        return self._peers.get(node_id)


class _Peer:
    """One peer's outbox and the state of the stream to it, owned by its sender task.

    ``queue`` holds (group, message, estimated bytes); its first ``flushed`` items have been
    flushed and may be taken by the sender, the rest arrived in the current iteration."""

    __slots__ = (
        "address",
        "call",
        "channel",
        "counters",
        "dirty",
        "flushed",
        "last_error",
        "node_id",
        "queue",
        "queued_bytes",
        "removed",
        "task",
        "wake",
        "writer",
    )

    def __init__(self, node_id: int, address: str, counters: PeerCounters) -> None:
        self.node_id = node_id
        self.address = address
        self.counters = counters
        self.queue: deque[tuple[int, Message, int]] = deque()
        self.queued_bytes = 0
        self.flushed = 0
        self.dirty = False
        self.removed = False
        self.wake = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self.channel: aio.Channel | None = None
        self.call: aio.StreamUnaryCall[bytes, bytes] | None = None
        #: The TCP connection's writer while one is open (instead of ``call``).
        self.writer: asyncio.StreamWriter | None = None
        self.last_error: str | None = None

    def take(self) -> list[tuple[int, Message]]:
        """Flushed messages for one batch: at least one, at most ``batch_bytes_max``."""
        q = self.queue
        items: list[tuple[int, Message]] = []
        size = 0
        n = 0
        while n < self.flushed:
            group, msg, s = q[0]
            if n and size + s > batch_bytes_max:
                break
            q.popleft()
            items.append((group, msg))
            size += s
            n += 1
        self.flushed -= n
        self.queued_bytes -= size
        return items

    def drop_all(self) -> int:
        n = len(self.queue)
        self.queue.clear()
        self.queued_bytes = 0
        self.flushed = 0
        return n


class _Inbound:
    """What one inbound stream or connection knows of its sender so far."""

    __slots__ = ("authenticated", "cache", "counters", "peer_id")

    def __init__(self, authenticated: int | None) -> None:
        #: The node the caller authenticated as (None without authentication).
        self.authenticated = authenticated
        self.peer_id = 0
        self.counters: PeerCounters | None = None
        self.cache: HeartbeatCache | None = None


class RaftTransport:
    """Sends Raft messages to peers and delivers the peers' messages to this node.

    Use from the event loop thread: :meth:`send` and :meth:`flush` are plain calls, and
    :meth:`set_peer` starts the peer's sender task on the running loop.
    """

    def __init__(
        self,
        node_id: int,
        cluster_id: str,
        *,
        deliver: Deliver,
        registry: CollectorRegistry | None = None,
        outbox_messages_max: int = outbox_messages_max,
        outbox_bytes_max: int = outbox_bytes_max,
        auth: InternalAuth | None = None,
    ) -> None:
        if node_id <= 0:
            raise ValueError(f"node id {node_id} is not positive: node ids start at 1")
        if outbox_messages_max < 1 or outbox_bytes_max < 1:
            raise ValueError("outbox bounds must be at least 1")
        self.node_id = node_id
        self.cluster_id = cluster_id
        #: Credentials of the peer channels and the check of who sends to us.
        self.auth = auth if auth is not None else InternalAuth(node_id)
        self._deliver = deliver
        #: Where the counters live; the node passes its own registry, tests get a fresh one.
        self.registry = registry if registry is not None else CollectorRegistry()
        self.metrics = TransportMetrics(self.registry)
        self._outbox_messages_max = outbox_messages_max
        self._outbox_bytes_max = outbox_bytes_max
        self._peers: dict[int, _Peer] = {}
        self._dirty: list[_Peer] = []
        self._flush_handle: asyncio.Handle | None = None
        self._retired: set[asyncio.Task[None]] = set()
        # Handlers of the peers' streams to us, so a stopping node can end them.
        self._inbound: set[asyncio.Task[object]] = set()
        self._hb_caches: dict[int, HeartbeatCache] = {}
        self._refusals_logged: set[tuple[int, int, str]] = set()
        self._unknown_logged_at = float("-inf")
        self._unknown_since_log = 0
        self._closed = False
        self._tcp_server: asyncio.Server | None = None
        #: The TCP listener's port (:meth:`listen`); None while there is none.
        self.tcp_port: int | None = None
        self._client_ssl: ssl.SSLContext | None = None
        #: Called with a peer's id whenever its stream fails (the driver wakes the quiet
        #: groups that peer leads: MultiRaft.wake_led_by).
        self.on_peer_failed: Callable[[int], object] = lambda _node_id: None

    # ---- peers -----------------------------------------------------------------------------

    def set_peer(self, node_id: int, address: str) -> None:
        """Add a peer, or move it to a new address (its stream reconnects there at once,
        keeping the queued messages)."""
        if self._closed:
            raise RuntimeError("the transport is closed")
        if node_id == self.node_id:
            raise ValueError(f"node {node_id} cannot be its own peer")
        if node_id <= 0:
            raise ValueError(f"peer id {node_id} is not positive: node ids start at 1")
        peer = self._peers.get(node_id)
        if peer is not None:
            if peer.address == address:
                return
            log.info("raft peer %d moves from %s to %s", node_id, peer.address, address)
            peer.address = address
            self._retire(peer)
        else:
            peer = self._peers[node_id] = _Peer(node_id, address, self.metrics.peer(node_id))
        peer.task = asyncio.get_running_loop().create_task(
            self._run_peer(peer), name=f"raft-send-{node_id}"
        )

    def remove_peer(self, node_id: int) -> None:
        """Forget a peer: its stream closes and its queued messages are dropped."""
        peer = self._peers.pop(node_id, None)
        if peer is None:
            return
        self._hb_caches.pop(node_id, None)
        peer.removed = True
        self._retire(peer)
        dropped = peer.drop_all()
        if dropped:
            peer.counters.dropped.inc(dropped)

    def peers(self) -> dict[int, str]:
        return {nid: p.address for nid, p in self._peers.items()}

    def peer_status(self, node_id: int) -> PeerStatus:
        p = self._peers[node_id]
        connected = (
            p.call is not None
            and not p.call.done()
            and p.channel is not None
            and p.channel.get_state() == grpc.ChannelConnectivity.READY
        )
        carrier = "grpc-stream" if connected else None
        if p.writer is not None and not p.writer.is_closing():
            connected, carrier = True, "tcp"
        return PeerStatus(
            node_id, p.address, connected, len(p.queue), p.queued_bytes, p.last_error, carrier
        )

    def _retire(self, peer: _Peer) -> None:
        """Cancel the peer's sender task; close() still awaits it."""
        task, peer.task = peer.task, None
        if task is not None and not task.done():
            task.cancel()
            self._retired.add(task)
            task.add_done_callback(self._retired.discard)

    # ---- sending ---------------------------------------------------------------------------

    def send(self, to_node: int, group: int, msg: Message) -> None:
        """Queue ``msg`` of ``group`` for ``to_node``; it leaves with the flush at the end of
        this loop iteration (or an explicit :meth:`flush`). Never blocks; drops (and counts)
        what the peer's outbox cannot hold."""
        peer = self._peers.get(to_node)
        if peer is None:
            counters = self.metrics.known(to_node)
            if counters is not None:
                counters.dropped.inc()
            else:
                self.metrics.unroutable.inc()
            log.debug("raft message for unknown peer %d (group %d) dropped", to_node, group)
            return
        size = wire_size_estimate(msg)
        if size > message_bytes_max:
            peer.counters.dropped.inc()
            log.warning(
                "raft %s of group %d to node %d dropped: %d bytes exceed the %d-byte limit of "
                "one message", msg.kind.name, group, to_node, size, message_bytes_max,
            )  # fmt: skip
            return
        q = peer.queue
        q.append((group, msg, size))
        peer.queued_bytes += size
        if len(q) > self._outbox_messages_max or peer.queued_bytes > self._outbox_bytes_max:
            self._trim(peer)
        if not peer.dirty:
            peer.dirty = True
            self._dirty.append(peer)
            if self._flush_handle is None:
                self._flush_handle = asyncio.get_running_loop().call_soon(self.flush)

    def _trim(self, peer: _Peer) -> None:
        """Drop the oldest messages until the outbox is within its bounds (keeping at least
        the newest one, which is within ``message_bytes_max``)."""
        q = peer.queue
        dropped = 0
        while len(q) > 1 and (
            len(q) > self._outbox_messages_max or peer.queued_bytes > self._outbox_bytes_max
        ):
            _, _, size = q.popleft()
            peer.queued_bytes -= size
            if peer.flushed:
                peer.flushed -= 1
            dropped += 1
        peer.counters.dropped.inc(dropped)

    def flush(self) -> None:
        """Hand everything queued so far to the sender tasks (runs by itself once per loop
        iteration after a :meth:`send`; call it directly to send without waiting for that)."""
        handle, self._flush_handle = self._flush_handle, None
        if handle is not None:
            handle.cancel()
        for peer in self._dirty:
            peer.dirty = False
            if not peer.removed and peer.flushed != len(peer.queue):
                peer.flushed = len(peer.queue)
                peer.wake.set()
        self._dirty.clear()

    async def _run_peer(self, peer: _Peer) -> None:
        """The sender task: keep a stream open to the peer and write its batches on it."""
        backoff_ms = reconnect_backoff_min_ms
        while True:
            started = time.monotonic()
            try:
                await self._stream_to(peer)
                error = "the peer ended the stream"
            except asyncio.CancelledError:
                raise
            except aio.AioRpcError as exc:
                error = f"{exc.code().name}: {exc.details()}"
            except PeerRefused as exc:
                error = str(exc)
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"
            self._note_failure(peer, error)
            if time.monotonic() - started >= _STABLE_S:
                backoff_ms = reconnect_backoff_min_ms
            await asyncio.sleep(backoff_ms / 1000)
            backoff_ms = min(2 * backoff_ms, reconnect_backoff_max_ms)

    def _note_failure(self, peer: _Peer, error: str) -> None:
        self.on_peer_failed(peer.node_id)
        # Log a change of reason once, not every retry of a peer that stays down.
        kind = error.split(":", 1)[0]
        previous = peer.last_error.split(":", 1)[0] if peer.last_error else None
        if kind != previous:
            log.warning(
                "raft stream to node %d at %s failed: %s", peer.node_id, peer.address, error
            )
        else:
            log.debug("raft stream to node %d at %s failed: %s", peer.node_id, peer.address, error)
        peer.last_error = error

    async def _stream_to(self, peer: _Peer) -> None:
        """One connection's life, on the peer's TCP listener if it has one, else on a gRPC
        stream: returns or raises when it ends; what was taken and not written is dropped
        (Raft retries)."""
        port = await self._endpoint(peer)
        if port:
            await self._connect_to(peer, port)
        else:
            await self._grpc_stream_to(peer)

    async def _endpoint(self, peer: _Peer) -> int:
        """The port of the peer's TCP listener, asked on the authenticated channel; 0 when
        it has none (or predates it). Raises what the call fails with (the peer is down)."""
        channel = self.auth.channel(peer.address, _CHANNEL_OPTIONS)
        try:
            call = channel.unary_unary(
                ENDPOINT_METHOD,
                request_serializer=raft_pb2.EndpointRequest.SerializeToString,
                response_deserializer=raft_pb2.EndpointResponse.FromString,
            )
            try:
                reply = await call(
                    raft_pb2.EndpointRequest(),
                    metadata=self.auth.call_metadata(ENDPOINT_METHOD),
                    timeout=endpoint_timeout_ms / 1000,
                )
            except aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                    return 0
                raise
            return int(reply.port)
        finally:
            await channel.close(None)

    async def _connect_to(self, peer: _Peer, port: int) -> None:
        """One TCP connection's life (raft.proto, The TCP listener)."""
        host = peer.address.rsplit(":", 1)[0].strip("[]")
        tls = self._client_ssl
        if tls is None and self.auth.mode is Mode.TLS:
            tls = self._client_ssl = raft_tcp.client_context(self.auth)
        reader, writer = await raft_tcp.connect(
            host, port, self.auth, tls, self.node_id, peer.node_id, self.cluster_id
        )
        closed: asyncio.Task[str | None] | None = None
        peer.writer = writer
        try:
            wake = peer.wake
            closed = asyncio.get_running_loop().create_task(self._watch(reader))
            closed.add_done_callback(lambda _task: wake.set())
            transport = writer.transport
            # Wait for the socket only above the high mark, and only until the low one:
            # asyncio's defaults (64 KiB / 16 KiB) would stop the pipeline at every APPEND.
            transport.set_write_buffer_limits(
                raft_tcp.write_buffer_high, raft_tcp.write_buffer_high // 4
            )

            async def write(data: bytes) -> None:
                if len(data) < raft_tcp.copy_bytes_max:
                    # One write (and one TLS record), not two: cheaper than the copy.
                    writer.write(raft_tcp.frame_header(len(data)) + data)
                else:
                    writer.writelines((raft_tcp.frame_header(len(data)), data))
                if transport.get_write_buffer_size() > raft_tcp.write_buffer_high:
                    async with asyncio.timeout(drain_timeout_ms / 1000):
                        await writer.drain()

            await self._pump(peer, closed.done, write, "connection")
            reason = closed.result()
            if reason is not None:
                raise PeerRefused(reason)
            raise ConnectionResetError("the peer closed the connection")
        finally:
            if closed is not None:
                closed.cancel()
            if peer.writer is writer:
                peer.writer = None
            writer.close()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1.0):
                    await writer.wait_closed()

    async def _pump(
        self,
        peer: _Peer,
        done: Callable[[], bool],
        write: Callable[[bytes], Awaitable[None]],
        carrier: str,
    ) -> None:
        """Write the peer's flushed messages, one batch per ``write``, until ``done()``
        (the connection ended: its end sets the peer's wake); what a failed write took is
        dropped and counted."""
        connected_at = time.monotonic()
        wake = peer.wake
        counters = peer.counters
        while not done():
            if not peer.flushed:
                wake.clear()
                await wake.wait()
                continue
            items = peer.take()
            data = encode_batch(
                self.node_id, peer.node_id, self.cluster_id, items
            ).SerializeToString()
            try:
                await write(data)
            except BaseException:
                counters.dropped.inc(len(items))
                raise
            counters.batches_sent.inc()
            counters.messages_sent.inc(len(items))
            counters.bytes_sent.inc(len(data))
            # Recovered only once the connection proved stable: a peer that accepts writes
            # and then refuses us must not flap between "up" and "failed".
            if peer.last_error is not None and time.monotonic() - connected_at >= _STABLE_S:
                log.info("raft %s to node %d at %s is up", carrier, peer.node_id, peer.address)
                peer.last_error = None

    @staticmethod
    async def _watch(reader: asyncio.StreamReader) -> str | None:
        """Wait for the listener's end: its refusal ("CODE: message"), or None at EOF."""
        try:
            raw = await raft_tcp.read_frame(reader, raft_tcp.handshake_bytes_max)
            welcome = raft_pb2.RaftWelcome.FromString(raw)
        except (asyncio.IncompleteReadError, raft_tcp.FrameError, DecodeError, OSError):
            return None
        return f"{welcome.code}: {welcome.message}"

    async def _grpc_stream_to(self, peer: _Peer) -> None:
        """One gRPC stream's life (a peer without a TCP listener)."""
        channel = peer.channel = self.auth.channel(peer.address, _CHANNEL_OPTIONS)
        call: aio.StreamUnaryCall[bytes, bytes] | None = None
        try:
            call = peer.call = channel.stream_unary(
                STREAM_METHOD, request_serializer=None, response_deserializer=None
            )(None, metadata=self.auth.call_metadata(STREAM_METHOD))
            # Take nothing from the outbox before the peer accepted the connection: a peer
            # that is down keeps its (bounded) backlog instead of losing a batch per retry.
            await call.wait_for_connection()
            wake = peer.wake
            call.add_done_callback(lambda _call: wake.set())
            await self._pump(peer, call.done, call.write, "stream")
            await call  # raises the status it ended with
        finally:
            # A task replaced by set_peer must not clear what its successor set.
            if peer.call is call:
                peer.call = None
            if peer.channel is channel:
                peer.channel = None
            await channel.close(None)

    # ---- receiving -------------------------------------------------------------------------

    def add_servicer(self, server: aio.Server) -> None:
        """Serve the Raft service on ``server``, so peers' streams reach :meth:`_serve`.

        Registered as raw bytes (no generated servicer) so the transport parses each batch
        itself and counts its exact size."""
        handler = grpc.stream_unary_rpc_method_handler(
            self._serve, request_deserializer=None, response_serializer=None
        )
        endpoint = grpc.unary_unary_rpc_method_handler(
            self._serve_endpoint,
            request_deserializer=raft_pb2.EndpointRequest.FromString,
            response_serializer=raft_pb2.EndpointResponse.SerializeToString,
        )
        server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    SERVICE_NAME, {"Stream": handler, "Endpoint": endpoint}
                ),
            )
        )

    async def _serve(self, requests: AsyncIterator[bytes], context: _Context) -> bytes:
        task = asyncio.current_task()
        if task is not None:
            self._inbound.add(task)
        try:
            return await self._serve_stream(requests, context)
        finally:
            if task is not None:
                self._inbound.discard(task)

    def close_inbound(self) -> None:
        """End the peers' streams to this node (they reconnect elsewhere or later): a
        stopping node calls it once its own requests are done, so the gRPC server's drain
        does not wait for streams that never end by themselves. The TCP listener closes
        too."""
        self.stop_listening()
        for task in list(self._inbound):
            task.cancel()

    async def _serve_stream(self, requests: AsyncIterator[bytes], context: _Context) -> bytes:
        try:
            authenticated = self.auth.peer_id(context, STREAM_METHOD)
        except TidelogError as err:
            await self._refuse(context, err)
        st = _Inbound(authenticated)
        async for raw in requests:
            try:
                self._receive(raw, st)
            except TidelogError as err:
                await self._refuse(context, err)
        return _STREAM_CLOSED

    def _receive(self, raw: bytes, st: _Inbound) -> None:
        """Check one RaftBatch from a peer's stream or connection and deliver it; raises the
        TidelogError the stream ends with. A batch from a node that is not a peer is dropped
        and counted (the stream stays open)."""
        refused = self.metrics.refused
        try:
            batch = raft_pb2.RaftBatch.FromString(raw)
        except DecodeError as exc:
            refused["invalid"].inc()
            raise InvalidRequest(f"undecodable RaftBatch: {exc}") from None
        authenticated = st.authenticated
        if authenticated is not None and batch.from_node != authenticated:
            self.auth.check_sender(authenticated, batch.from_node, "a raft batch")
        if batch.to_node != self.node_id or batch.cluster_id != self.cluster_id:
            refused["mismatch"].inc()
            raise self._mismatch(batch.from_node, batch.to_node, batch.cluster_id)
        frm = batch.from_node
        counters, cache = st.counters, st.cache
        if frm != st.peer_id or counters is None or cache is None or frm not in self._peers:
            if frm < 1:
                refused["invalid"].inc()
                raise InvalidRequest(f"invalid RaftBatch: sender node id {frm} < 1")
            if frm not in self._peers:
                # Before any counter or cache exists for it: nothing a caller claims
                # creates state here. The node may be ahead of our metadata: no abort.
                refused["unknown_peer"].inc()
                self._note_unknown(frm)
                st.counters = st.cache = None
                st.peer_id = 0
                return
            st.peer_id = frm
            counters = st.counters = self.metrics.peer(frm)
            cache = self._hb_caches.get(frm)
            if cache is None:
                cache = self._hb_caches[frm] = HeartbeatCache()
            st.cache = cache
        try:
            items = decode_batch(batch, cache)
        except CodecError as exc:
            refused["invalid"].inc()
            raise InvalidRequest(f"invalid RaftBatch from node {frm}: {exc}") from None
        counters.batches_received.inc()
        counters.messages_received.inc(len(items))
        counters.bytes_received.inc(len(raw))
        if self._closed or not items:
            return
        try:
            self._deliver(frm, items)
        except Exception:
            log.exception("delivering a raft batch from node %d failed", frm)

    # ---- the TCP listener (raft.proto, The TCP listener) ---------------------------------

    async def listen(self, host: str | None, port: int = 0) -> int:
        """Serve the peers' batches on a TCP listener of ``host`` (every interface when
        empty) and ``port`` (0: any free one); its port is :attr:`tcp_port`, which
        ``Raft.Endpoint`` tells the peers."""
        if self._tcp_server is not None:
            raise RuntimeError("the transport already listens")
        tls = raft_tcp.server_context(self.auth)

        async def start(at: int) -> asyncio.Server:
            return await asyncio.start_server(
                self._serve_tcp,
                host or None,
                at,
                ssl=tls,
                ssl_handshake_timeout=raft_tcp.handshake_timeout_ms / 1000 if tls else None,
                limit=raft_tcp.reader_limit,
            )

        server = await start(port)
        ports = {int(sock.getsockname()[1]) for sock in server.sockets}
        if len(ports) > 1:
            # A name of several addresses ("localhost": ::1 and 127.0.0.1) with port 0 binds
            # each on a port of its own, and the peers learn one port: bind them all on the
            # first one's.
            first = int(server.sockets[0].getsockname()[1])
            server.close()
            server = await start(first)
        self._tcp_server = server
        self.tcp_port = port = int(server.sockets[0].getsockname()[1])
        return port

    def stop_listening(self) -> None:
        """Close the TCP listener (new connections are refused; open ones stay until
        :meth:`close_inbound`)."""
        server, self._tcp_server = self._tcp_server, None
        self.tcp_port = None
        if server is not None:
            server.close()

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._inbound.add(task)
        try:
            await self._serve_connection(reader, writer)
        except (asyncio.IncompleteReadError, TimeoutError, OSError) as exc:
            log.debug("raft connection from %s ended: %r", writer.get_extra_info("peername"), exc)
        except raft_tcp.FrameError as exc:
            log.warning("refusing a raft connection: %s", exc)
        except Exception:
            log.exception("raft connection from %s failed", writer.get_extra_info("peername"))
        finally:
            if task is not None:
                self._inbound.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1.0):
                    await writer.wait_closed()

    async def _serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        raft_tcp.tune_socket(writer)
        nonce = os.urandom(raft_tcp.NONCE_BYTES)
        challenge = raft_pb2.RaftChallenge(version=raft_tcp.VERSION, nonce=nonce)
        writer.write(raft_tcp.frame(challenge.SerializeToString()))
        async with asyncio.timeout(raft_tcp.handshake_timeout_ms / 1000):
            raw = await raft_tcp.read_frame(reader, raft_tcp.handshake_bytes_max)
        try:
            try:
                hello = raft_pb2.RaftHello.FromString(raw)
            except DecodeError as exc:
                raise InvalidRequest(f"undecodable RaftHello: {exc}") from None
            authenticated = self._tcp_peer(writer, nonce, hello)
            if hello.to_node != self.node_id or hello.cluster_id != self.cluster_id:
                self.metrics.refused["mismatch"].inc()
                raise self._mismatch(hello.from_node, hello.to_node, hello.cluster_id)
        except TidelogError as err:
            await self._refuse_tcp(writer, err)
            return
        writer.write(raft_tcp.frame(raft_pb2.RaftWelcome().SerializeToString()))
        st = _Inbound(authenticated)
        while not self._closed:
            raw = await raft_tcp.read_frame(reader, raft_tcp.frame_bytes_max)
            try:
                self._receive(raw, st)
            except TidelogError as err:
                await self._refuse_tcp(writer, err)
                return

    def _tcp_peer(
        self, writer: asyncio.StreamWriter, nonce: bytes, hello: raft_pb2.RaftHello
    ) -> int | None:
        """The node a connection authenticated as (None without authentication)."""
        auth = self.auth
        if auth.mode is Mode.TLS:
            nid = raft_tcp.peer_node(writer)
            if nid is None:
                raise Unauthenticated(
                    "the peer's certificate names no node: internal connections need a node "
                    "certificate of the cluster CA (`tidelog certs node`)"
                )
            auth.check_sender(nid, hello.from_node, "a raft connection")
            return nid
        return auth.hello_peer(nonce, hello.from_node, hello.to_node, hello.cluster_id, hello.mac)

    async def _refuse_tcp(self, writer: asyncio.StreamWriter, err: TidelogError) -> None:
        """Tell the caller why (a RaftWelcome with the reason), then the connection closes."""
        if not isinstance(err, PeerMismatch):
            log.warning("refusing a raft connection: %s", err.message)
        welcome = raft_pb2.RaftWelcome(reason=err.reason, message=err.message, code=err.code.name)
        writer.write(raft_tcp.frame(welcome.SerializeToString()))
        with contextlib.suppress(Exception):
            async with asyncio.timeout(1.0):
                await writer.drain()

    async def _serve_endpoint(
        self, request: raft_pb2.EndpointRequest, context: _Context
    ) -> raft_pb2.EndpointResponse:
        try:
            self.auth.peer_id(context, ENDPOINT_METHOD)
        except TidelogError as err:
            await self._refuse(context, err)
        return raft_pb2.EndpointResponse(port=self.tcp_port or 0)

    def _note_unknown(self, from_node: int) -> None:
        # At most one warning per interval, whatever the number of senders a caller invents.
        self._unknown_since_log += 1
        now = time.monotonic()
        if now - self._unknown_logged_at < unknown_peer_log_interval_ms / 1000:
            return
        log.warning(
            "raft batches from node %d dropped: it is not a peer of node %d (not a controller "
            "voter, not registered); %d such batches since the last warning",
            from_node, self.node_id, self._unknown_since_log,
        )  # fmt: skip
        self._unknown_logged_at = now
        self._unknown_since_log = 0

    def _mismatch(self, from_node: int, to_node: int, cluster_id: str) -> PeerMismatch:
        err = PeerMismatch(
            f"raft batch from node {from_node} is addressed to node {to_node} of "
            f"cluster {cluster_id!r} but reached node {self.node_id} of cluster "
            f"{self.cluster_id!r}: the sender's peer address is stale or it belongs to "
            "another cluster",
            node_id=str(self.node_id),
            cluster_id=self.cluster_id,
        )
        key = (from_node, to_node, cluster_id)
        if key not in self._refusals_logged:
            if len(self._refusals_logged) >= refusals_logged_max:
                self._refusals_logged.clear()
            self._refusals_logged.add(key)
            log.warning("%s", err.message)
        return err

    async def _refuse(self, context: _Context, err: TidelogError) -> NoReturn:
        if not isinstance(err, PeerMismatch):
            log.warning("refusing a raft stream: %s", err.message)
        await context.abort(err.code, err.message, trailing_metadata=trailing_metadata(err))
        raise AssertionError("unreachable: abort raises")  # pragma: no cover

    # ---- lifecycle -------------------------------------------------------------------------

    async def close(self) -> None:
        """Stop every sender task and close the channels; queued messages are dropped.
        Streams from peers stay with the gRPC server, which closes them when it stops."""
        if self._closed:
            return
        self._closed = True
        self.stop_listening()
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        for node_id in list(self._peers):
            self.remove_peer(node_id)
        # remove_peer cancelled them; a second cancel would interrupt their channel close.
        for task in list(self._retired):
            with contextlib.suppress(asyncio.CancelledError):
                await task


__all__ = [
    "ENDPOINT_METHOD",
    "GRPC_SERVER_OPTIONS",
    "REFUSAL_REASONS",
    "SERVICE_NAME",
    "STREAM_METHOD",
    "Deliver",
    "PeerCounters",
    "PeerMismatch",
    "PeerRefused",
    "PeerStatus",
    "RaftTransport",
    "TransportMetrics",
    "batch_bytes_max",
    "message_bytes_max",
    "outbox_bytes_max",
    "outbox_messages_max",
    "reconnect_backoff_max_ms",
    "reconnect_backoff_min_ms",
    "stream_stable_ms",
]
