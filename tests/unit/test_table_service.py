"""The Table service in-process, over a real grpc.aio server and a real node (one node, its
RocksDB tables): answers, paging, watch, and each bad input a clear status with a reason.

The 3-node behaviour (leaders, failover, the client's routing) is in
tests/integration/test_table_api.py."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest
from grpc import aio

from tests.unit.node_fakes import Client
from tidelog.errors import from_rpc_error
from tidelog.node.table_token import ScanToken, decode_token, encode_token
from tidelog.records import encode_batch
from tidelog.v1 import broker_pb2, table_pb2, table_pb2_grpc

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
async def table(client: Client) -> AsyncIterator[table_pb2_grpc.TableAsyncStub]:
    yield table_pb2_grpc.TableStub(client.channel)  # type: ignore[misc]


async def put(
    client: Client, topic: str, items: list[tuple[bytes, bytes | None]]
) -> broker_pb2.ProduceResponse:
    batch = encode_batch([v for _, v in items], keys=[k for k, _ in items])
    return await client.broker.Produce(
        broker_pb2.ProduceRequest(topic=topic, batches=batch, acks=broker_pb2.ACKS_ALL)
    )


def rows(r: table_pb2.TableRows) -> list[tuple[bytes, bytes, int]]:
    """(key, value, offset) of each row of a columnar TableRows."""
    return list(zip(r.keys, r.values, r.offsets, strict=True))


def changes_of(ev: table_pb2.TableWatchEvent) -> list[tuple[str, bytes, bytes, int]]:
    """(kind, key, value, offset) of each row of a watch event."""
    deleted = list(ev.deleted) or [False] * len(ev.rows.keys)
    return [
        ("snapshot" if ev.snapshot else "delete" if d else "put", k, v, o)
        for (k, v, o), d in zip(rows(ev.rows), deleted, strict=True)
    ]


async def fails(call: object, code: grpc.StatusCode, reason: str) -> str:
    with pytest.raises(aio.AioRpcError) as info:
        await call  # type: ignore[misc]
    e = info.value
    assert e.code() == code, e.details()
    assert from_rpc_error(e).reason == reason
    return e.details() or ""


async def test_get_get_many_and_applied_offsets(
    client: Client, table: table_pb2_grpc.TableAsyncStub
) -> None:
    await client.create("c", configs={"cleanup.policy": "compact"})
    await put(client, "c", [(b"a", b"1"), (b"b", b"2"), (b"a", b"3")])
    r = await put(client, "c", [(b"b", None), (b"c", b"")])  # a tombstone, an empty value
    resp = await table.Get(table_pb2.TableGetRequest(topic="c", key=b"a", min_offset=r.last_offset))
    assert resp.found and resp.row.value == b"3" and resp.row.offset == 2
    assert resp.applied_offset > r.last_offset
    assert not (await table.Get(table_pb2.TableGetRequest(topic="c", key=b"b"))).found
    empty = await table.Get(table_pb2.TableGetRequest(topic="c", key=b"c"))
    assert empty.found and empty.row.value == b""
    many = await table.GetMany(
        table_pb2.TableGetManyRequest(topic="c", keys=[b"c", b"a", b"b", b"a", b"zz"])
    )
    assert [(k, v) for k, v, _ in rows(many.rows)] == [(b"c", b""), (b"a", b"3")]
    # Linearizable reads: a ReadIndex round first, then the same answers.
    lin = await table.Get(table_pb2.TableGetRequest(topic="c", key=b"a", linearizable=True))
    assert lin.found and lin.row.value == b"3" and lin.applied_offset == 5
    lin_many = await table.GetMany(
        table_pb2.TableGetManyRequest(topic="c", keys=[b"a", b"c"], linearizable=True)
    )
    assert list(lin_many.rows.keys) == [b"a", b"c"]
    lin_scan = await table.Scan(table_pb2.TableScanRequest(topic="c", linearizable=True))
    assert list(lin_scan.rows.keys) == [b"a", b"c"]


async def test_scan_pages_over_one_snapshot(
    client: Client, table: table_pb2_grpc.TableAsyncStub
) -> None:
    await client.create("s", configs={"cleanup.policy": "compact"})
    await put(client, "s", [(b"k%03d" % i, b"v%d" % i) for i in range(25)])
    first = await table.Scan(table_pb2.TableScanRequest(topic="s", limit=10, min_offset=24))
    assert list(first.rows.keys) == [b"k%03d" % i for i in range(10)]
    assert first.continuation_token
    # Writes after the first page do not show in the scan: it reads one snapshot.
    await put(client, "s", [(b"k005", b"new"), (b"k015", b"new"), (b"k999", b"new")])
    second = await table.Scan(
        table_pb2.TableScanRequest(topic="s", limit=10, continuation_token=first.continuation_token)
    )
    third = await table.Scan(
        table_pb2.TableScanRequest(
            topic="s", limit=10, continuation_token=second.continuation_token
        )
    )
    assert not third.continuation_token
    keys = [k for page in (first, second, third) for k in page.rows.keys]
    assert keys == [b"k%03d" % i for i in range(25)]
    assert all(v != b"new" for page in (first, second, third) for v in page.rows.values)
    assert first.applied_offset == second.applied_offset == third.applied_offset == 25
    # A finished scan's snapshot is closed: its token no longer continues.
    await fails(
        table.Scan(
            table_pb2.TableScanRequest(topic="s", continuation_token=second.continuation_token)
        ),
        grpc.StatusCode.ABORTED,
        "SCAN_EXPIRED",
    )
    # A new scan sees the new values; prefix and range combine.
    fresh = await table.Scan(
        table_pb2.TableScanRequest(topic="s", prefix=b"k0", start=b"k004", end=b"k016")
    )
    assert list(fresh.rows.keys) == [b"k%03d" % i for i in range(4, 16)]
    assert dict(zip(fresh.rows.keys, fresh.rows.values, strict=True))[b"k015"] == b"new"


async def test_watch_snapshot_then_changes(
    client: Client, table: table_pb2_grpc.TableAsyncStub
) -> None:
    await client.create("w", configs={"cleanup.policy": "compact"})
    await put(client, "w", [(b"a", b"1"), (b"b", b"2")])
    call = table.Watch(table_pb2.TableWatchRequest(topic="w"))
    ev = await asyncio.wait_for(call.read(), 5)
    assert isinstance(ev, table_pb2.TableWatchEvent)
    assert ev.snapshot_done and ev.next_offset == 2
    assert changes_of(ev) == [("snapshot", b"a", b"1", 0), ("snapshot", b"b", b"2", 1)]
    await put(client, "w", [(b"a", b"3"), (b"b", None)])
    changes: list[tuple[str, bytes, bytes, int]] = []
    while len(changes) < 2:
        ev = await asyncio.wait_for(call.read(), 5)
        assert isinstance(ev, table_pb2.TableWatchEvent)
        changes += changes_of(ev)
    assert changes == [("put", b"a", b"3", 2), ("delete", b"b", b"", 3)]
    assert ev.next_offset == 4
    call.cancel()
    # Resumed from an offset: no snapshot, the log from there (mid-batch too).
    call = table.Watch(table_pb2.TableWatchRequest(topic="w", from_offset=3))
    ev = await asyncio.wait_for(call.read(), 5)
    assert isinstance(ev, table_pb2.TableWatchEvent)
    assert not ev.snapshot_done
    assert changes_of(ev) == [("delete", b"b", b"", 3)]
    call.cancel()


async def test_bad_input_is_a_clear_error(
    client: Client, table: table_pb2_grpc.TableAsyncStub
) -> None:
    await client.create(
        "small",
        partitions=2,
        configs={"cleanup.policy": "compact,delete", "max.message.bytes": "1024"},
    )
    await client.create("plain")
    await put(client, "small", [(b"a", b"1")])
    details = await fails(
        table.Get(table_pb2.TableGetRequest(topic="nope", key=b"a")),
        grpc.StatusCode.NOT_FOUND,
        "UNKNOWN_TOPIC",
    )
    assert "nope" in details
    details = await fails(
        table.Get(table_pb2.TableGetRequest(topic="plain", key=b"a")),
        grpc.StatusCode.FAILED_PRECONDITION,
        "NOT_A_TABLE",
    )
    assert "cleanup.policy=delete" in details and "compact" in details
    for call in (
        table.Scan(table_pb2.TableScanRequest(topic="plain")),
        table.GetMany(table_pb2.TableGetManyRequest(topic="plain", keys=[b"a"])),
    ):
        await fails(call, grpc.StatusCode.FAILED_PRECONDITION, "NOT_A_TABLE")
    watch = table.Watch(table_pb2.TableWatchRequest(topic="plain"))
    await fails(watch.read(), grpc.StatusCode.FAILED_PRECONDITION, "NOT_A_TABLE")
    details = await fails(
        table.Get(table_pb2.TableGetRequest(topic="small", key=b"x" * 1025)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "KEY_TOO_LARGE",
    )
    assert "1025 bytes" in details and "1024" in details
    await fails(
        table.GetMany(table_pb2.TableGetManyRequest(topic="small", keys=[b"a", b"y" * 2000])),
        grpc.StatusCode.INVALID_ARGUMENT,
        "KEY_TOO_LARGE",
    )
    await fails(
        table.GetMany(
            table_pb2.TableGetManyRequest(topic="small", keys=[b"%d" % i for i in range(10_001)])
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_REQUEST",
    )
    details = await fails(
        table.Scan(table_pb2.TableScanRequest(topic="small", continuation_token=b"\x01garbage")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_TOKEN",
    )
    assert "malformed continuation token" in details
    # A real token, used for another partition: refused, not read.
    page = await table.Scan(table_pb2.TableScanRequest(topic="small", partition=0, limit=1))
    raw = page.continuation_token or encode_token(ScanToken(b"\0" * 16, "small", 0, 0, b""))
    decode_token(raw, "small", 0)
    details = await fails(
        table.Scan(table_pb2.TableScanRequest(topic="small", partition=1, continuation_token=raw)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_TOKEN",
    )
    assert "another scan" in details
    await fails(
        table.Scan(table_pb2.TableScanRequest(topic="small", limit=-1)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_REQUEST",
    )
    await fails(
        table.Get(table_pb2.TableGetRequest(topic="small", key=b"a", min_offset=-1)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_REQUEST",
    )
    # A min_offset the table does not reach in time.
    details = await fails(
        table.Get(
            table_pb2.TableGetRequest(topic="small", key=b"a", min_offset=1000, timeout_ms=100)
        ),
        grpc.StatusCode.DEADLINE_EXCEEDED,
        "REQUEST_TIMED_OUT",
    )
    assert "min_offset 1000" in details
    await fails(
        table.Get(table_pb2.TableGetRequest(topic="small", partition=7, key=b"a")),
        grpc.StatusCode.NOT_FOUND,
        "UNKNOWN_PARTITION",
    )
    watch = table.Watch(table_pb2.TableWatchRequest(topic="small", from_offset=99))
    await fails(watch.read(), grpc.StatusCode.OUT_OF_RANGE, "OFFSET_OUT_OF_RANGE")
