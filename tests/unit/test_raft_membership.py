"""Membership changes in the Raft core: one server at a time, in force once committed."""

from __future__ import annotations

import pytest

from tests.unit.raft_interaction.harness import Cluster, MaxRand, Node
from tidelog.node.raft.core import RawNode
from tidelog.node.raft.errors import NotRaftLeader, ProposalDropped
from tidelog.node.raft.storage import MemoryStorage
from tidelog.node.raft.types import (
    ConfChange,
    ConfChangeKind,
    ConfState,
    EntryKind,
    Role,
    apply_change,
)

K = ConfChangeKind


def add_node(c: Cluster, nid: int, conf: ConfState | None = None) -> None:
    """A new, empty replica on ``nid`` (it knows the group's voters, not being one)."""
    storage = MemoryStorage(conf or ConfState(voters=c.conf.voters))
    c.rngs[nid] = c.rngs[min(c.rngs)]
    c.nodes[nid] = Node(RawNode(nid, storage, c.rngs[nid], c.config), storage)


def change(c: Cluster, leader: int, kind: ConfChangeKind, nid: int) -> None:
    c[leader].propose_conf_change(kind, nid)
    c.stabilize()


def test_conf_change_encoding_is_strict() -> None:
    cc = ConfChange(K.PROMOTE, 4, frozenset({1, 2, 4}), frozenset({5}))
    assert ConfChange.decode(cc.encode()) == cc
    data = cc.encode()
    for bad in (data[:-1], data + b"\0", b"\2" + data[1:], data[:1] + b"\x09" + data[2:], b""):
        with pytest.raises(ValueError):
            ConfChange.decode(bad)


def test_apply_change_refuses_what_makes_no_sense() -> None:
    conf = ConfState(voters=frozenset({1, 2, 3}), learners=frozenset({4}))
    assert apply_change(conf, K.ADD_LEARNER, 5).learners == {4, 5}
    assert apply_change(conf, K.PROMOTE, 4).voters == {1, 2, 3, 4}
    assert apply_change(conf, K.REMOVE, 4).learners == frozenset()
    assert apply_change(conf, K.REMOVE, 1).voters == {2, 3}
    for kind, nid in ((K.ADD_LEARNER, 1), (K.ADD_LEARNER, 4), (K.PROMOTE, 1), (K.REMOVE, 9)):
        with pytest.raises(ValueError):
            apply_change(conf, kind, nid)
    with pytest.raises(ValueError):
        apply_change(ConfState(voters=frozenset({1})), K.REMOVE, 1)


def test_move_a_replica_learner_catch_up_promote_remove() -> None:
    c = Cluster([1, 2, 3])
    c.elect(1)
    c[1].propose(b"a")
    c.stabilize()
    add_node(c, 4)
    change(c, 1, K.ADD_LEARNER, 4)
    # In force everywhere once committed; the learner got the whole log.
    for n in (1, 2, 3, 4):
        assert c[n].conf_state == ConfState(frozenset({1, 2, 3}), frozenset({4})), n
    assert [e.data for e in c.log_of(4) if e.kind == EntryKind.NORMAL] == [b"a"]
    pr = c[1].progress(4)
    assert pr is not None and pr.match == c[1].last_index()
    change(c, 1, K.PROMOTE, 4)
    assert all(c[n].conf_state.voters == {1, 2, 3, 4} for n in (1, 2, 3, 4))
    change(c, 1, K.REMOVE, 3)
    assert c[1].conf_state.voters == {1, 2, 4}
    # The removed node no longer hears from the leader, and the leader commits without it.
    c.down.add(3)
    c[1].propose(b"b")
    c.stabilize()
    assert c[4].commit_index == c[1].commit_index == c[1].last_index()
    # The configuration is stored with its index: a restart finds it.
    c.restart(4)
    assert c[4].conf_state.voters == {1, 2, 4}


def test_one_change_in_flight_and_only_after_an_entry_of_the_term() -> None:
    c = Cluster([1, 2, 3])
    with pytest.raises(NotRaftLeader):
        c[1].propose_conf_change(K.ADD_LEARNER, 4)
    c.elect(1)
    c.partition([1], [2, 3])
    c[1].propose_conf_change(K.ADD_LEARNER, 4)
    with pytest.raises(ProposalDropped, match="not committed"):
        c[1].propose_conf_change(K.ADD_LEARNER, 5)
    c.heal()
    c.stabilize()
    assert c[1].conf_state.learners == {4}
    c[1].propose_conf_change(K.ADD_LEARNER, 5)  # now allowed
    c.stabilize()
    assert c[1].conf_state.learners == {4, 5}
    # A proposal whose payload does not follow from the configuration in force is refused.
    bogus = ConfChange(K.PROMOTE, 4, frozenset({1, 2, 3, 4, 5}), frozenset())
    with pytest.raises(ValueError):
        c[1].propose(bogus.encode(), EntryKind.CONFIG)


def test_new_leader_without_an_entry_of_its_term_appends_one_first() -> None:
    from tidelog.node.raft.limits import Config

    c = Cluster([1, 2, 3], config=Config(always_append_empty=False))
    c.elect(1)
    with pytest.raises(ProposalDropped, match="no entry of term"):
        c[1].propose_conf_change(K.ADD_LEARNER, 4)
    c.stabilize()  # the EMPTY entry it appended commits
    c[1].propose_conf_change(K.ADD_LEARNER, 4)
    c.stabilize()
    assert c[2].conf_state.learners == {4}


