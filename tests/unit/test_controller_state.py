"""ClusterState: applying each command, rejections that change nothing, leader hints, group
ids, snapshots, and determinism over random command sequences."""

from __future__ import annotations

import json
import random
import struct
from typing import Any

import crc32c
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tidelog.config import TOPIC_CONFIG_KEYS
from tidelog.controller.commands import (
    AllocateProducerIds,
    AlterTopicConfig,
    Command,
    CommandDecodeError,
    CreateTopic,
    DeleteTopic,
    LeaderHint,
    MarkNodeAlive,
    MarkNodeDead,
    RegisterNode,
    UpdatePartitionLeaders,
    decode_command,
    encode_command,
)
from tidelog.controller.state import (
    CONTROLLER_GROUP_ID,
    GROUP_ID_STRIDE,
    NO_LEADER,
    ApplyResult,
    ClusterState,
    CorruptSnapshot,
    group_id_for,
    split_group_id,
)
from tidelog.errors import (
    InvalidConfig,
    InvalidPartitions,
    InvalidReplicationFactor,
    InvalidRequest,
    InvalidTopic,
    NodeIdentityConflict,
    TidelogError,
    TopicExists,
    UnknownPartition,
    UnknownTopic,
)


class Driver:
    """Feeds commands at increasing indexes, as the Raft driver does with committed entries."""

    def __init__(self, state: ClusterState | None = None) -> None:
        self.state = state or ClusterState()
        self.index = self.state.applied_index

    def apply(self, command: Command) -> ApplyResult:
        self.index += 1
        return self.state.apply(self.index, command)

    def ok(self, command: Command) -> ApplyResult:
        result = self.apply(command)
        assert result.ok, result.error
        return result


def cluster(nodes: int = 3, racks: bool = False) -> Driver:
    d = Driver()
    for i in range(1, nodes + 1):
        d.ok(
            RegisterNode(
                i, f"127.0.0.1:{9000 + i}", f"127.0.0.1:{9100 + i}", f"r{i % 2}" if racks else None
            )
        )
    return d


def content(state: ClusterState) -> dict[str, Any]:
    """The metadata without the driver's progress counter."""
    out = state.describe()
    del out["applied_index"]
    return out


def rejected(d: Driver, command: Command, error: type[TidelogError], text: str = "") -> None:
    before = content(d.state)
    result = d.apply(command)
    assert isinstance(result.error, error), result.error
    assert text in result.error.message
    assert not result.changed
    assert d.state.applied_index == d.index
    assert content(d.state) == before


# -- nodes ---------------------------------------------------------------------------------


def test_register_and_reregister() -> None:
    d = cluster(2)
    assert d.state.live_node_ids() == [1, 2]
    assert d.state.version == 2
    node = d.state.nodes[2]
    assert (node.address, node.metrics_address, node.alive, node.registered_at_index) == (
        "127.0.0.1:9002",
        "127.0.0.1:9102",
        True,
        2,
    )
    # The same registration again changes nothing.
    result = d.ok(RegisterNode(2, "127.0.0.1:9002", "127.0.0.1:9102"))
    assert not result.changed and d.state.version == 2
    # A restart at a new address, after being marked dead: alive again, first index kept.
    d.ok(MarkNodeDead(2))
    d.ok(RegisterNode(2, "127.0.0.1:9999", "", "rack-z"))
    node = d.state.nodes[2]
    assert (node.address, node.rack, node.alive, node.registered_at_index) == (
        "127.0.0.1:9999",
        "rack-z",
        True,
        2,
    )
    assert d.state.version == d.index


