"""Consumer-group figures (issue 13), against a running cluster or a 3-node one it starts.

1. graceful leave: from a member's close() to every one of its partitions being read by
   another member (a producer writes all along);
2. kill -9: from SIGKILL of a member (its own process) to every one of its partitions being
   read by another, and that minus the session timeout;
3. stickiness: partitions that change owner when a 10th member joins 9 on 60 partitions;
4. throughput: records/s read from the start of a filled 6-partition topic by a group of 3
   (from their subscribe: the join and its rebalances count; the time until each owned 2 is
   reported too), and by 3 manual-assign consumers (2 partitions each), in the same run.

    .venv/bin/python bench/group_bench.py [--bootstrap HOST:PORT] [--records 200000] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

# The observed members live with the tests (tests/support/group_ledger.py): run from anywhere.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support.group_ledger import (
    InProcessMember,
    Ledger,
    ProcessMember,
    until,
)
from tidelog.client import Admin, Consumer, Producer, TopicPartition

SESSION_MS = 6_000


async def running_load(bootstrap: str, topic: str, partitions: int, stop: asyncio.Event) -> None:
    async with Producer(bootstrap, acks="all") as p:
        while not stop.is_set():
            await asyncio.gather(
                *(p.send_many(topic, [b"x"] * 5, partition=k) for k in range(partitions))
            )
            await asyncio.sleep(0.02)


def first_read_after(
    ledger: Ledger, tps: set[TopicPartition], after: float, not_by: str
) -> float | None:
    """When the last of ``tps`` was first read by another member after ``after``."""
    firsts: dict[TopicPartition, float] = {}
    for t, member, tp, _, _ in ledger.batches:
        if tp in tps and member != not_by and t >= after:
            firsts[tp] = min(firsts.get(tp, t), t)
    if set(firsts) != tps:
        return None
    return max(firsts.values())


async def handover(bootstrap: str) -> dict[str, float]:
    topic = f"gb-move-{uuid.uuid4().hex[:6]}"
    async with Admin(bootstrap) as admin:
        await admin.create_topics(topic, 6, replication_factor=3)
    stop = asyncio.Event()
    load = asyncio.get_running_loop().create_task(running_load(bootstrap, topic, 6, stop))
    ledger = Ledger()
    group = f"gb-{uuid.uuid4().hex[:6]}"
    opts: dict[str, Any] = {"group_id": group, "session_timeout_ms": SESSION_MS}
    a, b, c = (InProcessMember(ledger, n, bootstrap, **opts) for n in "abc")
    d = ProcessMember(ledger, "d", bootstrap, group=group, session_timeout_ms=SESSION_MS)
    for m in (a, b, c):
        await m.start([topic])
    await d.start([topic])

    def stable(names: str) -> bool:
        owned = [ledger.owned(n) for n in names]
        return sum(map(len, owned)) == 6 and all(owned)

    await until("4 members own 6", lambda: stable("abcd"), 60)
    await asyncio.sleep(1)
    gone = ledger.owned("b")
    t0 = time.time()
    await b.stop()
    await until(
        "b's partitions read elsewhere",
        lambda: first_read_after(ledger, gone, t0, "b") is not None,
        30,
    )
    leave_s = (first_read_after(ledger, gone, t0, "b") or t0) - t0
    await asyncio.sleep(1)
    gone = ledger.owned("d")
    t0 = await d.kill()
    await until(
        "d's partitions read elsewhere",
        lambda: first_read_after(ledger, gone, t0, "d") is not None,
        60 + SESSION_MS / 1000,
    )
    kill_s = (first_read_after(ledger, gone, t0, "d") or t0) - t0
    ledger.check_exclusive()
    for m in (a, c):
        await m.stop()
    stop.set()
    await load
    return {
        "graceful_leave_to_consumed_s": round(leave_s, 3),
        "kill9_to_consumed_s": round(kill_s, 3),
        "session_timeout_s": SESSION_MS / 1000,
        "kill9_beyond_session_s": round(kill_s - SESSION_MS / 1000, 3),
    }


async def stickiness(bootstrap: str) -> dict[str, int]:
    topic = f"gb-sticky-{uuid.uuid4().hex[:6]}"
    async with Admin(bootstrap) as admin:
        await admin.create_topics(topic, 60, replication_factor=1)
    ledger = Ledger()
    group = f"gb-{uuid.uuid4().hex[:6]}"
    names = [f"m{i}" for i in range(10)]
    members = [InProcessMember(ledger, n, bootstrap, group_id=group) for n in names]
    for m in members[:9]:
        await m.start([topic])

    def owners() -> dict[TopicPartition, str]:
        return {tp: n for n in names for tp in ledger.owned(n)}

    def balanced(k: int) -> bool:
        sizes = [len(ledger.owned(n)) for n in names[:k]]
        return sum(sizes) == 60 and max(sizes) - min(sizes) <= 1

    await until("9 members balanced", lambda: balanced(9), 120)
    before = owners()
    await members[9].start([topic])
    await until("10 members balanced", lambda: balanced(10), 120)
    after = owners()
    moved = sum(1 for tp, n in after.items() if before.get(tp) != n)
    ledger.check_exclusive()
    for m in members:
        await m.stop()
    return {"partitions": 60, "members_before": 9, "moved_when_10th_joined": moved}


async def throughput(bootstrap: str, records: int) -> dict[str, float]:
    topic = f"gb-tp-{uuid.uuid4().hex[:6]}"
    async with Admin(bootstrap) as admin:
        await admin.create_topics(topic, 6, replication_factor=3)
    per = records // 6
    async with Producer(bootstrap, acks="all", linger_ms=5) as p:
        value = b"v" * 100
        for k in range(6):
            for start in range(0, per, 10_000):
                await p.send_many(topic, [value] * min(10_000, per - start), partition=k)
    total = per * 6

    async def read_all(consumers: list[Consumer]) -> float:
        got = [0]

        async def one(c: Consumer) -> None:
            while got[0] < total:
                batches = await c.poll_batches(timeout_ms=100)
                got[0] += sum(len(b.records) for b in batches)  # no await between read and add

        t0 = time.monotonic()
        await asyncio.wait_for(asyncio.gather(*(one(c) for c in consumers)), 600)
        return total / (time.monotonic() - t0)

    gid = f"gb-{uuid.uuid4().hex[:6]}"
    group = [Consumer(bootstrap, group_id=gid, auto_offset_reset="earliest") for _ in range(3)]
    for c in group:
        await c.start()
    t_join = time.monotonic()
    for c in group:
        c.subscribe([topic])
    balanced: list[float] = []

    async def watch_balance() -> None:
        while not all(len(c.assignment()) == 2 for c in group):
            await asyncio.sleep(0.01)
        balanced.append(time.monotonic() - t_join)

    watcher = asyncio.get_running_loop().create_task(watch_balance())
    group_rate = await read_all(group)
    watcher.cancel()
    for c in group:
        await c.stop()
    manual = [Consumer(bootstrap, auto_offset_reset="earliest") for _ in range(3)]
    for i, c in enumerate(manual):
        await c.start()
        c.assign([TopicPartition(topic, 2 * i), TopicPartition(topic, 2 * i + 1)])
    manual_rate = await read_all(manual)
    for c in manual:
        await c.stop()
    return {
        "records": total,
        # From subscribe, so the join and its rebalances are included (a short run shows them).
        "group_of_3_records_per_s": round(group_rate),
        "group_of_3_balanced_after_s": round(balanced[0], 3) if balanced else -1,
        "manual_3_records_per_s": round(manual_rate),
    }


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    nodes = None
    bootstrap = args.bootstrap
    if bootstrap is None:
        from tests.support.nodeproc import Cluster, spawn_cluster

        base = Path(tempfile.mkdtemp(prefix="group-bench-"))
        nodes = spawn_cluster(base, (1, 2, 3))
        cluster = Cluster(nodes, "")
        await cluster.wait_all_alive()
        bootstrap = cluster.bootstrap
        await cluster.close()
    try:
        out: dict[str, Any] = {}
        out.update(await handover(bootstrap))
        out.update(await stickiness(bootstrap))
        out.update(await throughput(bootstrap, args.records))
        return out
    finally:
        if nodes is not None:
            for n in nodes.values():
                n.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bootstrap", default=None, help="a running cluster (else 3 nodes)")
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = asyncio.run(main_async(args))
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:36} {v}")


if __name__ == "__main__":
    main()
