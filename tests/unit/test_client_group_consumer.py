"""Consumer(group_id=...) end to end against an in-process fake node serving the Broker and
Group services (tests/unit/group_fakes.py): members split the partitions, a joining member
gets partitions only after their previous owner revoked them, offsets committed on close are
where the next member starts, commits of partitions not owned fail at once, and the CLI's
group verbs work against it."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from typing import Any

import pytest

from tests.unit.group_fakes import FakeGroupCluster
from tidelog.client import Consumer, PartitionRevoked, Producer, SyncConsumer, TopicPartition
from tidelog.errors import InvalidSubscription, TidelogError

pytestmark = pytest.mark.timeout(60)


async def produce(address: str, topic: str, partitions: int, per_partition: int) -> None:
    async with Producer(address) as p:
        for part in range(partitions):
            await p.send_many(
                topic, [b"%d-%d" % (part, i) for i in range(per_partition)], partition=part
            )


class Recorder:
    """on_assigned / on_revoked / on_lost of one member, with times, into a shared log."""

    def __init__(self, name: str, log: list[tuple[float, str, str, list[TopicPartition]]]) -> None:
        self.name = name
        self.log = log

    def cb(self, kind: str) -> Any:
        def record(tps: list[TopicPartition]) -> None:
            self.log.append((time.monotonic(), self.name, kind, tps))

        return record

    def callbacks(self) -> dict[str, Any]:
        return {k: self.cb(k) for k in ("on_assigned", "on_revoked", "on_lost")}


def check_exclusive(log: list[tuple[float, str, str, list[TopicPartition]]]) -> None:
    """Replaying the callbacks, no partition is held by two members at once."""
    holder: dict[TopicPartition, str] = {}
    for _, name, kind, tps in sorted(log, key=lambda e: e[0]):
        for tp in tps:
            if kind == "on_assigned":
                assert tp not in holder, f"{tp} given to {name} while {holder.get(tp)} holds it"
                holder[tp] = name
            else:
                assert holder.get(tp) == name
                del holder[tp]


async def drain(c: Consumer, into: list[bytes], until: Any, timeout_s: float = 20) -> None:
    async with asyncio.timeout(timeout_s):
        while not until():
            into.extend(r.value or b"" for r in await c.poll(timeout_ms=50))


async def test_members_split_the_partitions_and_hand_them_over_revoke_first() -> None:
    async with FakeGroupCluster({"t": 4}) as (broker, groups):
        await produce(broker.address, "t", 4, 25)
        log: list[tuple[float, str, str, list[TopicPartition]]] = []
        options: dict[str, Any] = {
            "group_id": "g",
            "auto_offset_reset": "earliest",
            "retry_backoff_ms": 10,
        }
        got_a: list[bytes] = []
        got_b: list[bytes] = []
        async with Consumer(broker.address, **options) as a:
            a.subscribe(["t"], **Recorder("a", log).callbacks())
            await drain(a, got_a, lambda: len(got_a) >= 100)
            assert len(a.assignment()) == 4 and a.has_assignment
            await a.commit()
            async with Consumer(broker.address, **options) as b:
                b.subscribe("t", **Recorder("b", log).callbacks())

                def split() -> bool:
                    return len(a.assignment()) == 2 and len(b.assignment()) == 2

                async with asyncio.timeout(20):
                    while not split():
                        got_a.extend(r.value or b"" for r in await a.poll(timeout_ms=20))
                        got_b.extend(r.value or b"" for r in await b.poll(timeout_ms=20))
                assert set(a.assignment()).isdisjoint(b.assignment())
                # b starts where a committed: nothing is read twice.
                assert got_b == []
                await produce(broker.address, "t", 4, 5)
                async with asyncio.timeout(20):
                    while len(got_a) + len(got_b) < 120:
                        got_a.extend(r.value or b"" for r in await a.poll(timeout_ms=20))
                        got_b.extend(r.value or b"" for r in await b.poll(timeout_ms=20))
                moved = [tps for _, n, k, tps in log if n == "a" and k == "on_revoked"]
                assert moved and len(moved[0]) == 2
                check_exclusive(log)
        assert sorted(got_a + got_b) == sorted(
            [b"%d-%d" % (p, i) for p in range(4) for i in range(25)]
            + [b"%d-%d" % (p, i) for p in range(4) for i in range(5)]
        )
        # Both closed: they committed where they were, and the group has no members.
        g = groups.groups["g"]
        assert g.members == {}
        assert g.offsets == {TopicPartition("t", p): 30 for p in range(4)}
        # The member reports never overlap either.
        check_exclusive(log)


async def test_a_new_member_resumes_from_the_committed_offsets() -> None:
    async with FakeGroupCluster({"t": 2}) as (broker, groups):
        await produce(broker.address, "t", 2, 10)
        got: list[bytes] = []
        async with Consumer(broker.address, group_id="g", auto_offset_reset="earliest") as c:
            c.subscribe(["t"])
            await drain(c, got, lambda: len(got) >= 20)
        assert groups.groups["g"].offsets == {
            TopicPartition("t", 0): 10,
            TopicPartition("t", 1): 10,
        }
        await produce(broker.address, "t", 2, 3)
        again: list[bytes] = []
        async with Consumer(broker.address, group_id="g", auto_offset_reset="earliest") as c:
            c.subscribe(["t"])
            await drain(c, again, lambda: len(again) >= 6)
            assert sorted(again) == sorted(b"%d-%d" % (p, i) for p in range(2) for i in range(3))
            committed = await c.committed()
            assert committed == {TopicPartition("t", 0): 10, TopicPartition("t", 1): 10}
            assert await c.lag() == {TopicPartition("t", 0): 0, TopicPartition("t", 1): 0}
        # A second group reads everything on its own.
        other: list[bytes] = []
        async with Consumer(broker.address, group_id="g2", auto_offset_reset="earliest") as c:
            c.subscribe(pattern="t|u")
            async with asyncio.timeout(20):
                async for r in c:  # async iteration, as with manual assignment
                    other.append(r.value or b"")
                    if len(other) == 26:
                        break
        assert sorted(other) == sorted(
            [b"%d-%d" % (p, i) for p in range(2) for i in range(10)]
            + [b"%d-%d" % (p, i) for p in range(2) for i in range(3)]
        )


async def test_commits_of_partitions_not_owned_fail_at_once() -> None:
    async with FakeGroupCluster({"t": 2}) as (broker, _):
        async with Consumer(broker.address, group_id="g", enable_auto_commit=False) as c:
            c.subscribe(["t"])
            async with asyncio.timeout(10):
                while len(c.assignment()) < 2:
                    await c.poll(timeout_ms=20)
            with pytest.raises(PartitionRevoked, match=r"t/5"):
                await c.commit({TopicPartition("t", 5): 1})
            task = c.commit_async({TopicPartition("t", 0): 0, TopicPartition("t", 1): 0})
            await task
            with pytest.raises(TidelogError, match="group assigns"):
                c.assign([TopicPartition("t", 0)])
            c.pause(TopicPartition("t", 0))
            assert c.paused() == [TopicPartition("t", 0)]
            c.resume(TopicPartition("t", 0))
            assert c.paused() == []


async def test_subscribe_misuse_is_refused_clearly() -> None:
    async with FakeGroupCluster({"t": 1}) as (broker, _):
        async with Consumer(broker.address) as c:
            with pytest.raises(TidelogError, match="group_id"):
                c.subscribe(["t"])
        async with Consumer(broker.address, group_id="g") as c:
            with pytest.raises(InvalidSubscription, match="not a valid regular expression"):
                c.subscribe(pattern="[")
            with pytest.raises(TidelogError, match="not joined its group"):
                await c.commit()
        with pytest.raises(ValueError, match="assignor"):
            Consumer(broker.address, group_id="g", assignor="sticky")  # type: ignore[arg-type]


def test_the_sync_facade_joins_commits_and_leaves() -> None:
    async def serve(ready: asyncio.Event, stop: asyncio.Event, out: list[Any]) -> None:
        async with FakeGroupCluster({"t": 2}) as (broker, groups):
            await produce(broker.address, "t", 2, 4)
            out.extend([broker, groups])
            ready.set()
            await stop.wait()

    import threading

    loop = asyncio.new_event_loop()
    ready, stop = asyncio.Event(), asyncio.Event()
    out: list[Any] = []
    thread = threading.Thread(target=loop.run_until_complete, args=(serve(ready, stop, out),))
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not out and time.monotonic() < deadline:
            time.sleep(0.01)
        broker, groups = out
        assigned: list[list[TopicPartition]] = []
        with SyncConsumer(broker.address, group_id="s", auto_offset_reset="earliest") as c:
            c.subscribe("t", on_assigned=assigned.append)
            got: list[bytes] = []
            while len(got) < 8 and time.monotonic() < deadline:
                got += [r.value or b"" for r in c.poll(timeout_ms=50)]
            assert len(got) == 8 and c.has_assignment
            c.commit()
            assert c.committed() == {TopicPartition("t", 0): 4, TopicPartition("t", 1): 4}
            with pytest.raises(PartitionRevoked):
                c.commit_async({TopicPartition("u", 0): 1}).result(5)
        assert assigned == [[TopicPartition("t", 0), TopicPartition("t", 1)]]
        assert groups.groups["s"].members == {}
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(10)
        loop.close()


async def run_cli(*args: str) -> tuple[int, str, str]:
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


@pytest.mark.timeout(300)  # a dozen `python -m tidelog` processes: slow on a loaded machine
async def test_cli_group_verbs_against_a_group() -> None:
    async with FakeGroupCluster({"t": 2}) as (broker, groups):
        b = broker.address
        await produce(b, "t", 2, 10)
        # consume --group reads what is there, commits on exit.
        code, out, err = await run_cli(
            "consume", "t", "--group", "cli", "--from-beginning", "--max", "20", "-b", b
        )
        assert code == 0, err
        assert len(out.split()) == 20
        assert groups.groups["cli"].offsets == {
            TopicPartition("t", 0): 10,
            TopicPartition("t", 1): 10,
        }
        code, out, err = await run_cli("group", "list", "--json", "-b", b)
        assert code == 0, err
        assert json.loads(out) == [
            {"group_id": "cli", "state": "empty", "members": 0, "coordinator": 1}
        ]
        code, out, err = await run_cli("group", "describe", "cli", "--json", "-b", b)
        assert code == 0, err
        desc = json.loads(out)
        assert [(p["partition"], p["committed_offset"], p["lag"]) for p in desc["partitions"]] == [
            (0, 10, 0),
            (1, 10, 0),
        ]
        # A dry run changes nothing; --execute does.
        code, out, err = await run_cli(
            "group", "reset-offsets", "cli", "--topic", "t:1", "--shift-by", "-4", "--json", "-b", b
        )
        assert code == 0, err
        plan = json.loads(out)
        assert plan["partitions"] == [{"topic": "t", "partition": 1, "current": 10, "new": 6}]
        assert plan["executed"] is False
        assert groups.groups["cli"].offsets[TopicPartition("t", 1)] == 10
        code, out, err = await run_cli(
            "group", "reset-offsets", "cli", "--topic", "t", "--to-offset", "99", "-b", b
        )
        assert code == 0 and "dry run" in err
        assert " 10 " in out and " 99 " not in out  # clamped to the end
        code, out, err = await run_cli(
            "group", "reset-offsets", "cli", "--topic", "t", "--to-earliest", "--execute", "-b", b
        )
        assert code == 0, err
        assert groups.groups["cli"].offsets == {
            TopicPartition("t", 0): 0,
            TopicPartition("t", 1): 0,
        }
        # Errors: one line, non-zero.
        code, out, err = await run_cli("group", "describe", "nope", "-b", b)
        assert code == 1 and err.strip().count("\n") == 0 and "nope" in err
        code, _, err = await run_cli(
            "consume", "--group", "cli", "--pattern", "(", "-b", b, "--timeout-ms", "100"
        )
        assert code == 1 and err.startswith("error:") and "regular expression" in err
        assert err.strip().count("\n") == 0
        async with Consumer(b, group_id="cli") as c:
            c.subscribe(["t"])
            async with asyncio.timeout(10):
                while not c.has_assignment:
                    await c.poll(timeout_ms=20)
            code, _, err = await run_cli(
                "group", "reset-offsets", "cli", "--topic", "t", "--to-latest", "-b", b
            )
            assert code == 1 and "active member" in err and err.strip().count("\n") == 0
            code, _, err = await run_cli("group", "delete", "cli", "-b", b)
            assert code == 1 and "members" in err
        code, _, err = await run_cli("group", "delete", "cli", "-b", b)
        assert code == 0, err
        assert "cli" not in groups.groups


async def test_members_join_leave_and_die_without_a_partition_owned_twice() -> None:
    """The live scenario of tests/integration/test_groups_live.py against the fake coordinator
    (which has no static membership): the harness, the subprocess member and its kill -9."""
    from tests.support.group_ledger import InProcessMember, Ledger, ProcessMember, until

    async with FakeGroupCluster({"t": 6}) as (broker, groups):
        b = broker.address
        ledger = Ledger()
        acked: set[tuple[TopicPartition, int]] = set()
        stop = asyncio.Event()

        async def load() -> None:
            async with Producer(b) as p:
                while not stop.is_set():
                    for part in range(6):
                        for md in await p.send_many("t", [b"x"] * 3, partition=part):
                            acked.update(
                                (TopicPartition("t", part), md.base_offset + k)
                                for k in range(md.record_count)
                            )
                    await asyncio.sleep(0.03)

        loader = asyncio.create_task(load())
        opts: dict[str, Any] = {"group_id": "g", "session_timeout_ms": 1500, "retry_backoff_ms": 10}
        members = {n: InProcessMember(ledger, n, b, **opts) for n in "abc"}
        for m in members.values():
            await m.start(["t"])
        every = {TopicPartition("t", p) for p in range(6)}

        def split(names: str, sizes: list[int]) -> bool:
            got = [ledger.owned(n) for n in names]
            return sorted(map(len, got)) == sorted(sizes) and set().union(*got) == every

        await until("3 members", lambda: split("abc", [2, 2, 2]), 20)
        d = ProcessMember(ledger, "d", b, group="g", session_timeout_ms=1500)
        await d.start(["t"])
        await until("4 members", lambda: split("abcd", [1, 1, 2, 2]), 20)
        await members["b"].stop()
        await until("b left", lambda: split("acd", [2, 2, 2]), 20)
        killed_at = await d.kill()
        await until("d expired", lambda: split("ac", [3, 3]), 20)
        assert max(e.t for e in ledger.events if e.kind == "assigned") - killed_at >= 1.0
        stop.set()
        await loader
        await until("all processed", lambda: acked <= ledger.processed(), 20)
        for n in "ac":
            await members[n].stop()
        ledger.check_exclusive()
        ledger.check_reads_within_ownership()
        assert len(acked) > 100 and groups.groups["g"].members == {}


async def test_a_moved_coordinator_is_found_again_with_backoff() -> None:
    async with (
        FakeGroupCluster({"t": 2}) as (broker, groups),
        FakeGroupCluster({"t": 2}) as (
            _,
            other,
        ),
    ):
        # The first answers say NOT_COORDINATOR: the member asks FindCoordinator again each time.
        groups.refuse = 3
        c = Consumer(broker.address, group_id="g", retry_backoff_ms=20)
        await c.start()
        c.subscribe(["t"])
        t0 = time.monotonic()
        async with asyncio.timeout(10):
            while len(c.assignment()) < 2:
                await c.poll(timeout_ms=20)
        assert groups.find_calls >= 4
        # 20 + 40 + 80 ms of backoff at least between the refused attempts.
        assert time.monotonic() - t0 >= 0.12
        # The coordinator moves to another node: this one refuses, FindCoordinator points on.
        other.groups = groups.groups  # the group's state moved with it
        groups.coordinator = other.broker.address
        groups.refuse = 1_000
        before = other.heartbeat_calls
        async with asyncio.timeout(10):
            while other.heartbeat_calls < before + 3:
                await c.poll(timeout_ms=20)
        assert len(c.assignment()) == 2
        await c.commit({TopicPartition("t", 0): 0, TopicPartition("t", 1): 0})
        assert other.groups["g"].offsets == {TopicPartition("t", 0): 0, TopicPartition("t", 1): 0}
        await c.stop()
        assert other.groups["g"].members == {}  # it left at the new coordinator
