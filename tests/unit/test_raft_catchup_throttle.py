"""The catch-up throttle of the Raft core (``RawNode.catchup``): a follower far behind gets its
APPENDs only as the driver's budget allows (retried at the next tick), one a little behind is
never held back, and a voter is held back only while a majority of voters is not."""

from __future__ import annotations

from dataclasses import dataclass, field

from tests.unit.raft_interaction.harness import Cluster, Node
from tests.unit.test_raft_membership import add_node, change
from tidelog.node.raft.core import RawNode
from tidelog.node.raft.limits import Config
from tidelog.node.raft.storage import MemoryStorage
from tidelog.node.raft.types import ConfChangeKind, ConfState, EntryKind, MessageKind

K = MessageKind
PAYLOAD = b"p" * 84


@dataclass
class Budget:
    """A deterministic throttle: far behind is more than ``lag`` entries; ``tokens`` bytes
    may go (None: any)."""

    lag: int
    tokens: int | None = 0
    taken: list[int] = field(default_factory=list)

    def behind(self, match: int, last: int) -> bool:
        return last - match > self.lag

    def take(self, nbytes: int) -> bool:
        if self.tokens is not None:
            if self.tokens <= 0:
                return False
            self.tokens -= nbytes
        self.taken.append(nbytes)
        return True


def appended_entries(c: Cluster, to: int) -> int:
    """Entries in the APPENDs queued for ``to``."""
    return sum(len(m.entries) for m in c.outbox if m.kind == K.APPEND and m.to == to)


def normal_data(c: Cluster, nid: int) -> list[bytes]:
    return [e.data for e in c.log_of(nid) if e.kind == EntryKind.NORMAL]


def cluster_with_log(n: int, config: Config | None = None) -> Cluster:
    c = Cluster([1, 2, 3], config=config or Config(max_msg_bytes=1000))
    c.elect(1)
    for i in range(n):
        c[1].propose(PAYLOAD + str(i).encode())
    c.stabilize()
    return c


def test_a_learner_far_behind_gets_entries_only_as_the_budget_allows() -> None:
    c = cluster_with_log(50)
    budget = Budget(lag=10, tokens=0)
    c[1].catchup = budget
    add_node(c, 4)
    c[1].propose_conf_change(ConfChangeKind.ADD_LEARNER, 4)
    c.stabilize()
    # The learner is in the configuration but got no entries: the budget is empty.
    assert c[1].conf_state.learners == {4}
    assert normal_data(c, 4) == []
    pr = c[1].progress(4)
    assert pr is not None and pr.throttled and pr.match == 0
    # The voters, a little behind at most, were never held back.
    assert normal_data(c, 2) == normal_data(c, 1)
    # Some budget: the next tick sends what it allows (one message may overdraw it).
    budget.tokens = 1
    c.tick(1)
    c.process_ready(1)
    sent = appended_entries(c, 4)
    assert 0 < sent < 50
    assert len(budget.taken) == 1
    c.stabilize()
    # Unlimited budget: ticks finish the copy; once close enough no more budget is asked.
    budget.tokens = None
    for _ in range(20):
        c.tick(1)
        c.stabilize()
    assert normal_data(c, 4) == normal_data(c, 1)
    asked = len(budget.taken)
    c[1].propose(b"live")
    c.stabilize()
    assert normal_data(c, 4)[-1] == b"live"
    assert len(budget.taken) == asked  # a follower caught up replicates at full speed


def test_no_throttle_no_holding_back() -> None:
    c = cluster_with_log(50)
    add_node(c, 4)
    change(c, 1, ConfChangeKind.ADD_LEARNER, 4)
    assert normal_data(c, 4) == normal_data(c, 1)


def test_a_follower_a_little_behind_is_not_held_back() -> None:
    c = cluster_with_log(5)
    budget = Budget(lag=10, tokens=0)
    c[1].catchup = budget
    c.partition([1, 2], [3])
    for i in range(8):
        c[1].propose(PAYLOAD + b"x" + str(i).encode())
    c.stabilize()
    c.heal()
    c.tick(1, 3)  # heartbeats find 3 behind by 8 entries: under the lag
    c.stabilize()
    assert normal_data(c, 3) == normal_data(c, 1)
    assert budget.taken == []


