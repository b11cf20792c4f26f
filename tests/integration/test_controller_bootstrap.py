"""A majority of controller voters wiped (issue 8 item 3): nodes 1 and 2 of three lose their
data directories and restart while node 3, which holds the controller's state, is down. They
must not bootstrap an empty controller (node/controller_bootstrap.py: a new cluster forms
only when every listed voter answers that it is fresh); once node 3 is back, they join its
cluster as new replicas, and the controller state (the topic) is still there."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest

from tests.support.nodeproc import Cluster, spawn_cluster, until
from tidelog.v1 import admin_pb2, admin_pb2_grpc

TOPIC = "kept"
WAITING = "waiting for the controller voters to form the cluster: no answer from node 3"
JOINING = "a voter holds the state of cluster"


@pytest.mark.timeout(180)
async def test_wiped_majority_waits_for_the_survivor_and_keeps_its_state(
    tmp_path: Path,
) -> None:
    nodes = spawn_cluster(tmp_path, (1, 2, 3))
    c = Cluster(nodes, TOPIC)
    try:
        await c.wait_all_alive()
        spec = admin_pb2.TopicSpec(name=TOPIC, partitions=1, replication_factor=3)
        await admin_pb2_grpc.AdminStub(c.channel(1)).CreateTopics(
            admin_pb2.CreateTopicsRequest(topics=[spec]), timeout=10
        )

        async def everyone_knows_the_topic() -> bool:
            for n in (1, 2, 3):
                md = await c.metadata(n)
                if md is None or TOPIC not in {t.name for t in md.topics}:
                    return False
            return True

        await until("every node knows the topic", everyone_knows_the_topic)
        for n in (1, 2):
            nodes[n].kill()
            shutil.rmtree(nodes[n].data_dir)
        nodes[3].kill()
        for n in (1, 2):
            nodes[n].log_path.unlink()
            nodes[n].spawn()
            # Start-up does not wait for the other voters: the node serves.
            await asyncio.to_thread(nodes[n].wait_serving)

        # For a while (many election timeouts): no controller among the two wiped voters,
        # and no empty cluster formed.
        deadline = asyncio.get_running_loop().time() + 6
        while asyncio.get_running_loop().time() < deadline:
            for n in (1, 2):
                md = await c.metadata(n)
                assert md is not None
                assert md.controller_id < 0, f"node {n} sees controller {md.controller_id}"
                assert not md.topics
            await asyncio.sleep(0.3)
        for n in (1, 2):
            md = await c.metadata(n)
            assert md is not None
            # What `tidelog cluster health` shows (tidelog/ops/health.py), and the log.
            assert WAITING in md.controller_waiting
            text = nodes[n].log_path.read_text()
            assert WAITING in text
            assert "forming a new cluster" not in text
            assert "raft group 0: new replica" in text

        nodes[3].start()

        async def joined() -> bool:
            return all(JOINING in nodes[n].log_path.read_text() for n in (1, 2))

        await until("nodes 1 and 2 join node 3's cluster", joined)
        md = await c.metadata(3)
        assert md is not None and TOPIC in {t.name for t in md.topics}
        # The wiped voters grant no vote until a leader reached them, and node 3 alone is no
        # majority: the controller stays without a leader (what it committed may be on node
        # 3 alone) until an operator recovers it (docs/operations.md); it never rewrites
        # node 3's log with an empty one.
        for _ in range(10):
            md = await c.metadata(3)
            assert md is not None and TOPIC in {t.name for t in md.topics}
            for n in (1, 2):
                other = await c.metadata(n)
                assert other is not None and other.controller_id < 0
            await asyncio.sleep(0.3)
        for n in (1, 2):
            assert "forming a new cluster" not in nodes[n].log_path.read_text()

        # The operator's way out (docs/operations.md): stop the wiped voters, force-recover
        # the controller from node 3 (it keeps its log), start them again: they join it.
        for n in (1, 2):
            nodes[n].stop()
        resp = await admin_pb2_grpc.AdminStub(c.channel(3)).ForceRecoverController(
            admin_pb2.ForceRecoverControllerRequest(from_survivors=True), timeout=30
        )
        assert resp.chosen == 3 and list(resp.survivors) == [3]

        async def recovered() -> bool:
            md = await c.metadata(3)
            return md is not None and md.controller_id == 3

        await until("node 3 leads the controller", recovered, 30)
        for n in (1, 2):
            nodes[n].spawn()
        await c.wait_all_alive(60)
        await until("every node knows the topic again", everyone_knows_the_topic, 30)
    finally:
        await c.close()
        for proc in nodes.values():
            proc.kill()
