"""Follower fetching (Kafka's KIP-392) against three real nodes in three racks: a consumer
with ``client_rack`` reads committed records from the in-sync follower in its rack, and when
that follower is killed it goes on from the leader without losing or repeating a record."""

from __future__ import annotations

import asyncio
import signal
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.nodeproc import Cluster, Node, spawn_cluster, until
from tidelog.client import Admin, Consumer, Producer, TopicPartition

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

TOPIC = "racked"


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[dict[int, Node]]:
    racks = {i: ("--rack", f"rack-{i}") for i in (1, 2, 3)}
    nodes = spawn_cluster(tmp_path, (1, 2, 3), security="secret", extra_args=racks)
    try:
        for n in nodes.values():
            n.wait_serving()
        yield nodes
    finally:
        for n in nodes.values():
            n.kill()


def records_out(node: Node) -> float:
    """The node's tidelog_records_out for TOPIC (records it served to consumers)."""
    url = f"http://127.0.0.1:{node.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as resp:
        text = resp.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith("tidelog_records_out_total{") and f'topic="{TOPIC}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


async def read_all(consumer: Consumer, want: int) -> list[bytes]:
    got: list[bytes] = []
    while len(got) < want:
        batch = await consumer.poll(timeout_ms=10_000)
        assert batch, f"nothing more after {len(got)} records"
        got += [r.value for r in batch if r.value is not None]
    return got


async def test_a_racked_consumer_reads_from_its_follower_then_falls_back(
    nodes: dict[int, Node],
) -> None:
    # Serving is not registered: a node serves while the controller forms.
    c = Cluster(nodes, TOPIC)
    await c.wait_all_alive(60)
    await c.close()
    bootstrap = ",".join(n.address for n in nodes.values())
    async with Admin(bootstrap) as admin:
        await admin.create_topics(TOPIC, 1, 3)

        async def all_in_sync() -> bool:
            view = await admin.metadata()
            parts = next(t for t in view.topics if t.name == TOPIC).partitions
            return parts[0].leader > 0 and len(parts[0].in_sync) == 3

        await until("three in-sync replicas", all_in_sync, 30)
        view = await admin.metadata()
        leader = next(t for t in view.topics if t.name == TOPIC).partitions[0].leader
    follower = next(i for i in nodes if i != leader)
    async with Producer(bootstrap) as producer:
        await producer.send_many(TOPIC, [b"a%d" % i for i in range(500)])
    async with Admin(bootstrap) as admin:
        # The consumer picks the follower from the metadata's in-sync replicas: wait until
        # every follower holds the records again (a loaded machine lets one lag a moment).
        async def all_caught_up() -> bool:
            view = await admin.metadata()
            parts = next(t for t in view.topics if t.name == TOPIC).partitions
            return len(parts[0].in_sync) == 3

        await until("three in-sync replicas after the writes", all_caught_up, 30)
    tp = TopicPartition(TOPIC, 0)
    before = {i: records_out(n) for i, n in nodes.items()}
    async with Consumer(
        bootstrap, auto_offset_reset="earliest", client_rack=f"rack-{follower}"
    ) as consumer:
        consumer.assign([tp])
        assert await asyncio.wait_for(read_all(consumer, 500), 60) == [
            b"a%d" % i for i in range(500)
        ]
        served = {i: records_out(n) - before[i] for i, n in nodes.items()}
        # The rack's follower served every record; the leader served none.
        assert served[follower] >= 500 and served[leader] == 0, served

        # Its follower dies: the consumer carries on from the leader, nothing lost or repeated.
        nodes[follower].send_signal(signal.SIGKILL)
        async with Producer(bootstrap) as producer:
            await producer.send_many(TOPIC, [b"b%d" % i for i in range(300)])
        assert await asyncio.wait_for(read_all(consumer, 300), 90) == [
            b"b%d" % i for i in range(300)
        ]
    assert records_out(nodes[leader]) - before[leader] >= 300
