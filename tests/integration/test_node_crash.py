"""kill -9 of a node while a producer runs: after a restart, every acknowledged record is there
exactly once and in order.

The producer does not retry (retries=0): a retried batch whose first attempt was appended
before the crash would legitimately be stored twice until the idempotent producer exists, and
this test checks the broker's promise, not the client's. So a record whose send failed may be
absent (or present once); an acknowledged record must be present exactly once, and the
acknowledged records of a partition must appear in the order they were sent.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.nodeproc import Node
from tidelog.client import Admin, Consumer, Producer, TopicPartition
from tidelog.errors import TidelogError

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

PARTITIONS = 2
RECORDS_BEFORE_KILL = 20_000
RECORDS_AFTER_RESTART = 5_000


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    n = Node(tmp_path / "data", tmp_path / "node.log")
    n.start()
    try:
        yield n
    finally:
        n.kill()


async def _produce_until(
    producer: Producer, topic: str, stop: asyncio.Event, acked: dict[int, list[int]]
) -> int:
    """Send numbered records round-robin over the partitions until ``stop``; fill ``acked``
    with the sequence numbers acknowledged per partition, in acknowledgement order."""
    seq = 0
    pending: set[asyncio.Task[None]] = set()

    async def one(partition: int, n: int) -> None:
        try:
            await producer.send(topic, b"%d" % n, partition=partition)
        except TidelogError:
            return
        acked[partition].append(n)

    while not stop.is_set():
        partition = seq % PARTITIONS
        task = asyncio.create_task(one(partition, seq))
        pending.add(task)
        task.add_done_callback(pending.discard)
        seq += 1
        if seq % 500 == 0:
            await asyncio.sleep(0.005)
        if len(pending) > 5000:
            await asyncio.sleep(0.01)
    if pending:
        await asyncio.wait(pending)
    return seq


async def test_kill_9_while_producing_keeps_every_acknowledged_record_once_in_order(
    node: Node,
) -> None:
    topic = "crash"
    async with Admin(node.address) as admin:
        await admin.create_topics(topic, PARTITIONS, 1)
    acked: dict[int, list[int]] = {p: [] for p in range(PARTITIONS)}

    producer = Producer(
        node.address,
        acks="all",
        linger_ms=2,
        retries=0,
        request_timeout_ms=5_000,
        delivery_timeout_ms=10_000,
        max_in_flight_per_partition=8,
    )
    await producer.start()
    stop = asyncio.Event()
    runner = asyncio.create_task(_produce_until(producer, topic, stop, acked))
    async with asyncio.timeout(60):
        while sum(len(v) for v in acked.values()) < RECORDS_BEFORE_KILL:
            await asyncio.sleep(0.01)
    # SIGKILL mid-stream: requests are in flight, appends and fsyncs are under way.
    node.stop(signal.SIGKILL)
    acked_at_kill = sum(len(v) for v in acked.values())
    await asyncio.sleep(0.3)
    await asyncio.get_running_loop().run_in_executor(None, node.start)
    async with asyncio.timeout(60):
        while sum(len(v) for v in acked.values()) < acked_at_kill + RECORDS_AFTER_RESTART:
            await asyncio.sleep(0.01)
    stop.set()
    sent = await runner
    await producer.stop()
    assert sent > sum(len(v) for v in acked.values()) >= RECORDS_BEFORE_KILL

    async with Consumer(node.address, auto_offset_reset="earliest") as consumer:
        tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        consumer.assign(tps)
        ends = await consumer.end_offsets(tps)
        stored: dict[int, list[int]] = {p: [] for p in range(PARTITIONS)}
        async with asyncio.timeout(60):
            while sum(len(v) for v in stored.values()) < sum(ends.values()):
                for r in await consumer.poll(timeout_ms=500):
                    assert r.value is not None
                    stored[r.partition].append(int(r.value))

    for p in range(PARTITIONS):
        seen = stored[p]
        assert len(seen) == len(set(seen)), f"partition {p}: a record is stored twice"
        position = {n: i for i, n in enumerate(seen)}
        lost = [n for n in acked[p] if n not in position]
        assert not lost, f"partition {p}: {len(lost)} acknowledged records lost, e.g. {lost[:5]}"
        # Stored order is send order (sequence numbers increase along the log).
        assert seen == sorted(seen), f"partition {p}: records out of order"
        assert all(n % PARTITIONS == p for n in seen)
