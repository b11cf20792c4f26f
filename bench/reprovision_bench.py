"""Reprovisioning figure (issue 11): for a node holding ``--data-mb`` MiB of partition data,
the time from its kill -9 to every partition having three live in-sync replicas again, and a
throughput producer's rate while the replicas are copied, relative to before.

    python bench/reprovision_bench.py --data-mb 1024 --reprovision-ms 5000   # the figure
    python bench/reprovision_bench.py --data-mb 50                           # does it work

Starts 4 real nodes (voters 1-3, node 4 joined with --join; node-to-node TLS) in a temporary
directory, one RF=3 topic of ``--partitions`` partitions, and writes ``--data-mb`` MiB to the
partitions the node to be killed (neither the controller nor node 1) holds. Then a live producer
runs: acks=all, ``send_many`` of ``--chunk`` records of ``--record-bytes`` to each partition
in turn with ``--window`` calls in flight: as fast as it can (a saturating load, not one
request at a time), or at ``--live-mb-s`` MiB/s on a fixed schedule (a live service's load,
which a copy must not starve: on a saturated 2-core machine any copy takes from the producer
what it uses of the CPU, so the two loads answer different questions). After
``--baseline-s`` seconds the node is killed; the cluster marks it dead after --node-dead-ms
(2 s in the test clusters), rebuilds its replicas on the live nodes ``replica.reprovision.ms``
later, copying them at ``replica.recovery.bytes.per.second`` (``--rate-mb``; unset: the nodes'
default of 40 MiB/s; the part of a replica beyond ``replica.recovery.lag.bytes``, ``--lag-mb``,
default 64 MiB, goes at that rate), and the run ends when the replication factor is restored.

Prints the figures, then one JSON object. "During the copy" is from the first move the
controller starts (a partition with a target) to the replication factor restored.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.support.healing import ok, spawn_healing_cluster, tidelog
from tests.support.nodeproc import Cluster, Node, until
from tidelog.client import Admin, Producer
from tidelog.errors import TidelogError

MIB = 1024 * 1024
TOPIC = "reprovision"


class ThroughputLoad:
    """An acks=all producer keeping up to ``window`` ``send_many`` calls in flight, each of
    ``chunk`` records to the next partition; acknowledged bytes are kept with their time.
    With ``rate_mib_s`` the calls go on a fixed schedule (that many MiB/s asked, a live
    service's load) instead of as fast as the window allows (a saturating load)."""

    def __init__(
        self,
        bootstrap: str,
        partitions: int,
        record_bytes: int,
        chunk: int,
        window: int,
        rate_mib_s: float | None = None,
    ) -> None:
        self.producer = Producer(
            bootstrap,
            acks="all",
            linger_ms=5,
            request_timeout_ms=10_000,
            delivery_timeout_ms=300_000,
            retries=1_000_000,
            retry_backoff_ms=50,
        )
        self.partitions = partitions
        self.values = [os.urandom(record_bytes) for _ in range(chunk)]
        self.bytes = record_bytes * chunk
        self.window = window
        self.rate_mib_s = rate_mib_s
        self.acked: list[tuple[float, int]] = []
        self.errors: list[str] = []
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.producer.start()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        room = asyncio.Semaphore(self.window)
        pending: set[asyncio.Task[None]] = set()
        i = 0
        began = time.monotonic()
        while not self._stop.is_set():
            if self.rate_mib_s:
                due = began + i * self.bytes / (self.rate_mib_s * MIB)
                if (delay := due - time.monotonic()) > 0:
                    await asyncio.sleep(delay)
                    continue
            await room.acquire()
            fut = self.producer.send_many(TOPIC, self.values, partition=i % self.partitions)
            i += 1
            task = asyncio.get_running_loop().create_task(self._one(fut, room))
            pending.add(task)
            task.add_done_callback(pending.discard)
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)

    async def _one(self, fut: object, room: asyncio.Semaphore) -> None:
        try:
            await fut  # type: ignore[misc]
            self.acked.append((time.monotonic(), self.bytes))
        except TidelogError as err:
            self.errors.append(str(err)[:200])
        finally:
            room.release()

    def rate(self, t0: float, t1: float) -> float:
        """Acknowledged MiB/s in [t0, t1)."""
        n = sum(b for t, b in self.acked if t0 <= t < t1)
        return n / max(t1 - t0, 1e-9) / MIB

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task
        await self.producer.stop()


