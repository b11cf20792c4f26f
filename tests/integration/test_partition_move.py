"""A partition's replicas moved under a running producer, with real node processes: four
nodes, an RF=3 partition on nodes 1, 2, 3 moved to 2, 3, 4 (``partition reassign``, the
controller's target, the leader's logged membership changes). Nothing acknowledged is lost,
the group ends with voters {2, 3, 4}, and node 1's replica stops receiving (it is deleted
once neither the replicas nor the target name node 1)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.healing import Load, ok, spawn_healing_cluster, tidelog
from tests.support.nodeproc import Cluster, Node, until
from tidelog.client import Admin

pytestmark = pytest.mark.integration

TOPIC = "move"
STARTUP_TIMEOUT_S = 60.0
MOVE_TIMEOUT_S = 90.0


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[dict[int, Node]]:
    nodes = spawn_healing_cluster(tmp_path, 4)
    try:
        yield nodes
    finally:
        for n in nodes.values():
            n.kill()


async def _replicas(c: Cluster) -> tuple[list[int], list[int], list[int]]:
    """(replicas, target, in-sync) of partition 0 as the controller describes it."""
    async with Admin(c.bootstrap) as admin:
        [d] = await admin.describe_topics([TOPIC])
    p = d.partitions[0]
    return list(p.replicas), list(p.target or []), list(p.in_sync)


async def _reassign(c: Cluster, nodes: list[int]) -> None:
    out = ok(
        await asyncio.to_thread(
            tidelog, c.bootstrap, "partition", "reassign", f"{TOPIC}/0",
            "--replicas", ",".join(map(str, nodes)),
        )
    )  # fmt: skip
    assert f"{TOPIC}/0" in out

    async def done() -> bool:
        replicas, target, in_sync = await _replicas(c)
        return not target and sorted(replicas) == sorted(nodes) and set(in_sync) == set(nodes)

    await until(f"partition 0 on nodes {nodes}", done, MOVE_TIMEOUT_S)


async def _hosts(c: Cluster, node: int) -> bool:
    try:
        return 0 in await c.digests(node)
    except Exception:
        return False


@pytest.mark.timeout(300)
async def test_move_from_1_2_3_to_2_3_4_under_a_producer(procs: dict[int, Node]) -> None:
    c = Cluster(procs, TOPIC)
    try:
        await c.wait_all_alive(STARTUP_TIMEOUT_S)
        async with Admin(c.bootstrap) as admin:
            await admin.create_topics(TOPIC, 1, replication_factor=3)
        await until("partition 0 has a leader", lambda: _led(c), 30)
        replicas, _t, _i = await _replicas(c)
        if sorted(replicas) != [1, 2, 3]:
            await _reassign(c, [1, 2, 3])  # placement chose otherwise: start from 1, 2, 3
        load = Load(c.bootstrap, TOPIC, 1)
        await load.start()
        try:
            await until("the producer writes", lambda: _acked(load, 30), 30)
            await _reassign(c, [2, 3, 4])
            before = load.count()
            await until("the producer goes on", lambda: _acked(load, before + 30), 30)
        finally:
            await load.stop()
        # The group itself: voters {2, 3, 4}, led by one of them, each holding the log.
        digests = {n: (await c.digests(n)).get(0) for n in (2, 3, 4)}
        assert all(d is not None for d in digests.values())
        leaders = {d.leader for d in digests.values() if d is not None}
        assert len(leaders) == 1 and leaders <= {2, 3, 4}, leaders
        # Node 1 no longer holds a replica: it is deleted there, so nothing reaches it.
        await until("node 1 dropped its replica", lambda: _gone(c, 1), 30)
        await load.check_all_readable(c.bootstrap)
        assert load.count() > before
    finally:
        await c.close()


async def _led(c: Cluster) -> bool:
    return len(await c.leaders()) == 1


async def _acked(load: Load, n: int) -> bool:
    return load.count() >= n


async def _gone(c: Cluster, node: int) -> bool:
    return not await _hosts(c, node)
