"""Failover of a real 3-node cluster (``python -m tidelog.node`` processes on 127.0.0.1, free
ports, temporary directories, all killed at the end) under an acks=all producer.

* kill -9 of the leader of a partition: a new leader takes writes within a few seconds, no
  acknowledged record is lost or reordered, and the killed node restarts and catches up to
  the same committed log as the others (CRC-32C of every replica's committed prefix);
* SIGSTOP of a leader, then SIGCONT: the paused node steps down when it resumes and never
  acknowledges a write as a stale leader (acks=all requests queued to it fail or redirect),
  and again nothing acknowledged is lost.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator, Iterator

import grpc
import pytest
from grpc import aio

from tests.support.nodeproc import Cluster, Node, running_cluster, until
from tidelog.client import Consumer, Producer, TopicPartition
from tidelog.errors import TidelogError, from_rpc_error
from tidelog.records import encode_batch
from tidelog.v1 import (
    broker_pb2,
)

pytestmark = pytest.mark.integration

TOPIC = "failover"
PARTITIONS = 6
NODES = (1, 2, 3)
STARTUP_TIMEOUT_S = 30.0
#: Records in flight per partition in the producer loop.
WINDOW = 20


@pytest.fixture(scope="module")
def procs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[int, Node]]:
    with running_cluster(tmp_path_factory.mktemp("cluster"), NODES) as nodes:
        yield nodes


@pytest.fixture
async def cluster(procs: dict[int, Node]) -> AsyncIterator[Cluster]:
    c = Cluster(procs, TOPIC)
    await c.with_topic(PARTITIONS, STARTUP_TIMEOUT_S)
    yield c
    await c.close()


class Load:
    """An acks=all producer writing ``partition:seq`` records to every partition, a bounded
    window in flight each, recording what was acknowledged and when.

    One request in flight per partition: with several, a client that sends a newer batch
    to the new leader while an older one is still in flight at the old node reorders them
    itself (the old node refuses it, the new one appends the newer). Without an idempotent
    producer no broker can undo that, so the test isolates what the cluster guarantees."""

    def __init__(self, bootstrap: str) -> None:
        self.producer = Producer(
            bootstrap,
            acks="all",
            linger_ms=2,
            max_in_flight_per_partition=1,
            request_timeout_ms=2_000,
            delivery_timeout_ms=120_000,
            retries=1_000_000,
            retry_backoff_ms=20,
        )
        #: partition -> (seq, offset, acknowledged at, sent at)
        self.acked: dict[int, list[tuple[int, int, float, float]]] = {
            p: [] for p in range(PARTITIONS)
        }
        self.failed = 0
        self.t0 = time.monotonic()
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        await self.producer.start()
        self._tasks = [asyncio.create_task(self._run(p)) for p in range(PARTITIONS)]

    async def _run(self, partition: int) -> None:
        seq = 0
        window: list[tuple[int, float, asyncio.Future[int]]] = []
        while not self._stop.is_set() or window:
            while not self._stop.is_set() and len(window) < WINDOW:
                record = self.producer.send(TOPIC, b"%d:%d" % (partition, seq), partition=partition)
                window.append((seq, time.monotonic(), asyncio.ensure_future(_await(record))))
                seq += 1
            s, sent_at, pending = window.pop(0)
            try:
                offset = await pending
            except TidelogError:
                self.failed += 1
                continue
            self.acked[partition].append((s, offset, time.monotonic(), sent_at))
            await asyncio.sleep(0.002)

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)
        await self.producer.stop()

    def first_ack_after(self, partition: int, t: float) -> float | None:
        """When the first record sent after ``t`` was acknowledged."""
        return next((at for _s, _o, at, sent in self.acked[partition] if sent >= t), None)


async def _await(fut: object) -> int:
    md = await fut  # type: ignore[misc]
    return int(md.offset)


async def read_all(bootstrap: str, ends: dict[int, int]) -> dict[int, list[tuple[int, bytes]]]:
    out: dict[int, list[tuple[int, bytes]]] = {p: [] for p in ends}
    async with Consumer(bootstrap, auto_offset_reset="earliest") as consumer:
        consumer.assign([TopicPartition(TOPIC, p) for p in ends])
        remaining = {p for p, end in ends.items() if end > 0}
        async with asyncio.timeout(60):
            while remaining:
                for r in await consumer.poll(timeout_ms=500):
                    out[r.partition].append((r.offset, r.value or b""))
                    if r.offset >= ends[r.partition] - 1:
                        remaining.discard(r.partition)
    return out


async def check_no_loss(c: Cluster, load: Load) -> None:
    """Every acknowledged record is in its partition at its acknowledged offset, and the
    first occurrences of acknowledged sequence numbers are in order."""
    digests = await c.digests(1)
    ends = {p: d.high_watermark for p, d in digests.items()}
    got = await read_all(c.bootstrap, ends)
    for p in range(PARTITIONS):
        by_offset = dict(got[p])
        for seq, offset, _at, _sent in load.acked[p]:
            assert by_offset.get(offset) == b"%d:%d" % (p, seq), (
                f"partition {p}: acknowledged seq {seq} at offset {offset} is "
                f"{by_offset.get(offset)!r}"
            )
        acked = {seq for seq, _o, _at, _sent in load.acked[p]}
        firsts: list[int] = []
        seen: set[int] = set()
        for _offset, value in got[p]:
            _head, sep, tail = value.partition(b":")
            if not sep:
                continue  # written by the test itself, not by the load
            seq = int(tail)
            if seq in acked and seq not in seen:
                seen.add(seq)
                firsts.append(seq)
        if firsts != sorted(firsts):
            bad = next(i for i in range(1, len(firsts)) if firsts[i] < firsts[i - 1])
            around = set(firsts[max(0, bad - 3) : bad + 3])
            names = {b"%d" % x for x in around}
            where = [(o, v) for o, v in got[p] if v.partition(b":")[2] in names]
            acks = [
                (seq, o, round(a - load.t0, 2), round(t - load.t0, 2))
                for seq, o, a, t in load.acked[p]
                if seq in around
            ]
            raise AssertionError(
                f"partition {p}: acknowledged records reordered near seq {firsts[bad]}: "
                f"log {where}, acknowledged (seq, offset, acked at, sent at) {acks}"
            )


async def same_committed_logs(c: Cluster, nodes: tuple[int, ...] = NODES) -> None:
    """Every replica holds byte-identical logs up to the common high watermark."""

    async def same() -> bool:
        try:
            per_node = {n: await c.digests(n) for n in nodes}
        except grpc.RpcError:
            return False  # a node still starting
        for p in range(PARTITIONS):
            if any(p not in per_node[n] for n in nodes):
                return False
            hws = {per_node[n][p].high_watermark for n in nodes}
            if len(hws) != 1:
                return False
            if len({per_node[n][p].crc32c for n in nodes}) != 1:
                return False
        return True

    await until("replicas hold the same committed logs", same, 30)


@pytest.mark.timeout(120)
async def test_kill_leader_under_load_loses_nothing_and_catches_up(cluster: Cluster) -> None:
    c = cluster
    load = Load(c.bootstrap)
    await load.start()
    await asyncio.sleep(1.5)
    victim_partition = 0
    victim = (await c.leaders())[victim_partition]
    c.nodes[victim].send_signal(signal.SIGKILL)
    c.nodes[victim].proc.wait()  # type: ignore[union-attr]
    killed_at = time.monotonic()
    survivors = tuple(n for n in NODES if n != victim)

    async def moved() -> bool:
        leader = (await c.leaders(survivors)).get(victim_partition)
        return leader is not None and load.first_ack_after(victim_partition, killed_at) is not None

    async def elected() -> bool:
        return (await c.leaders(survivors)).get(victim_partition) is not None

    await until("a new leader is elected", elected, 20)
    elected_s = time.monotonic() - killed_at
    await until("a new leader takes writes", moved, 20)
    failover_s = load.first_ack_after(victim_partition, killed_at)
    assert failover_s is not None
    print(
        f"kill -9: new leader within {elected_s:.2f} s, first acknowledged write sent after "
        f"the kill {failover_s - killed_at:.2f} s"
    )
    await asyncio.sleep(1.0)
    c.nodes[victim].spawn()
    await asyncio.sleep(1.5)
    await load.stop()
    assert sum(len(v) for v in load.acked.values()) > 100
    await same_committed_logs(c)
    await check_no_loss(c, load)


@pytest.mark.timeout(120)
async def test_paused_leader_steps_down_and_never_acks_as_a_stale_leader(
    cluster: Cluster,
) -> None:
    c = cluster
    load = Load(c.bootstrap)
    await load.start()
    await asyncio.sleep(1.0)
    victim_partition = 1
    victim = (await c.leaders())[victim_partition]
    old_term = (await c.digests(victim))[victim_partition].term
    others = tuple(n for n in NODES if n != victim)
    c.nodes[victim].send_signal(signal.SIGSTOP)
    stopped_at = time.monotonic()

    # Writes addressed to the paused leader queue up in its socket.
    stale = [
        asyncio.ensure_future(
            c.broker(victim).Produce(
                broker_pb2.ProduceRequest(
                    topic=TOPIC,
                    partition=victim_partition,
                    batches=encode_batch([b"stale-%d" % i]),
                    acks=broker_pb2.ACKS_ALL,
                    timeout_ms=5_000,
                ),
                timeout=15,
            )
        )
        for i in range(5)
    ]

    # Meanwhile the other two elect a leader, which takes writes.
    new_leader: list[int] = []

    async def elected() -> bool:
        leader = (await c.leaders(others)).get(victim_partition)
        if leader is None:
            return False
        new_leader.append(leader)
        return True

    await until("the others elect a leader", elected, 20)
    print(f"leader elected {time.monotonic() - stopped_at:.2f} s after SIGSTOP")
    resp = await c.broker(new_leader[-1]).Produce(
        broker_pb2.ProduceRequest(
            topic=TOPIC,
            partition=victim_partition,
            batches=encode_batch([b"during-pause"]),
            acks=broker_pb2.ACKS_ALL,
        ),
        timeout=10,
    )
    during_pause_offset = resp.base_offset
    c.nodes[victim].send_signal(signal.SIGCONT)

    outcomes = await asyncio.gather(*stale, return_exceptions=True)
    for outcome in outcomes:
        assert isinstance(outcome, aio.AioRpcError), f"a stale leader acknowledged {outcome}"
        reason = from_rpc_error(outcome).reason
        assert reason in {
            "NOT_LEADER",
            "LEADER_NOT_AVAILABLE",
            "REQUEST_TIMED_OUT",
            "NODE_UNAVAILABLE",
        }, reason

    async def stepped_down() -> bool:
        d = (await c.digests(victim))[victim_partition]
        return d.role != 3 or d.term > old_term

    await until("the resumed node steps down", stepped_down, 10)

    async def producer_moved() -> bool:
        return load.first_ack_after(victim_partition, time.monotonic() - 0.5) is not None

    # The producer's requests that the paused node held fail once it resumes; it retries
    # at the new leader.
    await until("the producer writes to the new leader", producer_moved, 30)
    await load.stop()
    await same_committed_logs(c)
    await check_no_loss(c, load)
    ends = {victim_partition: (await c.digests(others[0]))[victim_partition].high_watermark}
    got = dict(await read_all(c.bootstrap, ends))[victim_partition]
    values = dict(got)
    assert values[during_pause_offset] == b"during-pause"
    # None of the stale writes made it into the log.
    assert not [v for _o, v in got if v.startswith(b"stale-")]
