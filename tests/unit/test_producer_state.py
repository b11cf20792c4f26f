"""The idempotent-producer state machine (node/producer_state.py) and the msg-id window
(node/msgid_window.py): pure, no I/O."""

from __future__ import annotations

import pytest

from tidelog.node.msgid_window import MessageIdWindow, digest
from tidelog.node.producer_state import (
    BATCHES_KEPT,
    SEQUENCE_MOD,
    BatchMeta,
    CorruptProducerSnapshot,
    LeaderView,
    Pending,
    ProducerState,
    Verdict,
)


def stored(
    state: ProducerState, pid: int, epoch: int, seq: int, count: int, offset: int, ts: int = 1000
) -> None:
    state.apply(
        producer_id=pid,
        epoch=epoch,
        base_sequence=seq,
        record_count=count,
        base_offset=offset,
        timestamp_ms=ts,
    )


def test_unknown_producer_starts_at_sequence_zero_only() -> None:
    state = ProducerState()
    assert state.check(7, 0, 0, 3).verdict is Verdict.ACCEPT
    assert state.check(7, 0, 5, 3).verdict is Verdict.UNKNOWN_PRODUCER


def test_next_sequence_is_accepted_and_a_gap_is_out_of_order() -> None:
    state = ProducerState()
    stored(state, 7, 0, 0, 3, offset=10)
    assert state.applied_offset == 13
    assert state.check(7, 0, 3, 2).verdict is Verdict.ACCEPT
    gap = state.check(7, 0, 4, 2)
    assert gap.verdict is Verdict.OUT_OF_ORDER and gap.expected_sequence == 3


def test_a_stored_batch_is_a_duplicate_with_its_original_offsets() -> None:
    state = ProducerState()
    stored(state, 7, 0, 0, 3, offset=10)
    stored(state, 7, 0, 3, 2, offset=20)
    dup = state.check(7, 0, 0, 3)
    assert dup.verdict is Verdict.DUPLICATE
    assert dup.original == BatchMeta(0, 2, 10, 12, 1000)
    assert state.check(7, 0, 3, 2).original == BatchMeta(3, 4, 20, 21, 1000)
    # Same first sequence, different range: not the same batch.
    assert state.check(7, 0, 0, 2).verdict is Verdict.OUT_OF_ORDER


def test_only_the_last_five_batches_are_remembered() -> None:
    state = ProducerState()
    for i in range(BATCHES_KEPT + 1):
        stored(state, 7, 0, i, 1, offset=100 + i)
    assert state.check(7, 0, 0, 1).verdict is Verdict.OUT_OF_ORDER
    for i in range(1, BATCHES_KEPT + 1):
        assert state.check(7, 0, i, 1).original == BatchMeta(i, i, 100 + i, 100 + i, 1000)


def test_stale_epoch_is_fenced_and_a_new_epoch_restarts_at_zero() -> None:
    state = ProducerState()
    stored(state, 7, 0, 0, 5, offset=0)
    assert state.check(7, 1, 3, 1).verdict is Verdict.OUT_OF_ORDER
    assert state.check(7, 1, 0, 1).verdict is Verdict.ACCEPT
    stored(state, 7, 1, 0, 1, offset=5)
    fenced = state.check(7, 0, 5, 1)
    assert fenced.verdict is Verdict.FENCED and fenced.current_epoch == 1
    # The old epoch's batches are gone with it.
    assert state.check(7, 0, 0, 5).verdict is Verdict.FENCED
    assert state.check(7, 1, 1, 1).verdict is Verdict.ACCEPT


def test_sequences_wrap_at_int32() -> None:
    state = ProducerState()
    stored(state, 7, 0, 0, 1, offset=0)
    stored(state, 7, 0, 1, SEQUENCE_MOD - 2, offset=1)
    stored(state, 7, 0, SEQUENCE_MOD - 1, 1, offset=SEQUENCE_MOD - 1)
    # After 2**31 - 1 comes 0 again.
    assert state.check(7, 0, 0, 4).verdict is Verdict.ACCEPT
    gap = state.check(7, 0, 1, 4)
    assert gap.verdict is Verdict.OUT_OF_ORDER and gap.expected_sequence == 0


def test_batches_without_a_producer_only_move_the_applied_offset() -> None:
    state = ProducerState()
    stored(state, -1, -1, -1, 4, offset=0)
    assert state.applied_offset == 4 and len(state) == 0


def test_replaying_an_applied_batch_changes_nothing() -> None:
    state = ProducerState()
    stored(state, 7, 0, 0, 3, offset=10)
    before = state.snapshot()
    stored(state, 7, 0, 0, 3, offset=10)
    assert state.snapshot() == before


def test_expiry_forgets_idle_producers() -> None:
    state = ProducerState()
    stored(state, 7, 0, 0, 1, offset=0, ts=1_000)
    stored(state, 8, 0, 0, 1, offset=1, ts=50_000)
    assert state.expire(now_ms=60_000, expiration_ms=30_000) == 1
    assert state.entry(7) is None and state.entry(8) is not None
    # Its next batch (sequence 1) is now from an unknown producer.
    assert state.check(7, 0, 1, 1).verdict is Verdict.UNKNOWN_PRODUCER


