"""Core options the cluster driver relies on: a narrower election timeout span, leaders
that skip the EMPTY entry when their log is committed, and learners added without an entry."""

from __future__ import annotations

from tests.unit.raft_interaction.harness import Cluster, MaxRand, Node
from tests.unit.test_raft_election import RecordingRand
from tidelog.node.raft.core import RawNode
from tidelog.node.raft.limits import Config
from tidelog.node.raft.storage import MemoryStorage
from tidelog.node.raft.types import ConfState, EntryKind, Role

LAZY = Config(always_append_empty=False)


def test_election_timeout_span_narrows_the_random_range() -> None:
    cfg = Config(election_timeout_ticks=20, election_timeout_span_ticks=10)
    rand = RecordingRand(3)
    storage = MemoryStorage(ConfState(voters=frozenset({1, 2, 3})))
    fired_after = set()
    for _ in range(300):
        node = RawNode(1, storage, rand, cfg)
        ticks = 0
        while node.role == Role.FOLLOWER:
            node.tick()
            ticks += 1
        fired_after.add(ticks)
    assert set(rand.ranges) == {(20, 29)}
    assert min(fired_after) == 20 and max(fired_after) == 29


def test_lazy_leader_of_a_committed_log_appends_nothing() -> None:
    c = Cluster([1, 2, 3], config=LAZY)
    c.elect(1)
    assert c.log_of(1) == [] and c.log_of(2) == []
    assert c[2].leader_id == 1 and c[3].leader_id == 1  # heard of the leader anyway
    c[1].propose(b"a")
    c.stabilize()
    assert [e.data for e in c.log_of(3)] == [b"a"]
    assert c[3].commit_index == 1
    # Everything is committed everywhere: the next leader appends nothing either.
    c[1].transfer_leadership(2)
    c.stabilize()
    assert c[2].role == Role.LEADER
    assert [e.kind for e in c.log_of(2)] == [EntryKind.NORMAL]
    c[2].propose(b"b")
    c.stabilize()
    assert [e.data for e in c.log_of(1)] == [b"a", b"b"]
    assert all(c[n].commit_index == 2 for n in (1, 2, 3))


def test_lazy_leader_with_uncommitted_entries_appends_empty_and_commits_them() -> None:
    c = Cluster([1, 2, 3], config=LAZY, rngs={2: MaxRand(), 3: MaxRand()})
    c.elect(1)
    c.isolate(1)
    c[1].propose(b"x")  # reaches nobody: stays uncommitted on 1
    c.stabilize()
    assert c[1].commit_index == 0
    c.heal()
    # Node 1 crashes and restarts as a follower with the uncommitted entry; 2 and 3 are
    # behind, so only 1 can win an election with its longer log.
    c.restart(1)
    c.tick(2, 10)  # their lease of the old leader ends; MaxRand keeps them from campaigning
    c.tick(3, 10)
    c.elect(1)
    log = c.log_of(1)
    assert [e.kind for e in log] == [EntryKind.NORMAL, EntryKind.EMPTY]
    assert all(c[n].commit_index == 2 for n in (1, 2, 3))


def test_learner_added_at_runtime_replicates_but_never_counts() -> None:
    c = Cluster([1, 2, 3])
    c.elect(1)
    storage = MemoryStorage(ConfState(voters=frozenset({1, 2, 3}), learners=frozenset({4})))
    c.nodes[4] = Node(RawNode(4, storage, c.rngs[1], c.config), storage)
    c.rngs[4] = c.rngs[1]
    c[1].add_learner(4)
    c[1].add_learner(4)  # idempotent
    assert c[1].conf_state.learners == {4}
    c[1].propose(b"a")
    c.stabilize()
    assert [e.data for e in c.log_of(4) if e.kind == EntryKind.NORMAL] == [b"a"]
    assert c[4].commit_index == c[1].commit_index
    # Voters 2 and 3 cut off: the learner's acknowledgement commits nothing.
    c.partition([1, 4], [2, 3])
    commit = c[1].commit_index
    c[1].propose(b"b")
    c.stabilize()
    assert c[4].log.last_index() == commit + 1
    assert c[1].commit_index == commit
    # The learner survives a change of leader (the tracker keeps it) and never campaigns.
    c.heal()
    c.stabilize()
    c[1].transfer_leadership(2)
    c.stabilize()
    assert c[2].role == Role.LEADER
    c[2].add_learner(4)
    c[2].propose(b"c")
    c.stabilize()
    assert [e.data for e in c.log_of(4) if e.kind == EntryKind.NORMAL] == [b"a", b"b", b"c"]
    c.tick(4, 100)
    assert c[4].role == Role.FOLLOWER
    c[2].remove_learner(4)
    c[2].remove_learner(2)  # a voter: nothing happens
    assert c[2].conf_state.learners == frozenset() and 2 in c[2].conf_state.voters