def test_a_registered_id_moves_only_with_its_data_directory() -> None:
    """Issue 9: a forged RegisterNode moved node 2 to the forger's address, and nodes 1 and 3
    replicated to it. Re-registering from another address takes the same directory id."""
    d = cluster(1)
    d.ok(RegisterNode(2, "127.0.0.1:9002", "", directory_id="dir-a"))
    # The same data directory at a new address (the node moved with its disk): accepted.
    d.ok(RegisterNode(2, "127.0.0.1:7002", "", directory_id="dir-a"))
    assert d.state.nodes[2].address == "127.0.0.1:7002"
    # Another data directory, or none, from another address: refused, alive or dead.
    for directory_id in ("dir-forged", ""):
        rejected(d, RegisterNode(2, "10.9.9.9:1", "", directory_id=directory_id),
                 NodeIdentityConflict, "registered at 127.0.0.1:7002 with another data")  # fmt: skip
    d.ok(MarkNodeDead(2))
    rejected(d, RegisterNode(2, "10.9.9.9:1", "", directory_id="dir-forged"),
             NodeIdentityConflict, "with another data directory")  # fmt: skip
    node = d.state.nodes[2]
    assert (node.address, node.directory_id, node.alive) == ("127.0.0.1:7002", "dir-a", False)


def test_a_new_data_directory_at_the_same_address_waits_for_the_old_one_to_be_dead() -> None:
    d = cluster(1)
    d.ok(RegisterNode(2, "127.0.0.1:9002", "", directory_id="dir-a"))
    # While the registered incarnation is alive, a second one (or a forger) is refused...
    rejected(d, RegisterNode(2, "127.0.0.1:9002", "", directory_id="dir-b"),
             NodeIdentityConflict, "is alive with another data directory")  # fmt: skip
    assert d.state.nodes[2].directory_id == "dir-a"
    # ...and a wiped disk at the same place is the node again once the old one is dead.
    d.ok(MarkNodeDead(2))
    d.ok(RegisterNode(2, "127.0.0.1:9002", "", directory_id="dir-b"))
    node = d.state.nodes[2]
    assert (node.directory_id, node.alive) == ("dir-b", True)
    rejected(d, RegisterNode(2, "127.0.0.1:9002", "", directory_id="dir-a"),
             NodeIdentityConflict, "alive")  # fmt: skip


def test_a_node_registered_without_a_directory_id_takes_its_first_one() -> None:
    d = cluster(2)  # registered as older versions did, without a directory id
    assert d.state.nodes[2].directory_id == ""
    d.ok(RegisterNode(2, "127.0.0.1:8002", "", directory_id="dir-a"))
    assert d.state.nodes[2].directory_id == "dir-a"
    # From then on a registration without one is another data directory.
    rejected(d, RegisterNode(2, "127.0.0.1:8002", ""), NodeIdentityConflict, "alive")
    assert d.state.nodes[2].directory_id == "dir-a"
    rejected(d, RegisterNode(2, "127.0.0.1:4", "", directory_id="d" * 65), InvalidRequest,
             "directory id is longer")  # fmt: skip


def test_directory_ids_survive_snapshots_and_old_snapshots_load() -> None:
    d = cluster(1)
    d.ok(RegisterNode(2, "127.0.0.1:9002", "", directory_id="dir-a"))
    restored = ClusterState.from_snapshot(d.state.snapshot())
    assert restored.nodes[2].directory_id == "dir-a"
    assert restored.nodes[1].directory_id == ""
    body = json.loads(d.state.snapshot()[9:])
    body["nodes"] = [row[:6] for row in body["nodes"]]  # as written before directory ids
    old = ClusterState.from_snapshot(_forge(body))
    assert old.nodes[2].directory_id == "" and old.nodes[2].address == "127.0.0.1:9002"


@pytest.mark.parametrize(
    ("command", "text"),
    [
        (RegisterNode(0, "a:1"), "node id must be in"),
        (RegisterNode(-3, "a:1"), "node id must be in"),
        (RegisterNode(2**31, "a:1"), "node id must be in"),
        (RegisterNode(4, ""), "address must be"),
        (RegisterNode(4, "a" * 256), "address must be"),
        (RegisterNode(4, "a:1", "m" * 256), "metrics address"),
        (RegisterNode(4, "a:1", "", ""), "rack must be"),
        (MarkNodeDead(9), "node 9 is not registered"),
        (MarkNodeAlive(9), "node 9 is not registered"),
    ],
)
def test_node_rejections(command: Command, text: str) -> None:
    rejected(cluster(), command, InvalidRequest, text)


