"""Progress states, the in-flight window and the tracker's quorum questions."""

from __future__ import annotations

import pytest

from tidelog.node.raft.progress import Inflights, Progress, ProgressState, ProgressTracker
from tidelog.node.raft.types import ConfState


def test_inflights_bounded_by_count() -> None:
    inf = Inflights(max_count=3, max_bytes=1_000_000)
    for i in (1, 2, 3):
        assert not inf.full()
        inf.add(i, 10)
    assert inf.full()
    inf.free_le(1)
    assert not inf.full() and inf.count == 2 and inf.bytes == 20


def test_inflights_bounded_by_bytes() -> None:
    inf = Inflights(max_count=100, max_bytes=100)
    inf.add(5, 60)
    assert not inf.full()
    inf.add(9, 60)  # may overshoot once: the window is checked before sending
    assert inf.full() and inf.bytes == 120
    inf.free_le(5)
    assert not inf.full() and inf.bytes == 60
    inf.free_first_one()
    assert inf.count == 0 and inf.bytes == 0


def test_inflights_rejects_out_of_order_and_add_when_full() -> None:
    inf = Inflights(max_count=2, max_bytes=100)
    inf.add(5, 1)
    with pytest.raises(AssertionError):
        inf.add(5, 1)
    inf.add(6, 1)
    with pytest.raises(AssertionError):
        inf.add(7, 1)


def make(state: ProgressState, match: int, next_index: int) -> Progress:
    pr = Progress(next_index, max_inflight_msgs=4, max_inflight_bytes=1 << 20, is_learner=False)
    pr.match = match
    pr.state = state
    return pr


@pytest.mark.parametrize(
    ("state", "match", "next_index", "rejected", "hint", "ok", "expected_next"),
    [
        # Replicate: a rejection at or below match is stale; otherwise fall back to match+1.
        (ProgressState.REPLICATE, 5, 10, 5, 5, False, 10),
        (ProgressState.REPLICATE, 5, 10, 4, 4, False, 10),
        (ProgressState.REPLICATE, 5, 10, 9, 9, True, 6),
        # Probe: only the answer to the last probe counts.
        (ProgressState.PROBE, 0, 10, 5, 5, False, 10),
        (ProgressState.PROBE, 0, 10, 9, 9, True, 9),
        # The hint jumps back further than one entry...
        (ProgressState.PROBE, 0, 10, 9, 3, True, 4),
        # ...but never below match + 1.
        (ProgressState.PROBE, 5, 10, 9, 2, True, 6),
        # A hint beyond the rejected index does not move next forward.
        (ProgressState.PROBE, 0, 10, 9, 12, True, 9),
    ],
)
def test_maybe_decr_to(
    state: ProgressState,
    match: int,
    next_index: int,
    rejected: int,
    hint: int,
    ok: bool,
    expected_next: int,
) -> None:
    pr = make(state, match, next_index)
    assert pr.maybe_decr_to(rejected, hint) is ok
    assert pr.next == expected_next


def test_probe_pauses_after_one_message_and_update_resumes() -> None:
    pr = make(ProgressState.PROBE, 0, 5)
    assert not pr.is_paused()
    pr.sent_entries(7, 100, 3)
    assert pr.is_paused() and pr.next == 5  # probes do not advance next optimistically
    assert pr.maybe_update(7)
    assert not pr.is_paused() and pr.match == 7 and pr.next == 8
    assert not pr.maybe_update(6)  # old news


def test_replicate_advances_optimistically_until_window_full() -> None:
    pr = make(ProgressState.REPLICATE, 4, 5)
    for last in (6, 8, 10, 12):
        assert not pr.is_paused()
        pr.sent_entries(last, 10, 2)
        assert pr.next == last + 1
    assert pr.is_paused()  # 4 messages in flight
    pr.maybe_update(8)
    pr.inflights.free_le(8)
    assert not pr.is_paused() and pr.inflights.count == 2


def test_snapshot_state_pauses_and_resumes_after_it() -> None:
    pr = make(ProgressState.REPLICATE, 2, 3)
    pr.become_snapshot(50)
    assert pr.is_paused() and pr.pending_snapshot == 50
    pr.maybe_update(50)
    pr.become_probe()
    assert pr.state == ProgressState.PROBE and pr.next == 51


def test_tracker_ignores_learners_for_commit_and_quorum_activity() -> None:
    conf = ConfState(voters=frozenset({1, 2, 3}), learners=frozenset({4, 5}))
    t = ProgressTracker(conf, 8, 1 << 20)
    assert set(t.progress) == {1, 2, 3, 4, 5}
    t.progress[1].match = 10
    t.progress[4].match = 10
    t.progress[5].match = 10
    assert t.committed() == 0
    t.progress[2].match = 7
    assert t.committed() == 7
    t.progress[4].recent_active = t.progress[5].recent_active = True
    assert not t.quorum_active(self_id=1)
    t.progress[3].recent_active = True
    assert t.quorum_active(self_id=1)


def test_tracker_singleton() -> None:
    assert ProgressTracker(ConfState(voters=frozenset({1})), 8, 1 << 20).is_singleton()
    two = ConfState(voters=frozenset({1}), learners=frozenset({2}))
    assert ProgressTracker(two, 8, 1 << 20).is_singleton()
    assert not ProgressTracker(ConfState(voters=frozenset({1, 2})), 8, 1 << 20).is_singleton()
