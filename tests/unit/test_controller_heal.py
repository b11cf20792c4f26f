"""The controller's side of self-healing, without processes: replica moves in the state
(targets, reports of committed configurations, cancelling), node states (draining, removal),
cluster settings, and the plans the active controller proposes (reprovisioning deadlines,
drains, replica and leader balance)."""

from __future__ import annotations

from collections import Counter

import pytest

from tidelog.controller.commands import (
    NODE_ACTIVE,
    NODE_DRAINING,
    Command,
    CommandDecodeError,
    CreateTopic,
    LeaderHint,
    MarkNodeAlive,
    MarkNodeDead,
    MovePartitions,
    PartitionMove,
    RegisterNode,
    RemoveNode,
    ReplicaReport,
    SetClusterConfig,
    SetNodeState,
    UpdatePartitionLeaders,
    UpdatePartitionReplicas,
    decode_command,
    encode_command,
)
from tidelog.controller.placement import NodeInfo, pick_replacement
from tidelog.controller.planning import (
    move_stall,
    plan_leader_transfers,
    plan_moves,
    reprovision_deadline_ms,
)
from tidelog.controller.settings import (
    REPROVISION_MS,
    cluster_setting,
    describe_settings,
    validate_cluster_settings,
)
from tidelog.controller.state import ApplyResult, ClusterState, PartitionAssignment
from tidelog.errors import InvalidConfig, InvalidReplicationFactor, InvalidRequest


class Driver:
    def __init__(self) -> None:
        self.state = ClusterState()
        self.index = 0

    def apply(self, command: Command) -> ApplyResult:
        self.index += 1
        return self.state.apply(self.index, command)

    def ok(self, command: Command) -> ApplyResult:
        result = self.apply(command)
        assert result.ok, result.error
        return result

    def refused(self, command: Command) -> str:
        before = self.state.snapshot()
        result = self.apply(command)
        assert result.error is not None
        after = self.state.snapshot()
        # Nothing changed but the applied index.
        assert _without_index(before) == _without_index(after)
        return result.error.message

    def part(self, topic: str = "t", p: int = 0) -> PartitionAssignment:
        return self.state.partition(topic, p)


def _without_index(snapshot: bytes) -> bytes:
    import json

    body = json.loads(snapshot[9:])
    body.pop("applied_index")
    return json.dumps(body, sort_keys=True).encode()


def cluster(nodes: int, racks: list[str] | None = None) -> Driver:
    d = Driver()
    for i in range(1, nodes + 1):
        rack = racks[i - 1] if racks else None
        d.ok(RegisterNode(i, f"127.0.0.1:{9000 + i}", "", rack))
    return d


def create(d: Driver, name: str, partitions: int, rf: int) -> None:
    d.ok(d.state.prepare_create_topic(name, partitions, rf))


def settle(d: Driver, now_ms: int, rounds: int = 200) -> None:
    """Propose what the planner says, and play the partition leaders: every move completes
    (the target becomes the voters) before the next plan."""
    for _ in range(rounds):
        plan = plan_moves(d.state, now_ms)
        if not plan.moves:
            return
        d.ok(MovePartitions(plan.moves))
        finish_moves(d)
    raise AssertionError("the planner never settled")


def finish_moves(d: Driver) -> None:
    reports = []
    for _, a in d.state.assignments():
        if a.target is not None:
            reports.append(ReplicaReport(a.group_id, a.conf_term + 1, a.target))
    if reports:
        d.ok(UpdatePartitionReplicas(tuple(reports)))


# ---- commands ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "command",
    [
        MarkNodeDead(3, at_ms=1_700_000_000_000),
        SetNodeState(2, NODE_DRAINING),
        RemoveNode(4),
        MovePartitions((PartitionMove(10_001, (1, 2, 4)), PartitionMove(10_002, ()))),
        UpdatePartitionReplicas((ReplicaReport(10_001, 7, (1, 2, 4), (5,)),)),
        SetClusterConfig({"replica.reprovision.ms": "5000"}, ("retention.ms",)),
    ],
)
def test_new_commands_round_trip(command: Command) -> None:
    assert decode_command(encode_command(command)) == command


def test_mark_node_dead_of_an_older_version_decodes_without_a_time() -> None:
    assert decode_command(b'{"node_id":3,"type":"mark_node_dead","v":1}') == MarkNodeDead(3)


