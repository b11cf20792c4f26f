"""Controller snapshots with real node processes (issue 11 item 4,
node/controller_snapshots.py): a cluster that created and deleted many topics restarts from
its snapshots with the same metadata, and a node added after the controller log was
truncated installs the leader's snapshot and has the metadata."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.nodeproc import Cluster, Node, spawn_cluster, until
from tidelog.node.controller_snapshots import SNAPSHOT_FILE
from tidelog.v1 import admin_pb2, admin_pb2_grpc

EVERY = "10"


async def topic_names(c: Cluster, node: int) -> set[str] | None:
    md = await c.metadata(node)
    return None if md is None else {t.name for t in md.topics}


@pytest.mark.timeout(240)
async def test_a_cluster_restarts_from_snapshots_and_a_late_node_installs_one(
    tmp_path: Path,
) -> None:
    nodes = spawn_cluster(
        tmp_path,
        (1, 2, 3),
        "secret",
        extra_args=dict.fromkeys((1, 2, 3), ("--controller-snapshot-entries", EVERY)),
    )
    c = Cluster(nodes, "unused")
    late: Node | None = None
    try:
        await c.wait_all_alive(90)
        admin = admin_pb2_grpc.AdminStub(c.channel(1))
        kept = set()
        for r in range(24):
            name = f"t{r}"
            spec = admin_pb2.TopicSpec(name=name, partitions=1, replication_factor=3)
            await admin.CreateTopics(admin_pb2.CreateTopicsRequest(topics=[spec]), timeout=30)
            if r % 3:
                await admin.DeleteTopics(admin_pb2.DeleteTopicsRequest(names=[name]), timeout=30)
            else:
                kept.add(name)

        async def everywhere() -> bool:
            return all([await topic_names(c, i) == kept for i in nodes])

        await until("every node has the metadata", everywhere, 30)
        for n in nodes.values():
            assert (n.data_dir / SNAPSHOT_FILE).exists()
            assert b"controller snapshot at index" in n.log_path.read_bytes()

        # A full restart: each node restores its snapshot and replays only what follows.
        for n in nodes.values():
            n.stop()
        for n in nodes.values():
            n.log_path.write_bytes(b"")
            n.spawn()
        await c.wait_all_alive(90)
        await until("the metadata survived the restart", everywhere, 30)
        for n in nodes.values():
            assert b"controller state restored from the snapshot" in n.log_path.read_bytes()

        # A fourth node (a learner of the controller group) joins after the logs were
        # truncated: it can only learn the metadata from a snapshot.
        n1 = nodes[1]
        late = Node(
            tmp_path / "n4",
            tmp_path / "n4.log",
            4,
            voters=n1.voters,
            secret_file=n1.secret_file,
            extra_args=("--controller-snapshot-entries", EVERY),
        )
        late.start()
        c.nodes[4] = late

        async def late_has_it() -> bool:
            return await topic_names(c, 4) == kept

        await until("the late node has the metadata", late_has_it, 60)
        assert (
            b"controller state installed from the leader's snapshot" in late.log_path.read_bytes()
        )
    finally:
        await c.close()
        for n in nodes.values():
            n.kill()
        if late is not None:
            late.kill()
