"""Partition log: retention by time and size, prefix truncation, and log_start.json."""

from __future__ import annotations

import json
import shutil
from itertools import pairwise
from pathlib import Path

import pytest

from tests.unit.log_support import (
    SEGMENT_BYTES_MIN,
    Clock,
    batch,
    config,
    fill,
    headers,
    open_log,
    read_all,
)
from tidelog.errors import OffsetOutOfRange
from tidelog.node.log import PartitionLog
from tidelog.node.log.partition_log import START_FILE

DAY_MS = 24 * 3600 * 1000


def _log_with_old_and_new(directory: Path, clock: Clock, **overrides: int | str) -> PartitionLog:
    """Segments of batches stamped one day ago, then segments of batches stamped now."""
    log = open_log(directory, clock, segment_bytes=SEGMENT_BYTES_MIN, **overrides)
    fill(log, 40, ts0=clock.now_ms - DAY_MS)
    fill(log, 40, ts0=clock.now_ms)
    return log


def test_retention_by_time_deletes_whole_closed_segments(tmp_path: Path) -> None:
    clock = Clock(10 * DAY_MS)
    log = _log_with_old_and_new(tmp_path, clock, retention_ms=3600 * 1000)
    bases = log.segment_base_offsets
    # Expected: the leading segments whose newest batch is a day old.
    old_end = 80  # offsets of the old batches: [0, 80)
    expected = [b for b, nxt in pairwise(bases) if nxt <= old_end]
    assert expected and len(expected) < len(bases) - 1
    assert log.enforce_retention() == len(expected)
    start = bases[len(expected)]
    assert log.log_start_offset == start <= old_end
    assert log.segment_base_offsets == bases[len(expected) :]
    assert log.first_index == start // 2 + 1
    assert log.term_at_index(log.first_index - 1) == 1
    assert log.term_at_index(log.first_index - 2) is None
    assert read_all(log) == list(range(start, 160))
    with pytest.raises(OffsetOutOfRange) as info:
        log.read(start - 1, 100)
    assert f"[{start}, 160]" in str(info.value)
    assert info.value.metadata["log_start_offset"] == str(start)
    assert log.enforce_retention() == 0
    for name in (f"{b:020d}{s}" for b in expected for s in (".log", ".index", ".timeindex")):
        assert not (tmp_path / name).exists()
    log.close()

    log = open_log(tmp_path, clock, segment_bytes=SEGMENT_BYTES_MIN, retention_ms=3600 * 1000)
    assert (log.log_start_offset, log.first_index) == (start, start // 2 + 1)
    assert log.term_at_index(log.first_index - 1) == 1
    assert read_all(log) == list(range(start, 160))
    log.close()


def test_retention_never_deletes_the_active_segment(tmp_path: Path) -> None:
    clock = Clock(10 * DAY_MS)
    log = open_log(tmp_path, clock, segment_bytes=SEGMENT_BYTES_MIN, retention_ms=1000)
    fill(log, 30, ts0=1000, term=3)
    count = log.segment_count
    assert log.enforce_retention() == count - 1
    assert log.segment_count == 1
    # Roll the quiet partition by age: now the old data can go too.
    clock.now_ms += 8 * DAY_MS
    assert log.maybe_roll()
    assert log.enforce_retention() == 1
    assert (log.log_start_offset, log.log_end_offset) == (60, 60)
    assert (log.first_index, log.last_index, log.last_term) == (31, 30, 3)
    assert log.term_at_index(30) == 3
    assert log.read(60, 100) == b""
    log.close()
    log = open_log(tmp_path, clock, segment_bytes=SEGMENT_BYTES_MIN, retention_ms=1000)
    assert (log.log_start_offset, log.log_end_offset) == (60, 60)
    assert (log.first_index, log.last_index, log.last_term) == (31, 30, 3)
    assert log.append(batch(1), 4) == (60, 60)
    assert headers(log) == [(60, 31, 4)]
    log.close()


def test_retention_by_bytes(tmp_path: Path) -> None:
    clock = Clock()
    limit = 3 * SEGMENT_BYTES_MIN
    log = open_log(tmp_path, clock, segment_bytes=SEGMENT_BYTES_MIN, retention_bytes=limit)
    fill(log, 100, ts0=clock.now_ms)
    sizes = [p.stat().st_size for p in sorted(tmp_path.glob("*.log"))]
    total = sum(sizes)
    assert total == log.size_bytes > limit
    deleted = 0
    while total > limit and deleted < len(sizes) - 1:
        total -= sizes[deleted]
        deleted += 1
    assert log.enforce_retention() == deleted
    assert log.size_bytes == total <= limit
    assert log.enforce_retention() == 0
    log.close()


def test_retention_respects_below_and_disabled_limits(tmp_path: Path) -> None:
    clock = Clock(10 * DAY_MS)
    log = _log_with_old_and_new(tmp_path, clock, retention_ms=-1, retention_bytes=-1)
    assert log.enforce_retention() == 0
    log.update_config(config(segment_bytes=SEGMENT_BYTES_MIN, retention_ms=1000))
    bases = log.segment_base_offsets
    assert log.enforce_retention(below=bases[1] + 1) == 1
    assert log.log_start_offset == bases[1]
    assert log.enforce_retention(below=0) == 0
    log.close()


def test_truncate_prefix(tmp_path: Path) -> None:
    log = open_log(tmp_path, segment_bytes=SEGMENT_BYTES_MIN)
    fill(log, 60, term=2)
    bases = log.segment_base_offsets
    assert log.truncate_prefix(bases[2] - 1) == 1  # segment 1 is not entirely below
    assert log.truncate_prefix(bases[2]) == 1
    assert log.segment_base_offsets == bases[2:]
    assert log.truncate_prefix(log.log_end_offset) == len(bases) - 3
    assert log.segment_base_offsets == bases[-1:]  # the active segment stays
    with pytest.raises(ValueError, match="ends at"):
        log.truncate_prefix(log.log_end_offset + 1)
    log.close()


def test_interrupted_deletion_is_finished_on_open(tmp_path: Path) -> None:
    clock = Clock(10 * DAY_MS)
    log = _log_with_old_and_new(tmp_path / "a", clock, retention_ms=3600 * 1000)
    log.close()
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    log = open_log(tmp_path / "a", clock, segment_bytes=SEGMENT_BYTES_MIN, retention_ms=3600 * 1000)
    deleted = log.enforce_retention()
    start, first_index = log.log_start_offset, log.first_index
    log.close()
    # "b" crashed after writing log_start.json and before unlinking the segments.
    shutil.copy(tmp_path / "a" / START_FILE, tmp_path / "b" / START_FILE)
    log = open_log(tmp_path / "b", clock, segment_bytes=SEGMENT_BYTES_MIN)
    assert deleted and (log.log_start_offset, log.first_index) == (start, first_index)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == sorted(
        p.name for p in (tmp_path / "b").iterdir()
    )
    log.close()


def test_reset_and_interrupted_reset(tmp_path: Path) -> None:
    log = open_log(tmp_path / "a", segment_bytes=SEGMENT_BYTES_MIN)
    fill(log, 30, term=2)
    log.close()
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    log = open_log(tmp_path / "a", segment_bytes=SEGMENT_BYTES_MIN)
    log.reset(1000, 400, 7)
    assert (log.log_start_offset, log.log_end_offset, log.first_index, log.last_index) == (
        1000,
        1000,
        401,
        400,
    )
    assert (log.last_term, log.term_at_index(400), log.flushed_offset) == (7, 7, 1000)
    assert log.append(batch(1), 8) == (1000, 1000)
    log.close()
    log = open_log(tmp_path / "a", segment_bytes=SEGMENT_BYTES_MIN)
    assert headers(log) == [(1000, 401, 8)]
    assert log.term_at_index(400) == 7
    log.close()
    # "b" crashed in the middle of the reset: only log_start.json (reset=true) was written.
    doc = {"version": 1, "log_start_offset": 500, "first_index": 200, "prev_term": 6, "reset": True}
    (tmp_path / "b" / START_FILE).write_text(json.dumps(doc))
    log = open_log(tmp_path / "b", segment_bytes=SEGMENT_BYTES_MIN)
    assert (log.log_start_offset, log.log_end_offset, log.first_index, log.last_term) == (
        500,
        500,
        200,
        6,
    )
    assert log.segment_count == 1
    log.close()
    assert json.loads((tmp_path / "b" / START_FILE).read_text())["reset"] is False


def test_inconsistent_start_file_is_ignored(tmp_path: Path) -> None:
    log = open_log(tmp_path, segment_bytes=SEGMENT_BYTES_MIN)
    fill(log, 30)
    bases = log.segment_base_offsets
    log.close()
    doc = {"version": 1, "log_start_offset": bases[1] + 1, "first_index": 9, "prev_term": 1}
    (tmp_path / START_FILE).write_text(json.dumps(doc))
    log = open_log(tmp_path, segment_bytes=SEGMENT_BYTES_MIN)
    assert log.segment_base_offsets == bases
    assert read_all(log) == list(range(60))
    log.close()
    assert not (tmp_path / START_FILE).exists()


def test_a_logical_start_inside_a_segment_hides_the_offsets_below_it(tmp_path: Path) -> None:
    clock = Clock(10 * DAY_MS)
    log = open_log(tmp_path, clock, segment_bytes=SEGMENT_BYTES_MIN)
    fill(log, 60, ts0=1000)  # offsets [0, 120), two per batch
    bases = log.segment_base_offsets
    assert len(bases) > 3
    # A batch boundary inside the third segment: the two segments below it go, the third
    # stays (its batches below the start still stored, for Raft).
    start = bases[2] + 4
    assert start < bases[3]
    assert log.advance_start(start) == 2
    assert log.segment_base_offsets == bases[2:]
    assert (log.log_start_offset, log.stored_start_offset) == (start, bases[2])
    assert log.first_index == bases[2] // 2 + 1  # Raft still has the entries below `start`
    assert log.end_offset_at_index(log.first_index - 1) == bases[2]
    assert log.entries_by_index(log.first_index, log.first_index + 1, 1 << 20)
    with pytest.raises(OffsetOutOfRange) as info:
        log.read(start - 2, 1 << 20)
    assert info.value.metadata["log_start_offset"] == str(start)
    assert read_all(log) == list(range(start, 120))
    # A timestamp older than every record finds the start, not a hidden batch below it.
    assert log.offset_for_timestamp(0) == (start, 1000 + start // 2)
    assert log.advance_start(start - 2) == 0  # never lowered
    assert log.log_start_offset == start
    with pytest.raises(ValueError, match="ends at"):
        log.advance_start(121)
    log.close()

    # The logical start is durable: a restart keeps it and deletes nothing more.
    log = open_log(tmp_path, clock, segment_bytes=SEGMENT_BYTES_MIN)
    assert (log.log_start_offset, log.stored_start_offset) == (start, bases[2])
    assert log.segment_base_offsets == bases[2:]
    assert json.loads((tmp_path / START_FILE).read_text())["logical_start_offset"] == start
    assert read_all(log) == list(range(start, 120))
    # Moving it within the same segment deletes nothing but still persists.
    assert log.advance_start(start + 2) == 0
    log.close()
    log = open_log(tmp_path, clock, segment_bytes=SEGMENT_BYTES_MIN)
    assert (log.log_start_offset, log.stored_start_offset) == (start + 2, bases[2])
    log.close()


def test_a_logical_start_in_the_first_segment_survives_restart(tmp_path: Path) -> None:
    log = open_log(tmp_path, segment_bytes=SEGMENT_BYTES_MIN)
    fill(log, 30)
    assert log.advance_start(10) == 0
    log.close()
    log = open_log(tmp_path, segment_bytes=SEGMENT_BYTES_MIN)
    assert (log.log_start_offset, log.stored_start_offset, log.first_index) == (10, 0, 1)
    assert log.term_at_index(0) == 0
    assert read_all(log) == list(range(10, 60))
    log.close()


def test_retention_point_decides_without_deleting(tmp_path: Path) -> None:
    clock = Clock(10 * DAY_MS)
    log = _log_with_old_and_new(tmp_path, clock, retention_ms=3600 * 1000)
    bases = log.segment_base_offsets
    point = log.retention_point()
    assert point is not None and point in bases[1:]
    assert log.segment_base_offsets == bases and log.log_start_offset == 0
    assert log.retention_point(below=bases[1]) == bases[1]
    assert log.retention_point(below=bases[1] - 1) is None
    # A logical start inside an expired segment: retention counts from there on.
    log.advance_start(bases[1] + 2)
    assert log.retention_point() == point
    assert log.segment_base_offsets == bases[1:]
    assert log.advance_start(point) == bases.index(point) - 1
    assert log.retention_point() is None
    log.close()


def test_retention_bytes_counts_from_the_logical_start(tmp_path: Path) -> None:
    log = open_log(tmp_path, segment_bytes=SEGMENT_BYTES_MIN)
    fill(log, 100)
    bases = log.segment_base_offsets
    # Bytes from the logical start: all but the first segment and the second's first batch.
    logical_size = log.size_bytes - _segment_size(tmp_path, bases[0])
    logical_size -= len(log.read(bases[1], 1))
    log.advance_start(bases[1] + 2)
    log.update_config(config(segment_bytes=SEGMENT_BYTES_MIN, retention_bytes=logical_size))
    assert log.retention_point() is None
    log.update_config(config(segment_bytes=SEGMENT_BYTES_MIN, retention_bytes=logical_size - 1))
    assert log.retention_point() == bases[2]
    log.close()


def _segment_size(directory: Path, base: int) -> int:
    return (directory / f"{base:020d}.log").stat().st_size


def test_reset_takes_the_leaders_logical_start(tmp_path: Path) -> None:
    log = open_log(tmp_path, segment_bytes=SEGMENT_BYTES_MIN)
    fill(log, 10, term=2)
    log.reset(1000, 400, 7, log_start=1006)
    assert (log.log_start_offset, log.stored_start_offset, log.log_end_offset) == (1006, 1000, 1000)
    with pytest.raises(ValueError, match="below the reset offset"):
        log.reset(1000, 400, 7, log_start=999)
    # The leader's entries from 1000 on arrive; those below 1006 are stored, not readable.
    fill(log, 5, term=8)
    assert log.log_end_offset == 1010
    assert read_all(log) == list(range(1006, 1010))
    log.close()
    log = open_log(tmp_path, segment_bytes=SEGMENT_BYTES_MIN)
    assert (log.log_start_offset, log.stored_start_offset) == (1006, 1000)
    log.close()
