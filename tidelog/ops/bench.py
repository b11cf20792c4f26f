"""``tidelog bench produce`` / ``bench consume``: throughput, latency and CPU cost figures.

The producer bench hands the client whole lists of values (``send_many``) cut to exactly one
batch each, so the client's per-record work is what a bulk producer pays and each call's
metadata is one batch's send-to-ack latency. CPU is ``time.process_time`` of this process
(client cost) and, when the node runs on this machine, the node process's own CPU time read
from /proc (server cost); both are reported per million records.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from operator import attrgetter
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)

from tidelog.client import Admin, BatchMetadata, Consumer, Producer, TopicPartition
from tidelog.client.accumulator import RECORD_OVERHEAD_BYTES
from tidelog.client.limits import IDEMPOTENT_IN_FLIGHT_MAX
from tidelog.client.producer import BatchesFuture
from tidelog.errors import UnknownTopic
from tidelog.records import BATCH_OVERHEAD_BYTES

_value = attrgetter("value")

__all__ = [
    "BENCH_IN_FLIGHT_DEFAULT",
    "BenchResult",
    "consume_bench",
    "percentile",
    "produce_bench",
]

_MIB = 1024 * 1024
#: Distinct values the records cycle through: more than a batch holds, so compression finds
#: no repeated records. Each value is random hex text, which compresses about 2:1 like much
#: real text data (one repeated value would flatter compression, raw random bytes defeat it).
VALUE_POOL_SIZE = 16_384
#: send_many calls awaiting their acknowledgement before the bench waits for the oldest.
IN_FLIGHT_CALLS_MAX = 64
PROGRESS_REFRESH_PER_S = 8
#: Requests in flight per partition unless told: the idempotent producer's limit, used with
#: idempotence off too, so the two modes differ only by idempotence.
BENCH_IN_FLIGHT_DEFAULT = IDEMPOTENT_IN_FLIGHT_MAX


@dataclass
class BenchResult:
    mode: str
    topic: str
    records: int
    record_bytes: int
    seconds: float
    latencies_ms: list[float]
    client_cpu_s: float
    server_cpu_s: float | None
    extra: dict[str, object]

    def to_json(self) -> dict[str, object]:
        rps = self.records / self.seconds if self.seconds > 0 else 0.0
        lat = sorted(self.latencies_ms)
        out: dict[str, object] = {
            "mode": self.mode,
            "topic": self.topic,
            "records": self.records,
            "record_bytes": self.record_bytes,
            "seconds": round(self.seconds, 4),
            "records_per_s": round(rps, 1),
            "mb_per_s": round(rps * self.record_bytes / _MIB, 2),
            "p50_ms": round(percentile(lat, 50), 3),
            "p99_ms": round(percentile(lat, 99), 3),
            "p999_ms": round(percentile(lat, 99.9), 3),
            "latency_samples": len(lat),
            "cpu_s_per_million": round(self.client_cpu_s / self.records * 1e6, 3)
            if self.records
            else 0.0,
            "client_cpu_s": round(self.client_cpu_s, 3),
        }
        if self.server_cpu_s is not None and self.records:
            out["server_cpu_s"] = round(self.server_cpu_s, 3)
            out["server_cpu_s_per_million"] = round(self.server_cpu_s / self.records * 1e6, 3)
        out.update(self.extra)
        return out

    def summary(self) -> str:
        j = self.to_json()
        lines = [
            f"{self.mode}: {self.records:,} records of {self.record_bytes} B in "
            f"{self.seconds:.2f} s",
            *(
                [
                    f"  idempotence {'on' if j['idempotence'] else 'off'}, "
                    f"{j['max_in_flight']} in flight per partition, acks={j['acks']}"
                ]
                if "idempotence" in j
                else []
            ),
            f"  {j['records_per_s']:,.0f} records/s, {j['mb_per_s']} MB/s",
            f"  latency ms ({j['latency_samples']} samples): p50 {j['p50_ms']}, "
            f"p99 {j['p99_ms']}, p999 {j['p999_ms']}",
            f"  CPU s per million records: client {j['cpu_s_per_million']}"
            + (
                f", server {j['server_cpu_s_per_million']}"
                if "server_cpu_s_per_million" in j
                else ""
            ),
        ]
        return "\n".join(lines)


def percentile(sorted_values: list[float], pct: float) -> float:
    """Nearest-rank percentile of an ascending list (0.0 for no samples)."""
    if not sorted_values:
        return 0.0
    rank = max(1, min(len(sorted_values), int(-(-pct * len(sorted_values) // 100))))
    return sorted_values[rank - 1]


# ---------------------------------------------------------------------------------------------
# Server CPU: the node's own accounting from /proc when it listens on this machine.


def _listening_inode(port: int) -> str | None:
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    cols = line.split()
                    local, state, inode = cols[1], cols[3], cols[9]
                    if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                        return inode
        except (OSError, StopIteration, IndexError, ValueError):
            continue
    return None


def local_node_pid(address: str) -> int | None:
    """The pid of the local process listening on ``address``'s port, if it is ours to see."""
    host, _, port_s = address.rpartition(":")
    if host not in ("127.0.0.1", "localhost", "0.0.0.0", "::1", "[::1]") or not port_s.isdigit():
        return None
    inode = _listening_inode(int(port_s))
    if inode is None:
        return None
    target = f"socket:[{inode}]"
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        fd_dir = f"/proc/{pid}/fd"
        try:
            for fd in os.listdir(fd_dir):
                if os.readlink(f"{fd_dir}/{fd}") == target:
                    return int(pid)
        except OSError:
            continue
    return None


