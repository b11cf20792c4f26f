"""A node whose data directory was wiped rejoins as a new replica (issue 8 defect 3): it
joins the controller group without voting for a candidate with entries until it caught up,
then votes again, so the cluster survives losing another node afterwards. A changed voter
list is refused at start."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.support.nodeproc import Cluster, Node, spawn_cluster, until
from tidelog.records import decode_batches, encode_batch
from tidelog.v1 import admin_pb2, admin_pb2_grpc, broker_pb2

TOPIC = "wiped"


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    nodes = spawn_cluster(tmp_path, (1, 2, 3))
    c = Cluster(nodes, TOPIC)
    try:
        await c.wait_all_alive()
        yield c
    finally:
        await c.close()
        for n in nodes.values():
            n.kill()


async def controller_of(c: Cluster, node: int) -> int:
    md = await c.metadata(node)
    return -1 if md is None else md.controller_id


@pytest.mark.timeout(120)
async def test_wiped_node_rejoins_as_a_new_replica_and_votes_once_caught_up(
    cluster: Cluster,
) -> None:
    c = cluster
    spec = admin_pb2.TopicSpec(name=TOPIC, partitions=1, replication_factor=3)
    await admin_pb2_grpc.AdminStub(c.channel(1)).CreateTopics(
        admin_pb2.CreateTopicsRequest(topics=[spec])
    )

    async def led() -> bool:
        return 0 in await c.leaders()

    await until("the partition has a leader", led)
    part_leader = (await c.leaders())[0]
    for i in range(5):
        await c.broker(part_leader).Produce(
            broker_pb2.ProduceRequest(
                topic=TOPIC, batches=encode_batch([b"r%d" % i]), acks=broker_pb2.ACKS_ALL
            ),
            timeout=10,
        )
    leader = await controller_of(c, 1)
    # Wipe a node that leads neither the controller nor the partition.
    wiped = next(i for i in (1, 2, 3) if i not in (leader, part_leader))
    node = c.nodes[wiped]
    node.stop()
    shutil.rmtree(node.data_dir)
    node.start()
    await c.wait_all_alive()
    text = node.log_path.read_text()
    assert "new directory id" in text and "raft group 0: new replica" in text

    async def replica_caught_up() -> bool:
        d = (await c.digests(wiped)).get(0)
        return d is not None and d.high_watermark >= 5

    await until("the wiped node's partition replica caught up", replica_caught_up)
    assert text.count(": new replica on a new data directory") >= 1
    # Caught up: the wiped node and the third one elect a controller without the leader.
    third = next(i for i in (1, 2, 3) if i not in (leader, wiped))

    async def caught_up() -> bool:
        md = await c.metadata(wiped)
        return md is not None and md.controller_id == leader

    await until("the wiped node follows the controller", caught_up)
    c.nodes[leader].kill()

    async def new_controller() -> bool:
        a, b = await controller_of(c, wiped), await controller_of(c, third)
        return a == b and a in (wiped, third)

    await until("a controller elected by the wiped node and the third", new_controller, 30)
    if part_leader == leader:
        # The partition too: its new leader is the wiped node or the third, and has it all.
        async def part_led() -> bool:
            return (await c.leaders((wiped, third))).get(0) is not None

        await until("the partition is led by the wiped node or the third", part_led, 30)
        new_part_leader = (await c.leaders((wiped, third)))[0]
        resp = [
            m
            async for m in c.broker(new_part_leader).Fetch(
                broker_pb2.FetchRequest(topic=TOPIC, offset=0, once=True)
            )
        ]
        values = [r.value for m in resp for r in decode_batches(m.batches)]
        assert values[:5] == [b"r%d" % i for i in range(5)]


def test_changed_voters_are_refused_at_start(tmp_path: Path) -> None:
    node = Node(tmp_path / "d", tmp_path / "n.log")
    node.start()
    node.stop()
    changed = Node(tmp_path / "d", tmp_path / "n2.log", voters=f"1@{node.address},2@127.0.0.1:1")
    proc = subprocess.run(changed.argv(), capture_output=True, timeout=60)
    assert proc.returncode != 0
    assert b"changing the controller's voters is not supported yet" in proc.stdout + proc.stderr
