"""A cluster that heals itself and changes shape, with real node processes (issue 11):
4 nodes (voters 1-3, node 4 joined with --join), RF=3 topics.

* bad input is refused with one clear line and exit status 1: an unknown setting or a bad
  value, removing a live node with replicas, reassigning to an unknown node, draining the
  last node that can hold a replica;
* cluster settings are replicated: set through one node, read through another;
* a rolling restart of every node ends leader-balanced (no node leads more than its share
  plus one; here exactly its share).

Reprovisioning, a 5th node and a drain under load: tests/integration/test_replica_moves.py.
"""

from __future__ import annotations

import asyncio
import json
import math
import signal
from collections.abc import AsyncIterator, Iterator

import pytest

from tests.support.healing import (
    leader_counts,
    ok,
    one_error_line,
    spawn_healing_cluster,
    tidelog,
)
from tests.support.nodeproc import Cluster, Node, until
from tidelog.client import Admin

pytestmark = pytest.mark.integration

TOPIC = "heal"
PARTITIONS = 8
NODES = 4
STARTUP_TIMEOUT_S = 60.0


@pytest.fixture(scope="module")
def procs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[int, Node]]:
    nodes = spawn_healing_cluster(tmp_path_factory.mktemp("heal"), NODES)
    try:
        yield nodes
    finally:
        for n in nodes.values():
            n.kill()


@pytest.fixture
async def cluster(procs: dict[int, Node]) -> AsyncIterator[Cluster]:
    c = Cluster(procs, TOPIC)
    await c.wait_all_alive(STARTUP_TIMEOUT_S)
    async with Admin(c.bootstrap) as admin:
        if TOPIC not in await admin.list_topics():
            await admin.create_topics(TOPIC, PARTITIONS, replication_factor=3)

    async def led() -> bool:
        return len(await c.leaders()) == PARTITIONS

    await until("every partition has a leader", led, 30)
    yield c
    await c.close()


async def test_bad_input_is_refused_with_one_line(cluster: Cluster) -> None:
    b = cluster.bootstrap
    line = await asyncio.to_thread(
        lambda: one_error_line(tidelog(b, "cluster", "config", "set", "nope=1"))
    )
    assert "unknown cluster setting 'nope'" in line
    line = await asyncio.to_thread(
        lambda: one_error_line(tidelog(b, "cluster", "config", "set", "replica.reprovision.ms=5s"))
    )
    assert "replica.reprovision.ms" in line and "not an integer" in line
    line = await asyncio.to_thread(lambda: one_error_line(tidelog(b, "cluster", "remove", "4")))
    assert "still holds" in line and "drain it first" in line
    line = await asyncio.to_thread(
        lambda: one_error_line(
            tidelog(b, "partition", "reassign", f"{TOPIC}/0", "--replicas", "1,2,9")
        )
    )
    assert "node 9 is not registered" in line
    line = await asyncio.to_thread(
        lambda: one_error_line(
            tidelog(b, "partition", "reassign", f"{TOPIC}/0", "--replicas", "1,2")
        )
    )
    assert "3 distinct nodes" in line
    # One node may drain (three remain for RF 3); a second would leave two: refused.
    ok(
        await asyncio.to_thread(
            tidelog, b, "cluster", "config", "set", "replica.moves.concurrent.max=1"
        )
    )
    try:
        ok(
            await asyncio.to_thread(
                tidelog, b, "cluster", "config", "set", "replica.balance.enable=false"
            )
        )
        out = ok(await asyncio.to_thread(tidelog, b, "cluster", "drain", "4"))
        assert "draining node 4" in out
        line = await asyncio.to_thread(lambda: one_error_line(tidelog(b, "cluster", "drain", "3")))
        assert "cannot drain node 3" in line and "add a node" in line
    finally:
        ok(await asyncio.to_thread(tidelog, b, "cluster", "drain", "4", "--cancel"))
        ok(
            await asyncio.to_thread(
                tidelog, b, "cluster", "config", "unset", "replica.moves.concurrent.max",
                "replica.balance.enable",
            )
        )  # fmt: skip
    line = await asyncio.to_thread(lambda: one_error_line(tidelog(b, "cluster", "drain", "77")))
    assert "node 77 is not registered" in line


async def test_cluster_settings_are_replicated(cluster: Cluster) -> None:
    one, other = cluster.nodes[1].address, cluster.nodes[4].address
    ok(await asyncio.to_thread(tidelog, one, "cluster", "config", "set", "retention.ms=3600000"))
    try:
        value = ok(
            await asyncio.to_thread(tidelog, other, "cluster", "config", "get", "retention.ms")
        )
        assert value.strip() == "3600000"
        listed = json.loads(
            ok(await asyncio.to_thread(tidelog, other, "cluster", "config", "list", "--json"))
        )
        by_key = {e["key"]: e for e in listed}
        assert by_key["retention.ms"]["source"] == "set"
        assert by_key["replica.reprovision.ms"]["value"] == "300000"
        # The topic's effective config follows the cluster default.
        desc = json.loads(
            ok(await asyncio.to_thread(tidelog, other, "topic", "describe", TOPIC, "--json"))
        )
        assert desc[0]["configs"]["retention.ms"] == "3600000"
    finally:
        ok(await asyncio.to_thread(tidelog, one, "cluster", "config", "unset", "retention.ms"))


async def test_rolling_restart_ends_leader_balanced(cluster: Cluster) -> None:
    alive = tuple(sorted(cluster.nodes))
    for node_id in alive:
        n = cluster.nodes[node_id]
        await asyncio.to_thread(n.stop, signal.SIGTERM)
        await asyncio.to_thread(n.start)
        await cluster.wait_all_alive(STARTUP_TIMEOUT_S)
    share = math.ceil(PARTITIONS / len(alive))

    async def balanced() -> bool:
        counts = await leader_counts(cluster, alive)
        return sum(counts.values()) == PARTITIONS and max(counts.values()) <= share

    await until(f"every node leads at most {share} partitions", balanced, 60)
    async with Admin(cluster.bootstrap) as admin:
        desc = await admin.describe_cluster()
    assert all(n.alive and n.state == "active" for n in desc.nodes)
