"""Leadership transfer (TimeoutNow)."""

from __future__ import annotations

import pytest

from tests.unit.raft_interaction.harness import Cluster
from tidelog.node.raft.errors import NotRaftLeader, ProposalDropped
from tidelog.node.raft.types import MessageKind, Role

K = MessageKind


def test_transfer_to_caught_up_follower_sends_timeout_now_at_once() -> None:
    c = Cluster([1, 2, 3])
    c.elect(1)
    c[1].transfer_leadership(2)
    rd = c.process_ready(1)
    assert rd is not None and [(m.kind, m.to) for m in rd.messages] == [(K.TIMEOUT_NOW, 2)]
    c.stabilize()
    assert c[2].role == Role.LEADER and c[2].term == 2


def test_transfer_waits_for_catch_up_and_drops_proposals_meanwhile() -> None:
    c = Cluster([1, 2, 3])
    c.elect(1)
    c.isolate(3)
    for _ in range(3):
        c[1].propose(b"x")
    c.stabilize()
    c.heal()
    c[1].transfer_leadership(3)
    assert c[1].lead_transferee == 3
    with pytest.raises(ProposalDropped, match="transfer"):
        c[1].propose(b"y")
    c.stabilize()
    assert c[3].role == Role.LEADER
    assert c[3].log.last_index() == 5  # 4 old entries + its own EMPTY


def test_transfer_aborted_after_an_election_timeout() -> None:
    c = Cluster([1, 2, 3])
    c.elect(1)
    c.isolate(3)
    c[1].transfer_leadership(3)
    c.stabilize()
    c.tick(1, c.config.election_timeout_ticks - 1)
    assert c[1].lead_transferee == 3
    c.tick(1)
    assert c[1].lead_transferee == 0 and c[1].role == Role.LEADER
    c[1].propose(b"accepted again")


def test_transfer_to_self_non_voter_or_learner() -> None:
    c = Cluster([1, 2, 3], learners=[4])
    c.elect(1)
    c[1].transfer_leadership(1)
    assert c[1].lead_transferee == 0
    with pytest.raises(ValueError, match="not a voter"):
        c[1].transfer_leadership(4)
    with pytest.raises(ValueError, match="not a voter"):
        c[1].transfer_leadership(9)


def test_new_transfer_replaces_the_pending_one() -> None:
    c = Cluster([1, 2, 3])
    c.elect(1)
    c.isolate(3)
    c[1].transfer_leadership(3)
    c[1].transfer_leadership(2)
    assert c[1].lead_transferee == 2
    c.heal()
    c.stabilize()
    assert c[2].role == Role.LEADER


def test_transfer_forwarded_by_follower_and_refused_without_leader() -> None:
    c = Cluster([1, 2, 3])
    with pytest.raises(NotRaftLeader):
        c[2].transfer_leadership(3)
    c.elect(1)
    c[2].transfer_leadership(3)
    c.stabilize()
    assert c[3].role == Role.LEADER


def test_timeout_now_is_ignored_by_learner() -> None:
    c = Cluster([1, 2, 3], learners=[4])
    c.elect(1)
    from tidelog.node.raft.types import Message

    c[4].step(Message(K.TIMEOUT_NOW, 1, 4, 1))
    assert c[4].role == Role.FOLLOWER and not c[4].ready().messages
