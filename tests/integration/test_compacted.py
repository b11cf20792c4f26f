"""Compacted topics against real node processes (``python -m tidelog.node`` on 127.0.0.1,
free ports, temporary directories, killed at the end).

* one node: a tombstone (null value) and an empty value stay distinct from the client (async
  and sync facades, ``send`` and ``send_many``) and the CLI (``produce -Z``, JSON ``null``) to
  the consumer; a record without a key is refused with KEY_REQUIRED and nothing of its
  request is stored; the node's RocksDB table (read after a stop) is the replay of the log;
* three nodes: the partition leader is SIGKILLed during a produce of updates and tombstones;
  the dead node's stored table equals the replay of the committed log up to its applied
  offset; the new leader goes on; the killed node restarts as a follower that was down and
  catches up, and every replica's table ends equal, at the same offset, to the replay.

A table is read from a stopped (or killed) node's RocksDB with ``node.table.stored_tables``
until the Table service exists.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.test_client_cli import ok, one_error_line, tidelog
from tests.support.nodeproc import Cluster, Node, spawn_cluster, until
from tidelog.client import (
    Admin,
    Consumer,
    Producer,
    SyncConsumer,
    SyncProducer,
    TopicPartition,
)
from tidelog.errors import KeyRequired, TidelogError
from tidelog.node.metastore import MetaStore
from tidelog.node.table import StoredTable, stored_tables

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

#: (offset, key, value) of the records of one partition, in log order.
Log = list[tuple[int, bytes | None, bytes | None]]


def replay(records: Log, upto: int) -> dict[bytes, tuple[int, bytes]]:
    out: dict[bytes, tuple[int, bytes]] = {}
    for offset, key, value in records:
        if offset >= upto or key is None:
            continue
        if value is None:
            out.pop(key, None)
        else:
            out[key] = (offset, value)
    return out


def rows(t: StoredTable) -> dict[bytes, tuple[int, bytes]]:
    return {r.key: (r.offset, r.value) for r in t.rows}


def tables_of(data_dir: Path, topic: str) -> dict[int, StoredTable]:
    """partition -> its table, from a node's RocksDB (the node must not be running)."""
    store = MetaStore(data_dir / "meta")
    try:
        out = {}
        for t in stored_tables(store):
            name, partition, _topic_id = t.identity.rsplit("/", 2)
            if name == topic:
                out[int(partition)] = t
        return out
    finally:
        store.close()


async def read_partitions(bootstrap: str, topic: str, ends: dict[int, int]) -> dict[int, Log]:
    out: dict[int, Log] = {p: [] for p in ends}
    async with Consumer(bootstrap, auto_offset_reset="earliest") as consumer:
        consumer.assign([TopicPartition(topic, p) for p in ends])
        remaining = {p for p, end in ends.items() if end > 0}
        async with asyncio.timeout(60):
            while remaining:
                for r in await consumer.poll(timeout_ms=500):
                    if r.offset < ends[r.partition]:
                        out[r.partition].append((r.offset, r.key, r.value))
                    if r.offset >= ends[r.partition] - 1:
                        remaining.discard(r.partition)
    return out


# ---- one node --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    base = tmp_path_factory.mktemp("compacted-node")
    n = Node(base / "data", base / "node.log")
    n.start()
    try:
        yield n
    finally:
        n.kill()