@pytest.mark.parametrize(
    "raw",
    [
        b'{"moves":[[]],"type":"move_partitions","v":1}',
        b'{"moves":[["x"]],"type":"move_partitions","v":1}',
        b'{"reports":[[1,2,[3]]],"type":"update_partition_replicas","v":1}',
        b'{"reports":[[1,2,[3],["a"]]],"type":"update_partition_replicas","v":1}',
        b'{"node_id":1,"state":3,"type":"set_node_state","v":1}',
        b'{"set":{},"type":"set_cluster_config","v":1}',
    ],
)
def test_malformed_new_commands_do_not_decode(raw: bytes) -> None:
    with pytest.raises(CommandDecodeError):
        decode_command(raw)


# ---- moves in the state -------------------------------------------------------------------


def test_a_move_names_both_sets_until_the_leader_reports_the_target() -> None:
    d = cluster(4)
    create(d, "t", 1, 3)
    a = d.part()
    old = a.replicas
    new_node = next(i for i in (1, 2, 3, 4) if i not in old)
    target = (*old[:2], new_node)
    d.ok(MovePartitions((PartitionMove(a.group_id, target),)))
    moving = d.part()
    assert moving.replicas == old and moving.target == target
    # The new node must open a replica, the leaving one must keep its own.
    assert ("t", 0) in d.state.replicas_on(new_node)
    assert ("t", 0) in d.state.replicas_on(old[2])
    # The leader promoted the learner: four voters, the move goes on.
    d.ok(UpdatePartitionReplicas((ReplicaReport(a.group_id, 5, (*old, new_node)),)))
    assert d.part().replicas == (*old, new_node) and d.part().target == target
    # The old voter removed: the target is reached and the move ends.
    d.ok(UpdatePartitionReplicas((ReplicaReport(a.group_id, 5, target),)))
    done = d.part()
    assert done.replicas == target and done.target is None
    assert ("t", 0) not in d.state.replicas_on(old[2])
    assert d.state.replica_counts()[old[2]] == 0


def test_reports_from_an_older_term_or_of_unknown_nodes_are_dropped() -> None:
    d = cluster(4)
    create(d, "t", 1, 3)
    a = d.part()
    new_node = next(i for i in (1, 2, 3, 4) if i not in a.replicas)
    d.ok(MovePartitions((PartitionMove(a.group_id, (*a.replicas[:2], new_node)),)))
    d.ok(UpdatePartitionReplicas((ReplicaReport(a.group_id, 9, (1, 2, 3, 4)),)))
    assert set(d.part().replicas) == {1, 2, 3, 4} and d.part().conf_term == 9
    result = d.ok(
        UpdatePartitionReplicas(
            (ReplicaReport(a.group_id, 8, a.replicas[:2]),),
        )
    )
    assert not result.changed and set(d.part().replicas) == {1, 2, 3, 4}
    result = d.ok(UpdatePartitionReplicas((ReplicaReport(a.group_id, 9, (1, 2, 77)),)))
    assert not result.changed
    # Voters neither the replicas nor a target name: not a configuration it can have.
    d2 = cluster(5)
    create(d2, "t", 1, 3)
    b = d2.part()
    outsider = next(i for i in (1, 2, 3, 4, 5) if i not in b.replicas)
    result = d2.ok(
        UpdatePartitionReplicas((ReplicaReport(b.group_id, 3, (*b.replicas, outsider)),))
    )
    assert not result.changed and d2.part() == b


def test_a_report_dropping_the_leader_clears_the_leader_hint() -> None:
    d = cluster(4)
    create(d, "t", 1, 3)
    a = d.part()
    leader = a.replicas[0]
    d.ok(UpdatePartitionLeaders((LeaderHint(a.group_id, leader, 2),)))
    rest = tuple(r for r in (1, 2, 3, 4) if r != leader)
    d.ok(MovePartitions((PartitionMove(a.group_id, rest),)))
    d.ok(UpdatePartitionReplicas((ReplicaReport(a.group_id, 2, rest),)))
    assert d.part().leader == 0
    assert d.part().preferred_leader in rest


