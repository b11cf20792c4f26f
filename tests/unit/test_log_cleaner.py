"""The log cleaner (node/log/cleaner.py) on real segment files: superseded records go,
offsets, Raft stamps and batch boundaries stay, fetches from inside a gap start at the next
record, tombstones expire, a crash at any step of the swap leaves a valid log, and a map
smaller than the key set cleans over several runs."""

from __future__ import annotations

import asyncio
import os
import struct
from collections.abc import Sequence
from pathlib import Path

import crc32c
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.unit.log_support import Clock, config
from tidelog import records
from tidelog.config import TopicConfig, validate_topic_configs
from tidelog.errors import CorruptBatch, InvalidConfig, InvalidRecord, StorageError
from tidelog.node.log import PartitionLog
from tidelog.node.log.clean_state import CleanerStats
from tidelog.node.log.cleaner import (
    ENTRY_BYTES,
    CleanerSettings,
    LogCleaner,
    RateLimiter,
    build,
    clean_now,
    dirty_view,
    plan,
)
from tidelog.node.log.partition_log import CLEANED_SUFFIX, CLEANER_CHECKPOINT_FILE
from tidelog.node.metrics import NodeMetrics, PartitionStats

DAY_MS = 24 * 3600 * 1000
T0 = 1_700_000_000_000


def open_compacted(directory: Path, clock: Clock, **overrides: int | str) -> PartitionLog:
    opts: dict[str, int | str] = {"cleanup_policy": "compact", "segment_bytes": 4096}
    opts.update(overrides)
    return PartitionLog(directory, config(**opts), clock_ms=clock)


def put(
    log: PartitionLog, items: Sequence[tuple[bytes, bytes | None]], ts: int, term: int = 1
) -> tuple[int, int]:
    data = records.encode_batch(
        [v for _k, v in items], keys=[k for k, _v in items], timestamps_ms=ts
    )
    return log.append(data, term)


def roll(log: PartitionLog, clock: Clock) -> None:
    """Close the active segment the way segment.ms does when no write comes."""
    clock.now_ms += log.config.segment_ms
    assert log.maybe_roll(clock.now_ms)


def consume(log: PartitionLog, start: int = 0) -> list[records.Record]:
    """What a consumer reading from ``start`` gets: whole batches fetched, positions moved by
    the last batch's end (as client/consumer.py does), records below ``start`` skipped."""
    out: list[records.Record] = []
    offset = max(start, log.log_start_offset)
    while offset < log.log_end_offset:
        data = log.read(offset, 1 << 16)
        assert data
        for pos, _h in records.iter_headers(data):
            records.validate_batch(data, pos)
        out += records.decode_batches(data, min_offset=offset)
        offset = max(records.batch_end_offset(data, pos) for pos, _h in records.iter_headers(data))
    return out


def latest(recs: list[records.Record]) -> dict[bytes, bytes | None]:
    out: dict[bytes, bytes | None] = {}
    for r in recs:
        assert r.key is not None
        out[r.key] = r.value
    return out


def raft_view(log: PartitionLog) -> list[tuple[int, int | None, int | None]]:
    idx = range(log.first_index - 1, log.last_index + 1)
    return [(i, log.term_at_index(i), log.end_offset_at_index(i)) for i in idx]


def fill_updates(
    log: PartitionLog, clock: Clock, keys: int, rounds: int, per_batch: int = 5
) -> dict[bytes, bytes | None]:
    want: dict[bytes, bytes | None] = {}
    items = [(b"k%03d" % (i % keys), b"v%d-%d" % (i % keys, i)) for i in range(keys * rounds)]
    for i in range(0, len(items), per_batch):
        chunk = items[i : i + per_batch]
        put(log, chunk, clock.now_ms)
        clock.now_ms += 1
        want.update(chunk)
    return want