def process_cpu_s(pid: int | None) -> float | None:
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        ticks = int(fields[11]) + int(fields[12])  # utime + stime
        return ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------


def _progress(enabled: bool) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
        disable=not enabled,
        refresh_per_second=PROGRESS_REFRESH_PER_S,
    )


def _rate_text(done: int, started: float) -> str:
    elapsed = time.perf_counter() - started
    return f"{done / elapsed:,.0f} rec/s" if elapsed > 0 else ""


async def ensure_topic(
    bootstrap: str,
    topic: str,
    partitions: int,
    replication_factor: int | None,
    connection: Mapping[str, Any] | None = None,
    configs: Mapping[str, str] | None = None,
) -> tuple[int, bool]:
    """The topic's partition count, creating the topic first (with ``configs``; a
    ``replication_factor`` of None takes the cluster's default) when it is missing."""
    async with Admin(bootstrap, **(connection or {})) as admin:
        try:
            desc = await admin.describe_topics(topic)
        except UnknownTopic:
            desc = []
        if desc:
            return len(desc[0].partitions), False
        await admin.create_topics(topic, partitions, replication_factor, dict(configs or {}))
        return partitions, True


def _values(records: int, record_bytes: int) -> list[bytes]:
    pool = [
        os.urandom(record_bytes // 2 + 1).hex()[:record_bytes].encode()
        for _ in range(min(VALUE_POOL_SIZE, max(records, 1)))
    ]
    whole, rest = divmod(records, len(pool))
    return pool * whole + pool[:rest]


async def produce_bench(
    bootstrap: str,
    topic: str,
    records: int,
    record_bytes: int,
    *,
    acks: str = "all",
    compression: str = "none",
    partitions: int = 1,
    replication_factor: int | None = None,
    batch_bytes_max: int = 1 * _MIB,
    linger_ms: float = 5,
    max_in_flight: int = BENCH_IN_FLIGHT_DEFAULT,
    idempotence: bool | None = None,
    progress: bool = True,
    connection: Mapping[str, Any] | None = None,
    keys: int = 0,
    topic_configs: Mapping[str, str] | None = None,
) -> BenchResult:
    """Produce ``records`` records as fast as possible. ``idempotence``: as the client
    decides when None (on unless ``acks`` is not "all"); the result says which ran.
    ``connection``: TLS and credentials, the clients' keyword arguments (tls, ca, ...).
    ``keys``: 0 sends keyless records, N keys them ``key-0`` .. ``key-N-1`` in turn (what a
    compacted topic needs). ``topic_configs``: of the topic, if the bench creates it."""
    actual_partitions, created = await ensure_topic(
        bootstrap, topic, partitions, replication_factor, connection, topic_configs
    )
    values = _values(records, record_bytes)
    key_list = [b"key-%d" % (i % keys) for i in range(records)] if keys else None
    # One send_many call per batch: each call's metadata is then one batch's latency.
    per_batch = max(
        1, (batch_bytes_max - BATCH_OVERHEAD_BYTES) // (record_bytes + RECORD_OVERHEAD_BYTES)
    )
    latencies: list[float] = []
    async with Producer(
        bootstrap,
        acks=acks,
        compression=compression,
        batch_bytes_max=batch_bytes_max,
        linger_ms=linger_ms,
        max_in_flight_per_partition=max_in_flight,
        enable_idempotence=idempotence,
        **(connection or {}),
    ) as producer:
        idempotent = producer.idempotent
        pid = local_node_pid(_leader_address(producer, topic) or bootstrap.split(",")[0])
        server_before = process_cpu_s(pid)
        acked = 0
        with _progress(progress) as bar:
            task = bar.add_task(f"produce {topic}", total=records, rate="")
            cpu0 = time.process_time()
            t0 = time.perf_counter()
            window: deque[BatchesFuture] = deque()

            def collect(results: list[BatchMetadata]) -> None:
                nonlocal acked
                for md in results:
                    latencies.append(md.latency_ms)
                    acked += md.record_count

            last_draw = 0.0
            for start in range(0, records, per_batch):
                end = start + per_batch
                batch_keys = None if key_list is None else key_list[start:end]
                window.append(producer.send_many(topic, values[start:end], batch_keys))
                while len(window) > IN_FLIGHT_CALLS_MAX:
                    collect(await window.popleft())
                now = time.perf_counter()
                if now - last_draw > 1 / PROGRESS_REFRESH_PER_S:
                    last_draw = now
                    bar.update(task, completed=acked, rate=_rate_text(acked, t0))
                    await asyncio.sleep(0)
            while window:
                collect(await window.popleft())
            seconds = time.perf_counter() - t0
            cpu = time.process_time() - cpu0
            bar.update(task, completed=acked, rate=_rate_text(acked, t0))
        server_after = process_cpu_s(pid)
    server = None if server_before is None or server_after is None else server_after - server_before
    return BenchResult(
        "produce",
        topic,
        records,
        record_bytes,
        seconds,
        latencies,
        cpu,
        server,
        {
            "acks": acks,
            "idempotence": idempotent,
            "max_in_flight": max_in_flight,
            "compression": compression,
            "partitions": actual_partitions,
            "topic_created": created,
            "records_per_batch": per_batch,
            "keys": keys,
            "topic_configs": dict(topic_configs or {}),
        },
    )


def _leader_address(producer: Producer, topic: str) -> str | None:
    return producer.metadata.leader_address(topic, 0)


async def _record_count(
    bootstrap: str, topic: str, connection: Mapping[str, Any] | None = None
) -> tuple[list[TopicPartition], int]:
    async with Consumer(bootstrap, **(connection or {})) as consumer:
        tps = await consumer.partitions_for(topic)
        begin = await consumer.beginning_offsets(tps)
        end = await consumer.end_offsets(tps)
    return tps, sum(end[tp] - begin[tp] for tp in tps)


async def consume_bench(
    bootstrap: str,
    topic: str,
    records: int,
    record_bytes: int,
    *,
    partitions: int = 1,
    replication_factor: int | None = None,
    acks: str = "all",
    compression: str = "none",
    progress: bool = True,
    note: Callable[[str], None] | None = None,
    connection: Mapping[str, Any] | None = None,
) -> BenchResult:
    """Read ``records`` records from the beginning of ``topic`` (producing them first when
    the topic holds fewer)."""
    await ensure_topic(bootstrap, topic, partitions, replication_factor, connection)
    tps, have = await _record_count(bootstrap, topic, connection)
    if have < records:
        if note is not None:
            note(f"topic {topic} holds {have:,} records; producing {records - have:,} first")
        await produce_bench(
            bootstrap,
            topic,
            records - have,
            record_bytes,
            acks=acks,
            compression=compression,
            progress=progress,
            connection=connection,
        )
    latencies: list[float] = []
    got = 0
    value_bytes = 0
    async with Consumer(bootstrap, **(connection or {})) as consumer:
        consumer.assign(tps)
        pid = local_node_pid(consumer._meta_().leader_address(topic, 0) or bootstrap)
        server_before = process_cpu_s(pid)
        await consumer.seek_to_beginning()
        with _progress(progress) as bar:
            task = bar.add_task(f"consume {topic}", total=records, rate="")
            cpu0 = time.process_time()
            t0 = time.perf_counter()
            last_draw = 0.0
            while got < records:
                p0 = time.perf_counter()
                batches = await consumer.poll_batches(timeout_ms=10_000, max_records=100_000)
                if not batches:
                    break
                latencies.append((time.perf_counter() - p0) * 1000)
                for fb in batches:
                    got += len(fb.records)
                    try:
                        value_bytes += sum(map(len, map(_value, fb.records)))
                    except TypeError:  # a null value (tombstone) among them
                        value_bytes += sum(len(r.value or b"") for r in fb.records)
                now = time.perf_counter()
                if now - last_draw > 1 / PROGRESS_REFRESH_PER_S:
                    last_draw = now
                    bar.update(task, completed=min(got, records), rate=_rate_text(got, t0))
            seconds = time.perf_counter() - t0
            cpu = time.process_time() - cpu0
        server_after = process_cpu_s(pid)
    server = None if server_before is None or server_after is None else server_after - server_before
    mean_bytes = value_bytes // got if got else record_bytes
    return BenchResult(
        "consume",
        topic,
        got,
        mean_bytes,
        seconds,
        latencies,
        cpu,
        server,
        {"partitions": len(tps), "latency_is": "poll wait per non-empty poll_batches"},
    )
