"""The log cleaner in a real 3-node cluster (``python -m tidelog.node`` processes on
127.0.0.1, free ports, temporary directories, all killed at the end): a compacted topic takes
updates of a few keys, every replica cleans its own copy (seen in its metrics and on its
disk), and a consumer reading from offset 0 gets the latest value of every key at increasing
offsets, with gaps where superseded records were."""

from __future__ import annotations

import asyncio
import re
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.support.nodeproc import Cluster, Node, spawn_cluster, until
from tidelog.client import Consumer, Producer, TopicPartition
from tidelog.v1 import admin_pb2, admin_pb2_grpc

pytestmark = pytest.mark.integration

TOPIC = "rates"
NODES = (1, 2, 3)
KEYS = 20
ROUNDS = 60


@pytest.fixture(scope="module")
def procs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[int, Node]]:
    nodes = spawn_cluster(
        tmp_path_factory.mktemp("compaction"),
        NODES,
        security="secret",
        extra_args=dict.fromkeys(NODES, ("--cleaner-interval-ms", "200")),
    )
    try:
        yield nodes
    finally:
        for n in nodes.values():
            n.kill()


@pytest.fixture
async def cluster(procs: dict[int, Node]) -> AsyncIterator[Cluster]:
    c = Cluster(procs, TOPIC)
    await c.wait_all_alive(60)
    spec = admin_pb2.TopicSpec(
        name=TOPIC,
        partitions=1,
        replication_factor=3,
        configs={
            "cleanup.policy": "compact",
            "segment.bytes": "4096",
            "segment.ms": "500",
            "min.cleanable.dirty.ratio": "0.3",
        },
    )
    await admin_pb2_grpc.AdminStub(c.channel(1)).CreateTopics(
        admin_pb2.CreateTopicsRequest(topics=[spec])
    )

    async def led() -> bool:
        return len(await c.leaders()) == 1

    await until("the partition has a leader", led, 30)
    yield c
    await c.close()


def scrape(node: Node) -> dict[str, float]:
    """The cleaner's series of the topic on ``node``, by metric name."""
    url = f"http://127.0.0.1:{node.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    pattern = r'^(tidelog_cleaner_\w+)\{partition="0",topic="' + TOPIC + r'"\} (\S+)$'
    for m in re.finditer(pattern, text, re.M):
        out[m.group(1)] = float(m.group(2))
    return out


def partition_bytes(node: Node) -> int:
    dirs = [d for d in (node.data_dir / "topics").iterdir() if d.name.startswith(TOPIC + "-")]
    assert len(dirs) == 1
    return sum(f.stat().st_size for f in Path(dirs[0], "0").glob("*.log"))


@pytest.mark.timeout(180)
async def test_every_replica_cleans_and_a_consumer_gets_the_latest_values(
    cluster: Cluster, procs: dict[int, Node]
) -> None:
    want: dict[bytes, bytes] = {}
    async with Producer(cluster.bootstrap, acks="all", linger_ms=0) as producer:
        for rnd in range(ROUNDS):
            futs = []
            for k in range(KEYS):
                key, value = b"pair-%02d" % k, b"rate-%02d-%04d" % (k, rnd)
                futs.append(producer.send(TOPIC, value, key=key))
                want[key] = value
            await asyncio.gather(*futs)
    produced = KEYS * ROUNDS
    # Keys and values alone, without any batch or column overhead.
    payload = sum(len(b"pair-00") + len(b"rate-00-0000") for _ in range(produced))

    async def all_cleaned() -> bool:
        figures = await asyncio.to_thread(lambda: {i: scrape(n) for i, n in procs.items()})
        # A run may start while the updates still arrive and leave dirty segments behind it;
        # later runs (segments roll by age too) clean those, so each copy ends below half.
        return all(
            f.get("tidelog_cleaner_runs_total", 0) >= 1
            and f.get("tidelog_cleaner_reclaimed_bytes_total", 0) > 0
            and partition_bytes(procs[i]) < payload / 2
            for i, f in figures.items()
        )

    await until("every replica has cleaned the partition", all_cleaned, 90)
    for i, n in procs.items():
        figures = scrape(n)
        assert figures["tidelog_cleaner_io_bytes_total"] > 0
        assert 0 <= figures["tidelog_cleaner_dirty_ratio"] <= 1
        assert "tidelog_cleaner_compaction_lag_seconds" in figures
        assert "tidelog_cleaner_tombstone_age_seconds" in figures
        assert partition_bytes(n) < payload / 2, f"node {i} did not shrink its copy"

    got: list[tuple[int, bytes, bytes]] = []
    async with Consumer(cluster.bootstrap, auto_offset_reset="earliest") as consumer:
        consumer.assign([TopicPartition(TOPIC, 0)])
        async with asyncio.timeout(60):
            while True:
                recs = await consumer.poll(timeout_ms=500, until_end=True)
                if not recs:
                    break
                got += [(r.offset, r.key or b"", r.value or b"") for r in recs]
    offsets = [o for o, _k, _v in got]
    assert offsets == sorted(offsets) and len(set(offsets)) == len(offsets)
    latest = {k: v for _o, k, v in got}
    assert latest == want
    assert len(got) < produced, "the consumer saw no gap: nothing was cleaned"
