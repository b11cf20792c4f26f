"""Catch-up by streaming (node/catchup.py): the chunk protocol (bounded, checksummed chunks of
the leader's log range and state parts), the receiver's stage (only verified whole batches
kept, resumed from where it stopped, installed by adopting the copied segments), the rate
limit, and the streamed snapshot's encoding."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.unit.log_support import fill, open_log, read_all
from tidelog.errors import StorageError
from tidelog.node.catchup import (
    CHUNK_BYTES,
    BytesPart,
    Chunk,
    ChunkError,
    PartStore,
    RateLimiter,
    Stage,
    Target,
    log_chunks,
    make_chunk,
    make_streamed_snapshot,
    part_chunks,
    stage_dir,
    verify_chunk,
)
from tidelog.node.log import PartitionLog
from tidelog.node.raft.types import ConfState, HardState
from tidelog.node.replica_storage import (
    PartInfo,
    ReplicaStorage,
    StreamedRange,
    decode_snapshot,
    encode_streamed,
)

pytestmark = pytest.mark.timeout(60)


def source_log(tmp_path: Path, batches: int = 60, value_bytes: int = 40_000) -> PartitionLog:
    """A leader's log of ``batches`` 2-record batches over several segments, whose front
    was deleted and whose logical start lies inside a segment."""
    lg = open_log(tmp_path / "leader", segment_bytes=600_000)
    fill(lg, batches, records=2, value_bytes=value_bytes)
    lg.advance_start(20)  # whole segments below 20 deleted
    lg.advance_start(lg.log_start_offset + 3)  # inside a batch and a segment
    return lg


def target_of(lg: PartitionLog, index: int, parts: list[BytesPart] | None = None) -> Target:
    storage = ReplicaStorage(lg, HardState(1, 0, index), ConfState(frozenset({1, 2, 3})))
    made = make_streamed_snapshot(lg, storage, index, lambda _i: list(parts or ()))
    assert made is not None
    snap, _parts = made
    r = decode_snapshot(snap.data).stream
    assert r is not None
    return Target.of(snap.meta, r, leader=1)


def test_a_streamed_snapshot_names_its_range_and_parts_and_travels_small(tmp_path: Path) -> None:
    lg = source_log(tmp_path)
    index = lg.last_index - 5
    part = BytesPart("idempotence", b"p" * 3_000_000)
    storage = ReplicaStorage(lg, HardState(1, 0, index), ConfState(frozenset({1, 2})))
    made = make_streamed_snapshot(lg, storage, index, lambda _i: [part])
    assert made is not None
    snap, parts = made
    assert parts == [part]
    assert len(snap.data) < 200  # the range and the parts' names: never the data
    data = decode_snapshot(snap.data)
    r = data.stream
    assert r is not None
    assert snap.meta.index == index and snap.meta.term == lg.term_at_index(index)
    assert r.logical_start == lg.log_start_offset
    assert r.start_offset <= r.logical_start < r.start_offset + 2  # the batch holding it
    assert r.end_offset == lg.end_offset_at_index(index)
    assert r.prev_term == lg.term_at_index(r.prev_index)
    assert r.parts == (PartInfo("idempotence", part.size, part.crc32c),)
    assert data.log_start_offset == r.start_offset and data.logical == r.logical_start
    # The maker is the storage's snapshot when set.
    storage.snapshot_maker = lambda: snap
    assert storage.snapshot() is snap


def test_streamed_snapshot_encoding_refuses_damaged_bytes() -> None:
    r = StreamedRange(10, 12, 100, 4, 2, (PartInfo("a", 5, 7), PartInfo("table/x.sst", 9, 1)))
    data = encode_streamed(r)
    assert decode_snapshot(data).stream == r
    for bad in (data[:-1], data + b"x", data[:20]):
        with pytest.raises(StorageError):
            decode_snapshot(bad)
    with pytest.raises(StorageError):
        decode_snapshot(
            encode_streamed(StreamedRange(10, 12, 100, 4, 2, (PartInfo("a", 1, 1),) * 2))
        )
    with pytest.raises(StorageError):
        encode_streamed(StreamedRange(10, 9, 100, 4, 2))


def test_log_chunks_are_bounded_checksummed_and_cover_the_range(tmp_path: Path) -> None:
    lg = source_log(tmp_path)
    t = target_of(lg, lg.last_index - 1)
    chunks = list(log_chunks(lg, t.start_offset, t.end_offset, chunk_bytes=CHUNK_BYTES))
    assert len(chunks) > 1
    position = 0
    for c in chunks:
        verify_chunk(c, position)
        assert 0 < len(c.data) <= CHUNK_BYTES
        position += len(c.data)
    # The chunks are the stored batches of the range, byte for byte.
    whole = b"".join(c.data for c in chunks)
    expect = b""
    offset = t.start_offset
    while offset < t.end_offset:
        data = lg.read(offset, 1 << 20, upto=t.end_offset, stored=True)
        expect += data
        offset = t.end_offset if not data else _end_of(data)
    assert whole == expect
    with pytest.raises(ChunkError, match="no batch starts"):
        next(log_chunks(lg, t.start_offset + 1, t.end_offset))


def stored_bytes(lg: PartitionLog, end: int) -> bytes:
    """The stored batches from the one holding the logical start up to ``end``."""
    out = b""
    offset = lg.log_start_offset
    while offset < end:
        data = lg.read(offset, 1 << 20, upto=end)
        if not data:
            break
        out += data
        offset = _end_of(data)
    return out


def _end_of(data: bytes) -> int:
    from tidelog.records import iter_headers

    return [h.last_offset + 1 for _p, h in iter_headers(data)][-1]


def test_a_chunk_with_a_bad_checksum_or_position_is_refused(tmp_path: Path) -> None:
    lg = source_log(tmp_path)
    t = target_of(lg, lg.last_index)
    stage = Stage(tmp_path / "stage", lg.config)
    assert stage.begin(t) == t.start_offset
    chunks = list(log_chunks(lg, t.start_offset, t.end_offset))
    first = chunks[0]
    flipped = bytes([first.data[0] ^ 1]) + first.data[1:]
    with pytest.raises(ChunkError, match="CRC-32C"):
        stage.accept_log(Chunk(0, flipped, first.crc32c), 0)
    with pytest.raises(ChunkError, match="expected byte 0"):
        stage.accept_log(chunks[1], 0)
    with pytest.raises(ChunkError, match="exceeds"):
        verify_chunk(make_chunk(0, b"x" * (CHUNK_BYTES + 1)), 0)
    # Nothing of the refused chunks was kept.
    assert stage.log_end == t.start_offset
    # A checksum that matches damaged batch bytes still cannot break the staged log.
    stage.accept_log(first, 0)
    assert stage.log_end > t.start_offset


def test_the_copy_resumes_where_the_receiver_stopped_and_installs_atomically(
    tmp_path: Path,
) -> None:
    lg = source_log(tmp_path)
    index = lg.last_index - 2
    state = BytesPart("idempotence", bytes(range(256)) * 20_000)  # 5 MB: several chunks
    t = target_of(lg, index, [state])
    follower = open_log(tmp_path / "follower" / "0", segment_bytes=600_000)
    fill(follower, 3)  # an old, shorter log that the copy replaces
    sdir = stage_dir(follower.directory)
    stage = Stage(sdir, follower.config)
    assert stage.begin(t) == t.start_offset
    chunks = list(log_chunks(lg, t.start_offset, t.end_offset))
    position = 0
    for c in chunks[: len(chunks) // 2]:
        stage.accept_log(c, position)
        position += len(c.data)
    stage.flush()
    copied_to = stage.log_end
    assert t.start_offset < copied_to < t.end_offset
    pchunks = list(part_chunks(state, 0))
    stage.accept_part("idempotence", pchunks[0], 0)
    # The receiver crashes (nothing closed) and starts again: it resumes at the end of the
    # whole batches it verified, and asks only for the rest.
    again = Stage(sdir, follower.config)
    assert again.load() == t
    resume = again.begin(target_of(lg, index, [state]))
    assert resume == copied_to
    position = 0
    for c in log_chunks(lg, resume, t.end_offset):
        again.accept_log(c, position)
        position += len(c.data)
    part_from = again.part_size("idempotence")
    assert part_from == len(pchunks[0].data)
    for c in part_chunks(state, part_from):
        again.accept_part("idempotence", c, c.position)
    assert again.check_part("idempotence", state.size, state.crc32c)
    # Until installed, the follower's own log is untouched.
    assert follower.log_end_offset == 6
    again.mark_complete()
    parts = again.install_into(follower)
    assert parts == {"idempotence": state.data}
    assert not sdir.exists()
    # The follower holds the leader's retained records up to the snapshot, byte for byte.
    assert follower.log_start_offset == lg.log_start_offset
    assert follower.last_index == index and follower.last_term == lg.term_at_index(index)
    assert follower.log_end_offset == t.end_offset
    end = t.end_offset
    assert stored_bytes(follower, end) == stored_bytes(lg, end)
    assert read_all(follower) == [o for o in read_all(lg) if o < end]
    # And keeps them over a restart.
    follower.close()
    reopened = PartitionLog(follower.directory, follower.config)
    assert (reopened.log_start_offset, reopened.last_index) == (lg.log_start_offset, index)
    reopened.close()


def test_a_stage_that_the_new_target_cannot_use_starts_over(tmp_path: Path) -> None:
    lg = source_log(tmp_path)
    t = target_of(lg, lg.last_index - 10)
    stage = Stage(tmp_path / "s", lg.config)
    stage.begin(t)
    c = next(log_chunks(lg, t.start_offset, t.end_offset))
    stage.accept_log(c, 0)
    # The leader's log start moved beyond what was copied: the copy starts over there.
    lg.advance_start(stage.log_end + 30)
    t2 = target_of(lg, lg.last_index)
    assert t2.logical_start > stage.log_end
    assert stage.begin(t2) == t2.start_offset


def test_an_incomplete_copy_cannot_be_marked_complete(tmp_path: Path) -> None:
    lg = source_log(tmp_path)
    t = target_of(lg, lg.last_index)
    stage = Stage(tmp_path / "s", lg.config)
    stage.begin(t)
    chunks = list(log_chunks(lg, t.start_offset, t.end_offset))
    half = chunks[0]
    stage.accept_log(Chunk(0, half.data[:1000], make_chunk(0, half.data[:1000]).crc32c), 0)
    with pytest.raises(ChunkError):
        stage.mark_complete()


def test_a_damaged_part_is_detected_and_fetched_again(tmp_path: Path) -> None:
    lg = source_log(tmp_path)
    part = BytesPart("idempotence", b"abc" * 1000)
    t = target_of(lg, lg.last_index, [part])
    stage = Stage(tmp_path / "s", lg.config)
    stage.begin(t)
    stage.accept_part("idempotence", make_chunk(0, b"x" * part.size), 0)
    assert not stage.check_part("idempotence", part.size, part.crc32c)
    assert stage.part_size("idempotence") == 0  # removed: fetched again from byte 0


def test_part_store_keeps_recent_parts_per_group() -> None:
    now = [0.0]
    store = PartStore(lambda: now[0])
    for i in range(6):
        store.put(7, i, [BytesPart("idempotence", b"%d" % i)])
    assert store.get(7, 0, "idempotence") is None  # at most a few per group
    p = store.get(7, 5, "idempotence")
    assert p is not None and p.read(0, 10) == b"5"
    now[0] = 1000.0
    store.put(7, 9, [BytesPart("idempotence", b"9")])
    assert store.get(7, 5, "idempotence") is None  # expired
    store.forget(7)
    assert store.get(7, 9, "idempotence") is None


class FakeTime:
    def __init__(self) -> None:
        self.now = 100.0
        self.slept = 0.0

    def clock(self) -> float:
        return self.now

    async def sleep(self, s: float) -> None:
        self.slept += s
        self.now += s


async def test_the_rate_limit_is_honoured_and_read_at_every_chunk() -> None:
    t = FakeTime()
    rate = [2 * CHUNK_BYTES]
    limiter = RateLimiter(lambda: rate[0], clock=t.clock, sleep=t.sleep)
    start = t.now
    for _ in range(20):
        await limiter.acquire(CHUNK_BYTES)
    elapsed = t.now - start
    # 20 MiB at 2 MiB/s, with at most one chunk of burst.
    assert 9.4 <= elapsed <= 10.1
    # The rate is read at every chunk: halving it doubles the time of the next ones.
    rate[0] = CHUNK_BYTES
    start = t.now
    for _ in range(10):
        await limiter.acquire(CHUNK_BYTES)
    assert 9.4 <= t.now - start <= 10.1
    # 0: unlimited.
    rate[0] = 0
    start = t.now
    for _ in range(100):
        await limiter.acquire(CHUNK_BYTES)
    assert t.now == start


async def test_the_sender_serves_chunks_at_the_rate(tmp_path: Path) -> None:
    """``CatchupManager.serve``: a CatchupRead's chunks, rate-limited; unknown parts refused."""
    from tidelog.node.catchup import CatchupManager
    from tidelog.v1 import cluster_pb2

    lg = source_log(tmp_path)
    t = target_of(lg, lg.last_index)

    async def no_reader(node: int, request: cluster_pb2.CatchupReadRequest):  # type: ignore[no-untyped-def]
        raise AssertionError("not used")
        yield

    ft = FakeTime()
    m = CatchupManager(1, None, no_reader, lambda: CHUNK_BYTES, clock=ft.clock)  # type: ignore[arg-type]
    m.limiter = RateLimiter(lambda: CHUNK_BYTES, clock=ft.clock, sleep=ft.sleep)
    req = cluster_pb2.CatchupReadRequest(group=5, position=t.start_offset, end_offset=t.end_offset)
    got = [c async for c in m.serve(req, lg)]
    expect = [c.data for c in log_chunks(lg, t.start_offset, t.end_offset)]
    assert [c.data for c in got] == expect and len(expect) > 2
    assert all(c.crc32c == make_chunk(0, c.data).crc32c for c in got)
    total = sum(len(d) for d in expect)
    assert m.bytes_sent == total
    # At 1 MiB/s, less one chunk of burst.
    assert ft.now - 100.0 >= total / CHUNK_BYTES - 1.01
    m.parts.put(5, t.index, [BytesPart("idempotence", b"s" * 10)])
    req = cluster_pb2.CatchupReadRequest(group=5, snapshot_index=t.index, part="idempotence")
    assert [c.data async for c in m.serve(req, lg)] == [b"s" * 10]
    req = cluster_pb2.CatchupReadRequest(group=5, snapshot_index=t.index + 1, part="idempotence")
    with pytest.raises(ChunkError, match="no part"):
        _ = [c async for c in m.serve(req, lg)]
    with pytest.raises(ChunkError, match="no replica"):
        _ = [c async for c in m.serve(req, None)]
    await asyncio.sleep(0)