def test_superseded_records_go_offsets_and_raft_stamps_stay(tmp_path: Path) -> None:
    clock = Clock(T0)
    log = open_compacted(tmp_path, clock)
    want = fill_updates(log, clock, keys=10, rounds=40)
    roll(log, clock)
    before_raft = raft_view(log)
    before = consume(log)
    start, end, size = log.log_start_offset, log.log_end_offset, log.size_bytes
    res = clean_now(log, now_ms=clock.now_ms)
    assert res is not None and res.segments_rewritten > 0
    assert res.cleaned_to == end
    after = consume(log)
    # Exactly the latest record per key survives, at its original offset.
    last_offset = {r.key: r.offset for r in before}
    assert [(r.offset, r.key, r.value) for r in after] == sorted(
        (o, k, want[k]) for k, o in last_offset.items() if k is not None
    )
    offsets = [r.offset for r in after]
    assert offsets == sorted(offsets) and len(set(offsets)) == len(offsets)
    assert latest(after) == want
    # The log keeps its bounds and every Raft entry its term and end offset.
    assert (log.log_start_offset, log.log_end_offset) == (start, end)
    assert raft_view(log) == before_raft
    assert log.size_bytes < size / 2  # 80 batches stay, as headers at least
    assert log.cleaner_stats.runs == 1 and log.cleaner_stats.bytes_reclaimed > 0
    # Everything holds after a restart (indexes and checkpoint from disk).
    log.close()
    log = open_compacted(tmp_path, clock)
    assert consume(log) == after and raft_view(log) == before_raft
    assert log.cleaner_checkpoint == end
    # Nothing is dirty, but the reopened log's tombstones are not known: one pass reads the
    # cleaned part (and removes nothing), then there is nothing to do.
    again = clean_now(log, now_ms=clock.now_ms)
    assert again is not None and again.segments_rewritten == 0
    assert clean_now(log, now_ms=clock.now_ms) is None
    log.close()


def test_fetch_from_inside_a_gap_starts_at_the_next_record(tmp_path: Path) -> None:
    clock = Clock(T0)
    log = open_compacted(tmp_path, clock)
    put(log, [(b"a", b"1"), (b"b", b"1"), (b"c", b"1")], T0)  # offsets 0-2
    put(log, [(b"a", b"2"), (b"b", b"2")], T0)  # offsets 3-4
    put(log, [(b"d", b"1")], T0)  # offset 5
    roll(log, clock)
    clean_now(log, now_ms=clock.now_ms)
    assert [(r.offset, r.key) for r in consume(log)] == [(2, b"c"), (3, b"a"), (4, b"b"), (5, b"d")]
    assert [r.offset for r in consume(log, 0)] == [2, 3, 4, 5]
    assert [r.offset for r in consume(log, 1)] == [2, 3, 4, 5]  # 1 is a gap
    assert [r.offset for r in consume(log, 4)] == [4, 5]
    # A batch that lost every record stays as an empty batch with its offsets.
    log2 = open_compacted(tmp_path / "two", clock)
    put(log2, [(b"a", b"1")], T0)
    put(log2, [(b"a", b"2")], T0)
    roll(log2, clock)
    clean_now(log2, now_ms=clock.now_ms)
    data = log2.read(0, 1 << 16)
    hs = [h for _p, h in records.iter_headers(data)]
    assert [(h.base_offset, h.last_offset, h.is_compacted) for h in hs] == [
        (0, 0, True),
        (1, 1, False),
    ]
    assert [r.offset for r in consume(log2, 0)] == [1]
    log.close()
    log2.close()


def test_tombstones_expire_after_delete_retention(tmp_path: Path) -> None:
    clock = Clock(T0)
    log = open_compacted(tmp_path, clock, delete_retention_ms=DAY_MS)
    put(log, [(b"a", b"1"), (b"b", b"1")], T0)
    put(log, [(b"a", None)], T0 + 10)
    roll(log, clock)
    clean_now(log, now_ms=T0 + 1000)
    # The older value is gone; the tombstone stays while younger than delete.retention.ms.
    assert [(r.key, r.value) for r in consume(log)] == [(b"b", b"1"), (b"a", None)]
    assert log.cleaner_stats.tombstone_age_ms == 990
    put(log, [(b"c", b"1")], clock.now_ms)
    roll(log, clock)
    clean_now(log, now_ms=T0 + 10 + DAY_MS + 1)
    assert [(r.key, r.value) for r in consume(log)] == [(b"b", b"1"), (b"c", b"1")]
    assert log.cleaner_stats.tombstone_age_ms == 0
    log.close()


