"""Quiescence (node/multiraft.py): an idle group whose every replica holds everything goes
quiet (no ticks, no heartbeats) on all its nodes, wakes for the next write, and wakes to
elect when its leader is gone: told by the node (a dead node, a broken stream), or on its
own after a long silence."""

from __future__ import annotations

import asyncio

import pytest

from tests.unit.test_multiraft import Cluster, cluster
from tidelog.node.multiraft import MultiRaft
from tidelog.node.raft.types import MessageKind, Role

__all__ = ["cluster"]  # the fixture, shared with test_multiraft.py

pytestmark = pytest.mark.timeout(60)


def rafts(c: Cluster) -> dict[int, MultiRaft]:
    return c.net.nodes


async def until(what: str, check: object, timeout_s: float = 10) -> None:
    assert callable(check)
    async with asyncio.timeout(timeout_s):
        while not check():
            await asyncio.sleep(0.01)


async def quiet_cluster(c: Cluster) -> int:
    for raft in rafts(c).values():
        raft.quiesce = True
    for n in (1, 2, 3):
        c.add(n)
    rafts(c)[1].campaign(c.parts[1].group)  # type: ignore[arg-type]
    leader = await c.leader()
    for i in range(5):
        await c.produce(leader, b"v%d" % i)
    await until("every node quiet", lambda: all(r.quiet_groups == 1 for r in rafts(c).values()))
    return leader.group.raw.id  # type: ignore[union-attr]


async def test_an_idle_group_goes_quiet_and_sends_nothing(cluster: Cluster) -> None:
    leader_id = await quiet_cluster(cluster)
    sent: list[MessageKind] = []
    original = cluster.net.deliver

    def counting(frm: int, to: int, group: int, msg: object) -> None:
        sent.append(msg.kind)  # type: ignore[attr-defined]
        original(frm, to, group, msg)  # type: ignore[arg-type]

    cluster.net.deliver = counting  # type: ignore[method-assign]
    await asyncio.sleep(1.0)  # 100 ticks, 50 heartbeat intervals
    assert sent == []
    assert all(p.role == Role.LEADER for p in [cluster.parts[leader_id]])
    # The next write wakes the group and commits as usual; then it goes quiet again.
    leader = cluster.parts[leader_id]
    base, _ = await cluster.produce(leader, b"after")
    assert base == 5
    await until(
        "every replica has it", lambda: all(p.high_watermark == 6 for p in cluster.parts.values())
    )
    await until("quiet again", lambda: all(r.quiet_groups == 1 for r in rafts(cluster).values()))


async def test_a_dead_leader_wakes_its_quiet_followers_to_elect(cluster: Cluster) -> None:
    leader_id = await quiet_cluster(cluster)
    cluster.net.down.add(leader_id)
    others = [n for n in (1, 2, 3) if n != leader_id]
    await asyncio.sleep(0.6)  # three election timeouts: quiet followers do not campaign
    assert all(cluster.parts[n].role == Role.FOLLOWER for n in others)
    for n in others:  # what the node does when the controller marks the leader's node dead
        assert rafts(cluster)[n].wake_led_by(leader_id) == 1
    new = await cluster.leader(set(others))
    assert new.group.raw.id != leader_id  # type: ignore[union-attr]
    base, _ = await cluster.produce(new, b"after failover")
    assert base >= 5


async def test_a_quiet_follower_wakes_by_itself_after_a_long_silence(cluster: Cluster) -> None:
    for raft in rafts(cluster).values():
        raft.quiet_max_ticks = 60  # 0.6 s here; 30 election timeouts by default
    leader_id = await quiet_cluster(cluster)
    cluster.net.down.add(leader_id)
    others = {n for n in (1, 2, 3) if n != leader_id}
    new = await cluster.leader(others)
    assert new.group.raw.id in others  # type: ignore[union-attr]


async def test_a_follower_that_misses_writes_keeps_the_leader_awake(cluster: Cluster) -> None:
    leader_id = await quiet_cluster(cluster)
    follower = next(n for n in (1, 2, 3) if n != leader_id)
    cluster.net.down.add(follower)
    leader = cluster.parts[leader_id]
    await cluster.produce(leader, b"two of three")
    await asyncio.sleep(0.5)
    # The leader cannot go quiet while a member lacks entries: it keeps sending to it.
    assert rafts(cluster)[leader_id].quiet_groups == 0
    cluster.net.down.discard(follower)
    await until("caught up", lambda: cluster.parts[follower].high_watermark == 6)
    await until("quiet again", lambda: all(r.quiet_groups == 1 for r in rafts(cluster).values()))


async def test_a_quiet_leader_that_loses_its_majority_steps_down(cluster: Cluster) -> None:
    """Its followers die while the group is quiet: told by the node, the leader ticks again,
    does not go quiet while they are away, and check-quorum steps it down."""
    leader_id = await quiet_cluster(cluster)
    others = [n for n in (1, 2, 3) if n != leader_id]
    for n in others:
        cluster.net.down.add(n)
    raft = rafts(cluster)[leader_id]
    for n in others:
        raft.peer_gone(n)
    assert raft.quiet_groups == 0
    await until("the leader steps down", lambda: cluster.parts[leader_id].role != Role.LEADER, 10)
    assert raft.quiet_groups == 0
