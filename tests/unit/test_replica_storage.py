"""The Raft storage over a real partition log: entries are the stored batches, EMPTY entries
become one-offset control batches, conflicts truncate, snapshots are metadata only, and hard
states go to RocksDB in one write batch."""

from __future__ import annotations

from pathlib import Path

import pytest

from tidelog.config import TopicConfig
from tidelog.errors import StorageError
from tidelog.node.identity import machine_restarted
from tidelog.node.log import PartitionLog
from tidelog.node.metastore import MetaStore
from tidelog.node.raft.errors import CompactedError, UnavailableError
from tidelog.node.raft.storage import NO_LIMIT_BYTES
from tidelog.node.raft.types import ConfState, Entry, EntryKind, HardState
from tidelog.node.replica_storage import (
    LOSS_UNKNOWN,
    NOOP_SIZE,
    HardStateStore,
    ReplicaStorage,
    decode_snapshot_data,
    entry_kind,
    noop_batch,
)
from tidelog.records import batch_end_offset, decode_batches, encode_batch, read_header, stamp

CONF = ConfState(voters=frozenset({1, 2, 3}))


def stamped(values: list[bytes], offset: int, term: int, index: int) -> bytes:
    buf = bytearray(encode_batch(values, timestamps_ms=5))
    stamp(buf, 0, offset, term, index)
    return bytes(buf)


def open_storage(path: Path, segment_bytes: int | None = None) -> ReplicaStorage:
    overrides = {} if segment_bytes is None else {"segment.bytes": str(segment_bytes)}
    lg = PartitionLog(path, TopicConfig.from_overrides(overrides))
    return ReplicaStorage(lg, HardState(), CONF)


def test_noop_batch_is_deterministic_invisible_and_one_offset() -> None:
    a, b = noop_batch(7, 3, 4), noop_batch(7, 3, 4)
    assert a == b and len(a) == NOOP_SIZE
    h = read_header(a)
    assert (h.base_offset, h.raft_term, h.raft_index, h.record_count) == (7, 3, 4, 1)
    assert h.is_control and entry_kind(a) == EntryKind.EMPTY
    assert decode_batches(a + stamped([b"x"], 8, 3, 5)) == decode_batches(stamped([b"x"], 8, 3, 5))
    assert entry_kind(stamped([b"x"], 0, 1, 1)) == EntryKind.NORMAL
    assert batch_end_offset(stamped([b"x", b"y", b"z"], 10, 1, 1)) == 13


def test_append_read_back_and_terms(tmp_path: Path) -> None:
    s = open_storage(tmp_path)
    assert (s.first_index(), s.last_index()) == (1, 0)
    entries = [
        Entry(1, 1, stamped([b"a", b"b"], 0, 1, 1)),
        Entry(2, 2, b"", EntryKind.EMPTY),  # a new leader's entry, as the core makes it
        Entry(2, 3, stamped([b"c"], 3, 2, 3)),
    ]
    assert s.append(entries) is None
    assert s.log.log_end_offset == 4 and s.last_index() == 3
    assert [s.term(i) for i in (0, 1, 2, 3)] == [0, 1, 2, 2]
    with pytest.raises(UnavailableError):
        s.term(4)
    got = s.entries(1, 4, NO_LIMIT_BYTES)
    assert [(e.term, e.index, e.kind) for e in got] == [
        (1, 1, EntryKind.NORMAL),
        (2, 2, EntryKind.EMPTY),
        (2, 3, EntryKind.NORMAL),
    ]
    assert got[1].data == noop_batch(2, 2, 2)
    cached_terms = [s.stored_term(i) for i in (0, 1, 2, 3, 4)]
    assert cached_terms == [0, 1, 2, 2, None]
    # Same answers from the log itself (cache emptied).
    s.trim_cache(10)
    again = s.entries(1, 4, NO_LIMIT_BYTES)
    assert again == got
    assert [s.stored_term(i) for i in (0, 1, 2, 3, 4)] == cached_terms
    assert len(s.entries(1, 4, 1)) == 1  # at least one entry, whatever the byte limit
    with pytest.raises(UnavailableError):
        s.entries(1, 5, NO_LIMIT_BYTES)