def test_a_quiet_log_loses_its_expired_tombstones(tmp_path: Path) -> None:
    """No new writes after the tombstone: the dirty ratio stays 0, yet the background cleaner
    removes the tombstone once delete.retention.ms has passed (never kept forever)."""
    clock = Clock(T0)
    log = open_compacted(tmp_path, clock, delete_retention_ms=60_000)
    put(log, [(b"a", b"1"), (b"b", b"1")], T0)
    put(log, [(b"a", None)], T0)
    roll(log, clock)
    cleaner = LogCleaner(
        CleanerSettings(), lambda: [(log, log.log_end_offset)], clock_ms=lambda: clock.now_ms
    )
    clock.now_ms = T0 + 1000
    assert asyncio.run(cleaner.run_once()) == 1
    assert [(r.key, r.value) for r in consume(log)] == [(b"b", b"1"), (b"a", None)]
    assert asyncio.run(cleaner.run_once()) == 0  # clean, tombstone not expired
    assert log.cleaner_stats.dirty_ratio == 0.0
    clock.now_ms = T0 + 60_001
    assert asyncio.run(cleaner.run_once()) == 1
    assert [(r.key, r.value) for r in consume(log)] == [(b"b", b"1")]
    assert log.cleaner_stats.oldest_tombstone_ts is None
    assert asyncio.run(cleaner.run_once()) == 0
    log.close()


def test_compaction_lag_and_uncommitted_records_are_not_cleaned(tmp_path: Path) -> None:
    clock = Clock(T0)
    log = open_compacted(tmp_path, clock, min_compaction_lag_ms=60_000, segment_ms=1000)
    put(log, [(b"a", b"1")], T0 - 120_000)
    roll(log, clock)
    put(log, [(b"a", b"2")], clock.now_ms)
    roll(log, clock)
    # The second segment is younger than the lag: only the first is cleanable, and a map of
    # the first alone supersedes nothing.
    assert clean_now(log, now_ms=clock.now_ms) is not None
    assert [r.value for r in consume(log)] == [b"1", b"2"]
    # Past the lag, but above the high watermark: still nothing removed.
    later = clock.now_ms + 120_000
    assert clean_now(log, now_ms=later, upto=1) is None
    assert [r.value for r in consume(log)] == [b"1", b"2"]
    clean_now(log, now_ms=later)
    assert [r.value for r in consume(log)] == [b"2"]
    log.close()


def test_dirty_ratio_drives_the_background_cleaner(tmp_path: Path) -> None:
    clock = Clock(T0)
    log = open_compacted(tmp_path, clock, min_cleanable_dirty_ratio="0.5")
    fill_updates(log, clock, keys=5, rounds=40)
    roll(log, clock)
    view = dirty_view(log, log.log_end_offset, clock.now_ms)
    assert view.ratio == 1.0 and view.dirty_bytes == log.size_bytes

    cleaner = LogCleaner(CleanerSettings(), lambda: [(log, log.log_end_offset)])
    assert asyncio.run(cleaner.run_once()) == 1
    assert log.cleaner_stats.dirty_ratio == 0.0 and log.cleaner_stats.runs == 1
    assert log.cleaner_stats.compaction_lag_ms == 0
    # A little new dirt is below the ratio: no run.
    put(log, [(b"k000", b"new")], clock.now_ms)
    roll(log, clock)
    assert asyncio.run(cleaner.run_once()) == 0
    assert 0 < log.cleaner_stats.dirty_ratio < 0.5
    assert log.cleaner_stats.compaction_lag_ms > 0
    log.close()


