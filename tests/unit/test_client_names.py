"""The names Kafka's Python users know (issue 16 items 3 and 6): compression_type and the codecs
tidelog lacks, serializers and deserializers, one partitions_for answer on both sides, and
bytes-like keys or wrong key types met with a tidelog error that says what to do."""

from __future__ import annotations

import json
from typing import Any, cast

import pytest

from tests.unit.client_fakes import FakeCluster
from tidelog.client import Consumer, Producer, SyncProducer, TopicPartition
from tidelog.client.partitioner import partition_for_key
from tidelog.errors import InvalidRecord
from tidelog.records import Codec

pytestmark = pytest.mark.timeout(60)


def test_compression_type_is_an_alias_and_unsupported_codecs_are_named() -> None:
    p = Producer("127.0.0.1:1", compression_type="zstd")
    assert p._codec is Codec.ZSTD
    assert Producer("127.0.0.1:1", compression_type=None)._codec is Codec.NONE
    for codec in ("gzip", "snappy", "GZIP"):
        with pytest.raises(ValueError, match="does not implement: choose one of none, lz4, zstd"):
            Producer("127.0.0.1:1", compression_type=codec)
    with pytest.raises(ValueError, match="not both"):
        Producer("127.0.0.1:1", compression="lz4", compression_type="zstd")


async def test_serializers_and_deserializers_round_trip() -> None:
    async with (
        FakeCluster({"j": 3}) as fake,
        Producer(
            fake.address,
            key_serializer=str.encode,
            value_serializer=lambda v: json.dumps(v).encode(),
        ) as p,
    ):
        md = await p.send("j", {"n": 1}, key="user-1")
        assert md.partition == partition_for_key(b"user-1", 3)
        tomb = await p.send("j", None, key="user-1")  # None is never serialized
        await p.send_many("j", [{"n": 2}, {"n": 3}], keys=["user-1", "user-1"])
        stored = fake.log("j", md.partition)
        assert [r.value for r in stored] == [b'{"n": 1}', None, b'{"n": 2}', b'{"n": 3}']
        assert tomb.offset == 1
        async with Consumer(
            fake.address,
            key_deserializer=bytes.decode,
            value_deserializer=json.loads,
        ) as c:
            tp = TopicPartition("j", md.partition)
            c.assign([tp])
            c.seek(tp, 0)
            records = await c.poll(timeout_ms=5000)
            # ConsumerRecord is typed for bytes; deserializers put their own types there.
            pairs: list[tuple[object, object]] = [(r.key, r.value) for r in records]
            assert pairs == [
                ("user-1", {"n": 1}),
                ("user-1", None),
                ("user-1", {"n": 2}),
                ("user-1", {"n": 3}),
            ]
        async with Consumer(fake.address, value_deserializer=int) as c:
            c.assign([tp])
            await c.seek_to_beginning()
            with pytest.raises(InvalidRecord, match=rf"j/{tp.partition} offset 0.*seek\("):
                await c.poll(timeout_ms=5000)


async def test_a_serializer_returning_the_wrong_type_is_a_clear_error() -> None:
    async with (
        FakeCluster({"t": 1}) as fake,
        Producer(fake.address, value_serializer=cast(Any, str)) as p,
    ):
        with pytest.raises(InvalidRecord, match="returned str, not bytes"):
            p.send("t", 5)


async def test_partitions_for_has_one_answer_on_both_sides() -> None:
    async with FakeCluster({"m": 3}) as fake, Producer(fake.address) as p:
        async with Consumer(fake.address) as c:
            expected = [TopicPartition("m", i) for i in range(3)]
            assert await p.partitions_for("m") == expected
            assert await c.partitions_for("m") == expected


def test_sync_producer_partitions_for_matches() -> None:
    import asyncio
    import threading

    ready = threading.Event()
    stop = asyncio.Event()
    address: list[str] = []

    async def serve() -> None:
        async with FakeCluster({"m": 2}) as fake:
            address.append(fake.address)
            ready.set()
            await stop.wait()

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),))
    thread.start()
    try:
        assert ready.wait(10)
        with SyncProducer(address[0]) as p:
            assert p.partitions_for("m") == [TopicPartition("m", 0), TopicPartition("m", 1)]
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(10)
        loop.close()


async def test_bytes_like_keys_are_accepted_and_other_types_explained() -> None:
    async with FakeCluster({"k": 5}) as fake, Producer(fake.address) as p:
        want = partition_for_key(b"abc", 5)
        md1 = await p.send("k", bytearray(b"v1"), key=bytearray(b"abc"))
        md2 = await p.send("k", memoryview(b"v2"), key=memoryview(b"xabc")[1:])
        assert md1.partition == md2.partition == want
        await p.send_many("k", [b"v3"], keys=[bytearray(b"abc")])
        assert [(r.key, r.value) for r in fake.log("k", want)] == [
            (b"abc", b"v1"),
            (b"abc", b"v2"),
            (b"abc", b"v3"),
        ]
        with pytest.raises(InvalidRecord, match=r"not str: pass key.encode\(\).*key_serializer"):
            p.send("k", b"v", key="abc")
        with pytest.raises(InvalidRecord, match="value must be bytes or None, not int"):
            p.send("k", 42)
