"""ReadIndex: linearizable reads confirmed by a heartbeat round, never by a clock."""

from __future__ import annotations

import pytest

from tests.unit.raft_interaction.harness import Cluster, MaxRand
from tidelog.node.raft.errors import NotRaftLeader, ProposalDropped
from tidelog.node.raft.limits import Config
from tidelog.node.raft.types import MessageKind, ReadState

K = MessageKind


def test_leader_read_waits_for_a_quorum_heartbeat_round() -> None:
    c = Cluster([1, 2, 3])
    c.elect(1)
    c[1].propose(b"a")
    c.stabilize()
    c[1].read_index(b"r1")
    rd = c.process_ready(1)
    assert rd is not None and not rd.read_states
    beats = [m for m in rd.messages if m.kind == K.HEARTBEAT]
    assert {m.to for m in beats} == {2, 3} and {m.context for m in beats} == {b"r1"}
    c.stabilize()
    assert c.nodes[1].read_states == [ReadState(2, b"r1")]


def test_reads_in_one_ready_share_one_round() -> None:
    c = Cluster([1, 2, 3])
    c.elect(1)
    for ctx in (b"a", b"b", b"c"):
        c[1].read_index(ctx)
    rd = c.process_ready(1)
    assert rd is not None
    assert [m.context for m in rd.messages if m.kind == K.HEARTBEAT] == [b"c", b"c"]
    c.stabilize()
    assert [rs.context for rs in c.nodes[1].read_states] == [b"a", b"b", b"c"]


def test_partitioned_stale_leader_cannot_answer() -> None:
    c = Cluster([1, 2, 3], rngs={3: MaxRand()})
    c.elect(1)
    c.isolate(1)
    c[1].read_index(b"stale")
    c.stabilize()
    assert c.nodes[1].read_states == []
    # Meanwhile the majority elects a leader and commits a write the stale one never saw.
    c.tick(3, c.config.election_timeout_ticks)
    c.tick(2, c.config.election_timeout_ticks)
    c.stabilize()
    c[2].propose(b"new")
    c.stabilize()
    c.heal()
    c.stabilize()
    assert c.nodes[1].read_states == []  # dropped on stepping down; the client retries


def test_follower_read_is_forwarded_and_answered_with_the_leader_index() -> None:
    c = Cluster([1, 2, 3])
    c.elect(1)
    c[1].propose(b"a")
    c.stabilize()
    c[3].read_index(b"f")
    c.stabilize()
    assert c.nodes[3].read_states == [ReadState(2, b"f")]
    with pytest.raises(NotRaftLeader):
        Cluster([1, 2, 3])[2].read_index(b"nobody")


def test_read_waits_until_the_new_leader_commits_in_its_term() -> None:
    c = Cluster([1, 2, 3], rngs={3: MaxRand()})
    c.elect(1)
    c[1].propose(b"a")
    c.stabilize()
    c.isolate(1)
    c.tick(3, c.config.election_timeout_ticks)
    c.tick(2, c.config.election_timeout_ticks)
    # 2 won (votes and appends flow) but hold back every append answer for a moment.
    for _ in range(4):
        c.round()
    assert c[2].role.name == "LEADER"
    c.partition([2], [1, 3])
    c.round()
    c[2].read_index(b"early")
    assert c[2].log.term(c[2].commit_index) == 1  # nothing of term 2 committed yet
    rd = c.process_ready(2)
    assert rd is None or not any(m.context for m in rd.messages)  # no read round yet
    c.heal()
    # Lost APPENDs are retried after a heartbeat round (the first one skips their recipients).
    c.tick(2, 2 * c.config.heartbeat_interval_ticks)
    c.stabilize()
    assert c[2].commit_index == 3
    assert c.nodes[2].read_states == [ReadState(3, b"early")]


def test_single_voter_answers_at_once_and_pending_reads_are_bounded() -> None:
    solo = Cluster([1])
    solo[1].campaign()
    solo[1].read_index(b"x")
    rd = solo.process_ready(1)
    assert rd is not None and rd.read_states == (ReadState(1, b"x"),)

    c = Cluster([1, 2, 3], config=Config(max_pending_reads=2))
    c.elect(1)
    c.isolate(1)
    c[1].read_index(b"1")
    c[1].read_index(b"2")
    with pytest.raises(ProposalDropped, match="max_pending_reads"):
        c[1].read_index(b"3")


def test_a_first_leader_of_an_empty_log_answers_reads_before_any_write() -> None:
    """Without the empty entry of a new term (always_append_empty off, as a new partition's
    first leader), an empty log's commit index 0 is already the group's: reads are answered
    after one heartbeat round instead of waiting for the first write."""
    c = Cluster([1, 2, 3], config=Config(always_append_empty=False))
    c.elect(1)
    assert c[1].log.last_index() == 0
    c[1].read_index(b"empty")
    c.stabilize()
    assert c.nodes[1].read_states == [ReadState(0, b"empty")]
