"""The producer against an in-process fake broker: batching, keyed placement, retries that
keep each partition's order, and errors that reach the right futures."""

from __future__ import annotations

import asyncio
import itertools

import pytest

from tests.unit.client_fakes import FakeBroker, FakeCluster
from tidelog.client import BufferFull, Producer
from tidelog.client.partitioner import partition_for_key
from tidelog.errors import (
    BatchTooLarge,
    NodeUnavailable,
    NotLeader,
    RequestTimedOut,
    TidelogError,
    UnknownPartition,
    UnknownTopic,
)
from tidelog.records import decode_batches
from tidelog.v1 import broker_pb2

pytestmark = pytest.mark.timeout(60)


def values_of(fake: FakeBroker, topic: str, partition: int) -> list[bytes | None]:
    return [r.value for r in fake.log(topic, partition)]


async def test_send_returns_offsets_in_order_and_batches_records() -> None:
    async with FakeCluster({"t": 1}) as fake, Producer(fake.address, linger_ms=20) as p:
        futures = [p.send("t", b"v%d" % i) for i in range(500)]
        mds = [await f for f in futures]
        assert [md.offset for md in mds] == list(range(500))
        assert {md.partition for md in mds} == {0}
        assert values_of(fake, "t", 0) == [b"v%d" % i for i in range(500)]
        # 500 records sent within one linger window: a handful of requests, not 500.
        assert fake.produce_requests <= 5


async def test_keyed_records_land_on_murmur2_partitions() -> None:
    async with FakeCluster({"k": 7}) as fake, Producer(fake.address) as p:
        keys = [b"user-%d" % i for i in range(200)]
        mds = await asyncio.gather(*(p.send("k", b"x", key=k) for k in keys))
        for key, md in zip(keys, mds, strict=True):
            assert md.partition == partition_for_key(key, 7)
        # Per key, order of sends is order in the log.
        await asyncio.gather(*(p.send("k", b"%d" % i, key=b"same") for i in range(50)))
        part = partition_for_key(b"same", 7)
        assert [r.value for r in fake.log("k", part) if r.key == b"same"] == [
            b"%d" % i for i in range(50)
        ]


async def test_keyless_records_stick_to_a_partition_per_batch() -> None:
    async with FakeCluster({"s": 4}) as fake, Producer(fake.address, batch_bytes_max=2000) as p:
        handle = p.send_many("s", [b"r" * 100] * 400)
        results = await handle
        assert sum(md.record_count for md in results) == 400
        used = [md.partition for md in results]
        # Each batch went whole to one partition, and the partitions take turns.
        for a, b in itertools.pairwise(used):
            assert b == (a + 1) % 4
        assert sum(len(fake.log("s", i)) for i in range(4)) == 400


async def test_send_many_with_keys_groups_by_partition() -> None:
    async with FakeCluster({"k": 3}) as fake, Producer(fake.address) as p:
        keys = [b"k%d" % (i % 10) for i in range(300)]
        values = [b"v%d" % i for i in range(300)]
        await p.send_many("k", values, keys)
        for part in range(3):
            expected = [
                v for k, v in zip(keys, values, strict=True) if partition_for_key(k, 3) == part
            ]
            assert values_of(fake, "k", part) == expected


async def test_retriable_errors_are_retried_in_order() -> None:
    """The node stops leading at request 3: every batch that reaches it from then on fails
    (up to 8 in flight) and goes back in front of newer ones, so the log is in send order.

    It leads again only once the producer comes back with the first refused batch, i.e.
    after hearing of the refusal, and after at least 7 refusals (requests 3..9). A node that
    accepted a request sent before the producer could know of any refusal (say request 10,
    already on the wire when 3 was refused) would put it ahead of the retries whatever the
    client does: only broker-side sequence numbers could refuse it.
    """
    refused_first: list[bytes | None] = []

    def fault(n: int, req: broker_pb2.ProduceRequest) -> TidelogError | None:
        first = decode_batches(req.batches)[0].value
        if refused_first and n > 9 and first == refused_first[0]:
            refused_first.clear()  # the retry: the node leads again
            return None
        if 3 <= n <= 9 or refused_first:
            if not refused_first:
                refused_first.append(first)
            return NotLeader("not the leader", leader_id="1", leader_address="x")
        return None

    async with FakeCluster({"t": 1}) as fake:
        fake.produce_fault = fault
        fake.produce_delay_s = 0.002
        async with Producer(
            fake.address, batch_bytes_max=1000, retry_backoff_ms=5, max_in_flight_per_partition=8
        ) as p:
            values = [b"%06d" % i for i in range(3000)]
            res = await p.send_many("t", values)
        assert values_of(fake, "t", 0) == values
        offsets = [(md.base_offset, md.record_count) for md in res]
        assert offsets == sorted(offsets)
        assert fake.produce_requests > len(res)  # there were retries


