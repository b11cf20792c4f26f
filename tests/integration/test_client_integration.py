"""The Python client against a real node process (``python -m tidelog.node``)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.nodeproc import Node
from tidelog.client import (
    Admin,
    Consumer,
    ConsumerRecord,
    Producer,
    SyncAdmin,
    SyncConsumer,
    SyncProducer,
    TopicPartition,
)
from tidelog.client.partitioner import partition_for_key
from tidelog.errors import InvalidTopic, OffsetOutOfRange, TopicExists, UnknownTopic

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    base = tmp_path_factory.mktemp("client-node")
    n = Node(base / "data", base / "node.log")
    n.start()
    try:
        yield n
    finally:
        n.kill()


_topic_seq = 0


async def new_topic(node: Node, partitions: int, **configs: str) -> str:
    global _topic_seq
    _topic_seq += 1
    name = f"it-{_topic_seq}-{int(time.time() * 1000) % 100000}"
    async with Admin(node.address) as admin:
        await admin.create_topics(
            name, partitions, 1, {k.replace("_", "."): v for k, v in configs.items()}
        )
    return name


async def read_all(
    consumer: Consumer, expected: int, timeout_s: float = 60
) -> list[ConsumerRecord]:
    out: list[ConsumerRecord] = []
    async with asyncio.timeout(timeout_s):
        while len(out) < expected:
            out += await consumer.poll(timeout_ms=500)
    return out


async def test_produce_100k_records_and_read_them_back_in_order(node: Node) -> None:
    """100,000 records through the client into 4 partitions, read back from every
    partition: each partition holds exactly what was sent to it, once, in send order."""
    topic = await new_topic(node, 4)
    total = 100_000
    sent: dict[int, list[bytes]] = {p: [] for p in range(4)}
    async with Producer(node.address, acks="all", linger_ms=2) as producer:
        # Half one at a time (keyless and keyed), half in bulk with send_many.
        singles = []
        for i in range(total // 2):
            key = b"key-%d" % (i % 97) if i % 3 == 0 else None
            singles.append((producer.send(topic, b"single-%d" % i, key=key), b"single-%d" % i))
        bulk = [b"bulk-%d" % i for i in range(total // 2)]
        bulk_results = await producer.send_many(topic, bulk)
        for fut, value in singles:
            md = await fut
            sent[md.partition].append(value)
    # Where each bulk record went, from the batch metadata.
    bulk_at: dict[tuple[int, int], bytes] = {}
    pos = 0
    for bmd in bulk_results:
        for i in range(bmd.record_count):
            bulk_at[(bmd.partition, bmd.base_offset + i)] = bulk[pos]
            pos += 1
    assert pos == len(bulk)

    async with Consumer(node.address) as consumer:
        tps = await consumer.partitions_for(topic)
        consumer.assign(tps)
        await consumer.seek_to_beginning()
        records = await read_all(consumer, total)
    assert len(records) == total
    by_part: dict[int, list[tuple[int, bytes]]] = {p: [] for p in range(4)}
    for r in records:
        assert r.value is not None
        by_part[r.partition].append((r.offset, r.value))
    for p, recs in by_part.items():
        assert [off for off, _ in recs] == list(range(len(recs))), f"gap or repeat in {p}"
        assert [v for _, v in recs if v.startswith(b"single-")] == sent[p]
        for off, v in recs:
            if v.startswith(b"bulk-"):
                assert bulk_at[(p, off)] == v
    bulk_seen = [
        int(v.split(b"-")[1])
        for recs in by_part.values()
        for _, v in recs
        if v.startswith(b"bulk-")
    ]
    assert sorted(bulk_seen) == list(range(total // 2))


async def test_keyed_records_land_on_the_murmur2_partition(node: Node) -> None:
    topic = await new_topic(node, 6)
    keys = [b"customer-%d" % i for i in range(300)]
    async with Producer(node.address) as producer:
        mds = await asyncio.gather(*(producer.send(topic, b"v", key=k) for k in keys))
    assert [md.partition for md in mds] == [partition_for_key(k, 6) for k in keys]
    async with Consumer(node.address) as consumer:
        consumer.assign(await consumer.partitions_for(topic))
        await consumer.seek_to_beginning()
        records = await read_all(consumer, len(keys))
    for r in records:
        assert r.key is not None and r.partition == partition_for_key(r.key, 6)


@pytest.mark.parametrize("acks", ["all", 1, 0])
async def test_acks_variants(node: Node, acks: object) -> None:
    topic = await new_topic(node, 1)
    async with Producer(node.address, acks=acks) as producer:  # type: ignore[arg-type]
        mds = await asyncio.gather(*(producer.send(topic, b"%d" % i) for i in range(1000)))
    if acks == 0:
        assert {md.offset for md in mds} == {-1}
    else:
        assert [md.offset for md in mds] == list(range(1000))
    tp = TopicPartition(topic, 0)
    async with Consumer(node.address) as consumer:
        consumer.assign([tp])
        consumer.seek(tp, 0)
        records = await read_all(consumer, 1000)
    assert [r.value for r in records] == [b"%d" % i for i in range(1000)]


@pytest.mark.parametrize("compression", ["lz4", "zstd"])
async def test_compression_round_trip(node: Node, compression: str) -> None:
    topic = await new_topic(node, 2)
    values = [(b"payload %d " % i) * 20 for i in range(5000)]
    async with Producer(node.address, compression=compression) as producer:
        await producer.send_many(topic, values, partition=0)
        md = await producer.send(
            topic, b"with headers", key=b"k", partition=1, headers=[("trace", b"abc"), ("n", None)]
        )
    async with Consumer(node.address, auto_offset_reset="earliest") as consumer:
        consumer.assign([TopicPartition(topic, 0), TopicPartition(topic, 1)])
        records = await read_all(consumer, len(values) + 1)
    assert [r.value for r in records if r.partition == 0] == values
    (hdr,) = [r for r in records if r.partition == 1]
    assert (hdr.offset, hdr.key, hdr.headers) == (md.offset, b"k", [("trace", b"abc"), ("n", None)])


async def test_seek_to_offset_beginning_end_and_time(node: Node) -> None:
    topic = await new_topic(node, 1)
    tp = TopicPartition(topic, 0)
    base_ts = 1_700_000_000_000
    async with Producer(node.address) as producer:
        for i in range(100):
            await producer.send(topic, b"%d" % i, timestamp_ms=base_ts + i * 1000)
    async with Consumer(node.address) as consumer:
        consumer.assign([tp])
        consumer.seek(tp, 42)
        assert [r.offset for r in await read_all(consumer, 58)] == list(range(42, 100))
        assert await consumer.seek_to_beginning() == {tp: 0}
        assert (await read_all(consumer, 1))[0].offset == 0
        assert await consumer.seek_to_end() == {tp: 100}
        assert await consumer.poll(timeout_ms=300) == []
        found = await consumer.seek_to_time(base_ts + 73_500)
        assert found == {tp: 74}
        first = (await read_all(consumer, 1))[0]
        assert (first.offset, first.timestamp_ms) == (74, base_ts + 74_000)
        assert await consumer.seek_to_time(base_ts + 10**9) == {tp: 100}
        # Past the end: the error names the valid range.
        consumer.seek(tp, 5000)
        with pytest.raises(OffsetOutOfRange) as info:
            await read_all(consumer, 1, timeout_s=10)
        assert "100" in str(info.value)


async def test_consumer_follows_new_records(node: Node) -> None:
    topic = await new_topic(node, 1)
    tp = TopicPartition(topic, 0)
    async with Consumer(node.address) as consumer:
        consumer.assign([tp])
        await consumer.seek_to_end()
        async with Producer(node.address, linger_ms=0) as producer:
            for i in range(20):
                await producer.send(topic, b"%d" % i)
                got = await read_all(consumer, 1, timeout_s=10)
                assert [r.value for r in got] == [b"%d" % i]


async def test_producer_and_consumer_survive_a_node_restart(node: Node) -> None:
    topic = await new_topic(node, 1)
    tp = TopicPartition(topic, 0)
    async with Producer(node.address, linger_ms=1, retry_backoff_ms=50) as producer:
        async with Consumer(node.address, auto_offset_reset="earliest") as consumer:
            consumer.assign([tp])
            await producer.send_many(topic, [b"a%d" % i for i in range(5000)])
            first = await read_all(consumer, 5000)
            node.stop()
            pending = producer.send_many(topic, [b"b%d" % i for i in range(5000)])
            await asyncio.sleep(0.5)
            await asyncio.get_running_loop().run_in_executor(None, node.start)
            await pending
            second = await read_all(consumer, 5000)
    values = [r.value for r in first + second]
    assert values == [b"a%d" % i for i in range(5000)] + [b"b%d" % i for i in range(5000)]
    assert [r.offset for r in first + second] == list(range(10_000))


async def test_admin_operations(node: Node) -> None:
    async with Admin(node.address) as admin:
        name = f"adm-{int(time.time() * 1000) % 100000}"
        assert await admin.create_topics(name, 3, 1, {"retention.ms": "60000"}) == [name]
        with pytest.raises(TopicExists):
            await admin.create_topics(name, 3)
        with pytest.raises(InvalidTopic):
            await admin.create_topics("bad/name", 1)
        assert name in await admin.list_topics()
        (desc,) = await admin.describe_topics(name)
        assert len(desc.partitions) == 3 and desc.configs["retention.ms"] == "60000"
        altered = await admin.alter_topic_config(
            name, set={"retention.bytes": "1000000"}, delete=["retention.ms"]
        )
        assert set(altered.overrides) == {"retention.bytes"}
        view = await admin.metadata()
        assert view.nodes[0].address == node.address
        assert await admin.delete_topics(name) == [name]
        with pytest.raises(UnknownTopic):
            await admin.describe_topics(name)


def test_sync_facades(node: Node, tmp_path: Path) -> None:
    name = f"sync-{int(time.time() * 1000) % 100000}"
    with SyncAdmin(node.address) as admin:
        admin.create_topics(name, 2)
        assert name in admin.list_topics()
    with SyncProducer(node.address) as producer:
        futures = [producer.send(name, b"%d" % i, key=b"k") for i in range(100)]
        offsets = [f.result(timeout=30).offset for f in futures]
        assert offsets == list(range(100))
        batches = producer.send_many(name, [b"x"] * 10, partition=0).result(timeout=30)
        assert sum(b.record_count for b in batches) == 10
        producer.flush()
    with SyncConsumer(node.address, auto_offset_reset="earliest") as consumer:
        consumer.assign(consumer.partitions_for(name))
        got: list[ConsumerRecord] = []
        deadline = time.monotonic() + 30
        while len(got) < 110 and time.monotonic() < deadline:
            got += consumer.poll(timeout_ms=500)
        assert len(got) == 110
        part = partition_for_key(b"k", 2)
        assert [r.value for r in got if r.key == b"k"] == [b"%d" % i for i in range(100)]
        assert all(r.partition == part for r in got if r.key == b"k")
        assert consumer.end_offsets(consumer.assignment())[TopicPartition(name, 0)] >= 10