def test_a_voter_far_behind_is_held_back_while_a_majority_keeps_up() -> None:
    c = cluster_with_log(5)
    budget = Budget(lag=10, tokens=0)
    c[1].catchup = budget
    c.partition([1, 2], [3])
    for i in range(30):
        c[1].propose(PAYLOAD + b"y" + str(i).encode())
    c.stabilize()
    c.heal()
    c.tick(1, 3)
    c.stabilize()
    pr = c[1].progress(3)
    assert pr is not None and pr.throttled
    assert len(normal_data(c, 3)) == 5
    # Commits of live traffic go on with the majority {1, 2}.
    c[1].propose(b"live")
    c.stabilize()
    assert c[1].commit_index == c[1].last_index()
    assert normal_data(c, 2)[-1] == b"live"


def test_a_voter_needed_for_the_majority_is_not_held_back() -> None:
    # 1 leads {1, 2, 3}; 2 and 3 are both far behind: holding 3 back would hold the commits
    # of every proposal back, so neither is.
    c = Cluster([1, 2, 3], config=Config(max_msg_bytes=1000))
    c.elect(1)
    budget = Budget(lag=10, tokens=0)
    c[1].catchup = budget
    c.partition([1], [2, 3])
    for i in range(30):
        c[1].propose(PAYLOAD + str(i).encode())
    c.stabilize()
    c.heal()
    c.tick(1, 3)
    c.stabilize()
    assert c[1].commit_index == c[1].last_index()
    assert normal_data(c, 2) == normal_data(c, 3) == normal_data(c, 1)
    assert budget.taken == []


def test_a_throttled_learner_is_retried_at_each_tick() -> None:
    """A learner behind is retried at each tick, not only when a message arrives; a budget
    smaller than a message lets one message through a tick."""
    c = cluster_with_log(40)
    storage = MemoryStorage(ConfState(voters=frozenset({1, 2, 3})))
    c.rngs[4] = c.rngs[1]
    c.nodes[4] = Node(RawNode(4, storage, c.rngs[4], c.config), storage)
    budget = Budget(lag=5, tokens=0)
    c[1].catchup = budget
    change(c, 1, ConfChangeKind.ADD_LEARNER, 4)
    assert normal_data(c, 4) == []
    rounds = 0
    while normal_data(c, 4) != normal_data(c, 1):
        rounds += 1
        assert rounds < 100, "the learner never caught up"
        budget.tokens = 300  # less than one message (up to 1000 bytes, ten entries)
        c.tick(1)
        c.stabilize()
    # The budget, not the window, paced the copy: one message a tick.
    assert len(budget.taken) <= rounds
    assert rounds >= 3


def test_the_target_of_a_leadership_transfer_is_not_held_back() -> None:
    # Proposals wait while a transfer is under way: its target gets the log at full speed.
    c = cluster_with_log(5)
    budget = Budget(lag=10, tokens=0)
    c[1].catchup = budget
    c.partition([1, 2], [3])
    for i in range(30):
        c[1].propose(PAYLOAD + b"z" + str(i).encode())
    c.stabilize()
    c.heal()
    c.tick(1, 3)
    c.stabilize()
    assert len(normal_data(c, 3)) == 5  # held back
    c[1].transfer_leadership(3)
    c.stabilize()
    assert normal_data(c, 3) == normal_data(c, 1)
    assert c[3].role.name == "LEADER"
    assert budget.taken == []


def test_a_follower_probed_after_a_leader_change_is_judged_by_where_its_log_ends() -> None:
    # After a leader change every match is 0 (unknown); a follower whose log differs from
    # the new leader's in its last entries only is a little behind, not far behind.
    c = Cluster([1, 2, 3], config=Config(max_msg_bytes=1000))
    c.set_log(1, [1] * 30 + [2], term=2)
    c.set_log(2, [1] * 30 + [2], term=2)
    c.set_log(3, [1] * 30 + [1, 1], term=2)
    budget = Budget(lag=10, tokens=0)
    c[1].catchup = budget
    c.elect(1)
    c[1].propose(b"live")
    c.stabilize()
    assert budget.taken == []
    assert c.log_of(3) == c.log_of(1)
