"""Force-recovering a partition that lost a majority (issue 11 item 10), without processes:
the refusals, the choice of survivor, the report of what may be lost, the controller command
(its encoding, checks and effect on the assignment and on reprovisioning)."""

from __future__ import annotations

import pytest

from tidelog.controller.commands import (
    Command,
    CommandDecodeError,
    ForceRecoverPartition,
    MarkNodeDead,
    MovePartitions,
    PartitionMove,
    RegisterNode,
    ReplicaReport,
    UpdatePartitionReplicas,
    decode_command,
    encode_command,
)
from tidelog.controller.placement import NodeInfo
from tidelog.controller.recovery import (
    SurvivorLog,
    check_force_recover,
    choose_survivor,
    loss_report,
    refill_target,
)
from tidelog.controller.state import NO_LEADER, ApplyResult, ClusterState
from tidelog.errors import InvalidRequest


class Driver:
    def __init__(self, nodes: int) -> None:
        self.state = ClusterState()
        self.index = 0
        for i in range(1, nodes + 1):
            self.ok(RegisterNode(i, f"127.0.0.1:{9000 + i}", ""))

    def apply(self, command: Command) -> ApplyResult:
        self.index += 1
        return self.state.apply(self.index, command)

    def ok(self, command: Command) -> ApplyResult:
        result = self.apply(command)
        assert result.ok, result.error
        return result


def test_refused_when_a_majority_is_alive_or_nobody_survives() -> None:
    alive = {1: True, 2: True, 3: False}
    with pytest.raises(InvalidRequest, match="majority of its replicas is alive"):
        check_force_recover("t/0", (1, 2, 3), alive)
    with pytest.raises(InvalidRequest, match="no replica survives"):
        check_force_recover("t/0", (1, 2, 3), {1: False, 2: False, 3: False})
    assert check_force_recover("t/0", (1, 2, 3), {1: False, 2: True, 3: False}) == (2,)
    # Five replicas, two alive: a minority; survivors in replica order.
    five = {1: False, 2: True, 3: False, 4: True, 5: False}
    assert check_force_recover("t/0", (4, 1, 2, 3, 5), five) == (4, 2)
    # Two of four alive is no majority either.
    assert check_force_recover("t/0", (1, 2, 3, 4), {1: True, 2: True}) == (1, 2)


def test_the_most_up_to_date_survivor_is_chosen() -> None:
    a = SurvivorLog(1, last_term=3, last_index=90, log_end_offset=900, high_watermark=850)
    b = SurvivorLog(2, last_term=4, last_index=80, log_end_offset=800, high_watermark=790)
    c = SurvivorLog(3, last_term=4, last_index=85, log_end_offset=850, high_watermark=790)
    # The last term first (a longer log of an older term loses), then the index.
    assert choose_survivor([a, b, c]) == c
    assert choose_survivor([a, b]) == b
    # A tie goes to the lowest node id.
    d = SurvivorLog(4, 4, 85, 850, 700)
    assert choose_survivor([d, c]).node_id == 3
    with pytest.raises(ValueError):
        choose_survivor([])


def test_the_loss_report_names_what_is_kept_and_what_may_be_lost() -> None:
    chosen = SurvivorLog(3, 4, 85, 850, 790)
    older = SurvivorLog(1, 3, 90, 900, 800)
    acked, text = loss_report("t/0", chosen, [chosen, older], [2])
    assert acked == 800
    assert "FORCE-RECOVERED from node 3" in text
    assert "offsets below 850" in text
    assert "POSSIBLY LOST: acknowledged records at offsets 850 and above" in text
    assert "replicas dropped: [2]" in text
    assert "node 1 held offsets up to 899" in text
    # Records held past the known high watermark become committed: said so.
    assert "offsets 800..849 were held but not known acknowledged" in text


def test_the_command_encodes_strictly() -> None:
    c = ForceRecoverPartition(10_001, (3, 1))
    assert decode_command(encode_command(c)) == c
    bad = encode_command(c).replace(b"[3,1]", b'["3",1]')
    with pytest.raises(CommandDecodeError, match="survivors"):
        decode_command(bad)


