"""MemoryStorage: the log boundaries, conflicting-suffix truncation, compaction and snapshots."""

from __future__ import annotations

import pytest

from tidelog.node.raft.errors import (
    CompactedError,
    SnapshotOutOfDate,
    SnapshotTemporarilyUnavailable,
    UnavailableError,
)
from tidelog.node.raft.storage import NO_LIMIT_BYTES, MemoryStorage
from tidelog.node.raft.types import (
    ENTRY_OVERHEAD_BYTES,
    ConfState,
    Entry,
    HardState,
    Snapshot,
    SnapshotMeta,
)


def ents(*terms: int, start: int = 1) -> list[Entry]:
    return [Entry(term=t, index=start + i, data=b"x") for i, t in enumerate(terms)]


def test_empty_log_boundaries() -> None:
    s = MemoryStorage(ConfState(voters=frozenset({1, 2, 3})))
    assert (s.first_index(), s.last_index(), s.term(0)) == (1, 0, 0)
    assert s.entries(1, 1, NO_LIMIT_BYTES) == []
    assert s.conf_state().voters == {1, 2, 3}
    with pytest.raises(UnavailableError):
        s.term(1)


def test_append_replaces_conflicting_suffix() -> None:
    s = MemoryStorage()
    s.append(ents(1, 1, 2, 2))
    s.append(ents(3, 3, start=3))
    assert [e.term for e in s.entries(1, 5, NO_LIMIT_BYTES)] == [1, 1, 3, 3]
    assert s.last_index() == 4
    s.append(ents(3, 3, 3, start=4))
    assert s.last_index() == 6
    with pytest.raises(AssertionError):
        s.append(ents(4, start=9))  # a gap


@pytest.mark.parametrize(
    ("max_bytes", "expected"),
    [
        (0, 1),  # always at least one entry
        (ENTRY_OVERHEAD_BYTES + 1, 1),
        (2 * (ENTRY_OVERHEAD_BYTES + 1), 2),
        (NO_LIMIT_BYTES, 4),
    ],
)
def test_entries_respects_max_bytes(max_bytes: int, expected: int) -> None:
    s = MemoryStorage()
    s.append(ents(1, 1, 1, 1))
    assert len(s.entries(1, 5, max_bytes)) == expected


def test_truncate_suffix_and_compact() -> None:
    s = MemoryStorage()
    s.append(ents(1, 1, 2, 2, 3))
    s.truncate_suffix(5)
    assert s.last_index() == 4
    s.compact(2)
    assert (s.first_index(), s.last_index(), s.term(2)) == (3, 4, 1)
    with pytest.raises(CompactedError):
        s.term(1)
    with pytest.raises(CompactedError):
        s.entries(2, 4, NO_LIMIT_BYTES)
    # Appending entries that straddle the compaction point keeps only the new part.
    s.append(ents(1, 1, 2, 5, start=1))
    assert [e.term for e in s.entries(3, 5, NO_LIMIT_BYTES)] == [2, 5]


def test_snapshot_create_and_apply() -> None:
    s = MemoryStorage(ConfState(voters=frozenset({1, 2, 3})))
    s.append(ents(1, 1, 2))
    s.compact(2)
    with pytest.raises(SnapshotTemporarilyUnavailable):
        s.snapshot()
    snap = s.create_snapshot(3, b"image")
    assert snap.meta == SnapshotMeta(index=3, term=2, conf=s.conf_state())
    assert s.snapshot() is snap
    with pytest.raises(SnapshotOutOfDate):
        s.create_snapshot(3, b"again")

    follower = MemoryStorage()
    follower.set_hard_state(HardState(term=2, vote=1, commit=0))
    follower.append(ents(1, 9, 9, 9))
    follower.apply_snapshot(snap)
    assert (follower.first_index(), follower.last_index(), follower.term(3)) == (4, 3, 2)
    assert follower.conf_state().voters == {1, 2, 3}
    with pytest.raises(SnapshotOutOfDate):
        follower.apply_snapshot(Snapshot(meta=SnapshotMeta(index=2, term=1)))
