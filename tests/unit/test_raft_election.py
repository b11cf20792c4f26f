"""Leader election: randomized timeouts, votes, pre-vote, restarts, learners."""

from __future__ import annotations

import random

import pytest

from tests.unit.raft_interaction.harness import Cluster
from tidelog.node.raft.core import RawNode
from tidelog.node.raft.limits import Config
from tidelog.node.raft.storage import MemoryStorage
from tidelog.node.raft.types import NONE, ConfState, Entry, HardState, Message, MessageKind, Role

K = MessageKind


class RecordingRand:
    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.ranges: list[tuple[int, int]] = []

    def randint(self, a: int, b: int) -> int:
        self.ranges.append((a, b))
        return self.rng.randint(a, b)


def test_election_timeout_is_randomized_in_t_to_2t() -> None:
    cfg = Config(election_timeout_ticks=10)
    rand = RecordingRand(7)
    storage = MemoryStorage(ConfState(voters=frozenset({1, 2, 3})))
    fired_after = set()
    for _ in range(200):
        node = RawNode(1, storage, rand, cfg)
        ticks = 0
        while node.role == Role.FOLLOWER:
            node.tick()
            ticks += 1
        fired_after.add(ticks)
    assert set(rand.ranges) == {(10, 19)}  # randint is inclusive: [T, 2T)
    assert min(fired_after) == 10 and max(fired_after) == 19
    assert len(fired_after) == 10


def test_same_seed_same_behaviour() -> None:
    def run(seed: int) -> list[tuple[int, int]]:
        c = Cluster([1, 2, 3], rng=random.Random(seed))
        trace = []
        for t in range(60):
            for nid in (1, 2, 3):
                c.tick(nid)
            c.stabilize()
            trace.append((t, next((n for n in (1, 2, 3) if c[n].role == Role.LEADER), 0)))
        return trace

    assert run(3) == run(3)


def test_single_voter_elects_itself_and_commits_at_once() -> None:
    c = Cluster([1])
    c[1].campaign()
    assert c[1].role == Role.LEADER and c[1].term == 1
    c[1].propose(b"a")
    c.stabilize()
    assert [e.data for e in c.nodes[1].applied] == [b"", b"a"]


def test_leader_elected_and_followers_know_it() -> None:
    c = Cluster([1, 2, 3, 4, 5])
    c.elect(3)
    for nid in (1, 2, 4, 5):
        assert c[nid].role == Role.FOLLOWER and c[nid].leader_id == 3 and c[nid].term == 1


def test_vote_granted_once_per_term() -> None:
    c = Cluster([1, 2, 3], config=Config(pre_vote=False))
    n = c[3]
    n.step(Message(K.VOTE, 1, 3, 5, log_term=0, index=0))
    n.step(Message(K.VOTE, 2, 3, 5, log_term=0, index=0))
    n.step(Message(K.VOTE, 1, 3, 5, log_term=0, index=0))  # a retry from the same candidate
    rd = n.ready()
    answers = [(m.to, m.reject) for m in rd.messages]
    assert answers == [(1, False), (2, True), (1, False)]
    assert rd.hard_state == HardState(term=5, vote=1, commit=0) and rd.must_sync


def test_vote_refused_to_a_less_up_to_date_log() -> None:
    c = Cluster([1, 2, 3], config=Config(pre_vote=False))
    c.set_log(3, [1, 2, 2], term=2)
    n = c[3]
    # Candidate's last term is older: refused even though its log is longer.
    n.step(Message(K.VOTE, 1, 3, 3, log_term=1, index=9))
    # Same last term, shorter log: refused.
    n.step(Message(K.VOTE, 2, 3, 4, log_term=2, index=2))
    # Same last term, same length: granted.
    n.step(Message(K.VOTE, 1, 3, 5, log_term=2, index=3))
    assert [(m.to, m.reject) for m in n.ready().messages] == [(1, True), (2, True), (1, False)]


