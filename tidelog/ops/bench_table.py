"""``tidelog bench table``: the Table API's figures from one client.

It fills a compacted topic with ``--keys`` distinct keys (or reuses the topic when it holds
them already), waits until the tables reflect the last write, then measures:

- ``get``: single-key reads per second, ``--concurrency`` requests in flight (and the latency
  of each);
- ``get_many``: keys per second read by GetMany calls of ``--batch-keys`` random keys each,
  split per partition by the client, ``--concurrency`` calls in flight (target 100,000 keys/s);
- ``scan``: a full scan of every key, page after page, one partition after the other (target
  under 1 s for 100,000 keys).

Each phase also reports the CPU time it cost, per operation: this process's (the client) and
the partitions' leaders' (when they run on this machine), which hold on a busy machine
where the wall-clock figures do not.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from tidelog.client import Admin, Producer, Table
from tidelog.errors import InvalidConfig, UnknownTopic
from tidelog.ops.bench import local_node_pid, percentile, process_cpu_s

__all__ = ["TableBenchResult", "table_bench"]

#: Keys sent per send_many call while filling the topic.
FILL_CHUNK_KEYS = 10_000


def bench_key(i: int) -> bytes:
    return b"key-%08d" % i


@dataclass
class TableBenchResult:
    topic: str
    keys: int
    value_bytes: int
    partitions: int
    fill_s: float | None
    gets: int
    get_s: float
    get_latencies_ms: list[float]
    get_many_keys: int
    get_many_s: float
    scan_rows: int
    scan_s: float
    extra: dict[str, object] = field(default_factory=dict)

    #: Phase -> (client CPU s, the leaders' CPU s or None when they run elsewhere).
    cpu: dict[str, tuple[float, float | None]] = field(default_factory=dict)

    def _cpu_us(self, phase: str, ops: int) -> dict[str, float]:
        if phase not in self.cpu or not ops:
            return {}
        client, server = self.cpu[phase]
        out = {f"{phase}_client_cpu_us": round(client / ops * 1e6, 2)}
        if server is not None:
            out[f"{phase}_server_cpu_us"] = round(server / ops * 1e6, 2)
        return out

    def to_json(self) -> dict[str, object]:
        lat = sorted(self.get_latencies_ms)
        out: dict[str, object] = {
            "mode": "table",
            "topic": self.topic,
            "keys": self.keys,
            "value_bytes": self.value_bytes,
            "partitions": self.partitions,
            "fill_s": None if self.fill_s is None else round(self.fill_s, 3),
            "gets": self.gets,
            "get_per_s": round(self.gets / self.get_s, 1) if self.get_s > 0 else 0.0,
            "get_p50_ms": round(percentile(lat, 50), 3),
            "get_p99_ms": round(percentile(lat, 99), 3),
            "get_many_keys": self.get_many_keys,
            "get_many_keys_per_s": round(self.get_many_keys / self.get_many_s, 1)
            if self.get_many_s > 0
            else 0.0,
            "scan_rows": self.scan_rows,
            "scan_s": round(self.scan_s, 4),
        }
        out.update(self._cpu_us("get", self.gets))
        out.update(self._cpu_us("get_many", self.get_many_keys))
        out.update(self._cpu_us("scan", self.scan_rows))
        out.update(self.extra)
        return out

    def _cpu_line(self, phase: str, unit: str) -> str:
        j = self.to_json()
        client = j.get(f"{phase}_client_cpu_us")
        if client is None:
            return ""
        server = j.get(f"{phase}_server_cpu_us")
        return f"; CPU per {unit}: client {client} us" + (
            f", leaders {server} us" if server is not None else ""
        )

    def summary(self) -> str:
        j = self.to_json()
        fill = f", filled in {self.fill_s:.2f} s" if self.fill_s is not None else ""
        return "\n".join(
            [
                f"table: {self.keys:,} keys of {self.value_bytes} B in {self.partitions} "
                f"partition(s){fill}",
                f"  get:      {j['get_per_s']:,.0f} gets/s ({self.gets:,} gets, "
                f"{j['concurrency']} in flight), latency ms p50 {j['get_p50_ms']}, "
                f"p99 {j['get_p99_ms']}{self._cpu_line('get', 'get')}",
                f"  get_many: {j['get_many_keys_per_s']:,.0f} keys/s ({self.get_many_keys:,} "
                f"keys in calls of {j['batch_keys']}; target 100,000 keys/s)"
                f"{self._cpu_line('get_many', 'key')}",
                f"  scan:     full scan of {self.scan_rows:,} keys in {self.scan_s:.3f} s "
                f"(target under 1 s for 100,000 keys){self._cpu_line('scan', 'row')}",
            ]
        )


async def _fill(
    bootstrap: str,
    topic: str,
    keys: int,
    value_bytes: int,
    partitions: int,
    replication_factor: int | None,
    connection: Mapping[str, Any],
) -> tuple[int, float | None, dict[int, int]]:
    """Partition count, fill time (None: the topic was full already) and the offset per
    partition the tables must reach."""
    async with Admin(bootstrap, **connection) as admin:
        try:
            desc = await admin.describe_topics(topic)
        except UnknownTopic:
            desc = []
        if desc:
            policy = desc[0].configs.get("cleanup.policy", "")
            if "compact" not in policy:
                raise InvalidConfig(
                    f"topic {topic!r} has cleanup.policy={policy}: the table bench needs a "
                    "compacted topic (give another --topic)"
                )
            partitions = len(desc[0].partitions)
        else:
            await admin.create_topics(
                topic, partitions, replication_factor, {"cleanup.policy": "compact"}
            )
    async with Table(bootstrap, topic, **connection) as table:
        probe = [bench_key(0), bench_key(keys - 1)]
        if len(await table.get_many(probe)) == len(probe) and desc:
            return partitions, None, {}
    value = (b"v" * value_bytes)[:value_bytes]
    last: dict[int, int] = {}
    t0 = time.perf_counter()
    async with Producer(bootstrap, acks="all", linger_ms=5, **connection) as producer:
        futures = []
        for lo in range(0, keys, FILL_CHUNK_KEYS):
            ks = [bench_key(i) for i in range(lo, min(keys, lo + FILL_CHUNK_KEYS))]
            futures.append(producer.send_many(topic, [value] * len(ks), ks))
        for fut in futures:
            for md in await fut:
                end = md.base_offset + md.record_count - 1
                last[md.partition] = max(last.get(md.partition, -1), end)
    return partitions, time.perf_counter() - t0, last


async def table_bench(
    bootstrap: str,
    topic: str,
    *,
    keys: int = 100_000,
    value_bytes: int = 100,
    partitions: int = 1,
    replication_factor: int | None = None,
    gets: int = 20_000,
    get_many_keys: int = 1_000_000,
    batch_keys: int = 1_000,
    concurrency: int = 16,
    connection: Mapping[str, Any] | None = None,
) -> TableBenchResult:
    conn = dict(connection or {})
    partitions, fill_s, written = await _fill(
        bootstrap, topic, keys, value_bytes, partitions, replication_factor, conn
    )
    rng = random.Random(1)
    cpu: dict[str, tuple[float, float | None]] = {}
    async with Table(bootstrap, topic, **conn) as table:
        # The leaders of the topic's partitions serve every read: their CPU is the cost.
        meta = table._meta_()
        info = meta.topic(topic)
        leaders = {p.leader for p in info.partitions} if info is not None else set()
        pids = [local_node_pid(n.address) for i, n in meta.nodes.items() if i in leaders]
        local = [pid for pid in pids if pid is not None]

        def nodes_cpu() -> float | None:
            if not local:
                return None
            times = [process_cpu_s(pid) for pid in local]
            return sum(t for t in times if t is not None)

        def measure() -> tuple[float, float | None]:
            return time.process_time(), nodes_cpu()

        def record(phase: str, since: tuple[float, float | None]) -> None:
            client, server = measure()
            cpu[phase] = (
                client - since[0],
                None if server is None or since[1] is None else server - since[1],
            )

        # The tables reflect every write before the clock starts.
        for p, offset in written.items():
            await table.get(bench_key(0), partition=p, min_offset=offset)

        latencies: list[float] = []
        left = gets

        async def getter() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                k = bench_key(rng.randrange(keys))
                t = time.perf_counter()
                row = await table.get(k)
                latencies.append((time.perf_counter() - t) * 1000)
                if row is None:
                    raise AssertionError(f"key {k!r} is missing from the table")

        t0, c0 = time.perf_counter(), measure()
        await asyncio.gather(*(getter() for _ in range(concurrency)))
        get_s = time.perf_counter() - t0
        record("get", c0)

        # Every call's keys are picked before the clock starts: making and picking them cost
        # this client ~2 us a key, more than the get_many of the key, and is no part of it.
        pool = [bench_key(i) for i in range(keys)]
        batches = [
            rng.choices(pool, k=batch_keys) for _ in range(max(1, get_many_keys // batch_keys))
        ]
        del pool
        got = 0

        async def many() -> None:
            nonlocal got
            while batches:
                ks = batches.pop()
                rows = await table.get_many(ks)
                distinct = len(set(ks))
                got += distinct
                if len(rows) != distinct:
                    raise AssertionError("get_many missed keys that exist")

        t0, c0 = time.perf_counter(), measure()
        await asyncio.gather(*(many() for _ in range(concurrency)))
        get_many_s = time.perf_counter() - t0
        record("get_many", c0)

        t0, c0 = time.perf_counter(), measure()
        rows = 0
        async for page in table.scan(page_size=10_000):
            rows += len(page.rows)
        scan_s = time.perf_counter() - t0
        record("scan", c0)
        if rows < keys:
            raise AssertionError(f"the scan found {rows} rows, fewer than the {keys} keys")
    return TableBenchResult(
        topic=topic,
        keys=keys,
        value_bytes=value_bytes,
        partitions=partitions,
        fill_s=fill_s,
        gets=gets,
        get_s=get_s,
        get_latencies_ms=latencies,
        get_many_keys=got,
        get_many_s=get_many_s,
        scan_rows=rows,
        scan_s=scan_s,
        extra={"concurrency": concurrency, "batch_keys": batch_keys},
        cpu=cpu,
    )
