"""The log start is the group's: three replicas of real partition logs with different
segment sizes (so their segment boundaries differ) agree on it, because only the leader
decides retention and every replica applies the start it replicates (a control batch). The
in-memory three-node harness is test_multiraft.py's."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from tests.unit.test_multiraft import GROUP, TIMING, VOTERS, Cluster, Net
from tidelog.config import TopicConfig
from tidelog.errors import OffsetOutOfRange
from tidelog.node.auth import Guard
from tidelog.node.broker_service import BrokerService
from tidelog.node.log import PartitionLog
from tidelog.node.metastore import MetaStore
from tidelog.node.metrics import NodeMetrics
from tidelog.node.multiraft import MultiRaft
from tidelog.node.partition import Partition, decode_log_start, log_start_batch
from tidelog.node.raft.types import EntryKind
from tidelog.node.replica_storage import HardStateStore, decode_snapshot, entry_kind
from tidelog.records import (
    decode_batches,
    encode_batch,
    iter_headers,
    unpack_header,
    validate_batches,
)
from tidelog.v1 import broker_pb2 as pb

DAY_MS = 24 * 3600 * 1000
#: Segment sizes per node: the boundaries differ between the replicas.
SEGMENT_BYTES = {1: 4096, 2: 9000, 3: 6000}
VALUE = b"x" * 300


def config_of(node: int) -> TopicConfig:
    return TopicConfig.from_overrides(
        {"segment.bytes": str(SEGMENT_BYTES[node]), "retention.ms": str(DAY_MS)}
    )


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    net = Net()
    stores = {}
    for n in (1, 2, 3):
        stores[n] = MetaStore(tmp_path / f"n{n}" / "meta")
        raft = MultiRaft(n, HardStateStore(stores[n]), NodeMetrics(), TIMING, sender=net.sender(n))
        net.nodes[n] = raft
        raft.start()
    yield Cluster(tmp_path, net, stores)
    for raft in net.nodes.values():
        await raft.stop()
    for s in stores.values():
        s.close()


async def produce(p: Partition, count: int, ts: int) -> None:
    for _ in range(count):
        buf = encode_batch([VALUE], timestamps_ms=ts)
        _base, _last, index, term = p.propose(buf, validate_batches(buf))
        await p.wait_committed(index, term, 5)


async def until(cond: Any, timeout_s: float = 10) -> None:
    async with asyncio.timeout(timeout_s):
        while not cond():
            await asyncio.sleep(0.01)


def bases_of(p: Partition) -> list[int]:
    """The base offsets of ``p``'s segments."""
    assert isinstance(p.log, PartitionLog)
    return p.log.segment_base_offsets


def node_of(p: Partition) -> int:
    assert p.group is not None
    return p.group.raw.id


async def earliest(p: Partition) -> int:
    """What ListOffsets EARLIEST answers on ``p`` (the service's own code)."""
    service = SimpleNamespace(
        guard=Guard(), registry=SimpleNamespace(partition=lambda _t, _i: (None, p))
    )
    request = pb.ListOffsetsRequest(topic="t", partition=0, spec=pb.OFFSET_SPEC_EARLIEST)
    handler = BrokerService.ListOffsets.__wrapped__  # type: ignore[attr-defined]
    response = await handler(service, request, None)
    assert response.log_start_offset == response.offset
    return int(response.offset)


async def move_leader(cluster: Cluster, to: Partition) -> None:
    """Transfer the leadership from the serving leader to ``to``; return once it serves."""
    now = await cluster.leader()
    assert now.group is not None
    now.group.raw.transfer_leadership(node_of(to))
    cluster.net.nodes[node_of(now)].touch(now.group)
    await until(lambda: to.serving)


def readable(p: Partition, start: int) -> list[bytes | None]:
    """The values a consumer reads from ``start`` to the high watermark on ``p``."""
    out: list[bytes | None] = []
    offset = start
    while offset < p.high_watermark:
        data = p.read(offset, 1 << 20)
        if not data:
            break
        out += [r.value for r in decode_batches(data, min_offset=offset)]
        offset = max(h.last_offset for _pos, h in iter_headers(data)) + 1
    return out