def test_retention_applies_to_compact_delete_only(tmp_path: Path) -> None:
    clock = Clock(T0)
    for policy, deleted in (("compact", False), ("compact,delete", True)):
        log = open_compacted(tmp_path / policy, clock, cleanup_policy=policy, retention_ms=1000)
        put(log, [(b"a", b"1")], T0)
        roll(log, clock)
        put(log, [(b"b", b"1")], clock.now_ms)
        assert (log.enforce_retention(clock.now_ms + 10_000) > 0) is deleted
        log.close()


@pytest.mark.parametrize(
    "step",
    ["written", "unlink_indexes", "rename", "fsync_dir", "swap", "write_indexes", "checkpoint"],
)
def test_a_crash_at_any_step_of_the_swap_leaves_old_or_new(tmp_path: Path, step: str) -> None:
    clock = Clock(T0)
    log = open_compacted(tmp_path, clock)
    want = fill_updates(log, clock, keys=8, rounds=30)
    roll(log, clock)
    before = consume(log)
    raft = raft_view(log)
    seen: list[str] = []

    def hook(s: str) -> None:
        seen.append(s)
        if s == step and seen.count(s) == 2:  # the second segment's swap (or checkpoint)
            raise OSError("crash")
        if s == step == "checkpoint":
            raise OSError("crash")

    with pytest.raises(OSError, match="crash"):
        clean_now(log, now_ms=clock.now_ms, hook=hook)
    # The process dies here: nothing is closed or flushed.
    for seg in log._segments:
        seg.close()
    log = open_compacted(tmp_path, clock)
    assert not [n for n in os.listdir(tmp_path) if n.endswith(CLEANED_SUFFIX)]
    got = consume(log)
    assert latest(got) == want
    assert {(r.offset, r.value) for r in got} <= {(r.offset, r.value) for r in before}
    assert raft_view(log) == raft
    assert (CLEANER_CHECKPOINT_FILE in os.listdir(tmp_path)) is False
    # The next run finishes the job (the reopened log dropped its empty active segment).
    roll(log, clock)
    clean_now(log, now_ms=clock.now_ms)
    assert latest(consume(log)) == want and len(consume(log)) == len(want)
    log.close()


def test_a_small_map_cleans_over_several_runs(tmp_path: Path) -> None:
    clock = Clock(T0)
    log = open_compacted(tmp_path, clock)
    want = fill_updates(log, clock, keys=50, rounds=6)
    roll(log, clock)
    settings_ = CleanerSettings(map_bytes=ENTRY_BYTES * 20)
    ends = []
    while (res := clean_now(log, now_ms=clock.now_ms, settings=settings_)) is not None:
        ends.append(res.cleaned_to)
        assert log.cleaner_checkpoint == res.cleaned_to
        assert latest(consume(log)) == want
    assert len(ends) > 3 and ends == sorted(ends) and ends[-1] == log.log_end_offset
    assert len(consume(log)) == len(want)
    log.close()


def test_a_lagging_follower_takes_cleaned_entries(tmp_path: Path) -> None:
    clock = Clock(T0)
    leader = open_compacted(tmp_path / "leader", clock)
    want = fill_updates(leader, clock, keys=6, rounds=20)
    roll(leader, clock)
    clean_now(leader, now_ms=clock.now_ms)
    follower = open_compacted(tmp_path / "follower", clock)
    for data in leader.entries_by_index(1, leader.last_index + 1, 1 << 30):
        follower.append_stamped(data)
    assert raft_view(follower) == raft_view(leader)
    assert latest(consume(follower)) == want
    leader.close()
    follower.close()


def test_producers_cannot_send_compacted_batches() -> None:
    h = records.validate_batch(records.encode_batch([b"x", b"y"], keys=[b"a", b"a"]))
    data = records.compact_batch(h, [])
    limits = records.ProduceLimits(1 << 20, 1000, 1 << 20)
    with pytest.raises(InvalidRecord, match="compacted"):
        records.scan_batches(data, limits)


