"""The Table API against a real 3-node cluster (``python -m tidelog.node`` processes on
127.0.0.1, free ports, temporary directories, killed at the end): get, get_many, scan and watch
of a compacted topic after updates and tombstones, reads of one's own writes, watches started
before and during updates seeing every change exactly once, resumed watches, clear errors for
bad input, and the ``tidelog table`` verbs."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
from grpc import aio

from tests.support.nodeproc import Cluster, Node, spawn_cluster
from tidelog.client import (
    Admin,
    Producer,
    RecordMetadata,
    SyncAdmin,
    SyncProducer,
    SyncTable,
    Table,
    TableChange,
)
from tidelog.client.partitioner import partition_for_key
from tidelog.errors import (
    InvalidToken,
    KeyTooLarge,
    NotATable,
    ScanExpired,
    TidelogError,
    UnknownTopic,
    from_rpc_error,
)
from tidelog.v1 import table_pb2, table_pb2_grpc

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

NODES = (1, 2, 3)
PARTITIONS = 3
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def procs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[int, Node]]:
    nodes = spawn_cluster(tmp_path_factory.mktemp("table-cluster"), NODES, security="secret")
    try:
        yield nodes
    finally:
        for n in nodes.values():
            n.kill()


@pytest.fixture
async def cluster(procs: dict[int, Node]) -> AsyncIterator[Cluster]:
    c = Cluster(procs, "unused")
    await c.wait_all_alive(60)
    try:
        yield c
    finally:
        await c.close()


_seq = 0


async def new_topic(cluster: Cluster, policy: str = "compact", **configs: str) -> str:
    global _seq
    _seq += 1
    name = f"table-{_seq}-{os.getpid() % 1000}"
    async with Admin(cluster.bootstrap) as admin:
        await admin.create_topics(name, PARTITIONS, 3, {"cleanup.policy": policy, **configs})
    return name


def key(i: int) -> bytes:
    return b"k%04d" % i


async def produce_updates(
    bootstrap: str, topic: str, keys: range, rounds: int, tombstones: range
) -> tuple[dict[bytes, bytes], list[RecordMetadata]]:
    """``rounds`` values for every key, then tombstones; the expected table and every
    record's metadata, in send order per partition."""
    expected: dict[bytes, bytes] = {}
    mds: list[RecordMetadata] = []
    async with Producer(bootstrap, acks="all", linger_ms=2) as producer:
        for r in range(rounds):
            futs = [producer.send(topic, b"v%d-%d" % (i, r), key=key(i)) for i in keys]
            mds += await asyncio.gather(*futs)
            expected.update({key(i): b"v%d-%d" % (i, r) for i in keys})
        futs = [producer.send(topic, None, key=key(i)) for i in tombstones]
        mds += await asyncio.gather(*futs)
        for i in tombstones:
            expected.pop(key(i), None)
    return expected, mds


def last_offsets(mds: list[RecordMetadata]) -> dict[int, int]:
    out: dict[int, int] = {}
    for md in mds:
        out[md.partition] = max(out.get(md.partition, -1), md.offset)
    return out


async def test_get_get_many_and_scan_after_updates_and_tombstones(cluster: Cluster) -> None:
    topic = await new_topic(cluster)
    expected, mds = await produce_updates(cluster.bootstrap, topic, range(300), 3, range(0, 300, 7))
    written = last_offsets(mds)
    async with Table(cluster.bootstrap, topic) as table:
        # get_many: every key at once (tombstoned ones absent), after the last writes.
        rows = await table.get_many([key(i) for i in range(300)], min_offsets=written)
        assert {k: r.value for k, r in rows.items()} == expected
        for k, r in rows.items():
            assert r.partition == partition_for_key(k, PARTITIONS) == table.partition_for(k)
        # get: a live key, a tombstoned key, a key never written.
        row = await table.get(key(1))
        assert row is not None and row.value == b"v1-2"
        assert await table.get(key(7)) is None
        assert await table.get(b"never") is None
        # scan: small pages, so the continuation token carries the scan across pages.
        scanned: dict[bytes, bytes] = {}
        per_part: dict[int, list[bytes]] = {}
        applied: dict[int, set[int]] = {}
        async for page in table.scan(page_size=17):
            assert len(page.rows) <= 17
            for r in page.rows:
                scanned[r.key] = r.value
                per_part.setdefault(page.partition, []).append(r.key)
            applied.setdefault(page.partition, set()).add(page.applied_offset)
        assert scanned == expected
        for p, ks in per_part.items():
            assert ks == sorted(ks), f"partition {p} not in key order"
            assert len(applied[p]) == 1, "every page of a partition's scan is one snapshot"
            assert applied[p].pop() > written[p]
        # prefix and range.
        pre = {r.key async for page in table.scan(prefix=b"k01") for r in page.rows}
        assert pre == {k for k in expected if k.startswith(b"k01")}
        rng = {
            r.key
            async for page in table.scan(start=b"k0100", end=b"k0150", page_size=5)
            for r in page.rows
        }
        assert rng == {k for k in expected if b"k0100" <= k < b"k0150"}
        contents = await table.read_all()
        assert {k: r.value for k, r in contents.rows.items()} == expected
        assert set(contents.offsets) == set(range(PARTITIONS))


