"""``tidelog cluster add`` on a real local cluster: a 3-node cluster (``cluster up``) with an
RF=3 topic; ``cluster add`` starts node 4, which joins with ``--join`` through a running node;
the controller moves replicas onto it until replica counts are within one; every record
written before is still read; ``cluster status`` lists node 4."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import free_port
from tests.support.nodeproc import until
from tidelog.client import Admin, SyncConsumer, SyncProducer, TopicPartition
from tidelog.ops import localcluster

pytestmark = [pytest.mark.integration]

TOPIC = "grow"
PARTITIONS = 6
RECORDS = 200


@pytest.fixture
def cluster_dir(tmp_path: Path) -> Iterator[Path]:
    directory = tmp_path / "cluster"
    yield directory
    if (directory / "cluster.json").exists():
        localcluster.down(directory)


def tidelog(directory: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    env = dict(os.environ)
    env.pop("TIDELOG_BOOTSTRAP", None)
    env["TIDELOG_CLUSTER_DIR"] = str(directory)
    return subprocess.run(
        [sys.executable, "-m", "tidelog", *args],
        capture_output=True,
        env=env,
        timeout=120,
        check=False,
    )


async def test_cluster_add_joins_and_gets_replicas(cluster_dir: Path) -> None:
    started = await asyncio.to_thread(localcluster.up, cluster_dir, 3, free_port(), timeout_s=90)
    bootstrap = ",".join(n.address for n in started.cluster.nodes)
    async with Admin(bootstrap) as admin:
        await admin.create_topics(TOPIC, PARTITIONS, replication_factor=3)

    def produce() -> None:
        with SyncProducer(bootstrap, acks="all") as producer:
            for i in range(RECORDS):
                producer.send(TOPIC, b"%d" % i, partition=i % PARTITIONS)
            producer.flush()

    await asyncio.to_thread(produce)
    result = await asyncio.to_thread(tidelog, cluster_dir, "cluster", "add")
    assert result.returncode == 0, result.stderr.decode()
    assert "node 4 joined" in result.stdout.decode()
    spec = localcluster.load_cluster(cluster_dir).node(4)
    assert "--join" in spec.argv and "--controller-voters" not in spec.argv

    async def balanced() -> bool:
        async with Admin(bootstrap) as admin:
            desc = await admin.describe_cluster()
            [topic] = await admin.describe_topics([TOPIC])
        counts = {n.node_id: n.replicas for n in desc.nodes}
        moving = any(p.target for p in topic.partitions)
        return (
            counts.get(4, 0) > 0 and max(counts.values()) - min(counts.values()) <= 1 and not moving
        )

    await until("replicas balanced onto node 4", balanced, 120)

    def read() -> list[bytes]:
        values = []
        with SyncConsumer(bootstrap, auto_offset_reset="earliest") as consumer:
            consumer.assign([TopicPartition(TOPIC, p) for p in range(PARTITIONS)])
            for _ in range(200):
                values += [r.value or b"" for r in consumer.poll(timeout_ms=500)]
                if len(values) >= RECORDS:
                    break
        return values

    values = await asyncio.to_thread(read)
    assert sorted(values) == sorted(b"%d" % i for i in range(RECORDS))
    status = tidelog(cluster_dir, "cluster", "status", "--json")
    assert status.returncode == 0, status.stderr.decode()
    assert 4 in {n["id"] for n in json.loads(status.stdout)["nodes"]}