async def test_unreachable_then_reachable_is_retried() -> None:
    calls: list[int] = []

    def fault(n: int, req: broker_pb2.ProduceRequest) -> TidelogError | None:
        calls.append(n)
        return NodeUnavailable("down") if n < 2 else None

    async with FakeCluster({"t": 1}) as fake:
        fake.produce_fault = fault
        async with Producer(fake.address, retry_backoff_ms=1) as p:
            md = await p.send("t", b"v")
        assert md.offset == 0 and len(calls) == 3


async def test_non_retriable_error_fails_only_that_batch() -> None:
    def fault(n: int, req: broker_pb2.ProduceRequest) -> TidelogError | None:
        return BatchTooLarge("too large") if req.partition == 1 else None

    async with FakeCluster({"t": 2}) as fake, Producer(fake.address) as p:
        fake.produce_fault = fault
        good = p.send("t", b"a", partition=0)
        bad = p.send("t", b"b", partition=1)
        assert (await good).offset == 0
        with pytest.raises(BatchTooLarge):
            await bad
        with pytest.raises(BatchTooLarge):
            bad.result()
        assert values_of(fake, "t", 1) == []


async def test_retries_give_up_after_delivery_timeout() -> None:
    async with FakeCluster({"t": 1}) as fake:
        fake.produce_fault = lambda n, req: RequestTimedOut("slow")
        async with Producer(fake.address, delivery_timeout_ms=300, retry_backoff_ms=10) as p:
            with pytest.raises(RequestTimedOut, match="delivery_timeout_ms"):
                await p.send("t", b"v")


async def test_retries_limit() -> None:
    async with FakeCluster({"t": 1}) as fake:
        fake.produce_fault = lambda n, req: NotLeader("moved")
        async with Producer(fake.address, retries=2, retry_backoff_ms=1) as p:
            with pytest.raises(NotLeader):
                await p.send("t", b"v")
        assert fake.produce_requests == 3


async def test_unknown_topic_and_partition() -> None:
    async with FakeCluster({"t": 2}) as fake, Producer(fake.address, metadata_wait_ms=200) as p:
        with pytest.raises(UnknownTopic, match="does not exist"):
            await p.send("nope", b"v")
        with pytest.raises(UnknownPartition, match=r"partitions 0\.\.1"):
            p.send("t", b"v", partition=5)
        with pytest.raises(UnknownTopic):
            await p.send_many("nope", [b"a", b"b"])


async def test_records_sent_before_metadata_keep_their_order() -> None:
    async with FakeCluster({"t": 1}) as fake, Producer(fake.address) as p:
        fake.topics["late"] = 1  # known to the node, not yet to the producer
        futures = [p.send("late", b"%d" % i) for i in range(100)]
        handle = p.send_many("late", [b"m%d" % i for i in range(100)])
        futures.append(p.send("late", b"last"))
        mds = [await f for f in futures]
        await handle
        assert [md.offset for md in mds[:100]] == list(range(100))
        assert mds[-1].offset == 200
        assert values_of(fake, "late", 0)[100:102] == [b"m0", b"m1"]


async def test_buffer_bound_parks_then_refuses() -> None:
    async with FakeCluster({"t": 1}) as fake:
        fake.produce_delay_s = 0.05
        async with Producer(
            fake.address, batch_bytes_max=1024, buffer_bytes_max=4096, linger_ms=0
        ) as p:
            futures = []
            with pytest.raises(BufferFull, match="await the futures"):
                for _ in range(10_000):
                    futures.append(p.send("t", b"x" * 100))
            # What was accepted (in the buffer or parked) is all delivered, in order.
            mds = [await f for f in futures]
            assert [md.offset for md in mds] == list(range(len(futures)))
            assert 4096 // 112 <= len(futures) < 100


async def test_flush_sends_despite_linger_and_acks_zero_has_no_offsets() -> None:
    async with FakeCluster({"t": 1}) as fake, Producer(fake.address, linger_ms=60_000, acks=0) as p:
        f = p.send("t", b"v")
        await asyncio.wait_for(p.flush(), 5)
        assert f.done() and (await f).offset == -1
        assert values_of(fake, "t", 0) == [b"v"]


