"""The producer's own ordering and failover guarantees against a real 3-node cluster, with
its DEFAULT settings (8 requests in flight per partition, a small linger), not the
one-in-flight setup of test_cluster_failover.py that isolates the cluster's guarantees.

* kill -9 of the leader of partition 0 mid-stream, then a restart, several times in a row
  (a reordering that shows up once in a few kills must show up here): every acknowledged
  record is in the log, and the first occurrences of acknowledged records are in send
  order per partition (duplicates of retried, unacknowledged batches are allowed until the
  idempotent producer exists);
* SIGSTOP of a leader for a few seconds: writes to its partition resume at the new leader
  while it is still paused (requests held by the paused node must not pin the partition
  to it), and the same checks hold after SIGCONT.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator, Iterator

import pytest

from tests.support.nodeproc import Cluster, Node, running_cluster, until
from tidelog.client import Consumer, Producer, TopicPartition
from tidelog.errors import TidelogError

pytestmark = pytest.mark.integration

TOPIC = "producer-failover"
PARTITIONS = 3
NODES = (1, 2, 3)
KILLS = 3
STARTUP_TIMEOUT_S = 30.0
#: Records awaited per partition at once: enough for several batches in flight.
WINDOW_RECORDS = 400
#: How long the load runs before and after each fault.
LOAD_BEFORE_S = 0.8
LOAD_AFTER_S = 0.8
PAUSE_S = 3.0
#: Writes must resume this soon after a SIGSTOP, while the node is still paused.
RESUME_WHILE_PAUSED_MAX_S = PAUSE_S


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[int, Node]]:
    with running_cluster(tmp_path_factory.mktemp("pfail"), NODES) as nodes:
        yield nodes


@pytest.fixture
async def cluster(nodes: dict[int, Node]) -> AsyncIterator[Cluster]:
    c = Cluster(nodes, TOPIC)
    await c.with_topic(PARTITIONS, STARTUP_TIMEOUT_S)
    yield c
    await c.close()


class Load:
    """A default-settings acks=all producer writing ``tag:partition:seq`` records to each
    partition explicitly, up to WINDOW_RECORDS unacknowledged at once per partition, so
    the accumulator always has several batches to keep in flight."""

    def __init__(self, bootstrap: str, tag: str) -> None:
        self.producer = Producer(bootstrap, acks="all")
        self.tag = tag.encode()
        #: partition -> [(seq, offset, sent at, acknowledged at)]
        self.acked: dict[int, list[tuple[int, int, float, float]]] = {
            p: [] for p in range(PARTITIONS)
        }
        self.failed: list[str] = []
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def value(self, partition: int, seq: int) -> bytes:
        return b"%s:%d:%d" % (self.tag, partition, seq)

    async def start(self) -> None:
        await self.producer.start()
        self._tasks = [asyncio.create_task(self._run(p)) for p in range(PARTITIONS)]

    async def _run(self, partition: int) -> None:
        seq = 0
        window: list[tuple[int, float, asyncio.Future[int]]] = []
        while not self._stop.is_set() or window:
            while not self._stop.is_set() and len(window) < WINDOW_RECORDS:
                fut = self.producer.send(TOPIC, self.value(partition, seq), partition=partition)
                window.append((seq, time.monotonic(), asyncio.ensure_future(_offset(fut))))
                seq += 1
            s, sent_at, pending = window.pop(0)
            try:
                offset = await pending
            except TidelogError as err:
                self.failed.append(f"{partition}:{s}: {err}")
                continue
            self.acked[partition].append((s, offset, sent_at, time.monotonic()))
            if len(window) < WINDOW_RECORDS // 2:
                await asyncio.sleep(0.001)

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)
        await self.producer.stop()

    def first_ack_of_sent_after(self, partition: int, t: float) -> float | None:
        """When the first record sent after ``t`` was acknowledged."""
        return min((at for _s, _o, sent, at in self.acked[partition] if sent >= t), default=None)


async def _offset(fut: object) -> int:
    md = await fut  # type: ignore[misc]
    return int(md.offset)


async def read_all(c: Cluster) -> dict[int, list[tuple[int, bytes]]]:
    """Every committed record of every partition, by asking a live leader's high watermark."""
    leaders = await c.leaders()
    ends: dict[int, int] = {}
    for p in range(PARTITIONS):
        ends[p] = (await c.digests(leaders[p]))[p].high_watermark
    out: dict[int, list[tuple[int, bytes]]] = {p: [] for p in range(PARTITIONS)}
    async with Consumer(c.bootstrap, auto_offset_reset="earliest") as consumer:
        consumer.assign([TopicPartition(TOPIC, p) for p in range(PARTITIONS)])
        remaining = {p for p, end in ends.items() if end > 0}
        async with asyncio.timeout(30):
            while remaining:
                for r in await consumer.poll(timeout_ms=500):
                    out[r.partition].append((r.offset, r.value or b""))
                    if r.offset >= ends[r.partition] - 1:
                        remaining.discard(r.partition)
    return out