def test_the_stage_meta_round_trips(tmp_path: Path) -> None:
    lg = source_log(tmp_path)
    t = target_of(lg, lg.last_index, [BytesPart("idempotence", b"abc")])
    stage = Stage(tmp_path / "s", lg.config)
    stage.begin(t)
    assert Stage(tmp_path / "s", lg.config).load() == t
    assert Stage(tmp_path / "nothing", lg.config).load() is None


class FakeRaft:
    """What CatchupManager uses of MultiRaft: its groups and ``deliver``."""

    def __init__(self) -> None:
        self.groups: dict[int, object] = {}
        self.delivered: list[tuple[int, int, object]] = []

    def deliver(self, from_node: int, items: list[tuple[int, object]]) -> None:
        for gid, msg in items:
            self.delivered.append((from_node, gid, msg))


async def test_the_gate_holds_a_streamed_snapshot_until_its_copy_is_complete(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The receiver's whole path: the gate holds the SNAPSHOT back and starts a copy; a
    chunk that fails its checksum interrupts it; the retry resumes and completes; the
    message is delivered again and passes; the install adopts the copied log."""
    from types import SimpleNamespace
    from typing import cast

    import tidelog.node.catchup as catchup
    from tidelog.node.catchup import CatchupManager
    from tidelog.node.multiraft import RaftGroup
    from tidelog.node.raft.types import Message, MessageKind
    from tidelog.v1 import cluster_pb2

    monkeypatch.setattr(catchup, "retry_backoff_s", 0.01)
    lg = source_log(tmp_path)
    leader_storage = ReplicaStorage(
        lg, HardState(1, 0, lg.last_index), ConfState(frozenset({1, 2}))
    )
    state = BytesPart("idempotence", b"i" * 3000)
    made = make_streamed_snapshot(lg, leader_storage, lg.last_index - 1, lambda _i: [state])
    assert made is not None
    snap, _ = made
    follower = open_log(tmp_path / "f" / "0", segment_bytes=600_000)
    fill(follower, 3)  # an old, shorter log
    storage = ReplicaStorage(follower, HardState(1, 0, 0), ConfState(frozenset({1, 2})))
    group = cast(
        "RaftGroup", SimpleNamespace(group_id=9, storage=storage, raw=SimpleNamespace(catchup=None))
    )
    raft = FakeRaft()
    raft.groups[9] = group
    calls: list[tuple[str, int]] = []
    damaged = [False]

    async def reader(node: int, req: cluster_pb2.CatchupReadRequest):  # type: ignore[no-untyped-def]
        assert node == 1
        calls.append((req.part, req.position))
        if req.part:
            chunks = part_chunks(state, req.position)
        else:
            chunks = log_chunks(lg, req.position, req.end_offset)
        for i, ch in enumerate(chunks):
            data = ch.data
            if not req.part and i == 2 and not damaged[0]:
                damaged[0] = True
                data = b"\x00" + data[1:]  # damaged on the way
            yield cluster_pb2.CatchupChunk(position=ch.position, data=data, crc32c=ch.crc32c)

    m = CatchupManager(2, raft, reader, lambda: 0)  # type: ignore[arg-type]
    m.attach(group, lambda: 0, lambda _n: b"")
    msg = Message(MessageKind.SNAPSHOT, 1, 2, 1, snapshot=snap)
    assert m.gate(group, msg) is False
    assert m.gate(group, msg) is False  # a resend while copying: still held

    async def delivered() -> None:
        while not raft.delivered:
            await asyncio.sleep(0.01)

    await asyncio.wait_for(delivered(), 20)
    assert raft.delivered == [(1, 9, msg)]
    # The damaged chunk was refused; the retry asked from the batches already verified.
    log_calls = [p for part, p in calls if not part]
    assert len(log_calls) == 2 and log_calls[1] > log_calls[0]
    assert ("idempotence", 0) in calls
    assert follower.log_end_offset == 6  # untouched until installed
    assert m.gate(group, msg) is True
    storage.install_snapshot(snap)
    assert storage.installed_parts == {"idempotence": state.data}
    r = decode_snapshot(snap.data).stream
    assert r is not None
    assert follower.log_start_offset == lg.log_start_offset
    assert follower.log_end_offset == r.end_offset
    assert stored_bytes(follower, r.end_offset) == stored_bytes(lg, r.end_offset)
    assert m.installed == 1 and not stage_dir(follower.directory).exists()
    await m.close()


# ---- catching up by APPEND at the recovery rate --------------------------------------------


def test_try_take_shares_the_schedule_of_the_streamed_copies() -> None:
    t = FakeTime()
    rate = [10 * CHUNK_BYTES]
    limiter = RateLimiter(lambda: rate[0], clock=t.clock, sleep=t.sleep)
    # An idle limiter lets a burst through (a tenth of a second at this rate, and the
    # message that overdraws it), then refuses until the schedule is paid for.
    t.now += 5.0
    burst = RateLimiter.burst_bytes(rate[0])
    taken = 0
    while limiter.try_take(CHUNK_BYTES // 2):
        taken += CHUNK_BYTES // 2
        assert taken <= 4 * CHUNK_BYTES, "more than the burst"
    assert burst <= taken <= burst + CHUNK_BYTES // 2
    # Over a simulated 10 s of 50 ms ticks, what is taken stays within rate * elapsed + the
    # burst and one message, and gets close to it.
    start, sent = t.now, 0
    for _ in range(200):
        t.now += 0.05
        while limiter.try_take(CHUNK_BYTES // 4):
            sent += CHUNK_BYTES // 4
    elapsed = t.now - start
    assert sent <= rate[0] * elapsed + RateLimiter.burst_bytes(rate[0]) + CHUNK_BYTES
    assert sent >= 0.9 * rate[0] * elapsed
    # A rate changed at run time applies at once; 0 is unlimited.
    rate[0] = CHUNK_BYTES
    t.now += 1.0
    sent = 0
    for _ in range(100):
        t.now += 0.05
        while limiter.try_take(CHUNK_BYTES // 4):
            sent += CHUNK_BYTES // 4
    assert sent <= CHUNK_BYTES * 5 + RateLimiter.burst_bytes(CHUNK_BYTES) + CHUNK_BYTES
    rate[0] = 0
    assert all(limiter.try_take(CHUNK_BYTES) for _ in range(1000))


async def test_appends_and_streamed_chunks_draw_on_one_budget() -> None:
    t = FakeTime()
    limiter = RateLimiter(lambda: CHUNK_BYTES, clock=t.clock, sleep=t.sleep)
    start = t.now
    assert limiter.try_take(CHUNK_BYTES)  # an APPEND of a second's worth
    assert not limiter.try_take(1)
    await limiter.acquire(CHUNK_BYTES)  # a chunk waits for the APPEND's bytes, then its own
    assert t.now - start >= 1.99
    # And an APPEND after a chunk waits for the chunk.
    assert limiter.try_take(CHUNK_BYTES)
    assert not limiter.try_take(1)
    t.now += 0.5
    assert not limiter.try_take(1)
    t.now += 0.5
    assert limiter.try_take(1)


def test_bytes_after_index_is_what_a_follower_lacks(tmp_path: Path) -> None:
    lg = open_log(tmp_path / "log", segment_bytes=600_000)
    fill(lg, 40, records=2, value_bytes=40_000)
    assert lg.segment_count > 2
    assert lg.bytes_after_index(0) == lg.size_bytes
    assert lg.bytes_after_index(lg.last_index) == 0
    assert lg.bytes_after_index(lg.last_index + 5) == 0
    sizes = [len(b) for b in lg.entries_by_index(lg.first_index, lg.last_index + 1, 1 << 30)]
    for index in (1, 7, 15, 16, 17, 30, 39):
        assert lg.bytes_after_index(index) == sum(sizes[index:]), index
    # An empty active segment (just rolled) changes nothing.
    assert lg.roll()
    for index in (1, 16, 39, 40):
        assert lg.bytes_after_index(index) == sum(sizes[index:]), index
    lg.advance_start(30)  # whole segments below offset 30 deleted
    first = lg.first_index
    assert first > 1
    assert lg.bytes_after_index(first - 1) == lg.size_bytes
    assert lg.bytes_after_index(0) == lg.size_bytes
    lg.close()


def test_log_throttle_limits_only_followers_far_behind(tmp_path: Path) -> None:
    from tidelog.node.catchup import LogThrottle

    lg = open_log(tmp_path / "log", segment_bytes=600_000)
    fill(lg, 60, records=1, value_bytes=20_000)
    t = FakeTime()
    rate = [CHUNK_BYTES]
    lag = [300_000]
    limiter = RateLimiter(lambda: rate[0], clock=t.clock, sleep=t.sleep)
    throttle = LogThrottle(lg, limiter, lambda: rate[0], lambda: lag[0])
    last = lg.last_index
    assert throttle.behind(0, last)  # a new replica
    assert not throttle.behind(last - 10, last)  # about 200 KB
    assert not throttle.behind(last, last)
    # 20 entries behind is about 400 KB: far behind above a 300 KB lag, not above 500 KB.
    assert throttle.behind(last - 20, last)
    lag[0] = 500_000
    assert not throttle.behind(last - 20, last)
    # Unlimited rate: nothing is far behind (nothing to limit).
    rate[0] = 0
    assert not throttle.behind(0, last)
    rate[0] = CHUNK_BYTES
    assert throttle.take(CHUNK_BYTES // 2)
    assert throttle.bytes_taken == CHUNK_BYTES // 2
    while throttle.take(CHUNK_BYTES // 2):
        pass
    assert throttle.bytes_taken <= RateLimiter.burst_bytes(CHUNK_BYTES) + CHUNK_BYTES
    lg.close()


async def test_a_rate_changed_at_run_time_applies_to_a_copy_already_waiting() -> None:
    t = FakeTime()
    start = t.now

    def rate() -> int:  # 1 KiB/s for two seconds, then 10 MiB/s (cluster config set)
        return 1024 if t.now < start + 2.0 else 10 * CHUNK_BYTES

    limiter = RateLimiter(rate, clock=t.clock, sleep=t.sleep)
    # A chunk of 1 MiB at 1 KiB/s would wait about 17 minutes; the new rate frees it at once.
    await limiter.acquire(CHUNK_BYTES)
    assert t.now - start <= 2.0 + RateLimiter.wake_s + 0.2
    # And the APPENDs' side sees the new rate as well.
    t.now += 0.2
    assert limiter.try_take(CHUNK_BYTES)