def test_reassign_refuses_unknown_dead_draining_nodes_and_a_wrong_size() -> None:
    d = cluster(4)
    create(d, "t", 1, 3)
    g = d.part().group_id
    assert "not registered" in d.refused(MovePartitions((PartitionMove(g, (1, 2, 9)),)))
    assert "3 distinct nodes" in d.refused(MovePartitions((PartitionMove(g, (1, 2)),)))
    assert "3 distinct nodes" in d.refused(MovePartitions((PartitionMove(g, (1, 1, 2)),)))
    outsider = next(i for i in (1, 2, 3, 4) if i not in d.part().replicas)
    keep = d.part().replicas[:2]
    d.ok(MarkNodeDead(outsider, at_ms=1))
    assert "dead" in d.refused(MovePartitions((PartitionMove(g, (*keep, outsider)),)))
    d.ok(MarkNodeAlive(outsider))
    d.ok(SetNodeState(outsider, NODE_DRAINING))
    assert "draining" in d.refused(MovePartitions((PartitionMove(g, (*keep, outsider)),)))
    assert "no move is in progress" in d.refused(MovePartitions((PartitionMove(g, ()),)))


def test_cancel_goes_back_to_where_the_move_started() -> None:
    d = cluster(4)
    create(d, "t", 1, 3)
    a = d.part()
    new_node = next(i for i in (1, 2, 3, 4) if i not in a.replicas)
    target = (*a.replicas[1:], new_node)
    d.ok(MovePartitions((PartitionMove(a.group_id, target),)))
    # Not started yet: cancelling ends the move, the new node holds nothing.
    d.ok(MovePartitions((PartitionMove(a.group_id, ()),)))
    assert d.part().target is None and d.state.replica_counts()[new_node] == 0
    # Half way (the new voter promoted): back to the first three, the original replicas.
    d.ok(MovePartitions((PartitionMove(a.group_id, target),)))
    d.ok(UpdatePartitionReplicas((ReplicaReport(a.group_id, 3, (*a.replicas, new_node)),)))
    d.ok(MovePartitions((PartitionMove(a.group_id, ()),)))
    assert d.part().target == a.replicas


def test_a_reassignment_to_the_same_nodes_only_changes_the_preferred_leader() -> None:
    d = cluster(3)
    create(d, "t", 1, 3)
    a = d.part()
    reordered = (a.replicas[2], a.replicas[0], a.replicas[1])
    d.ok(MovePartitions((PartitionMove(a.group_id, reordered),)))
    assert d.part().target is None
    assert d.part().replicas == reordered and d.part().preferred_leader == reordered[0]


def test_moves_and_settings_survive_a_snapshot() -> None:
    d = cluster(4)
    create(d, "t", 2, 3)
    a = d.part()
    new_node = next(i for i in (1, 2, 3, 4) if i not in a.replicas)
    d.ok(MovePartitions((PartitionMove(a.group_id, (*a.replicas[:2], new_node)),)))
    d.ok(UpdatePartitionReplicas((ReplicaReport(a.group_id, 4, (*a.replicas, new_node)),)))
    d.ok(RegisterNode(5, "127.0.0.1:9005", ""))
    d.ok(SetNodeState(2, NODE_DRAINING))
    d.ok(MarkNodeDead(3, at_ms=123_456))
    d.ok(SetClusterConfig({"replica.reprovision.ms": "5000", "retention.ms": "1000"}))
    restored = ClusterState.from_snapshot(d.state.snapshot())
    assert restored.snapshot() == d.state.snapshot()
    assert restored.partition("t", 0) == d.part()
    assert restored.nodes[2].state == NODE_DRAINING
    assert restored.nodes[3].dead_since_ms == 123_456
    assert restored.settings == d.state.settings
    assert restored.replicas_on(new_node) == d.state.replicas_on(new_node)
    assert restored.topic("t").effective_configs()["retention.ms"] == "1000"


# ---- node states ---------------------------------------------------------------------------


def test_draining_the_last_node_that_can_hold_a_replica_is_refused() -> None:
    d = cluster(3)
    create(d, "t", 2, 3)
    message = d.refused(SetNodeState(1, NODE_DRAINING))
    assert "cannot drain node 1" in message and "add a node" in message
    d.ok(RegisterNode(4, "127.0.0.1:9004", ""))
    d.ok(SetNodeState(1, NODE_DRAINING))
    assert d.state.nodes[1].state == NODE_DRAINING
    # A draining node takes no new topic's replicas.
    create(d, "u", 4, 3)
    assert all(1 not in p.replicas for p in d.state.topic("u").partitions)


