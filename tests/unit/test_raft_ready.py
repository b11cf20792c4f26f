"""The Ready contract, has_ready, and the cost of an idle follower."""

from __future__ import annotations

import tracemalloc

import pytest

from tests.unit.raft_interaction.harness import Cluster
from tidelog.node.raft.limits import Config
from tidelog.node.raft.types import HardState, Message, MessageKind, Role, SoftState

K = MessageKind


def test_idle_follower_has_no_ready_and_ticks_without_allocating() -> None:
    c = Cluster([1, 2, 3])
    c.elect(1)
    follower = c[2]
    assert not follower.has_ready()
    follower.tick()  # warm up
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        for _ in range(c.config.election_timeout_ticks - 2):
            follower.tick()
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    grown = [
        s
        for s in after.compare_to(before, "filename")
        if s.size_diff > 0 and "raft" in str(s.traceback)
    ]
    assert grown == []
    assert not follower.has_ready()


def test_candidate_vote_is_persisted_in_the_ready_that_carries_vote_requests() -> None:
    c = Cluster([1, 2, 3], config=Config(pre_vote=False))
    c[1].campaign()
    rd = c[1].ready()
    assert rd.hard_state == HardState(term=1, vote=1, commit=0) and rd.must_sync
    assert {(m.kind, m.to) for m in rd.messages} == {(K.VOTE, 2), (K.VOTE, 3)}
    assert rd.soft_state == SoftState(0, Role.CANDIDATE)


def test_commit_only_change_needs_no_sync() -> None:
    c = Cluster([1, 2, 3])
    c.elect(1)
    c[1].propose(b"x")
    c.process_ready(1)
    c.deliver()
    c.process_ready(2)
    c.process_ready(3)
    c.deliver()  # acks reach 1: commit advances
    rd = c[1].ready()
    assert rd.hard_state is not None and rd.hard_state.commit == 2
    assert not rd.entries and not rd.must_sync
    assert [e.data for e in rd.committed] == [b"x"]


def test_ready_twice_without_advance_is_refused() -> None:
    c = Cluster([1])
    c[1].campaign()
    c[1].ready()
    assert not c[1].has_ready()
    with pytest.raises(AssertionError, match="advance"):
        c[1].ready()


def test_steps_between_ready_and_advance_are_kept() -> None:
    c = Cluster([1, 2, 3])
    c.elect(1)
    follower = c[2]
    follower.step(Message(K.APPEND, 1, 2, 1, log_term=1, index=1, entries=(), commit=1))
    c[1].propose(b"a")
    rd_leader = c.process_ready(1)
    assert rd_leader is not None
    app = next(m for m in rd_leader.messages if m.to == 2)
    rd = follower.ready()
    follower.step(app)  # arrives while the driver is still persisting rd
    follower.advance(rd)
    rd2 = follower.ready()
    assert [e.data for e in rd2.entries] == [b"a"]  # not lost, not marked stable early


def test_committed_entries_per_ready_are_bounded() -> None:
    cfg = Config(max_msg_bytes=1000, max_committed_bytes_per_ready=1000)
    c = Cluster([1], config=cfg)
    c[1].campaign()
    for _ in range(10):
        c[1].propose(b"x" * 300)
    sizes = []
    while c[1].has_ready():
        rd = c.process_ready(1)
        assert rd is not None
        sizes.append(sum(e.size_bytes for e in rd.committed))
        assert rd.committed or not sizes[-1]
    assert sum(sizes) == 16 + 10 * 316  # the EMPTY entry and ten proposals, all applied
    assert max(sizes) <= 1000 and len(sizes) == 4


def test_messages_wait_for_ready() -> None:
    """Nothing leaves the core except through ready(): step() only queues."""
    c = Cluster([1, 2, 3])
    c[2].step(Message(K.VOTE, 1, 2, 1, log_term=0, index=0))
    assert c[2].has_ready()
    rd = c[2].ready()
    assert rd.hard_state == HardState(1, 1, 0) and rd.must_sync
    assert [(m.kind, m.reject) for m in rd.messages] == [(K.VOTE_RESP, False)]