def test_conflicting_suffix_is_truncated(tmp_path: Path) -> None:
    s = open_storage(tmp_path)
    s.append([Entry(1, i, stamped([b"%d" % i], i - 1, 1, i)) for i in range(1, 5)])
    # A new leader of term 2 replaces entries 3 and 4 with one EMPTY and one batch.
    replacing = [Entry(2, 3, b"", EntryKind.EMPTY), Entry(2, 4, stamped([b"n", b"m"], 3, 2, 4))]
    assert s.append(replacing) == 3
    assert [s.term(i) for i in (1, 2, 3, 4)] == [1, 1, 2, 2]
    assert [s.stored_term(i) for i in (1, 2, 3, 4)] == [1, 1, 2, 2]  # the cache followed
    assert s.log.log_end_offset == 5
    lg = s.log
    assert isinstance(lg, PartitionLog)
    assert [r.value for r in decode_batches(lg.read(0, 1 << 20))] == [b"1", b"2", b"n", b"m"]
    with pytest.raises(StorageError, match="do not continue"):
        s.append([Entry(2, 9, stamped([b"gap"], 5, 2, 9))])


def test_identical_entries_are_kept_and_only_the_first_conflict_truncates(
    tmp_path: Path,
) -> None:
    """A Ready may repeat entries the log already holds (the core's unstable log was
    replaced from an earlier index by an APPEND whose first entries match): those stay on
    disk untouched, and a conflict truncates from the first entry whose term differs."""
    s = open_storage(tmp_path)
    lg = s.log
    assert isinstance(lg, PartitionLog)
    s.append([Entry(1, i, stamped([b"%d" % i], i - 1, 1, i)) for i in range(1, 6)])
    lg.flush()
    before = lg.read(0, 1 << 20)
    # Entries 3..5 again (same terms), then a new entry 6: nothing is truncated.
    again = [Entry(1, i, stamped([b"%d" % i], i - 1, 1, i)) for i in range(3, 7)]
    assert s.append(again) is None
    assert s.last_index() == 6 and lg.read(0, 1 << 20)[: len(before)] == before
    # Only repeats: no write at all.
    assert s.append(again[:2]) is None and s.last_index() == 6
    # 3 matches, 4 differs: the log is cut at 4, not at 3.
    replacing = [
        Entry(1, 3, stamped([b"3"], 2, 1, 3)),
        Entry(2, 4, stamped([b"x"], 3, 2, 4)),
        Entry(2, 5, stamped([b"y"], 4, 2, 5)),
    ]
    assert s.append(replacing) == 4
    assert [s.term(i) for i in range(1, 6)] == [1, 1, 1, 2, 2] and s.last_index() == 5
    assert [r.value for r in decode_batches(lg.read(0, 1 << 20))] == [
        b"1",
        b"2",
        b"3",
        b"x",
        b"y",
    ]


def test_snapshot_is_the_log_start_and_installs_as_a_reset(tmp_path: Path) -> None:
    leader = open_storage(tmp_path / "leader", segment_bytes=4096)
    offset = 0
    for i in range(1, 101):
        leader.append([Entry(1, i, stamped([b"x" * 200], offset, 1, i))])
        offset += 1
    lg = leader.log
    assert isinstance(lg, PartitionLog)
    assert lg.truncate_prefix(60) > 0
    first = leader.first_index()
    assert first > 1
    with pytest.raises(CompactedError):
        leader.entries(1, 5, NO_LIMIT_BYTES)
    snap = leader.snapshot()
    assert (snap.meta.index, snap.meta.term, snap.meta.conf) == (first - 1, 1, CONF)
    assert decode_snapshot_data(snap.data) == lg.log_start_offset

    follower = open_storage(tmp_path / "follower")
    follower.append([Entry(1, 1, stamped([b"old"], 0, 1, 1))])
    follower.install_snapshot(snap)
    assert follower.first_index() == first and follower.last_index() == first - 1
    assert follower.term(first - 1) == 1
    assert follower.log.log_start_offset == lg.log_start_offset
    follower.append(leader.entries(first, first + 3, NO_LIMIT_BYTES))
    assert follower.last_index() == first + 2
    with pytest.raises(StorageError):
        decode_snapshot_data(b"nonsense")


