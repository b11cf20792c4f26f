"""RaftTransport between real grpc.aio servers on 127.0.0.1 in one process: order per peer,
one batch per loop iteration, coalesced heartbeats, reconnect after a peer comes back, the
outbox bound under a dead peer, and batches for another node or cluster refused.

Every test runs twice: with the peers' TCP listeners (the node's default) and without them,
when the batches travel on the gRPC stream (a peer whose Raft.Endpoint answers port 0).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Protocol

import grpc
import pytest
from grpc import aio

from tests.support import free_port
from tidelog.node.raft.types import Entry, Message, MessageKind
from tidelog.node.transport import (
    GRPC_SERVER_OPTIONS,
    STREAM_METHOD,
    RaftTransport,
    outbox_bytes_max,
    outbox_messages_max,
)
from tidelog.v1 import raft_pb2

WAIT_S = 10.0


@dataclass
class Peer:
    """One transport with its own gRPC server, and everything delivered to it."""

    node_id: int
    transport: RaftTransport
    server: aio.Server | None
    port: int
    tcp: bool
    deliveries: list[tuple[int, list[tuple[int, Message]]]] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def received(self, from_node: int | None = None) -> list[tuple[int, Message]]:
        return [
            item
            for frm, items in self.deliveries
            if from_node is None or frm == from_node
            for item in items
        ]

    def metric(self, name: str, peer: int) -> float:
        value = self.transport.registry.get_sample_value(
            f"tidelog_raft_{name}_total", {"peer": str(peer)}
        )
        return value or 0.0

    async def serve(self) -> None:
        server = aio.server(options=GRPC_SERVER_OPTIONS)
        self.transport.add_servicer(server)
        bound = server.add_insecure_port(self.address)
        assert bound == self.port, f"port {self.port} could not be bound again"
        await server.start()
        self.server = server
        if self.tcp:
            await self.transport.listen("127.0.0.1")

    async def stop_serving(self) -> None:
        self.transport.close_inbound()  # the TCP listener and its connections too
        if self.server is not None:
            await self.server.stop(None)
            self.server = None


class MakePeer(Protocol):
    async def __call__(
        self,
        node_id: int,
        cluster_id: str = ...,
        *,
        port: int | None = ...,
        outbox_messages_max: int = ...,
        outbox_bytes_max: int = ...,
    ) -> Peer: ...


@pytest.fixture(params=["tcp", "grpc-stream"])
async def cluster(request: pytest.FixtureRequest) -> AsyncIterator[MakePeer]:
    tcp = request.param == "tcp"
    peers: list[Peer] = []

    async def make(
        node_id: int,
        cluster_id: str = "cluster-a",
        *,
        port: int | None = None,
        outbox_messages_max: int = outbox_messages_max,
        outbox_bytes_max: int = outbox_bytes_max,
    ) -> Peer:
        deliveries: list[tuple[int, list[tuple[int, Message]]]] = []
        transport = RaftTransport(
            node_id,
            cluster_id,
            deliver=lambda frm, items: deliveries.append((frm, items)),
            outbox_messages_max=outbox_messages_max,
            outbox_bytes_max=outbox_bytes_max,
        )
        peer = Peer(node_id, transport, None, port or free_port(), tcp, deliveries)
        await peer.serve()
        peers.append(peer)
        return peer

    yield make
    for p in peers:
        await p.transport.close()
        await p.stop_serving()


async def wait_until(predicate: Callable[[], bool], what: str, timeout_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        await asyncio.sleep(0.01)


def refused(sender: Peer, peer_id: int) -> bool:
    error = sender.transport.peer_status(peer_id).last_error or ""
    return error.startswith("FAILED_PRECONDITION")


def append(frm: int, to: int, seq: int, payload: bytes = b"") -> Message:
    """A message that says where it sits in the sequence (index) and what iteration sent it
    (context is filled by the caller when needed)."""
    entries = (Entry(1, seq, payload),) if payload else ()
    return Message(MessageKind.APPEND, frm, to, 1, index=seq, entries=entries)


@pytest.mark.timeout(60)
async def test_three_nodes_in_order_one_batch_per_iteration(cluster: MakePeer) -> None:
    a = await cluster(1)
    b = await cluster(2)
    c = await cluster(3)
    for x in (a, b, c):
        for y in (a, b, c):
            if x is not y:
                x.transport.set_peer(y.node_id, y.address)

    iterations, per_iteration = 40, 75
    sent: dict[int, list[tuple[int, Message]]] = {2: [], 3: []}
    seq = 0
    for it in range(iterations):
        for _ in range(per_iteration):
            seq += 1
            for to in (2, 3):
                msg = Message(MessageKind.APPEND, 1, to, 1, index=seq, context=str(it).encode())
                group = seq % 17
                a.transport.send(to, group, msg)
                sent[to].append((group, msg))
        b.transport.send(1, 5, Message(MessageKind.APPEND_RESP, 2, 1, 1, index=it))
        await asyncio.sleep(0)  # the next loop iteration: the flush runs

    total = iterations * per_iteration
    await wait_until(
        lambda: len(b.received(1)) == total and len(c.received(1)) == total, "every message"
    )
    await wait_until(lambda: len(a.received(2)) == iterations, "the answers from node 2")
    assert b.received(1) == sent[2] and c.received(1) == sent[3], "order per peer stream"
    assert [m.index for _, m in a.received(2)] == list(range(iterations))
    assert c.received(2) == [] and a.received(3) == []

    # Everything sent in one iteration travels in one batch (a batch may hold several).
    for receiver in (b, c):
        iteration_of_batch: dict[bytes, int] = {}
        for batch_no, (_, items) in enumerate(receiver.deliveries):
            for _, m in items:
                assert iteration_of_batch.setdefault(m.context, batch_no) == batch_no
        assert len(receiver.deliveries) <= iterations
        assert a.metric("batches_sent", receiver.node_id) == len(receiver.deliveries)
        assert a.metric("messages_sent", receiver.node_id) == total
        assert receiver.metric("messages_received", 1) == total
        assert receiver.metric("bytes_received", 1) == a.metric("bytes_sent", receiver.node_id)
    assert a.metric("messages_dropped", 2) == 0
    assert a.transport.peer_status(2).connected
    want = "tcp" if a.tcp else "grpc-stream"
    assert a.transport.peer_status(2).carrier == want
    assert b.transport.peer_status(1).carrier == want


@pytest.mark.timeout(30)
async def test_heartbeats_of_a_thousand_groups_cost_one_small_batch(
    cluster: MakePeer,
) -> None:
    a = await cluster(1)
    b = await cluster(2)
    a.transport.set_peer(2, b.address)
    b.transport.set_peer(1, a.address)  # a receiver takes batches from its peers only
    await wait_until(lambda: a.transport.peer_status(2).connected, "the stream to node 2")
    heartbeats = [
        (g, Message(MessageKind.HEARTBEAT, 1, 2, 7, commit=1000 + g)) for g in range(1000)
    ]
    for g, m in heartbeats:
        a.transport.send(2, g, m)
    await wait_until(lambda: len(b.received()) == 1000, "1000 heartbeats")
    assert len(b.deliveries) == 1
    assert b.received(1) == heartbeats
    assert b.metric("batches_received", 1) == 1
    assert b.metric("bytes_received", 1) < 8_000  # ~6 bytes per group


@pytest.mark.timeout(60)
async def test_peer_that_comes_back_gets_new_messages(cluster: MakePeer) -> None:
    a = await cluster(1)
    b = await cluster(2)
    a.transport.set_peer(2, b.address)
    b.transport.set_peer(1, a.address)
    a.transport.send(2, 1, append(1, 2, 1))
    await wait_until(lambda: len(b.received()) == 1, "the first message")

    await b.stop_serving()
    await wait_until(lambda: a.transport.peer_status(2).last_error is not None, "a failure")
    assert not a.transport.peer_status(2).connected
    for seq in range(2, 12):  # queued (or lost to the broken stream) while node 2 is down
        a.transport.send(2, 1, append(1, 2, seq))
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.5)  # several reconnect attempts fail meanwhile

    await b.serve()
    await wait_until(lambda: a.transport.peer_status(2).connected, "the reconnect", 5.0)
    for seq in range(100, 110):
        a.transport.send(2, 1, append(1, 2, seq))
        await asyncio.sleep(0)
    await wait_until(
        lambda: [m.index for _, m in b.received()][-10:] == list(range(100, 110)),
        "the messages sent after the peer came back",
    )
    indexes = [m.index for _, m in b.received()]
    assert indexes == sorted(indexes), "still in order across the reconnect"
    # The failure is forgotten once the new stream has carried traffic for a while.
    deadline = time.monotonic() + 5.0
    while a.transport.peer_status(2).last_error is not None:
        assert time.monotonic() < deadline, "the recovered stream is still reported failed"
        a.transport.send(2, 1, append(1, 2, 1000))
        await asyncio.sleep(0.05)


@pytest.mark.timeout(30)
async def test_outbox_stays_bounded_under_a_dead_peer(cluster: MakePeer) -> None:
    messages_max, bytes_max = 100, 64 * 1024
    a = await cluster(1, outbox_messages_max=messages_max, outbox_bytes_max=bytes_max)
    dead_port = free_port()  # nothing listens there (yet)
    a.transport.set_peer(2, f"127.0.0.1:{dead_port}")
    sent = 0
    for it in range(20):
        for _ in range(50):
            sent += 1
            payload = b"x" * 4096 if sent % 10 == 0 else b""
            a.transport.send(2, sent % 7, append(1, 2, sent, payload))
        await asyncio.sleep(0.01)
        status = a.transport.peer_status(2)
        assert status.queued_messages <= messages_max, (it, status)
        assert status.queued_bytes <= bytes_max, (it, status)
    status = a.transport.peer_status(2)
    assert not status.connected
    assert status.last_error is not None and "UNAVAILABLE" in status.last_error
    assert a.metric("messages_dropped", 2) == sent - status.queued_messages
    assert a.metric("batches_sent", 2) == 0

    # When the peer appears, the newest messages (the oldest were dropped) reach it.
    b = await cluster(2, port=dead_port)
    b.transport.set_peer(1, a.address)
    await wait_until(lambda: len(b.received()) == status.queued_messages, "the kept backlog")
    indexes = [m.index for _, m in b.received()]
    assert indexes == list(range(sent - len(indexes) + 1, sent + 1))


@pytest.mark.timeout(30)
async def test_wrong_cluster_or_node_is_refused(cluster: MakePeer) -> None:
    a = await cluster(1, "cluster-a")
    b = await cluster(2, "cluster-b")
    c = await cluster(3, "cluster-a")
    a.transport.set_peer(2, b.address)  # right node, other cluster
    a.transport.set_peer(4, c.address)  # node 3 is there, not node 4
    a.transport.send(2, 1, append(1, 2, 1))
    a.transport.send(4, 1, append(1, 4, 1))
    await wait_until(lambda: refused(a, 2), "node 2 refusing the stream")
    await wait_until(lambda: refused(a, 4), "node 3 refusing a stream for node 4")
    assert "cluster 'cluster-b'" in (a.transport.peer_status(2).last_error or "")
    assert "reached node 3" in (a.transport.peer_status(4).last_error or "")
    assert b.deliveries == [] and c.deliveries == []
    assert b.metric("batches_received", 1) == 0


@pytest.mark.timeout(30)
async def test_peer_moves_to_a_new_address(cluster: MakePeer) -> None:
    a = await cluster(1)
    b = await cluster(2)
    b.transport.set_peer(1, a.address)
    a.transport.set_peer(2, f"127.0.0.1:{free_port()}")  # stale address
    a.transport.send(2, 1, append(1, 2, 1))
    await wait_until(lambda: a.transport.peer_status(2).last_error is not None, "a failure")
    a.transport.set_peer(2, b.address)
    await wait_until(lambda: len(b.received()) == 1, "the queued message at the new address")
    assert a.transport.peers() == {2: b.address}

    a.transport.remove_peer(2)
    a.transport.send(2, 1, append(1, 2, 2))  # unknown peer now: dropped and counted
    assert a.metric("messages_dropped", 2) == 1
    with pytest.raises(ValueError, match="its own peer"):
        a.transport.set_peer(1, b.address)


@pytest.mark.timeout(30)
async def test_garbage_is_refused_and_the_server_keeps_serving(
    cluster: MakePeer,
) -> None:
    b = await cluster(2)
    async with aio.insecure_channel(b.address) as channel:
        call = channel.stream_unary(STREAM_METHOD, None, None)(None)
        await call.write(b"\xff\xff\xff")
        with pytest.raises(aio.AioRpcError) as info:
            await call
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert b.deliveries == []

    a = await cluster(1)
    a.transport.set_peer(2, b.address)
    b.transport.set_peer(1, a.address)
    a.transport.send(2, 1, append(1, 2, 1))
    await wait_until(lambda: len(b.received()) == 1, "a good message after the garbage")


def refused_batches(p: Peer, reason: str) -> float:
    value = p.transport.registry.get_sample_value(
        "tidelog_raft_batches_refused_total", {"reason": reason}
    )
    return value or 0.0


def series(p: Peer) -> int:
    return sum(len(family.samples) for family in p.transport.registry.collect())


def forged(frm: int, to: int, group: int = 1, term: int = 5) -> bytes:
    batch = raft_pb2.RaftBatch(from_node=frm, to_node=to, cluster_id="cluster-a")
    batch.heartbeats.requests.groups.append(group)
    batch.heartbeats.requests.terms.append(term)
    return batch.SerializeToString()


@pytest.mark.timeout(30)
async def test_batches_from_a_node_that_is_not_a_peer_are_dropped_and_counted(
    cluster: MakePeer,
) -> None:
    a = await cluster(1)
    b = await cluster(2)
    a.transport.set_peer(2, b.address)
    a.transport.send(2, 1, append(1, 2, 1))
    await wait_until(lambda: refused_batches(b, "unknown_peer") == 1, "the refusal")
    assert b.deliveries == []
    assert b.metric("batches_received", 1) == 0
    assert a.transport.peer_status(2).connected, "the stream stays open"
    # Once node 1 is a peer (registered), the same stream carries its messages.
    b.transport.set_peer(1, a.address)
    a.transport.send(2, 1, append(1, 2, 2))
    await wait_until(lambda: len(b.received(1)) == 1, "the message of a peer")
    assert [m.index for _, m in b.received(1)] == [2]


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "raw",
    [forged(-3, 2), forged(1, 2, term=2**64 - 1), forged(1, 2, group=2**63)],
    ids=["negative-sender", "term-2^64-1", "group-2^63"],
)
async def test_batches_with_invalid_values_end_the_stream(cluster: MakePeer, raw: bytes) -> None:
    b = await cluster(2)
    b.transport.set_peer(1, f"127.0.0.1:{free_port()}")
    async with aio.insecure_channel(b.address) as channel:
        call = channel.stream_unary(STREAM_METHOD, None, None)(None)
        await call.write(raw)
        with pytest.raises(aio.AioRpcError) as info:
            await call
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert b.deliveries == []
    assert refused_batches(b, "invalid") == 1


@pytest.mark.timeout(60)
async def test_invented_sender_ids_create_no_metric_series(cluster: MakePeer) -> None:
    b = await cluster(2)
    b.transport.set_peer(1, f"127.0.0.1:{free_port()}")
    before = series(b)
    async with aio.insecure_channel(b.address) as channel:
        call = channel.stream_unary(STREAM_METHOD, None, None)(None)
        for frm in range(1000, 6000):
            await call.write(forged(frm, 2))
        await call.done_writing()
        await call
    assert refused_batches(b, "unknown_peer") == 5000
    assert series(b) == before, "no series per invented sender"
    assert b.deliveries == []
    # Messages for never-known nodes are counted without a per-node series either.
    for to in range(1000, 6000):
        b.transport.send(to, 1, append(2, to, 1))
    assert series(b) == before
    value = b.transport.registry.get_sample_value("tidelog_raft_messages_unroutable_total")
    assert value == 5000
