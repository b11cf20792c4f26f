"""Controller commands: deterministic round trips and strict decoding."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tidelog.controller.commands import (
    COMMAND_BYTES_MAX,
    AddPartitions,
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
from tidelog.errors import InvalidRequest

EXAMPLES: list[Command] = [
    RegisterNode(1, "127.0.0.1:9092", "127.0.0.1:9100", "rack-a"),
    RegisterNode(2, "10.0.0.2:9092"),
    RegisterNode(3, "10.0.0.3:9092", internal_address="10.0.0.3:9093"),
    MarkNodeDead(3),
    MarkNodeAlive(3),
    CreateTopic("orders", 3, 2, {"retention.ms": "1000"}, [(1, 2), (2, 3), (3, 1)]),
    CreateTopic("empty-configs", 1, 1, {}, [(7,)]),
    DeleteTopic("orders"),
    AlterTopicConfig("orders", {"segment.bytes": "8192"}, ("retention.ms",)),
    AlterTopicConfig("orders", {}),
    UpdatePartitionLeaders((LeaderHint(40_000, 2, 5), LeaderHint(40_001, 0, 6))),
    UpdatePartitionLeaders(()),
    AllocateProducerIds(2, 1000),
    AddPartitions("orders", [(1, 2), (3, 1)]),
]


def test_a_registration_without_an_internal_address_decodes_as_before_the_split() -> None:
    old = b'{"address":"h:1","metrics_address":"","node_id":1,"rack":null,"type":"register_node","v":1}'
    assert decode_command(old) == RegisterNode(1, "h:1")
    assert encode_command(RegisterNode(1, "h:1")) == old


@pytest.mark.parametrize("command", EXAMPLES, ids=lambda c: type(c).__name__)
def test_round_trip(command: Command) -> None:
    data = encode_command(command)
    decoded = decode_command(data)
    assert decoded == command
    assert type(decoded) is type(command)
    assert encode_command(decoded) == data


def test_encoding_is_canonical_json() -> None:
    data = encode_command(CreateTopic("t", 1, 1, {"b": "2", "a": "1"}, [(1,)]))
    assert data == (
        b'{"assignments":[[1]],"configs":{"a":"1","b":"2"},"name":"t","partitions":1,'
        b'"replication_factor":1,"type":"create_topic","v":1}'
    )
    # The same command built from a dict in another order encodes to the same bytes.
    again = CreateTopic("t", 1, 1, {"a": "1", "b": "2"}, [[1]])  # type: ignore[list-item]
    assert encode_command(again) == data


def test_commands_are_immutable() -> None:
    c = CreateTopic("t", 1, 1, {"a": "1"}, [[1]])  # type: ignore[list-item]
    assert c.assignments == ((1,),)
    with pytest.raises(TypeError):
        c.configs["a"] = "2"  # type: ignore[index]
    a = AlterTopicConfig("t", {"x": "1"}, ["y"])  # type: ignore[arg-type]
    assert a.delete == ("y",)
    with pytest.raises(TypeError):
        a.set["x"] = "2"  # type: ignore[index]


def test_decode_error_is_an_invalid_request() -> None:
    assert issubclass(CommandDecodeError, InvalidRequest)


def _raw(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "not valid JSON"),
        (b"\xff\xfe\x00", "not valid JSON"),
        (b"{", "not valid JSON"),
        (b"[]", "must be a JSON object"),
        (_raw(type="mark_node_dead", node_id=1), "no integer version"),
        (_raw(v="1", type="mark_node_dead", node_id=1), "no integer version"),
        (_raw(v=2, type="mark_node_dead", node_id=1), "upgrade this node"),
        (_raw(v=1, type="reboot", node_id=1), "unknown controller command type 'reboot'"),
        (_raw(v=1, node_id=1), "unknown controller command type None"),
        (_raw(v=1, type="mark_node_dead"), "lacks field 'node_id'"),
        (_raw(v=1, type="mark_node_dead", node_id=1, extra=2), "unknown fields ['extra']"),
        (_raw(v=1, type="mark_node_dead", node_id=True), "must be an integer"),
        (_raw(v=1, type="mark_node_dead", node_id=1.0), "must be an integer"),
        (_raw(v=1, type="mark_node_dead", node_id="1"), "must be an integer"),
        (_raw(v=1, type="delete_topic", name=5), "must be a string"),
        (
            _raw(v=1, type="register_node", node_id=1, address="a", metrics_address="", rack=3),
            "a string or null",
        ),
        (
            _raw(v=1, type="alter_topic_config", name="t", set={"a": 1}, delete=[]),
            "an object of strings",
        ),
        (
            _raw(v=1, type="alter_topic_config", name="t", set={}, delete="x"),
            "a list of strings",
        ),
        (
            _raw(
                v=1,
                type="create_topic",
                name="t",
                partitions=1,
                replication_factor=1,
                configs={},
                assignments=[[1, "2"]],
            ),
            "lists of integers",
        ),
        (_raw(v=1, type="update_partition_leaders", hints=[[1, 2]]), "3 each"),
        (_raw(v=1, type="update_partition_leaders", hints={}), "lists of integers"),
        (b'{"v":1,"type":"delete_topic","name":"a","name":"b"}', "duplicate keys"),
        (b"[" * 100_000 + b"]" * 100_000, "not valid JSON"),
        (b" " * (COMMAND_BYTES_MAX + 1), "at most"),
    ],
)
def test_decode_rejects(data: bytes, message: str) -> None:
    with pytest.raises(CommandDecodeError) as info:
        decode_command(data)
    assert message in str(info.value)


def test_long_bad_values_are_abbreviated_in_errors() -> None:
    data = _raw(v=1, type="delete_topic", name=list(range(10_000)))
    with pytest.raises(CommandDecodeError) as info:
        decode_command(data)
    assert len(str(info.value)) < 200


def test_encode_rejects_what_is_not_a_command() -> None:
    with pytest.raises(TypeError):
        encode_command("create_topic")  # type: ignore[arg-type]


# -- properties ----------------------------------------------------------------------------

text = st.text(max_size=20)
ints = st.integers(-(2**63), 2**63 - 1)
str_maps = st.dictionaries(text, text, max_size=4)

commands: st.SearchStrategy[Command] = st.one_of(
    st.builds(RegisterNode, ints, text, text, st.none() | text),
    st.builds(MarkNodeDead, ints),
    st.builds(MarkNodeAlive, ints),
    st.builds(
        CreateTopic,
        text,
        ints,
        ints,
        str_maps,
        st.lists(st.lists(ints, max_size=4).map(tuple), max_size=5),
    ),
    st.builds(DeleteTopic, text),
    st.builds(AlterTopicConfig, text, str_maps, st.lists(text, max_size=3).map(tuple)),
    st.builds(
        UpdatePartitionLeaders,
        st.lists(st.builds(LeaderHint, ints, ints, ints), max_size=5).map(tuple),
    ),
    st.builds(AllocateProducerIds, ints, ints),
    st.builds(AddPartitions, text, st.lists(st.lists(ints, max_size=4).map(tuple), max_size=5)),
)


@settings(max_examples=500, deadline=None)
@given(commands)
def test_any_command_round_trips(command: Command) -> None:
    data = encode_command(command)
    assert data.isascii()
    assert decode_command(data) == command
    assert encode_command(decode_command(data)) == data


@settings(max_examples=500, deadline=None)
@given(commands, st.data())
def test_damaged_bytes_decode_or_fail_cleanly(command: Command, data: st.DataObject) -> None:
    """Whatever the damage, the answer is a command or CommandDecodeError, nothing else."""
    raw = bytearray(encode_command(command))
    for _ in range(data.draw(st.integers(1, 4), label="flips")):
        at = data.draw(st.integers(0, len(raw) - 1), label="at")
        raw[at] = data.draw(st.integers(0, 255), label="byte")
    try:
        decoded = decode_command(bytes(raw))
    except CommandDecodeError:
        return
    assert isinstance(
        decoded,
        (
            RegisterNode,
            MarkNodeDead,
            MarkNodeAlive,
            CreateTopic,
            DeleteTopic,
            AlterTopicConfig,
            UpdatePartitionLeaders,
            AllocateProducerIds,
            AddPartitions,
        ),
    )


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_fail_cleanly(data: bytes) -> None:
    try:
        decode_command(data)
    except CommandDecodeError:
        pass


def test_register_node_carries_a_directory_id_and_reads_older_encodings() -> None:
    with_id = RegisterNode(2, "10.0.0.2:9092", directory_id="0123abcd")
    data = encode_command(with_id)
    assert b'"directory_id":"0123abcd"' in data
    assert decode_command(data) == with_id
    # Written before directory ids existed (and still so without one): the same bytes.
    old = b'{"address":"a:1","metrics_address":"","node_id":2,"rack":null,"type":"register_node","v":1}'
    assert decode_command(old) == RegisterNode(2, "a:1")
    assert encode_command(RegisterNode(2, "a:1")) == old
    with pytest.raises(CommandDecodeError, match="directory_id"):
        decode_command(old.replace(b'"v":1', b'"v":1,"directory_id":7'))