def test_rate_limiter_sleeps_for_the_excess() -> None:
    t = [0.0]
    slept: list[float] = []
    lim = RateLimiter(1000, clock=lambda: t[0], sleep=slept.append)
    lim.take(1000)
    assert not slept
    lim.take(500)
    assert slept == [0.5]


CRASH_STEPS = ("written", "unlink_indexes", "rename", "fsync_dir", "swap", "checkpoint")


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    ops=st.lists(
        st.one_of(
            st.tuples(
                st.just("put"),
                st.lists(
                    st.tuples(
                        st.sampled_from([b"a", b"b", b"c", b"d", b"e"]),
                        st.one_of(st.none(), st.binary(min_size=0, max_size=30)),
                    ),
                    min_size=1,
                    max_size=6,
                ),
            ),
            st.tuples(st.just("roll"), st.just([])),
            st.tuples(st.just("clean"), st.just([])),
            st.tuples(st.just("wait"), st.just([])),
            st.tuples(st.just("restart"), st.just([])),
            st.tuples(st.sampled_from(CRASH_STEPS), st.just([])),
        ),
        max_size=40,
    ),
    map_keys=st.integers(min_value=6, max_value=40),
)
def test_cleaning_keeps_the_last_value_per_key(
    tmp_path_factory: pytest.TempPathFactory,
    ops: list[tuple[str, list[tuple[bytes, bytes | None]]]],
    map_keys: int,
) -> None:
    directory = tmp_path_factory.mktemp("prop")
    clock = Clock(T0)
    log = open_compacted(directory, clock, segment_bytes=4096, delete_retention_ms=1000)
    settings_ = CleanerSettings(map_bytes=ENTRY_BYTES * map_keys)
    want: dict[bytes, bytes | None] = {}
    for op, items in ops:
        if op == "put":
            put(log, items, clock.now_ms)
            want.update(items)
        elif op == "roll":
            clock.now_ms += log.config.segment_ms
            log.maybe_roll(clock.now_ms)
        elif op == "wait":
            clock.now_ms += 2000
        elif op == "restart":
            log.close()
            log = open_compacted(directory, clock, segment_bytes=4096, delete_retention_ms=1000)
        elif op in CRASH_STEPS:
            # A clean that dies at this step (first segment or checkpoint), then a restart.
            def crash(step: str, at: str = op) -> None:
                if step == at:
                    raise OSError("crash")

            try:
                clean_now(log, now_ms=clock.now_ms, settings=settings_, hook=crash)
            except OSError:
                for seg in log._segments:
                    seg.close()
            else:
                log.close()
            log = open_compacted(directory, clock, segment_bytes=4096, delete_retention_ms=1000)
        else:
            clean_now(log, now_ms=clock.now_ms, settings=settings_)
        got = latest(consume(log))
        # Same last value per key; a tombstoned key may be gone once the tombstone expired.
        for k, v in want.items():
            if v is None:
                assert got.get(k) is None
            else:
                assert got[k] == v
        assert set(got) <= set(want)
    # Everything closed, cleaned past delete.retention.ms: tombstoned keys are absent.
    clock.now_ms += log.config.segment_ms
    log.maybe_roll(clock.now_ms)
    clock.now_ms += 5000
    while clean_now(log, now_ms=clock.now_ms, settings=settings_) is not None:
        pass
    got = latest(consume(log))
    assert got == {k: v for k, v in want.items() if v is not None}
    log.close()


