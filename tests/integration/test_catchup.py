"""Catch-up by streaming with real node processes (issue 11 item 2, node/catchup.py): a
replica that was down while its leader's retention deleted the entries it lacks copies the
leader's retained records and state in checksummed chunks over the internal listener, then
replicates normally, and holds the same records as the leader from the log start; a copy
larger than one Raft message (about 71 MiB) works; a receiver killed mid-copy resumes from
what it had verified."""

from __future__ import annotations

import os
import re
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from tests.support.nodeproc import Cluster, spawn_cluster, until
from tidelog.node.raft.limits import Config
from tidelog.records import encode_batch
from tidelog.v1 import admin_pb2, admin_pb2_grpc, broker_pb2

TOPIC = "catchup"
MIB = 1024 * 1024
COPYING = re.compile(rb"copying offsets \[(\d+), (\d+)\)")
COMPLETE = re.compile(rb"catch-up copy for the snapshot at index \d+ complete: (\d+) bytes")


@asynccontextmanager
async def cluster(tmp_path: Path, rate: int) -> AsyncIterator[Cluster]:
    nodes = spawn_cluster(
        tmp_path,
        (1, 2, 3),
        extra_args=dict.fromkeys((1, 2, 3), ("--replica-recovery-bytes-per-second", str(rate))),
    )
    c = Cluster(nodes, TOPIC)
    try:
        await c.wait_all_alive(90)  # a loaded machine starts processes slowly
        yield c
    finally:
        await c.close()
        for n in nodes.values():
            n.kill()


async def create(c: Cluster, segment_bytes: int, retention_bytes: int) -> int:
    """The topic (one partition, three replicas); returns its leader."""
    spec = admin_pb2.TopicSpec(
        name=TOPIC,
        partitions=1,
        replication_factor=3,
        configs={"segment.bytes": str(segment_bytes), "retention.bytes": str(retention_bytes)},
    )
    await admin_pb2_grpc.AdminStub(c.channel(1)).CreateTopics(
        admin_pb2.CreateTopicsRequest(topics=[spec]), timeout=30
    )

    async def led() -> bool:
        return 0 in await c.leaders()

    await until("the partition has a leader", led, 30)
    return (await c.leaders())[0]