async def test_read_your_own_writes(cluster: Cluster) -> None:
    topic = await new_topic(cluster)
    async with (
        Producer(cluster.bootstrap, acks="all", linger_ms=0) as producer,
        Table(cluster.bootstrap, topic) as table,
    ):
        for i in range(40):
            md = await producer.send(topic, b"value-%d" % i, key=b"counter")
            row = await table.get(b"counter", min_offset=md.offset)
            assert row is not None and row.value == b"value-%d" % i and row.offset == md.offset
            if i % 10 == 9:
                md = await producer.send(topic, None, key=b"counter")
                assert await table.get(b"counter", min_offset=md.offset) is None
        # Linearizable reads, on the partition just written (a ReadIndex round on a partition
        # idle since its election times out today, ListOffsets' too: see the report).
        async with Table(cluster.bootstrap, topic, linearizable=True) as strict:
            md = await producer.send(topic, b"strict", key=b"counter")
            row = await strict.get(b"counter", min_offset=md.offset)
            assert row is not None and row.value == b"strict"
            page = await anext(strict.scan(prefix=b"counter", partition=md.partition))
            assert [r.value for r in page.rows] == [b"strict"]
        many = [await producer.send(topic, b"x%d" % i, key=b"m%d" % i) for i in range(30)]
        rows = await table.get_many([b"m%d" % i for i in range(30)], min_offsets=last_offsets(many))
        assert len(rows) == 30


async def collect(
    watch: AsyncIterator[TableChange], until: dict[int, int], positions: dict[int, int]
) -> list[TableChange]:
    """Changes until every partition's position passed ``until``."""
    out: list[TableChange] = []
    async with asyncio.timeout(60):
        while any(positions.get(p, 0) <= o for p, o in until.items()):
            try:
                async with asyncio.timeout(0.5):
                    out.append(await anext(watch))
            except TimeoutError:
                continue
    return out


def replay(changes: list[TableChange]) -> dict[bytes, bytes]:
    table: dict[bytes, bytes] = {}
    for c in changes:
        if c.value is None:
            table.pop(c.key, None)
        else:
            table[c.key] = c.value
    return table


async def test_watch_started_before_and_during_updates_sees_every_change_once(
    cluster: Cluster,
) -> None:
    topic = await new_topic(cluster)
    _, mds1 = await produce_updates(cluster.bootstrap, topic, range(50), 1, range(0))
    async with Table(cluster.bootstrap, topic) as table:
        early = table.watch()
        # Updates while the early watch runs; the late watch starts halfway.
        _, mds2 = await produce_updates(cluster.bootstrap, topic, range(50), 2, range(0, 50, 5))
        late = table.watch()
        _, mds3 = await produce_updates(cluster.bootstrap, topic, range(25, 75), 2, range(1, 75, 9))
        # The full expected table: replay every record in offset order per partition.
        all_mds = mds1 + mds2 + mds3
        written = last_offsets(all_mds)
        async with Table(cluster.bootstrap, topic) as check:
            truth = {
                k: r.value
                for k, r in (
                    await check.get_many([key(i) for i in range(75)], min_offsets=written)
                ).items()
            }
        for w in (early, late):
            changes = await collect(w, written, w.positions)
            assert w.snapshot_done
            assert replay(changes) == truth
            # Per partition: the snapshot rows first, then exactly the records at or after
            # the offset the snapshot reflects: each once, in order, none missing.
            live = [c for c in changes if not c.snapshot]
            for p in range(PARTITIONS):
                kinds = [c.snapshot for c in changes if c.partition == p]
                assert kinds == sorted(kinds, reverse=True), "a change before the snapshot"
                since = w.snapshot_offsets[p]
                offsets = [c.offset for c in live if c.partition == p]
                produced = sorted(
                    md.offset for md in all_mds if md.partition == p and md.offset >= since
                )
                assert offsets == produced
                assert all(c.offset < since for c in changes if c.snapshot and c.partition == p)
            await w.close()


