"""Hostile input on the public API (issue 9, part B): each input is accepted, or answered
unreadably, by a node without the limit, and refused with a clear error with it, the
partition's data unchanged.

The node runs in-process over real gRPC (as in test_node_services.py); the cluster test uses
three in-process nodes (as in test_node_cluster.py).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc import aio

from tests.unit.node_fakes import InstrumentedLog
from tests.unit.test_node_cluster import Cluster
from tests.unit.test_node_services import Client, free_port
from tidelog.config import TOPIC_CONFIG_KEYS, validate_topic_configs
from tidelog.errors import InvalidConfig, from_rpc_error
from tidelog.node.server import Node
from tidelog.records import decode_batches
from tidelog.v1 import admin_pb2, broker_pb2


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[Node]:
    n = Node(1, "127.0.0.1:0", tmp_path, free_port(), open_log=InstrumentedLog)
    await n.start()
    yield n
    await n.stop(1)


@pytest.fixture
async def client(node: Node) -> AsyncIterator[Client]:
    c = Client(node)
    yield c
    await c.channel.close(None)


async def fetch_all(client: Client, topic: str) -> list[bytes | None]:
    resp = await client.broker.Fetch(
        broker_pb2.FetchRequest(topic=topic, offset=0, once=True)
    ).read()
    assert isinstance(resp, broker_pb2.FetchResponse)
    return [r.value for r in decode_batches(resp.batches)]


# -- 10: strict parsing of config values ----------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    ["1_000_000", " 42 ", "42\n", "+8192", "\u0664\u0662", "\uff14\uff12", "0x10", "1e6", ""],
)
def test_config_integers_are_plain_ascii_decimal(raw: str) -> None:
    # int() accepts all but the last three of these; the node does not.
    with pytest.raises(InvalidConfig, match="not an integer"):
        validate_topic_configs({"segment.ms": raw})


def test_config_integers_still_parse_plain_values() -> None:
    parse = TOPIC_CONFIG_KEYS["retention.ms"].parse
    assert parse("retention.ms", "-1") == -1
    assert parse("retention.ms", "604800000") == 604_800_000
    assert parse("retention.ms", "0007") == 7


def test_a_huge_number_is_out_of_range_and_not_echoed() -> None:
    with pytest.raises(InvalidConfig) as info:
        validate_topic_configs({"segment.ms": "9" * 10_000})
    assert "out of range" in info.value.message
    assert len(info.value.message) < 300


# -- 11: errors that echo a huge input reach the client, cut short ---------------------------


@pytest.mark.timeout(20)
async def test_errors_quoting_huge_inputs_reach_the_client(client: Client) -> None:
    await client.create("t")
    await client.produce("t", [b"a"])
    huge_name = "x" * 100_000
    calls = [
        client.admin.DeleteTopics(admin_pb2.DeleteTopicsRequest(names=[huge_name])),
        client.admin.AlterTopicConfig(
            admin_pb2.AlterTopicConfigRequest(topic="t", set={"segment.ms": "9" * 10_000})
        ),
        client.admin.AlterTopicConfig(
            admin_pb2.AlterTopicConfigRequest(topic="t", set={"k" * 100_000: "1"})
        ),
        client.admin.AlterTopicConfig(
            admin_pb2.AlterTopicConfigRequest(topic="t", set={"flush": "n" * 100_000})
        ),
        client.admin.CreateTopics(
            admin_pb2.CreateTopicsRequest(
                topics=[
                    admin_pb2.TopicSpec(name="u", partitions=1, configs={"flush": "n" * 10_000})
                ]
            )
        ),
    ]
    reasons = []
    for call in calls:
        with pytest.raises(aio.AioRpcError) as info:
            await call
        assert "metadata size exceeds" not in (info.value.details() or "")
        err = from_rpc_error(info.value)
        assert len(err.message) <= 2048
        reasons.append(err.reason)
    assert reasons == [
        "UNKNOWN_TOPIC",
        "INVALID_CONFIG",
        "INVALID_CONFIG",
        "INVALID_CONFIG",
        "INVALID_CONFIG",
    ]
    assert await fetch_all(client, "t") == [b"a"]
    described = await client.admin.DescribeTopics(admin_pb2.DescribeTopicsRequest(names=["t"]))
    assert described.topics[0].overrides == []


# -- 11: unknown topics through a node that is not the controller ----------------------------


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    c = Cluster(tmp_path)
    await asyncio.gather(*(c.start(i) for i in (1, 2, 3)))
    yield c
    for ch in c.channels.values():
        await ch.close(None)
    await asyncio.gather(*(n.stop(1) for n in c.nodes.values()))


@pytest.mark.timeout(60)
async def test_unknown_topic_through_a_non_controller_answers_at_once(cluster: Cluster) -> None:
    c = cluster

    async def three_registered() -> bool:
        for i in c.nodes:
            md = await c.metadata(i)
            if md.controller_id < 0 or sorted(n.node_id for n in md.nodes if n.alive) != [1, 2, 3]:
                return False
        return True

    await c.until("every node registered", three_registered)
    controller = (await c.metadata(1)).controller_id
    other = next(i for i in (1, 2, 3) if i != controller)
    admin = c.admin(other)
    for call in (
        lambda: admin.DeleteTopics(admin_pb2.DeleteTopicsRequest(names=["nope"]), timeout=20),
        lambda: admin.AlterTopicConfig(
            admin_pb2.AlterTopicConfigRequest(topic="nope", set={"segment.ms": "1000"}),
            timeout=20,
        ),
    ):
        t0 = time.monotonic()
        with pytest.raises(aio.AioRpcError) as info:
            await call()
        elapsed = time.monotonic() - t0
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        assert from_rpc_error(info.value).reason == "UNKNOWN_TOPIC"
        assert elapsed < 2, f"answered after {elapsed:.1f} s"