def test_refusing_a_stale_candidate_keeps_the_election_timer_running() -> None:
    """Raft restarts the election timer on a leader's message or a granted vote, not on a
    higher term: a candidate too stale to win must not hold back a voter that could win
    (core sim seed 2881, no pre-vote: the stale node's requests kept restarting everyone's
    timer, and no election succeeded for 13 timeouts)."""
    c = Cluster([1, 2, 3], config=Config(pre_vote=False))
    c.set_log(3, [1, 2, 2], term=2)
    n = c[3]
    for _ in range(c.config.election_timeout_ticks - 1):
        n.tick()
    assert n.role == Role.FOLLOWER
    elapsed = n.election_elapsed
    n.step(Message(K.VOTE, 1, 3, 5, log_term=1, index=9))  # stale: refused
    rd = n.ready()
    assert [(m.to, m.reject) for m in rd.messages] == [(1, True)]
    n.advance(rd)
    assert n.term == 5 and n.role == Role.FOLLOWER and n.election_elapsed == elapsed
    ticks = 0
    while n.role == Role.FOLLOWER:
        n.tick()
        ticks += 1
    assert ticks <= c.config.election_timeout_ticks + 1  # its own timeout, not a fresh one
    assert n.role == Role.CANDIDATE and n.term == 6
    # A granted vote does restart it.
    m = c[2]
    m.step(Message(K.VOTE, 3, 2, 7, log_term=2, index=3))
    assert [(x.to, x.reject) for x in m.ready().messages] == [(3, False)]
    assert m.election_elapsed == 0
    # A candidate that sees a newer election backs off for a fresh timeout (membership seed
    # 1793: two candidates keeping their timers kept campaigning together).
    n.tick()
    n.step(Message(K.VOTE, 1, 3, 8, log_term=1, index=9))
    assert n.role == Role.FOLLOWER and n.term == 8 and n.election_elapsed == 0


def test_with_prevote_a_higher_term_vote_restarts_the_follower_timer() -> None:
    """With pre-vote a higher-term VOTE comes only from a candidate a majority found up to
    date: the follower gives it a full timeout to finish, as etcd does (the node runs so)."""
    c = Cluster([1, 2, 3], config=Config(pre_vote=True))
    c.set_log(3, [1, 2, 2], term=2)
    n = c[3]
    for _ in range(c.config.election_timeout_ticks - 1):
        n.tick()
    n.step(Message(K.VOTE, 1, 3, 5, log_term=1, index=9))  # stale: refused
    rd = n.ready()
    assert [(m.to, m.reject) for m in rd.messages] == [(1, True)]
    n.advance(rd)
    assert n.term == 5 and n.role == Role.FOLLOWER and n.election_elapsed == 0


def test_split_vote_retries_in_a_later_term() -> None:
    c = Cluster([1, 2, 3, 4], config=Config(pre_vote=False, check_quorum=False))
    c.partition([1, 2], [3, 4])
    c[1].campaign()
    c[3].campaign()
    c.stabilize()
    # Each side has 2 of 4 votes: nobody wins.
    assert all(c[n].role != Role.LEADER for n in (1, 2, 3, 4))
    c.heal()
    c[1].campaign()
    c.stabilize()
    assert c[1].role == Role.LEADER and c[1].term == 2


def test_candidate_steps_down_on_append_from_the_winner() -> None:
    c = Cluster([1, 2, 3], config=Config(pre_vote=False))
    c.elect(1)
    c[2].campaign()  # term 2, never delivered
    c.outbox.clear()
    candidate = c[2]
    assert (candidate.role, candidate.term) == (Role.CANDIDATE, 2)
    # Another candidate wins term 2 in the meantime; its append reaches 2.
    candidate.step(Message(K.APPEND, 3, 2, 2, log_term=1, index=1, commit=1))
    assert (candidate.role, candidate.leader_id) == (Role.FOLLOWER, 3)


def test_stale_term_messages_are_ignored_but_stale_leader_is_told() -> None:
    c = Cluster([1, 2, 3])
    c.elect(1)
    c[2].step(Message(K.APPEND, 1, 2, 1, log_term=1, index=1))
    node = c[2]
    node.step(Message(K.VOTE_RESP, 3, 2, 0))
    node.step(Message(K.HEARTBEAT, 3, 2, 0))
    msgs = node.ready().messages
    # The stale heartbeat is answered with our term, so its sender learns it is deposed.
    assert [(m.kind, m.to, m.term) for m in msgs][-1] == (K.APPEND_RESP, 3, 1)


def test_prevote_does_not_bump_terms_and_a_lost_prevote_keeps_term() -> None:
    c = Cluster([1, 2, 3])
    c.elect(1)
    c.isolate(3)
    for _ in range(5):
        c.tick(3, c.config.election_timeout_ticks)
        c.stabilize()
    assert c[3].term == 1 and c[3].role == Role.PRE_CANDIDATE
    assert c[1].term == 1 and c[2].term == 1


