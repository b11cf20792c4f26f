"""raft/guard.py: what a member refuses before its core steps a message (issue 9, A3).

Each forged message is one a hostile peer sent in the issue's probes; the check is tested on
real cores (the interaction harness), then the state the forgery would have changed is shown
unchanged after the driver refuses it (tests/unit/test_multiraft.py covers the driver)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from tests.unit.raft_interaction.harness import Cluster
from tidelog.node.raft.core import RawNode
from tidelog.node.raft.guard import MAX_TERM_GAP, Refusal, refusal
from tidelog.node.raft.types import (
    ConfState,
    Entry,
    Message,
    MessageKind,
    Role,
    Snapshot,
    SnapshotMeta,
)

K = MessageKind


def elected() -> Cluster:
    c = Cluster([1, 2, 3])
    c.elect(1)
    c[1].propose(b"x")
    c.stabilize()
    return c


def test_messages_of_a_healthy_group_pass() -> None:
    """Every message a real exchange produces passes the guard (the harness delivers them
    all; here each is checked on the way)."""
    c = Cluster([1, 2, 3])
    c.elect(1)
    assert c[1].role == Role.LEADER
    checked = 0
    for _ in range(3):
        c[1].propose(b"v")
        for _round in range(50):
            pending: list[Message] = []
            for nid in (1, 2, 3):
                rd = c.process_ready(nid)
                if rd is not None:
                    pending.extend(rd.messages)
            if not pending:
                break
            for m in pending:
                assert refusal(c[m.to], m) is None, m
                c[m.to].step(m)
                checked += 1
    assert checked > 10


def test_a_sender_outside_the_configuration_is_refused() -> None:
    c = elected()
    raw = c[2]
    term = raw.term
    forged = Message(K.APPEND, 99, 2, term + 1, log_term=term, index=2, commit=3,
                     entries=(Entry(term + 1, 3, b"injected"),))  # fmt: skip
    assert refusal(raw, forged) is Refusal.NOT_MEMBER
    for kind in K:
        assert refusal(raw, Message(kind, 99, 2, term)) is Refusal.NOT_MEMBER
    assert refusal(raw, Message(K.VOTE, -1, 2, term + 1)) is Refusal.NOT_MEMBER


def test_a_learner_is_a_member() -> None:
    raw = elected()[1]
    raw.add_learner(4)
    assert refusal(raw, Message(K.APPEND_RESP, 4, 1, raw.term, index=1)) is None


def test_a_term_far_beyond_the_groups_is_refused() -> None:
    c = elected()
    raw = c[2]
    term = raw.term
    assert refusal(raw, Message(K.HEARTBEAT, 1, 2, term + MAX_TERM_GAP)) is None
    for t in (term + MAX_TERM_GAP + 1, 2**63 - 1):
        for kind in (K.HEARTBEAT, K.VOTE, K.PRE_VOTE, K.APPEND):
            assert refusal(raw, Message(kind, 3, 2, t)) is Refusal.TERM_TOO_FAR
    assert refusal(raw, Message(K.HEARTBEAT, 1, 2, term + 11), max_term_gap=10) is not None


def test_append_heartbeat_and_snapshot_only_from_the_leader_of_the_term() -> None:
    c = elected()
    raw = c[2]
    term = raw.term
    assert raw.leader_id == 1
    snap = Snapshot(SnapshotMeta(5000, term, ConfState(frozenset({1, 2, 3}))), b"")
    # From the leader: accepted.
    assert refusal(raw, Message(K.SNAPSHOT, 1, 2, term, snapshot=snap)) is None
    assert refusal(raw, Message(K.APPEND, 1, 2, term, index=2)) is None
    # From another member in the same term: there is one leader per term.
    for kind in (K.APPEND, K.HEARTBEAT, K.SNAPSHOT):
        assert refusal(raw, Message(kind, 3, 2, term, snapshot=snap)) is Refusal.NOT_LEADER
    # A snapshot of a newer term: its leader is not known here yet (its heartbeat comes).
    assert refusal(raw, Message(K.SNAPSHOT, 3, 2, term + 1, snapshot=snap)) is Refusal.NOT_LEADER
    # An APPEND of a newer term is how a new leader makes itself known.
    assert refusal(raw, Message(K.APPEND, 3, 2, term + 1, index=2)) is None
    # The leader itself takes none from another node in its term.
    leader = c[1]
    assert refusal(leader, Message(K.APPEND, 2, 1, term, index=2)) is Refusal.NOT_LEADER
    # A follower that knows no leader of the term (after voting) follows the first APPEND,
    # but takes no snapshot yet.
    fresh = Cluster([1, 2, 3])
    follower: RawNode = fresh[2]
    assert follower.leader_id == 0
    assert refusal(follower, Message(K.APPEND, 3, 2, follower.term, index=0)) is None
    assert refusal(follower, Message(K.SNAPSHOT, 3, 2, follower.term, snapshot=snap)) is not None


@pytest.mark.parametrize("kind", [K.APPEND_RESP, K.HEARTBEAT_RESP, K.VOTE, K.PRE_VOTE])
def test_other_kinds_from_members_pass(kind: MessageKind) -> None:
    c = elected()
    assert refusal(c[1], Message(kind, 3, 1, c[1].term)) is None


def test_named_nodes_outside_a_lagging_configuration_are_admitted() -> None:
    # A replica whose configuration lags (the leader was added after it last heard) admits
    # the nodes its owner names (the controller's replicas and targets), and only those.
    raw = elected()[2]
    term = raw.term
    append = Message(K.APPEND, 5, 2, term + 1, log_term=term, index=2, commit=2)
    assert refusal(raw, append) is Refusal.NOT_MEMBER
    assert refusal(raw, append, also=frozenset({4, 5})) is None
    assert refusal(raw, replace(append, frm=99), also=frozenset({4, 5})) is Refusal.NOT_MEMBER
