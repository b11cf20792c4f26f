"""Hostile input on the public API (issue 9, part B): each input is accepted, or answered
unreadably, by a node without the limit, and refused with a clear error with it, the
partition's data unchanged.

The node runs in-process over real gRPC (as in test_node_services.py); the cluster test uses
three in-process nodes (as in test_node_cluster.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path

import grpc
import pytest
import zstandard
from grpc import aio

from tests.support import free_port
from tests.unit.node_fakes import Client, InstrumentedLog
from tests.unit.test_node_cluster import Cluster
from tests.unit.test_records import reforge
from tidelog.config import TOPIC_CONFIG_KEYS, validate_topic_configs
from tidelog.errors import InvalidConfig, from_rpc_error
from tidelog.node import limits
from tidelog.node.server import Node
from tidelog.records import Codec, decode_batches, encode_batch
from tidelog.v1 import admin_pb2, broker_pb2, broker_pb2_grpc


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
    calls: list[Awaitable[object]] = [
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


# -- 6: decompression bombs that are valid batches -------------------------------------------


def empty_records_batch(n: int, codec: Codec = Codec.ZSTD) -> bytes:
    """A valid batch of ``n`` empty records (null keys), compressed without ever holding the
    whole records block: a few KiB for millions of records."""
    base = encode_batch([b""], timestamps_ms=time.time_ns() // 1_000_000, codec=codec)
    columns = (b"\x00" * (4 << 20), b"\xff" * (4 << 20), b"\x00" * (4 << 20))
    total = 12 * n
    if codec is Codec.ZSTD:
        comp = zstandard.ZstdCompressor(write_content_size=True).compressobj(size=total)
        parts = []
        for col in columns:
            left = 4 * n
            while left:
                step = min(left, len(col))
                parts.append(comp.compress(col[:step]))
                left -= step
        parts.append(comp.flush())
        block = b"".join(parts)
    else:
        block = b"".join([b"\x00" * (4 * n), b"\xff" * (4 * n), b"\x00" * (4 * n)])
    return reforge(base, block=block, record_count=n, last_offset_delta=n - 1)


class LoopWatch:
    """The longest stretch the event loop went without running this ticker."""

    def __init__(self) -> None:
        self.longest_s = 0.0
        self._task: asyncio.Task[None] | None = None

    async def _tick(self) -> None:
        last = time.perf_counter()
        while True:
            await asyncio.sleep(0.002)
            now = time.perf_counter()
            self.longest_s = max(self.longest_s, now - last)
            last = now

    async def __aenter__(self) -> LoopWatch:
        self._task = asyncio.get_running_loop().create_task(self._tick())
        await asyncio.sleep(0.01)
        self.longest_s = 0.0
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


async def produce_raw(client: Client, topic: str, batches: bytes) -> broker_pb2.ProduceResponse:
    return await client.broker.Produce(
        broker_pb2.ProduceRequest(topic=topic, batches=batches, acks=broker_pb2.ACKS_ALL),
        timeout=30,
    )


@pytest.mark.timeout(60)
async def test_a_decompression_bomb_is_refused_in_milliseconds(client: Client) -> None:
    await client.create("t")
    await client.produce("t", [b"a"])
    bomb = empty_records_batch(22_369_621)  # the issue's: 256 MiB of columns in a few KiB
    assert len(bomb) < 16 * 1024
    for request in (bomb, bomb * 4):
        async with LoopWatch() as watch:
            t0 = time.perf_counter()
            with pytest.raises(aio.AioRpcError) as info:
                await produce_raw(client, "t", request)
            elapsed = time.perf_counter() - t0
        err = from_rpc_error(info.value)
        assert err.reason == "BATCH_TOO_LARGE", err
        assert "22369621 records" in err.message
        assert watch.longest_s < 0.05, f"event loop blocked for {watch.longest_s * 1000:.0f} ms"
        assert elapsed < 0.5
    assert await fetch_all(client, "t") == [b"a"]


@pytest.mark.timeout(60)
async def test_a_request_expanding_past_its_allowance_is_refused(client: Client) -> None:
    # Each batch is within the record limit, four together expand past 8 x max.message.bytes.
    await client.create("t", configs={"max.message.bytes": str(1 << 20)})
    await client.produce("t", [b"a"])
    one = empty_records_batch(400_000)  # 4.8 MB expanded; 8 MiB allowed per request
    assert len(one) < 4096
    with pytest.raises(aio.AioRpcError) as info:
        await produce_raw(client, "t", one * 2)
    err = from_rpc_error(info.value)
    assert err.reason == "BATCH_TOO_LARGE" and "expand" in err.message, err
    assert await fetch_all(client, "t") == [b"a"]


@pytest.mark.timeout(90)
async def test_large_requests_are_checked_off_the_loop_and_in_order(client: Client) -> None:
    await client.create("t")
    big = empty_records_batch(1 << 20) * 4  # 48 MiB of columns to check, inside the limits
    async with LoopWatch() as watch:
        first = asyncio.ensure_future(produce_raw(client, "t", big))
        await asyncio.sleep(0.01)
        second = asyncio.ensure_future(client.produce("t", [b"after"]))
        r1, r2 = await asyncio.gather(first, second)
    assert (r1.base_offset, r1.last_offset) == (0, 4 * (1 << 20) - 1)
    assert r2.base_offset == 4 * (1 << 20)  # the small request did not overtake the large one
    assert watch.longest_s < 0.1, f"event loop blocked for {watch.longest_s * 1000:.0f} ms"


# -- 8: control batches from clients ---------------------------------------------------------


@pytest.mark.timeout(20)
async def test_control_batches_from_clients_are_refused(client: Client) -> None:
    await client.create("t")
    await client.produce("t", [b"a"])
    with pytest.raises(aio.AioRpcError) as info:
        await produce_raw(client, "t", encode_batch([b"x"], control=True))
    err = from_rpc_error(info.value)
    assert err.reason == "INVALID_RECORD" and "control batch" in err.message, err
    r = await client.produce("t", [b"b"])
    assert r.base_offset == 1  # the control batch took no offset
    assert await fetch_all(client, "t") == [b"a", b"b"]


# -- 9: timestamps far from the node's clock -------------------------------------------------


@pytest.mark.timeout(20)
async def test_timestamps_far_from_the_clock_are_refused(client: Client) -> None:
    day_ms = 86_400_000
    await client.create("t", configs={"message.timestamp.before.max.ms": str(day_ms)})
    await client.create("d")  # Kafka's defaults: 1 h ahead, any age
    now = time.time_ns() // 1_000_000
    await client.produce("t", [b"a"])
    for topic, timestamps, what in (
        ("t", [now, now + 2 * 3_600_000], "later"),
        ("d", [now + 2 * 3_600_000], "later"),
        ("t", [now, now - 2 * day_ms], "earlier"),
        ("t", [now - 400 * day_ms], "earlier"),
    ):
        batch = encode_batch([b"x"] * len(timestamps), timestamps_ms=timestamps)
        with pytest.raises(aio.AioRpcError) as info:
            await produce_raw(client, topic, batch)
        err = from_rpc_error(info.value)
        assert err.reason == "INVALID_TIMESTAMP" and what in err.message, err
    # Within the bounds: accepted (a record from 1970 is fine under the default).
    await produce_raw(client, "t", encode_batch([b"b"], timestamps_ms=now - day_ms // 2))
    await produce_raw(client, "d", encode_batch([b"old"], timestamps_ms=0))
    assert await fetch_all(client, "t") == [b"a", b"b"]
    assert await fetch_all(client, "d") == [b"old"]


# -- 7: Fetch streams that are never read ----------------------------------------------------


@pytest.fixture
async def small_quota_node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Node]:
    # raising=False: a node without these limits serves every stream (the attack works).
    monkeypatch.setattr(limits, "fetch_streams_per_peer_max", 3, raising=False)
    monkeypatch.setattr(limits, "fetch_streams_per_node_max", 5, raising=False)
    n = Node(1, "127.0.0.1:0", tmp_path, free_port(), open_log=InstrumentedLog)
    await n.start()
    yield n
    await n.stop(1)


@pytest.mark.timeout(30)
async def test_fetch_streams_are_bounded_per_connection_and_node(small_quota_node: Node) -> None:
    a, b = Client(small_quota_node), Client(small_quota_node)
    # Its own connection (channels to one address share one unless told otherwise).
    await b.channel.close(None)
    b.channel = aio.insecure_channel(
        f"127.0.0.1:{small_quota_node.port}", options=[("grpc.use_local_subchannel_pool", 1)]
    )
    b.broker = broker_pb2_grpc.BrokerStub(b.channel)
    try:
        await a.create("t")
        await a.produce("t", [b"x" * 1000] * 100)

        async def open_stream(c: Client) -> object:
            call = c.broker.Fetch(broker_pb2.FetchRequest(topic="t", offset=0, max_wait_ms=5000))
            await call.read()
            return call

        calls = [await open_stream(a) for _ in range(3)]
        with pytest.raises(aio.AioRpcError) as info:
            await open_stream(a)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "this connection already has 3 Fetch streams" in (info.value.details() or "")
        calls += [await open_stream(b) for _ in range(2)]  # another connection: its own count
        with pytest.raises(aio.AioRpcError) as info:
            await open_stream(b)
        assert from_rpc_error(info.value).reason == "RESOURCE_EXHAUSTED"
        assert "this node already serves 5 Fetch streams" in (info.value.details() or "")
        for call in calls:
            call.cancel()  # type: ignore[attr-defined]
        await asyncio.sleep(0.2)
        # Closed streams free their places; the data is unchanged.
        assert await fetch_all(a, "t") == [b"x" * 1000] * 100
    finally:
        await a.channel.close(None)
        await b.channel.close(None)


@pytest.mark.timeout(30)
async def test_a_cancelled_stream_logs_no_error(
    client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    await client.create("t")
    for _ in range(20):
        await client.produce("t", [b"x" * 1000] * 1000)  # 20 MB: more than the window
    call = client.broker.Fetch(broker_pb2.FetchRequest(topic="t", offset=0, max_bytes=1 << 20))
    await call.read()
    await asyncio.sleep(0.5)  # the node is now blocked writing to the full window
    with caplog.at_level(logging.INFO):
        call.cancel()
        await asyncio.sleep(0.5)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]


async def test_fetch_quota_makes_streams_over_budget_wait() -> None:
    from tidelog.node.fetch_quota import FetchQuota, FetchQuotaLimits

    q = FetchQuota(
        FetchQuotaLimits(
            streams_per_peer_max=10,
            streams_per_node_max=10,
            buffered_bytes_per_peer_max=1000,
            buffered_bytes_per_node_max=1500,
            grant_bytes_min=200,
        )
    )
    assert await q.reserve("a", 600) == 600
    assert await q.reserve("a", 600) == 400  # cut to what is left, above grant_bytes_min
    waiting = asyncio.ensure_future(q.reserve("a", 600))
    other = await q.reserve("b", 600)  # another peer: node room is 500
    assert other == 500 and q.buffered_bytes == 1500
    await asyncio.sleep(0.01)
    assert not waiting.done()  # its client has to read (a write to complete) first
    q.adjust("a", 400, 300)  # that response was smaller than its grant
    await asyncio.sleep(0.01)
    assert not waiting.done()  # 100 bytes free: less than grant_bytes_min
    q.release("a", 600)
    async with asyncio.timeout(1):
        assert await waiting == 600
    q.release("a", 300)
    q.release("a", 600)
    q.release("b", 500)
    assert q.buffered_bytes == 0