def test_dead_and_alive() -> None:
    d = cluster(3)
    d.ok(MarkNodeDead(2))
    assert d.state.live_node_ids() == [1, 3]
    version = d.state.version
    assert not d.ok(MarkNodeDead(2)).changed
    assert d.state.version == version
    d.ok(MarkNodeAlive(2))
    assert d.state.live_node_ids() == [1, 2, 3]
    assert not d.ok(MarkNodeAlive(2)).changed


# -- topics --------------------------------------------------------------------------------


def test_create_topic() -> None:
    d = cluster(3)
    command = d.state.prepare_create_topic("orders", 6, 2, {"retention.ms": "60000"})
    result = d.ok(command)
    topic = d.state.topic("orders")
    assert result.changed and result.topic == topic
    assert d.state.version == d.index == topic.topic_id
    assert topic.replication_factor == 2
    assert dict(topic.configs) == {"retention.ms": "60000"}
    assert topic.effective_configs()["retention.ms"] == "60000"
    assert topic.effective_configs()["flush"] == "durable"
    assert topic.config().retention_ms == 60000
    assert [p.partition for p in topic.partitions] == list(range(6))
    for p in topic.partitions:
        assert p.replicas == command.assignments[p.partition]
        assert p.preferred_leader == p.replicas[0]
        assert p.leader == NO_LEADER
        assert p.group_id == group_id_for(topic.topic_id, p.partition)
        assert d.state.partition_group_id("orders", p.partition) == p.group_id
        assert d.state.locate_group(p.group_id) == ("orders", p.partition)
    for node in (1, 2, 3):
        hosted = {("orders", p.partition) for p in topic.partitions if node in p.replicas}
        assert d.state.replicas_on(node) == hosted
        assert len(hosted) == 4
    assert d.state.replica_counts() == {1: 4, 2: 4, 3: 4}
    assert d.state.preferred_leader_counts() == {1: 2, 2: 2, 3: 2}


def test_prepared_topics_spread_over_the_cluster() -> None:
    d = cluster(4)
    for i in range(8):
        d.ok(d.state.prepare_create_topic(f"t{i}", 1, 2))
    assert set(d.state.replica_counts().values()) == {4}
    assert set(d.state.preferred_leader_counts().values()) == {2}


def test_placement_skips_dead_nodes_and_respects_racks() -> None:
    d = cluster(4, racks=True)  # racks r1: 1, 3; r0: 2, 4
    d.ok(MarkNodeDead(4))
    command = d.state.prepare_create_topic("t", 6, 2)
    for replicas in command.assignments:
        assert 4 not in replicas
        assert 2 in replicas  # the only live node of rack r0


def _create(name: str, partitions: int, rf: int, assignments: list[tuple[int, ...]]) -> CreateTopic:
    return CreateTopic(name, partitions, rf, {}, assignments)


