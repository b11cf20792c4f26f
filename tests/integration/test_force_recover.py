"""Recovering a partition that lost a majority for good (issue 11 item 10), with real node
processes: 3 nodes (node 1 the only controller voter, so the controller outlives the loss;
nodes 2 and 3 joined with --join), an RF=3 topic, records produced with acks=all. SIGKILL
nodes 2 and 3 and keep them down: the partition is unavailable. ``tidelog partition
force-recover`` is refused while it is not needed; once they are dead it recovers from node
1: the partition serves again with replicas [1], the reported kept range ends at node 1's
log end, and every record acknowledged before the kill that node 1 held is readable."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.healing import (
    NODE_DEAD_MS,
    joining_node,
    ok,
    one_error_line,
    tidelog,
)
from tests.support.nodeproc import Cluster, Node, cluster_security, until
from tidelog.client import Admin, Consumer, Producer, TopicPartition
from tidelog.errors import TidelogError
from tidelog.ops.processes import free_port

pytestmark = pytest.mark.integration

TOPIC = "fr"
RECORDS = 300


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[dict[int, Node]]:
    ports = (free_port(), free_port(), free_port())
    tls, _ = cluster_security(tmp_path, (1,), "tls")
    one = Node(
        tmp_path / "n1",
        tmp_path / "n1.log",
        1,
        ports[0],
        ports[1],
        f"1@127.0.0.1:{ports[2]}",
        internal_port=ports[2],
        tls=tls[1],
        extra_args=("--node-dead-ms", str(NODE_DEAD_MS)),
    )
    nodes = {1: one}
    nodes.update({i: joining_node(tmp_path, i, one.internal_address, tmp_path) for i in (2, 3)})
    try:
        for n in nodes.values():
            n.spawn()
        yield nodes
    finally:
        for n in nodes.values():
            n.kill()


async def test_force_recover_from_the_survivor(procs: dict[int, Node]) -> None:
    async with asyncio.timeout(240):
        c = Cluster(procs, TOPIC)
        try:
            await _scenario(c, procs)
        finally:
            await c.close()


async def _scenario(c: Cluster, procs: dict[int, Node]) -> None:
    await c.wait_all_alive(90)
    b = procs[1].address
    async with Admin(b) as admin:
        await admin.create_topics(TOPIC, 1, replication_factor=3)

        async def led() -> bool:
            return len(await c.leaders()) == 1

        await until("the partition has a leader", led, 30)
        acked: list[tuple[int, bytes]] = []
        async with Producer(b, acks="all", linger_ms=1) as producer:
            for i in range(RECORDS):
                md = await producer.send(TOPIC, b"v%d" % i, partition=0)
                acked.append((md.offset, b"v%d" % i))
        end_acked = max(o for o, _ in acked) + 1

        # Not needed while a majority is alive: refused, nothing changes.
        line = await asyncio.to_thread(
            lambda: one_error_line(
                tidelog(b, "partition", "force-recover", f"{TOPIC}/0", "--from-survivors")
            )
        )
        assert "majority of its replicas is alive" in line and "not needed" in line
        # Without the confirmation flag: a usage mistake (exit status 2).
        bare = await asyncio.to_thread(tidelog, b, "partition", "force-recover", f"{TOPIC}/0")
        assert bare.returncode == 2 and b"--from-survivors" in bare.stderr
        line = await asyncio.to_thread(
            lambda: one_error_line(
                tidelog(b, "partition", "force-recover", "nope/0", "--from-survivors")
            )
        )
        assert "nope" in line

        # Node 1 knows every acknowledged record committed (it holds them all).
        async def caught_up() -> bool:
            d = (await c.digests(1))[0]
            return d.high_watermark >= end_acked

        await until("node 1 has every acknowledged record", caught_up, 30)
        survivor_hw = (await c.digests(1))[0].high_watermark

        procs[2].kill()
        procs[3].kill()

        # Unavailable: no leader, and a produce fails.
        await asyncio.sleep(2)
        assert await c.leaders((1,)) == {}
        async with Producer(
            b, acks="all", request_timeout_ms=500, delivery_timeout_ms=2_000, retry_backoff_ms=50
        ) as producer:
            with pytest.raises(TidelogError):
                await producer.send(TOPIC, b"never", partition=0)

        async def both_dead() -> bool:
            desc = await admin.describe_cluster()
            return {n.node_id for n in desc.nodes if not n.alive} == {2, 3}

        await until("nodes 2 and 3 are marked dead", both_dead, 30)
        out = ok(
            await asyncio.to_thread(
                tidelog, b, "partition", "force-recover", f"{TOPIC}/0", "--from-survivors"
            )
        )
        assert f"{TOPIC}/0: FORCE-RECOVERED from node 1" in out
        assert "replicas dropped: [2, 3]" in out
        m = re.search(r"kept: offsets below (\d+)", out)
        assert m is not None, out
        kept = int(m.group(1))
        # Exactly node 1's log end: everything it knew committed, nothing beyond.
        assert kept == survivor_hw >= end_acked
        assert f"POSSIBLY LOST: acknowledged records at offsets {kept} and above" in out
        assert "NOT restored" in out  # no third live node to take the missing replicas

        # It serves again, led by node 1, with replicas [1].
        await until("node 1 leads the partition", lambda: _leads(c), 30)
        [topic] = await admin.describe_topics(TOPIC)
        assert topic.partitions[0].replicas == (1,)
        async with Producer(b, acks="all", linger_ms=1) as producer:
            md = await producer.send(TOPIC, b"after", partition=0)
        assert md.offset >= kept

        # Every record acknowledged before the kill is readable at its offset.
        got: dict[int, bytes] = {}
        async with Consumer(b, auto_offset_reset="earliest") as consumer:
            consumer.assign([TopicPartition(TOPIC, 0)])
            async with asyncio.timeout(30):
                while md.offset not in got:
                    for r in await consumer.poll(timeout_ms=500):
                        got[r.offset] = r.value or b""
        for offset, value in acked:
            assert got.get(offset) == value
        assert got[md.offset] == b"after"

        # Asked again: a majority of the new replica set ([1]) is alive, refused.
        line = await asyncio.to_thread(
            lambda: one_error_line(
                tidelog(b, "partition", "force-recover", f"{TOPIC}/0", "--from-survivors")
            )
        )
        assert "not needed" in line
    log = procs[1].log_path.read_text()
    assert "FORCING the Raft configuration to voters [1]" in log
    assert "FORCE-RECOVERED from node 1" in log


async def _leads(c: Cluster) -> bool:
    return await c.leaders((1,)) == {0: 1}
