"""Per-partition order and no duplicates from producers with the DEFAULT settings, on a real
3-node cluster (``python -m tidelog.node`` processes on 127.0.0.1, free ports, temporary
directories, all killed at the end).

The defect of issue 10: with several requests in flight per partition and no broker-side
sequence check, gRPC's unordered concurrent calls let one producer's batches be stored out
of send order with no fault at all, and a retry after a lost answer stores a batch twice.
Here:

* 4 producers, default settings (idempotent, 5 requests in flight per partition, acks=all),
  each writing :data:`RATE_PER_PRODUCER` records/s to a 3-partition RF=3 topic for
  :data:`SECONDS` (``TIDELOG_ORDER_SECONDS=300`` for a run of minutes): every producer's
  acknowledged records sit at increasing offsets in send order in each partition, each
  record is stored once, at the offset its acknowledgment named.
* A producer whose answers are lost (the leader paused with SIGSTOP past the request
  timeout, then resumed with SIGCONT) retries without duplicates or reordering.

``TIDELOG_ORDER_PRODUCER=legacy`` runs the first test with the producer as it was before
idempotence (``enable_idempotence=False, max_in_flight_per_partition=8``): the checker then
catches the reordering that configuration allows.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import pytest

from tests.support.nodeproc import Cluster, Node, spawn_cluster, until
from tidelog.client import Admin, Consumer, Producer, RecordFuture, TopicPartition

pytestmark = pytest.mark.integration

NODES = (1, 2, 3)
#: The CI run; a run of minutes: TIDELOG_ORDER_SECONDS=300.
SECONDS: Final = float(os.environ.get("TIDELOG_ORDER_SECONDS", "20"))
PRODUCERS: Final = 4
RATE_PER_PRODUCER: Final = 400
PARTITIONS: Final = 3
SEND_TICK_S: Final = 0.005
#: The producer's settings: the defaults, or the pre-idempotence ones (module docstring).
PRODUCER_SETTINGS: Final[dict[str, Any]] = (
    {"enable_idempotence": False, "max_in_flight_per_partition": 8}
    if os.environ.get("TIDELOG_ORDER_PRODUCER") == "legacy"
    else {}
)
FLUSH_TIMEOUT_MS: Final = 60_000
READ_TIMEOUT_S: Final = 120.0
#: The lost-answers test: the request timeout, and how long the leader stays paused.
REQUEST_TIMEOUT_MS: Final = 2_000
PAUSE_S: Final = 5.0


@dataclass(frozen=True, slots=True)
class Ack:
    producer: int
    seq: int
    partition: int
    offset: int


@dataclass(frozen=True, slots=True)
class Stored:
    partition: int
    offset: int
    producer: int
    seq: int


def value(producer: int, seq: int) -> bytes:
    return b"order %d %d" % (producer, seq)


def parse(raw: bytes | None) -> tuple[int, int] | None:
    if raw is None:
        return None
    parts = raw.split(b" ")
    if len(parts) != 3 or parts[0] != b"order":
        return None
    return int(parts[1]), int(parts[2])


def violations(acks: Iterable[Ack], stored: Iterable[Stored]) -> dict[str, list[Any]]:
    """What breaks the promise: records stored twice; acknowledged records missing or not
    at their acknowledged offset; a producer's records of one partition not in send order
    (a record stored after one the producer sent later)."""
    out: dict[str, list[Any]] = {"duplicated": [], "lost": [], "misplaced": [], "reordered": []}
    copies: dict[tuple[int, int], int] = defaultdict(int)
    at: dict[tuple[int, int], tuple[int, int]] = {}
    by_producer: dict[tuple[int, int], list[Stored]] = defaultdict(list)
    for s in stored:
        copies[(s.producer, s.seq)] += 1
        at[(s.partition, s.offset)] = (s.producer, s.seq)
        by_producer[(s.producer, s.partition)].append(s)
    out["duplicated"] = sorted(k for k, n in copies.items() if n > 1)
    for a in acks:
        if (a.producer, a.seq) not in copies:
            out["lost"].append(a)
        elif at.get((a.partition, a.offset)) != (a.producer, a.seq):
            out["misplaced"].append(a)
    for records in by_producer.values():
        records.sort(key=lambda s: s.offset)
        out["reordered"] += [
            (later, earlier)
            for earlier, later in itertools.pairwise(records)
            if later.seq <= earlier.seq
        ]
    return out


def test_the_checker_catches_each_violation() -> None:
    good = [Stored(0, 0, 1, 0), Stored(0, 1, 2, 0), Stored(0, 2, 1, 1), Stored(1, 0, 1, 2)]
    acks = [Ack(1, 0, 0, 0), Ack(2, 0, 0, 1), Ack(1, 1, 0, 2), Ack(1, 2, 1, 0)]
    assert violations(acks, good) == {
        "duplicated": [],
        "lost": [],
        "misplaced": [],
        "reordered": [],
    }
    # Producer 1's seq 1 stored before its seq 0 in partition 0, as the defect did.
    swapped = [Stored(0, 0, 1, 1), Stored(0, 1, 2, 0), Stored(0, 2, 1, 0)]
    assert violations([], swapped)["reordered"] == [(Stored(0, 2, 1, 0), Stored(0, 0, 1, 1))]
    twice = [*good, Stored(0, 3, 1, 1)]
    found = violations(acks, twice)
    assert found["duplicated"] == [(1, 1)] and found["reordered"]
    assert violations(acks, good[:3])["lost"] == [Ack(1, 2, 1, 0)]
    assert violations([Ack(2, 0, 0, 2)], good)["misplaced"] == [Ack(2, 0, 0, 2)]


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[dict[int, Node]]:
    nodes = spawn_cluster(tmp_path, NODES)
    try:
        yield nodes
    finally:
        for n in nodes.values():
            n.kill()


async def make_topic(c: Cluster, topic: str, partitions: int) -> None:
    await c.wait_all_alive()
    async with Admin(c.bootstrap) as admin:
        await admin.create_topics(topic, partitions, 3)

    async def led() -> bool:
        return len(await c.leaders()) == partitions

    await until(f"every partition of {topic} has a leader", led, 30)


class Writer:
    """One producer sending ``rate`` records/s with no key (the default partitioner picks
    the partition), recording each acknowledgment and when it came."""

    def __init__(self, index: int, producer: Producer, topic: str, rate: float) -> None:
        self.index = index
        self.producer = producer
        self.topic = topic
        self.rate = rate
        self.sent: list[tuple[int, float, RecordFuture]] = []
        self.acks: list[Ack] = []
        self.failed: list[tuple[int, BaseException]] = []

    async def run(self, seconds: float) -> None:
        loop = asyncio.get_running_loop()
        began = last = loop.time()
        credit = 0.0
        seq = 0
        while (now := loop.time()) - began < seconds:
            credit += (now - last) * self.rate
            last = now
            while credit >= 1:
                fut = self.producer.send(self.topic, value(self.index, seq))
                self.sent.append((seq, now, fut))
                seq += 1
                credit -= 1
            await asyncio.sleep(SEND_TICK_S)

    async def collect(self) -> None:
        async with asyncio.timeout(FLUSH_TIMEOUT_MS / 1000):
            await self.producer.flush()
        for seq, _sent_s, fut in self.sent:
            try:
                md = await fut
            except Exception as exc:
                self.failed.append((seq, exc))
                continue
            self.acks.append(Ack(self.index, seq, md.partition, md.offset))


async def read_topic(bootstrap: str, topic: str, partitions: int) -> list[Stored]:
    tps = [TopicPartition(topic, p) for p in range(partitions)]
    out: list[Stored] = []
    async with Consumer(bootstrap) as consumer:
        end = await consumer.end_offsets(tps)
        consumer.assign(tps)
        await consumer.seek_to_beginning()
        deadline = time.monotonic() + READ_TIMEOUT_S
        remaining = {tp for tp in tps if end[tp] > 0}
        while remaining:
            assert time.monotonic() < deadline, f"could not read {topic} back: {remaining}"
            for fb in await consumer.poll_batches(timeout_ms=500):
                for r in fb.records:
                    if r.offset >= end[TopicPartition(fb.topic, fb.partition)]:
                        continue
                    parsed = parse(r.value)
                    assert parsed is not None, r
                    out.append(Stored(fb.partition, r.offset, *parsed))
            for tp in list(remaining):
                if await consumer.position(tp) >= end[tp]:
                    remaining.discard(tp)
    return out


def assert_no_violation(writers: list[Writer], stored: list[Stored]) -> None:
    acks = [a for w in writers for a in w.acks]
    found = violations(acks, stored)
    summary = {k: (len(v), v[:5]) for k, v in found.items()}
    assert not any(found.values()), summary
    assert len(stored) == len({(s.producer, s.seq) for s in stored})


@pytest.mark.timeout(int(SECONDS) + 300)
async def test_default_producers_keep_send_order_and_store_each_record_once(
    procs: dict[int, Node],
) -> None:
    topic = "order"
    c = Cluster(procs, topic)
    producers: list[Producer] = []
    try:
        await make_topic(c, topic, PARTITIONS)
        for _ in range(PRODUCERS):
            p = Producer(c.bootstrap, **PRODUCER_SETTINGS)
            await p.start()
            producers.append(p)
        if not PRODUCER_SETTINGS:
            assert all(p.idempotent and p.max_in_flight_per_partition == 5 for p in producers)
        writers = [Writer(i, p, topic, RATE_PER_PRODUCER) for i, p in enumerate(producers)]
        await asyncio.gather(*(w.run(SECONDS) for w in writers))
        await asyncio.gather(*(w.collect() for w in writers))
        for w in writers:
            assert not w.failed, (w.index, len(w.failed), w.failed[:3])
            assert len(w.acks) == len(w.sent) > 0.5 * RATE_PER_PRODUCER * SECONDS
            # Each producer used every partition, so order is checked in each of them.
            assert {a.partition for a in w.acks} == set(range(PARTITIONS))
        stored = await read_topic(c.bootstrap, topic, PARTITIONS)
        assert_no_violation(writers, stored)
        assert len(stored) == sum(len(w.acks) for w in writers)
    finally:
        for p in producers:
            await p.stop(timeout_ms=0)
        await c.close()


@pytest.mark.timeout(240)
async def test_a_producer_whose_answers_are_lost_retries_without_duplicates(
    procs: dict[int, Node],
) -> None:
    topic = "lost-answers"
    c = Cluster(procs, topic)
    producer = Producer(c.bootstrap, request_timeout_ms=REQUEST_TIMEOUT_MS)
    try:
        await make_topic(c, topic, 1)
        await producer.start()
        assert producer.idempotent
        writer = Writer(0, producer, topic, 200)
        load = asyncio.create_task(writer.run(3 + PAUSE_S + 5))
        await asyncio.sleep(3)
        victim = (await c.leaders())[0]
        procs[victim].send_signal(signal.SIGSTOP)
        paused_at = time.monotonic()
        pending_at_pause = [(seq, fut) for seq, _s, fut in writer.sent if not fut.done()]
        try:
            await asyncio.sleep(PAUSE_S)
        finally:
            procs[victim].send_signal(signal.SIGCONT)
        assert time.monotonic() - paused_at >= REQUEST_TIMEOUT_MS / 1000
        await load
        await writer.collect()
        assert not writer.failed, writer.failed[:3]
        assert len(writer.acks) == len(writer.sent)
        # Records that were in flight to the paused leader when it stopped answering were
        # acknowledged in the end (resent elsewhere, or answered once it resumed).
        assert pending_at_pause, "nothing was in flight when the leader was paused"
        for _seq, fut in pending_at_pause:
            assert fut.done()
            fut.result()  # raises if the record failed
        stored = await read_topic(c.bootstrap, topic, 1)
        assert_no_violation([writer], stored)
        # Nothing unacknowledged was stored either: every send succeeded, once.
        assert len(stored) == len(writer.sent)
    finally:
        await producer.stop(timeout_ms=0)
        await c.close()