def test_a_producer_writing_old_timestamps_does_not_expire_while_it_writes() -> None:
    state = ProducerState()
    state.apply(
        producer_id=7,
        epoch=0,
        base_sequence=0,
        record_count=1,
        base_offset=0,
        timestamp_ms=1_000,  # a backfill of old records
        applied_at_ms=59_000,
    )
    assert state.expire(now_ms=60_000, expiration_ms=30_000) == 0
    restored = ProducerState.restore(state.snapshot())
    assert restored.expire(now_ms=60_000, expiration_ms=30_000) == 0
    assert restored.expire(now_ms=100_000, expiration_ms=30_000) == 1


def test_snapshot_restore_round_trip_and_replay_after_it() -> None:
    a = ProducerState()
    b = ProducerState()
    batches = [(7, 0, 0, 3, 0), (8, 2, 0, 1, 3), (7, 0, 3, 2, 4), (8, 2, 1, 1, 6)]
    for pid, epoch, seq, count, off in batches[:2]:
        stored(a, pid, epoch, seq, count, off)
    restored = ProducerState.restore(a.snapshot())
    assert restored == a and restored.applied_offset == 4
    # The log replayed from the start over the snapshot (earlier batches are skipped) ends
    # where a full replay ends.
    for pid, epoch, seq, count, off in batches:
        stored(restored, pid, epoch, seq, count, off)
        stored(b, pid, epoch, seq, count, off)
    assert restored == b
    assert restored.snapshot() == b.snapshot()


@pytest.mark.parametrize("damage", ["truncated", "flipped", "magic"])
def test_a_damaged_snapshot_is_refused(damage: str) -> None:
    state = ProducerState()
    stored(state, 7, 0, 0, 3, offset=10)
    data = state.snapshot()
    bad = {
        "truncated": data[:5],
        "flipped": data[:-1] + (b"x" if data[-1:] != b"x" else b"y"),
        "magic": b"XXXX" + data[4:],
    }[damage]
    with pytest.raises(CorruptProducerSnapshot):
        ProducerState.restore(bad)


def test_leader_view_sees_batches_in_flight() -> None:
    state = ProducerState()
    stored(state, 7, 0, 0, 2, offset=0)
    view = LeaderView(state)
    meta = BatchMeta(2, 3, 2, 3, 1000)
    view.proposed(7, Pending(raft_index=5, term=3, epoch=0, meta=meta))
    # The next batch follows the one in flight, and a retry of it is a duplicate to wait for.
    assert view.check(7, 0, 4, 1)[0].verdict is Verdict.ACCEPT
    assert view.check(7, 0, 2, 1)[0].verdict is Verdict.OUT_OF_ORDER
    dup, pending = view.check(7, 0, 2, 2)
    assert dup.verdict is Verdict.DUPLICATE and dup.original == meta
    assert pending is not None and (pending.raft_index, pending.term) == (5, 3)
    # The committed state alone does not know it yet.
    assert state.check(7, 0, 2, 2).verdict is Verdict.ACCEPT


def test_leader_view_forgets_truncated_and_committed_proposals() -> None:
    state = ProducerState()
    view = LeaderView(state)
    view.proposed(7, Pending(5, 3, 0, BatchMeta(0, 0, 0, 0, 1)))
    view.proposed(7, Pending(6, 3, 0, BatchMeta(1, 1, 1, 1, 1)))
    view.truncated(6)
    assert view.check(7, 0, 1, 1)[0].verdict is Verdict.ACCEPT
    assert view.pending_count == 1
    stored(state, 7, 0, 0, 1, offset=0)
    view.committed(5)
    assert view.pending_count == 0
    dup, pending = view.check(7, 0, 0, 1)
    assert dup.verdict is Verdict.DUPLICATE and pending is None


def test_msg_id_window_lookup_expiry_and_bound() -> None:
    w = MessageIdWindow(max_ids=3)
    for i in range(4):
        w.add(digest(b"id-%d" % i), offset=i, timestamp_ms=1000 * i)
    assert len(w) == 3
    assert w.lookup(digest(b"id-0"), now_ms=3000, window_ms=10_000) is None  # bound evicted it
    hit = w.lookup(digest(b"id-1"), now_ms=3000, window_ms=10_000)
    assert hit is not None and hit.offset == 1
    # Outside the window: not a duplicate any more, and pruned from the front.
    assert w.lookup(digest(b"id-1"), now_ms=20_000, window_ms=10_000) is None
    assert w.prune(now_ms=12_500, window_ms=10_000) == 2
    assert len(w) == 1
    # A second storing keeps the first offset.
    w.add(digest(b"id-3"), offset=99, timestamp_ms=5000)
    again = w.lookup(digest(b"id-3"), now_ms=5000, window_ms=10_000)
    assert again is not None and again.offset == 3
    assert MessageIdWindow.restore(w.snapshot(), max_ids=3) == w
