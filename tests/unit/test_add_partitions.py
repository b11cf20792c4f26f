"""Growing a topic (AddPartitions): placement of the new partitions, their group ids and
replica index, snapshots, and the requests the controller refuses."""

from __future__ import annotations

import pytest

from tests.unit.test_controller_state import cluster, content, rejected
from tidelog.controller.commands import AddPartitions, MarkNodeDead
from tidelog.controller.state import ClusterState, group_id_for
from tidelog.errors import InvalidPartitions, InvalidReplicationFactor, InvalidRequest, UnknownTopic


def test_a_topic_grows_with_new_partitions_placed_like_a_new_topic() -> None:
    d = cluster(3)
    d.ok(d.state.prepare_create_topic("orders", 2, 2))
    before = d.state.topic("orders")
    command = d.state.prepare_add_partitions("orders", 5)
    assert len(command.assignments) == 3
    result = d.ok(command)
    topic = d.state.topic("orders")
    assert result.changed and result.topic == topic
    assert topic.topic_id == before.topic_id
    # The old partitions are untouched; the new ones follow, with their own groups.
    assert topic.partitions[:2] == before.partitions
    assert [p.partition for p in topic.partitions] == list(range(5))
    for p in topic.partitions[2:]:
        assert p.replicas == command.assignments[p.partition - 2]
        assert len(set(p.replicas)) == 2 and p.preferred_leader == p.replicas[0]
        assert p.group_id == group_id_for(topic.topic_id, p.partition)
        assert d.state.locate_group(p.group_id) == ("orders", p.partition)
    for node in (1, 2, 3):
        hosted = {("orders", p.partition) for p in topic.partitions if node in p.replicas}
        assert d.state.replicas_on(node) == hosted
    # Ten replicas over three nodes: as even as it gets.
    assert sorted(d.state.replica_counts().values()) == [3, 3, 4]
    # A snapshot carries the grown topic.
    assert content(ClusterState.from_snapshot(d.state.snapshot())) == content(d.state)


def test_new_partitions_go_to_live_nodes_only() -> None:
    d = cluster(4)
    d.ok(d.state.prepare_create_topic("t", 1, 3))
    d.ok(MarkNodeDead(4))
    command = d.state.prepare_add_partitions("t", 4)
    assert all(4 not in replicas for replicas in command.assignments)


@pytest.mark.parametrize(
    ("total", "error", "text"),
    [
        (2, InvalidPartitions, "only grows"),
        (1, InvalidPartitions, "only grows"),
        (10**6, InvalidPartitions, "at most"),
    ],
)
def test_prepare_refuses_what_cannot_grow(total: int, error: type[Exception], text: str) -> None:
    d = cluster(3)
    d.ok(d.state.prepare_create_topic("t", 2, 3))
    with pytest.raises(error, match=text):
        d.state.prepare_add_partitions("t", total)


def test_prepare_refuses_unknown_topics_and_too_few_live_nodes() -> None:
    d = cluster(3)
    with pytest.raises(UnknownTopic):
        d.state.prepare_add_partitions("nope", 3)
    d.ok(d.state.prepare_create_topic("t", 1, 3))
    d.ok(MarkNodeDead(3))
    with pytest.raises(InvalidReplicationFactor, match="start more nodes"):
        d.state.prepare_add_partitions("t", 2)


def test_apply_refuses_bad_commands_and_changes_nothing() -> None:
    d = cluster(3)
    d.ok(d.state.prepare_create_topic("t", 1, 2))
    rejected(d, AddPartitions("nope", [(1, 2)]), UnknownTopic)
    rejected(d, AddPartitions("t", []), InvalidPartitions, "at least one")
    rejected(d, AddPartitions("t", [(1,)]), InvalidRequest, "not 2 distinct nodes")
    rejected(d, AddPartitions("t", [(1, 1)]), InvalidRequest, "not 2 distinct nodes")
    rejected(d, AddPartitions("t", [(1, 9)]), InvalidRequest, "node 9 is not registered")
    d.ok(MarkNodeDead(2))
    rejected(d, AddPartitions("t", [(1, 2)]), InvalidRequest, "node 2 is dead")


def test_a_compacted_topic_does_not_grow() -> None:
    """Its keys would map to other partitions than their current values (and its table's
    reads by key would miss them)."""
    d = cluster(3)
    d.ok(d.state.prepare_create_topic("rates", 2, 2, {"cleanup.policy": "compact"}))
    with pytest.raises(InvalidPartitions, match="is compacted"):
        d.state.prepare_add_partitions("rates", 4)
    rejected(d, AddPartitions("rates", [(1, 2)]), InvalidPartitions, "is compacted")
