"""The controller group's own voters, without processes: what the active controller changes
next (controller/planning.py ``plan_controller_voters``: a dead-past-deadline or draining
voter replaced by a live node, one change at a time, the count kept odd) played against the
Raft core's one-server-at-a-time rules, and force-recover's plan for a lost controller
majority (node/controller_recovery.py)."""

from __future__ import annotations

import pytest

from tidelog.controller.commands import (
    NODE_DRAINING,
    Command,
    MarkNodeDead,
    RegisterNode,
    SetClusterConfig,
    SetNodeState,
)
from tidelog.controller.planning import (
    VOTER_PROMOTE,
    VOTER_REMOVE,
    VOTER_TRANSFER,
    VOTER_WAIT,
    VoterStep,
    plan_controller_voters,
    voter_target,
)
from tidelog.controller.settings import CONTROLLER_VOTERS, REPROVISION_MS, validate_cluster_settings
from tidelog.controller.state import ClusterState
from tidelog.errors import InvalidConfig, InvalidRequest
from tidelog.node.controller_recovery import (
    ControllerLogEnd,
    loss_summary,
    plan_controller_recovery,
)
from tidelog.node.raft.quorum import majority
from tidelog.node.raft.types import ConfChangeKind, ConfState, apply_change

NOW = 1_700_000_000_000
DEADLINE = 5_000


class Cluster:
    def __init__(self, nodes: int, racks: list[str] | None = None) -> None:
        self.state = ClusterState()
        self.index = 0
        for i in range(1, nodes + 1):
            self.ok(RegisterNode(i, f"127.0.0.1:{9000 + i}", "", racks[i - 1] if racks else None))
        self.ok(SetClusterConfig({REPROVISION_MS: str(DEADLINE)}))

    def ok(self, command: Command) -> None:
        self.index += 1
        result = self.state.apply(self.index, command)
        assert result.ok, result.error

    def kill(self, node: int, at_ms: int = NOW) -> None:
        self.ok(MarkNodeDead(node, at_ms=at_ms))


def plan(
    c: Cluster,
    voters: set[int],
    leader: int = 1,
    now: int = NOW,
    behind: frozenset[int] = frozenset(),
) -> VoterStep | None:
    return plan_controller_voters(
        c.state, frozenset(voters), leader, now, lambda n: n not in behind
    )


def settle(
    c: Cluster, voters: set[int], leader: int, now: int, confs: list[frozenset[int]] | None = None
) -> tuple[set[int], list[str]]:
    """Play the leader: apply each step as the core would (one change at a time), checking
    that every configuration change moves one voter and the dead never form a majority of
    the live ones' configuration."""
    conf = ConfState(frozenset(voters), frozenset(set(c.state.nodes) - voters))
    steps: list[str] = []
    for _ in range(20):
        step = plan(c, set(conf.voters), leader, now)
        if step is None or step.kind == VOTER_WAIT:
            return set(conf.voters), steps
        steps.append(f"{step.kind} {step.node}")
        if step.kind == VOTER_TRANSFER:
            leader = step.node
            continue
        kind = ConfChangeKind.PROMOTE if step.kind == VOTER_PROMOTE else ConfChangeKind.REMOVE
        new = apply_change(conf, kind, step.node)
        assert len(new.voters ^ conf.voters) == 1  # one server at a time
        if confs is not None:
            confs.append(new.voters)
        conf = ConfState(new.voters, new.learners | (frozenset(c.state.nodes) - new.voters))
    raise AssertionError(f"never settled: {steps}")


def test_a_voter_dead_past_the_deadline_is_replaced_promote_then_remove() -> None:
    c = Cluster(4)
    c.kill(3)
    # Before the deadline: nothing changes; status says when it will.
    early = plan(c, {1, 2, 3}, now=NOW + DEADLINE - 1)
    assert early is not None and early.kind == VOTER_WAIT and early.replaces == 3
    assert f"deadline ({NOW + DEADLINE} ms)" in early.why
    step = plan(c, {1, 2, 3}, now=NOW + DEADLINE)
    assert step == VoterStep(VOTER_PROMOTE, 4, 3, step.why if step else "")
    assert step is not None and "voter 3 (dead)" in step.why
    # The learner is behind: wait, saying why.
    waiting = plan(c, {1, 2, 3}, now=NOW + DEADLINE, behind=frozenset({4}))
    assert waiting is not None and waiting.kind == VOTER_WAIT and waiting.node == 4
    assert "catching up" in waiting.why
    # Promoted: four voters, then the dead one goes; three voters again.
    step = plan(c, {1, 2, 3, 4}, now=NOW + DEADLINE)
    assert step is not None and (step.kind, step.node) == (VOTER_REMOVE, 3)
    assert plan(c, {1, 2, 4}, now=NOW + DEADLINE) is None
    voters, steps = settle(c, {1, 2, 3}, 1, NOW + DEADLINE)
    assert voters == {1, 2, 4} and steps == ["promote 4", "remove 3"]


def test_no_replacement_without_a_live_non_voter() -> None:
    c = Cluster(3)
    c.kill(3)
    step = plan(c, {1, 2, 3}, now=NOW + DEADLINE)
    assert step is not None and step.kind == VOTER_WAIT and step.node == 0
    assert "no live, active node" in step.why
    # Dead or draining nodes take no vote either.
    c4 = Cluster(5)
    c4.kill(3)
    c4.kill(4)
    c4.ok(SetNodeState(5, NODE_DRAINING))
    step = plan(c4, {1, 2, 3}, now=NOW + DEADLINE)
    assert step is not None and step.kind == VOTER_WAIT and step.node == 0