def test_remove_refuses_a_node_with_replicas_or_a_live_active_one() -> None:
    d = cluster(4)
    create(d, "t", 4, 3)
    loaded = max(d.state.replica_counts().items(), key=lambda kv: kv[1])[0]
    assert "drain it first" in d.refused(RemoveNode(loaded))
    empty = cluster(4)
    assert "alive and active" in empty.refused(RemoveNode(2))
    assert "not registered" in empty.refused(RemoveNode(9))
    empty.ok(MarkNodeDead(2, at_ms=5))
    empty.ok(RemoveNode(2))
    assert 2 not in empty.state.nodes


def test_a_drained_node_ends_empty_and_can_be_removed() -> None:
    d = cluster(4)
    create(d, "t", 8, 3)
    d.ok(SetNodeState(4, NODE_DRAINING))
    settle(d, now_ms=0)
    assert d.state.replica_counts()[4] == 0
    for _, a in d.state.assignments():
        assert len(set(a.replicas)) == 3 and 4 not in a.replicas
    d.ok(RemoveNode(4))
    assert sorted(d.state.nodes) == [1, 2, 3]


def test_a_drain_keeps_the_target_the_factor_and_moves_at_most_the_cap_at_once() -> None:
    d = cluster(5)
    create(d, "t", 20, 3)
    d.ok(SetClusterConfig({"replica.moves.concurrent.max": "3"}))
    d.ok(SetNodeState(5, NODE_DRAINING))
    plan = plan_moves(d.state, 0)
    assert len(plan.moves) == 3
    for m in plan.moves:
        assert len(m.target) == 3 and 5 not in m.target
        located = d.state.locate_group(m.group_id)
        assert located is not None
        old = d.state.partition(*located).replicas
        # Only the draining node is replaced, in place (order and leader kept).
        assert [x for x, y in zip(old, m.target, strict=True) if x != y] == [5]


# ---- reprovisioning ------------------------------------------------------------------------


def test_a_dead_node_is_replaced_only_after_its_deadline() -> None:
    d = cluster(4)
    create(d, "t", 6, 3)
    d.ok(SetClusterConfig({REPROVISION_MS: "5000"}))
    d.ok(MarkNodeDead(2, at_ms=100_000))
    assert reprovision_deadline_ms(d.state, d.state.nodes[2]) == 105_000
    assert reprovision_deadline_ms(d.state, d.state.nodes[1]) is None
    assert plan_moves(d.state, 104_999).moves == ()
    plan = plan_moves(d.state, 105_000)
    held = d.state.replicas_on(2)
    assert len(plan.moves) == len(held) > 0
    settle(d, 105_000)
    assert d.state.replicas_on(2) == frozenset()
    for _, a in d.state.assignments():
        assert len(a.replicas) == 3 and 2 not in a.replicas


def test_a_node_back_before_its_deadline_keeps_its_replicas() -> None:
    d = cluster(4)
    create(d, "t", 6, 3)
    held = d.state.replicas_on(2)
    d.ok(MarkNodeDead(2, at_ms=100_000))
    d.ok(MarkNodeAlive(2))
    assert d.state.nodes[2].dead_since_ms == 0
    assert plan_moves(d.state, 10**15).moves == ()
    assert d.state.replicas_on(2) == held


def test_reprovisioning_is_not_held_back_by_the_move_cap_and_reports_no_room() -> None:
    d = cluster(4)
    create(d, "t", 12, 3)
    d.ok(SetClusterConfig({REPROVISION_MS: "0", "replica.moves.concurrent.max": "1"}))
    d.ok(MarkNodeDead(1, at_ms=1))
    plan = plan_moves(d.state, 1)
    assert len(plan.moves) == len(d.state.replicas_on(1))
    # Two nodes dead with RF 3 on 4 nodes: two live nodes cannot hold three replicas.
    d2 = cluster(4)
    create(d2, "t", 12, 3)
    d2.ok(SetClusterConfig({REPROVISION_MS: "0"}))
    d2.ok(MarkNodeDead(1, at_ms=1))
    d2.ok(MarkNodeDead(2, at_ms=1))
    plan = plan_moves(d2.state, 1)
    touched = {(t, a.partition) for t, a in d2.state.assignments() if {1, 2} & set(a.replicas)}
    assert touched and set(plan.stalled) == touched and plan.moves == ()
    assert all(s.startswith("no room") for s in plan.stalled.values())