def test_commit_beyond_a_lost_tail_is_clamped(tmp_path: Path) -> None:
    lg = PartitionLog(tmp_path, TopicConfig.from_overrides({}))
    s = ReplicaStorage(lg, HardState(term=3, vote=1, commit=9), CONF)
    assert s.hard_state() == HardState(term=3, vote=1, commit=0)


def test_unknown_loss_mark_keeps_the_commit_and_recovers_past_the_log(tmp_path: Path) -> None:
    # flush=os after a machine restart (the driver stores the mark): the commit index is
    # still the stored one, and the replica recovers up to one past its last entry.
    lg = PartitionLog(tmp_path, TopicConfig.from_overrides({}))
    lg.append_stamped(b"".join(stamped([b"x"], i - 1, 1, i) for i in (1, 2, 3)))
    s = ReplicaStorage(lg, HardState(term=1, vote=2, commit=LOSS_UNKNOWN + 2), CONF)
    assert s.hard_state() == HardState(term=1, vote=2, commit=2)
    assert s.loss_unknown and s.lost_to == 4
    plain = ReplicaStorage(lg, HardState(term=1, vote=2, commit=2), CONF)
    assert not plain.loss_unknown and plain.lost_to == 0
    plain.mark_loss_unknown()
    assert plain.loss_unknown and plain.lost_to == 4


def test_machine_restart_is_a_new_boot_id(tmp_path: Path) -> None:
    store = MetaStore(tmp_path / "meta")
    assert machine_restarted(store, "node", "boot-a")  # none stored: assumed
    assert not machine_restarted(store, "node", "boot-a")  # a process restart
    assert machine_restarted(store, "node", "boot-b")
    assert not machine_restarted(store, "node", "boot-b")
    assert machine_restarted(store, "node", None)  # the system does not tell
    store.close()


def test_hard_states_in_one_batch_survive_reopen(tmp_path: Path) -> None:
    store = MetaStore(tmp_path / "meta")
    hs = HardStateStore(store)
    assert hs.load(5) == HardState()
    hs.save({5: HardState(2, 1, 10), 6: HardState(1, 0, 0), 2**60: HardState(9, 3, 1)}, sync=True)
    store.close()
    store = MetaStore(tmp_path / "meta")
    hs = HardStateStore(store)
    assert hs.load(5) == HardState(2, 1, 10) and hs.load(2**60) == HardState(9, 3, 1)
    hs.delete(5)
    assert hs.load(5) == HardState()
    store.close()


def test_cache_is_bounded_and_trimmed(tmp_path: Path) -> None:
    lg = PartitionLog(tmp_path, TopicConfig.from_overrides({}))
    s = ReplicaStorage(lg, HardState(), CONF, cache_bytes_max=3000)
    for i in range(1, 21):
        s.append([Entry(1, i, stamped([b"x" * 500], i - 1, 1, i))])
    assert s._cache_bytes <= 3000 and len(s._cache) >= 1
    assert s._cache[-1].index == 20
    s.trim_cache(19)
    assert [e.index for e in s._cache] == [19, 20]
    # Reads below the cache come from the log, the same entries either way.
    assert [e.index for e in s.entries(1, 21, NO_LIMIT_BYTES)] == list(range(1, 21))
    assert s.entries(19, 21, NO_LIMIT_BYTES)[0] is s._cache[0]