@pytest.mark.parametrize(
    ("command", "error", "text"),
    [
        (_create("bad name", 1, 1, [(1,)]), InvalidTopic, "contains ' '"),
        (_create("", 1, 1, [(1,)]), InvalidTopic, "empty"),
        (_create("..", 1, 1, [(1,)]), InvalidTopic, "not allowed"),
        (_create("exists", 1, 1, [(1,)]), TopicExists, "already exists"),
        (_create("t", 0, 1, []), InvalidPartitions, "topic 't': partitions must be at least 1"),
        (_create("t", 10_001, 1, []), InvalidPartitions, "at most"),
        (_create("t", 1, 0, [()]), InvalidReplicationFactor, "at least 1"),
        (_create("t", 1, 3, [(1, 2, 3)]), InvalidReplicationFactor, "2 live nodes [1, 2]"),
        (
            CreateTopic("t", 1, 1, {"retention.msec": "1"}, [(1,)]),
            InvalidConfig,
            "unknown topic config 'retention.msec'",
        ),
        (CreateTopic("t", 1, 1, {"flush": "never"}, [(1,)]), InvalidConfig, "flush='never'"),
        (_create("t", 2, 1, [(1,)]), InvalidRequest, "1 assignments for 2 partitions"),
        (_create("t", 1, 2, [(1,)]), InvalidRequest, "not 2 distinct nodes"),
        (_create("t", 1, 2, [(1, 1)]), InvalidRequest, "not 2 distinct nodes"),
        (_create("t", 1, 1, [(3,)]), InvalidRequest, "replica node 3 is dead"),
        (_create("t", 1, 1, [(8,)]), InvalidRequest, "replica node 8 is not registered"),
    ],
)
def test_create_rejections(command: CreateTopic, error: type[TidelogError], text: str) -> None:
    d = cluster(3)
    d.ok(_create("exists", 1, 1, [(1,)]))
    d.ok(MarkNodeDead(3))
    rejected(d, command, error, text)
    # The proposer's helper raises the same errors, for all but the assignments it computes.
    if error is InvalidRequest:
        return
    with pytest.raises(error):
        d.state.prepare_create_topic(
            command.name, command.partitions, command.replication_factor, command.configs
        )


def test_delete_and_recreate_topic() -> None:
    d = cluster(3)
    d.ok(d.state.prepare_create_topic("t", 3, 3))
    old = d.state.topic("t")
    d.ok(DeleteTopic("t"))
    assert "t" not in d.state.topics
    assert all(d.state.replicas_on(n) == frozenset() for n in (1, 2, 3))
    assert d.state.replica_counts() == {1: 0, 2: 0, 3: 0}
    assert d.state.locate_group(old.partitions[0].group_id) is None
    rejected(d, DeleteTopic("t"), UnknownTopic, "unknown topic 't'")
    d.ok(d.state.prepare_create_topic("t", 3, 3))
    new = d.state.topic("t")
    assert new.topic_id > old.topic_id
    assert {p.group_id for p in new.partitions}.isdisjoint(p.group_id for p in old.partitions)


def test_alter_topic_config() -> None:
    d = cluster(1)
    d.ok(CreateTopic("t", 1, 1, {"retention.ms": "5000"}, [(1,)]))
    result = d.ok(AlterTopicConfig("t", {"segment.bytes": "8192"}, ("retention.ms",)))
    assert result.changed
    assert result.topic is not None and dict(result.topic.configs) == {"segment.bytes": "8192"}
    assert d.state.version == d.index
    # Setting what is set and deleting what is absent changes nothing.
    version = d.state.version
    result = d.ok(AlterTopicConfig("t", {"segment.bytes": "8192"}, ("retention.bytes",)))
    assert not result.changed and d.state.version == version
    assert result.topic == d.state.topic("t")


@pytest.mark.parametrize(
    ("command", "error", "text"),
    [
        (AlterTopicConfig("nope", {}), UnknownTopic, "unknown topic 'nope'"),
        (
            AlterTopicConfig("t", {"flush": "os"}, ("flush",)),
            InvalidRequest,
            "both set and deleted",
        ),
        (AlterTopicConfig("t", {"flush": "maybe"}), InvalidConfig, "topic 't': flush='maybe'"),
        (AlterTopicConfig("t", {"colour": "red"}), InvalidConfig, "unknown topic config"),
        (AlterTopicConfig("t", {}, ("colour",)), InvalidConfig, "cannot delete unknown configs"),
    ],
)
def test_alter_rejections(command: Command, error: type[TidelogError], text: str) -> None:
    d = cluster(1)
    d.ok(CreateTopic("t", 1, 1, {"retention.ms": "5000"}, [(1,)]))
    rejected(d, command, error, text)


def test_lookups_name_what_is_missing() -> None:
    d = cluster(1)
    d.ok(_create("t", 2, 1, [(1,), (1,)]))
    with pytest.raises(UnknownTopic, match="create it first"):
        d.state.topic("u")
    with pytest.raises(UnknownPartition, match=r"partitions are 0\.\.1"):
        d.state.partition("t", 2)
    with pytest.raises(UnknownPartition):
        d.state.partition_group_id("t", -1)