async def test_tombstones_empty_values_and_required_keys_end_to_end(node: Node) -> None:
    topic = f"rates-{int(time.time() * 1000) % 100000}"
    async with Admin(node.address) as admin:
        await admin.create_topics(topic, 1, 1, {"cleanup.policy": "compact"})
    tp = TopicPartition(topic, 0)
    async with Producer(node.address, acks="all", linger_ms=1) as producer:
        await producer.send(topic, b"1.10", key=b"EURUSD")
        await producer.send(topic, b"", key=b"EMPTY")  # an empty value, not a tombstone
        await producer.send(topic, b"150.2", key=b"USDJPY")
        await producer.send(topic, None, key=b"USDJPY")  # a tombstone
        await producer.send_many(topic, [b"0.86", None, b"0.87"], [b"EURGBP"] * 3)
        with pytest.raises(KeyRequired) as refused:
            await producer.send(topic, b"no key")
        assert topic in str(refused.value) and "compacted" in str(refused.value)
        assert refused.value.reason == "KEY_REQUIRED"
        # A request with a keyless record among keyed ones stores none of them.
        with pytest.raises(KeyRequired):
            await producer.send_many(topic, [b"a", b"b"], [b"K1", None], partition=0)
    with SyncProducer(node.address, acks="all") as sync_producer:
        sync_producer.send(topic, None, key=b"EURUSD").result(timeout=30)  # tombstone
        sync_producer.send(topic, b"1.09", key=b"EURUSD").result(timeout=30)
        with pytest.raises(KeyRequired):
            sync_producer.send(topic, b"no key").result(timeout=30)
    # The CLI: -Z sends an empty value as null; a JSON null value is a tombstone too.
    ok(tidelog(node, "produce", topic, "--key-separator", "=", "-Z", stdin=b"EMPTY=\nCLI=x\n"))
    ok(
        tidelog(
            node, "produce", topic, "--format", "json", stdin=b'{"key": "CLI", "value": null}\n'
        )
    )
    line = one_error_line(tidelog(node, "produce", topic, stdin=b"keyless\n"), 1)
    assert "without a key" in line and "compacted" in line, line

    expected: Log = [
        (0, b"EURUSD", b"1.10"),
        (1, b"EMPTY", b""),
        (2, b"USDJPY", b"150.2"),
        (3, b"USDJPY", None),
        (4, b"EURGBP", b"0.86"),
        (5, b"EURGBP", None),
        (6, b"EURGBP", b"0.87"),
        (7, b"EURUSD", None),
        (8, b"EURUSD", b"1.09"),
        (9, b"EMPTY", None),
        (10, b"CLI", b"x"),
        (11, b"CLI", None),
    ]
    got = (await read_partitions(node.address, topic, {0: len(expected)}))[0]
    assert got == expected  # nothing of a refused request is in the log
    with SyncConsumer(node.address, auto_offset_reset="earliest") as sc:
        sc.assign([tp])
        synced = sc.poll(timeout_ms=5_000, until_end=True)
        while len(synced) < len(expected):
            more = sc.poll(timeout_ms=5_000, until_end=True)
            assert more
            synced += more
    assert [(r.offset, r.key, r.value) for r in synced] == expected
    json_out = ok(
        tidelog(node, "consume", topic, "--from-beginning", "--max", "4", "--format", "json")
    )
    assert '"value": null' in json_out.splitlines()[3]

    node.stop()  # SIGTERM; the table is read from its RocksDB
    try:
        table = tables_of(node.data_dir, topic)[0]
        assert table.applied_offset == len(expected)
        assert (
            rows(table)
            == replay(expected, len(expected))
            == {
                b"EURUSD": (8, b"1.09"),
                b"EURGBP": (6, b"0.87"),
            }
        )
    finally:
        node.start()


# ---- three nodes: failover and catch-up ------------------------------------------------------

TOPIC = "compacted-failover"
NODES = (1, 2, 3)
KEYS = 200


@pytest.fixture(scope="module")
def procs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[int, Node]]:
    nodes = spawn_cluster(tmp_path_factory.mktemp("compacted-cluster"), NODES)
    try:
        yield nodes
    finally:
        for n in nodes.values():
            n.kill()


