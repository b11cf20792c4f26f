"""Partition log: recovery after a crash, torn writes and corruption."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.unit.log_support import (
    SEGMENT_BYTES_MIN,
    Clock,
    batch,
    fill,
    headers,
    offsets_of,
    open_log,
    read_all,
)
from tidelog.node.log import PartitionLog
from tidelog.node.log.partition_log import RECOVERY_POINT_FILE
from tidelog.node.log.segment import Segment
from tidelog.records import iter_headers

_TERM_BYTES = range(12, 20)  # raft_term: outside the CRC; a larger term cannot be told apart


def _segments(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.log"))


def _batch_positions(path: Path) -> list[tuple[int, int]]:
    """(position, size) of each batch in a segment file."""
    return [(pos, h.size) for pos, h in iter_headers(path.read_bytes())]


def _build(directory: Path, batches: int, last_segment_batches: int) -> None:
    """A closed log of ``batches`` two-record batches in terms 1, 1, 2, 2, ... whose last
    segment holds ``last_segment_batches`` of them."""
    clock = Clock()
    log = open_log(directory, clock, segment_bytes=SEGMENT_BYTES_MIN, index_interval_bytes=600)
    for i in range(batches):
        if i == batches - last_segment_batches:
            clock.now_ms += 7 * 24 * 3600 * 1000  # roll by age right here
        log.append(batch(2, ts=1000 + i, tag=i), 1 + i // 2)
    log.close()
    assert len(_batch_positions(_segments(directory)[-1])) == last_segment_batches


def _check_continues(directory: Path, batches_left: int) -> None:
    """The log holds exactly the first ``batches_left`` batches and appends continue."""
    log = open_log(directory, segment_bytes=SEGMENT_BYTES_MIN, index_interval_bytes=600)
    end = 2 * batches_left
    assert (log.log_end_offset, log.last_index) == (end, batches_left)
    assert log.last_term == (1 + (batches_left - 1) // 2 if batches_left else 0)
    assert read_all(log) == list(range(end))
    assert log.flushed_offset == end
    term = max(log.last_term, 1)
    assert log.append(batch(2, tag=999), term) == (end, end + 1)
    assert log.last_index == batches_left + 1
    assert headers(log)[-1] == (end, batches_left + 1, term)
    log.close()
    log = open_log(directory, segment_bytes=SEGMENT_BYTES_MIN, index_interval_bytes=600)
    assert read_all(log) == list(range(end + 2))
    assert log.last_index == batches_left + 1
    log.close()


@pytest.mark.parametrize("last_segment_batches", [1, 4])
def test_torn_last_batch_at_every_byte(tmp_path: Path, last_segment_batches: int) -> None:
    pristine = tmp_path / "pristine"
    _build(pristine, 30, last_segment_batches)
    last = _segments(pristine)[-1]
    pos, size = _batch_positions(last)[-1]
    for cut in range(pos, pos + size + 1):
        work = tmp_path / f"cut{cut}"
        shutil.copytree(pristine, work)
        os.truncate(work / last.name, cut)
        _check_continues(work, 30 if cut == pos + size else 29)
        shutil.rmtree(work)


def test_flipped_byte_truncates_at_the_batch(tmp_path: Path) -> None:
    pristine = tmp_path / "pristine"
    _build(pristine, 20, 5)
    last = _segments(pristine)[-1]
    positions = _batch_positions(last)
    for k in (len(positions) - 1, 2):  # the last batch, and one in the middle
        pos, size = positions[k]
        kept = 20 - len(positions) + k
        for i in [b for b in range(size) if b not in _TERM_BYTES]:
            work = tmp_path / f"flip{k}-{i}"
            shutil.copytree(pristine, work)
            data = bytearray((work / last.name).read_bytes())
            data[pos + i] ^= 0x40
            (work / last.name).write_bytes(bytes(data))
            log = open_log(work, segment_bytes=SEGMENT_BYTES_MIN, index_interval_bytes=600)
            assert log.last_index == kept, (k, i)
            assert log.log_end_offset == 2 * kept
            log.close()
            shutil.rmtree(work)
    work = tmp_path / "continues"
    shutil.copytree(pristine, work)
    data = bytearray((work / last.name).read_bytes())
    data[positions[-1][0] + positions[-1][1] // 2] ^= 1
    (work / last.name).write_bytes(bytes(data))
    _check_continues(work, 19)


def test_damaged_base_offset_is_caught_by_continuity(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pristine = tmp_path / "pristine"
    _build(pristine, 12, 3)
    last = _segments(pristine)[-1]
    pos, _size = _batch_positions(last)[-1]
    data = bytearray(last.read_bytes())
    original = int.from_bytes(data[pos : pos + 8], "little")
    data[pos : pos + 8] = (original + 1).to_bytes(8, "little")
    last.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        _check_continues(pristine, 11)
    assert any("base_offset" in r.message and "truncating" in r.message for r in caplog.records)


def test_damaged_raft_index_is_caught_by_continuity(tmp_path: Path) -> None:
    _build(tmp_path, 12, 3)
    last = _segments(tmp_path)[-1]
    pos, _size = _batch_positions(last)[1]
    data = bytearray(last.read_bytes())
    data[pos + 20 : pos + 28] = (99).to_bytes(8, "little")
    last.write_bytes(bytes(data))
    _check_continues(tmp_path, 10)


def test_torn_closed_segment_ends_the_log_there(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A closed segment whose tail never reached the disk (flush=os and a power loss)."""
    _build(tmp_path, 40, 3)
    segments = _segments(tmp_path)
    assert len(segments) >= 4
    victim = segments[1]
    positions = _batch_positions(victim)
    before = len(_batch_positions(segments[0]))
    pos, size = positions[3]
    os.truncate(victim, pos + size // 2)
    with caplog.at_level(logging.WARNING):
        log = open_log(tmp_path, segment_bytes=SEGMENT_BYTES_MIN, index_interval_bytes=600)
    assert _segments(tmp_path) == segments[:2]
    log.close()
    _check_continues(tmp_path, before + 3)
    assert any("deleting segment" in r.message for r in caplog.records)


def test_garbage_start_of_closed_segment_drops_it_and_what_follows(tmp_path: Path) -> None:
    _build(tmp_path, 40, 3)
    segments = _segments(tmp_path)
    victim = segments[2]
    data = bytearray(victim.read_bytes())
    data[28] = 7  # magic of its first batch
    victim.write_bytes(bytes(data))
    kept = sum(len(_batch_positions(s)) for s in segments[:2])
    log = open_log(tmp_path, segment_bytes=SEGMENT_BYTES_MIN, index_interval_bytes=600)
    assert _segments(tmp_path) == segments[:2]
    log.close()
    _check_continues(tmp_path, kept)


def test_empty_trailing_segments_are_removed(tmp_path: Path) -> None:
    clock = Clock()
    log = open_log(tmp_path, clock, segment_ms=1000)
    fill(log, 3)
    clock.now_ms += 1000
    assert log.maybe_roll()
    assert log.segment_base_offsets == [0, 6]
    log.close()
    (tmp_path / f"{50:020d}.log").touch()  # a stray empty file further on
    (tmp_path / f"{77:020d}.index").write_bytes(b"x" * 8)  # an index without a segment
    log = open_log(tmp_path, clock, segment_ms=1000)
    assert log.segment_base_offsets == [0]
    assert (log.log_end_offset, log.last_index, log.last_term) == (6, 3, 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        f"{0:020d}.index",
        f"{0:020d}.log",
        f"{0:020d}.timeindex",
        RECOVERY_POINT_FILE,
    ]
    log.close()


def test_first_segment_may_be_empty(tmp_path: Path) -> None:
    log = open_log(tmp_path)
    assert (log.log_start_offset, log.log_end_offset, log.first_index, log.last_index) == (
        0,
        0,
        1,
        0,
    )
    log.close()
    log = open_log(tmp_path)
    assert (log.log_end_offset, log.last_index, log.last_term) == (0, 0, 0)
    assert log.term_at_index(0) == 0
    assert log.append(batch(3), 5) == (0, 2)
    log.close()
    (tmp_path / f"{0:020d}.log").write_bytes(b"\x00" * 40)  # a torn first header
    log = open_log(tmp_path)
    assert (log.log_end_offset, log.last_index, log.segment_count) == (0, 0, 1)
    assert offsets_of(log.read(0, 100)) == []
    log.close()


def _crash(log: PartitionLog) -> None:
    """The process dies: the files are closed as they are, nothing more is written."""
    for seg in log._segments:
        seg.close()


def test_torn_batch_in_a_closed_segment_written_since_the_last_fsync_is_cut(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """flush=os and a power loss: a batch of a closed segment lost part of its body while its
    header survived. Recovery checks the CRCs of the segments written since the recovery
    point and ends the log at that batch, instead of serving it to every follower."""
    log = open_log(tmp_path, segment_bytes=SEGMENT_BYTES_MIN, index_interval_bytes=600)
    for i in range(40):
        log.append(batch(2, ts=1000 + i, tag=i), 1 + i // 2)  # never flushed
    segments = _segments(tmp_path)
    assert len(segments) >= 4
    _crash(log)
    victim = segments[1]
    before = len(_batch_positions(segments[0]))
    pos, size = _batch_positions(victim)[2]
    data = bytearray(victim.read_bytes())
    data[pos + size - 10 : pos + size] = bytes(10)  # the body's end never reached the disk
    victim.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        log = open_log(tmp_path, segment_bytes=SEGMENT_BYTES_MIN, index_interval_bytes=600)
    assert log.last_index == before + 2 and log.log_end_offset == 2 * (before + 2)
    assert _segments(tmp_path) == segments[:2]
    assert any("truncating" in r.message and "CRC" in r.message.upper() for r in caplog.records)
    log.close()
    _check_continues(tmp_path, before + 2)


def test_closed_segments_below_the_recovery_point_are_not_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Start-up reads the data of no closed segment after a clean close, and after a crash
    only of the segments rolled since the last fsync recorded at a roll."""
    _build(tmp_path, 40, 3)  # closed cleanly
    checked: list[str] = []
    original = Segment.recover

    def spy(self: Segment, **kwargs: Any) -> Any:
        if kwargs["verify_crc"]:
            checked.append(self.path.name)
        return original(self, **kwargs)

    monkeypatch.setattr(Segment, "recover", spy)
    names = [p.name for p in _segments(tmp_path)]
    log = open_log(tmp_path, segment_bytes=SEGMENT_BYTES_MIN, index_interval_bytes=600)
    assert checked == [names[-1]]  # the active segment only
    # flush=durable: each roll records the flushed offset, here the end of the sealed segment.
    for i in range(30):
        log.append(batch(2, ts=5000 + i, tag=100 + i), 30)
        log.flush()
    names = [p.name for p in _segments(tmp_path)]
    _crash(log)
    checked.clear()
    log = open_log(tmp_path, segment_bytes=SEGMENT_BYTES_MIN, index_interval_bytes=600)
    assert checked == [names[-1]]
    # flush=os: nothing is fsynced after the start, so every segment written since is checked.
    end_at_start = log.log_end_offset
    for i in range(30):
        log.append(batch(2, ts=9000 + i, tag=200 + i), 31)
    paths = _segments(tmp_path)
    since_start = [
        p.name
        for p, nxt in zip(paths, [*paths[1:], None], strict=True)
        if nxt is None or int(nxt.stem) > end_at_start
    ]
    assert len(since_start) >= 3
    _crash(log)
    checked.clear()
    log = open_log(tmp_path, segment_bytes=SEGMENT_BYTES_MIN, index_interval_bytes=600)
    assert checked == since_start
    log.close()