# -- group ids -----------------------------------------------------------------------------


def test_group_ids() -> None:
    assert group_id_for(1, 0) == GROUP_ID_STRIDE
    assert group_id_for(7, 9_999) == 7 * GROUP_ID_STRIDE + 9_999
    assert split_group_id(group_id_for(123, 45)) == (123, 45)
    for bad in ((0, 0), (1, -1), (1, GROUP_ID_STRIDE), (2**62, 0)):
        with pytest.raises(ValueError):
            group_id_for(*bad)
    with pytest.raises(ValueError):
        split_group_id(CONTROLLER_GROUP_ID)
    assert ClusterState().locate_group(CONTROLLER_GROUP_ID) is None
    assert ClusterState().locate_group(group_id_for(5, 0)) is None


# -- leader hints --------------------------------------------------------------------------


def hints(*items: tuple[int, int, int]) -> UpdatePartitionLeaders:
    return UpdatePartitionLeaders(tuple(LeaderHint(*i) for i in items))


def test_leader_hints() -> None:
    d = cluster(3)
    d.ok(_create("t", 2, 3, [(1, 2, 3), (2, 3, 1)]))
    g0, g1 = (p.group_id for p in d.state.topic("t").partitions)

    def leaders() -> list[tuple[int, int]]:
        return [(p.leader, p.leader_term) for p in d.state.topic("t").partitions]

    assert d.ok(hints((g0, 2, 4), (g1, 0, 2))).changed
    assert leaders() == [(2, 4), (0, 2)]
    assert d.state.version == d.index
    version = d.state.version
    # Stale or irrelevant hints change nothing: an older term, the same term again, a
    # non-replica, the controller group, an unknown group.
    stale = hints(
        (g0, 1, 3), (g0, 3, 4), (g1, 9, 5), (CONTROLLER_GROUP_ID, 1, 9), (group_id_for(99, 0), 1, 1)
    )
    assert not d.ok(stale).changed
    assert leaders() == [(2, 4), (0, 2)] and d.state.version == version
    # A leader found in a term recorded as leaderless; later hints in one command win.
    d.ok(hints((g1, 3, 2), (g0, 1, 5), (g0, 3, 6)))
    assert leaders() == [(3, 6), (3, 2)]
    # A dead node loses its leaderships and cannot get them back through a stale hint.
    d.ok(MarkNodeDead(3))
    assert leaders() == [(0, 6), (0, 2)]
    assert not d.ok(hints((g0, 3, 7))).changed
    d.ok(hints((g0, 1, 7)))
    assert leaders() == [(1, 7), (0, 2)]


@pytest.mark.parametrize(
    "hint",
    [
        (-1, 1, 1),
        (10_000, 1, -1),
        (10_000, -1, 1),
        (10_000, 2**31, 1),
        # Beyond int64: Metadata's leader_term could not carry it (issue 9).
        (10_000, 1, 2**63),
        (10_000, 1, 2**64 - 1),
        (2**63, 1, 1),
    ],
)
def test_malformed_hints_are_rejected(hint: tuple[int, int, int]) -> None:
    d = cluster(1)
    d.ok(_create("t", 1, 1, [(1,)]))
    rejected(d, hints(hint), InvalidRequest, "malformed leader hint")


def test_leader_hints_survive_snapshots() -> None:
    d = cluster(3)
    d.ok(_create("t", 1, 3, [(1, 2, 3)]))
    d.ok(hints((d.state.partition_group_id("t", 0), 2, 8)))
    restored = ClusterState.from_snapshot(d.state.snapshot())
    assert restored.partition("t", 0).leader == 2
    assert restored.partition("t", 0).leader_term == 8


# -- driver contract -----------------------------------------------------------------------