async def test_headers_and_timestamps_reach_the_log() -> None:
    async with FakeCluster({"t": 1}) as fake, Producer(fake.address) as p:
        md = await p.send("t", b"v", key=b"k", headers=[("trace", b"1")], timestamp_ms=1234567)
        assert md.timestamp_ms == 1234567
        (rec,) = fake.log("t", 0)
        assert (rec.key, rec.value, rec.timestamp_ms) == (b"k", b"v", 1234567)


async def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="acks"):
        Producer("127.0.0.1:1", acks="some")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="codec"):
        Producer("127.0.0.1:1", compression="gzip")
    with pytest.raises(ValueError, match="host:port"):
        Producer("nohost")
    p = Producer("127.0.0.1:1")
    with pytest.raises(TidelogError, match="not started"):
        p.send("t", b"v")


async def test_start_fails_clearly_without_a_node() -> None:
    from tests.unit.client_fakes import free_port

    p = Producer(f"127.0.0.1:{free_port()}")
    with pytest.raises(NodeUnavailable, match="no node answered"):
        await p.start()


async def test_stop_with_a_timeout_fails_what_cannot_be_delivered() -> None:
    async with FakeCluster({"t": 1}) as fake:
        fake.produce_fault = lambda n, req: NodeUnavailable("down")
        p = Producer(fake.address, retry_backoff_ms=10)
        await p.start()
        fut = p.send("t", b"v")
        await asyncio.wait_for(p.stop(timeout_ms=300), 5)
        with pytest.raises(TidelogError, match="closed before delivering"):
            await fut


async def test_adaptive_linger_sends_a_lone_record_at_once_and_batches_under_load() -> None:
    async with FakeCluster({"t": 1}) as fake, Producer(fake.address, linger_ms=30_000) as p:
        # Nothing in flight: the record goes without waiting 30 s of linger.
        md = await asyncio.wait_for(p.send("t", b"alone"), timeout=10)
        assert md.offset == 0 and fake.produce_requests == 1
        # A burst of sends made before the caller yields shares one batch.
        futures = [p.send("t", b"b%d" % i) for i in range(200)]
        await asyncio.wait_for(asyncio.gather(*futures), timeout=10)
        assert fake.produce_requests == 2
        assert values_of(fake, "t", 0) == [b"alone"] + [b"b%d" % i for i in range(200)]


async def test_adaptive_linger_holds_small_batches_while_a_request_is_out() -> None:
    """Issue 15: small requests in flight together queue behind each other's Raft rounds on
    the nodes. With a request out, records sent one by one wait for its answer (not only for
    linger) and then go together in one request; a batch of 64 KiB or more may go beside."""
    async with FakeCluster({"t": 1}) as fake, Producer(fake.address, linger_ms=1) as p:
        fake.produce_delay_s = 0.3
        first = p.send("t", b"first")
        await asyncio.sleep(0.05)
        assert fake.serving == 1
        held = []
        for i in range(20):  # one at a time, each well past the 1 ms linger
            held.append(p.send("t", b"s%d" % i))
            await asyncio.sleep(0.005)
        assert fake.produce_requests == 1, "a small batch went beside the request in flight"
        await asyncio.wait_for(first, timeout=10)
        await asyncio.wait_for(asyncio.gather(*held), timeout=10)
        assert fake.produce_requests == 2  # everything that waited, in one request
        # A large batch pipelines: 256 KiB of records goes while a request is out.
        fake.produce_delay_s = 0.5
        p.send("t", b"x")  # nothing in flight: goes at once
        await asyncio.sleep(0.05)
        big = [p.send("t", bytes([i]) * (64 * 1024)) for i in range(4)]
        await asyncio.sleep(0.2)
        assert fake.serving >= 2, "a batch of 64 KiB waited for the answer"
        await asyncio.wait_for(asyncio.gather(*big), timeout=10)
    assert values_of(fake, "t", 0)[:22] == [b"first"] + [b"s%d" % i for i in range(20)] + [b"x"]


async def test_without_adaptive_linger_a_batch_waits_for_linger() -> None:
    async with (
        FakeCluster({"t": 1}) as fake,
        Producer(fake.address, linger_ms=30_000, adaptive_linger=False) as p,
    ):
        fut = p.send("t", b"waits")
        await asyncio.sleep(0.5)
        assert not fut.done() and fake.produce_requests == 0
        await asyncio.wait_for(p.flush(), timeout=10)
        assert (await fut).offset == 0