async def start_with_old_data(cluster: Cluster) -> tuple[Partition, int, int]:
    """Three replicas; 60 records two days old and 10 new ones; the leader's retention has
    moved the log start and every replica applied it. Returns (leader, start, now)."""
    for n in (1, 2, 3):
        cluster.add(n, config_of(n))
    cluster.net.nodes[1].campaign(cluster.parts[1].group)  # type: ignore[arg-type]
    leader = await cluster.leader()
    now = now_ms()
    await produce(leader, 60, now - 2 * DAY_MS)
    await produce(leader, 10, now)
    parts = list(cluster.parts.values())
    await until(lambda: all(p.high_watermark == leader.high_watermark for p in parts))
    # Each replica's own retention would pick another start (the defect being fixed).
    own = {node_of(p): p.log.retention_point(now, below=p.high_watermark) for p in parts}
    assert None not in own.values() and len(set(own.values())) > 1, own
    for p in parts:
        if p is not leader:
            assert p.enforce_retention(now) is None  # followers never decide
    start = leader.enforce_retention(now)
    assert start is not None and start == own[node_of(leader)]
    assert leader.enforce_retention(now) is None  # proposed already; not again
    await until(lambda: all(p.log.log_start_offset == start for p in parts))
    return leader, start, now


@pytest.mark.timeout(60)
async def test_replicas_with_different_segments_agree_on_the_log_start(cluster: Cluster) -> None:
    leader, start, now = await start_with_old_data(cluster)
    parts = list(cluster.parts.values())
    expected = readable(leader, start)
    assert expected == [VALUE] * len(expected) and len(expected) >= 10
    inside = 0
    for p in parts:
        lg = p.log
        bases = bases_of(p)
        # Every whole segment below the start is gone, nothing at or above it.
        assert bases[0] <= start and (len(bases) == 1 or bases[1] > start)
        inside += lg.stored_start_offset < start
        with pytest.raises(OffsetOutOfRange) as info:
            p.read(start - 1, 1 << 20)
        assert info.value.metadata["log_start_offset"] == str(start)
        assert readable(p, start) == expected
    # The start lies inside a stored segment on some replica: its older bytes stay (Raft's).
    assert inside >= 1
    await until(lambda: leader.high_watermark == max(p.high_watermark for p in parts))
    assert await earliest(leader) == start
    assert leader.enforce_retention(now) is None  # nothing else has expired


@pytest.mark.timeout(60)
async def test_a_restarted_follower_deletes_nothing_on_its_own(cluster: Cluster) -> None:
    leader, start, now = await start_with_old_data(cluster)
    # The follower whose start lies inside a stored segment, older records in it.
    followers = [p for p in cluster.parts.values() if p is not leader]
    follower = min(followers, key=lambda p: p.log.stored_start_offset)
    fid = node_of(follower)
    bases = bases_of(follower)
    assert follower.log.stored_start_offset < start
    follower.close_for_shutdown()
    await cluster.net.nodes[fid].remove_group(GROUP, forget=False)
    follower.log.close()
    restarted = cluster.add(fid, config_of(fid))
    assert restarted.log.log_start_offset == start  # from log_start.json
    assert bases_of(restarted) == bases
    # Its own clock, far ahead, would now expire everything old; it decides nothing.
    later = now + 30 * DAY_MS
    assert restarted.log.retention_point(later, below=restarted.high_watermark) is not None
    await until(lambda: restarted.high_watermark == leader.high_watermark)
    assert restarted.enforce_retention(later) is None
    await asyncio.sleep(0.2)  # a few Raft rounds
    assert bases_of(restarted) == bases
    assert restarted.log.log_start_offset == start
    with pytest.raises(OffsetOutOfRange):
        restarted.read(start - 1, 1 << 20)
    # The leader's next decision moves it, on every replica alike (the retention loop
    # rolls a segment by age first, as here).
    leader.log.maybe_roll(later)
    new_start = leader.enforce_retention(later)
    assert new_start is not None and new_start > start
    parts = list(cluster.parts.values())
    await until(lambda: all(p.log.log_start_offset == new_start for p in parts))
    assert bases_of(restarted) != bases