def test_indexes_must_increase_gaps_allowed() -> None:
    state = ClusterState()
    state.apply(5, RegisterNode(1, "a:1"))
    with pytest.raises(ValueError, match="indexes must increase"):
        state.apply(5, RegisterNode(2, "a:2"))
    state.apply(9, RegisterNode(2, "a:2"))
    assert (state.applied_index, state.version) == (9, 9)
    assert state.nodes[2].registered_at_index == 9


def test_apply_encoded() -> None:
    state = ClusterState()
    assert state.apply_encoded(1, encode_command(RegisterNode(1, "a:1"))).ok
    with pytest.raises(CommandDecodeError):
        state.apply_encoded(2, b"{}")
    assert state.applied_index == 1


def test_not_a_command() -> None:
    with pytest.raises(TypeError):
        ClusterState().apply(1, "register")  # type: ignore[arg-type]


def test_raise_for_error() -> None:
    d = cluster(1)
    assert d.ok(MarkNodeAlive(1)).raise_for_error().ok
    with pytest.raises(UnknownTopic):
        d.apply(DeleteTopic("t")).raise_for_error()


# -- snapshots -----------------------------------------------------------------------------


def populated() -> ClusterState:
    d = cluster(4, racks=True)
    d.ok(d.state.prepare_create_topic("a", 5, 3, {"flush": "os"}))
    d.ok(d.state.prepare_create_topic("b", 2, 1))
    d.ok(MarkNodeDead(4))
    d.ok(hints((d.state.partition_group_id("a", 1), d.state.partition("a", 1).replicas[1], 3)))
    d.apply(DeleteTopic("missing"))  # rejected: advances applied_index only
    return d.state


def test_snapshot_round_trip() -> None:
    state = populated()
    data = state.snapshot()
    restored = ClusterState.from_snapshot(data)
    assert restored.snapshot() == data
    assert restored.describe() == state.describe()
    assert restored.applied_index == state.applied_index > restored.version
    for node in range(1, 5):
        assert restored.replicas_on(node) == state.replicas_on(node)
    topic = restored.topic("a")
    assert restored.locate_group(topic.partitions[4].group_id) == ("a", 4)
    # Restoring replaces what was there.
    other = cluster(1).state
    other.restore(data)
    assert other.snapshot() == data


def test_internal_addresses_survive_snapshots_and_old_rows_still_load() -> None:
    state = ClusterState()
    state.apply(1, RegisterNode(1, "h:1", internal_address="h:2"))
    state.apply(2, RegisterNode(2, "g:1"))
    restored = ClusterState.from_snapshot(state.snapshot())
    assert restored.nodes[1].internal_address == "h:2"
    assert restored.nodes[2].internal_address == ""
    assert restored.snapshot() == state.snapshot()
    body = _body(state)
    # node id, address, metrics address, rack, alive, registered at, directory id, internal
    assert [len(row) for row in body["nodes"]] == [8, 8]
    # Rows written before the internal listener (7 fields) or directory ids (6) still load.
    for width in (6, 7):
        old = dict(body, nodes=[row[:width] for row in body["nodes"]])
        loaded = ClusterState.from_snapshot(_forge(old))
        assert [n.internal_address for n in loaded.nodes.values()] == ["", ""]


def _forge(body: dict[str, Any]) -> bytes:
    """A snapshot with a valid checksum around whatever body the test wants."""
    raw = json.dumps(body).encode()
    return struct.pack(">4sBI", b"TLCS", 1, crc32c.crc32c(raw)) + raw


def _body(state: ClusterState) -> dict[str, Any]:
    body: dict[str, Any] = json.loads(state.snapshot()[9:])
    return body


def test_forge_helper_matches_the_format() -> None:
    state = populated()
    assert ClusterState.from_snapshot(_forge(_body(state))).snapshot() == state.snapshot()