async def test_watch_resumes_from_an_offset_without_a_snapshot(cluster: Cluster) -> None:
    topic = await new_topic(cluster)
    _, mds = await produce_updates(cluster.bootstrap, topic, range(60), 2, range(0, 60, 4))
    p = mds[0].partition
    in_p = sorted(md.offset for md in mds if md.partition == p)
    resume_at = in_p[len(in_p) // 2]
    async with Table(cluster.bootstrap, topic) as table:
        w = table.watch(from_offsets={p: resume_at}, partitions=[p])
        changes = await collect(w, {p: in_p[-1]}, w.positions)
        await w.close()
        assert not any(c.snapshot for c in changes)
        assert [c.offset for c in changes] == [o for o in in_p if o >= resume_at]
        assert w.positions[p] == in_p[-1] + 1
        # The watch of a copy kept by read_all: nothing new, then one change, exactly.
        contents = await table.read_all()
        w2 = table.watch(from_offsets=contents.offsets)
        async with Producer(cluster.bootstrap) as producer:
            md = await producer.send(topic, b"new", key=key(3))
        got = await collect(w2, {md.partition: md.offset}, w2.positions)
        await w2.close()
        assert [(c.key, c.value, c.offset) for c in got] == [(key(3), b"new", md.offset)]


async def leader_stub(
    cluster: Cluster, topic: str, partition: int
) -> table_pb2_grpc.TableAsyncStub:
    md = await cluster.metadata(1)
    assert md is not None
    t = next(t for t in md.topics if t.name == topic)
    leader = next(p.leader for p in t.partitions if p.partition == partition)
    return table_pb2_grpc.TableStub(cluster.channel(leader))  # type: ignore[return-value]


async def rpc_error(call: object) -> aio.AioRpcError:
    with pytest.raises(aio.AioRpcError) as info:
        await call  # type: ignore[misc]
    return info.value


async def test_bad_input_gets_clear_errors(cluster: Cluster) -> None:
    compacted = await new_topic(cluster, **{"max.message.bytes": "4096"})
    plain = await new_topic(cluster, policy="delete")
    async with Table(cluster.bootstrap, compacted) as table:
        await table.get(b"warm-up")
    stub = table_pb2_grpc.TableStub(cluster.channel(1))
    # Unknown topic: NOT_FOUND.
    e = await rpc_error(stub.Get(table_pb2.TableGetRequest(topic="no-such-topic", key=b"k")))
    assert e.code() == grpc.StatusCode.NOT_FOUND
    assert isinstance(from_rpc_error(e), UnknownTopic)
    with pytest.raises(UnknownTopic):
        async with Table(cluster.bootstrap, "no-such-topic", metadata_wait_ms=300):
            pass
    # A delete-policy topic: FAILED_PRECONDITION naming cleanup.policy.
    e = await rpc_error(stub.Get(table_pb2.TableGetRequest(topic=plain, key=b"k")))
    assert e.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "cleanup.policy=delete" in (e.details() or "")
    assert isinstance(from_rpc_error(e), NotATable)
    async with Table(cluster.bootstrap, plain) as t:
        with pytest.raises(NotATable, match=r"cleanup\.policy"):
            await t.get(b"k")
    # A key over the topic's limit: INVALID_ARGUMENT, from the leader and through the client.
    lead = await leader_stub(cluster, compacted, 0)
    e = await rpc_error(lead.Get(table_pb2.TableGetRequest(topic=compacted, key=b"x" * 5000)))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert isinstance(from_rpc_error(e), KeyTooLarge)
    async with Table(cluster.bootstrap, compacted) as t:
        with pytest.raises(KeyTooLarge, match="5000 bytes"):
            await t.get(b"x" * 5000)
        with pytest.raises(KeyTooLarge):
            await t.get_many([b"ok", b"y" * 5000])
    # A malformed continuation token: INVALID_ARGUMENT.
    e = await rpc_error(
        lead.Scan(table_pb2.TableScanRequest(topic=compacted, continuation_token=b"garbage"))
    )
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
    err = from_rpc_error(e)
    assert isinstance(err, InvalidToken) and "malformed continuation token" in str(err)


def tidelog_cli(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "tidelog", *args],
        input=stdin,
        capture_output=True,
        timeout=60,
        cwd=ROOT,
        env={**os.environ, "TIDELOG_CLUSTER_DIR": "/nonexistent"},
    )


