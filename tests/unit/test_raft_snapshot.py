"""Snapshots: a follower that needs compacted entries gets the application's snapshot."""

from __future__ import annotations

import random

from tests.unit.raft_interaction.harness import Cluster
from tidelog.node.raft.core import RawNode
from tidelog.node.raft.progress import ProgressState
from tidelog.node.raft.storage import MemoryStorage
from tidelog.node.raft.types import (
    ConfState,
    Entry,
    HardState,
    Message,
    MessageKind,
    Snapshot,
    SnapshotMeta,
)

K = MessageKind


def cluster_with_lagging_follower(compact_to: int) -> Cluster:
    """1 leads and has committed 1..11; 3 was away and has only entry 1; 1 compacted its log
    up to ``compact_to`` (retention) after snapshotting its state there."""
    c = Cluster([1, 2, 3])
    c.elect(1)
    c.isolate(3)
    for i in range(10):
        c[1].propose(b"%d" % i)
        c.stabilize()
    storage = c.nodes[1].storage
    storage.create_snapshot(compact_to, b"state up to %d" % compact_to)
    storage.compact(compact_to)
    c.heal()
    return c


def test_follower_behind_compaction_point_gets_snapshot_then_entries() -> None:
    c = cluster_with_lagging_follower(compact_to=8)
    c.tick(1, 2 * c.config.heartbeat_interval_ticks)
    trace = c.stabilize()
    assert any(" SNAPSHOT " in line for line in trace)
    s3 = c.nodes[3].storage
    assert s3.first_index() == 9 and s3.last_index() == 11
    assert c[3].commit_index == 11 and c[3].applied_index == 11
    # The follower applied the snapshot, then only the entries after it.
    assert [e.index for e in c.nodes[3].applied] == [1, 9, 10, 11]
    assert c[1].progress(3).state == ProgressState.REPLICATE  # type: ignore[union-attr]
    c[1].propose(b"after")
    c.stabilize()
    assert c.log_of(3)[-1].data == b"after"


def test_snapshot_ready_orders_install_before_entries() -> None:
    c = cluster_with_lagging_follower(compact_to=8)
    c.tick(1, 2 * c.config.heartbeat_interval_ticks)
    for _ in range(20):
        for nid in (1, 2):
            c.process_ready(nid)
        c.deliver()
        if c[3].has_ready():
            rd = c[3].ready()
            if rd.snapshot is not None:
                assert rd.snapshot.meta.index == 8 and rd.snapshot.data == b"state up to 8"
                assert rd.must_sync and rd.committed == ()
                c[3].advance(rd)
                return
            c.nodes[3].storage.append(rd.entries)
            if rd.hard_state is not None:
                c.nodes[3].storage.set_hard_state(rd.hard_state)
            c.outbox.extend(rd.messages)
            c[3].advance(rd)
    raise AssertionError("no snapshot reached node 3")


def test_lost_snapshot_is_retried() -> None:
    c = cluster_with_lagging_follower(compact_to=8)
    c.tick(1, 2 * c.config.heartbeat_interval_ticks)
    # Deliver until the leader sends the snapshot, then lose it.
    for _ in range(10):
        c.round()
        if c[1].progress(3).state == ProgressState.SNAPSHOT:  # type: ignore[union-attr]
            break
    c.process_ready(1)
    c.outbox = [m for m in c.outbox if m.kind != K.SNAPSHOT]
    c.stabilize()
    assert c[3].commit_index < 8
    for _ in range(3 * c.config.election_timeout_ticks):
        c.tick(1)
        c.stabilize()
    assert c[3].commit_index == 11


def test_failed_snapshot_report_falls_back_to_probe() -> None:
    c = cluster_with_lagging_follower(compact_to=8)
    c.tick(1, 2 * c.config.heartbeat_interval_ticks)
    for _ in range(10):
        c.round()
        if c[1].progress(3).state == ProgressState.SNAPSHOT:  # type: ignore[union-attr]
            break
    c[1].report_snapshot(3, ok=False)
    pr = c[1].progress(3)
    assert pr is not None and pr.state == ProgressState.PROBE and pr.is_paused()


def test_follower_ignores_stale_snapshot_and_fast_forwards_on_matching_log() -> None:
    storage = MemoryStorage(ConfState(voters=frozenset({1, 2})))
    storage.append([Entry(1, i) for i in range(1, 6)])
    storage.set_hard_state(HardState(1, 1, 3))
    node = RawNode(2, storage, random.Random(0))
    conf = ConfState(voters=frozenset({1, 2}))
    stale = Snapshot(SnapshotMeta(2, 1, conf), b"")
    node.step(Message(K.SNAPSHOT, 1, 2, 1, snapshot=stale))
    matching = Snapshot(SnapshotMeta(5, 1, conf), b"")
    node.step(Message(K.SNAPSHOT, 1, 2, 1, snapshot=matching))
    rd = node.ready()
    assert rd.snapshot is None  # our log already has entry 5 of term 1: nothing to install
    assert [(m.kind, m.index) for m in rd.messages] == [(K.APPEND_RESP, 3), (K.APPEND_RESP, 5)]
    assert node.commit_index == 5


def test_snapshot_not_sent_while_the_application_has_none() -> None:
    c = Cluster([1, 2, 3])
    c.elect(1)
    c.isolate(3)
    for _ in range(4):
        c[1].propose(b"x")
        c.stabilize()
    c.nodes[1].storage.compact(3)  # retention ran before any snapshot was taken
    c.heal()
    c.tick(1, 2 * c.config.heartbeat_interval_ticks)
    assert not any(" SNAPSHOT " in line for line in c.stabilize())
    c.nodes[1].storage.create_snapshot(5, b"late")
    c.tick(1, 2 * c.config.heartbeat_interval_ticks)
    c.stabilize()
    assert c[3].commit_index == 5


def test_restart_from_installed_snapshot() -> None:
    c = cluster_with_lagging_follower(compact_to=8)
    c.tick(1, 2 * c.config.heartbeat_interval_ticks)
    c.stabilize()
    c.restart(3)
    assert c[3].log.first_index() == 9 and c[3].commit_index == 11
    assert c[3].applied_index == 11