@pytest.mark.timeout(60)
async def test_list_offsets_earliest_agrees_after_a_leader_change(cluster: Cluster) -> None:
    leader, start, now = await start_with_old_data(cluster)
    assert await earliest(leader) == start
    seen = {node_of(leader): start}
    # Each other replica leads in turn (the one with the most stored bytes below the start
    # last); ListOffsets EARLIEST on each is the group's start, not its own segments'.
    for p in sorted(
        (q for q in cluster.parts.values() if q is not leader),
        key=lambda q: -q.log.stored_start_offset,
    ):
        await move_leader(cluster, p)
        seen[node_of(p)] = await earliest(p)
    assert seen == dict.fromkeys(VOTERS, start)
    # The last leader's retention (its start may lie inside its first segment) still
    # agrees with every replica.
    last = await cluster.leader()
    assert last.log.stored_start_offset < start
    later = now + 30 * DAY_MS
    assert last.log.maybe_roll(later)
    await produce(last, 3, later)
    new_start = last.enforce_retention(later)
    assert new_start is not None and new_start > start
    parts = list(cluster.parts.values())
    await until(lambda: all(p.log.log_start_offset == new_start for p in parts))
    assert await earliest(last) == new_start


def test_the_log_start_batch_is_a_one_offset_control_batch() -> None:
    buf = log_start_batch(1234)
    h = unpack_header(buf)
    assert h.is_control and h.record_count == 1 and h.producer_id == -1
    assert entry_kind(buf) == EntryKind.NORMAL  # not mistaken for a NOOP
    assert decode_batches(buf) == []  # invisible to consumers
    assert decode_log_start(buf) == 1234
    assert decode_log_start(b"") is None
    assert decode_log_start(encode_batch([b"v"])) is None
    assert decode_log_start(encode_batch([None], timestamps_ms=0, control=True)) is None


@pytest.mark.timeout(60)
async def test_a_follower_behind_gets_the_leaders_logical_start_by_snapshot(
    cluster: Cluster,
) -> None:
    for n in (1, 2, 3):
        cluster.add(n, config_of(n))
    cluster.net.down.add(3)  # node 3 misses everything, the log-start batch included
    cluster.net.nodes[1].campaign(cluster.parts[1].group)  # type: ignore[arg-type]
    leader = await cluster.leader({1, 2})
    now = now_ms()
    await produce(leader, 60, now - 2 * DAY_MS)
    await produce(leader, 10, now)
    one, two, three = (cluster.parts[n] for n in (1, 2, 3))
    start = one.enforce_retention(now)
    assert start is not None
    await until(lambda: one.log.log_start_offset == two.log.log_start_offset == start)
    # Node 2 (its start inside a stored segment) leads; node 3 needs entries it no longer
    # holds, so it gets a snapshot naming where node 2's log is stored from and the start.
    assert two.log.stored_start_offset < start and two.log.first_index > 1
    await move_leader(cluster, two)
    assert two.group is not None
    snap = two.group.storage.snapshot()
    carried = decode_snapshot(snap.data)
    assert (carried.log_start_offset, carried.logical) == (two.log.stored_start_offset, start)
    cluster.net.down.clear()
    await until(lambda: three.log.log_end_offset == two.log.log_end_offset)
    assert three.log.log_start_offset == start
    assert three.log.stored_start_offset == two.log.stored_start_offset
    with pytest.raises(OffsetOutOfRange):
        three.read(start - 1, 1 << 20)
    await until(lambda: three.high_watermark == two.high_watermark)
    assert readable(three, start) == readable(two, start)
