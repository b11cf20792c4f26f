"""The gRPC services in-process, over a real grpc.aio server, with in-memory logs.

The integration suite (tests/integration/test_node_api.py) repeats the API against a real
node process and the real log; this one is fast and checks the streaming details.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import grpc
import pytest
from grpc import aio

from tests.support import free_port
from tests.unit.node_fakes import Client, InstrumentedLog
from tidelog.errors import from_rpc_error
from tidelog.node.server import Node, StartupError
from tidelog.records import decode_batches, encode_batch
from tidelog.v1 import admin_pb2, broker_pb2


async def read(call: object) -> broker_pb2.FetchResponse:
    msg = await asyncio.wait_for(call.read(), 5)  # type: ignore[attr-defined]
    assert isinstance(msg, broker_pb2.FetchResponse), msg
    return msg


@pytest.mark.timeout(20)
async def test_produce_then_fetch_once(client: Client) -> None:
    await client.create("t")
    r = await client.produce("t", [b"a", b"b"])
    assert (r.base_offset, r.last_offset) == (0, 1)
    r = await client.produce("t", [b"c"])
    assert (r.base_offset, r.last_offset) == (2, 2)
    responses = [
        m
        async for m in client.broker.Fetch(broker_pb2.FetchRequest(topic="t", offset=1, once=True))
    ]
    assert len(responses) == 1
    resp = responses[0]
    assert resp.high_watermark == 3 and resp.next_offset == 3
    assert [rec.value for rec in decode_batches(resp.batches, min_offset=1)] == [b"b", b"c"]


@pytest.mark.timeout(20)
async def test_fetch_stream_pushes_new_batches_and_keeps_alive(client: Client) -> None:
    await client.create("s")
    call = client.broker.Fetch(broker_pb2.FetchRequest(topic="s", offset=0, max_wait_ms=50))
    first = await read(call)
    assert first.batches == b"" and first.high_watermark == 0 and first.next_offset == 0
    await client.produce("s", [b"x"])
    msg = await read(call)
    while not msg.batches:
        msg = await read(call)
    assert [r.value for r in decode_batches(msg.batches)] == [b"x"]
    assert msg.next_offset == 1
    call.cancel()


@pytest.mark.timeout(20)
async def test_fetch_stream_ends_when_topic_deleted(client: Client) -> None:
    await client.create("d")
    call = client.broker.Fetch(broker_pb2.FetchRequest(topic="d", offset=0, max_wait_ms=10_000))
    await asyncio.sleep(0.1)
    await client.admin.DeleteTopics(admin_pb2.DeleteTopicsRequest(names=["d"]))
    with pytest.raises(aio.AioRpcError) as info:
        await read(call)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert from_rpc_error(info.value).reason == "UNKNOWN_TOPIC"


@pytest.mark.timeout(20)
async def test_fetch_respects_max_bytes_but_sends_one_batch(client: Client) -> None:
    await client.create("m", configs={"flush": "os"})
    for i in range(5):
        await client.produce("m", [bytes([i]) * 1000], acks=broker_pb2.ACKS_LEADER)
    resp = await read(
        client.broker.Fetch(broker_pb2.FetchRequest(topic="m", offset=0, max_bytes=1, once=True))
    )
    assert resp.next_offset == 1
    resp = await read(
        client.broker.Fetch(broker_pb2.FetchRequest(topic="m", offset=0, max_bytes=2500, once=True))
    )
    assert resp.next_offset == 2


@pytest.mark.timeout(20)
async def test_errors_carry_reason_and_are_counted(node: Node, client: Client) -> None:
    with pytest.raises(aio.AioRpcError) as info:
        await client.produce("nope", [b"x"])
    err = from_rpc_error(info.value)
    assert err.reason == "UNKNOWN_TOPIC" and "nope" in err.message
    await client.create("e", 2)
    with pytest.raises(aio.AioRpcError) as info:
        await client.broker.Produce(
            broker_pb2.ProduceRequest(topic="e", partition=2, batches=encode_batch([b"x"]))
        )
    assert from_rpc_error(info.value).reason == "UNKNOWN_PARTITION"
    reg = node.metrics.registry
    assert (
        reg.get_sample_value("tidelog_requests_total", {"api": "Produce", "code": "NOT_FOUND"}) == 2
    )
    assert (
        reg.get_sample_value("tidelog_requests_total", {"api": "CreateTopics", "code": "OK"}) == 1
    )


@pytest.mark.timeout(20)
async def test_unexpected_exception_is_internal_and_node_keeps_serving(
    node: Node, client: Client
) -> None:
    await client.create("i")
    _, part = node.registry.partition("i", 0)

    def boom(
        offset: int, max_bytes: int, *, upto: int | None = None, stored: bool = False
    ) -> bytes:
        raise ZeroDivisionError("boom")

    part.log.read = boom  # type: ignore[method-assign]
    await client.produce("i", [b"x"])
    with pytest.raises(aio.AioRpcError) as info:
        await client.broker.Fetch(broker_pb2.FetchRequest(topic="i", once=True)).read()
    assert info.value.code() == grpc.StatusCode.INTERNAL
    assert "ZeroDivisionError" in (info.value.details() or "")
    assert (await client.produce("i", [b"y"])).base_offset == 1


@pytest.mark.timeout(20)
async def test_acks_all_waits_for_group_commit(node: Node, client: Client) -> None:
    await client.create("g")
    rs = await asyncio.gather(*(client.produce("g", [b"v"] * 10) for _ in range(50)))
    assert sorted(r.base_offset for r in rs) == list(range(0, 500, 10))
    _, part = node.registry.partition("g", 0)
    lg = part.log
    assert isinstance(lg, InstrumentedLog)
    assert lg.flushed_offset == 500 and part.high_watermark == 500
    assert lg.flush_calls <= 50


@pytest.mark.timeout(20)
async def test_shutdown_ends_streams_with_unavailable(tmp_path: Path) -> None:
    node = Node(1, "127.0.0.1:0", tmp_path, free_port(), open_log=InstrumentedLog)
    await node.start()
    c = Client(node)
    await c.create("z")
    call = c.broker.Fetch(broker_pb2.FetchRequest(topic="z", max_wait_ms=10_000))
    await asyncio.sleep(0.1)
    stop = asyncio.create_task(node.stop(5))
    with pytest.raises(aio.AioRpcError) as info:
        await read(call)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    await stop
    await c.channel.close(None)


@pytest.mark.timeout(20)
async def test_retention_and_roll_run_in_the_background(tmp_path: Path) -> None:
    node = Node(1, "127.0.0.1:0", tmp_path, free_port(), open_log=InstrumentedLog)
    node.retention_interval_s = 0.01
    await node.start()
    c = Client(node)
    await c.create("r", 2)
    logs = [p.log for p in node.registry.partitions()]
    assert all(isinstance(lg, InstrumentedLog) for lg in logs)
    deadline = asyncio.get_running_loop().time() + 5
    while not all(lg.retention_runs and lg.rolls for lg in logs):  # type: ignore[attr-defined]
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.01)
    await c.channel.close(None)
    await node.stop(1)


@pytest.mark.timeout(20)
async def test_data_dir_of_another_node_is_refused(tmp_path: Path) -> None:
    first = Node(1, "127.0.0.1:0", tmp_path, free_port(), open_log=InstrumentedLog)
    await first.start()
    cluster_id = first.identity.cluster_id if first.identity else ""
    await first.stop(1)
    other = Node(2, "127.0.0.1:0", tmp_path, free_port(), open_log=InstrumentedLog)
    with pytest.raises(StartupError, match="belongs to node 1"):
        await other.start()
    await other.stop(0)
    again = Node(1, "127.0.0.1:0", tmp_path, free_port(), open_log=InstrumentedLog)
    await again.start()
    assert again.identity is not None and again.identity.cluster_id == cluster_id
    await again.stop(1)


@pytest.mark.timeout(20)
async def test_changed_controller_voters_keep_the_committed_configuration(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 8 defect 3: a data directory started with one voter list and restarted with
    another was accepted silently, an unsafe membership change. Now the voters are the
    controller group's committed configuration (issue 11): the restart keeps them, warning
    with both lists; the addresses may change. The directory has an id of its own."""
    port, iport = free_port(), free_port()
    data = tmp_path / "data"
    first = Node(
        1, f"127.0.0.1:{port}", data, free_port(), open_log=InstrumentedLog,
        controller_voters=f"1@127.0.0.1:{iport}", internal_listen=f"127.0.0.1:{iport}",
    )  # fmt: skip
    await first.start()
    assert first.identity is not None
    directory_id = first.identity.directory_id
    assert len(directory_id) == 32
    await first.stop(1)
    changed = Node(
        1, f"127.0.0.1:{port}", data, free_port(), open_log=InstrumentedLog,
        controller_voters=f"1@127.0.0.1:{iport},2@127.0.0.1:{free_port()}",
        internal_listen=f"127.0.0.1:{iport}",
    )  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="tidelog.node.controller_node"):
        await changed.start()
    assert changed.controller.voter_ids == {1}
    assert any(
        "names nodes 1,2 but the controller's committed configuration has voters 1" in r.message
        and r.levelno == logging.WARNING
        for r in caplog.records
    )
    await changed.stop(1)
    port2, iport2 = free_port(), free_port()
    moved = Node(
        1, f"127.0.0.1:{port2}", data, free_port(), open_log=InstrumentedLog,
        controller_voters=f"1@127.0.0.1:{iport2}", internal_listen=f"127.0.0.1:{iport2}",
    )  # fmt: skip
    await moved.start()
    assert moved.identity is not None and moved.identity.directory_id == directory_id
    await moved.stop(1)
    other = tmp_path / "other"
    fresh = Node(1, "127.0.0.1:0", other, free_port(), open_log=InstrumentedLog)
    await fresh.start()
    assert fresh.identity is not None and fresh.identity.directory_id != directory_id
    await fresh.stop(1)


@pytest.mark.timeout(20)
async def test_linearizable_list_offsets_answers_after_a_read_index(client: Client) -> None:
    await client.create("lin")
    await client.produce("lin", [b"a", b"b", b"c"], acks=broker_pb2.ACKS_LEADER)
    for linearizable in (False, True):
        r = await client.broker.ListOffsets(
            broker_pb2.ListOffsetsRequest(
                topic="lin", spec=broker_pb2.OFFSET_SPEC_LATEST, linearizable=linearizable
            )
        )
        # acks=1 answers before the commit; a linearizable read waits for what is committed
        # before it (here: everything, on a one-node group) to be applied.
        assert r.high_watermark == 3 or not linearizable
        assert r.offset == r.high_watermark