def test_disk_shrinks_to_well_under_5_percent(tmp_path: Path) -> None:
    """1M updates over 1,000 keys, driven through the partition log directly (no node, to
    keep it fast): batches of 1,000 records (one update of every key), 1 MiB segments."""
    clock = Clock(T0)
    log = open_compacted(tmp_path, clock, segment_bytes=1 << 20)
    keys = [b"key-%04d" % i for i in range(1000)]
    for rnd in range(1000):
        values = [b"value-%04d-%06d" % (i, rnd) for i in range(1000)]
        log.append(records.encode_batch(values, keys=keys, timestamps_ms=clock.now_ms), 1)
    roll(log, clock)
    original = log.size_bytes
    assert original > 30_000_000
    clean_now(log, now_ms=clock.now_ms)
    assert log.size_bytes < original * 0.01
    got = latest(consume(log))
    assert got == {k: b"value-%04d-%06d" % (i, 999) for i, k in enumerate(keys)}
    log.close()


def test_a_compacted_batch_is_laid_out_as_documented() -> None:
    """docs/wire-format.md, "Compacted batches", built by hand: header as before but for
    bit 7, batch_length and CRC; block = live_count, offset deltas, then the usual columns."""
    orig = bytearray(
        records.encode_batch(
            [b"v0", b"v1", None], keys=[b"a", b"b", b"a"], timestamps_ms=[50, 70, 60]
        )
    )
    records.stamp(orig, 0, 500, 4, 9)
    h = records.validate_batch(orig)
    kept = records.decode_records(bytes(orig))[1:]  # offsets 501 and 502
    got = records.compact_batch(h, kept)
    block = struct.pack("<i", 2) + struct.pack("<2i", 1, 2)
    block += struct.pack("<2i", 20, 10)  # timestamp deltas from first_timestamp 50
    block += struct.pack("<2i", 1, 1) + struct.pack("<2i", 2, -1) + b"ba" + b"v1"
    covered = struct.pack("<hiqqqhii", records.ATTR_COMPACTED, 2, 50, 70, -1, -1, -1, 3) + block
    want = struct.pack("<qiqqbI", 500, 61 + len(block), 4, 9, 2, crc32c.crc32c(covered))
    assert got == want + covered
    back = records.validate_batch(got)
    assert back._replace(batch_length=0, crc=0, attributes=0) == h._replace(
        batch_length=0, crc=0, attributes=0
    )
    assert [(r.offset, r.key, r.value) for r in records.decode_records(got)] == [
        (501, b"b", b"v1"),
        (502, b"a", None),
    ]
    cols = records.decode_key_columns(got)
    assert cols == records.KeyColumns([501, 502], [b"b", b"a"], [False, True], [70, 60])
    # Offsets that are not the batch's own, or not increasing, are refused.
    with pytest.raises(ValueError, match="in offset order"):
        records.compact_batch(h, kept[::-1])
    bad = bytearray(got)
    struct.pack_into("<2i", bad, records.HEADER_SIZE + 4, 2, 1)
    bad[29:33] = struct.pack("<I", crc32c.crc32c(bytes(bad[33:])))
    with pytest.raises(CorruptBatch, match="offset deltas"):
        records.validate_batch(bad)


def test_cleaner_metrics_for_compacted_partitions_only() -> None:
    m = NodeMetrics()
    c = CleanerStats(runs=2, bytes_reclaimed=900, io_bytes=5000, dirty_ratio=0.25)
    c.compaction_lag_ms, c.tombstone_age_ms = 1500, 2500
    m.watch_partitions(
        lambda: [
            PartitionStats("k", 0, 10, 0, 5, 5, 1, cleaner=c),
            PartitionStats("d", 0, 10, 0, 5, 5, 1),
        ]
    )
    reg = m.registry
    k, d = {"topic": "k", "partition": "0"}, {"topic": "d", "partition": "0"}
    assert reg.get_sample_value("tidelog_cleaner_runs_total", k) == 2
    assert reg.get_sample_value("tidelog_cleaner_reclaimed_bytes_total", k) == 900
    assert reg.get_sample_value("tidelog_cleaner_io_bytes_total", k) == 5000
    assert reg.get_sample_value("tidelog_cleaner_dirty_ratio", k) == 0.25
    assert reg.get_sample_value("tidelog_cleaner_compaction_lag_seconds", k) == 1.5
    assert reg.get_sample_value("tidelog_cleaner_tombstone_age_seconds", k) == 2.5
    assert reg.get_sample_value("tidelog_cleaner_runs_total", d) is None


