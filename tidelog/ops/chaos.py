"""``tidelog chaos``: kill nodes of the local cluster under an acks=all load, then check that
no acknowledged record was lost, duplicated or reordered, and how long each failover took.

The load: one writer per partition sends records to that partition at a steady rate
(``rate`` records/s over all partitions); each value names the run, the partition and the
record's sequence number within the partition (``tidelog-chaos <run> <partition> <seq>``).
The producer keeps one request in flight per partition: without the idempotent producer,
a retried batch could otherwise land after a later batch that succeeded first, which is a
reordering the client causes, not the cluster. Every acknowledgment is recorded as
(partition, seq, offset).

Each round kills (SIGKILL) the leader of a random partition (a random node when no
partition has a leader), restarts it after ``downtime_ms`` with its recorded command line
(:func:`tidelog.ops.localcluster.start_node`) and waits until it is back and the topic is fully
replicated again. The round's failover time runs from the kill to the moment every
partition the victim led has acknowledged a record *sent after the kill*: the time writers
to the victim's partitions could not make progress. Rounds whose victim led nothing have no
failover time; a failover that did not complete within ``FAILOVER_DEADLINE_S`` is reported
as timed out.

Afterwards the writers stop, and every partition is read from where the run started to its
high watermark; :func:`verdict` (pure, unit-tested) compares what was acknowledged with what
is in the log. Lost, reordered or misplaced acknowledged records fail the run; duplicates
(a retry of a batch whose first attempt was committed after all) are reported only, until
the idempotent producer exists.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import random
import secrets
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from tidelog.client import Admin, Consumer, Producer, RecordFuture, TopicPartition
from tidelog.client.metadata import TopicInfo
from tidelog.errors import TidelogError
from tidelog.ops import localcluster
from tidelog.ops.bench import percentile

__all__ = [
    "Acked",
    "ChaosError",
    "ChaosReport",
    "Consumed",
    "RoundResult",
    "Verdict",
    "choose_victim",
    "decode_value",
    "encode_value",
    "render_report",
    "run_chaos",
    "verdict",
]

TOPIC_DEFAULT: Final = "chaos"
PARTITIONS_DEFAULT: Final = 6
REPLICATION_FACTOR_DEFAULT: Final = 3
ROUNDS_DEFAULT: Final = 10
#: Records per second over all partitions: enough that a record is sent to every partition
#: every few milliseconds (the resolution of the failover time) without loading 2 cores.
RATE_DEFAULT: Final = 2_000
#: How long a killed node stays down: longer than an election timeout (1 s), so failover
#: happens while the victim is gone rather than being hidden by its return.
DOWNTIME_MS_DEFAULT: Final = 2_000
#: A failover not finished by then is reported as timed out.
FAILOVER_DEADLINE_S: Final = 30.0
#: How long a round waits for the topic to have every leader and replica in sync again.
HEALTHY_WAIT_S: Final = 30.0
#: Writes flowing between "healthy" and the next kill.
SETTLE_S: Final = 0.5
RESTART_TIMEOUT_S: Final = 60.0
#: Time to read every partition back at the end.
CONSUME_TIMEOUT_S: Final = 180.0
#: Time to deliver what is buffered when the writers stop.
FLUSH_TIMEOUT_S: Final = 60.0
#: Unacknowledged records per partition before its writer waits (bounds memory in failover).
PENDING_RECORDS_MAX_PER_PARTITION: Final = 5_000
SEND_TICK_S: Final = 0.01
#: Seconds of unsent rate a writer may catch up on at once after a stall.
SEND_CREDIT_MAX_S: Final = 0.1
#: One request in flight per partition keeps retries in order (module docstring).
PRODUCER_IN_FLIGHT_PER_PARTITION: Final = 1
PRODUCER_REQUEST_TIMEOUT_MS: Final = 10_000
PRODUCER_RETRY_BACKOFF_MS: Final = 50
#: Examples of each kind of violation kept in the verdict.
EXAMPLES_MAX: Final = 10
HEALTH_POLL_S: Final = 0.2
#: With fewer nodes, killing one stops the whole cluster: nothing to fail over to.
CLUSTER_NODES_MIN = 2

VALUE_PREFIX: Final = b"tidelog-chaos"


class ChaosError(TidelogError):
    """The chaos run could not start or finish (the message says why and what to do)."""

    reason = "CHAOS"


# ---------------------------------------------------------------------------------------------
# Values


def encode_value(run_id: str, partition: int, seq: int) -> bytes:
    return b"%s %s %d %d" % (VALUE_PREFIX, run_id.encode(), partition, seq)


def decode_value(value: bytes | None) -> tuple[str, int, int] | None:
    """(run id, partition, seq) of a chaos record, or None for anything else."""
    if value is None:
        return None
    parts = value.split(b" ")
    if len(parts) != 4 or parts[0] != VALUE_PREFIX:
        return None
    try:
        return parts[1].decode(), int(parts[2]), int(parts[3])
    except (UnicodeDecodeError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------
# The checker (pure)


@dataclass(frozen=True, slots=True)
class Acked:
    """An acknowledged record: the producer was told it is at ``offset``."""

    partition: int
    seq: int
    offset: int


@dataclass(frozen=True, slots=True)
class Consumed:
    """A record read back from ``partition`` at ``offset``."""

    partition: int
    offset: int
    seq: int


@dataclass(frozen=True, slots=True)
class Verdict:
    acked: int
    consumed: int
    #: Acknowledged records with no copy in the log.
    lost: int
    #: Distinct (partition, seq) read more than once, and the extra copies in all.
    duplicated: int
    duplicate_copies: int
    #: First occurrences out of sequence order within their partition: the fewest records
    #: that would have to move to restore the order (length minus the longest increasing run).
    reordered: int
    #: Acknowledged records present in the log, but not at the offset the ack named: the
    #: acknowledged write was overwritten and the record survives only as another copy.
    misplaced: int
    lost_examples: tuple[tuple[int, int], ...] = ()
    duplicated_examples: tuple[tuple[int, int], ...] = ()
    #: (partition, seq, offset) of records read after a higher seq of the same partition.
    reordered_examples: tuple[tuple[int, int, int], ...] = ()
    #: (partition, seq, acknowledged offset).
    misplaced_examples: tuple[tuple[int, int, int], ...] = ()

    @property
    def ok(self) -> bool:
        """Duplicates do not fail a run until the idempotent producer exists."""
        return self.lost == 0 and self.reordered == 0 and self.misplaced == 0


def _longest_increasing(seqs: Sequence[int]) -> int:
    """Length of the longest strictly increasing subsequence (patience sorting)."""
    tails: list[int] = []
    for s in seqs:
        i = bisect.bisect_left(tails, s)
        if i == len(tails):
            tails.append(s)
        else:
            tails[i] = s
    return len(tails)


def verdict(acked: Iterable[Acked], consumed: Iterable[Consumed]) -> Verdict:
    """Compare the acknowledged records with the records read back (in any order; they are
    ordered by offset per partition here)."""
    by_partition: dict[int, list[Consumed]] = {}
    n_consumed = 0
    for c in consumed:
        by_partition.setdefault(c.partition, []).append(c)
        n_consumed += 1
    seen: dict[tuple[int, int], int] = {}  # (partition, seq) -> copies
    at_offset: dict[tuple[int, int], int] = {}  # (partition, offset) -> seq
    reordered = 0
    reordered_examples: list[tuple[int, int, int]] = []
    for partition in sorted(by_partition):
        records = sorted(by_partition[partition], key=lambda c: c.offset)
        firsts: list[int] = []
        highest = -1
        for c in records:
            at_offset[(partition, c.offset)] = c.seq
            key = (partition, c.seq)
            copies = seen.get(key, 0)
            seen[key] = copies + 1
            if copies:
                continue
            firsts.append(c.seq)
            if c.seq < highest and len(reordered_examples) < EXAMPLES_MAX:
                reordered_examples.append((partition, c.seq, c.offset))
            highest = max(highest, c.seq)
        reordered += len(firsts) - _longest_increasing(firsts)
    duplicated = [key for key, copies in sorted(seen.items()) if copies > 1]
    n_acked = 0
    lost: list[tuple[int, int]] = []
    misplaced: list[tuple[int, int, int]] = []
    for a in acked:
        n_acked += 1
        if (a.partition, a.seq) not in seen:
            lost.append((a.partition, a.seq))
        elif at_offset.get((a.partition, a.offset)) != a.seq:
            misplaced.append((a.partition, a.seq, a.offset))
    return Verdict(
        acked=n_acked,
        consumed=n_consumed,
        lost=len(lost),
        duplicated=len(duplicated),
        duplicate_copies=sum(seen[key] - 1 for key in duplicated),
        reordered=reordered,
        misplaced=len(misplaced),
        lost_examples=tuple(sorted(lost)[:EXAMPLES_MAX]),
        duplicated_examples=tuple(duplicated[:EXAMPLES_MAX]),
        reordered_examples=tuple(reordered_examples),
        misplaced_examples=tuple(sorted(misplaced)[:EXAMPLES_MAX]),
    )


def choose_victim(
    rng: random.Random, leaders: Mapping[int, int], running: Sequence[int]
) -> tuple[int, int | None]:
    """(node to kill, partition whose leader it is): the leader of a random partition led by
    a running node, else a random running node (partition None)."""
    if not running:
        raise ValueError("no running node to choose from")
    led = sorted(p for p, leader in leaders.items() if leader in running)
    if led:
        partition = rng.choice(led)
        return leaders[partition], partition
    return rng.choice(sorted(running)), None


# ---------------------------------------------------------------------------------------------
# Report


@dataclass(frozen=True, slots=True)
class RoundResult:
    round: int
    victim: int
    #: The partition whose leader was chosen as the victim (None: a random node).
    partition: int | None
    #: Partitions the victim led when it was killed.
    led: tuple[int, ...]
    #: Kill to "every led partition acknowledged a record sent after the kill"; None when the
    #: victim led nothing or the deadline passed first.
    failover_ms: float | None
    partition_failover_ms: Mapping[int, float]
    timed_out: bool
    #: From the restart to the node serving and registered alive again.
    restart_ms: float | None
    #: Whether the topic had every leader and replica in sync before the kill.
    healthy_before: bool
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "round": self.round,
            "victim": self.victim,
            "partition": self.partition,
            "led_partitions": list(self.led),
            "failover_ms": _ms(self.failover_ms),
            "failover_timed_out": self.timed_out,
            "partition_failover_ms": {
                str(p): _ms(ms) for p, ms in sorted(self.partition_failover_ms.items())
            },
            "restart_ms": _ms(self.restart_ms),
            "healthy_before": self.healthy_before,
            "error": self.error,
        }


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


@dataclass(frozen=True, slots=True)
class ChaosReport:
    topic: str
    partitions: int
    replication_factor: int
    run_id: str
    seed: int
    rounds_requested: int
    rounds: tuple[RoundResult, ...]
    verdict: Verdict
    sent: int
    failed_sends: int
    send_errors: Mapping[str, int]
    #: Records in the range read that are not this run's (another writer on the topic).
    foreign: int
    seconds: float
    notes: tuple[str, ...] = field(default=())

    @property
    def failovers_ms(self) -> list[float]:
        return sorted(r.failover_ms for r in self.rounds if r.failover_ms is not None)

    def failover_percentile(self, pct: float) -> float | None:
        values = self.failovers_ms
        return percentile(values, pct) if values else None

    @property
    def ok(self) -> bool:
        """The verdict passed and every round ran to the end."""
        return self.verdict.ok and all(r.error is None for r in self.rounds)

    def to_json(self) -> dict[str, Any]:
        v = self.verdict
        values = self.failovers_ms
        return {
            "rounds": len(self.rounds),
            "rounds_requested": self.rounds_requested,
            "acked": v.acked,
            "lost": v.lost,
            "duplicated": v.duplicated,
            "duplicate_copies": v.duplicate_copies,
            "reordered": v.reordered,
            "misplaced": v.misplaced,
            "failover_ms_p50": _ms(self.failover_percentile(50)),
            "failover_ms_p99": _ms(self.failover_percentile(99)),
            "failover_ms_max": _ms(values[-1] if values else None),
            "failover_timeouts": sum(r.timed_out for r in self.rounds),
            "ok": self.ok,
            "topic": self.topic,
            "partitions": self.partitions,
            "replication_factor": self.replication_factor,
            "run_id": self.run_id,
            "seed": self.seed,
            "sent": self.sent,
            "failed_sends": self.failed_sends,
            "send_errors": dict(self.send_errors),
            "consumed": v.consumed,
            "foreign": self.foreign,
            "seconds": round(self.seconds, 2),
            "examples": {
                "lost": [list(x) for x in v.lost_examples],
                "duplicated": [list(x) for x in v.duplicated_examples],
                "reordered": [list(x) for x in v.reordered_examples],
                "misplaced": [list(x) for x in v.misplaced_examples],
            },
            "notes": list(self.notes),
            "round_details": [r.to_json() for r in self.rounds],
        }


def _fmt_ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f} ms"


def render_report(report: ChaosReport) -> list[Any]:
    """Rich renderables: a table of rounds, then the verdict."""
    from rich.table import Table
    from rich.text import Text

    table = Table(
        title=f"chaos on {report.topic} ({report.partitions} partitions, RF "
        f"{report.replication_factor}), seed {report.seed}",
        title_justify="left",
    )
    for col in ("round", "killed", "led", "failover", "restart", "healthy before", "note"):
        table.add_column(
            col, justify="right" if col in ("round", "failover", "restart") else "left"
        )
    for r in report.rounds:
        failover = "timed out" if r.timed_out else _fmt_ms(r.failover_ms)
        note = r.error or ("" if r.led else "victim led no partition")
        table.add_row(
            str(r.round),
            f"node {r.victim}",
            ",".join(map(str, r.led)) or "-",
            failover,
            _fmt_ms(r.restart_ms),
            "yes" if r.healthy_before else "no",
            note,
        )
    v = report.verdict
    rate = report.sent / report.seconds if report.seconds > 0 else 0.0
    lines = [
        f"sent {report.sent} records ({rate:.0f}/s), acknowledged {v.acked}, failed "
        f"{report.failed_sends}"
        + (f" {dict(report.send_errors)}" if report.send_errors else "")
        + f", read back {v.consumed}",
        f"lost {v.lost}, duplicated {v.duplicated} ({v.duplicate_copies} extra copies), "
        f"reordered {v.reordered}, misplaced {v.misplaced}",
        f"failover p50 {_fmt_ms(report.failover_percentile(50))}, p99 "
        f"{_fmt_ms(report.failover_percentile(99))} over {len(report.failovers_ms)} round(s); "
        f"timed out {sum(r.timed_out for r in report.rounds)}",
    ]
    for label, examples in (
        ("lost (partition, seq)", v.lost_examples),
        ("reordered (partition, seq, offset)", v.reordered_examples),
        ("misplaced (partition, seq, acked offset)", v.misplaced_examples),
        ("duplicated (partition, seq)", v.duplicated_examples),
    ):
        if examples:
            lines.append(f"e.g. {label}: {', '.join(map(str, examples))}")
    lines += [f"note: {n}" for n in report.notes]
    out: list[Any] = [table, *(Text(line) for line in lines)]
    if report.ok:
        out.append(Text("verdict: PASS", style="bold green"))
    else:
        why = [
            f"{what} {n}"
            for what, n in (
                ("lost", v.lost),
                ("reordered", v.reordered),
                ("misplaced", v.misplaced),
            )
            if n
        ]
        why += [f"round {r.round}: {r.error}" for r in report.rounds if r.error]
        out.append(Text(f"verdict: FAIL ({'; '.join(why)})", style="bold red"))
    return out


# ---------------------------------------------------------------------------------------------
# The load


class _Failover:
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


class _Load:
    """One writer and one reaper task per partition; the reaper awaits acknowledgments in
    send order (one request in flight per partition, so they complete in that order)."""

    def __init__(
        self,
        producer: Producer,
        topic: str,
        partitions: int,
        run_id: str,
        rate: float,
        failover: _Failover,
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


# ---------------------------------------------------------------------------------------------
# The run


def _note(note: Callable[[str], None] | None, message: str) -> None:
    if note is not None:
        note(message)


async def _ensure_topic(
    bootstrap: str,
    topic: str,
    partitions: int,
    replication_factor: int,
    notes: list[str],
) -> tuple[int, int]:
    """Create the topic if missing; returns its (partition count, replication factor)."""
    async with Admin(bootstrap) as admin:
        if topic not in await admin.list_topics(internal=True):
            await admin.create_topics(topic, partitions, replication_factor)
            return partitions, replication_factor
        (desc,) = await admin.describe_topics(topic)
    n, rf = len(desc.partitions), desc.replication_factor
    if (n, rf) != (partitions, replication_factor):
        notes.append(
            f"topic {topic} exists with {n} partitions and RF {rf}; used as it is "
            f"(asked for {partitions} and RF {replication_factor})"
        )
    return n, rf


def _healthy(info: TopicInfo | None, alive: set[int], expected_nodes: set[int]) -> bool:
    if info is None or not expected_nodes <= alive:
        return False
    return all(p.leader >= 0 and set(p.replicas) <= set(p.in_sync) for p in info.partitions)


async def _wait_healthy(producer: Producer, topic: str, nodes: set[int], timeout_s: float) -> bool:
    """Every node registered alive, every partition led and fully in sync, or False when
    ``timeout_s`` passed first."""
    meta = producer.metadata
    deadline = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(TidelogError):
            await meta.refresh()
            alive = {n.node_id for n in meta.nodes.values() if n.alive}
            if _healthy(meta.topic(topic), alive, nodes):
                return True
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(HEALTH_POLL_S)


async def _read_back(
    bootstrap: str, topic: str, start: Mapping[int, int], run_id: str
) -> tuple[list[Consumed], int]:
    """Every record of ``topic`` from ``start`` to the high watermark: this run's as
    Consumed, and the count of anything else."""
    out: list[Consumed] = []
    foreign = 0
    tps = [TopicPartition(topic, p) for p in sorted(start)]
    async with Consumer(bootstrap) as consumer:
        end = await consumer.end_offsets(tps)
        consumer.assign(tps)
        for tp in tps:
            consumer.seek(tp, start[tp.partition])
        remaining = {tp for tp in tps if start[tp.partition] < end[tp]}
        deadline = time.monotonic() + CONSUME_TIMEOUT_S
        while remaining:
            for fb in await consumer.poll_batches(timeout_ms=500):
                tp_end = end[TopicPartition(fb.topic, fb.partition)]
                for r in fb.records:
                    if r.offset >= tp_end:
                        continue
                    decoded = decode_value(r.value)
                    if decoded is None or decoded[0] != run_id or decoded[1] != fb.partition:
                        foreign += 1
                        continue
                    out.append(Consumed(fb.partition, r.offset, decoded[2]))
            for tp in list(remaining):
                if await consumer.position(tp) >= end[tp]:
                    remaining.discard(tp)
            if remaining and time.monotonic() >= deadline:
                where = [
                    f"{tp} at {await consumer.position(tp)} of {end[tp]}"
                    for tp in sorted(remaining)
                ]
                stuck = ", ".join(where)
                raise ChaosError(
                    f"could not read the topic back within {CONSUME_TIMEOUT_S:.0f} s: {stuck}; "
                    "check `tidelog cluster status`"
                )
    return out, foreign


async def run_chaos(
    directory: Path,
    *,
    rounds: int = ROUNDS_DEFAULT,
    topic: str = TOPIC_DEFAULT,
    partitions: int = PARTITIONS_DEFAULT,
    replication_factor: int = REPLICATION_FACTOR_DEFAULT,
    rate: float = RATE_DEFAULT,
    downtime_ms: int = DOWNTIME_MS_DEFAULT,
    seed: int | None = None,
    note: Callable[[str], None] | None = None,
) -> ChaosReport:
    """Run the chaos test against the local cluster in ``directory`` (module docstring)."""
    if rounds < 0:
        raise ChaosError(f"--rounds {rounds} must be >= 0")
    if partitions < 1 or replication_factor < 1:
        raise ChaosError("--partitions and --replication-factor must be >= 1")
    if rate <= 0:
        raise ChaosError(f"--rate {rate} must be > 0")
    if downtime_ms < 0:
        raise ChaosError(f"--downtime-ms {downtime_ms} must be >= 0")
    directory = directory.absolute()
    cluster = localcluster.load_cluster(directory)
    states = {n.node_id: localcluster.process_state(n.pid, n.data_dir) for n in cluster.nodes}
    down = [
        f"node {i} is {s.value}"
        for i, s in states.items()
        if s is not localcluster.ProcState.RUNNING
    ]
    if down:
        raise ChaosError(
            f"chaos needs every node of the cluster in {directory} running, but "
            f"{', '.join(down)}; `tidelog cluster start ID` brings a node back"
        )
    if len(cluster.nodes) < CLUSTER_NODES_MIN:
        raise ChaosError(
            f"chaos needs a cluster of at least {CLUSTER_NODES_MIN} nodes (3 for RF 3): "
            "`tidelog cluster up --nodes 3`"
        )
    if seed is None:
        seed = secrets.randbits(32)
    rng = random.Random(seed)
    run_id = secrets.token_hex(4)
    bootstrap = ",".join(n.address for n in cluster.nodes)
    node_ids = {n.node_id for n in cluster.nodes}
    notes: list[str] = []
    partitions, replication_factor = await _ensure_topic(
        bootstrap, topic, partitions, replication_factor, notes
    )
    async with Consumer(bootstrap) as consumer:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        start = {tp.partition: off for tp, off in (await consumer.end_offsets(tps)).items()}
    producer = Producer(
        bootstrap,
        acks="all",
        max_in_flight_per_partition=PRODUCER_IN_FLIGHT_PER_PARTITION,
        request_timeout_ms=PRODUCER_REQUEST_TIMEOUT_MS,
        retry_backoff_ms=PRODUCER_RETRY_BACKOFF_MS,
    )
    await producer.start()
    failover = _Failover()
    load = _Load(producer, topic, partitions, run_id, rate, failover)
    loop = asyncio.get_running_loop()
    began = loop.time()
    results: list[RoundResult] = []
    _note(
        note,
        f"chaos: {rounds} round(s) on {topic} ({partitions} partitions, RF "
        f"{replication_factor}), {rate:.0f} records/s, seed {seed}, run {run_id}",
    )
    load.start()
    try:
        for i in range(1, rounds + 1):
            result = await _round(
                i, rng, directory, producer, topic, node_ids, failover, downtime_ms / 1000
            )
            results.append(result)
            _note(note, _round_line(result, rounds))
            if result.error is not None:
                notes.append(f"stopped after round {i}: {result.error}")
                break
        _note(note, "stopping the writers and reading everything back")
        await load.stop()
    except BaseException:
        await load.cancel()
        await producer.stop(timeout_ms=0)
        raise
    seconds = loop.time() - began
    consumed, foreign = await _read_back(bootstrap, topic, start, run_id)
    return ChaosReport(
        topic=topic,
        partitions=partitions,
        replication_factor=replication_factor,
        run_id=run_id,
        seed=seed,
        rounds_requested=rounds,
        rounds=tuple(results),
        verdict=verdict(load.acked, consumed),
        sent=load.sent,
        failed_sends=load.failed,
        send_errors=dict(load.errors),
        foreign=foreign,
        seconds=seconds,
        notes=tuple(notes),
    )


def _round_line(r: RoundResult, rounds: int) -> str:
    if r.error is not None:
        return f"round {r.round}/{rounds}: node {r.victim}: {r.error}"
    led = f"leader of {','.join(map(str, r.led))}" if r.led else "led no partition"
    failover = "timed out" if r.timed_out else _fmt_ms(r.failover_ms)
    return (
        f"round {r.round}/{rounds}: killed node {r.victim} ({led}); failover {failover}; "
        f"back after {_fmt_ms(r.restart_ms)}"
    )


async def _round(
    number: int,
    rng: random.Random,
    directory: Path,
    producer: Producer,
    topic: str,
    node_ids: set[int],
    failover: _Failover,
    downtime_s: float,
) -> RoundResult:
    loop = asyncio.get_running_loop()
    healthy = await _wait_healthy(producer, topic, node_ids, HEALTHY_WAIT_S)
    await asyncio.sleep(SETTLE_S)
    meta = producer.metadata
    with contextlib.suppress(TidelogError):
        await meta.refresh()
    info = meta.topic(topic)
    leaders = {} if info is None else {p.partition: p.leader for p in info.partitions}
    cluster = localcluster.load_cluster(directory)
    running = [
        n.node_id
        for n in cluster.nodes
        if localcluster.process_state(n.pid, n.data_dir) is localcluster.ProcState.RUNNING
    ]
    victim, partition = choose_victim(rng, leaders, running)
    led = tuple(sorted(p for p, leader in leaders.items() if leader == victim))
    try:
        localcluster.signal_node(cluster.node(victim), signal.SIGKILL)
    except TidelogError as exc:
        return RoundResult(number, victim, partition, led, None, {}, False, None, healthy, str(exc))
    kill_s = loop.time()
    failover.arm(led, kill_s)

    async def restart() -> float:
        await asyncio.sleep(downtime_s)
        began = loop.time()
        await asyncio.to_thread(
            localcluster.start_node, directory, victim, timeout_s=RESTART_TIMEOUT_S
        )
        return (loop.time() - began) * 1000

    restarting = loop.create_task(restart(), name=f"chaos restart {victim}")
    timed_out = False
    try:
        await asyncio.wait_for(failover.done.wait(), FAILOVER_DEADLINE_S)
    except TimeoutError:
        timed_out = True
    recovered = dict(failover.recovered_ms)
    failover.disarm()
    error: str | None = None
    restart_ms: float | None = None
    try:
        restart_ms = await restarting
    except TidelogError as exc:
        error = str(exc)
    failover_ms = max(recovered.values()) if led and not timed_out else None
    return RoundResult(
        round=number,
        victim=victim,
        partition=partition,
        led=led,
        failover_ms=failover_ms,
        partition_failover_ms=recovered,
        timed_out=timed_out,
        restart_ms=restart_ms,
        healthy_before=healthy,
        error=error,
    )
