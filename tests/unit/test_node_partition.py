"""Partition replica over a running Raft group: proposals, commit and persist waiters, the
high watermark, leadership checks, overwritten entries, closing."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from tests.unit.node_fakes import InstrumentedLog
from tidelog.config import TopicConfig
from tidelog.errors import (
    LeaderNotAvailable,
    NodeUnavailable,
    NotEnoughReplicas,
    NotLeader,
    OffsetOutOfRange,
    RequestTimedOut,
    StorageError,
    UnknownTopic,
)
from tidelog.node.metastore import MetaStore
from tidelog.node.metrics import NodeMetrics
from tidelog.node.multiraft import MultiRaft, RaftTiming
from tidelog.node.partition import Partition
from tidelog.node.raft.limits import Config
from tidelog.node.raft.types import ENTRY_OVERHEAD_BYTES, ConfState, Entry, Role
from tidelog.node.replica_storage import HardStateStore
from tidelog.records import encode_batch, validate_batches

DURABLE = TopicConfig.from_overrides({})
OS = TopicConfig.from_overrides({"flush": "os"})
TIMING = RaftTiming(tick_ms=10, heartbeat_interval_ms=20, election_timeout_ms=200)
CONFIG = TIMING.config(Config(always_append_empty=False))


@dataclass
class Env:
    dir: Path
    store: MetaStore
    raft: MultiRaft

    def make(
        self,
        config: TopicConfig = DURABLE,
        voters: frozenset[int] = frozenset({1}),
        group_id: int = 7,
        campaign: bool = True,
    ) -> tuple[Partition, InstrumentedLog]:
        lg = InstrumentedLog(self.dir / f"p{group_id}", config)
        addresses = {2: "10.0.0.2:9092"}
        p = Partition(
            "t", 0, lg, config, group_id=group_id, replicas=sorted(voters),
            address_of=addresses.get,
        )  # fmt: skip
        group = self.raft.add_group(
            group_id, lg, ConfState(voters=voters), p, durable=config.flush != "os", config=CONFIG
        )
        p.attach(group, self.raft)
        if campaign:
            self.raft.campaign(group)
        return p, lg


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    store = MetaStore(tmp_path / "meta")
    raft = MultiRaft(1, HardStateStore(store), NodeMetrics(), TIMING)
    raft.start()
    yield Env(tmp_path, store, raft)
    await raft.stop()
    store.close()


def batch(n: int, ts: int = 1000) -> tuple[bytes, list]:  # type: ignore[type-arg]
    buf = encode_batch([b"v%d" % i for i in range(n)], timestamps_ms=ts)
    return buf, validate_batches(buf)


async def produce(p: Partition, n: int, ts: int = 1000) -> tuple[int, int]:
    buf, headers = batch(n, ts)
    base, last, index, term = p.propose(buf, headers)
    await p.wait_committed(index, term, 5)
    return base, last


async def until_serving(p: Partition) -> None:
    async with asyncio.timeout(5):
        while not p.serving:
            await asyncio.sleep(0.005)


@pytest.mark.timeout(10)
async def test_proposals_get_dense_offsets_and_commit(env: Env) -> None:
    p, lg = env.make()
    await until_serving(p)
    assert p.high_watermark == 0
    assert await produce(p, 3) == (0, 2)
    assert await produce(p, 2) == (3, 4)
    assert p.high_watermark == 5 and lg.log_end_offset == 5
    assert lg.flushed_offset == 5 and lg.flush_calls >= 1
    # Two batches in one request: two Raft entries, offsets continue per record.
    buf = encode_batch([b"x"] * 2) + encode_batch([b"y"])
    base, last, index, term = p.propose(buf, validate_batches(buf))
    assert (base, last) == (5, 7) and index == lg.last_index + 2
    await p.wait_committed(index, term, 5)
    assert lg.last_index == index and p.high_watermark == 8


@pytest.mark.timeout(10)
async def test_offsets_continue_across_proposals_not_yet_stored(env: Env) -> None:
    p, _lg = env.make()
    await until_serving(p)
    bufs = [batch(2) for _ in range(5)]
    results = [p.propose(buf, headers) for buf, headers in bufs]  # one loop iteration
    assert [r[:2] for r in results] == [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)]
    await asyncio.gather(*(p.wait_committed(r[2], r[3], 5) for r in results))
    assert p.high_watermark == 10


@pytest.mark.timeout(10)
async def test_flush_os_skips_fsync(env: Env) -> None:
    p, lg = env.make(OS)
    await until_serving(p)
    await produce(p, 10)
    assert p.high_watermark == 10
    assert lg.flush_calls == 0


@pytest.mark.timeout(10)
async def test_acks_leader_waits_for_the_local_store_only(env: Env) -> None:
    p, _ = env.make()
    await until_serving(p)
    buf, headers = batch(1)
    _, _, index, term = p.propose(buf, headers)
    await p.wait_persisted(index, term, 5)


@pytest.mark.timeout(10)
async def test_acks_leader_waiter_of_a_replaced_entry_fails(env: Env) -> None:
    """Issue 8 defect 1, over the real log: the stored entry at the waiter's index has
    another term (a later leader's entry replaced the proposal before it was stored), so
    "stored" would be a lie; only the waiter of the stored (index, term) succeeds."""
    p, _ = env.make()
    await until_serving(p)
    assert p.group is not None
    group = p.group
    buf, headers = batch(1)
    _, _, index, term = p.propose(buf, headers)
    await p.wait_committed(index, term, 5)
    replaced = asyncio.create_task(p.wait_persisted(index, term - 1 if term > 1 else term + 1, 5))
    stored = asyncio.create_task(p.wait_persisted(index, term, 5))
    await asyncio.sleep(0)
    p.on_persisted(group, index)
    with pytest.raises(NotLeader, match="replaced"):
        await replaced
    await asyncio.wait_for(stored, 1)


@pytest.mark.timeout(10)
async def test_wait_times_out_and_leaves_no_waiter_behind(env: Env) -> None:
    p, lg = env.make()
    await until_serving(p)
    lg.flush_delay_s = 0.3
    buf, headers = batch(1)
    _, _, index, term = p.propose(buf, headers)
    with pytest.raises(RequestTimedOut, match="not committed within 20 ms"):
        await p.wait_committed(index, term, 0.02)
    assert len(p._commit_waiters) == 0
    assert p.read(0, 1 << 20) == b""  # appended, not committed yet: invisible
    lg.flush_delay_s = 0
    await p.wait_committed(index, term, 5) if p.high_watermark == 0 else None
    assert p.high_watermark == 1


@pytest.mark.timeout(10)
async def test_changed_event_fires_on_commit_and_is_replaced(env: Env) -> None:
    p, _ = env.make()
    await until_serving(p)
    ev = p.changed()
    await produce(p, 1)
    assert ev.is_set()
    assert not p.changed().is_set()


@pytest.mark.timeout(10)
async def test_delete_fails_waiters_and_rejects_proposals(env: Env) -> None:
    p, lg = env.make()
    await until_serving(p)
    lg.flush_delay_s = 0.2
    buf, headers = batch(1)
    _, _, index, term = p.propose(buf, headers)
    waiter = asyncio.create_task(p.wait_committed(index, term, 5))
    await asyncio.sleep(0)
    ev = p.changed()
    p.close_for_delete()
    assert ev.is_set()
    with pytest.raises(UnknownTopic, match="deleted"):
        await waiter
    with pytest.raises(UnknownTopic):
        p.propose(buf, headers)
    with pytest.raises(UnknownTopic):
        p.check_streaming()
    p.close_for_shutdown()  # the first error wins
    with pytest.raises(UnknownTopic):
        p.check_open()


@pytest.mark.timeout(10)
async def test_end_streams_keeps_proposals_and_commits_going(env: Env) -> None:
    p, _ = env.make()
    await until_serving(p)
    p.end_streams(NodeUnavailable("stopping"))
    with pytest.raises(NodeUnavailable):
        p.check_streaming()
    p.check_open()
    assert await produce(p, 2) == (0, 1)


@pytest.mark.timeout(10)
async def test_storage_failure_takes_the_partition_offline(env: Env) -> None:
    p, lg = env.make()
    await until_serving(p)
    lg.flush_error = OSError(5, "Input/output error")
    buf, headers = batch(1)
    _, _, index, term = p.propose(buf, headers)
    with pytest.raises(StorageError, match="Input/output error"):
        await p.wait_committed(index, term, 5)
    with pytest.raises(StorageError):
        p.propose(buf, headers)
    assert p.high_watermark == 0  # never acknowledged, never visible


@pytest.mark.timeout(10)
async def test_fetch_offset_range_names_the_valid_range(env: Env) -> None:
    p, _ = env.make(OS)
    await until_serving(p)
    await produce(p, 5)
    p.check_fetch_offset(0)
    p.check_fetch_offset(5)
    for bad in (6, -1):
        with pytest.raises(OffsetOutOfRange, match=r"valid offsets are 0\.\.5") as info:
            p.check_fetch_offset(bad)
        assert info.value.metadata == {"log_start_offset": "0", "high_watermark": "5"}


@pytest.mark.timeout(10)
async def test_offset_for_timestamp_hides_uncommitted(env: Env) -> None:
    p, lg = env.make()
    await until_serving(p)
    await produce(p, 2, ts=1000)
    lg.flush_delay_s = 0.3
    buf, headers = batch(2, ts=2000)
    _, _, index, term = p.propose(buf, headers)
    await asyncio.sleep(0.05)
    assert p.offset_for_timestamp(500) == (0, 1000)
    assert p.offset_for_timestamp(1500) == (2, -1)  # found at 2, but 2 is not committed
    lg.flush_delay_s = 0
    await p.wait_committed(index, term, 5)
    assert p.offset_for_timestamp(1500) == (2, 2000)


@pytest.mark.timeout(10)
async def test_switching_flush_mode_switches_fsync(env: Env) -> None:
    p, lg = env.make()
    await until_serving(p)
    await produce(p, 1)
    calls = lg.flush_calls
    p.update_config(OS)
    assert lg.config is OS
    await produce(p, 1)
    assert lg.flush_calls == calls
    p.update_config(DURABLE)
    await produce(p, 1)
    assert lg.flush_calls > calls


@pytest.mark.timeout(10)
async def test_followers_and_leaderless_replicas_redirect(env: Env) -> None:
    p, _ = env.make(voters=frozenset({1, 2, 3}), campaign=False)
    buf, headers = batch(1)
    with pytest.raises(LeaderNotAvailable, match="no leader"):
        p.propose(buf, headers)
    with pytest.raises(LeaderNotAvailable):
        p.check_serving()
    assert p.role == Role.FOLLOWER and p.in_sync() == [] and p.follower_lags() == []
    assert p.group is not None
    p.group.raw.leader_id = 2  # as if node 2's heartbeat had arrived
    with pytest.raises(NotLeader, match=r"node 2 is at 10\.0\.0\.2:9092") as info:
        p.propose(buf, headers)
    assert info.value.metadata == {"leader_id": "2", "leader_address": "10.0.0.2:9092"}


@pytest.mark.timeout(10)
async def test_truncated_and_replaced_entries_fail_their_producers(env: Env) -> None:
    p, _lg = env.make()
    await until_serving(p)
    assert p.group is not None
    group = p.group
    # Waiters (in index order) as a leader that is then deposed would leave them.
    kept = asyncio.create_task(p.wait_committed(8, 1, 5))
    replaced = asyncio.create_task(p.wait_committed(9, 1, 5))
    lost = asyncio.create_task(p.wait_committed(10, 1, 5))
    await asyncio.sleep(0)
    p.on_truncated(group, 10)
    with pytest.raises(NotLeader, match="overwritten"):
        await lost
    p.on_committed(group, (Entry(1, 8, b""), Entry(2, 9, b"")))
    await asyncio.wait_for(kept, 1)
    with pytest.raises(NotLeader, match="replaced"):
        await replaced


@pytest.mark.timeout(10)
async def test_follower_lags_and_in_sync_on_a_leader(env: Env) -> None:
    p, _ = env.make(voters=frozenset({1, 2}), campaign=False)
    assert p.group is not None
    # No peer answers: node 1 can win only with node 2's vote, so force the role for a view.
    p.group.raw.campaign()
    assert p.role != Role.LEADER
    assert p.follower_lags() == []


@pytest.mark.timeout(10)
async def test_a_refused_multi_batch_request_proposes_none_of_its_batches(env: Env) -> None:
    """Issue 8 defect 7a: the core refusing batch k of a request (max_uncommitted_bytes) left
    batches 0..k-1 proposed, to be committed, while the producer was told the request failed
    and retried it whole. Now the request is proposed whole or not at all."""
    p, lg = env.make()
    await until_serving(p)
    raw = p.group.raw  # type: ignore[union-attr]
    one, headers = batch(50)
    # Something uncommitted, and room for exactly two more batches of this size.
    room = 3 * (len(one) + ENTRY_OVERHEAD_BYTES)
    raw.cfg = replace(raw.cfg, max_uncommitted_bytes=room, max_msg_bytes=room)
    p.propose(one, headers)
    last = raw.last_index()
    three = one * 3
    with pytest.raises(NotEnoughReplicas):
        p.propose(three, validate_batches(three))
    assert raw.last_index() == last  # none of the three was proposed
    await asyncio.sleep(0.05)
    base, last_offset, index, term = p.propose(one * 2, validate_batches(one * 2))
    await p.wait_committed(index, term, 5)
    assert (base, last_offset) == (50, 149) and p.high_watermark == 150
    assert lg.last_index == index


@pytest.mark.timeout(10)
async def test_a_multi_batch_request_cut_behind_its_first_batches_says_how_many_stored(
    env: Env,
) -> None:
    """Issue 8 defect 7 (node simulation, backpressure seed 26): a new leader overwrote the
    last batch of a request whose first batches committed. The answer is NOT_LEADER with
    ``batches_stored``: the client retries only the rest, not (duplicating) the whole."""
    p, _lg = env.make()
    await until_serving(p)
    group = p.group
    assert group is not None
    term = group.raw.term
    waiting = asyncio.create_task(
        p.wait_batches([(8, term), (9, term), (10, term)], committed=True, timeout_s=5)
    )
    await asyncio.sleep(0)
    p.on_truncated(group, 10)
    p.on_committed(group, (Entry(term, 8, b""), Entry(term, 9, b"")))
    with pytest.raises(NotLeader, match="first 2 batch") as info:
        await waiting
    assert info.value.metadata["batches_stored"] == "2"
    # Nothing stored: the plain error, no batches_stored; idempotent waits (not one per
    # batch) never claim a count.
    for per_batch, entries in ((True, [(11, term), (12, term)]), (False, [(11, term)])):
        lost = asyncio.create_task(
            p.wait_batches(entries, committed=True, timeout_s=5, per_batch=per_batch)
        )
        await asyncio.sleep(0)
        p.on_truncated(group, 11)
        with pytest.raises(NotLeader, match="overwritten") as info:
            await lost
        assert "batches_stored" not in info.value.metadata