async def test_cli_table_verbs(cluster: Cluster) -> None:
    topic = await new_topic(cluster)
    b = cluster.bootstrap
    produced = tidelog_cli(
        "produce", topic, "--key-separator", ":", "-b", b, stdin=b"a:1\nb:2\nc:3\na:4\n"
    )
    assert produced.returncode == 0, produced.stderr
    tomb = tidelog_cli("produce", topic, "--key-separator", ":", "-Z", "-b", b, stdin=b"c:\n")
    assert tomb.returncode == 0, tomb.stderr
    async with Table(b, topic) as t:
        async with asyncio.timeout(20):
            while await t.get(b"c") is not None or await t.get(b"a") is None:
                await asyncio.sleep(0.1)
    loop = asyncio.get_running_loop()
    got = await loop.run_in_executor(None, tidelog_cli, "table", "get", topic, "a", "-b", b)
    assert got.returncode == 0, got.stderr
    assert got.stdout == b"4\n"
    missing = await loop.run_in_executor(None, tidelog_cli, "table", "get", topic, "c", "-b", b)
    assert missing.returncode == 1
    assert missing.stderr.decode().startswith("error: ") and b"not in the table" in missing.stderr
    assert missing.stderr.count(b"\n") == 1
    dump = await loop.run_in_executor(None, tidelog_cli, "table", "dump", topic, "-b", b)
    assert dump.returncode == 0, dump.stderr
    assert sorted(dump.stdout.splitlines()) == [b"a\t4", b"b\t2"]
    js = await loop.run_in_executor(
        None, tidelog_cli, "table", "dump", topic, "--json", "--prefix", "b", "-b", b
    )
    assert [json.loads(line)["value"] for line in js.stdout.splitlines()] == ["2"]
    watch = await loop.run_in_executor(
        None, tidelog_cli, "table", "watch", topic, "--timeout-ms", "1500", "-b", b
    )
    assert watch.returncode == 0, watch.stderr
    assert sorted(watch.stdout.splitlines()) == [b"snapshot\ta\t4", b"snapshot\tb\t2"]
    plain = await new_topic(cluster, policy="delete")
    bad = await loop.run_in_executor(None, tidelog_cli, "table", "get", plain, "a", "-b", b)
    assert bad.returncode == 1
    assert b"cleanup.policy=delete" in bad.stderr and bad.stderr.count(b"\n") == 1
    unknown = await loop.run_in_executor(
        None, tidelog_cli, "table", "dump", "no-such-topic", "-b", b
    )
    assert unknown.returncode == 1 and unknown.stderr.startswith(b"error: ")