def test_truncated_conf_entry_never_takes_effect() -> None:
    c = Cluster([1, 2, 3], rngs={3: MaxRand()})
    c.elect(1)
    c.partition([1], [2, 3])
    c[1].propose_conf_change(K.REMOVE, 3)  # stays on 1 only
    c.stabilize()
    assert c[1].conf_state.voters == {1, 2, 3}  # not committed: not in force
    c.tick(3, 10)  # its lease of leader 1 ends (MaxRand: it does not campaign yet)
    c.tick(2, 10)  # 2 campaigns
    c.stabilize()
    new = 2
    assert c[new].role == Role.LEADER
    c[new].propose(b"x")
    c.stabilize()
    c.heal()
    c.stabilize()
    c.tick(2, 3)  # heartbeats reach 1
    c.stabilize()
    # 1 followed 2: its conf entry was cut, the configuration never changed.
    assert c[1].role == Role.FOLLOWER and c[1].leader_id == new
    assert [e.kind for e in c.log_of(1)].count(EntryKind.CONFIG) == 0
    assert all(c[n].conf_state.voters == {1, 2, 3} for n in (1, 2, 3))
    assert c[1].log.confs == []


def test_removed_leader_steps_down_and_the_rest_elect() -> None:
    c = Cluster([1, 2, 3])
    c.elect(1)
    change(c, 1, K.REMOVE, 1)
    assert c[1].role == Role.FOLLOWER
    assert c[2].conf_state.voters == {2, 3}
    c.down.add(1)
    c.elect(2)
    c[2].propose(b"after")
    c.stabilize()
    assert c[3].commit_index == c[2].last_index()
    # The removed node never campaigns again.
    c.down.discard(1)
    c.tick(1, 100)
    assert c[1].role == Role.FOLLOWER


def test_a_new_learner_installs_a_snapshot_older_than_its_addition() -> None:
    c = Cluster([1, 2, 3])
    c.elect(1)
    for i in range(5):
        c[1].propose(b"%d" % i)
    c.stabilize()
    add_node(c, 4, ConfState(voters=frozenset({1, 2, 3}), learners=frozenset({4})))
    c.down.add(4)
    change(c, 1, K.ADD_LEARNER, 4)
    c[1].propose(b"more")
    c.stabilize()
    st = c.nodes[1].storage
    # A snapshot taken before the learner was added, then the log compacted below it.
    conf_at = next(e.index for e in c.log_of(1) if e.kind == EntryKind.CONFIG)
    st.create_snapshot(conf_at - 1, b"state", ConfState(frozenset({1, 2, 3})))
    st.compact(conf_at - 1)
    c.down.discard(4)
    for _ in range(5):
        c.tick(1, 1)
        c.stabilize()
    assert c[4].conf_state == ConfState(frozenset({1, 2, 3}), frozenset({4}))
    assert c[4].last_index() == c[1].last_index()
    assert c[4].commit_index == c[1].commit_index


def test_force_configuration_recovers_a_group_that_lost_its_majority() -> None:
    c = Cluster([1, 2, 3, 4, 5])
    c.elect(1)
    c[1].propose(b"a")
    c.stabilize()
    c.down.update({1, 4, 5})
    c.tick(2, 50)
    c.stabilize()
    assert c[2].role != Role.LEADER  # 2 of 5: no majority
    for n in (2, 3):
        c[n].force_configuration(frozenset({2, 3}))
    c.stabilize()
    c.elect(2)
    c[2].propose(b"b")
    c.stabilize()
    assert c[3].commit_index == c[2].last_index()
    c.restart(3)
    assert c[3].conf_state.voters == {2, 3}
    with pytest.raises(ValueError):
        c[2].force_configuration(frozenset())


def test_forced_configuration_ignores_the_lost_groups_changes() -> None:
    # 1..5; a change (remove 5) reaches only 2 and 3 before 1, 4, 5 are lost for good.
    c = Cluster([1, 2, 3, 4, 5])
    c.elect(1)
    c[1].propose(b"a")
    c.stabilize()
    c.partition([1, 2, 3], [4, 5])
    c.down.add(3)
    c[1].propose_conf_change(K.REMOVE, 5)  # reaches 2 only (3 is down): uncommitted
    c.stabilize()
    assert any(e.kind == EntryKind.CONFIG for e in c.log_of(2))
    c.down.discard(3)
    c.down.update({1, 4, 5})
    c.heal()
    floor = max(c[2].last_index(), c[3].last_index())
    for n in (2, 3):
        c[n].force_configuration(frozenset({2, 3}), through_index=floor)
    c.tick(2, 30)
    c.tick(3, 30)
    c.stabilize()
    c.elect(2)
    c[2].propose(b"b")
    c.stabilize()
    # The old change committed with the new leader's entries, but took no effect: the
    # survivors stay {2, 3}, also the one that received the change only now, and at restarts.
    assert c[3].commit_index == c[2].last_index()
    assert any(e.kind == EntryKind.CONFIG for e in c.log_of(3))
    for n in (2, 3):
        assert c[n].conf_state.voters == {2, 3}, n
        c.restart(n)
        assert c[n].conf_state.voters == {2, 3}, n
