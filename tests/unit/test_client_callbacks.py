"""Per-record acknowledgements without a task per record: RecordFuture.add_done_callback and
Producer.send(on_delivery=...), and the aiokafka porting shape ``await (await send())``."""

from __future__ import annotations

import asyncio

import pytest

from tests.unit.client_fakes import FakeCluster
from tidelog.client import Producer, RecordFuture, RecordMetadata
from tidelog.errors import TidelogError, UnknownPartition, UnknownTopic

pytestmark = pytest.mark.timeout(60)


async def test_add_done_callback_fires_once_per_record_with_its_metadata() -> None:
    async with FakeCluster({"t": 1}) as fake, Producer(fake.address, linger_ms=20) as p:
        seen: list[RecordMetadata] = []
        futures = [p.send("t", b"v%d" % i) for i in range(50)]
        tasks_before = len(asyncio.all_tasks())
        for f in futures:
            f.add_done_callback(lambda fut: seen.append(fut.result()))
        assert len(asyncio.all_tasks()) == tasks_before  # no task per record
        await p.flush()
        await asyncio.sleep(0)  # callbacks run on the loop's next iteration
        assert [md.offset for md in seen] == list(range(50))
        # A callback added after completion still runs, soon.
        late: list[int] = []
        futures[0].add_done_callback(lambda fut: late.append(fut.result().offset))
        assert late == []
        await asyncio.sleep(0)
        assert late == [0]


async def test_on_delivery_reports_success_and_failure() -> None:
    async with FakeCluster({"t": 2}) as fake, Producer(fake.address, metadata_wait_ms=200) as p:
        got: list[tuple[TidelogError | None, RecordMetadata | None]] = []

        def report(err: TidelogError | None, md: RecordMetadata | None) -> None:
            got.append((err, md))

        p.send("t", b"ok", partition=1, on_delivery=report)
        # A record parked while its topic's metadata is looked up, which never shows up.
        parked = p.send("missing", b"x", on_delivery=report)
        await p.flush()
        with pytest.raises(UnknownTopic):
            await parked
        await asyncio.sleep(0)
        assert len(got) == 2
        ok = next(md for err, md in got if err is None)
        assert ok is not None and (ok.partition, ok.offset) == (1, 0)
        failed = [err for err, md in got if md is None]
        assert len(failed) == 1 and isinstance(failed[0], UnknownTopic)
        assert isinstance(parked.exception(), UnknownTopic)


async def test_a_raising_callback_does_not_break_the_producer() -> None:
    async with FakeCluster({"t": 1}) as fake, Producer(fake.address) as p:

        def boom(fut: RecordFuture) -> None:
            raise RuntimeError("user bug")

        p.send("t", b"a").add_done_callback(boom)
        md = await p.send("t", b"b")
        assert md.offset == 1
        assert (await p.send("t", b"c")).offset == 2


async def test_aiokafka_style_double_await_gives_the_metadata() -> None:
    async with FakeCluster({"t": 1}) as fake, Producer(fake.address) as p:
        fut = await p.send("t", b"v")
        md = await fut  # aiokafka: send() is a coroutine returning a future
        assert isinstance(md, RecordMetadata) and md.offset == 0
        assert (await p.send_and_wait("t", b"w")).offset == 1


async def test_send_to_a_missing_partition_fails_the_future_not_the_loop() -> None:
    async with FakeCluster({"t": 1}) as fake, Producer(fake.address) as p:
        await p.send("t", b"warm")  # metadata known: the error is raised at once
        with pytest.raises(UnknownPartition):
            p.send("t", b"v", partition=3, on_delivery=lambda e, m: None)