def check_acknowledged(load: Load, got: dict[int, list[tuple[int, bytes]]]) -> None:
    """Every acknowledged record is at its acknowledged offset, and the first occurrences of
    acknowledged records are in send order (duplicates allowed)."""
    assert not load.failed, f"records failed: {load.failed[:5]}"
    prefix = load.tag + b":"
    for p in range(PARTITIONS):
        by_offset = dict(got[p])
        for seq, offset, _sent, _at in load.acked[p]:
            assert by_offset.get(offset) == load.value(p, seq), (
                f"partition {p}: acknowledged seq {seq} at offset {offset} is "
                f"{by_offset.get(offset)!r}"
            )
        acked = {seq for seq, _o, _s, _a in load.acked[p]}
        firsts: list[tuple[int, int]] = []
        seen: set[int] = set()
        for offset, value in got[p]:
            if not value.startswith(prefix):
                continue  # another round's records
            seq = int(value.rsplit(b":", 1)[1])
            if seq in acked and seq not in seen:
                seen.add(seq)
                firsts.append((seq, offset))
        bad = [i for i in range(1, len(firsts)) if firsts[i][0] < firsts[i - 1][0]]
        assert not bad, (
            f"partition {p}: acknowledged records reordered, (seq, offset) around the first: "
            f"{firsts[max(0, bad[0] - 3) : bad[0] + 3]}"
        )
        assert len(seen) == len(acked)


@pytest.mark.timeout(90)
async def test_leader_kills_keep_acknowledged_records_in_order(cluster: Cluster) -> None:
    c = cluster
    for round_ in range(KILLS):
        load = Load(c.bootstrap, f"kill{round_}")
        await load.start()
        await asyncio.sleep(LOAD_BEFORE_S)
        victim = (await c.leaders())[0]
        c.nodes[victim].send_signal(signal.SIGKILL)
        c.nodes[victim].proc.wait()  # type: ignore[union-attr]
        killed_at = time.monotonic()

        async def moved(load: Load = load, killed_at: float = killed_at) -> bool:
            return load.first_ack_of_sent_after(0, killed_at) is not None

        await until("writes to partition 0 resume after the kill", moved, 15)
        resumed_s = (load.first_ack_of_sent_after(0, killed_at) or killed_at) - killed_at
        c.nodes[victim].spawn()
        await asyncio.sleep(LOAD_AFTER_S)
        await load.stop()
        acked = sum(len(v) for v in load.acked.values())
        print(
            f"kill {round_} of node {victim}: writes resumed after {resumed_s:.2f} s, {acked} acked"
        )
        assert acked > 1000
        check_acknowledged(load, await read_all(c))
        # The restarted node is back in the cluster before the next kill.
        await c.wait_all_alive(STARTUP_TIMEOUT_S)


@pytest.mark.timeout(60)
async def test_writes_resume_while_a_leader_is_paused(cluster: Cluster) -> None:
    c = cluster
    load = Load(c.bootstrap, "pause")
    await load.start()
    await asyncio.sleep(LOAD_BEFORE_S)
    victim_partition = 1
    victim = (await c.leaders())[victim_partition]
    c.nodes[victim].send_signal(signal.SIGSTOP)
    stopped_at = time.monotonic()
    try:
        await asyncio.sleep(PAUSE_S)
    finally:
        c.nodes[victim].send_signal(signal.SIGCONT)
    resumed_at = load.first_ack_of_sent_after(victim_partition, stopped_at)
    await asyncio.sleep(LOAD_AFTER_S)
    await load.stop()
    after = "none" if resumed_at is None else f"{resumed_at - stopped_at:.2f} s"
    print(f"SIGSTOP of node {victim}: first write sent after it acknowledged after {after}")
    assert resumed_at is not None and resumed_at - stopped_at < RESUME_WHILE_PAUSED_MAX_S, (
        f"writes to partition {victim_partition} did not resume while its leader was paused "
        f"({PAUSE_S} s): first acknowledged write sent after the pause came {after} after it"
    )
    check_acknowledged(load, await read_all(c))
