"""Group commit: one fsync per dirty partition per round, never one per request."""

from __future__ import annotations

import asyncio

import pytest
from tidelog.node.flusher import GroupCommitter
from tidelog.node.metrics import NodeMetrics
from tidelog.node.partition import Partition

from tests.unit.node_fakes import FakeLog
from tidelog.config import TopicConfig
from tidelog.errors import StorageError
from tidelog.records import encode_batch

DURABLE = TopicConfig.from_overrides({})
BATCH = encode_batch([b"x" * 100] * 10)


def partitions(committer: GroupCommitter, n: int) -> list[tuple[Partition, FakeLog]]:
    out = []
    for i in range(n):
        lg = FakeLog()
        out.append((Partition("t", i, lg, DURABLE, committer.mark_dirty), lg))
    return out


def metric(m: NodeMetrics, name: str) -> float:
    value = m.registry.get_sample_value(name)
    assert value is not None
    return value


@pytest.mark.timeout(20)
async def test_concurrent_acks_all_produces_share_fsyncs() -> None:
    metrics = NodeMetrics()
    committer = GroupCommitter(metrics)
    committer.start()
    [(p, lg)] = partitions(committer, 1)
    lg.flush_delay_s = 0.005

    async def produce() -> None:
        _, last = p.append_as_leader(BATCH)
        await p.wait_committed(last + 1, 5)

    requests = 200
    await asyncio.gather(*(produce() for _ in range(requests)))
    assert p.high_watermark == requests * 10
    assert lg.flushed_offset == requests * 10
    # Requests arrive while a round's fsync runs, so rounds cover many of them.
    assert lg.flush_calls < requests / 5, lg.flush_calls
    assert metric(metrics, "tidelog_fsyncs_total") == lg.flush_calls
    await committer.stop()


@pytest.mark.timeout(20)
async def test_each_dirty_partition_is_fsynced_once_per_round() -> None:
    metrics = NodeMetrics()
    committer = GroupCommitter(metrics, threads=2)
    parts = partitions(committer, 5)
    for p, _ in parts:
        for _ in range(3):
            p.append_as_leader(BATCH)
    await committer.flush_round()
    assert [lg.flush_calls for _, lg in parts] == [1] * 5
    assert [p.high_watermark for p, _ in parts] == [30] * 5
    assert committer.rounds == 1
    await committer.flush_round()  # nothing dirty: no fsync
    assert [lg.flush_calls for _, lg in parts] == [1] * 5
    await committer.stop()


@pytest.mark.timeout(20)
async def test_idle_node_does_not_fsync() -> None:
    committer = GroupCommitter(NodeMetrics())
    committer.start()
    [(_, lg)] = partitions(committer, 1)
    await asyncio.sleep(0.05)
    assert lg.flush_calls == 0 and committer.rounds == 0
    await committer.stop()


@pytest.mark.timeout(20)
async def test_fsync_failure_fails_the_partition_not_the_committer() -> None:
    committer = GroupCommitter(NodeMetrics())
    committer.start()
    (bad, bad_log), (good, _) = partitions(committer, 2)
    bad_log.flush_error = OSError(5, "Input/output error")
    _, last = bad.append_as_leader(BATCH)
    with pytest.raises(StorageError, match="Input/output error"):
        await bad.wait_committed(last + 1, 5)
    _, last = good.append_as_leader(BATCH)
    await good.wait_committed(last + 1, 5)
    await committer.stop()


@pytest.mark.timeout(20)
async def test_forget_waits_for_the_flush_in_progress() -> None:
    committer = GroupCommitter(NodeMetrics())
    committer.start()
    [(p, lg)] = partitions(committer, 1)
    lg.flush_delay_s = 0.1
    p.append_as_leader(BATCH)
    while lg.flushing_now == 0:
        await asyncio.sleep(0.001)
    await committer.forget(p)
    assert lg.flushing_now == 0
    lg.delete()  # asserts no flush runs
    await committer.stop()


@pytest.mark.timeout(20)
async def test_stop_flushes_what_is_left() -> None:
    committer = GroupCommitter(NodeMetrics())
    [(p, lg)] = partitions(committer, 1)
    p.append_as_leader(BATCH)
    await committer.stop()
    assert lg.flushed_offset == 10 and p.high_watermark == 10
