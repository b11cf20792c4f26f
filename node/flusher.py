"""Group commit: one task fsyncs every partition with unflushed appends, round after round.

An fsync costs hundreds of microseconds (DESIGN.md, Performance), as much as a whole
produce request, so it must never be paid per request. Appends only mark their partition
dirty; this task takes the whole dirty set, fsyncs each partition once in worker threads,
then advances each high watermark, which wakes the produce waiters (acks=all) and fetch
streams of everything those fsyncs covered. The next round starts as soon as the previous
one ends, so the busier the node, the more appends each fsync covers: batching comes from
the load itself, with no timer adding latency when the node is idle.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor

from tidelog.node import limits
from tidelog.node.metrics import NodeMetrics
from tidelog.node.partition import Partition

log = logging.getLogger(__name__)

_FlushResult = tuple[Partition, int, float, BaseException | None]


def _flush_chunk(partitions: list[Partition]) -> list[_FlushResult]:
    """Runs in a worker thread: fsync each partition once, timing each."""
    out: list[_FlushResult] = []
    for p in partitions:
        t0 = time.perf_counter()
        try:
            flushed = p.log.flush()
        except Exception as exc:  # reported on the loop thread
            out.append((p, -1, time.perf_counter() - t0, exc))
        else:
            out.append((p, flushed, time.perf_counter() - t0, None))
    return out


class GroupCommitter:
    def __init__(self, metrics: NodeMetrics, threads: int = limits.flush_threads) -> None:
        self._metrics = metrics
        self._threads = threads
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="tidelog-fsync")
        # Insertion-ordered set: partitions appended to since their last fsync started.
        self._dirty: dict[Partition, None] = {}
        self._wake = asyncio.Event()
        self._in_round: set[Partition] = set()
        self._round_done = asyncio.Event()
        self._round_done.set()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self.rounds = 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="group-commit")

    def mark_dirty(self, partition: Partition) -> None:
        """Called after every append under flush=durable: O(1), no syscall."""
        self._dirty[partition] = None
        self._wake.set()

    async def forget(self, partition: Partition) -> None:
        """Before closing or deleting a partition's log: drop it from the next round and wait
        until no worker thread still flushes it."""
        self._dirty.pop(partition, None)
        while partition in self._in_round:
            await self._round_done.wait()

    async def _run(self) -> None:
        while not self._stopping:
            await self._wake.wait()
            self._wake.clear()
            if self._dirty:
                try:
                    await self.flush_round()
                except Exception:  # never let the one committer die: acks=all would hang
                    log.exception("group commit round failed")

    async def flush_round(self) -> None:
        """fsync every dirty partition once and commit what the fsyncs covered."""
        partitions = list(self._dirty)
        self._dirty.clear()
        if not partitions:
            return
        loop = asyncio.get_running_loop()
        n = min(self._threads, len(partitions))
        chunks = [partitions[i::n] for i in range(n)]
        self._in_round = set(partitions)
        self._round_done.clear()
        try:
            results = await asyncio.gather(
                *(loop.run_in_executor(self._pool, _flush_chunk, chunk) for chunk in chunks)
            )
        finally:
            self._in_round = set()
            self._round_done.set()
        self.rounds += 1
        m = self._metrics
        m.group_commits.inc()
        m.group_commit_partitions.observe(len(partitions))
        m.fsyncs.inc(len(partitions))
        for chunk_results in results:
            for p, flushed, seconds, exc in chunk_results:
                m.fsync_latency.observe(seconds)
                if exc is not None:
                    p.fail_storage(exc)
                else:
                    p.commit(flushed)

    async def stop(self) -> None:
        """Let the current round finish, flush what is still dirty, stop the threads."""
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            await self._task
            self._task = None
        while self._dirty:
            await self.flush_round()
        self._pool.shutdown(wait=True)