@pytest.mark.parametrize(
    ("damage", "text"),
    [
        (lambda b: b[:5], "shorter than its header"),
        (lambda b: b"XXXX" + b[4:], "not a controller snapshot"),
        (lambda b: b[:4] + b"\x02" + b[5:], "format 2"),
        (lambda b: b[:-2] + b"0}", "CRC-32C"),
        (lambda b: b + b" ", "CRC-32C"),
    ],
)
def test_corrupt_snapshots_are_refused(damage: Any, text: str) -> None:
    state = populated()
    before = state.snapshot()
    with pytest.raises(CorruptSnapshot, match=text):
        state.restore(damage(before))
    assert state.snapshot() == before


def _edit(path: str, value: Any) -> Any:
    def edit(body: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        target: Any = body
        for key in parents:
            target = target[int(key)] if key.isdigit() else target[key]
        target[int(last) if last.isdigit() else last] = value

    return edit


@pytest.mark.parametrize(
    "edit",
    [
        _edit("version", 10**6),
        _edit("nodes.1.0", 1),  # a repeated node id
        _edit("nodes.0.0", 0),
        _edit("nodes.0.4", "yes"),
        _edit("nodes.0.5", 10**6),
        _edit("topics.0.name", "bad name"),
        _edit("topics.1.topic_id", 5),  # the id of topic "a"
        _edit("topics.0.topic_id", 10**6),
        _edit("topics.0.configs", {"flush": "sometimes"}),
        _edit("topics.0.partitions.0.0", [1, 1, 2]),
        _edit("topics.0.partitions.0.0", [1, 2, 9]),
        _edit("topics.0.partitions.0.1", 9),
        _edit("topics.0.partitions.0.2", 9),
        _edit("topics.0.partitions", []),
        _edit("topics.0.partitions.0", [[1, 2, 3], 1]),
        _edit("topics", {}),
        _edit("nodes", None),
    ],
)
def test_inconsistent_snapshots_are_refused(edit: Any) -> None:
    state = populated()
    body = _body(state)
    edit(body)
    with pytest.raises(CorruptSnapshot, match="inconsistent"):
        state.restore(_forge(body))
    with pytest.raises(CorruptSnapshot):
        ClusterState.from_snapshot(_forge([]))  # type: ignore[arg-type]


# -- determinism ---------------------------------------------------------------------------


def random_command(rnd: random.Random, state: ClusterState) -> Command:
    """A plausible mix of valid, stale and invalid commands, as a faulty world produces."""
    names = ["a", "b", "c", "bad name"]
    kind = rnd.randrange(8)
    node = rnd.randint(0, 7)
    if kind == 0:
        rack = rnd.choice([None, "r1", "r2", "r3", ""])
        return RegisterNode(node, f"10.0.0.{node}:{rnd.choice([1, 2])}", "", rack)
    if kind == 1:
        return MarkNodeDead(node)
    if kind == 2:
        return MarkNodeAlive(node)
    if kind in (3, 4):
        name, partitions, rf = rnd.choice(names), rnd.randint(0, 6), rnd.randint(0, 4)
        configs = rnd.choice([{}, {"flush": "os"}, {"flush": "never"}])
        try:
            return state.prepare_create_topic(name, partitions, rf, configs)
        except TidelogError:
            assignments = [tuple(rnd.sample(range(1, 8), rf)) for _ in range(partitions)]
            return CreateTopic(name, partitions, rf, configs, assignments)
    if kind == 5:
        return DeleteTopic(rnd.choice(names))
    if kind == 6:
        key = rnd.choice(sorted(TOPIC_CONFIG_KEYS))
        value = str(rnd.choice([1, 4096, 10**9, -5]))
        return AlterTopicConfig(
            rnd.choice(names),
            {key: value} if rnd.random() < 0.7 else {},
            (key,) if rnd.random() < 0.3 else (),
        )
    groups = [p.group_id for t in state.topics.values() for p in t.partitions]
    groups += [0, group_id_for(1, 0)]
    return hints(
        *(
            (rnd.choice(groups), rnd.randint(0, 7), rnd.randint(0, 9))
            for _ in range(rnd.randint(0, 4))
        )
    )


def check_invariants(state: ClusterState) -> None:
    assert 0 <= state.version <= state.applied_index
    hosted: dict[int, set[tuple[str, int]]] = {}
    groups: set[int] = set()
    for name, topic in state.topics.items():
        assert topic.name == name and len(topic.partitions) >= 1
        for p in topic.partitions:
            assert len(set(p.replicas)) == topic.replication_factor == len(p.replicas)
            assert set(p.replicas) <= state.nodes.keys()
            assert p.preferred_leader == p.replicas[0]
            assert p.leader in (*p.replicas, NO_LEADER)
            if p.leader != NO_LEADER:
                assert state.nodes[p.leader].alive
            assert p.group_id not in groups
            groups.add(p.group_id)
            assert state.locate_group(p.group_id) == (name, p.partition)
            for r in p.replicas:
                hosted.setdefault(r, set()).add((name, p.partition))
    for node in state.nodes:
        assert state.replicas_on(node) == hosted.get(node, set())


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 120))
def test_replicas_agree(seed: int, steps: int) -> None:
    """Two nodes applying the same log (one restarting from a snapshot midway, one reading
    the encoded entries) end in the same state with the same results."""
    rnd = random.Random(seed)
    leader, follower = ClusterState(), ClusterState()
    snapshot_at = rnd.randint(1, steps)
    for index in range(1, steps + 1):
        command = random_command(rnd, leader)
        data = encode_command(command)
        assert decode_command(data) == command
        a = leader.apply(index, command)
        b = follower.apply_encoded(index, data)
        assert (a.changed, type(a.error), a.error and a.error.message) == (
            b.changed,
            type(b.error),
            b.error and b.error.message,
        )
        assert a.topic == b.topic
        check_invariants(leader)
        if index == snapshot_at:
            follower = ClusterState.from_snapshot(follower.snapshot())
    assert leader.snapshot() == follower.snapshot()
    assert leader.describe() == follower.describe()