class Updates:
    """An acks=all producer of updates to ``KEYS`` keys of partition 0 (every 7th a
    tombstone), one request in flight, until stopped."""

    def __init__(self, bootstrap: str) -> None:
        self.producer = Producer(
            bootstrap,
            acks="all",
            linger_ms=2,
            max_in_flight_per_partition=1,
            request_timeout_ms=2_000,
            delivery_timeout_ms=120_000,
            retries=1_000_000,
            retry_backoff_ms=20,
        )
        self.acked = 0
        self.failed = 0
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.producer.start()
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        seq = 0
        while not self._stop.is_set():
            futs = []
            for _ in range(20):
                key = b"key-%d" % (seq * 37 % KEYS)
                value = None if seq % 7 == 3 else b"value-%d" % seq
                futs.append(self.producer.send(TOPIC, value, key=key, partition=0))
                seq += 1
            for f in futs:
                try:
                    await f
                    self.acked += 1
                except TidelogError:
                    self.failed += 1
            await asyncio.sleep(0.005)

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task
        await self.producer.stop()


async def test_failover_and_catch_up_keep_every_table_the_replay(procs: dict[int, Node]) -> None:
    c = Cluster(procs, TOPIC)
    try:
        await c.wait_all_alive()
        async with Admin(c.bootstrap) as admin:
            await admin.create_topics(TOPIC, 1, 3, {"cleanup.policy": "compact"})

        async def led() -> bool:
            return 0 in await c.leaders()

        await until("partition 0 has a leader", led)
        load = Updates(c.bootstrap)
        await load.start()
        try:

            async def acked(n: int) -> bool:
                return load.acked >= n

            await until("updates are acknowledged", lambda: acked(1_500), 60)
            old = (await c.leaders())[0]
            procs[old].kill()  # SIGKILL of the leader, during the produce
            # The dead node's table, as it was when it died.
            dead = tables_of(procs[old].data_dir, TOPIC)[0]
            others = tuple(n for n in NODES if n != old)

            async def new_leader() -> bool:
                return 0 in await c.leaders(others)

            await until("a new leader", new_leader, 30)
            before = load.acked
            await until("updates go on after the failover", lambda: acked(before + 1_500), 60)
            procs[old].start()  # back as a follower that was down while updates went on
            target = load.acked + 500
            await until("more updates", lambda: acked(target), 60)
        finally:
            await load.stop()
        assert load.acked > 3_500

        async def caught_up() -> bool:
            ds = [await c.digests(n) for n in NODES]
            hws = {d[0].high_watermark for d in ds}
            crcs = {(d[0].digest_end_offset, d[0].crc32c) for d in ds}
            return len(hws) == 1 and len(crcs) == 1

        await until("every replica holds the same committed log", caught_up, 60)
        hw = (await c.digests(1))[0].high_watermark
        log = (await read_partitions(c.bootstrap, TOPIC, {0: hw}))[0]
        offsets = [o for o, _k, _v in log]
        assert offsets == sorted(set(offsets)) and len(offsets) >= load.acked
        # The killed leader's table was exactly the replay up to where it had applied.
        assert 0 < dead.applied_offset <= hw
        assert rows(dead) == replay(log, dead.applied_offset)
    finally:
        await c.close()
        for proc in procs.values():
            proc.stop()
    tables = {n: tables_of(procs[n].data_dir, TOPIC)[0] for n in NODES}
    expected = replay(log, hw)
    assert len(expected) > KEYS // 2
    for n, t in tables.items():
        assert t.applied_offset == hw, (n, t.applied_offset, hw)
        assert rows(t) == expected, n


def test_bench_produce_with_keys_on_a_compacted_topic(node: Node) -> None:
    import json

    name = f"bench-compact-{int(time.time() * 1000) % 100000}"
    args = ["bench", "produce", "--topic", name, "--records", "5000", "--keys", "100"]
    report = json.loads(ok(tidelog(node, *args, "-c", "cleanup.policy=compact", "--json")))
    assert report["records"] == 5000 and report["keys"] == 100
    assert report["topic_configs"] == {"cleanup.policy": "compact"}
    (desc,) = json.loads(ok(tidelog(node, "topic", "describe", name, "--json")))
    assert desc["configs"]["cleanup.policy"] == "compact"
    assert sum(p["high_watermark"] for p in desc["partitions"]) == 5000