def test_prevote_granted_only_to_up_to_date_log_and_answered_in_future_term() -> None:
    c = Cluster([1, 2, 3])
    c.set_log(2, [1, 1], term=1)
    n = c[2]
    n.step(Message(K.PRE_VOTE, 1, 2, 2, log_term=1, index=1))  # behind us: refused
    n.step(Message(K.PRE_VOTE, 3, 2, 2, log_term=1, index=2))  # equal: granted
    msgs = n.ready().messages
    assert [(m.to, m.term, m.reject) for m in msgs] == [(1, 1, True), (3, 2, False)]
    assert n.term == 1 and n.vote == NONE  # a pre-vote changes nothing durable


def test_without_prevote_a_returning_node_disrupts_with_a_higher_term() -> None:
    """Contrast case for the pre-vote script: with both protections off, the isolated node
    bumps its term while away and deposes the leader when it returns."""
    c = Cluster([1, 2, 3], config=Config(pre_vote=False, check_quorum=False))
    c.elect(1)
    c.isolate(3)
    c.tick(3, 2 * c.config.election_timeout_ticks)
    c.stabilize()
    assert c[3].term == 3
    c.heal()
    c.tick(3, c.config.election_timeout_ticks)
    c.stabilize()
    assert c[1].term == 4 and c[2].term == 4
    assert not (c[1].role == Role.LEADER and c[1].term == 1)  # the healthy leader was deposed


def test_restart_keeps_term_and_vote_so_no_second_vote() -> None:
    c = Cluster([1, 2, 3], config=Config(pre_vote=False))
    c[3].step(Message(K.VOTE, 1, 3, 4, log_term=0, index=0))
    c.process_ready(3)
    c.outbox.clear()
    c.restart(3)
    assert (c[3].term, c[3].vote) == (4, 1)
    c[3].step(Message(K.VOTE, 2, 3, 4, log_term=0, index=0))
    assert [m.reject for m in c[3].ready().messages] == [True]


def test_restart_recovers_log_and_commit_from_storage() -> None:
    c = Cluster([1, 2, 3])
    c.elect(1)
    for i in range(5):
        c[1].propose(b"%d" % i)
    c.stabilize()
    c.restart(2)
    assert c[2].log.last_index() == 6 and c[2].commit_index == 6
    assert c[2].role == Role.FOLLOWER and c[2].leader_id == NONE
    c.restart(1)
    assert c[1].role == Role.FOLLOWER and c[1].term == 1


@pytest.mark.parametrize("pre_vote", [True, False])
def test_learners_never_campaign_and_are_never_asked(pre_vote: bool) -> None:
    c = Cluster([1, 2, 3], learners=[4], config=Config(pre_vote=pre_vote))
    c.tick(4, 10 * c.config.election_timeout_ticks)
    c[4].campaign()
    assert c[4].role == Role.FOLLOWER and c[4].term == 0 and not c[4].has_ready()
    c[1].campaign()
    rd = c.process_ready(1)
    assert rd is not None
    assert {m.to for m in rd.messages} == {2, 3}


def test_learner_receives_log_but_does_not_count_for_commit() -> None:
    c = Cluster([1, 2, 3], learners=[4])
    c.elect(1)
    c[1].propose(b"x")
    c.stabilize()
    assert [e.data for e in c.nodes[4].applied] == [b"", b"x"]
    c.partition([1, 4], [2, 3])
    c[1].propose(b"y")
    c.stabilize()
    assert c[4].log.last_index() == 3  # replicated to the learner...
    assert c[1].commit_index == 2  # ...which does not make a quorum with the leader


def test_single_voter_with_learner_commits_alone() -> None:
    c = Cluster([1], learners=[2])
    c[1].campaign()
    c[1].propose(b"x")
    c.stabilize()
    assert c[1].commit_index == 2 and c[2].commit_index == 2


def test_conf_state_from_storage_and_accessors() -> None:
    conf = ConfState(voters=frozenset({1, 2}), learners=frozenset({3}))
    storage = MemoryStorage(conf)
    storage.append([Entry(1, 1)])
    storage.set_hard_state(HardState(1, 2, 1))
    n = RawNode(1, storage, random.Random(0))
    assert n.conf_state == conf
    assert (n.id, n.term, n.vote, n.commit_index, n.role, n.leader_id) == (
        1,
        1,
        2,
        1,
        Role.FOLLOWER,
        NONE,
    )
