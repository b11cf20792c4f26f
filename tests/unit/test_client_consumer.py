"""The consumer against an in-process fake broker: positions, seeks, reconnects that neither
skip nor repeat records, and out-of-range handling."""

from __future__ import annotations

import asyncio

import pytest

from tests.unit.client_fakes import FakeBroker, FakeCluster
from tidelog.client import Consumer, NoOffset, Producer, TopicPartition
from tidelog.errors import NotLeader, OffsetOutOfRange, TidelogError, UnknownPartition

pytestmark = pytest.mark.timeout(60)

TP = TopicPartition("t", 0)


async def fill(fake: FakeBroker, n: int, topic: str = "t", partition: int = 0) -> None:
    async with Producer(fake.address, batch_bytes_max=2000) as p:
        await p.send_many(topic, [b"%d" % i for i in range(n)], partition=partition)


async def read(c: Consumer, n: int, timeout_s: float = 10) -> list[int]:
    got: list[int] = []
    async with asyncio.timeout(timeout_s):
        while len(got) < n:
            got += [int(r.value or b"-1") for r in await c.poll(timeout_ms=200)]
    return got


async def test_reads_from_an_offset_skipping_the_start_of_the_first_batch() -> None:
    async with FakeCluster({"t": 1}) as fake:
        await fill(fake, 100)
        async with Consumer(fake.address) as c:
            c.assign([TP])
            c.seek(TP, 37)  # the fake serves batches aligned to 10: the first starts at 30
            assert await read(c, 63) == list(range(37, 100))
            assert await c.position(TP) == 100
            assert await c.poll(timeout_ms=50) == []


async def test_stream_failures_reopen_at_the_position_without_gaps_or_repeats() -> None:
    async with FakeCluster({"t": 1}) as fake:
        await fill(fake, 500)
        # Every stream dies with NOT_LEADER after three responses.
        fake.fetch_fault = lambda stream, sent: NotLeader("moved") if sent >= 3 else None
        async with Consumer(fake.address, retry_backoff_ms=1) as c:
            c.assign([TP])
            await c.seek_to_beginning()
            assert await read(c, 500) == list(range(500))
        assert fake.fetch_streams >= 500 // 30


async def test_poll_respects_max_records_and_keeps_the_rest() -> None:
    async with FakeCluster({"t": 1}) as fake:
        fake.fetch_batches_max = 10
        await fill(fake, 100)
        async with Consumer(fake.address) as c:
            c.assign([TP])
            c.seek(TP, 0)
            first: list[int] = []
            async with asyncio.timeout(5):
                while not first:
                    first = [int(r.value or b"") for r in await c.poll(max_records=7)]
            assert first == list(range(7))
            assert await c.position(TP) == 7
            assert await read(c, 93) == list(range(7, 100))


async def test_seek_to_end_time_and_beginning() -> None:
    async with FakeCluster({"t": 1}) as fake:
        async with Producer(fake.address) as p:
            for i in range(30):
                await p.send("t", b"%d" % i, timestamp_ms=1_000_000 + i * 10)
        async with Consumer(fake.address) as c:
            c.assign([TP])
            assert await c.seek_to_end() == {TP: 30}
            assert await c.poll(timeout_ms=50) == []
            assert await c.seek_to_time(1_000_000 + 205) == {TP: 21}
            assert await read(c, 9) == list(range(21, 30))
            assert await c.seek_to_beginning(TP) == {TP: 0}
            assert (await read(c, 30))[:3] == [0, 1, 2]


async def test_new_records_arrive_while_following() -> None:
    async with FakeCluster({"t": 1}) as fake:
        async with Consumer(fake.address) as c:
            c.assign([TP])
            await c.seek_to_end()
            await fill(fake, 25)
            assert await read(c, 25) == list(range(25))


async def test_out_of_range_surfaces_with_the_range_or_resets() -> None:
    async with FakeCluster({"t": 1}) as fake:
        await fill(fake, 10)
        async with Consumer(fake.address) as c:
            c.assign([TP])
            c.seek(TP, 50)
            with pytest.raises(OffsetOutOfRange, match=r"\[0, 10\]"):
                await read(c, 1, timeout_s=5)
        async with Consumer(fake.address, auto_offset_reset="earliest") as c:
            c.assign([TP])
            c.seek(TP, 50)
            assert await read(c, 10) == list(range(10))


async def test_initial_position_follows_auto_offset_reset() -> None:
    async with FakeCluster({"t": 1}) as fake:
        await fill(fake, 10)
        async with Consumer(fake.address) as c:  # Kafka's default: latest
            c.assign([TP])
            assert await c.position(TP) == 10
        async with Consumer(fake.address, auto_offset_reset="earliest") as c:
            c.assign([TP])
            assert await read(c, 10) == list(range(10))
        async with Consumer(fake.address, auto_offset_reset="error") as c:
            c.assign([TP])
            with pytest.raises(NoOffset, match="seek"):
                await c.position(TP)


async def test_multiple_partitions_and_async_iteration() -> None:
    async with FakeCluster({"m": 3}) as fake:
        for part in range(3):
            await fill(fake, 20, topic="m", partition=part)
        async with Consumer(fake.address, auto_offset_reset="earliest") as c:
            tps = await c.partitions_for("m")
            c.assign(tps)
            seen: dict[int, list[int]] = {0: [], 1: [], 2: []}
            async with asyncio.timeout(10):
                async for rec in c:
                    seen[rec.partition].append(rec.offset)
                    if sum(map(len, seen.values())) == 60:
                        break
            assert all(v == list(range(20)) for v in seen.values())


async def test_unknown_partition_and_unassigned_seek() -> None:
    async with FakeCluster({"t": 1}) as fake, Consumer(fake.address) as c:
        c.assign([TopicPartition("t", 4)])
        with pytest.raises(UnknownPartition, match="no partition 4"):
            await c.poll(timeout_ms=2000)
        with pytest.raises(TidelogError, match="not assigned"):
            c.seek(TP, 0)


async def test_poll_until_end_reads_what_is_there_and_stops() -> None:
    async with FakeCluster({"t": 1, "e": 2}) as fake:
        await fill(fake, 25)
        async with Consumer(fake.address, auto_offset_reset="earliest") as c:
            c.assign([TP, TopicPartition("e", 0), TopicPartition("e", 1)])
            got: list[int] = []
            loop = asyncio.get_running_loop()
            started = loop.time()
            while records := await c.poll(timeout_ms=30_000, max_records=7, until_end=True):
                got += [r.offset for r in records]
            # The end came long before the timeout: empty partitions are at their end at once.
            assert loop.time() - started < 10
            assert got == list(range(25))
            assert c.at_end() and c.at_end(TopicPartition("e", 1))
            # A new record makes the partition not at its end until it is read.
            await fill(fake, 1)
            while c.at_end(TP):
                await asyncio.sleep(0.01)
            assert [r.offset for r in await c.poll(timeout_ms=5000, until_end=True)] == [25]
            assert await c.poll(timeout_ms=5000, until_end=True) == []
            assert c.at_end()
