"""Partition log as a Raft log: index lookups, suffix truncation, stamped appends."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.unit.log_support import (
    SEGMENT_BYTES_MIN,
    batch,
    fill,
    headers,
    offsets_of,
    open_log,
    read_all,
)
from tidelog.errors import CorruptBatch
from tidelog.node.log import ContinuityError, PartitionLog
from tidelog.records import iter_headers, stamp, validate_batch


def _terms_log(directory: Path, count: int = 60) -> PartitionLog:
    """Batch i (raft index i+1) has i % 3 + 1 records and term 1 + i // 10."""
    log = open_log(directory, segment_bytes=SEGMENT_BYTES_MIN, index_interval_bytes=500)
    for i in range(count):
        log.append(batch(i % 3 + 1, tag=i), 1 + i // 10)
    return log


def test_term_and_end_offset_by_index(tmp_path: Path) -> None:
    log = _terms_log(tmp_path)
    assert log.segment_count > 3
    stored = headers(log)
    assert [idx for _b, idx, _t in stored] == list(range(1, 61))
    assert log.term_at_index(0) == 0
    for i in range(1, 61):
        assert log.term_at_index(i) == 1 + (i - 1) // 10
    assert log.term_at_index(61) is None
    ends = [b for b, _i, _t in stored[1:]] + [log.log_end_offset]
    for i, end in enumerate(ends, start=1):
        assert log.end_offset_at_index(i) == end
    assert log.end_offset_at_index(0) == 0
    assert log.end_offset_at_index(61) is None
    log.close()
    log = open_log(tmp_path, segment_bytes=SEGMENT_BYTES_MIN, index_interval_bytes=500)
    assert [log.term_at_index(i) for i in (1, 11, 33, 60)] == [1, 2, 4, 6]
    log.close()


def test_entries_by_index(tmp_path: Path) -> None:
    log = _terms_log(tmp_path)
    everything = log.entries_by_index(1, 61, 1 << 40)
    assert len(everything) == 60
    for i, data in enumerate(everything, start=1):
        h = validate_batch(data, 0)
        assert h.size == len(data) and h.raft_index == i
    sizes = [len(e) for e in everything]
    # Stops before max_bytes would be exceeded, across segment boundaries.
    for lo in (1, 7, 20, 45):
        for budget in (
            1,
            sizes[lo - 1],
            sum(sizes[lo - 1 : lo + 4]),
            sum(sizes[lo - 1 : lo + 4]) - 1,
        ):
            got = log.entries_by_index(lo, 61, budget)
            n = 0
            while lo - 1 + n < 60 and sum(sizes[lo - 1 : lo + n]) <= budget:
                n += 1
            assert got == everything[lo - 1 : lo - 1 + max(n, 1)], (lo, budget)
    assert log.entries_by_index(5, 5, 1 << 20) == []
    assert log.entries_by_index(58, 1000, 1 << 20) == everything[57:]
    log.truncate_prefix(log.segment_base_offsets[1])
    with pytest.raises(ValueError, match="no longer in the log"):
        log.entries_by_index(1, 3, 1 << 20)
    log.close()


def test_truncate_suffix(tmp_path: Path) -> None:
    log = _terms_log(tmp_path)
    stored = headers(log)
    bases = log.segment_base_offsets
    # Inside a batch: refused with the nearest boundaries.
    b0, _i, _t = stored[40]
    b1 = stored[41][0]
    if b1 - b0 > 1:
        with pytest.raises(ValueError, match="inside the batch"):
            log.truncate_suffix(b0 + 1)
    with pytest.raises(ValueError, match="holds"):
        log.truncate_suffix(log.log_end_offset + 1)
    log.truncate_suffix(log.log_end_offset)  # no-op
    assert log.last_index == 60

    # In the active segment.
    cut = stored[57][0]
    log.truncate_suffix(cut)
    assert (log.log_end_offset, log.last_index, log.last_term) == (cut, 57, 6)
    # In a closed segment: later segments go, appends continue in a new term.
    k = next(i for i, (b, _, _) in enumerate(stored) if bases[1] < b < bases[2])
    log.truncate_suffix(stored[k][0])
    assert log.segment_base_offsets == bases[:2]
    assert (log.last_index, log.last_term) == (k, stored[k - 1][2])
    assert log.flushed_offset <= stored[k][0]
    assert log.append(batch(2, tag=900), 9) == (stored[k][0], stored[k][0] + 1)
    assert headers(log)[-1] == (stored[k][0], k + 1, 9)
    # At the base of a segment: it disappears and the one before becomes active.
    log.truncate_suffix(bases[1])
    assert log.segment_base_offsets == bases[:1]
    j = next(i for i, (b, _, _) in enumerate(stored) if b == bases[1])
    assert (log.last_index, log.last_term) == (j, stored[j - 1][2])
    assert read_all(log) == list(range(bases[1]))
    fill(log, 40, term=10)
    assert log.segment_count > 1
    log.close()
    log = open_log(tmp_path, segment_bytes=SEGMENT_BYTES_MIN, index_interval_bytes=500)
    assert [h[1] for h in headers(log)] == list(range(1, j + 41))
    assert read_all(log) == list(range(log.log_end_offset))
    # At the log start: the log is empty but keeps its place.
    log.truncate_suffix(0)
    assert (log.log_end_offset, log.first_index, log.last_index, log.last_term) == (0, 1, 0, 0)
    assert log.append(batch(1), 11) == (0, 0)
    log.close()


def test_truncate_suffix_keeps_timestamps_and_indexes_right(tmp_path: Path) -> None:
    log = open_log(tmp_path, index_interval_bytes=700)
    ranges = fill(log, 40, ts0=5000)
    cut = ranges[23][0]
    log.truncate_suffix(cut)
    assert log.offset_for_timestamp(5000 + 22) == (ranges[22][0], 5022)
    assert log.offset_for_timestamp(5000 + 23) is None
    ranges2 = fill(log, 5, ts0=9000)
    assert log.offset_for_timestamp(5023) == (ranges2[0][0], 9000)
    for base, _last in ranges[:23] + ranges2:
        assert offsets_of(log.read(base, 1))[0] == base
    log.close()


def _all_bytes(log: PartitionLog) -> bytes:
    """The stored batches end to end (a read returns one segment at most)."""
    out = []
    offset = log.log_start_offset
    while offset < log.log_end_offset:
        data = log.read(offset, 1 << 20)
        out.append(data)
        offset = list(iter_headers(data))[-1][1].last_offset + 1
    return b"".join(out)


def _replicate(leader: PartitionLog, follower: PartitionLog, max_bytes: int = 2000) -> None:
    while follower.last_index < leader.last_index:
        entries = leader.entries_by_index(follower.last_index + 1, leader.last_index + 1, max_bytes)
        follower.append_stamped(b"".join(entries))


def test_append_stamped_replicates_byte_for_byte(tmp_path: Path) -> None:
    leader = _terms_log(tmp_path / "leader")
    follower = open_log(tmp_path / "follower", segment_bytes=SEGMENT_BYTES_MIN)
    _replicate(leader, follower)
    assert headers(follower) == headers(leader)
    assert _all_bytes(follower) == _all_bytes(leader)
    assert follower.log_end_offset == leader.log_end_offset
    leader.close()
    follower.close()


def test_append_stamped_continuity_errors(tmp_path: Path) -> None:
    leader = _terms_log(tmp_path / "leader", 10)
    follower = open_log(tmp_path / "follower")
    entries = leader.entries_by_index(1, 11, 1 << 20)
    follower.append_stamped(b"".join(entries[:5]))
    assert follower.last_index == 5

    def restamped(data: bytes, base: int, term: int, index: int) -> bytes:
        buf = bytearray(data)
        stamp(buf, 0, base, term, index)
        return bytes(buf)

    h = next(iter_headers(entries[5]))[1]
    cases = {
        "base_offset": restamped(entries[5], h.base_offset + 1, h.raft_term, h.raft_index),
        "raft_index": restamped(entries[5], h.base_offset, h.raft_term, h.raft_index + 1),
        "raft_term": restamped(entries[5], h.base_offset, 0, h.raft_index),
    }
    for field, data in cases.items():
        with pytest.raises(ContinuityError, match=field):
            follower.append_stamped(data)
        # A bad batch after a good one: nothing of the call is written.
        with pytest.raises(ContinuityError):
            follower.append_stamped(entries[5] + restamped(entries[6], 0, 1, 7))
        assert follower.last_index == 5
    corrupt = bytearray(entries[5])
    corrupt[-1] ^= 1
    with pytest.raises(CorruptBatch, match="CRC"):
        follower.append_stamped(bytes(corrupt))
    assert (follower.last_index, follower.log_end_offset) == (5, h.base_offset)
    follower.append_stamped(b"".join(entries[5:]))
    assert headers(follower) == headers(leader)
    # The leader refuses to go back in term.
    with pytest.raises(ContinuityError, match="term"):
        leader.append(batch(1), leader.last_term - 1)
    leader.close()
    follower.close()


def test_conflict_truncation_then_catch_up(tmp_path: Path) -> None:
    """A follower with a divergent suffix from an old term truncates and catches up."""
    leader = open_log(tmp_path / "leader", segment_bytes=SEGMENT_BYTES_MIN)
    follower = open_log(tmp_path / "follower", segment_bytes=SEGMENT_BYTES_MIN)
    fill(leader, 20, term=1)
    _replicate(leader, follower)
    fill(follower, 5, term=2, records=1)  # entries the old leader never committed
    fill(leader, 15, term=3, records=3)
    # Find the last index where both agree, as Raft does, and cut there.
    match = max(
        i
        for i in range(follower.last_index + 1)
        if follower.term_at_index(i) == leader.term_at_index(i)
    )
    assert match == 20
    follower.truncate_suffix(follower.end_offset_at_index(match) or 0)
    _replicate(leader, follower)
    assert headers(follower) == headers(leader)
    leader.close()
    follower.close()