def test_producer_id_blocks_never_overlap_and_survive_snapshots() -> None:
    d = cluster(3)
    d.ok(AllocateProducerIds(1, 1000))
    d.ok(AllocateProducerIds(2, 500))
    b1, b2 = d.state.producer_id_block(1), d.state.producer_id_block(2)
    assert b1 is not None and b2 is not None
    assert (b1.start, b1.count, b2.start, b2.count) == (0, 1000, 1000, 500)
    assert b1.index == d.index - 1 and b2.index == d.index
    # A new controller (a restored snapshot) goes on after the last id handed out.
    restored = Driver(ClusterState.from_snapshot(d.state.snapshot()))
    assert restored.state.next_producer_id == 1500
    assert restored.state.producer_id_block(2) == b2
    restored.ok(AllocateProducerIds(1, 10))
    again = restored.state.producer_id_block(1)
    assert again is not None and again.start == 1500
    assert restored.state.snapshot() != d.state.snapshot()


@pytest.mark.parametrize(
    ("command", "text"),
    [
        (AllocateProducerIds(9, 10), "node 9"),
        (AllocateProducerIds(1, 0), "1 to 1000000 ids"),
        (AllocateProducerIds(1, 10**7), "1 to 1000000 ids"),
    ],
)
def test_bad_producer_id_allocations_change_nothing(command: Command, text: str) -> None:
    d = cluster(2)
    before = d.state.next_producer_id
    result = d.apply(command)
    assert isinstance(result.error, TidelogError) and text in str(result.error)
    assert d.state.next_producer_id == before and d.state.producer_id_block(1) is None


def test_snapshot_from_before_producer_ids_restores_with_none_handed_out() -> None:
    d = cluster(1)
    data = d.state.snapshot()
    body = json.loads(data[struct.calcsize(">4sBI") :])
    del body["next_producer_id"], body["producer_id_blocks"]
    raw = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    old = data[:5] + struct.pack(">I", crc32c.crc32c(raw)) + raw
    state = ClusterState.from_snapshot(old)
    assert state.next_producer_id == 0 and state.nodes == d.state.nodes