def test_reprovisioning_respects_racks_and_load() -> None:
    d = cluster(6, racks=["a", "a", "b", "b", "c", "c"])
    create(d, "t", 12, 3)
    d.ok(SetClusterConfig({REPROVISION_MS: "0"}))
    d.ok(MarkNodeDead(1, at_ms=1))
    settle(d, 1)
    rack = {i: n.rack for i, n in d.state.nodes.items()}
    for _, a in d.state.assignments():
        assert len({rack[r] for r in a.replicas}) == 3, a
    # Rack spread wins over load: node 2, the other node of rack a, takes them all.
    counts = d.state.replica_counts()
    assert counts[1] == 0 and counts[2] == 12


def test_pick_replacement_never_doubles_a_replica_and_prefers_new_racks() -> None:
    nodes = [NodeInfo(1, "a"), NodeInfo(2, "a"), NodeInfo(3, "b"), NodeInfo(4, "c")]
    assert pick_replacement([1, 3], [1, 3], nodes, {2: 0, 4: 5}) == 4
    assert pick_replacement([1, 3], [1, 3], [NodeInfo(2), NodeInfo(4)], {2: 0, 4: 5}) == 2
    assert pick_replacement([1, 2], [1, 2, 3, 4], nodes, {}) is None


# ---- balance -------------------------------------------------------------------------------


def test_a_new_node_gets_replicas_until_counts_are_within_one() -> None:
    d = cluster(4)
    create(d, "t", 12, 3)
    d.ok(RegisterNode(5, "127.0.0.1:9005", ""))
    settle(d, 0)
    counts = d.state.replica_counts()
    assert counts[5] >= 7
    assert max(counts.values()) - min(counts.values()) <= 1
    for _, a in d.state.assignments():
        assert len(set(a.replicas)) == 3


def test_balance_goes_on_once_a_dead_node_holds_nothing() -> None:
    d = cluster(4)
    create(d, "t", 12, 3)
    d.ok(SetClusterConfig({REPROVISION_MS: "0"}))
    d.ok(MarkNodeDead(2, at_ms=1))
    settle(d, 10)
    d.ok(RegisterNode(5, "127.0.0.1:9005", ""))
    settle(d, 10)
    counts = {i: c for i, c in d.state.replica_counts().items() if i != 2}
    assert counts[5] > 0 and max(counts.values()) - min(counts.values()) <= 1


def test_replica_balance_can_be_switched_off() -> None:
    d = cluster(4)
    create(d, "t", 12, 3)
    d.ok(SetClusterConfig({"replica.balance.enable": "false"}))
    d.ok(RegisterNode(5, "127.0.0.1:9005", ""))
    assert plan_moves(d.state, 0).moves == ()


def _leaders_after(d: Driver, leaders: dict[int, int], budget: int = 1000) -> dict[int, int]:
    for t in plan_leader_transfers(d.state, leaders, budget):
        assert leaders[t.group_id] == t.from_node
        located = d.state.locate_group(t.group_id)
        assert located is not None and t.to_node in d.state.partition(*located).replicas
        leaders[t.group_id] = t.to_node
    return leaders


def test_leaders_end_balanced_after_a_rolling_restart() -> None:
    d = cluster(4)
    create(d, "t", 13, 3)
    # After the restarts every partition is led by the last node restarted among its replicas.
    leaders = {a.group_id: a.replicas[-1] for _, a in d.state.assignments()}
    leaders[d.part("t", 0).group_id] = d.part("t", 0).replicas[1]
    counts = Counter(_leaders_after(d, dict(leaders)).values())
    share = 13 / 4
    assert max(counts.values()) <= int(share) + 1
    assert max(counts.values()) - min(counts.get(i, 0) for i in (1, 2, 3, 4)) <= 1


def test_leader_transfers_respect_the_budget_skip_and_dead_nodes() -> None:
    d = cluster(3)
    create(d, "t", 9, 3)
    leaders = {a.group_id: 1 for _, a in d.state.assignments()}
    assert len(plan_leader_transfers(d.state, leaders, 2)) == 2
    skip = frozenset(list(leaders)[:5])
    assert all(t.group_id not in skip for t in plan_leader_transfers(d.state, leaders, 100, skip))
    d.ok(MarkNodeDead(3, at_ms=1))
    assert all(t.to_node != 3 for t in plan_leader_transfers(d.state, leaders, 100))
    balanced = {a.group_id: a.preferred_leader for _, a in d.state.assignments()}
    d2 = cluster(3)
    create(d2, "t", 9, 3)
    assert plan_leader_transfers(d2.state, balanced, 100) == []