async def test_the_exchange_rates_example(cluster: Cluster) -> None:
    """examples/exchange_rates.py, as the README runs it (here against this cluster): the
    payments service's copy kept by read_all + watch equals the table at the end."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(ROOT / "examples" / "exchange_rates.py"),
        "--bootstrap",
        cluster.bootstrap,
        "--rounds",
        "6",
        "--interval",
        "0.05",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=ROOT,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, (out + err).decode()[-3000:]
    text = out.decode()
    assert "local copy matches the table (7 pairs, USD/SEK delisted)" in text
    assert "USD/SEK delisted" in text and " USD" in text


def test_the_sync_facade(procs: dict[int, Node]) -> None:
    bootstrap = ",".join(n.address for n in procs.values())
    deadline = time.monotonic() + 60
    while True:  # every node up and registered (the async tests' cluster fixture, blocking)
        try:
            with SyncAdmin(bootstrap) as admin:
                view = admin.metadata()
            if view.controller_id > 0 and sum(n.alive for n in view.nodes) == len(NODES):
                break
        except TidelogError:
            pass
        assert time.monotonic() < deadline, "the cluster did not come up"
        time.sleep(0.2)
    topic = "table-sync"
    with SyncAdmin(bootstrap) as admin:
        admin.create_topics(topic, PARTITIONS, 3, {"cleanup.policy": "compact"})
    with SyncProducer(bootstrap) as producer:
        mds = [producer.send(topic, b"s%d" % i, key=key(i)).result() for i in range(20)]
        tomb = producer.send(topic, None, key=key(0)).result()
    with SyncTable(bootstrap, topic) as table:
        row = table.get(key(0), min_offset=tomb.offset)
        assert row is None
        row = table.get(key(5))
        assert row is not None and row.value == b"s5"
        rows = table.get_many([key(i) for i in range(20)], min_offsets=last_offsets(mds))
        assert sorted(rows) == [key(i) for i in range(1, 20)]
        scanned = [r.key for page in table.scan(page_size=4) for r in page.rows]
        assert sorted(scanned) == [key(i) for i in range(1, 20)]
        contents = table.read_all()
        assert len(contents.rows) == 19
        with table.watch() as w:
            snap = [w.next_change(5) for _ in range(19)]
            assert all(c is not None and c.snapshot for c in snap)
            assert w.next_change(0.3) is None
            assert w.snapshot_done
            with SyncProducer(bootstrap) as producer:
                md = producer.send(topic, b"late", key=key(3)).result()
            c = w.next_change(10)
            assert c is not None and not c.snapshot
            assert (c.key, c.value, c.offset) == (key(3), b"late", md.offset)


async def test_reads_and_watch_follow_a_leader_failover(
    cluster: Cluster, procs: dict[int, Node]
) -> None:
    """SIGKILL of a partition's leader: reads go to the new leader, a scan in progress says
    SCAN_EXPIRED (its snapshot was on the old leader), and a watch resumes at the new leader
    with every change exactly once. Last in the module: it restarts the node at the end."""
    topic = await new_topic(cluster)
    _, before = await produce_updates(cluster.bootstrap, topic, range(40), 1, range(0))
    async with Table(cluster.bootstrap, topic) as table:
        await table.get_many([key(0)], min_offsets=last_offsets(before))
        watch = table.watch(partitions=[0])
        snapshot: list[TableChange] = []
        async with asyncio.timeout(20):
            while not watch.snapshot_done:
                snapshot.append(await anext(watch))
        since = watch.snapshot_offsets[0]
        pages = table.scan(partition=0, page_size=2)
        first = await anext(pages)
        assert len(first.rows) == 2
        md = await cluster.metadata(1)
        assert md is not None
        leader = next(t for t in md.topics if t.name == topic).partitions[0].leader
        procs[leader].kill()
        try:
            _, after = await produce_updates(
                cluster.bootstrap, topic, range(40), 2, range(0, 40, 3)
            )
            everything = before + after
            written = last_offsets(everything)
            with pytest.raises(ScanExpired, match="scan expired"):  # before its last page
                async for _ in pages:  # (the page asked before the kill may still come)
                    pass
            changes = await collect(watch, {0: written[0]}, watch.positions)
            await watch.close()
            offsets = [c.offset for c in changes]
            assert offsets == sorted(
                md.offset for md in everything if md.partition == 0 and md.offset >= since
            )
            truth = await table.get_many([key(i) for i in range(40)], min_offsets=written)
            in_p0 = {k: r.value for k, r in truth.items() if r.partition == 0}
            assert replay(snapshot + changes) == in_p0
            base = {k: r.value for k, r in (await table.read_all(partition=0)).rows.items()}
            assert base == in_p0
            assert all(r.partition == partition_for_key(k, PARTITIONS) for k, r in truth.items())
        finally:
            await asyncio.get_running_loop().run_in_executor(None, procs[leader].start)
