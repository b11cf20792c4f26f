"""Check-quorum: a leader without a majority steps down; followers keep a leader lease."""

from __future__ import annotations

import pytest

from tests.unit.raft_interaction.harness import Cluster, MaxRand
from tidelog.node.raft.errors import NotRaftLeader
from tidelog.node.raft.limits import Config
from tidelog.node.raft.types import NONE, Message, MessageKind, Role

K = MessageKind


def test_leader_steps_down_within_two_election_timeouts_without_quorum() -> None:
    c = Cluster([1, 2, 3, 4, 5])
    c.elect(1)
    c.partition([1, 2], [3, 4, 5])
    t = c.config.election_timeout_ticks
    ticks = 0
    while c[1].role == Role.LEADER:
        c.tick(1)
        c.stabilize()
        ticks += 1
        assert ticks <= 2 * t
    assert c[1].role == Role.FOLLOWER and c[1].leader_id == NONE and c[1].term == 1
    with pytest.raises(NotRaftLeader):
        c[1].propose(b"lost write")


def test_leader_with_quorum_stays() -> None:
    c = Cluster([1, 2, 3, 4, 5])
    c.elect(1)
    c.partition([1, 2, 3], [4, 5])
    for _ in range(10 * c.config.election_timeout_ticks):
        c.tick(1)
        c.stabilize()
    assert c[1].role == Role.LEADER
    c[1].propose(b"x")
    c.stabilize()
    assert c[1].commit_index == 2


def test_learner_answers_do_not_keep_a_leader_alive() -> None:
    c = Cluster([1, 2, 3], learners=[4, 5])
    c.elect(1)
    c.partition([1, 4, 5], [2, 3])
    for _ in range(2 * c.config.election_timeout_ticks):
        c.tick(1)
        c.stabilize()
    assert c[1].role == Role.FOLLOWER


def test_without_check_quorum_a_minority_leader_lingers() -> None:
    c = Cluster([1, 2, 3], config=Config(check_quorum=False))
    c.elect(1)
    c.isolate(1)
    for _ in range(5 * c.config.election_timeout_ticks):
        c.tick(1)
        c.stabilize()
    assert c[1].role == Role.LEADER  # the contrast: it would accept (never committed) writes


def test_follower_in_lease_ignores_higher_term_votes() -> None:
    c = Cluster([1, 2, 3])
    c.elect(1)
    c[2].step(Message(K.VOTE, 3, 2, 5, log_term=1, index=1))
    c[2].step(Message(K.PRE_VOTE, 3, 2, 5, log_term=1, index=1))
    assert c[2].term == 1 and not c[2].ready().messages
    # Past the lease (an election timeout without the leader), the vote is considered.
    c.tick(2, c.config.election_timeout_ticks - 1)
    c[2].election_elapsed = c.config.election_timeout_ticks  # no campaign, lease expired
    c[2].step(Message(K.VOTE, 3, 2, 5, log_term=1, index=1))
    assert c[2].term == 5 and c[2].vote == 3


def test_stale_leader_learns_new_term_from_append_answer() -> None:
    c = Cluster([1, 2, 3], rngs={3: MaxRand()})
    c.elect(1)
    c.isolate(1)
    c.tick(3, c.config.election_timeout_ticks)  # 3's lease on 1 expires
    c.tick(2, c.config.election_timeout_ticks)
    c.stabilize()
    assert c[2].role == Role.LEADER and c[2].term == 2
    c.heal()
    c[1].propose(b"stale")
    c.stabilize()  # 2 and 3 answer the term-1 APPEND with term 2
    assert c[1].role == Role.FOLLOWER and c[1].term == 2
    assert b"stale" not in [e.data for e in c.nodes[1].applied]
