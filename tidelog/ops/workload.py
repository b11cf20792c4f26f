"""``tidelog bench workload``: publish and end-to-end latency at a fixed rate, the way the field
measures it (after the OpenMessaging Benchmark).

Open loop: the producer sends on a fixed schedule (record ``n`` is due at ``t0 + n / rate``)
whatever the cluster does, and each latency is counted from the record's *scheduled* time, so
a stall shows up in the percentiles instead of silently slowing the sender down (coordinated
omission). ``rate=0`` is the closed-loop probe instead: one record at a time, each awaited.

A consumer in a process of its own reads the topic from its end while the producer runs; each
value carries its scheduled time (``time.monotonic_ns``, one clock for every process of the
machine), so the consumer's histogram is the end-to-end latency, produce to consume.

A run warms up first (its records are sent and consumed but not counted), then measures for
``duration_s``. Latencies go into HDR histograms (the ``hdrhistogram`` package, microsecond
resolution, 3 significant digits) and are reported as p50/p99/p99.9/max in milliseconds, with
the rate achieved (acknowledgements inside the measured window) against the rate asked, and
CPU seconds per million records of the producer process, the consumer process and the local
nodes (from /proc). ``--sweep`` runs several rates and prints the latency-throughput curve as
a table and a PNG (matplotlib).
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import struct
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from hdrh.histogram import HdrHistogram

from tidelog.client import Admin, BatchesFuture, Consumer, Producer, RecordFuture
from tidelog.ops.bench import ensure_topic, local_node_pid, process_cpu_s

__all__ = [
    "LatencySummary",
    "WorkloadResult",
    "WorkloadSpec",
    "plot_sweep",
    "run_sweep",
    "run_workload",
    "sweep_table",
]

#: Histogram range: 1 µs to 10 minutes, 3 significant digits (0.1% error).
_HIST_MAX_US = 600 * 1_000_000
_HIST_DIGITS = 3
#: Every value starts with its scheduled time (monotonic ns) and its sequence number.
_HEAD = struct.Struct("<qq")
#: How long the consumer may take to see the last record after the producer's flush.
_DRAIN_S = 15.0
#: The consumer's poll wait: short, so a stop request is seen at once.
_POLL_MS = 100
#: The open-loop generator's shortest tick: each tick sends what is due in one send_many.
_TICK_NS = 500_000
#: Latency groups one tick's records are recorded in (``_Tally.done_many``).
_SPANS_PER_TICK = 16


def _histogram() -> HdrHistogram:
    return HdrHistogram(1, _HIST_MAX_US, _HIST_DIGITS)


@dataclass(frozen=True, slots=True)
class WorkloadSpec:
    topic: str = "workload"
    partitions: int = 1
    replication_factor: int = 3
    record_bytes: int = 100
    #: Records per second on the fixed schedule; 0: closed loop, one record at a time.
    rate: float = 1000.0
    warmup_s: float = 5.0
    duration_s: float = 20.0
    linger_ms: float = 1.0
    #: The producer's adaptive linger (send at once when nothing is in flight).
    adaptive_linger: bool = True
    acks: str = "all"
    batch_bytes: int = 1024 * 1024
    idempotence: bool | None = None
    max_in_flight: int | None = None
    #: Run the end-to-end consumer (a process of its own).
    consumer: bool = True

    def __post_init__(self) -> None:
        if self.rate < 0:
            raise ValueError(f"rate={self.rate} must be >= 0 (0: closed loop)")
        if self.duration_s <= 0 or self.warmup_s < 0:
            raise ValueError("duration_s must be > 0 and warmup_s >= 0")
        if self.record_bytes < _HEAD.size:
            raise ValueError(
                f"record_bytes={self.record_bytes}: each value carries a {_HEAD.size}-byte "
                "timestamp and sequence number, so records are at least that large"
            )


@dataclass(frozen=True, slots=True)
class LatencySummary:
    count: int
    p50_ms: float
    p99_ms: float
    p999_ms: float
    max_ms: float
    mean_ms: float

    @classmethod
    def of(cls, h: HdrHistogram) -> LatencySummary:
        count = h.get_total_count()
        if count == 0:
            return cls(0, 0.0, 0.0, 0.0, 0.0, 0.0)
        ms = 1000.0
        return cls(
            count,
            h.get_value_at_percentile(50) / ms,
            h.get_value_at_percentile(99) / ms,
            h.get_value_at_percentile(99.9) / ms,
            h.get_max_value() / ms,
            h.get_mean_value() / ms,
        )

    def text(self) -> str:
        return (
            f"p50 {self.p50_ms:.2f}  p99 {self.p99_ms:.2f}  p99.9 {self.p999_ms:.2f}  "
            f"max {self.max_ms:.2f} ms"
        )


@dataclass
class WorkloadResult:
    spec: WorkloadSpec
    #: Records scheduled inside the measured window and acknowledged (whenever the answer
    #: came): the publish histogram's count.
    measured: int
    measured_s: float
    sent_total: int
    acked_total: int
    errors: int
    first_error: str
    publish: LatencySummary
    #: How late the generator itself sent records (send time minus scheduled time).
    schedule_lag: LatencySummary
    e2e: LatencySummary | None
    consumed_total: int | None
    #: CPU seconds per million measured records: producer, consumer, nodes (None: unknown).
    cpu_s_per_million: dict[str, float | None] = field(default_factory=dict)
    #: Acknowledgements that arrived inside the measured window (whatever record's): the
    #: throughput the cluster delivered there. -1: not counted (the closed loop's window
    #: ends with its last acknowledgement, so it equals ``measured``).
    acked_in_window: int = -1

    @property
    def achieved_rate(self) -> float:
        """Acknowledgements per second inside the measured window: a backlog answered after
        the window (while the producer flushes) does not count, so a cluster that falls
        behind the asked rate shows a lower figure."""
        if self.measured_s <= 0:
            return 0.0
        acked = self.measured if self.acked_in_window < 0 else self.acked_in_window
        return acked / self.measured_s

    def to_json(self) -> dict[str, Any]:
        return {
            "spec": asdict(self.spec),
            "asked_rate": self.spec.rate,
            "achieved_rate": round(self.achieved_rate, 1),
            "measured_records": self.measured,
            "acked_in_window": self.measured if self.acked_in_window < 0 else self.acked_in_window,
            "measured_s": round(self.measured_s, 3),
            "sent_total": self.sent_total,
            "acked_total": self.acked_total,
            "errors": self.errors,
            "first_error": self.first_error,
            "publish_latency_ms": asdict(self.publish),
            "schedule_lag_ms": asdict(self.schedule_lag),
            "end_to_end_latency_ms": None if self.e2e is None else asdict(self.e2e),
            "consumed_total": self.consumed_total,
            "cpu_s_per_million": self.cpu_s_per_million,
        }

    def summary(self) -> str:
        s = self.spec
        mode = "closed loop, one at a time" if s.rate == 0 else f"open loop at {s.rate:,.0f}/s"
        lines = [
            f"workload {s.topic}: {mode}, {s.record_bytes} B records, {s.partitions} "
            f"partition(s), RF {s.replication_factor}, acks={s.acks}, linger {s.linger_ms} ms"
            f"{' (adaptive)' if s.adaptive_linger else ''}",
            f"  achieved {self.achieved_rate:,.0f} records/s over {self.measured_s:.1f} s "
            f"({self.measured:,} records measured, {self.errors} errors)",
            f"  publish     {self.publish.text()}",
        ]
        if self.e2e is not None:
            lines.append(f"  end to end  {self.e2e.text()}")
        lag = self.schedule_lag
        lines.append(
            f"  (generator lag, sent after the scheduled time: p50 {lag.p50_ms:.2f}  "
            f"p99 {lag.p99_ms:.2f}  max {lag.max_ms:.2f} ms)"
        )
        cpu = ", ".join(
            f"{k} {'n/a' if v is None else f'{v:.1f}'}" for k, v in self.cpu_s_per_million.items()
        )
        lines.append(f"  CPU s per million records: {cpu}")
        if self.first_error:
            lines.append(f"  first error: {self.first_error}")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The consumer process


def _consumer_process(
    bootstrap: str,
    connection: Mapping[str, Any],
    topic: str,
    warm_ns_box: Connection,
) -> None:
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # the plain asyncio loop works too
        pass
    asyncio.run(_consume(bootstrap, connection, topic, warm_ns_box))


async def _consume(
    bootstrap: str, connection: Mapping[str, Any], topic: str, pipe: Connection
) -> None:
    hist = _histogram()
    seen = 0
    warm_ns: int | None = None
    stop_after: int | None = None
    deadline = 0.0
    cpu0 = time.process_time()
    async with Consumer(bootstrap, **connection) as consumer:
        tps = await consumer.partitions_for(topic)
        consumer.assign(tps)
        await consumer.seek_to_end(*tps)
        pipe.send(("ready",))
        while True:
            if pipe.poll():
                msg = pipe.recv()
                if msg[0] == "start":
                    warm_ns = int(msg[1])
                    cpu0 = time.process_time()
                elif msg[0] == "stop":
                    stop_after = int(msg[1])
                    deadline = time.monotonic() + _DRAIN_S
            if stop_after is not None and (seen >= stop_after or time.monotonic() > deadline):
                break
            batches = await consumer.poll_batches(timeout_ms=_POLL_MS)
            now = time.monotonic_ns()
            for fb in batches:
                for r in fb.records:
                    seen += 1
                    if r.value is None or len(r.value) < _HEAD.size:
                        continue
                    sched, _ = _HEAD.unpack_from(r.value)
                    if warm_ns is not None and sched >= warm_ns:
                        hist.record_value(max(1, (now - sched) // 1000))
    pipe.send(("done", seen, hist.encode(), time.process_time() - cpu0))


# ---------------------------------------------------------------------------------------------
# The producer


@dataclass
class _Tally:
    hist: HdrHistogram = field(default_factory=_histogram)
    lag: HdrHistogram = field(default_factory=_histogram)
    sent: int = 0
    acked: int = 0
    measured: int = 0
    errors: int = 0
    first_error: str = ""
    last_measured_ack_ns: int = 0
    #: The measured window (monotonic ns), and the acknowledgements that arrived inside it.
    window: tuple[int, int] = (0, 0)
    acked_in_window: int = 0

    def error(self, err: BaseException, count: int) -> None:
        self.errors += count
        if not self.first_error:
            self.first_error = f"{type(err).__name__}: {err}"

    def _acked(self, now: int, count: int) -> None:
        self.acked += count
        lo, hi = self.window
        if lo <= now < hi:
            self.acked_in_window += count

    def done(self, sched_ns: int, counted: bool, fut: RecordFuture) -> None:
        err = fut.exception()
        if err is not None:
            self.error(err, 1)
            return
        now = time.monotonic_ns()
        self._acked(now, 1)
        if counted:
            self.measured += 1
            self.last_measured_ack_ns = now
            self.hist.record_value(max(1, (now - sched_ns) // 1000))

    def done_many(self, first_sched: int, interval: float, count: int, warm: int) -> None:
        """``count`` records scheduled ``interval`` ns apart from ``first_sched`` were
        acknowledged now: each one's latency is from its own scheduled time. Recorded in at
        most ``_SPANS_PER_TICK`` groups of equal latency (each group's middle record), so a
        tick of many records costs a few histogram calls, not one per record; the error is
        at most half a group's span of the schedule."""
        now = time.monotonic_ns()
        self._acked(now, count)
        groups = min(count, _SPANS_PER_TICK)
        start = 0
        for g in range(groups):
            stop = (g + 1) * count // groups
            mid = first_sched + int((start + stop - 1) / 2 * interval)
            n = stop - start
            if n:
                first = first_sched + int(start * interval)
                if first >= warm:
                    self.measured += n
                    self.last_measured_ack_ns = now
                    self.hist.record_value(max(1, (now - mid) // 1000), n)
                elif first_sched + int((stop - 1) * interval) >= warm:
                    # A group straddling the warm-up's end: count only its measured records.
                    counted = sum(
                        1 for i in range(start, stop) if first_sched + int(i * interval) >= warm
                    )
                    self.measured += counted
                    self.last_measured_ack_ns = now
                    self.hist.record_value(max(1, (now - mid) // 1000), counted)
            start = stop


def _value_pad(record_bytes: int) -> bytes:
    n = record_bytes - _HEAD.size
    return os.urandom(n // 2 + 1).hex()[:n].encode()


async def _await_tick(
    fut: BatchesFuture, first_sched: int, interval: float, count: int, warm: int, tally: _Tally
) -> None:
    try:
        await fut
    except Exception as err:  # the records' error: counted, the run goes on
        tally.error(err, count)
        return
    tally.done_many(first_sched, interval, count, warm)


async def _open_loop(
    producer: Producer, spec: WorkloadSpec, t0: int, warm: int, end: int, tally: _Tally
) -> None:
    """Each tick sends every record due by now in one ``send_many`` (records are still
    timed from their own scheduled times), so the generator keeps up with rates far above
    what one ``send`` per record allows; ticks are at least ``_TICK_NS`` apart (waiting
    for the tick is generator lag, counted in the latency like any other)."""
    pad = _value_pad(spec.record_bytes)
    interval = 1e9 / spec.rate
    total = int((end - t0) / interval)
    pack = _HEAD.pack
    topic = spec.topic
    waits: set[asyncio.Task[None]] = set()
    n = 0
    last_tick = 0
    while n < total:
        now = time.monotonic_ns()
        last_tick = now
        due = min(total, int((now - t0) / interval) + 1)
        if due > n:
            first = t0 + int(n * interval)
            values = [pack(t0 + int(i * interval), i) + pad for i in range(n, due)]
            fut = producer.send_many(topic, values)
            lag_us = max(1, (now - first) // 1000)
            if first >= warm:
                tally.lag.record_value(lag_us)
            task = asyncio.ensure_future(_await_tick(fut, first, interval, due - n, warm, tally))
            waits.add(task)
            task.add_done_callback(waits.discard)
            n = due
        tally.sent = n
        next_at = max(t0 + int(n * interval), last_tick + _TICK_NS)
        await asyncio.sleep(max((next_at - time.monotonic_ns()) / 1e9, 0.0))
    tally.sent = n
    if waits:
        await asyncio.wait(set(waits))


async def _closed_loop(
    producer: Producer, spec: WorkloadSpec, warm: int, end: int, tally: _Tally
) -> None:
    pad = _value_pad(spec.record_bytes)
    n = 0
    while True:
        sched = time.monotonic_ns()
        if sched >= end:
            break
        fut = producer.send(spec.topic, _HEAD.pack(sched, n) + pad)
        n += 1
        tally.sent = n
        try:
            await fut
        except Exception:  # counted by the callback below
            pass
        tally.done(sched, sched >= warm, fut)


async def _node_pids(bootstrap: str, connection: Mapping[str, Any]) -> list[int]:
    async with Admin(bootstrap, **connection) as admin:
        view = await admin.metadata()
    pids = [local_node_pid(n.address) for n in view.nodes]
    return [p for p in pids if p is not None]


def _cpu_total(pids: Sequence[int]) -> float | None:
    values = [process_cpu_s(p) for p in pids]
    if not values or any(v is None for v in values):
        return None
    return sum(v for v in values if v is not None)


async def run_workload(
    bootstrap: str,
    spec: WorkloadSpec,
    *,
    connection: Mapping[str, Any] | None = None,
    note: Callable[[str], None] | None = None,
) -> WorkloadResult:
    """One run: warm-up, then ``spec.duration_s`` measured, at ``spec.rate``."""
    conn = dict(connection or {})
    await ensure_topic(bootstrap, spec.topic, spec.partitions, spec.replication_factor, conn)
    pids = await _node_pids(bootstrap, conn)
    child: Any = None
    pipe: Connection | None = None
    if spec.consumer:
        ctx = mp.get_context("spawn")
        pipe, child_end = ctx.Pipe()
        child = ctx.Process(
            target=_consumer_process,
            args=(bootstrap, conn, spec.topic, child_end),
            daemon=True,
        )
        child.start()
        if not await asyncio.to_thread(pipe.poll, 60.0):
            child.kill()
            raise RuntimeError("the end-to-end consumer did not start within 60 s")
        pipe.recv()
    tally = _Tally()
    cpu_producer = 0.0
    cpu_nodes0: float | None = None
    cpu_nodes1: float | None = None
    consumed: int | None = None
    e2e: LatencySummary | None = None
    cpu_consumer: float | None = None
    producer = Producer(
        bootstrap,
        acks=spec.acks,
        linger_ms=spec.linger_ms,
        adaptive_linger=spec.adaptive_linger,
        batch_bytes_max=spec.batch_bytes,
        enable_idempotence=spec.idempotence,
        max_in_flight_per_partition=spec.max_in_flight,
        **conn,
    )
    try:
        async with producer:
            await producer.partitions_for(spec.topic)
            t0 = time.monotonic_ns() + 50_000_000
            warm = t0 + int(spec.warmup_s * 1e9)
            end = warm + int(spec.duration_s * 1e9)
            tally.window = (warm, end)
            if pipe is not None:
                pipe.send(("start", warm))
            if note is not None:
                note(f"warming up {spec.warmup_s:g} s, then measuring {spec.duration_s:g} s")
            cpu0 = 0.0

            async def mark_window() -> None:
                nonlocal cpu_nodes0, cpu0
                await asyncio.sleep(max(0.0, (warm - time.monotonic_ns()) / 1e9))
                cpu_nodes0 = _cpu_total(pids)
                cpu0 = time.process_time()

            marker = asyncio.create_task(mark_window())
            await asyncio.sleep(max(0.0, (t0 - time.monotonic_ns()) / 1e9))
            if spec.rate > 0:
                await _open_loop(producer, spec, t0, warm, end, tally)
            else:
                await _closed_loop(producer, spec, warm, end, tally)
            await marker
            await producer.flush()
            cpu_producer = time.process_time() - cpu0
            cpu_nodes1 = _cpu_total(pids)
    finally:
        if pipe is not None and child is not None:
            pipe.send(("stop", tally.sent))
            if await asyncio.to_thread(pipe.poll, _DRAIN_S + 30):
                _, consumed, encoded, cpu_consumer = pipe.recv()
                e2e = LatencySummary.of(HdrHistogram.decode(encoded))
            child.join(5)
            if child.is_alive():
                child.kill()
    measured_end = tally.last_measured_ack_ns or end
    measured_s = max(min(measured_end, end) - warm, 1) / 1e9
    per_m = 1e6 / max(tally.measured, 1)
    cpu_nodes = (
        None if cpu_nodes0 is None or cpu_nodes1 is None else (cpu_nodes1 - cpu_nodes0) * per_m
    )
    return WorkloadResult(
        spec=spec,
        measured=tally.measured,
        measured_s=measured_s if spec.rate == 0 else spec.duration_s,
        sent_total=tally.sent,
        acked_total=tally.acked,
        errors=tally.errors,
        first_error=tally.first_error,
        publish=LatencySummary.of(tally.hist),
        schedule_lag=LatencySummary.of(tally.lag),
        e2e=e2e,
        consumed_total=consumed,
        acked_in_window=-1 if spec.rate == 0 else tally.acked_in_window,
        cpu_s_per_million={
            "producer": cpu_producer * per_m,
            "consumer": None if cpu_consumer is None else cpu_consumer * per_m,
            "nodes": cpu_nodes,
        },
    )


async def run_sweep(
    bootstrap: str,
    spec: WorkloadSpec,
    rates: Sequence[float],
    *,
    connection: Mapping[str, Any] | None = None,
    note: Callable[[str], None] | None = None,
) -> list[WorkloadResult]:
    results = []
    for rate in rates:
        if note is not None:
            note(f"rate {rate:,.0f} records/s")
        results.append(
            await run_workload(bootstrap, replace(spec, rate=rate), connection=connection)
        )
        if note is not None:
            note(results[-1].summary())
    return results


def sweep_table(results: Sequence[WorkloadResult]) -> list[list[str]]:
    """Rows (with a header row) of the latency-throughput curve."""
    rows = [
        [
            "asked/s",
            "achieved/s",
            "pub p50",
            "pub p99",
            "pub p99.9",
            "pub max",
            "e2e p50",
            "e2e p99",
            "e2e p99.9",
            "errors",
        ]
    ]
    for r in results:
        e = r.e2e
        rows.append(
            [
                "closed loop" if r.spec.rate == 0 else f"{r.spec.rate:,.0f}",
                f"{r.achieved_rate:,.0f}",
                f"{r.publish.p50_ms:.2f}",
                f"{r.publish.p99_ms:.2f}",
                f"{r.publish.p999_ms:.2f}",
                f"{r.publish.max_ms:.2f}",
                "-" if e is None else f"{e.p50_ms:.2f}",
                "-" if e is None else f"{e.p99_ms:.2f}",
                "-" if e is None else f"{e.p999_ms:.2f}",
                str(r.errors),
            ]
        )
    return rows


def plot_sweep(results: Sequence[WorkloadResult], path: Path, title: str) -> None:
    """The latency-throughput curve as a PNG: latency percentiles against achieved rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    open_loop = [r for r in results if r.spec.rate > 0]
    xs = [r.achieved_rate for r in open_loop]
    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    series: list[tuple[str, Callable[[WorkloadResult], float | None]]] = [
        ("publish p50", lambda r: r.publish.p50_ms),
        ("publish p99", lambda r: r.publish.p99_ms),
        ("publish p99.9", lambda r: r.publish.p999_ms),
        ("end-to-end p99", lambda r: None if r.e2e is None else r.e2e.p99_ms),
    ]
    for label, get in series:
        ys = [get(r) for r in open_loop]
        points = [y for y in ys if y is not None]
        if len(points) == len(ys):
            ax.plot(xs, points, marker="o", label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("achieved records/s (open loop, fixed rate)")
    ax.set_ylabel("latency, ms (from the scheduled send time)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