def test_the_survivors_become_the_replicas_and_reprovisioning_follows() -> None:
    d = Driver(5)
    d.ok(d.state.prepare_create_topic("t", 1, 3))
    a = d.state.partition("t", 0)
    r1, r2, r3 = a.replicas
    d.ok(MarkNodeDead(r1, at_ms=1))
    d.ok(MarkNodeDead(r2, at_ms=1))
    d.ok(ForceRecoverPartition(a.group_id, (r3,)))
    b = d.state.partition("t", 0)
    assert b.replicas == (r3,)
    assert b.preferred_leader == r3
    assert b.target is None and b.leader == NO_LEADER
    # The dead nodes hold nothing any more (they delete their replicas when they return).
    assert ("t", 0) not in d.state.replicas_on(r1)
    assert ("t", 0) not in d.state.replicas_on(r2)
    # Kept across a snapshot.
    again = ClusterState.from_snapshot(d.state.snapshot())
    assert again.partition("t", 0).replicas == (r3,)
    # The move back to RF 3 on the live nodes, racks and load respected.
    nodes = [NodeInfo(i, None) for i in d.state.active_node_ids()]
    target = refill_target(b.replicas, 3, nodes, d.state.replica_counts(), (r1, r2))
    assert target is not None and target[0] == r3 and len(set(target)) == 3
    assert not {r1, r2} & set(target)
    d.ok(MovePartitions((PartitionMove(a.group_id, target),)))
    # The new leader reports the committed configuration: the move ends at RF 3.
    d.ok(UpdatePartitionReplicas((ReplicaReport(a.group_id, 9, target),)))
    assert d.state.partition("t", 0).replicas == target


def test_refill_needs_free_live_nodes() -> None:
    nodes = [NodeInfo(3, None)]
    assert refill_target((3,), 3, nodes, {3: 1}) is None
    assert refill_target((3, 4, 5), 3, nodes, {}) is None


def test_bad_commands_are_refused() -> None:
    d = Driver(3)
    d.ok(d.state.prepare_create_topic("t", 1, 3))
    a = d.state.partition("t", 0)
    for c, match in [
        (ForceRecoverPartition(999_999_999, (1,)), "no partition has Raft group"),
        (ForceRecoverPartition(a.group_id, ()), "distinct survivors"),
        (ForceRecoverPartition(a.group_id, (1, 1)), "distinct survivors"),
    ]:
        result = d.apply(c)
        assert result.error is not None and match in result.error.message
    d.ok(RegisterNode(4, "127.0.0.1:9004", ""))
    result = d.apply(ForceRecoverPartition(a.group_id, (4,)))
    assert result.error is not None and "not replicas of the partition" in result.error.message
    assert d.state.partition("t", 0) == a


def test_reprovisioning_fills_a_recovered_partition_once_nodes_can_take_replicas() -> None:
    from tidelog.controller.planning import plan_moves

    d = Driver(3)
    d.ok(d.state.prepare_create_topic("t", 1, 3))
    a = d.state.partition("t", 0)
    d.ok(MarkNodeDead(2, at_ms=1))
    d.ok(MarkNodeDead(3, at_ms=1))
    d.ok(ForceRecoverPartition(a.group_id, (1,)))
    # No live node without a replica: nothing to plan (and the dead hold nothing now).
    assert [m for m in plan_moves(d.state, 10**13).moves if m.group_id == a.group_id] == []
    d.ok(RegisterNode(4, "127.0.0.1:9004", ""))
    d.ok(RegisterNode(5, "127.0.0.1:9005", ""))
    moves = [m for m in plan_moves(d.state, 10**13).moves if m.group_id == a.group_id]
    assert moves == [PartitionMove(a.group_id, (1, 4, 5))]
    d.ok(MovePartitions(tuple(moves)))
    assert d.state.partition("t", 0).target == (1, 4, 5)
    # A move in progress is not planned again.
    assert [m for m in plan_moves(d.state, 10**13).moves if m.group_id == a.group_id] == []
