"""Consumer groups on a real 3-node cluster (node processes on 127.0.0.1, free ports, temporary
directories, all killed at the end), with a producer writing all along.

Three members share 6 partitions; a 4th (its own process) joins; one member stops gracefully;
the 4th is killed with SIGKILL; a static member restarts with the same group_instance_id and
gets its partitions back. Every member's ownership intervals (its callbacks; a killed member's
end at its kill) never overlap for any partition, every member read a partition only while it
owned it, and every acknowledged record was processed (at least once). A second group reads
everything on its own. The CLI's group verbs work against the live group.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import AsyncIterator, Iterator

import pytest

from tests.support.group_ledger import InProcessMember, Ledger, ProcessMember, until
from tests.support.nodeproc import Cluster, Node, spawn_cluster
from tidelog.client import Admin, Consumer, Producer, TopicPartition

pytestmark = [pytest.mark.integration, pytest.mark.timeout(400)]

TOPIC = "orders"
PARTITIONS = 6
NODES = (1, 2, 3)
GROUP = "billing"
#: Short sessions so the kill -9 step takes seconds (the node bounds what it accepts).
SESSION_MS = 6_000
ALL = {TopicPartition(TOPIC, p) for p in range(PARTITIONS)}


@pytest.fixture(scope="module")
def procs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[int, Node]]:
    nodes = spawn_cluster(tmp_path_factory.mktemp("groups"), NODES)
    try:
        yield nodes
    finally:
        for n in nodes.values():
            n.kill()


@pytest.fixture
async def bootstrap(procs: dict[int, Node]) -> AsyncIterator[str]:
    c = Cluster(procs, TOPIC)
    await c.wait_all_alive()
    async with Admin(c.bootstrap) as admin:
        if TOPIC not in await admin.list_topics():
            await admin.create_topics(TOPIC, PARTITIONS, replication_factor=3)
    yield c.bootstrap
    await c.close()


class Load:
    """An acks=all producer writing to every partition until stopped; what was acknowledged."""

    def __init__(self, bootstrap: str) -> None:
        self.bootstrap = bootstrap
        self.acked: set[tuple[TopicPartition, int]] = set()
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        async with Producer(self.bootstrap, acks="all") as p:
            i = 0
            while not self._stop.is_set():
                sends = [
                    p.send_many(TOPIC, [b"%d:%d" % (part, i + k) for k in range(5)], partition=part)
                    for part in range(PARTITIONS)
                ]
                for mds in await asyncio.gather(*sends):
                    for md in mds:
                        for k in range(md.record_count):
                            self.acked.add(
                                (TopicPartition(TOPIC, md.partition), md.base_offset + k)
                            )
                i += 5
                await asyncio.sleep(0.05)

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task


async def cli(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tidelog",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "COLUMNS": "200"},
    )
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_members_come_and_go_and_no_partition_is_ever_owned_twice(bootstrap: str) -> None:
    ledger = Ledger()
    options = {"group_id": GROUP, "session_timeout_ms": SESSION_MS, "auto_commit_interval_ms": 500}
    a = InProcessMember(ledger, "a", bootstrap, **options)
    b = InProcessMember(ledger, "b", bootstrap, **options)
    c = InProcessMember(ledger, "c", bootstrap, group_instance_id="static-c", **options)
    load = Load(bootstrap)
    load.start()
    for m in (a, b, c):
        await m.start([TOPIC])

    def owned(*names: str) -> list[set[TopicPartition]]:
        return [ledger.owned(n) for n in names]

    def split(names: tuple[str, ...], sizes: list[int]) -> bool:
        got = owned(*names)
        return sorted(len(s) for s in got) == sorted(sizes) and set().union(*got) == ALL

    await until("a, b, c own 2 each", lambda: split(("a", "b", "c"), [2, 2, 2]), 60)

    # A 4th member, in its own process.
    d = ProcessMember(ledger, "d", bootstrap, group=GROUP, session_timeout_ms=SESSION_MS)
    await d.start([TOPIC])
    await until("4 members share 6", lambda: split(("a", "b", "c", "d"), [1, 1, 2, 2]), 60)
    ledger.check_exclusive()

    # The CLI sees the live group; a reset is refused while it has members.
    code, out, err = await cli("group", "describe", GROUP, "--json", "-b", bootstrap)
    assert code == 0, err
    desc = json.loads(out)
    assert len(desc["members"]) == 4
    assert {(p["topic"], p["partition"]) for p in desc["partitions"]} == {
        (TOPIC, p) for p in range(PARTITIONS)
    }
    code, out, err = await cli("group", "list", "--json", "-b", bootstrap)
    assert code == 0, err
    assert {"group_id": GROUP, "members": 4} in [
        {k: g[k] for k in ("group_id", "members")} for g in json.loads(out)
    ]
    code, _, err = await cli(
        "group", "reset-offsets", GROUP, "--topic", TOPIC, "--to-earliest", "-b", bootstrap
    )
    assert code == 1 and "active member" in err and err.strip().count("\n") == 0

    # b leaves gracefully: its partitions move to the others at once.
    await b.stop()
    await until("3 members share 6 after b left", lambda: split(("a", "c", "d"), [2, 2, 2]), 30)

    # d is killed: after the session timeout its partitions move.
    killed_at = await d.kill()
    await until(
        "a and c share 6 after d died", lambda: split(("a", "c"), [3, 3]), SESSION_MS / 1000 + 30
    )
    taken_at = max(e.t for e in ledger.events if e.kind == "assigned")
    assert taken_at - killed_at >= SESSION_MS / 1000 * 0.5  # not before the session could end

    # c restarts with the same instance id: it gets the same partitions back, nobody else did.
    c_before = ledger.owned("c")
    await c.stop()
    c2 = InProcessMember(ledger, "c2", bootstrap, group_instance_id="static-c", **options)
    await c2.start([TOPIC])
    await until("c2 owns c's partitions", lambda: ledger.owned("c2") == c_before, 30)
    assert ledger.owned("a") == ALL - c_before

    # Everything acknowledged was processed by someone.
    await load.stop()
    await until(
        "every acknowledged record was processed",
        lambda: load.acked <= ledger.processed(),
        60,
    )
    assert len(load.acked) > 500
    ledger.check_exclusive()
    ledger.check_reads_within_ownership()

    # A second group reads everything on its own.
    audit: set[tuple[TopicPartition, int]] = set()
    async with Consumer(bootstrap, group_id="audit", auto_offset_reset="earliest") as other:
        other.subscribe([TOPIC])
        async with asyncio.timeout(60):
            while not load.acked <= audit:
                for r in await other.poll(timeout_ms=200):
                    audit.add((TopicPartition(r.topic, r.partition), r.offset))

    for m in (a, c2):
        await m.stop()
    ledger.check_exclusive()

    # The static member left with epoch -2: the group keeps it (and its partitions, for a
    # replacement) until its session expires; then the group is empty.
    async with Admin(bootstrap) as admin:
        desc0 = await admin.describe_group(GROUP)
        assert [(m.group_instance_id, m.member_epoch) for m in desc0.members] == [("static-c", -2)]

        async def empty() -> bool:
            return not (await admin.describe_group(GROUP)).members

        await until("the static member's session expired", empty, SESSION_MS / 1000 + 20)

    # An empty group's offsets can be reset (dry run first), then the group deleted.
    code, out, err = await cli("group", "describe", GROUP, "--json", "-b", bootstrap)
    assert code == 0, err
    desc = json.loads(out)
    assert desc["members"] == []
    assert all(p["lag"] == 0 for p in desc["partitions"]), desc["partitions"]
    code, out, err = await cli(
        "group",
        "reset-offsets",
        GROUP,
        "--topic",
        f"{TOPIC}:0",
        "--to-earliest",
        "--json",
        "-b",
        bootstrap,
    )
    assert code == 0, err
    plan = json.loads(out)
    assert plan["executed"] is False and plan["partitions"][0]["new"] == 0
    code, out, err = await cli(
        "group",
        "reset-offsets",
        GROUP,
        "--topic",
        f"{TOPIC}:0",
        "--to-earliest",
        "--execute",
        "-b",
        bootstrap,
    )
    assert code == 0, err
    async with Admin(bootstrap) as admin:
        assert (await admin.list_group_offsets(GROUP))[TopicPartition(TOPIC, 0)] == 0
    code, _, err = await cli("group", "delete", GROUP, "-b", bootstrap)
    assert code == 0, err
    code, _, err = await cli("group", "describe", GROUP, "-b", bootstrap)
    assert code == 1 and err.startswith("error:") and err.strip().count("\n") == 0


async def test_consume_group_from_the_cli_commits_what_it_printed(bootstrap: str) -> None:
    async with Producer(bootstrap) as p:
        for part in range(PARTITIONS):
            await p.send_many(TOPIC, [b"x"] * 10, partition=part)
    async with Admin(bootstrap) as admin:
        ends = {tp: 0 for tp in ALL}
        for d in await admin.describe_topics(TOPIC):
            for pd in d.partitions:
                ends[TopicPartition(TOPIC, pd.partition)] = pd.high_watermark
    total = sum(ends.values())
    start = time.monotonic()
    code, out, err = await cli(
        "consume",
        TOPIC,
        "--group",
        "cli-readers",
        "--from-beginning",
        "--until-end",
        "-b",
        bootstrap,
    )
    assert code == 0, err
    assert len(out.splitlines()) == total
    assert time.monotonic() - start < 60
    async with Admin(bootstrap) as admin:
        assert await admin.list_group_offsets("cli-readers") == ends
    # Read again as the same group: nothing new.
    code, out, err = await cli(
        "consume", TOPIC, "--group", "cli-readers", "--until-end", "-b", bootstrap
    )
    assert code == 0, err
    assert out == ""
