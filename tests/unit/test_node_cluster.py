"""Four nodes in one event loop over real gRPC on 127.0.0.1 (three controller voters and a
learner), with short Raft timeouts: registration, forwarded topic creation, replication
through the client, NOT_LEADER redirects, liveness, leader hints, restart catch-up."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from grpc import aio

from tests.support import free_port
from tidelog.client import Consumer, Producer, TopicPartition
from tidelog.errors import from_rpc_error
from tidelog.node.multiraft import RaftTiming
from tidelog.node.server import Node
from tidelog.records import encode_batch
from tidelog.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    broker_pb2,
    broker_pb2_grpc,
    cluster_pb2,
    cluster_pb2_grpc,
)

TIMING = RaftTiming(tick_ms=10, heartbeat_interval_ms=30, election_timeout_ms=300)
NODE_DEAD_MS = 600


#: Two racks of two nodes each: placement must spread a partition's replicas over both.
RACKS = {1: "a", 2: "a", 3: "b", 4: "b"}


class Cluster:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.ports = {i: free_port() for i in (1, 2, 3, 4)}
        self.internal_ports = {i: free_port() for i in (1, 2, 3, 4)}
        self.voters = ",".join(f"{i}@127.0.0.1:{self.internal_ports[i]}" for i in (1, 2, 3))
        self.nodes: dict[int, Node] = {}
        self.channels: dict[int, aio.Channel] = {}

    def address(self, i: int) -> str:
        return f"127.0.0.1:{self.ports[i]}"

    async def start(self, i: int) -> Node:
        node = Node(
            i,
            self.address(i),
            self.base / f"n{i}",
            0,
            controller_voters=self.voters,
            timing=TIMING,
            node_dead_ms=NODE_DEAD_MS,
            rack=RACKS[i],
            internal_listen=f"127.0.0.1:{self.internal_ports[i]}",
        )
        await node.start()
        self.nodes[i] = node
        return node

    async def stop(self, i: int) -> None:
        await self.nodes.pop(i).stop(1)

    def broker(self, i: int) -> broker_pb2_grpc.BrokerAsyncStub:
        return broker_pb2_grpc.BrokerStub(self._channel(i))  # type: ignore[return-value]

    def admin(self, i: int) -> admin_pb2_grpc.AdminAsyncStub:
        return admin_pb2_grpc.AdminStub(self._channel(i))  # type: ignore[return-value]

    def cluster(self, i: int) -> cluster_pb2_grpc.ClusterAsyncStub:
        # The internal service is on the internal listener (plain: loopback, no auth).
        ch = self.channels.get(-i)
        if ch is None:
            ch = self.channels[-i] = aio.insecure_channel(f"127.0.0.1:{self.internal_ports[i]}")
        return cluster_pb2_grpc.ClusterStub(ch)  # type: ignore[return-value]

    def _channel(self, i: int) -> aio.Channel:
        ch = self.channels.get(i)
        if ch is None:
            ch = self.channels[i] = aio.insecure_channel(self.address(i))
        return ch

    async def metadata(
        self, i: int, topics: list[str] | None = None
    ) -> broker_pb2.MetadataResponse:
        return await self.broker(i).Metadata(broker_pb2.MetadataRequest(topics=topics or []))

    async def until(
        self, what: str, check: Callable[[], Awaitable[bool]], timeout_s: float = 10
    ) -> None:
        try:
            async with asyncio.timeout(timeout_s):
                while not await check():
                    await asyncio.sleep(0.02)
        except TimeoutError:
            raise AssertionError(f"not within {timeout_s} s: {what}") from None


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    c = Cluster(tmp_path)
    await asyncio.gather(*(c.start(i) for i in (1, 2, 3, 4)))
    yield c
    for ch in c.channels.values():
        await ch.close(None)
    await asyncio.gather(*(n.stop(1) for n in c.nodes.values()))


async def registered(c: Cluster) -> bool:
    for i in c.nodes:
        md = await c.metadata(i)
        if md.controller_id < 0 or sorted(n.node_id for n in md.nodes if n.alive) != [1, 2, 3, 4]:
            return False
    return True


@pytest.mark.timeout(60)
async def test_cluster_replicates_redirects_and_fails_over(cluster: Cluster) -> None:
    c = cluster
    await c.until("every node registered", lambda: registered(c))
    controller = (await c.metadata(4)).controller_id
    assert controller in (1, 2, 3)  # learners never lead
    assert c.nodes[4].controller.group is not None
    assert c.nodes[4].controller.group.raw.conf_state.learners == {4}

    # Created through the learner (forwarded to the controller), visible everywhere at once.
    spec = admin_pb2.TopicSpec(name="t", partitions=4, replication_factor=3)
    await c.admin(4).CreateTopics(admin_pb2.CreateTopicsRequest(topics=[spec]))
    for i in (1, 2, 3, 4):
        [t] = (await c.metadata(i, ["t"])).topics
        assert len(t.partitions) == 4 and all(len(p.replicas) == 3 for p in t.partitions)

    async def leaders_known() -> bool:
        md = await c.metadata(4, ["t"])
        return all(p.leader > 0 for p in md.topics[0].partitions)

    await c.until("every partition has a leader", leaders_known)

    # Through the client: produce to every partition, read it back.
    bootstrap = c.address(4)
    async with Producer(bootstrap, acks="all", linger_ms=1) as producer:
        futures = [producer.send("t", b"v%d" % i, partition=i % 4) for i in range(200)]
        mds = [await f for f in futures]
    assert {m.partition for m in mds} == {0, 1, 2, 3}
    async with Consumer(bootstrap, auto_offset_reset="earliest") as consumer:
        consumer.assign([TopicPartition("t", p) for p in range(4)])
        got: list[bytes] = []
        async with asyncio.timeout(10):
            while len(got) < 200:
                got += [r.value or b"" for r in await consumer.poll(timeout_ms=500)]
    assert sorted(got) == sorted(b"v%d" % i for i in range(200))

    # A follower (or a node without a replica) names the leader. The partition picked is
    # led by a controller voter, whose loss below also moves the controller at times.
    md = await c.metadata(1, ["t"])
    pick = next(p for p in md.topics[0].partitions if p.leader in (1, 2, 3))
    other = next(i for i in (1, 2, 3, 4) if i != pick.leader)
    with pytest.raises(aio.AioRpcError) as info:
        await c.broker(other).Produce(
            broker_pb2.ProduceRequest(
                topic="t", partition=pick.partition, batches=encode_batch([b"x"])
            )
        )
    err = from_rpc_error(info.value)
    assert err.reason == "NOT_LEADER"
    assert err.metadata["leader_id"] == str(pick.leader)
    assert err.metadata["leader_address"] == c.address(pick.leader)

    # Stop its leader: a new leader takes writes; the controller marks the node dead; the
    # leader hints follow on every node, including those without a replica.
    victim = pick.leader
    await c.stop(victim)
    survivors = [i for i in (1, 2, 3, 4) if i != victim]

    async def dead_and_moved() -> bool:
        for i in survivors:
            md = await c.metadata(i, ["t"])
            alive = {n.node_id: n.alive for n in md.nodes}
            if alive.get(victim) or md.controller_id < 0:
                return False
            leader = md.topics[0].partitions[pick.partition].leader
            if leader in (victim, -1):
                return False
        return True

    await c.until("the victim is dead and its partition moved", dead_and_moved)
    async with Producer(c.address(survivors[0]), acks="all", linger_ms=1) as producer:
        await producer.send("t", b"after", partition=pick.partition)

    # Back: alive again, caught up to the same bytes as the others.
    await c.start(victim)

    async def alive_again() -> bool:
        md = await c.metadata(survivors[0])
        return {n.node_id: n.alive for n in md.nodes}.get(victim) is True

    await c.until("the victim is alive again", alive_again)

    async def same_logs() -> bool:
        digests: dict[int, set[tuple[int, int]]] = {}
        for i in (1, 2, 3, 4):
            resp = await c.cluster(i).LogDigest(cluster_pb2.LogDigestRequest(topics=["t"]))
            for p in resp.partitions:
                digests.setdefault(p.partition, set()).add((p.high_watermark, p.crc32c))
        return len(digests) == 4 and all(len(v) == 1 for v in digests.values())

    await c.until("every replica holds the same committed log", same_logs)


@pytest.mark.timeout(60)
async def test_metrics_describe_the_cluster(cluster: Cluster) -> None:
    c = cluster
    await c.until("every node registered", lambda: registered(c))
    spec = admin_pb2.TopicSpec(name="m", partitions=2, replication_factor=3)
    await c.admin(1).CreateTopics(admin_pb2.CreateTopicsRequest(topics=[spec]))

    async def led() -> bool:
        md = await c.metadata(1, ["m"])
        return all(p.leader > 0 for p in md.topics[0].partitions)

    await c.until("leaders", led)
    leader = (await c.metadata(1, ["m"])).topics[0].partitions[0].leader
    node = c.nodes[leader]
    await c.broker(leader).Produce(
        broker_pb2.ProduceRequest(topic="m", partition=0, batches=encode_batch([b"x"] * 3))
    )
    reg = node.metrics.registry
    labels = {"topic": "m", "partition": "0"}
    assert reg.get_sample_value("tidelog_raft_role", labels) == 3
    assert (reg.get_sample_value("tidelog_raft_term", labels) or 0) >= 1
    assert reg.get_sample_value("tidelog_controller_leader") in (1.0, 2.0, 3.0)
    assert reg.get_sample_value("tidelog_leaderless_partitions") == 0
    assert reg.get_sample_value("tidelog_raft_elections_won_total", labels) == 1
    lags = [
        reg.get_sample_value("tidelog_raft_follower_lag_entries", {**labels, "follower": str(f)})
        for f in (1, 2, 3, 4)
        if f != leader
    ]
    assert sum(x is not None for x in lags) == 2  # the two followers of an RF=3 partition
    assert (reg.get_sample_value("tidelog_raft_ready_round_seconds_count") or 0) > 0


@pytest.mark.timeout(60)
async def test_replicas_of_a_partition_go_to_distinct_racks(cluster: Cluster) -> None:
    c = cluster
    await c.until("every node registered", lambda: registered(c))
    md = await c.metadata(1)
    assert {n.node_id: n.rack for n in md.nodes} == RACKS
    spec = admin_pb2.TopicSpec(name="racked", partitions=8, replication_factor=2)
    await c.admin(2).CreateTopics(admin_pb2.CreateTopicsRequest(topics=[spec]))
    [t] = (await c.metadata(3, ["racked"])).topics
    for p in t.partitions:
        assert {RACKS[r] for r in p.replicas} == {"a", "b"}, (p.partition, list(p.replicas))
