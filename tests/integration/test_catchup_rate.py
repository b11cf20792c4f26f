"""Catch-up by APPEND at the recovery rate, with real node processes (issue 11 item 2): a
learner added to a partition whose leader still holds the whole log (no streamed snapshot
involved) is sent the log no faster than ``replica.recovery.bytes.per.second``, a cluster
setting set at run time with ``tidelog cluster config set``; ``topic describe`` shows the
move's bytes copied and left meanwhile; once promoted the new replica holds every record."""

from __future__ import annotations

import asyncio
import os
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.healing import ok, spawn_healing_cluster, tidelog
from tests.support.nodeproc import Cluster, Node, until
from tidelog.client import Admin, Consumer, Producer, TopicPartition
from tidelog.node.catchup import CHUNK_BYTES, RateLimiter

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

TOPIC = "paced"
KIB = 1024
MIB = 1024 * KIB
RATE = 2 * MIB
LAG = 1 * MIB
VALUE_BYTES = 64 * KIB
RECORDS = 80  # 5 MiB of values
STARTUP_TIMEOUT_S = 60.0


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[dict[int, Node]]:
    nodes = spawn_healing_cluster(tmp_path, 4)
    try:
        yield nodes
    finally:
        for n in nodes.values():
            n.kill()


def metric(node: Node, name: str, labels: str = "") -> float:
    """One sample of ``node``'s metrics (0 when absent)."""
    url = f"http://127.0.0.1:{node.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as resp:
        text = resp.read().decode()
    for line in text.splitlines():
        key, _, value = line.rpartition(" ")
        if key == name + labels:
            return float(value)
    return 0.0


async def partition(c: Cluster) -> tuple[list[int], list[int], list[int], dict[int, tuple[int, int]], str]:  # fmt: skip
    """(replicas, target, in-sync, moving, stalled) of partition 0."""
    async with Admin(c.bootstrap) as admin:
        [d] = await admin.describe_topics([TOPIC])
    p = d.partitions[0]
    return list(p.replicas), list(p.target or []), list(p.in_sync), dict(p.moving), p.stalled


async def test_a_learner_copies_the_log_at_the_configured_rate(
    procs: dict[int, Node],
) -> None:
    c = Cluster(procs, TOPIC)
    try:
        await c.wait_all_alive(STARTUP_TIMEOUT_S)
        b = c.bootstrap
        async with Admin(b) as admin:
            # The balancer would move replicas onto node 4 by itself: the test moves them.
            await admin.set_cluster_config({"replica.balance.enable": "false"})
            await admin.create_topics(TOPIC, 1, replication_factor=3)
            await until("partition 0 has three in-sync replicas", lambda: _in_sync(c, 3), 30)
            replicas, _t, _i, _m, _s = await partition(c)
            if sorted(replicas) != [1, 2, 3]:  # placement chose node 4: start from 1, 2, 3
                await admin.reassign_partition(TOPIC, 0, [1, 2, 3])
                await until("partition 0 on nodes 1, 2, 3", lambda: _in_sync(c, 3), 60)
        values = [os.urandom(VALUE_BYTES) for _ in range(RECORDS)]  # incompressible
        async with Producer(b, acks="all") as producer:
            await producer.send_many(TOPIC, values, partition=0)
        await until("the writes are replicated", lambda: _in_sync(c, 3), 30)
        replicas, _t, _i, _m, _s = await partition(c)
        assert 4 not in replicas
        ok(await asyncio.to_thread(
            tidelog, b, "cluster", "config", "set",
            f"replica.recovery.bytes.per.second={RATE}", f"replica.recovery.lag.bytes={LAG}",
        ))  # fmt: skip
        before = {i: metric(procs[i], "tidelog_replica_recovery_sent_bytes_total",
                            '{path="append"}') for i in replicas}  # fmt: skip
        keep = sorted(replicas)[1:]
        target = [*keep, 4]

        # Every node applies the setting before the move starts.
        async def rate_everywhere() -> bool:
            rates = [
                metric(procs[i], "tidelog_replica_recovery_rate_bytes_per_second") for i in procs
            ]
            return all(r == RATE for r in rates)

        await until("every node runs at the cluster's rate", rate_everywhere, 20)
        started = time.monotonic()
        async with Admin(b) as admin:
            await admin.reassign_partition(TOPIC, 0, target)
        progress: list[tuple[int, int]] = []
        stalls: set[str] = set()

        async def moved() -> bool:
            replicas, tgt, in_sync, moving, stalled = await partition(c)
            if 4 in moving:
                progress.append(moving[4])
            if stalled:
                stalls.add(stalled)
            return not tgt and sorted(replicas) == target and set(in_sync) == set(target)

        await until("partition 0 moved onto node 4", moved, 60)
        elapsed = time.monotonic() - started
        sent = sum(
            metric(procs[i], "tidelog_replica_recovery_sent_bytes_total", '{path="append"}')
            - before[i]
            for i in before
        )
        size = RECORDS * VALUE_BYTES
        # The log went to the learner through the throttle (all but the last LAG bytes)...
        assert sent >= size - LAG - 2 * CHUNK_BYTES, (
            sent,
            size,
            elapsed,
            progress[:3],
            progress[-3:],
        )
        # ...no faster than the rate allows (the idle limiter's burst and one message more).
        burst = RateLimiter.burst_bytes(RATE) + CHUNK_BYTES
        assert sent <= RATE * elapsed + burst, (sent, elapsed)
        # The move showed its bytes copied and left while it went.
        assert progress, "the move never showed its progress"
        assert any(left > 0 for _copied, left in progress), progress
        assert any(copied > 0 and left > 0 for copied, left in progress), progress
        totals = {copied + left for copied, left in progress}
        assert all(t >= size for t in totals), totals
        assert any("rate limit" in s for s in stalls), stalls
        # The new replica holds the leader's records byte for byte, and they are all served.
        leader = (await c.leaders())[0]

        async def same() -> bool:
            a, d = (await c.digests(leader))[0], (await c.digests(4))[0]
            return (a.high_watermark, a.crc32c) == (d.high_watermark, d.crc32c)

        await until("node 4 holds the leader's records", same, 20)
        got: list[bytes] = []
        async with Consumer(b, auto_offset_reset="earliest") as consumer:
            consumer.assign([TopicPartition(TOPIC, 0)])
            async with asyncio.timeout(30):
                while len(got) < RECORDS:
                    got += [r.value or b"" for r in await consumer.poll(timeout_ms=1_000)]
        assert got == values
    finally:
        await c.close()


async def _in_sync(c: Cluster, n: int) -> bool:
    try:
        replicas, target, in_sync, _m, _s = await partition(c)
    except Exception:
        return False
    return not target and len(replicas) == n and set(in_sync) == set(replicas)
