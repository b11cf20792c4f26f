"""Controller snapshots (node/controller_snapshots.py): every N applied entries a node
snapshots its controller state and truncates the controller log below the previous
snapshot; a restart restores the snapshot and replays only what follows (the state equals
the one replay built); a node that joins after the log was truncated installs the
leader's snapshot and has the metadata."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from grpc import aio

from tests.support import free_port
from tidelog.errors import StorageError
from tidelog.node.controller_snapshots import (
    CONTROLLER_SNAPSHOT_BYTES_MAX,
    SNAPSHOT_FILE,
    ControllerSnapshot,
    SnapshotFile,
    decode,
)
from tidelog.node.multiraft import RaftTiming
from tidelog.node.server import Node
from tidelog.v1 import admin_pb2, admin_pb2_grpc

TIMING = RaftTiming(tick_ms=10, heartbeat_interval_ms=30, election_timeout_ms=300)
EVERY = 8


def test_snapshot_bytes_round_trip_and_damage_is_refused(tmp_path: Path) -> None:
    snap = ControllerSnapshot(41, 3, 40, b"state" * 100)
    assert decode(snap.encode()) == snap
    data = snap.encode()
    for bad in (data[:-1], data[:10], b"XXXX" + data[4:], data[:-1] + b"x"):
        with pytest.raises(StorageError):
            decode(bad)
    with pytest.raises(StorageError, match="exceeds the snapshot bound"):
        ControllerSnapshot(1, 1, 1, b"x" * CONTROLLER_SNAPSHOT_BYTES_MAX).encode()
    f = SnapshotFile(tmp_path / SNAPSHOT_FILE)
    assert f.load() is None
    f.write(snap)
    assert f.load() == snap


async def until(what: str, check: Callable[[], Awaitable[bool]], timeout_s: float = 20) -> None:
    try:
        async with asyncio.timeout(timeout_s):
            while not await check():
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(f"not within {timeout_s} s: {what}") from None


class Nodes:
    def __init__(self, base: Path, ids: tuple[int, ...], voters: tuple[int, ...]) -> None:
        self.base = base
        self.ports = {i: free_port() for i in ids}
        self.internal = {i: free_port() for i in ids}
        self.voters = ",".join(f"{i}@127.0.0.1:{self.internal[i]}" for i in voters)
        self.nodes: dict[int, Node] = {}
        self.channels: list[aio.Channel] = []

    async def start(self, i: int) -> Node:
        node = Node(
            i,
            f"127.0.0.1:{self.ports[i]}",
            self.base / f"n{i}",
            0,
            controller_voters=self.voters,
            timing=TIMING,
            node_dead_ms=3000,
            internal_listen=f"127.0.0.1:{self.internal[i]}",
            controller_snapshot_entries=EVERY,
        )
        await node.start()
        self.nodes[i] = node
        return node

    def admin(self, i: int) -> admin_pb2_grpc.AdminAsyncStub:
        ch = aio.insecure_channel(f"127.0.0.1:{self.ports[i]}")
        self.channels.append(ch)
        return admin_pb2_grpc.AdminStub(ch)  # type: ignore[return-value]

    async def close(self) -> None:
        for ch in self.channels:
            await ch.close(None)
        await asyncio.gather(*(n.stop(1) for n in self.nodes.values()))
        self.nodes.clear()


async def churn(
    admin: admin_pb2_grpc.AdminAsyncStub, rounds: int, rf: int, prefix: str = "t"
) -> None:
    """Create and delete topics: many controller entries, a small state."""
    for r in range(rounds):
        name = f"{prefix}{r}"
        spec = admin_pb2.TopicSpec(name=name, partitions=2, replication_factor=rf)
        await admin.CreateTopics(admin_pb2.CreateTopicsRequest(topics=[spec]), timeout=20)
        if r % 3:
            await admin.DeleteTopics(admin_pb2.DeleteTopicsRequest(names=[name]), timeout=20)


def topics_of(node: Node) -> dict[str, tuple[int, list[tuple[int, ...]]]]:
    return {
        name: (t.topic_id, [p.replicas for p in t.partitions])
        for name, t in node.controller.state.topics.items()
    }


@pytest.mark.timeout(60)
async def test_a_node_restarts_from_its_snapshot_with_the_state_replay_built(
    tmp_path: Path,
) -> None:
    c = Nodes(tmp_path, (1,), (1,))
    try:
        node = await c.start(1)
        await churn(c.admin(1), 15, 1)
        controller = node.controller
        lg = controller.group.storage.log if controller.group else None
        assert lg is not None
        assert controller.snapshot_index >= 3 * EVERY
        assert lg.first_index > EVERY  # truncated below a snapshot
        before = topics_of(node)
        assert sorted(before) == sorted(f"t{r}" for r in range(15) if r % 3 == 0)
        applied = controller.applied_index
        await c.close()

        node = await c.start(1)
        controller = node.controller
        assert controller.snapshot_index > 0
        # Restored from the snapshot, the entries after it replayed: the same state.
        assert topics_of(node) == before
        assert controller.applied_index >= applied
        await churn(c.admin(1), 2, 1, prefix="u")  # and it goes on
        assert {"t0", "u0"} <= set(topics_of(node))
        # The replicas of the topics it kept are still here (none removed as orphans).
        for name in before:
            assert len(node.registry.topic(name).local) == 2
    finally:
        await c.close()


@pytest.mark.timeout(90)
async def test_a_node_joining_after_the_log_was_truncated_installs_the_snapshot(
    tmp_path: Path,
) -> None:
    """Nodes 1-3 are the voters; node 4 (a learner) starts only once their controller logs
    no longer hold the first entries, so it can only learn the metadata from a snapshot."""
    c = Nodes(tmp_path, (1, 2, 3, 4), (1, 2, 3))
    try:
        await asyncio.gather(*(c.start(i) for i in (1, 2, 3)))

        async def alive() -> bool:
            for n in c.nodes.values():
                nodes = n.controller.state.nodes
                if n.controller.leader_id <= 0 or sorted(
                    i for i, x in nodes.items() if x.alive
                ) != [1, 2, 3]:
                    return False
            return True

        await until("the controller has a leader and knows nodes 1-3 alive", alive)
        await churn(c.admin(1), 15, 3)
        leader = c.nodes[c.nodes[1].controller.leader_id]
        lg = leader.controller.group.storage.log if leader.controller.group else None
        assert lg is not None and lg.first_index > EVERY
        node4 = await c.start(4)
        expect = topics_of(leader)

        async def caught_up() -> bool:
            return topics_of(node4) == expect and 4 in leader.controller.state.nodes

        await until("node 4 has the metadata", caught_up)
        assert (tmp_path / "n4" / SNAPSHOT_FILE).exists()
        g4 = node4.controller.group
        assert g4 is not None and g4.storage.log.first_index > EVERY  # from the snapshot on
    finally:
        await c.close()
