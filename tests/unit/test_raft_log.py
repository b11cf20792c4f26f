"""RaftLog: the durable log in storage merged with the unstable tail."""

from __future__ import annotations

import pytest

from tidelog.node.raft.errors import CompactedError
from tidelog.node.raft.raft_log import RaftLog
from tidelog.node.raft.storage import MemoryStorage
from tidelog.node.raft.types import ENTRY_OVERHEAD_BYTES, Entry, HardState, Snapshot, SnapshotMeta


def ents(*terms: int, start: int = 1) -> list[Entry]:
    return [Entry(t, start + i, b"x") for i, t in enumerate(terms)]


def log_with(stable: list[int], unstable: list[int]) -> RaftLog:
    s = MemoryStorage()
    s.append(ents(*stable))
    log = RaftLog(s)
    if unstable:
        log.append(ents(*unstable, start=len(stable) + 1))
    return log


def test_boundaries_span_storage_and_unstable() -> None:
    log = log_with([1, 1, 2], [2, 3])
    assert (log.first_index(), log.last_index(), log.last_term()) == (1, 5, 3)
    assert [log.term(i) for i in range(0, 6)] == [0, 1, 1, 2, 2, 3]
    assert log.term_or_none(6) is None


@pytest.mark.parametrize(
    ("max_bytes", "expected_len"),
    [(0, 1), (ENTRY_OVERHEAD_BYTES + 1, 1), (3 * (ENTRY_OVERHEAD_BYTES + 1), 3), (1 << 30, 5)],
)
def test_slice_across_stable_and_unstable_respects_bytes(max_bytes: int, expected_len: int) -> None:
    log = log_with([1, 1, 2], [2, 3])
    got = log.entries(1, max_bytes)
    assert [e.index for e in got] == list(range(1, expected_len + 1))


def test_maybe_append_truncates_conflicting_suffix_only() -> None:
    log = log_with([1, 1, 2, 2, 2], [])
    # Leader's entries after (2, term 1): index 3 matches, index 4 conflicts (term 3).
    last = log.maybe_append(2, 1, 0, tuple([Entry(2, 3), Entry(3, 4)]))
    assert last == 4
    assert [log.term(i) for i in range(1, log.last_index() + 1)] == [1, 1, 2, 3]
    # Entry 5 (term 2) is gone from the merged view; storage still has it until persisted.
    assert log.last_index() == 4


def test_maybe_append_mismatch_and_stale_duplicate() -> None:
    log = log_with([1, 1, 2], [])
    assert log.maybe_append(3, 1, 0, ()) is None  # we have term 2 at 3
    # A duplicate of what we already have changes nothing (no truncation).
    assert log.maybe_append(1, 1, 0, tuple(ents(1, 2, start=2))) == 3
    assert log.unstable.entries == []


def test_maybe_append_commits_only_what_the_message_proves() -> None:
    log = log_with([1, 1, 1, 1], [])
    # Leader says commit 4 but only proves matching up to 2 with this message.
    assert log.maybe_append(1, 1, 4, (Entry(1, 2),)) == 2
    assert log.committed == 2


def test_conflict_with_committed_entry_is_refused() -> None:
    log = log_with([1, 1, 1], [])
    log.commit_to(3)
    with pytest.raises(AssertionError):
        log.maybe_append(1, 1, 3, (Entry(2, 2),))


@pytest.mark.parametrize(
    ("terms", "index", "term", "expected"),
    [
        ([1, 1, 2, 2, 3, 3], 6, 3, (6, 3)),
        ([1, 1, 2, 2, 3, 3], 6, 2, (4, 2)),  # skips all of term 3 at once
        ([1, 1, 2, 2, 3, 3], 6, 1, (2, 1)),
        ([1, 1, 2, 2, 3, 3], 6, 0, (0, 0)),
        ([1, 1, 4, 4, 4], 5, 3, (2, 1)),  # no term 3 here: the last entry older than it
        ([1, 1, 2], 9, 5, (9, 0)),  # beyond the log: nothing known
    ],
)
def test_find_conflict_by_term(
    terms: list[int], index: int, term: int, expected: tuple[int, int]
) -> None:
    assert log_with(terms, []).find_conflict_by_term(index, term) == expected


def test_maybe_commit_only_current_term() -> None:
    log = log_with([1, 1, 2], [])
    assert not log.maybe_commit(3, 3)  # entry 3 is from term 2, we lead term 3
    assert log.committed == 0
    log.append([Entry(3, 4)])
    assert log.maybe_commit(4, 3)
    assert log.committed == 4  # commits 1..3 indirectly


def test_stable_to_ignores_replaced_entries() -> None:
    log = log_with([1], [1, 1])
    taken = list(log.unstable.entries)
    # Before the driver persists, a new leader overwrites index 3.
    log.append([Entry(2, 3)])
    log.stable_to(taken[-1].index, taken[-1].term)
    assert [e.index for e in log.unstable.entries] == [2, 3]
    log.stable_to(3, 2)
    assert log.unstable.entries == [] and log.unstable.offset == 4


def test_next_committed_and_applied() -> None:
    log = log_with([1, 1, 1, 1], [])
    log.commit_to(3)
    assert log.has_next_committed()
    assert [e.index for e in log.next_committed(1 << 20)] == [1, 2, 3]
    log.applied_to(3)
    assert not log.has_next_committed()
    with pytest.raises(AssertionError):
        log.applied_to(4)


def test_restore_snapshot_and_restart_from_compacted_storage() -> None:
    log = log_with([1, 1], [])
    snap = Snapshot(SnapshotMeta(index=10, term=4), b"img")
    log.restore(snap)
    assert (log.first_index(), log.last_index(), log.last_term(), log.committed) == (11, 10, 4, 10)
    with pytest.raises(CompactedError):
        log.term(9)
    assert log.next_committed(1 << 20) == []

    s = MemoryStorage()
    s.append(ents(1, 1, 1, 2, 2))
    s.set_hard_state(HardState(term=2, vote=1, commit=4))
    s.create_snapshot(3, b"img")
    s.compact(3)
    restarted = RaftLog(s, applied=0)
    assert restarted.applied == 3  # nothing below the compaction point is re-delivered
    assert [e.index for e in restarted.next_committed(1 << 20)] == [4]


def test_restart_with_applied_ahead_of_unsynced_commit() -> None:
    s = MemoryStorage()
    s.append(ents(1, 1, 1, 1))
    s.set_hard_state(HardState(term=1, vote=1, commit=2))  # the commit of 4 was not synced
    log = RaftLog(s, applied=4)
    assert (log.committed, log.applied) == (4, 4)
    with pytest.raises(AssertionError, match="lost synced entries"):
        RaftLog(s, applied=5)
    s.set_hard_state(HardState(term=1, vote=1, commit=9))
    with pytest.raises(AssertionError, match="lost synced entries"):
        RaftLog(s)
