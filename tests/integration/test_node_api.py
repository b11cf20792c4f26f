"""Every RPC of a real node process (``python -m tidelog.node``) and every kind of bad input.

Bad input must get the right gRPC status with a machine-readable reason, append nothing,
and leave the node serving. The node runs with the real partition log in a temp directory,
on free ports, and is killed at the end.
"""

from __future__ import annotations

import asyncio
import os
import signal
import struct
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import crc32c
import grpc
import pytest
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tests.support.nodeproc import Node
from tidelog.errors import TidelogError, from_rpc_error
from tidelog.records import CRC_COVERED_FROM, decode_batches, encode_batch
from tidelog.v1 import admin_pb2, admin_pb2_grpc, broker_pb2, broker_pb2_grpc

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    base = tmp_path_factory.mktemp("node")
    n = Node(base / "data", base / "node.log")
    n.start()
    try:
        yield n
    finally:
        n.kill()


@dataclass
class Api:
    channel: aio.Channel
    broker: broker_pb2_grpc.BrokerAsyncStub
    admin: admin_pb2_grpc.AdminAsyncStub


@pytest.fixture
async def api(node: Node) -> AsyncIterator[Api]:
    channel = aio.insecure_channel(
        node.address, options=[("grpc.max_send_message_length", 128 * 1024 * 1024)]
    )
    yield Api(channel, broker_pb2_grpc.BrokerStub(channel), admin_pb2_grpc.AdminStub(channel))  # type: ignore[arg-type]
    await channel.close(None)


async def create(
    api: Api, name: str, partitions: int = 1, configs: dict[str, str] | None = None
) -> None:
    spec = admin_pb2.TopicSpec(name=name, partitions=partitions, configs=configs)
    await api.admin.CreateTopics(admin_pb2.CreateTopicsRequest(topics=[spec]))


async def produce(
    api: Api, topic: str, batches: bytes, partition: int = 0, **kw: int
) -> broker_pb2.ProduceResponse:
    return await api.broker.Produce(
        broker_pb2.ProduceRequest(topic=topic, partition=partition, batches=batches, **kw)  # type: ignore[arg-type]
    )


async def fetch_once(
    api: Api, topic: str, offset: int, partition: int = 0, **kw: int
) -> broker_pb2.FetchResponse:
    call = api.broker.Fetch(
        broker_pb2.FetchRequest(topic=topic, partition=partition, offset=offset, once=True, **kw)  # type: ignore[arg-type]
    )
    msg = await asyncio.wait_for(call.read(), 10)
    assert isinstance(msg, broker_pb2.FetchResponse)
    return msg


async def latest(api: Api, topic: str, partition: int = 0) -> int:
    resp = await api.broker.ListOffsets(
        broker_pb2.ListOffsetsRequest(
            topic=topic, partition=partition, spec=broker_pb2.OFFSET_SPEC_LATEST
        )
    )
    return resp.offset


async def rpc_error(awaitable: object) -> tuple[grpc.StatusCode, TidelogError]:
    with pytest.raises(aio.AioRpcError) as info:
        await awaitable  # type: ignore[misc]
    return info.value.code(), from_rpc_error(info.value)


# ---- health, reflection, metadata ---------------------------------------------------------


@pytest.mark.timeout(30)
async def test_health_and_reflection(api: Api) -> None:
    health = health_pb2_grpc.HealthStub(api.channel)
    for service in ("", "tidelog.v1.Broker", "tidelog.v1.Admin"):
        resp = await health.Check(health_pb2.HealthCheckRequest(service=service))  # type: ignore[misc]
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
    refl = reflection_pb2_grpc.ServerReflectionStub(api.channel)
    call = refl.ServerReflectionInfo()
    await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))  # type: ignore[attr-defined]
    resp = await call.read()  # type: ignore[attr-defined]
    await call.done_writing()  # type: ignore[attr-defined]
    names = {s.name for s in resp.list_services_response.service}
    assert {"tidelog.v1.Broker", "tidelog.v1.Admin", "grpc.health.v1.Health"} <= names


