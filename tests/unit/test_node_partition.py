"""Partition replica: append vs commit, produce waiters, fetch wake-ups, closing."""

from __future__ import annotations

import asyncio

import pytest
from tidelog.node.partition import Partition

from tests.unit.node_fakes import FakeLog
from tidelog.config import TopicConfig
from tidelog.errors import (
    NodeUnavailable,
    OffsetOutOfRange,
    RequestTimedOut,
    StorageError,
    UnknownTopic,
)
from tidelog.records import encode_batch, validate_batches

DURABLE = TopicConfig.from_overrides({})
OS = TopicConfig.from_overrides({"flush": "os"})


def make(config: TopicConfig = DURABLE) -> tuple[Partition, FakeLog, list[Partition]]:
    lg = FakeLog()
    dirty: list[Partition] = []
    return Partition("t", 0, lg, config, dirty.append), lg, dirty


def append(p: Partition, n: int, ts: int = 1000) -> tuple[int, int]:
    buf = encode_batch([b"v%d" % i for i in range(n)], timestamps_ms=ts)
    return p.append_as_leader(buf)


@pytest.mark.timeout(10)
async def test_durable_append_is_invisible_until_committed() -> None:
    p, lg, dirty = make()
    assert append(p, 3) == (0, 2)
    assert append(p, 2) == (3, 4)
    assert lg.log_end_offset == 5
    assert p.high_watermark == 0
    assert dirty == [p, p]
    assert p.dirty
    p.commit(5)
    assert p.high_watermark == 5
    p.commit(2)  # never backwards
    assert p.high_watermark == 5


@pytest.mark.timeout(10)
async def test_os_flush_commits_at_append() -> None:
    p, _, dirty = make(OS)
    append(p, 10)
    assert p.high_watermark == 10
    assert dirty == []


@pytest.mark.timeout(10)
async def test_waiters_wake_in_offset_order_only_when_covered() -> None:
    p, _, _ = make()
    append(p, 2)
    append(p, 2)
    first = asyncio.create_task(p.wait_committed(2, 5))
    second = asyncio.create_task(p.wait_committed(4, 5))
    await asyncio.sleep(0)
    p.commit(3)
    await asyncio.sleep(0)
    assert first.done() and not second.done()
    p.commit(4)
    await asyncio.wait_for(second, 1)
    # Already committed: returns at once.
    await asyncio.wait_for(p.wait_committed(4, 5), 1)


@pytest.mark.timeout(10)
async def test_wait_times_out_and_leaves_no_waiter_behind() -> None:
    p, _, _ = make()
    append(p, 1)
    with pytest.raises(RequestTimedOut, match="not committed within 20 ms"):
        await p.wait_committed(1, 0.02)
    assert len(p._waiters) == 0


@pytest.mark.timeout(10)
async def test_changed_event_fires_on_commit_and_is_replaced() -> None:
    p, _, _ = make()
    ev = p.changed()
    append(p, 1)
    assert not ev.is_set()
    p.commit(1)
    assert ev.is_set()
    assert not p.changed().is_set()


@pytest.mark.timeout(10)
async def test_delete_fails_waiters_and_rejects_appends() -> None:
    p, _, _ = make()
    append(p, 1)
    waiter = asyncio.create_task(p.wait_committed(1, 5))
    await asyncio.sleep(0)
    ev = p.changed()
    p.close_for_delete()
    assert ev.is_set()
    with pytest.raises(UnknownTopic, match="deleted"):
        await waiter
    with pytest.raises(UnknownTopic):
        append(p, 1)
    with pytest.raises(UnknownTopic):
        p.check_streaming()
    p.close_for_shutdown()  # the first error wins
    with pytest.raises(UnknownTopic):
        p.check_open()


@pytest.mark.timeout(10)
async def test_end_streams_keeps_appends_and_commits_going() -> None:
    p, _, _ = make()
    p.end_streams(NodeUnavailable("stopping"))
    with pytest.raises(NodeUnavailable):
        p.check_streaming()
    p.check_open()
    append(p, 2)
    waiter = asyncio.create_task(p.wait_committed(2, 5))
    await asyncio.sleep(0)
    p.commit(2)
    await asyncio.wait_for(waiter, 1)


@pytest.mark.timeout(10)
async def test_storage_failure_takes_the_partition_offline() -> None:
    p, _, _ = make()
    p.fail_storage(OSError(5, "Input/output error"))
    with pytest.raises(StorageError, match="Input/output error"):
        append(p, 1)


@pytest.mark.timeout(10)
async def test_fetch_offset_range_names_the_valid_range() -> None:
    p, lg, _ = make(OS)
    append(p, 5)
    lg.log_start_offset = 2
    p.check_fetch_offset(2)
    p.check_fetch_offset(5)
    for bad in (1, 6, -1):
        with pytest.raises(OffsetOutOfRange, match=r"valid offsets are 2\.\.5") as info:
            p.check_fetch_offset(bad)
        assert info.value.metadata == {"log_start_offset": "2", "high_watermark": "5"}


@pytest.mark.timeout(10)
async def test_read_serves_only_committed_batches() -> None:
    p, _, _ = make()
    append(p, 2)
    append(p, 3)
    p.commit(2)
    data = p.read(0, 1 << 20)
    assert validate_batches(data)[-1][1].last_offset == 1
    assert p.read(2, 1 << 20) == b""


@pytest.mark.timeout(10)
async def test_offset_for_timestamp_hides_uncommitted() -> None:
    p, _, _ = make()
    append(p, 2, ts=1000)
    append(p, 2, ts=2000)
    p.commit(2)
    assert p.offset_for_timestamp(500) == (0, 1000)
    assert p.offset_for_timestamp(1500) == (2, -1)  # found at 2, but 2 is not committed
    assert p.offset_for_timestamp(9999) == (2, -1)


@pytest.mark.timeout(10)
async def test_switching_to_flush_os_commits_what_waited_for_fsync() -> None:
    p, lg, dirty = make()
    append(p, 4)
    assert p.high_watermark == 0
    p.update_config(OS)
    assert p.high_watermark == 4
    assert lg.config is OS
    dirty.clear()
    p.update_config(DURABLE)
    assert dirty == [p]  # still unflushed: the committer must fsync it
