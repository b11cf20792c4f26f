"""``tidelog chaos``: kill nodes of the local cluster under an acks=all load, then check that
no acknowledged record was lost, duplicated or reordered, and how long each failover took.

The load: one writer per partition sends records to that partition at a steady rate
(``rate`` records/s over all partitions); each value names the run, the partition and the
record's sequence number within the partition (``tidelog-chaos <run> <partition> <seq>``).
The producer is the default one: idempotent, with up to 5 requests in flight per
partition, so every batch is stored once and in send order whatever the retries. With
``idempotence=False`` (``--no-idempotence``) it is the old producer: one request in flight
per partition (more would let a retried batch land after a later batch that succeeded
first, a reordering the client causes, not the cluster), and a retry after a lost answer
may store a batch twice. Every acknowledgment is recorded as (partition, seq, offset).

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
is in the log. Lost, reordered or misplaced acknowledged records fail the run, and so do
duplicates (a retry of a batch whose first attempt was committed after all) with the
idempotent producer; without it they are reported only.

This module runs the rounds; the load is :mod:`~tidelog.ops.chaos_load`, the values and the
checker :mod:`~tidelog.ops.chaos_verdict`, the report :mod:`~tidelog.ops.chaos_report`.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import secrets
import signal
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Final

from tidelog.client import Admin, Consumer, Producer, TopicPartition
from tidelog.client.metadata import TopicInfo
from tidelog.errors import TidelogError
from tidelog.ops import localcluster
from tidelog.ops.chaos_load import Failover, Load
from tidelog.ops.chaos_report import (
    ChaosReport,
    RoundResult,
    fmt_ms,
    render_report,
)
from tidelog.ops.chaos_verdict import (
    Acked,
    Consumed,
    Verdict,
    choose_victim,
    decode_value,
    encode_value,
    verdict,
)

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
#: Requests in flight per partition: the idempotent producer's default, and one without
#: idempotence, which keeps retries in order (module docstring).
PRODUCER_IN_FLIGHT_IDEMPOTENT: Final = 5
PRODUCER_IN_FLIGHT_NOT_IDEMPOTENT: Final = 1
PRODUCER_REQUEST_TIMEOUT_MS: Final = 10_000
PRODUCER_RETRY_BACKOFF_MS: Final = 50
HEALTH_POLL_S: Final = 0.2
#: With fewer nodes, killing one stops the whole cluster: nothing to fail over to.
CLUSTER_NODES_MIN = 2


class ChaosError(TidelogError):
    """The chaos run could not start or finish (the message says why and what to do)."""

    reason = "CHAOS"


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
    idempotence: bool = True,
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
    in_flight = PRODUCER_IN_FLIGHT_IDEMPOTENT if idempotence else PRODUCER_IN_FLIGHT_NOT_IDEMPOTENT
    producer = Producer(
        bootstrap,
        acks="all",
        enable_idempotence=idempotence,
        max_in_flight_per_partition=in_flight,
        request_timeout_ms=PRODUCER_REQUEST_TIMEOUT_MS,
        retry_backoff_ms=PRODUCER_RETRY_BACKOFF_MS,
    )
    await producer.start()
    failover = Failover()
    load = Load(producer, topic, partitions, run_id, rate, failover)
    loop = asyncio.get_running_loop()
    began = loop.time()
    results: list[RoundResult] = []
    _note(
        note,
        f"chaos: {rounds} round(s) on {topic} ({partitions} partitions, RF "
        f"{replication_factor}), {rate:.0f} records/s, "
        + ("idempotent producer" if idempotence else "producer without idempotence")
        + f" ({in_flight} in flight per partition), seed {seed}, run {run_id}",
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
        verdict=verdict(load.acked, consumed, duplicates_allowed=not idempotence),
        sent=load.sent,
        failed_sends=load.failed,
        send_errors=dict(load.errors),
        foreign=foreign,
        seconds=seconds,
        notes=tuple(notes),
        idempotence=idempotence,
        max_in_flight=in_flight,
    )


def _round_line(r: RoundResult, rounds: int) -> str:
    if r.error is not None:
        return f"round {r.round}/{rounds}: node {r.victim}: {r.error}"
    led = f"leader of {','.join(map(str, r.led))}" if r.led else "led no partition"
    failover = "timed out" if r.timed_out else fmt_ms(r.failover_ms)
    return (
        f"round {r.round}/{rounds}: killed node {r.victim} ({led}); failover {failover}; "
        f"back after {fmt_ms(r.restart_ms)}"
    )


async def _round(
    number: int,
    rng: random.Random,
    directory: Path,
    producer: Producer,
    topic: str,
    node_ids: set[int],
    failover: Failover,
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