async def preload(bootstrap: str, partitions: list[int], mib: float) -> None:
    """About ``mib`` MiB of acks=all records into ``partitions``, spread evenly."""
    values = [os.urandom(1000) for _ in range(1000)]
    calls = int(mib * MIB // (1000 * 1000)) + 1
    async with Producer(bootstrap, acks="all", linger_ms=5) as producer:
        futs = []
        for i in range(calls):
            part = partitions[i % len(partitions)]
            futs.append(producer.send_many(TOPIC, values, partition=part))
            if len(futs) >= 8:
                await futs.pop(0)
        for f in futs:
            await f


async def replicas_of(bootstrap: str, node: int) -> list[int]:
    """The partitions of the topic ``node`` holds a replica of."""
    async with Admin(bootstrap) as admin:
        [d] = await admin.describe_topics([TOPIC])
    return [p.partition for p in d.partitions if node in p.replicas]


async def held_by(bootstrap: str, node: int) -> int:
    """Bytes of the partitions ``node`` holds a replica of (the leaders' log sizes, as the
    cluster reports them: a figure to print, never what the fill stops on, since a
    description that could not reach a leader reports 0 for its partitions)."""
    async with Admin(bootstrap) as admin:
        [d] = await admin.describe_topics([TOPIC])
    return sum(p.size_bytes for p in d.partitions if node in p.replicas)


def recovery_sent(node: Node) -> dict[str, float]:
    url = f"http://127.0.0.1:{node.metrics_port}/metrics"
    out = {"stream": 0.0, "append": 0.0}
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            text = resp.read().decode()
    except OSError:
        return out
    for line in text.splitlines():
        for path in out:
            if line.startswith(f'tidelog_replica_recovery_sent_bytes_total{{path="{path}"}}'):
                out[path] += float(line.rsplit(" ", 1)[1])
    return out


async def run(args: argparse.Namespace, base: Path) -> dict[str, object]:
    nodes = spawn_healing_cluster(base, 4)
    try:
        c = Cluster(nodes, TOPIC)
        await c.wait_all_alive(120)
        b = c.bootstrap
        async with Admin(b) as admin:
            await admin.create_topics(TOPIC, args.partitions, replication_factor=3)
            controller = (await admin.describe_cluster()).controller_id
        victim = next(i for i in (2, 3, 4) if i != controller)

        partitions: int = args.partitions

        async def led() -> bool:
            return len(await c.leaders()) == partitions

        await until("every partition has a leader", led, 60)
        t0 = time.monotonic()
        # Fill the victim's partitions with --data-mb MiB, counted by what was acknowledged
        # (the fill once read 0 from a description that missed a leader under load and
        # wrote 30 GiB, until the disk was full).
        await preload(b, await replicas_of(b, victim), args.data_mb)
        held = await held_by(b, victim)
        preload_s = time.monotonic() - t0
        settings = [f"replica.reprovision.ms={args.reprovision_ms}"]
        if args.rate_mb is not None:
            settings.append(f"replica.recovery.bytes.per.second={int(args.rate_mb * MIB)}")
        if args.lag_mb is not None:
            settings.append(f"replica.recovery.lag.bytes={int(args.lag_mb * MIB)}")
        ok(await asyncio.to_thread(tidelog, b, "cluster", "config", "set", *settings))
        load = ThroughputLoad(
            b, args.partitions, args.record_bytes, args.chunk, args.window, args.live_mb_s
        )
        await load.start()
        await asyncio.sleep(2.0)  # warm up
        b0 = time.monotonic()
        await asyncio.sleep(args.baseline_s)
        held_at_kill = await held_by(b, victim)  # the live producer added to it
        killed = time.monotonic()
        nodes[victim].kill()
        live = {i: n for i, n in nodes.items() if i != victim}
        c2 = Cluster(live, TOPIC)
        copy_started: list[float] = []

        async def restored() -> bool:
            try:
                async with Admin(c2.bootstrap) as admin:
                    [d] = await admin.describe_topics([TOPIC])
            except TidelogError:
                return False
            if not copy_started and any(p.target for p in d.partitions):
                copy_started.append(time.monotonic())
            return all(
                not p.target
                and victim not in p.replicas
                and len(p.replicas) == 3
                and set(p.in_sync) == set(p.replicas)
                for p in d.partitions
            )

        await until("replication factor restored", restored, args.timeout_s)
        done = time.monotonic()
        await load.stop()
        await c2.close()
        await c.close()
        start = copy_started[0] if copy_started else killed
        before = load.rate(b0, killed)
        during = load.rate(start, done)
        sent = {"stream": 0.0, "append": 0.0}
        for n in live.values():
            for k, v in recovery_sent(n).items():
                sent[k] += v
        return {
            "victim_node": victim,
            "victim_data_mib": round(held / MIB, 1),
            "victim_data_mib_at_kill": round(held_at_kill / MIB, 1),
            "partitions": args.partitions,
            "preload_s": round(preload_s, 1),
            "reprovision_ms": args.reprovision_ms,
            "recovery_rate_mib_s": args.rate_mb if args.rate_mb is not None else "node default",
            "recovery_lag_mib": args.lag_mb if args.lag_mb is not None else 64,
            "kill_to_copy_start_s": round(start - killed, 1),
            "copy_s": round(done - start, 1),
            "kill_to_rf_restored_s": round(done - killed, 1),
            "producer_mib_s_asked": args.live_mb_s if args.live_mb_s else "as fast as it can",
            "producer_mib_s_before": round(before, 2),
            "producer_mib_s_during_copy": round(during, 2),
            "during_over_before": round(during / before, 2) if before else None,
            "producer_errors": len(load.errors),
            "producer_first_error": load.errors[0] if load.errors else None,
            "recovery_sent_mib": {k: round(v / MIB, 1) for k, v in sent.items()},
        }
    finally:
        for n in nodes.values():
            n.kill()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--data-mb", type=int, default=100, help="MiB of partition data the killed node holds"
    )
    ap.add_argument("--reprovision-ms", type=int, default=5000)
    ap.add_argument(
        "--rate-mb",
        type=float,
        default=None,
        help="replica.recovery.bytes.per.second in MiB/s (default: the nodes' own, 100)",
    )
    ap.add_argument(
        "--lag-mb",
        type=float,
        default=None,
        help="replica.recovery.lag.bytes in MiB: a replica lacking more catches up at the "
        "recovery rate (default 64)",
    )
    ap.add_argument("--partitions", type=int, default=6)
    ap.add_argument("--record-bytes", type=int, default=1000)
    ap.add_argument("--chunk", type=int, default=200, help="records per send_many call")
    ap.add_argument("--window", type=int, default=16, help="send_many calls in flight")
    ap.add_argument(
        "--live-mb-s",
        type=float,
        default=None,
        help="the live producer's fixed rate in MiB/s (default: as fast as it can)",
    )
    ap.add_argument("--baseline-s", type=float, default=10.0)
    ap.add_argument("--timeout-s", type=float, default=3600.0)
    ap.add_argument("--dir", type=Path, default=None, help="where the nodes' data goes")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        result = asyncio.run(run(args, Path(tmp)))
    print(
        f"node {result['victim_node']} held {result['victim_data_mib']} MiB "
        f"({result['victim_data_mib_at_kill']} MiB at the kill, with the live producer's); "
        f"replica.reprovision.ms={result['reprovision_ms']}, recovery rate "
        f"{result['recovery_rate_mib_s']} MiB/s"
    )
    print(
        f"kill -> replication factor restored: {result['kill_to_rf_restored_s']} s "
        f"(copy started after {result['kill_to_copy_start_s']} s, copied in "
        f"{result['copy_s']} s)"
    )
    print(
        f"live producer ({result['producer_mib_s_asked']} MiB/s asked): "
        f"{result['producer_mib_s_before']} MiB/s before, "
        f"{result['producer_mib_s_during_copy']} MiB/s during the copy = "
        f"{result['during_over_before']} of before (target >= 0.70)"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
