"""Moving a partition's replicas with logged membership changes: four MultiRaft drivers in
one event loop over an in-memory network, real partition logs, a producer running while
the group goes from voters {1, 2, 3} to {2, 3, 4} (the leader among those leaving)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.unit.node_fakes import InstrumentedLog
from tests.unit.test_multiraft import CONFIG, TIMING, Net, values_of
from tidelog.config import TopicConfig
from tidelog.errors import TidelogError
from tidelog.node.membership import next_step
from tidelog.node.metastore import MetaStore
from tidelog.node.metrics import NodeMetrics
from tidelog.node.multiraft import MultiRaft
from tidelog.node.partition import Partition
from tidelog.node.raft.types import ConfChangeKind, ConfState, EntryKind, Role
from tidelog.node.replica_storage import HardStateStore
from tidelog.records import encode_batch, validate_batches

GROUP = 7
K = ConfChangeKind


@dataclass
class Moves:
    dir: Path
    net: Net
    stores: dict[int, MetaStore]
    parts: dict[int, Partition] = field(default_factory=dict)
    confs: list[tuple[int, frozenset[int], frozenset[int]]] = field(default_factory=list)

    def open(self, node: int, replicas: frozenset[int]) -> Partition:
        config = TopicConfig.from_overrides({})
        lg = InstrumentedLog(self.dir / f"n{node}" / "log", config)
        p = Partition("t", 0, lg, config, group_id=GROUP, replicas=sorted(replicas))
        raft = self.net.nodes[node]
        learners = frozenset() if node in replicas else frozenset({node})
        group = raft.add_group(
            GROUP,
            lg,
            ConfState(voters=replicas, learners=learners),
            p,
            durable=True,
            config=CONFIG,
            logged_conf=True,
        )
        p.attach(group, raft)
        p.on_conf_changed = lambda _t, _p, v, lrn, n=node: self.confs.append((n, v, lrn))
        self.parts[node] = p
        return p

    async def leader(self, among: set[int]) -> Partition:
        async with asyncio.timeout(10):
            while True:
                leaders = [n for n in among if n in self.parts and self.parts[n].serving]
                if len(leaders) == 1:
                    return self.parts[leaders[0]]
                await asyncio.sleep(0.01)


@pytest.fixture
async def moves(tmp_path: Path) -> AsyncIterator[Moves]:
    net = Net()
    stores = {}
    for n in (1, 2, 3, 4):
        stores[n] = MetaStore(tmp_path / f"n{n}" / "meta")
        raft = MultiRaft(n, HardStateStore(stores[n]), NodeMetrics(), TIMING, sender=net.sender(n))
        net.nodes[n] = raft
        raft.start()
    yield Moves(tmp_path, net, stores)
    for raft in net.nodes.values():
        await raft.stop()
    for s in stores.values():
        s.close()


def test_next_step_order() -> None:
    conf = ConfState(frozenset({1, 2, 3}))
    target = frozenset({2, 3, 4})
    assert next_step(conf, target, 1, lambda _n: True) == (K.ADD_LEARNER, 4)
    conf = ConfState(frozenset({1, 2, 3}), frozenset({4}))
    assert next_step(conf, target, 1, lambda _n: False) is None  # 4 still catching up
    assert next_step(conf, target, 1, lambda _n: True) == (K.PROMOTE, 4)
    conf = ConfState(frozenset({1, 2, 3, 4}))
    assert next_step(conf, target, 1, lambda _n: True) == (None, 2)  # hand over first
    assert next_step(conf, target, 2, lambda _n: True) == (K.REMOVE, 1)
    assert next_step(ConfState(frozenset({2, 3, 4})), target, 2, lambda _n: True) is None
    # A learner outside the target goes before anything else is removed.
    conf = ConfState(frozenset({1, 2, 3}), frozenset({5}))
    assert next_step(conf, frozenset({1, 2, 3}), 1, lambda _n: True) == (K.REMOVE, 5)


@pytest.mark.timeout(60)
async def test_move_under_a_producer_loses_nothing(moves: Moves) -> None:
    old = frozenset({1, 2, 3})
    for n in sorted(old):
        moves.open(n, old)
    moves.net.nodes[1].campaign(moves.parts[1].group)  # type: ignore[arg-type]
    leader = await moves.leader({1, 2, 3})
    acked: list[bytes] = []
    stop = asyncio.Event()

    async def produce() -> None:
        i = 0
        while not stop.is_set():
            value = b"r%d" % i
            i += 1
            try:
                p = await moves.leader({1, 2, 3, 4})
                buf = encode_batch([value])
                _base, _last, index, term = p.propose(buf, validate_batches(buf))
                await p.wait_committed(index, term, 2)
                acked.append(value)
            except (TidelogError, TimeoutError):
                await asyncio.sleep(0.01)

    producer = asyncio.create_task(produce())
    await asyncio.sleep(0.3)
    # The node opens a replica for the target (a learner: empty log, no vote); every replica
    # is told the target.
    new = moves.open(4, old)
    assert new.conf_state.learners == {4}
    target = frozenset({2, 3, 4})
    for p in moves.parts.values():
        p.set_target_replicas(target)
    saw_progress = False
    async with asyncio.timeout(30):
        while True:
            leader = await moves.leader({1, 2, 3, 4})
            progress = leader.move_progress()
            if progress:
                saw_progress = True
                # Bytes of the leader's log: what the learner holds and what it lacks.
                size = leader.log.size_bytes
                assert all(c + left == size and left >= 0 for c, left in progress.values())
            if leader.conf_state == ConfState(target) and not leader.group.raw.conf_change_pending:  # type: ignore[union-attr]
                break
            await asyncio.sleep(0.02)
    await asyncio.sleep(0.3)
    stop.set()
    await producer
    assert len(acked) > 10
    leader = await moves.leader({2, 3, 4})
    assert leader.group is not None and leader.group.raw.id in target
    # Every replica of the target holds every acknowledged record, in order.
    await asyncio.sleep(0.3)
    for n in sorted(target):
        values = values_of(moves.parts[n])
        assert [v for v in values if v in set(acked)] == acked, n
        assert moves.parts[n].conf_state == ConfState(target), n
    # Node 1 left: it no longer receives anything (it is no member of the leader's config).
    assert leader.group.raw.progress(1) is None
    assert moves.parts[1].group is not None
    end1 = moves.parts[1].group.raw.last_index()
    await asyncio.sleep(0.3)
    assert moves.parts[1].group.raw.last_index() == end1
    assert moves.parts[1].group.raw.role != Role.LEADER
    # Every replica reported the committed configurations, ending with the target.
    finals = {n: (v, lrn) for n, v, lrn in moves.confs}
    for n in sorted(target):
        assert finals[n] == (target, frozenset()), n
    assert any(lrn == {4} for _n, _v, lrn in moves.confs)
    raw = leader.group.raw
    kinds = [e.kind for e in leader.group.storage.entries(1, raw.last_index() + 1, 1 << 30)]
    assert kinds.count(EntryKind.CONFIG) == 3  # add learner, promote, remove
    assert saw_progress


@pytest.mark.timeout(60)
async def test_configuration_survives_a_restart(moves: Moves, tmp_path: Path) -> None:
    old = frozenset({1, 2, 3})
    for n in sorted(old):
        moves.open(n, old)
    moves.net.nodes[1].campaign(moves.parts[1].group)  # type: ignore[arg-type]
    await moves.leader({1, 2, 3})
    moves.open(4, old)
    for p in moves.parts.values():
        p.set_target_replicas(frozenset({1, 2, 3, 4}))
    async with asyncio.timeout(20):
        # Reported once stored (the core takes it into force a little earlier).
        while (4, frozenset({1, 2, 3, 4}), frozenset()) not in moves.confs:
            await asyncio.sleep(0.02)
    # Restart node 4's group: the stored configuration wins over the initial one given.
    part = moves.parts.pop(4)
    await moves.net.nodes[4].remove_group(GROUP, forget=False)
    part.log.close()
    again = moves.open(4, old)
    assert again.conf_state == ConfState(frozenset({1, 2, 3, 4}))