def test_cleaner_topic_configs() -> None:
    cfg = TopicConfig.from_overrides({"cleanup.policy": "compact,delete"})
    assert (cfg.delete_retention_ms, cfg.min_cleanable_dirty_ratio) == (DAY_MS, 0.5)
    assert cfg.min_compaction_lag_ms == 0
    assert validate_topic_configs({"min.cleanable.dirty.ratio": "0.05"})
    for bad in ("1.5", "-0.1", "abc", ".5", "0,5"):
        with pytest.raises(InvalidConfig, match="ratio"):
            validate_topic_configs({"min.cleanable.dirty.ratio": bad})
    with pytest.raises(InvalidConfig):
        validate_topic_configs({"cleanup.policy": "delete,compact,x"})


def test_a_cut_below_the_checkpoint_lowers_it(tmp_path: Path) -> None:
    """What Raft writes again after a truncation, a reset or a lost tail was never cleaned:
    the checkpoint goes down with the cut (else a tombstone there could be removed before
    the older values of its key)."""
    clock = Clock(T0)
    log = open_compacted(tmp_path, clock)
    fill_updates(log, clock, keys=4, rounds=10)
    roll(log, clock)
    end = log.log_end_offset
    clean_now(log, now_ms=clock.now_ms)
    assert log.cleaner_checkpoint == end
    put(log, [(b"x", b"1")], clock.now_ms)
    log.truncate_suffix(end)
    assert log.cleaner_checkpoint == end
    log.truncate_suffix(20)
    assert log.cleaner_checkpoint == 20
    log.reset(10, 2, 1)
    assert log.cleaner_checkpoint == 10
    put(log, [(b"y", b"1")] * 30, clock.now_ms)
    assert log.cleaner_checkpoint == 10  # it does not come back as the log grows
    log.close()
    log = open_compacted(tmp_path, clock)
    assert log.cleaner_checkpoint == 10
    log.close()


def test_a_log_deleted_during_a_clean_stays_deleted(tmp_path: Path) -> None:
    """The partition is deleted while the worker thread would write its copies: nothing is
    created in the directory being removed, and the run gives up."""
    clock = Clock(T0)
    log = open_compacted(tmp_path / "p", clock)
    fill_updates(log, clock, keys=4, rounds=20)
    roll(log, clock)
    p = plan(log, log.log_end_offset, clock.now_ms)
    assert p is not None
    log.delete()
    with pytest.raises(StorageError, match="closed"):
        build(p, CleanerSettings(), RateLimiter(0))
    p.close()
    assert not (tmp_path / "p").exists()


def test_replicas_with_other_segment_boundaries_agree(tmp_path: Path) -> None:
    """Two replicas of the same entries, rolled at other sizes, each cleaned on its own:
    the same latest record per key, the same records above the offsets either cleaned, and
    the same Raft view."""
    clock = Clock(T0)
    a = open_compacted(tmp_path / "a", clock, segment_bytes=4096)
    b = open_compacted(tmp_path / "b", clock, segment_bytes=6000)
    want = fill_updates(a, clock, keys=7, rounds=50)
    for data in a.entries_by_index(1, a.last_index + 1, 1 << 30):
        b.append_stamped(data)
    assert a.segment_base_offsets != b.segment_base_offsets
    hw = a.log_end_offset - 20
    clean_now(a, upto=hw, now_ms=clock.now_ms)
    clean_now(b, upto=hw, now_ms=clock.now_ms)
    top = max(a.cleaner_checkpoint, b.cleaner_checkpoint)
    assert 0 < top <= hw
    ra, rb = consume(a), consume(b)
    assert latest(ra) == latest(rb) == want
    assert [r for r in ra if r.offset >= top] == [r for r in rb if r.offset >= top]
    assert raft_view(a) == raft_view(b)
    a.close()
    b.close()