def test_the_replacement_is_on_a_distinct_rack_then_the_least_loaded() -> None:
    c = Cluster(5, racks=["a", "b", "c", "a", "d"])
    c.kill(3)
    # Node 4 shares rack a with voter 1, which stays: node 5 (rack d) takes the vote.
    step = plan(c, {1, 2, 3}, now=NOW + DEADLINE)
    assert step is not None and (step.kind, step.node) == (VOTER_PROMOTE, 5)
    c = Cluster(5, racks=["a", "b", "c", "d", "e"])
    c.ok(c.state.prepare_create_topic("t", 1, 1))
    [holder] = c.state.partition("t", 0).replicas
    c.kill(3)
    step = plan(c, {1, 2, 3}, now=NOW + DEADLINE)
    assert step is not None and step.kind == VOTER_PROMOTE
    if holder in (4, 5):
        assert step.node == ({4, 5} - {holder}).pop()  # the one without the replica
    else:
        assert step.node == 4  # equal load: the lower id


def test_a_draining_voter_moves_its_vote_at_once_and_the_leader_hands_over_first() -> None:
    c = Cluster(4)
    c.ok(SetNodeState(2, NODE_DRAINING))
    voters, steps = settle(c, {1, 2, 3}, 1, NOW)
    assert voters == {1, 3, 4} and steps == ["promote 4", "remove 2"]
    # The leader itself drains: promote, then leadership away, then removed by the next.
    c = Cluster(4)
    c.ok(SetNodeState(1, NODE_DRAINING))
    step = plan(c, {1, 2, 3, 4}, leader=1)
    assert step is not None and step.kind == VOTER_TRANSFER and step.node in (2, 3, 4)
    voters, steps = settle(c, {1, 2, 3}, 1, NOW)
    assert voters == {2, 3, 4} and steps[0] == "promote 4" and steps[-1] == "remove 1"
    assert any(s.startswith("transfer") for s in steps)


def test_the_voter_count_stays_odd_and_controller_voters_refills() -> None:
    c = Cluster(5)
    assert voter_target(c.state, 3) == 3 and voter_target(c.state, 4) == 3
    assert voter_target(c.state, 1) == 1
    assert plan(c, {1, 2, 3}) is None  # healthy: nothing to change
    assert plan(c, {1}) is None  # a one-voter controller stays one
    # After a force-recover to one survivor, controller.voters=3 refills from live nodes.
    c.ok(SetClusterConfig({CONTROLLER_VOTERS: "3"}))
    voters, steps = settle(c, {1}, 1, NOW)
    assert len(voters) == 3 and 1 in voters and len(steps) == 2
    # Growing to five, one at a time.
    c.ok(SetClusterConfig({CONTROLLER_VOTERS: "5"}))
    voters, steps = settle(c, voters, 1, NOW)
    assert voters == {1, 2, 3, 4, 5}
    with pytest.raises(InvalidConfig):
        validate_cluster_settings({CONTROLLER_VOTERS: "4"})


def test_a_dead_voter_replaced_keeps_a_live_majority_at_every_step() -> None:
    c = Cluster(5)
    c.kill(2)
    confs: list[frozenset[int]] = []
    voters, _ = settle(c, {1, 2, 3}, 1, NOW + DEADLINE, confs)
    assert 2 not in voters and len(voters) == 3 and len(confs) == 2
    live = {i for i, n in c.state.nodes.items() if n.alive}
    for conf in confs:
        # Every intermediate configuration (four voters, one dead) still commits.
        assert len(conf & live) >= majority(len(conf)), conf


# ---- force-recover of a lost controller majority ----------------------------------------


def end(node: int, term: int, index: int, commit: int, voters: set[int]) -> ControllerLogEnd:
    return ControllerLogEnd(node, term, index, commit, frozenset(voters))


def test_force_recover_keeps_the_most_up_to_date_survivor_and_reports_the_loss() -> None:
    voters = {1, 2, 3}
    logs = [end(1, 4, 90, 88, voters), end(4, 4, 95, 95, voters)]  # 4 a learner
    plan_ = plan_controller_recovery(logs)
    assert plan_.voters == {1} and plan_.chosen.node_id == 1 and plan_.lost_voters == (2, 3)
    assert plan_.known_committed == 95
    summary = loss_summary(plan_, 3)
    assert "LOST: controller entries 91..95" in summary and "3 voter(s)" in summary
    # Two survivors of five: both stay voters, the newer log is chosen.
    five = {1, 2, 3, 4, 5}
    p2 = plan_controller_recovery([end(1, 5, 10, 10, five), end(2, 5, 12, 11, five)])
    assert p2.voters == {1, 2} and p2.chosen.node_id == 2
    assert "no committed controller entry above index 12" in loss_summary(p2, 5)


def test_force_recover_refuses_while_a_majority_is_alive_or_a_leader_exists() -> None:
    voters = {1, 2, 3}
    with pytest.raises(InvalidRequest, match="a majority of the controller voters"):
        plan_controller_recovery([end(1, 4, 9, 9, voters), end(2, 4, 9, 9, voters)])
    leader = ControllerLogEnd(1, 4, 9, 9, frozenset(voters), leader=True)
    with pytest.raises(InvalidRequest, match="leads the controller"):
        plan_controller_recovery([leader])
    with pytest.raises(InvalidRequest, match="nothing to recover"):
        plan_controller_recovery([])
