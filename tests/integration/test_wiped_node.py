"""A node whose data directory was wiped rejoins as a new replica (issue 8 defect 3): it
joins the controller group without voting for a candidate with entries until it caught up,
then votes again, so the cluster survives losing another node afterwards. A changed voter
list at a restart keeps the committed voters (with a warning)."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.support.nodeproc import Cluster, Node, spawn_cluster, until
from tidelog.client import Admin
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
    before = len(node.log_path.read_text())
    node.start()
    await c.wait_all_alive()
    text = node.log_path.read_text()
    assert "new directory id" in text and "raft group 0: new replica" in text

    async def replica_caught_up() -> bool:
        d = (await c.digests(wiped)).get(0)
        return d is not None and d.high_watermark >= 5

    await until("the wiped node's partition replica caught up", replica_caught_up)
    # Its controller replica asked the other voters first (node/controller_bootstrap.py):
    # they hold the cluster's state, so it joined as a new replica that does not vote until
    # the controller leader reached it.
    restarted = text[before:]
    assert "controller: a voter holds the state of cluster" in restarted
    assert "forming a new cluster" not in restarted
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


async def test_changed_voters_keep_the_committed_configuration(tmp_path: Path) -> None:
    """The controller's voters are its committed configuration: a restart with another
    --controller-voters list keeps them and says so (the flag only bootstraps a cluster)."""
    node = Node(tmp_path / "d", tmp_path / "n.log")
    node.start()
    node.stop()
    changed = Node(
        tmp_path / "d",
        tmp_path / "n2.log",
        port=node.port,
        voters=f"1@{node.internal_address},2@127.0.0.1:1",
        internal_port=node.internal_port,
    )
    changed.start()
    try:
        async with Admin(changed.address) as admin:
            desc = await admin.describe_cluster()
            # Still the one voter it was started with, and it leads (alone it is a quorum).
            assert desc.controller_voters == (1,) and desc.controller_id == 1
            await admin.create_topics("after-restart", 1, replication_factor=1)
        text = changed.log_path.read_text()
        assert "--controller-voters names nodes 1,2 but the controller's committed " in text
        assert "configuration has voters 1: using the committed one" in text
    finally:
        changed.kill()