@pytest.mark.timeout(30)
async def test_metadata(api: Api, node: Node) -> None:
    await create(api, "meta", 3)
    resp = await api.broker.Metadata(broker_pb2.MetadataRequest(topics=["meta"]))
    assert resp.controller_id == 1 and resp.cluster_id
    [me] = resp.nodes
    assert (me.node_id, me.address, me.alive) == (1, node.address, True)
    assert me.metrics_address == f"127.0.0.1:{node.metrics_port}"
    [topic] = resp.topics
    assert [p.partition for p in topic.partitions] == [0, 1, 2]
    assert all(
        p.leader == 1 and list(p.replicas) == [1] and list(p.in_sync) == [1]
        for p in topic.partitions
    )
    everything = await api.broker.Metadata(broker_pb2.MetadataRequest())
    assert "meta" in {t.name for t in everything.topics}
    code, err = await rpc_error(api.broker.Metadata(broker_pb2.MetadataRequest(topics=["nope"])))
    assert (code, err.reason) == (grpc.StatusCode.NOT_FOUND, "UNKNOWN_TOPIC")
    code, err = await rpc_error(api.broker.Metadata(broker_pb2.MetadataRequest(topics=["a b"])))
    assert (code, err.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_TOPIC")


# ---- produce, fetch, list offsets ---------------------------------------------------------


@pytest.mark.timeout(60)
async def test_produce_fetch_round_trip_with_every_acks(api: Api) -> None:
    await create(api, "rt", 2)
    offsets = []
    for acks in (
        broker_pb2.ACKS_UNSPECIFIED,
        broker_pb2.ACKS_NONE,
        broker_pb2.ACKS_LEADER,
        broker_pb2.ACKS_ALL,
    ):
        r = await produce(
            api,
            "rt",
            encode_batch([b"%d-%d" % (acks, i) for i in range(100)]),
            partition=1,
            acks=acks,
        )
        offsets.append((r.base_offset, r.last_offset))
        assert r.append_time_ms > 0 and r.log_start_offset == 0
    assert offsets == [(0, 99), (100, 199), (200, 299), (300, 399)]
    # Two batches in one request: one append, offsets continue per record.
    r = await produce(api, "rt", encode_batch([b"x"] * 5) + encode_batch([b"y"] * 5), partition=1)
    assert (r.base_offset, r.last_offset) == (400, 409)
    values: list[bytes | None] = []
    offset = 0
    while offset < 410:
        resp = await fetch_once(api, "rt", offset, partition=1, max_bytes=4096)
        assert resp.high_watermark == 410
        recs = decode_batches(resp.batches, min_offset=offset)
        assert recs[0].offset == offset
        values += [rec.value for rec in recs]
        offset = resp.next_offset
    assert len(values) == 410 and values[0] == b"0-0" and values[-1] == b"y"
    assert await latest(api, "rt", 0) == 0


@pytest.mark.timeout(30)
async def test_fetch_stream_pushes_new_batches(api: Api) -> None:
    await create(api, "push")
    call = api.broker.Fetch(broker_pb2.FetchRequest(topic="push", offset=0, max_wait_ms=100))
    keepalive = await asyncio.wait_for(call.read(), 10)
    assert isinstance(keepalive, broker_pb2.FetchResponse)
    assert keepalive.batches == b"" and keepalive.high_watermark == 0
    got: list[bytes | None] = []
    for i in range(3):
        await produce(api, "push", encode_batch([b"p%d" % i]))
        while len(got) <= i:
            msg = await asyncio.wait_for(call.read(), 10)
            assert isinstance(msg, broker_pb2.FetchResponse)
            got += [r.value for r in decode_batches(msg.batches)]
    assert got == [b"p0", b"p1", b"p2"]
    call.cancel()


@pytest.mark.timeout(30)
async def test_fetch_stream_ends_when_topic_deleted(api: Api) -> None:
    await create(api, "short-lived")
    call = api.broker.Fetch(broker_pb2.FetchRequest(topic="short-lived", max_wait_ms=30_000))
    await asyncio.sleep(0.2)
    await api.admin.DeleteTopics(admin_pb2.DeleteTopicsRequest(names=["short-lived"]))
    code, err = await rpc_error(asyncio.wait_for(call.read(), 10))
    assert (code, err.reason) == (grpc.StatusCode.NOT_FOUND, "UNKNOWN_TOPIC")


@pytest.mark.timeout(30)
async def test_list_offsets(api: Api) -> None:
    await create(api, "lo")
    for ts in (1000, 2000, 3000):
        await produce(api, "lo", encode_batch([b"a", b"b"], timestamps_ms=ts))

    async def ask(spec: broker_pb2.OffsetSpec.ValueType, ts: int = 0) -> tuple[int, int]:
        r = await api.broker.ListOffsets(
            broker_pb2.ListOffsetsRequest(topic="lo", spec=spec, timestamp_ms=ts)
        )
        assert (r.log_start_offset, r.high_watermark) == (0, 6)
        return r.offset, r.timestamp_ms

    assert await ask(broker_pb2.OFFSET_SPEC_EARLIEST) == (0, -1)
    assert await ask(broker_pb2.OFFSET_SPEC_LATEST) == (6, -1)
    assert await ask(broker_pb2.OFFSET_SPEC_TIMESTAMP, 1500) == (2, 2000)
    assert await ask(broker_pb2.OFFSET_SPEC_TIMESTAMP, 0) == (0, 1000)
    assert await ask(broker_pb2.OFFSET_SPEC_TIMESTAMP, 9999) == (6, -1)
    code, err = await rpc_error(
        api.broker.ListOffsets(broker_pb2.ListOffsetsRequest(topic="lo", spec=7))  # type: ignore[arg-type]
    )
    assert (code, err.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REQUEST")
    code, err = await rpc_error(
        api.broker.ListOffsets(broker_pb2.ListOffsetsRequest(topic="lo", partition=1))
    )
    assert (code, err.reason) == (grpc.StatusCode.NOT_FOUND, "UNKNOWN_PARTITION")


# ---- bad produce and fetch input ---------------------------------------------------------


def _recrc(batch: bytearray) -> bytearray:
    struct.pack_into(
        "<I", batch, CRC_COVERED_FROM - 4, crc32c.crc32c(bytes(batch[CRC_COVERED_FROM:]))
    )
    return batch


def _wrong_record_count() -> bytes:
    """A batch whose CRC is right but whose record_count does not match its records."""
    b = bytearray(encode_batch([b"a", b"b", b"c"]))
    struct.pack_into("<i", b, 35, 3)  # last_offset_delta
    struct.pack_into("<i", b, 69, 4)  # record_count
    return bytes(_recrc(b))


def _flipped() -> bytes:
    b = bytearray(encode_batch([b"hello"] * 10))
    b[-3] ^= 0x10
    return bytes(b)


GOOD = encode_batch([b"fine"])
BAD_BATCHES = {
    "bad crc": (_flipped(), "CORRUPT_BATCH", "CRC mismatch"),
    "truncated": (encode_batch([b"x" * 100])[:-10], "CORRUPT_BATCH", "truncated"),
    "short header": (b"\x00" * 20, "CORRUPT_BATCH", "truncated"),
    "wrong record count": (_wrong_record_count(), "CORRUPT_BATCH", "record_count"),
    "empty": (b"", "CORRUPT_BATCH", "0 bytes"),
    "trailing garbage": (GOOD + b"\x01\x02", "CORRUPT_BATCH", "trailing"),
    "good then bad": (GOOD + _flipped(), "CORRUPT_BATCH", "CRC mismatch"),
    "over max.message.bytes": (encode_batch([b"z" * 2000]), "BATCH_TOO_LARGE", "max.message.bytes"),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", sorted(BAD_BATCHES))
async def test_bad_batches_are_rejected_and_nothing_is_appended(api: Api, case: str) -> None:
    topic = "bad-" + case.replace(" ", "-").replace(".", "-")
    await create(api, topic, configs={"max.message.bytes": "1024"})
    await produce(api, topic, GOOD)
    data, reason, words = BAD_BATCHES[case]
    code, err = await rpc_error(produce(api, topic, data))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert err.reason == reason and words in err.message, err.message
    assert await latest(api, topic) == 1
    assert (await produce(api, topic, GOOD)).base_offset == 1


@pytest.mark.timeout(60)
async def test_produce_request_errors(api: Api) -> None:
    await create(api, "pe", 2)
    cases: list[tuple[broker_pb2.ProduceRequest, grpc.StatusCode, str, str]] = [
        (broker_pb2.ProduceRequest(topic="none", batches=GOOD), grpc.StatusCode.NOT_FOUND, "UNKNOWN_TOPIC", "'none'"),
        (broker_pb2.ProduceRequest(topic="pe", partition=2, batches=GOOD), grpc.StatusCode.NOT_FOUND, "UNKNOWN_PARTITION", "0..1"),
        (broker_pb2.ProduceRequest(topic="pe", partition=-1, batches=GOOD), grpc.StatusCode.NOT_FOUND, "UNKNOWN_PARTITION", "0..1"),
        (broker_pb2.ProduceRequest(topic="pe", batches=GOOD, acks=9), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REQUEST", "acks"),  # type: ignore[arg-type]
        (broker_pb2.ProduceRequest(topic="pe", batches=GOOD, timeout_ms=-5), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REQUEST", "timeout_ms"),
    ]  # fmt: skip
    for request, code, reason, words in cases:
        got_code, err = await rpc_error(api.broker.Produce(request))
        assert (got_code, err.reason) == (code, reason)
        assert words in err.message, err.message
    assert await latest(api, "pe") == 0


@pytest.mark.timeout(60)
async def test_oversized_request_is_refused_with_a_readable_error(api: Api) -> None:
    await create(api, "huge", configs={"max.message.bytes": str(64 * 1024 * 1024)})
    big = encode_batch([b"q" * (1024 * 1024)] * 33)  # 33 MiB
    code, err = await rpc_error(produce(api, "huge", big + big))
    assert (code, err.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "BATCH_TOO_LARGE")
    assert "send fewer batches" in err.message
    assert await latest(api, "huge") == 0


@pytest.mark.timeout(30)
async def test_fetch_errors_name_the_valid_range(api: Api) -> None:
    await create(api, "fe")
    await produce(api, "fe", encode_batch([b"a"] * 5))
    for offset in (-1, 6):
        code, err = await rpc_error(fetch_once(api, "fe", offset))
        assert (code, err.reason) == (grpc.StatusCode.OUT_OF_RANGE, "OFFSET_OUT_OF_RANGE")
        assert "0..5" in err.message
        assert err.metadata == {"log_start_offset": "0", "high_watermark": "5"}
    code, err = await rpc_error(fetch_once(api, "nope", 0))
    assert err.reason == "UNKNOWN_TOPIC"
    code, err = await rpc_error(fetch_once(api, "fe", 0, partition=3))
    assert err.reason == "UNKNOWN_PARTITION"
    code, err = await rpc_error(fetch_once(api, "fe", 0, max_bytes=-1))
    assert err.reason == "INVALID_REQUEST"
    code, err = await rpc_error(fetch_once(api, "fe", 0, max_wait_ms=-1))
    assert err.reason == "INVALID_REQUEST"
    # At the high watermark with nothing new: one keep-alive after max_wait_ms.
    resp = await fetch_once(api, "fe", 5, max_wait_ms=50)
    assert resp.batches == b"" and resp.next_offset == 5 and resp.high_watermark == 5


# ---- admin ------------------------------------------------------------------------------


@pytest.mark.timeout(60)
async def test_create_topics_bad_input_creates_nothing(api: Api) -> None:
    def spec(name: str, partitions: int = 1, rf: int = 0, **configs: str) -> admin_pb2.TopicSpec:
        return admin_pb2.TopicSpec(
            name=name, partitions=partitions, replication_factor=rf, configs=configs
        )

    await create(api, "exists")
    cases = [
        ([spec("bad/name")], "INVALID_TOPIC", "'/'"),
        ([spec("x" * 250)], "INVALID_TOPIC", "at most 249"),
        ([spec("")], "INVALID_TOPIC", "empty"),
        ([spec("zero", 0)], "INVALID_PARTITIONS", "at least 1"),
        ([spec("neg", -3)], "INVALID_PARTITIONS", "at least 1"),
        ([spec("rf", 1, 3)], "INVALID_REPLICATION_FACTOR", "only 1 node in the cluster"),
        ([spec("cfg", 1, 0, bogus="1")], "INVALID_CONFIG", "'bogus'"),
        ([spec("cfg", 1, 0, **{"retention.ms": "x"})], "INVALID_CONFIG", "not an integer"),
        ([spec("cfg", 1, 0, **{"segment.bytes": "10"})], "INVALID_CONFIG", "out of range"),
        ([spec("dup"), spec("dup")], "INVALID_REQUEST", "twice"),
        ([spec("fresh"), spec("exists")], "TOPIC_EXISTS", "'exists'"),
        ([], "INVALID_REQUEST", "no topic"),
    ]
    for specs, reason, words in cases:
        _, err = await rpc_error(
            api.admin.CreateTopics(admin_pb2.CreateTopicsRequest(topics=specs))
        )
        assert err.reason == reason and words in err.message, (reason, err.message)
    described = await api.admin.DescribeTopics(admin_pb2.DescribeTopicsRequest())
    names = {t.name for t in described.topics}
    assert not names & {"fresh", "zero", "neg", "rf", "cfg", "dup"}
    resp = await api.admin.CreateTopics(
        admin_pb2.CreateTopicsRequest(topics=[spec("validated")], validate_only=True)
    )
    assert list(resp.created) == ["validated"]
    _, err = await rpc_error(
        api.admin.DescribeTopics(admin_pb2.DescribeTopicsRequest(names=["validated"]))
    )
    assert err.reason == "UNKNOWN_TOPIC"


@pytest.mark.timeout(60)
async def test_describe_alter_delete(api: Api) -> None:
    await create(api, "adm", 2, configs={"retention.ms": "60000"})
    await produce(api, "adm", encode_batch([b"v"] * 10), partition=1)
    [d] = (await api.admin.DescribeTopics(admin_pb2.DescribeTopicsRequest(names=["adm"]))).topics
    assert d.replication_factor == 1 and list(d.overrides) == ["retention.ms"]
    assert d.configs["retention.ms"] == "60000" and d.configs["flush"] == "durable"
    p1 = d.partitions[1]
    assert (p1.high_watermark, p1.log_start_offset, p1.leader) == (10, 0, 1)
    assert p1.size_bytes > 0 and d.partitions[0].size_bytes == 0

    r = await api.admin.AlterTopicConfig(
        admin_pb2.AlterTopicConfigRequest(
            topic="adm", set={"max.message.bytes": "200"}, delete=["retention.ms"]
        )
    )
    assert list(r.topic.overrides) == ["max.message.bytes"]
    assert r.topic.configs["retention.ms"] == "604800000"
    # The new limit applies to the open log at once.
    _, err = await rpc_error(produce(api, "adm", encode_batch([b"w" * 500])))
    assert err.reason == "BATCH_TOO_LARGE"
    alter_cases = [
        (admin_pb2.AlterTopicConfigRequest(topic="nope", set={"flush": "os"}), "UNKNOWN_TOPIC"),
        (admin_pb2.AlterTopicConfigRequest(topic="adm", set={"bogus": "1"}), "INVALID_CONFIG"),
        (
            admin_pb2.AlterTopicConfigRequest(topic="adm", set={"flush": "sometimes"}),
            "INVALID_CONFIG",
        ),
        (admin_pb2.AlterTopicConfigRequest(topic="adm", delete=["bogus"]), "INVALID_CONFIG"),
        (
            admin_pb2.AlterTopicConfigRequest(topic="adm", set={"flush": "os"}, delete=["flush"]),
            "INVALID_REQUEST",
        ),
    ]
    for request, reason in alter_cases:
        _, err = await rpc_error(api.admin.AlterTopicConfig(request))
        assert err.reason == reason, err.message
    [d] = (await api.admin.DescribeTopics(admin_pb2.DescribeTopicsRequest(names=["adm"]))).topics
    assert list(d.overrides) == ["max.message.bytes"]

    _, err = await rpc_error(
        api.admin.DeleteTopics(admin_pb2.DeleteTopicsRequest(names=["adm", "nope"]))
    )
    assert err.reason == "UNKNOWN_TOPIC"
    await api.admin.DescribeTopics(admin_pb2.DescribeTopicsRequest(names=["adm"]))  # still there
    r2 = await api.admin.DeleteTopics(admin_pb2.DeleteTopicsRequest(names=["adm"]))
    assert list(r2.deleted) == ["adm"]
    _, err = await rpc_error(produce(api, "adm", GOOD))
    assert err.reason == "UNKNOWN_TOPIC"
    _, err = await rpc_error(api.admin.DeleteTopics(admin_pb2.DeleteTopicsRequest()))
    assert err.reason == "INVALID_REQUEST"


@pytest.mark.timeout(30)
async def test_metrics_endpoint(api: Api, node: Node) -> None:
    await create(api, "mx")
    await produce(api, "mx", encode_batch([b"m"] * 7))
    await fetch_once(api, "mx", 0)
    body = await asyncio.to_thread(
        lambda: (
            urllib.request.urlopen(f"http://127.0.0.1:{node.metrics_port}/metrics", timeout=5)
            .read()
            .decode()
        )
    )
    for line in (
        'tidelog_records_in_total{topic="mx"} 7.0',
        'tidelog_records_out_total{topic="mx"} 7.0',
        'tidelog_requests_total{api="Produce",code="OK"}',
        'tidelog_log_end_offset{partition="0",topic="mx"} 7.0',
        'tidelog_high_watermark{partition="0",topic="mx"} 7.0',
        'tidelog_log_size_bytes{partition="0",topic="mx"}',
        "tidelog_fsyncs_total",
        "tidelog_fsync_latency_seconds_bucket",
        'tidelog_request_latency_seconds_bucket{api="Produce"',
    ):
        assert line in body, line


@pytest.mark.timeout(60)
def test_startup_errors_exit_1_with_a_readable_line(node: Node, tmp_path: Path) -> None:
    cases = [
        (["--id", "2", "--listen", node.address, "--data-dir", str(tmp_path / "a")], "cannot listen on"),
        (["--id", "1", "--listen", "127.0.0.1:0", "--data-dir", str(node.data_dir)], "in use by another node process"),
        (["--id", "2", "--listen", "127.0.0.1:0", "--data-dir", str(tmp_path / "b"), "--metrics-port", str(node.metrics_port)], "cannot serve metrics"),
    ]  # fmt: skip
    for args, words in cases:
        if "--metrics-port" not in args:
            args = [*args, "--metrics-port", "0"]
        done = subprocess.run(
            [sys.executable, "-m", "tidelog.node", *args], capture_output=True, timeout=30
        )
        assert done.returncode == 1, done.stderr
        assert words in done.stderr.decode(), done.stderr
    # A malformed setting is refused before the node starts: a usage error (exit 2), in one
    # line naming the setting, its value and what is allowed.
    bad = ["--id", "2", "--listen", "no-port", "--data-dir", str(tmp_path / "c")]
    done = subprocess.run(
        [sys.executable, "-m", "tidelog.node", *bad, "--metrics-port", "0"],
        capture_output=True,
        timeout=30,
    )
    assert done.returncode == 2, done.stderr
    err = done.stderr.decode().strip()
    assert len(err.splitlines()) == 1, err
    assert "--listen must be HOST:PORT" in err and "'no-port'" in err, err


# ---- restarts (last: they restart the shared node) ---------------------------------------


@pytest.mark.timeout(90)
async def test_topics_and_records_survive_restart(node: Node) -> None:
    channel = aio.insecure_channel(node.address)
    api = Api(channel, broker_pb2_grpc.BrokerStub(channel), admin_pb2_grpc.AdminStub(channel))  # type: ignore[arg-type]
    await create(api, "durable", 2, configs={"retention.bytes": "100000"})
    await produce(api, "durable", encode_batch([b"d%d" % i for i in range(50)]), partition=1)
    await channel.close(None)
    assert node.stop(signal.SIGTERM) == 0
    node.start()

    channel = aio.insecure_channel(node.address)
    api = Api(channel, broker_pb2_grpc.BrokerStub(channel), admin_pb2_grpc.AdminStub(channel))  # type: ignore[arg-type]
    [d] = (
        await api.admin.DescribeTopics(admin_pb2.DescribeTopicsRequest(names=["durable"]))
    ).topics
    assert len(d.partitions) == 2 and dict(d.configs)["retention.bytes"] == "100000"
    resp = await fetch_once(api, "durable", 0, partition=1)
    assert [r.value for r in decode_batches(resp.batches)] == [b"d%d" % i for i in range(50)]
    # acks=all survives kill -9: it was fsynced before the answer.
    await produce(api, "durable", encode_batch([b"after"]), partition=1, acks=broker_pb2.ACKS_ALL)
    await channel.close(None)
    assert node.proc is not None
    os.kill(node.proc.pid, signal.SIGKILL)
    node.proc.wait()
    node.proc = None
    node.start()
    channel = aio.insecure_channel(node.address)
    api = Api(channel, broker_pb2_grpc.BrokerStub(channel), admin_pb2_grpc.AdminStub(channel))  # type: ignore[arg-type]
    # Serving is not leading: the partition elects itself after the restart (UNAVAILABLE,
    # "no leader is known right now; retry", until it has).
    deadline = time.monotonic() + 10
    while True:
        try:
            end = await latest(api, "durable", 1)
            break
        except aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)
    assert end == 51
    await channel.close(None)