async def produce(
    c: Cluster, leader: int, batches: int, batch_bytes: int, tag: int = 0
) -> list[int]:
    """Produces ``batches`` batches of about ``batch_bytes`` each; returns their base offsets."""
    records = 4
    bases: list[int] = []
    for i in range(batches):
        value = os.urandom(batch_bytes // records)
        resp = await c.broker(leader).Produce(
            broker_pb2.ProduceRequest(
                topic=TOPIC,
                batches=encode_batch([value] * records, keys=[b"%d-%d" % (tag, i)] * records),
                acks=broker_pb2.ACKS_ALL,
            ),
            timeout=60,
        )
        assert resp.last_offset >= resp.base_offset >= 0
        bases.append(resp.base_offset)
    return bases


def beyond_what_was_sent(bases: list[int], batch_bytes: int) -> int:
    """The base offset of the first batch (of ``bases``, produced one by one after a
    follower died) that the leader cannot have sent the dead follower.

    A leader keeps pipelining APPENDs to a follower in REPLICATE state until its window is
    full (raft ``Config.max_inflight_bytes``): those wait in the transport's outbox and
    arrive when the follower is back, however far retention moved the log start meanwhile,
    and from there on the follower catches up by APPEND if the leader still holds the
    entries after them. Only once the leader's log starts beyond this batch does the
    follower need entries the leader no longer holds (node/catchup.py: a replica behind its
    leader's first retained Raft entry copies the leader's log). An APPEND goes while the
    window is not full and holds at most ``max_msg_bytes`` or one entry, and every batch
    here is at least ``batch_bytes``: so at most this many batches were sent."""
    cfg = Config()
    sent_max = -(-(cfg.max_inflight_bytes + cfg.max_msg_bytes) // batch_bytes)
    assert sent_max < len(bases), "produce more than the leader pipelines"
    return bases[sent_max]


async def behind_the_log_start(c: Cluster, leader: int, offset: int, timeout_s: float) -> None:
    """Wait until the leader's log start lies beyond ``offset``: the leader's retention
    moves it to the base offset of a segment it keeps (``PartitionLog.retention_point``),
    so its Raft log no longer holds the entry at ``offset``. Retention runs every few
    seconds (node limits.retention_interval_ms), possibly more than once while the test
    produces: an earlier pass may move the start only part of the way."""

    async def moved() -> bool:
        return (await c.digests(leader))[0].log_start_offset > offset

    await until(f"the leader's retention moves its log start beyond {offset}", moved, timeout_s)


async def same_as_leader(c: Cluster, leader: int, node: int, timeout_s: float) -> tuple[int, int]:
    """Wait until ``node``'s replica holds the leader's records byte for byte, from the log
    start to the high watermark; returns (log start, high watermark)."""
    seen: list[object] = []

    async def same() -> bool:
        a, b = (await c.digests(leader))[0], (await c.digests(node))[0]
        seen[:] = [a, b]
        return a.high_watermark > 0 and (
            a.log_start_offset,
            a.high_watermark,
            a.digest_end_offset,
            a.crc32c,
        ) == (b.log_start_offset, b.high_watermark, b.digest_end_offset, b.crc32c)

    try:
        await until(f"node {node} holds the leader's records", same, timeout_s)
    except AssertionError:
        raise AssertionError(f"digests differ: {seen}") from None
    d = (await c.digests(leader))[0]
    assert d.digest_end_offset == d.high_watermark
    return d.log_start_offset, d.high_watermark


def log_of(c: Cluster, node: int) -> bytes:
    return c.nodes[node].log_path.read_bytes()


async def copied_in(c: Cluster, node: int, what: Callable[[bytes], bool], timeout_s: float) -> None:
    async def seen() -> bool:
        return what(log_of(c, node))

    await until(f"node {node} logs the catch-up", seen, timeout_s)


async def run_catchup(tmp_path: Path, *, batch_bytes: int, batches: int, segment_bytes: int,
                      retention_bytes: int, copied_min: int = 1) -> None:  # fmt: skip
    async with cluster(tmp_path, rate=0) as c:
        leader = await create(c, segment_bytes, retention_bytes)
        await produce(c, leader, 2, batch_bytes)
        follower = next(n for n in (1, 2, 3) if n != leader)
        await same_as_leader(c, leader, follower, 30)
        c.nodes[follower].kill()  # at once: a drain would go on replicating for a while
        # More than the leader pipelines to a follower (raft Config.max_inflight_bytes,
        # 32 MiB, which wait in the transport's outbox and arrive when it is back) plus the
        # retention: once the leader's log starts beyond what it pipelined, the follower
        # needs entries the leader no longer holds.
        bases = await produce(c, leader, batches, batch_bytes, tag=1)
        beyond = beyond_what_was_sent(bases, batch_bytes)
        await behind_the_log_start(c, leader, beyond, 30)
        c.nodes[follower].start()
        start, hw = await same_as_leader(c, leader, follower, 120)
        assert start > beyond
        text = log_of(c, follower)
        assert b"installed the copied log" in text
        assert b"/0: reset to offset" not in text  # no plain (record-less) snapshot
        m = COPYING.search(text)
        assert m is not None and int(m.group(2)) - int(m.group(1)) > 0
        done = COMPLETE.search(text)
        assert done is not None and int(done.group(1)) >= copied_min
        # Then it replicates as any follower.
        await produce(c, leader, 2, 64 * 1024, tag=2)
        _start, hw2 = await same_as_leader(c, leader, follower, 30)
        assert hw2 > hw


@pytest.mark.timeout(240)
async def test_a_replica_behind_the_log_start_catches_up_by_streaming(tmp_path: Path) -> None:
    await run_catchup(
        tmp_path, batch_bytes=1 * MIB, batches=48, segment_bytes=2 * MIB,
        retention_bytes=8 * MIB,
    )  # fmt: skip


@pytest.mark.timeout(300)
async def test_a_catchup_larger_than_one_raft_message(tmp_path: Path) -> None:
    """About 80 MiB retained and copied: more than one Raft message holds (about 71 MiB,
    node/transport.py), in chunks of at most 1 MiB."""
    await run_catchup(
        tmp_path, batch_bytes=7 * MIB, batches=22, segment_bytes=16 * MIB,
        retention_bytes=88 * MIB, copied_min=72 * MIB,
    )  # fmt: skip


@pytest.mark.timeout(300)
async def test_a_receiver_killed_mid_copy_resumes_from_what_it_verified(tmp_path: Path) -> None:
    async with cluster(tmp_path, rate=2 * MIB) as c:
        leader = await create(c, 1 * MIB, 12 * MIB)
        await produce(c, leader, 1, 64 * 1024)
        follower = next(n for n in (1, 2, 3) if n != leader)
        await same_as_leader(c, leader, follower, 30)
        c.nodes[follower].kill()  # at once: a drain would go on replicating for a while
        bases = await produce(c, leader, 48, 1 * MIB, tag=1)  # see run_catchup
        await behind_the_log_start(c, leader, beyond_what_was_sent(bases, 1 * MIB), 30)
        c.nodes[follower].start()
        await copied_in(c, follower, lambda t: COPYING.search(t) is not None, 60)
        # About 3 of the 12+ MiB at 2 MiB/s: kill -9 in the middle of the copy.
        stage = next((c.nodes[follower].data_dir / "topics").glob("*/0.catchup"))

        async def some_copied() -> bool:
            return sum(f.stat().st_size for f in stage.rglob("*.log")) > 3 * MIB

        await until("part of the range is staged", some_copied, 30)
        c.nodes[follower].kill()
        first = COPYING.search(log_of(c, follower))
        assert first is not None
        assert b"installed the copied log" not in log_of(c, follower)
        c.nodes[follower].log_path.write_bytes(b"")
        c.nodes[follower].start()
        await same_as_leader(c, leader, follower, 120)
        text = log_of(c, follower)
        again = COPYING.search(text)
        assert again is not None
        # It asked for the rest only: from beyond where the first run started, keeping at
        # least two of the 1 MiB batches (4 offsets each) it had verified.
        assert int(again.group(1)) >= int(first.group(1)) + 2 * 4
        assert int(again.group(2)) >= int(first.group(2))
        assert b"installed the copied log" in text
        assert not stage.exists()
