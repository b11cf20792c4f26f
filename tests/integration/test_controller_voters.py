"""The controller group's own voters with real node processes (issue 11): 4 nodes, voters
1-3, node 4 joined with --join, ``replica.reprovision.ms=5000``, kill -9 for every loss.

1. A voter is killed and stays down: past its deadline node 4 is promoted and the dead voter
   removed (``cluster status`` shows the voters, and the pending replacement before). Then a
   second original voter is killed: the controller still takes a change (a topic is
   created), which needs node 4's vote (of the original voters one is left alive).
2. ``cluster force-recover-controller`` is refused while a majority of the voters is alive;
   once a third node is killed (one voter left) it shrinks the voters to the survivor,
   which takes changes again, reports what may be lost, and sets ``controller.voters`` so
   the first voter killed, back (replaced, so a learner), is promoted to refill.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.support.healing import ok, one_error_line, spawn_healing_cluster, tidelog
from tests.support.nodeproc import Cluster, Node, until
from tidelog.client import Admin
from tidelog.client.admin import ClusterDescription
from tidelog.errors import TidelogError

pytestmark = pytest.mark.integration

REPROVISION_MS = 5_000


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[dict[int, Node]]:
    nodes = spawn_healing_cluster(tmp_path, 4)
    try:
        yield nodes
    finally:
        for n in nodes.values():
            n.kill()


@pytest.fixture
async def cluster(procs: dict[int, Node]) -> AsyncIterator[Cluster]:
    c = Cluster(dict(procs), "t")
    yield c
    await c.close()


async def describe(bootstrap: str) -> ClusterDescription:
    async with Admin(bootstrap, request_timeout_ms=5_000) as admin:
        return await admin.describe_cluster()


async def voters_are(bootstrap: str, voters: set[int]) -> bool:
    try:
        d = await describe(bootstrap)
    except Exception:
        return False
    return set(d.controller_voters) == voters and d.controller_id in voters


async def create_topic(bootstrap: str, name: str) -> None:
    async with Admin(bootstrap, request_timeout_ms=20_000) as admin:
        await admin.create_topics(name, 1, replication_factor=1)


@pytest.mark.timeout(150)
async def test_a_dead_voter_is_replaced_and_force_recover_shrinks_to_the_survivor(
    cluster: Cluster, procs: dict[int, Node]
) -> None:
    await cluster.wait_all_alive(60)
    b = cluster.bootstrap
    async with Admin(b) as admin:
        await admin.set_cluster_config({"replica.reprovision.ms": str(REPROVISION_MS)})
    d = await describe(b)
    assert set(d.controller_voters) == {1, 2, 3}
    assert {n.node_id for n in d.nodes if n.controller_voter} == {1, 2, 3}
    first = next(i for i in (3, 2, 1) if i != d.controller_id)
    procs[first].kill()
    killed_at = time.monotonic()
    live = {i: procs[i] for i in procs if i != first}
    lb = ",".join(n.address for n in live.values())

    async def pending_shown() -> bool:
        d = await describe(lb)
        return (
            f"voter {first} dead: replaced at its reprovisioning deadline"
            in d.controller_voter_change
        )

    await until("the pending voter replacement is shown", pending_shown, 15)
    expected = {1, 2, 3, 4} - {first}
    await until("node 4 replaces the dead voter", lambda: voters_are(lb, expected), 30)
    took = time.monotonic() - killed_at
    assert took >= REPROVISION_MS / 1000 - 1.0, f"replaced after {took:.1f} s, before the deadline"
    status = json.loads(ok(await asyncio.to_thread(tidelog, lb, "cluster", "status", "--json")))
    assert sorted(status["controller_voters"]) == sorted(expected)
    text = ok(await asyncio.to_thread(tidelog, lb, "cluster", "status"))
    assert f"controller voters: {', '.join(map(str, sorted(expected)))}" in text

    # Removing a live voter is refused with one line.
    line = one_error_line(await asyncio.to_thread(tidelog, lb, "cluster", "remove", "4"))
    assert "node 4 is a controller voter: drain it first" in line

    # A second original voter dies: of {1,2,3} one is left, yet changes commit (node 4 votes).
    second = next(i for i in sorted(expected) if i != 4)
    procs[second].kill()
    rest = {i: procs[i] for i in live if i != second}
    rb = ",".join(n.address for n in rest.values())
    await create_topic(rb, "after-two-losses")
    # A majority of the voters is alive: force-recover is refused.
    line = one_error_line(
        await asyncio.to_thread(
            tidelog, rb, "cluster", "force-recover-controller", "--from-survivors"
        )
    )
    assert "a majority of" in line and "force-recover is only for a majority lost" in line

    # A third loss (node 4): one voter of three is left; the controller takes no change.
    procs[4].kill()
    [survivor] = [i for i in rest if i != 4]
    sb = procs[survivor].address
    with pytest.raises(TidelogError):
        async with Admin(sb, request_timeout_ms=4_000) as admin:
            await admin.create_topics("no-quorum", 1, replication_factor=1)
    result = await asyncio.to_thread(
        tidelog, sb, "cluster", "force-recover-controller", "--from-survivors"
    )
    report = ok(result)
    assert f"voters now [{survivor}], node {survivor} keeps its log" in report
    assert "reprovisioning refills the controller to 3 voter(s)" in report
    assert "FORCING the configuration" in procs[survivor].log_path.read_text()
    await until("the survivor leads alone", lambda: voters_are(sb, {survivor}), 20)
    await create_topic(sb, "after-force-recover")
    async with Admin(sb) as admin:
        [entry] = await admin.cluster_config(["controller.voters"])
        assert entry.value == "3"

    # The first voter killed comes back: replaced long ago, it is a learner, then promoted.
    await asyncio.to_thread(procs[first].start)
    await until("the returning node refills a vote", lambda: voters_are(sb, {survivor, first}), 40)
    # It follows the recovered log: the topic created after the force-recover is there.
    async with Admin(procs[first].address) as admin:
        [desc] = await admin.describe_topics(["after-force-recover"])
    assert desc.name == "after-force-recover"


@pytest.mark.timeout(120)
async def test_drain_moves_the_controller_leaders_vote_then_it_is_removed(
    cluster: Cluster, procs: dict[int, Node]
) -> None:
    await cluster.wait_all_alive(60)
    b = cluster.bootstrap
    leader = (await describe(b)).controller_id
    assert leader in (1, 2, 3)
    # The active controller itself drains: node 4 is promoted, leadership handed over, and
    # the drained node removed from the voters.
    out = ok(await asyncio.to_thread(tidelog, b, "cluster", "drain", str(leader)))
    assert f"node {leader} is a controller voter: its vote moves to another node" in out
    expected = {1, 2, 3, 4} - {leader}
    others = ",".join(procs[i].address for i in sorted(expected))
    await until(
        "the drained voter's vote moves to node 4", lambda: voters_are(others, expected), 30
    )
    d = await describe(others)
    assert d.controller_id != leader and d.controller_voter_change == ""
    assert not next(n for n in d.nodes if n.node_id == leader).controller_voter
    await create_topic(others, "after-drain")
    # Stopped, the former voter is removed; a live voter is not.
    line = one_error_line(await asyncio.to_thread(tidelog, others, "cluster", "remove", "4"))
    assert "node 4 is a controller voter: drain it first" in line
    procs[leader].kill()

    async def removed() -> bool:
        r = await asyncio.to_thread(tidelog, others, "cluster", "remove", str(leader))
        return r.returncode == 0

    await until(f"node {leader} is removed once stopped", removed, 30)
    d = await describe(others)
    assert leader not in {n.node_id for n in d.nodes}
    assert set(d.controller_voters) == expected


async def test_the_last_voter_is_neither_drained_nor_removed(tmp_path: Path) -> None:
    node = Node(tmp_path / "d", tmp_path / "n.log")
    node.start()
    try:
        line = one_error_line(
            await asyncio.to_thread(tidelog, node.address, "cluster", "drain", "1")
        )
        assert "node 1 is a controller voter and no other live, active node" in line
        line = one_error_line(
            await asyncio.to_thread(tidelog, node.address, "cluster", "remove", "1")
        )
        assert "node 1 is the controller's last voter" in line
    finally:
        node.kill()