def test_move_stall_reasons() -> None:
    d = cluster(4)
    create(d, "t", 1, 3)
    a = d.part()
    new_node = next(i for i in (1, 2, 3, 4) if i not in a.replicas)
    d.ok(MovePartitions((PartitionMove(a.group_id, (*a.replicas[:2], new_node)),)))
    assert move_stall(d.state, d.part(), has_leader=False) == "waiting for a leader"
    assert move_stall(d.state, d.part(), has_leader=True) == ""
    d.ok(MarkNodeDead(new_node, at_ms=1))
    assert move_stall(d.state, d.part(), has_leader=True).startswith("target down")


# ---- settings ------------------------------------------------------------------------------


def test_settings_validate_keys_and_values() -> None:
    assert validate_cluster_settings({REPROVISION_MS: "5000"}) == {REPROVISION_MS: "5000"}
    with pytest.raises(InvalidConfig, match="unknown cluster setting"):
        validate_cluster_settings({"replica.reprovision": "5000"})
    with pytest.raises(InvalidConfig, match="not an integer"):
        validate_cluster_settings({REPROVISION_MS: "5s"})
    with pytest.raises(InvalidConfig, match="out of range"):
        validate_cluster_settings({"leader.balance.transfers.per.second": "0"})
    with pytest.raises(InvalidConfig):
        validate_cluster_settings({"retention.ms": "-5"})
    assert cluster_setting({}, REPROVISION_MS) == 300_000
    listed = {s.key: s for s in describe_settings({REPROVISION_MS: "5000"})}
    assert listed[REPROVISION_MS].value == "5000" and not listed[REPROVISION_MS].is_default
    assert listed["retention.ms"].is_default and listed["retention.ms"].kind == "topic default"


def test_set_cluster_config_refuses_bad_input_and_changes_nothing() -> None:
    d = cluster(1)
    assert "unknown cluster setting" in d.refused(SetClusterConfig({"nope": "1"}))
    assert "unknown cluster setting" in d.refused(SetClusterConfig({}, ("nope",)))
    both = SetClusterConfig({REPROVISION_MS: "1"}, (REPROVISION_MS,))
    assert "both set and unset" in d.refused(both)


def test_cluster_topic_defaults_apply_below_topic_overrides() -> None:
    d = cluster(1)
    d.ok(CreateTopic("t", 1, 1, {"segment.ms": "5000"}, [(1,)]))
    d.ok(CreateTopic("u", 1, 1, {"retention.ms": "7"}, [(1,)]))
    d.ok(SetClusterConfig({"retention.ms": "60000", "segment.ms": "9000"}))
    t, u = d.state.topic("t"), d.state.topic("u")
    assert t.effective_configs()["retention.ms"] == "60000"
    assert t.effective_configs()["segment.ms"] == "5000"
    assert u.config().retention_ms == 7
    d.ok(SetClusterConfig({}, ("retention.ms",)))
    assert d.state.topic("t").effective_configs()["retention.ms"] == str(7 * 24 * 3600 * 1000)
    # A topic created later gets the cluster defaults too.
    d.ok(CreateTopic("v", 1, 1, {}, [(1,)]))
    assert d.state.topic("v").config().segment_ms == 9000
    # Topic overrides stay overrides only.
    assert dict(d.state.topic("v").configs) == {}


def test_registering_again_keeps_the_node_state() -> None:
    d = cluster(4)
    d.ok(SetNodeState(3, NODE_DRAINING))
    d.ok(RegisterNode(3, "127.0.0.1:9999", ""))
    assert d.state.nodes[3].state == NODE_DRAINING
    d.ok(SetNodeState(3, NODE_ACTIVE))
    assert d.state.nodes[3].active


def test_bad_node_state_is_refused() -> None:
    d = cluster(2)
    with pytest.raises(InvalidRequest, match="node state must be one of"):
        d.state.check(SetNodeState(1, "sleeping"))
    with pytest.raises(InvalidReplicationFactor):
        d2 = cluster(3)
        create(d2, "t", 1, 3)
        d2.state.check(SetNodeState(1, NODE_DRAINING))
