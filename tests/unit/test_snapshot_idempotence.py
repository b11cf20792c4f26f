"""Replica catch-up by snapshot carries the partition's idempotence state: a follower that
installs a leader's Raft snapshot (its log restarts at the leader's log start) knows every
producer the leader knows, so a retry that crosses a failover to it is still a duplicate.
Over a real Raft group, partition log and replica storage."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tidelog.config import TopicConfig
from tidelog.errors import StorageError
from tidelog.node.idempotence import PartitionIdempotence
from tidelog.node.log import PartitionLog
from tidelog.node.metastore import MetaStore
from tidelog.node.metrics import NodeMetrics
from tidelog.node.multiraft import MultiRaft, RaftTiming
from tidelog.node.partition import Partition
from tidelog.node.producer_state import Verdict
from tidelog.node.raft.limits import Config
from tidelog.node.raft.storage import NO_LIMIT_BYTES
from tidelog.node.raft.types import ConfState, Entry, HardState, Snapshot
from tidelog.node.replica_storage import (
    SNAPSHOT_STATE_BYTES_MAX,
    HardStateStore,
    ReplicaStorage,
    SnapshotData,
    decode_snapshot,
    decode_snapshot_data,
    encode_snapshot_data,
)
from tidelog.records import encode_batch, stamp, validate_batches

CONFIG = TopicConfig.from_overrides({"segment.bytes": "4096"})
WINDOW = TopicConfig.from_overrides({"segment.bytes": "4096", "message.dedup.window.ms": "60000"})
TIMING = RaftTiming(tick_ms=10, heartbeat_interval_ms=20, election_timeout_ms=200)
RAFT_CONFIG = TIMING.config(Config(always_append_empty=False))
PID = 11
RECORDS_PER_BATCH = 5
BATCHES = 40
NOW_MS = 1_700_000_000_000


def idempotent_batch(seq: int, pid: int = PID, ids: list[str] | None = None) -> bytes:
    return encode_batch(
        [b"v%06d" % (seq + i) + b"x" * 150 for i in range(RECORDS_PER_BATCH)],
        timestamps_ms=NOW_MS,
        producer_id=pid,
        producer_epoch=0,
        base_sequence=seq,
        headers=None if ids is None else [[("msg-id", i.encode())] for i in ids],
    )


@pytest.fixture
async def raft(tmp_path: Path) -> AsyncIterator[MultiRaft]:
    store = MetaStore(tmp_path / "meta")
    r = MultiRaft(1, HardStateStore(store), NodeMetrics(), TIMING)
    r.start()
    yield r
    await r.stop()
    store.close()


async def leader_with_history(
    tmp_path: Path, raft: MultiRaft, config: TopicConfig = CONFIG
) -> tuple[Partition, PartitionLog, list[tuple[int, int]]]:
    """A lone leader that stored BATCHES idempotent batches of PID and then dropped the
    segments below its last few batches (as retention does); (base, last) offset of each."""
    lg = PartitionLog(tmp_path / "leader", config)
    p = Partition("t", 0, lg, config, group_id=7, replicas=[1])
    group = raft.add_group(
        7, lg, ConfState(voters=frozenset({1})), p, durable=True, config=RAFT_CONFIG
    )
    p.attach(group, raft)
    raft.campaign(group)
    async with asyncio.timeout(5):
        while not p.serving:
            await asyncio.sleep(0.005)
    offsets = []
    for b in range(BATCHES):
        ids = None
        if config.message_dedup_window_ms:
            ids = [f"id-{b}-{i}" for i in range(RECORDS_PER_BATCH)]
        buf = idempotent_batch(b * RECORDS_PER_BATCH, ids=ids)
        base, last, index, term = p.propose(buf, validate_batches(buf))
        await p.wait_committed(index, term, 5)
        offsets.append((base, last))
    assert lg.truncate_prefix(offsets[-3][0]) > 0
    assert lg.log_start_offset > offsets[0][1]  # the first batches' records are gone
    return p, lg, offsets


def follower(
    tmp_path: Path, name: str, config: TopicConfig = CONFIG
) -> tuple[ReplicaStorage, Partition]:
    lg = PartitionLog(tmp_path / name, config)
    storage = ReplicaStorage(lg, HardState(), ConfState(voters=frozenset({1, 2, 3})))
    old = bytearray(encode_batch([b"stale"], timestamps_ms=NOW_MS))
    stamp(old, 0, 0, 1, 1)
    storage.append([Entry(1, 1, bytes(old))])
    part = Partition("t", 0, lg, config, group_id=8, replicas=[1, 2, 3])
    return storage, part


def retry_of(part: Partition, batch: int) -> Verdict:
    seq = batch * RECORDS_PER_BATCH
    check, _pending = part.idempotence.view.check(PID, 0, seq, RECORDS_PER_BATCH)
    return check.verdict


@pytest.mark.timeout(20)
async def test_a_follower_installing_a_snapshot_knows_the_leaders_producers(
    tmp_path: Path, raft: MultiRaft
) -> None:
    leader, leader_log, offsets = await leader_with_history(tmp_path, raft)
    assert leader.group is not None
    snap = leader.group.storage.snapshot()
    carried = decode_snapshot(snap.data)
    assert carried.log_start_offset == leader_log.log_start_offset
    assert carried.state is not None

    storage, part = follower(tmp_path, "follower")
    storage.install_snapshot(snap)
    part.restore_snapshot(snap)
    assert part.idempotence.state == leader.idempotence.state
    assert part.idempotence.state.producer_ids() == [PID]
    # The last batch's retry (its answer was lost, the follower now leads) is a duplicate,
    # answered with the offsets the old leader gave, though the follower's log holds none
    # of the records of the batches before the log start.
    for b in range(BATCHES - 5, BATCHES):
        check, _ = part.idempotence.view.check(PID, 0, b * RECORDS_PER_BATCH, RECORDS_PER_BATCH)
        assert check.verdict is Verdict.DUPLICATE
        assert check.original is not None
        assert (check.original.base_offset, check.original.last_offset) == offsets[b]
    # The next batch is accepted, an older one is not accepted again.
    nxt, _ = part.idempotence.view.check(PID, 0, BATCHES * RECORDS_PER_BATCH, 1)
    assert nxt.verdict is Verdict.ACCEPT
    assert retry_of(part, BATCHES - 6) is Verdict.OUT_OF_ORDER

    # Catching up: the entries after the snapshot, which the carried state already covers,
    # are appended and applied without changing it.
    first = storage.first_index()
    entries = leader.group.storage.entries(first, leader_log.last_index + 1, NO_LIMIT_BYTES)
    storage.append(entries)
    part.apply(tuple(entries))
    assert part.idempotence.state == leader.idempotence.state
    assert part.high_watermark == leader.high_watermark


@pytest.mark.timeout(20)
async def test_an_old_format_snapshot_still_installs_with_an_empty_state(
    tmp_path: Path, raft: MultiRaft
) -> None:
    leader, leader_log, _offsets = await leader_with_history(tmp_path, raft)
    assert leader.group is not None
    snap = leader.group.storage.snapshot()
    old = Snapshot(snap.meta, encode_snapshot_data(leader_log.log_start_offset))
    assert old.data == encode_snapshot_data(leader_log.log_start_offset, None)
    assert decode_snapshot(old.data) == SnapshotData(leader_log.log_start_offset, None)
    storage, part = follower(tmp_path, "follower-old")
    storage.install_snapshot(old)
    part.restore_snapshot(old)
    assert storage.log.log_start_offset == leader_log.log_start_offset
    # What the old format cost: the follower forgot the producer, so after a failover to
    # it a retry of the last batch is not recognized (the producer would start a new
    # session and store it again).
    assert part.idempotence.state.producer_ids() == []
    assert retry_of(part, BATCHES - 1) is Verdict.UNKNOWN_PRODUCER


@pytest.mark.timeout(20)
async def test_the_msg_id_window_travels_in_the_snapshot_too(
    tmp_path: Path, raft: MultiRaft
) -> None:
    leader, _lg, _offsets = await leader_with_history(tmp_path, raft, WINDOW)
    assert leader.group is not None
    snap = leader.group.storage.snapshot()
    storage, part = follower(tmp_path, "follower-ids", WINDOW)
    storage.install_snapshot(snap)
    part.restore_snapshot(snap)
    assert part.idempotence.msg_ids == leader.idempotence.msg_ids
    assert len(part.idempotence.msg_ids) == BATCHES * RECORDS_PER_BATCH


def test_snapshot_data_formats_round_trip_and_refuse_what_is_not_ours() -> None:
    assert decode_snapshot_data(encode_snapshot_data(42)) == 42
    two = encode_snapshot_data(42, b"state")
    assert decode_snapshot(two) == SnapshotData(42, b"state")
    assert decode_snapshot_data(two) == 42
    assert decode_snapshot(encode_snapshot_data(7, b"")) == SnapshotData(7, b"")
    # A logical log start above the stored start (retention on the leader) travels too.
    started = encode_snapshot_data(42, logical_start=50)
    assert decode_snapshot(started).logical == 50 and decode_snapshot(started).state is None
    both = encode_snapshot_data(42, b"state", logical_start=50)
    assert decode_snapshot(both) == SnapshotData(42, b"state", 50)
    for bad in (b"", b"nonsense", two[:-1], two + b"x", b"\x09" + two[1:], two[:9]):
        with pytest.raises(StorageError):
            decode_snapshot(bad)
    with pytest.raises(StorageError):
        encode_snapshot_data(1, b"x" * (SNAPSHOT_STATE_BYTES_MAX + 1))


def test_a_state_too_large_for_one_snapshot_keeps_the_most_recent_producers() -> None:
    idem = PartitionIdempotence("t/0", CONFIG)
    offset = 0
    for pid in range(2000):
        idem.state.apply(
            producer_id=pid,
            epoch=0,
            base_sequence=0,
            record_count=1,
            base_offset=offset,
            timestamp_ms=NOW_MS + pid,  # higher ids wrote last
        )
        offset += 1
    full = idem.snapshot()
    bound = len(full) // 4
    out = idem.bounded_snapshot(bound)
    assert len(out.data) <= bound
    assert 0 < out.producers_left_out < 2000 and out.msg_ids_left_out == 0
    kept = PartitionIdempotence("t/0", CONFIG)
    kept.restore(out.data)
    ids = kept.state.producer_ids()
    assert len(ids) == 2000 - out.producers_left_out
    assert ids == list(range(2000 - len(ids), 2000))  # the most recently active
    assert kept.state.applied_offset == idem.state.applied_offset
    # Within the bound, nothing is left out and the bytes are the plain snapshot.
    whole = idem.bounded_snapshot(len(full))
    assert (whole.data, whole.producers_left_out, whole.msg_ids_left_out) == (full, 0, 0)


def test_msg_ids_are_left_out_before_any_producer() -> None:
    idem = PartitionIdempotence("t/0", WINDOW)
    for i in range(3000):
        idem.state.apply(
            producer_id=i % 3,
            epoch=0,
            base_sequence=i // 3,
            record_count=1,
            base_offset=i,
            timestamp_ms=NOW_MS,
        )
        idem.msg_ids.add(b"%016d" % i, i, NOW_MS)
    bound = len(idem.snapshot()) // 2
    out = idem.bounded_snapshot(bound)
    assert len(out.data) <= bound
    assert out.producers_left_out == 0 and 0 < out.msg_ids_left_out < 3000
    kept = PartitionIdempotence("t/0", WINDOW)
    kept.restore(out.data)
    assert kept.state == idem.state
    n = len(kept.msg_ids)
    assert n == 3000 - out.msg_ids_left_out
    assert kept.msg_ids.lookup(b"%016d" % 2999, NOW_MS, 60_000) is not None  # newest kept
    assert kept.msg_ids.lookup(b"%016d" % 0, NOW_MS, 60_000) is None  # oldest left out


@pytest.mark.timeout(20)
async def test_a_follower_restarting_before_it_caught_up_keeps_the_carried_state(
    tmp_path: Path, raft: MultiRaft
) -> None:
    leader, _lg, _offsets = await leader_with_history(tmp_path, raft)
    assert leader.group is not None
    snap = leader.group.storage.snapshot()
    storage, part = follower(tmp_path, "follower-restart")
    storage.install_snapshot(snap)
    part.restore_snapshot(snap)
    saved = part.idempotence.snapshot()  # what the node's RocksDB snapshot would hold
    follower_log = storage.log
    assert isinstance(follower_log, PartitionLog)
    assert part.idempotence.state.applied_offset > follower_log.log_end_offset
    # The restart: the state is ahead of the (empty) log. Under flush=durable it covers
    # committed entries only and is kept; under flush=os it may cover entries no replica
    # kept, and the log is the truth.
    for config, kept in ((CONFIG, True), (TopicConfig.from_overrides({"flush": "os"}), False)):
        restarted = PartitionIdempotence("t/0", config)
        restarted.restore(saved)
        restarted.recover(follower_log, follower_log.log_end_offset)
        assert (restarted.state == leader.idempotence.state) is kept
        assert (restarted.state.producer_ids() == [PID]) is kept
