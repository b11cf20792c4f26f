"""The chaos run's load: one writer and one reaper per partition at a steady rate, and the
failover clock the reapers feed.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterable
from typing import Final

from tidelog.client import Producer, RecordFuture
from tidelog.errors import TidelogError
from tidelog.ops.chaos_verdict import (
    Acked,
    encode_value,
)

__all__ = [
    "Failover",
    "Load",
]


#: Time to deliver what is buffered when the writers stop.
FLUSH_TIMEOUT_S: Final = 60.0
#: Unacknowledged records per partition before its writer waits (bounds memory in failover).
PENDING_RECORDS_MAX_PER_PARTITION: Final = 5_000
SEND_TICK_S: Final = 0.01
#: Seconds of unsent rate a writer may catch up on at once after a stall.
SEND_CREDIT_MAX_S: Final = 0.1


# ---------------------------------------------------------------------------------------------
# The load


class Failover:
    """Measures one round's failover from the acknowledgments the reapers report."""

    def __init__(self) -> None:
        self.kill_s: float | None = None
        self.watching: set[int] = set()
        self.recovered_ms: dict[int, float] = {}
        self.done = asyncio.Event()

    def arm(self, partitions: Iterable[int], kill_s: float) -> None:
        self.watching = set(partitions)
        self.recovered_ms = {}
        self.kill_s = kill_s
        self.done.clear()
        if not self.watching:
            self.done.set()

    def disarm(self) -> None:
        self.kill_s = None
        self.watching = set()

    def on_ack(self, partition: int, sent_s: float, acked_s: float) -> None:
        if self.kill_s is None or partition not in self.watching or sent_s < self.kill_s:
            return
        self.watching.discard(partition)
        self.recovered_ms[partition] = (acked_s - self.kill_s) * 1000
        if not self.watching:
            self.done.set()


class Load:
    """One writer and one reaper task per partition; the reaper awaits acknowledgments in
    send order (a partition's batches are stored in send order, so an acknowledgment waits
    at most for those of the records sent before it)."""

    def __init__(
        self,
        producer: Producer,
        topic: str,
        partitions: int,
        run_id: str,
        rate: float,
        failover: Failover,
    ) -> None:
        self.producer = producer
        self.topic = topic
        self.run_id = run_id
        self.rate_per_partition = rate / partitions
        self.failover = failover
        self.acked: list[Acked] = []
        self.sent = 0
        self.failed = 0
        self.errors: Counter[str] = Counter()
        self.pending = dict.fromkeys(range(partitions), 0)
        self.queues: dict[int, asyncio.Queue[tuple[int, float, RecordFuture] | None]] = {
            p: asyncio.Queue() for p in range(partitions)
        }
        self.stopping = asyncio.Event()
        self.writers: list[asyncio.Task[None]] = []
        self.reapers: list[asyncio.Task[None]] = []

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        for p in self.queues:
            self.writers.append(loop.create_task(self._write(p), name=f"chaos write {p}"))
            self.reapers.append(loop.create_task(self._reap(p), name=f"chaos reap {p}"))

    async def stop(self) -> None:
        """Stop sending, deliver what is buffered (bounded), and collect every answer."""
        self.stopping.set()
        await asyncio.gather(*self.writers)
        await self.producer.stop(timeout_ms=FLUSH_TIMEOUT_S * 1000)
        for q in self.queues.values():
            q.put_nowait(None)
        await asyncio.gather(*self.reapers)

    async def cancel(self) -> None:
        for t in (*self.writers, *self.reapers):
            t.cancel()
        await asyncio.gather(*self.writers, *self.reapers, return_exceptions=True)

    async def _write(self, partition: int) -> None:
        loop = asyncio.get_running_loop()
        queue = self.queues[partition]
        rate = self.rate_per_partition
        credit = 0.0
        last = loop.time()
        seq = 0
        while not self.stopping.is_set():
            await asyncio.sleep(SEND_TICK_S)
            now = loop.time()
            credit = min(credit + (now - last) * rate, max(1.0, rate * SEND_CREDIT_MAX_S))
            last = now
            room = PENDING_RECORDS_MAX_PER_PARTITION - self.pending[partition]
            n = min(int(credit), room)
            for _ in range(n):
                value = encode_value(self.run_id, partition, seq)
                try:
                    fut = self.producer.send(self.topic, value, partition=partition)
                except TidelogError as exc:
                    self.failed += 1
                    self.errors[type(exc).__name__] += 1
                    seq += 1
                    continue
                queue.put_nowait((seq, loop.time(), fut))
                self.pending[partition] += 1
                self.sent += 1
                seq += 1
            credit -= n

    async def _reap(self, partition: int) -> None:
        loop = asyncio.get_running_loop()
        queue = self.queues[partition]
        while True:
            item = await queue.get()
            if item is None:
                return
            seq, sent_s, fut = item
            try:
                md = await fut
            except TidelogError as exc:
                self.failed += 1
                self.errors[type(exc).__name__] += 1
                continue
            finally:
                self.pending[partition] -= 1
            self.acked.append(Acked(partition, seq, md.offset))
            self.failover.on_ack(partition, sent_s, loop.time())
