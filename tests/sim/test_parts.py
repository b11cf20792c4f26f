"""The simulator's own parts, tested alone: a checker that misses a violation, or a disk that
keeps what a crash should lose, would make every seed pass for the wrong reason."""

from __future__ import annotations

import random

import pytest

from tidelog.node.raft.types import ConfState, Entry, HardState, Role

from .checkers import Ack, Checker, InvariantViolation, LogShadow
from .disk import SimDisk
from .sim import Simulation, decode_state, encode_state


def _e(index: int, term: int, data: bytes = b"") -> Entry:
    return Entry(term=term, index=index, data=data)


def test_log_matching_catches_same_index_and_term_with_a_different_prefix() -> None:
    c = Checker()
    a, b = LogShadow(), LogShadow()
    c.on_append(1, a, (_e(1, 1, b"x"), _e(2, 1, b"y")))
    c.on_append(2, b, (_e(1, 1, b"x"),))
    c.on_append(2, b, (_e(2, 1, b"y"),))  # same entries in two writes: fine
    other = LogShadow()
    c.on_append(3, other, (_e(1, 2, b"z"),))
    with pytest.raises(InvariantViolation) as err:
        c.on_append(3, other, (_e(2, 1, b"y"),))  # (2, 1) after a different prefix
    assert err.value.invariant == "log-matching"


def test_overwriting_a_committed_entry_is_caught() -> None:
    c = Checker()
    log = LogShadow()
    c.on_append(1, log, (_e(1, 1), _e(2, 1)))
    c.on_commit(1, log, 2, term=1)
    c.on_append(1, log, (_e(3, 2),))  # beyond the commit: fine
    with pytest.raises(InvariantViolation) as err:
        c.on_append(1, log, (_e(2, 3),))
    assert err.value.invariant == "state-machine-safety"


def test_two_nodes_committing_different_entries_is_caught() -> None:
    c = Checker()
    a, b = LogShadow(), LogShadow()
    c.on_append(1, a, (_e(1, 1, b"a"),))
    c.on_append(2, b, (_e(1, 2, b"b"),))
    c.on_commit(1, a, 1, term=1)
    with pytest.raises(InvariantViolation, match="differs"):
        c.on_commit(2, b, 1, term=2)


def test_two_leaders_in_one_term_and_campaigning_learners_are_caught() -> None:
    c = Checker()
    c.on_role(1, Role.LEADER, 3, learner=False)
    c.on_role(1, Role.LEADER, 3, learner=False)
    with pytest.raises(InvariantViolation, match="two leaders in term 3"):
        c.on_role(2, Role.LEADER, 3, learner=False)
    with pytest.raises(InvariantViolation, match="learner"):
        c.on_role(4, Role.CANDIDATE, 5, learner=True)


def test_leader_completeness_is_by_commit_term() -> None:
    c = Checker()
    log = LogShadow()
    c.on_append(1, log, (_e(1, 1, b"p"),))
    c.on_commit(1, log, 1, term=1)
    c.on_ack(Ack(index=1, term=1, chain=log.hashes[0], payload=b"p", time=0))
    lacking: dict[int, int] = {0: 0}
    # A leader of the term the entry was committed in, or earlier, may lack it...
    c.on_new_leader(2, 1, lacking.get, 0)
    # ...a leader of a later term may not.
    with pytest.raises(InvariantViolation) as err:
        c.on_new_leader(2, 2, lacking.get, 0)
    assert err.value.invariant == "leader-completeness"
    c.on_new_leader(3, 2, {0: 0, 1: 1}.get, 0)


def test_apply_order_duplicates_and_state() -> None:
    c = Checker()
    d = c.on_apply(1, 0, 0, _e(1, 1, b"a"))
    with pytest.raises(InvariantViolation) as err:
        c.on_apply(1, 2, d, _e(4, 1, b"b"))  # gap
    assert err.value.invariant == "linear-order"
    with pytest.raises(InvariantViolation) as err:
        c.on_apply(2, 0, 0, _e(1, 1, b"other"))
    assert err.value.invariant == "state-machine-safety"
    d = c.on_apply(1, 1, d, _e(2, 1, b"b"))
    with pytest.raises(InvariantViolation, match="applied at both"):
        c.on_apply(1, 2, d, _e(3, 1, b"b"))


def test_stale_read_is_caught() -> None:
    c = Checker()
    c.on_read(1, 5, 5)
    with pytest.raises(InvariantViolation) as err:
        c.on_read(1, 4, 5)
    assert err.value.invariant == "read-linearizability"


def test_crash_loses_unsynced_writes_and_keeps_synced_ones() -> None:
    disk = SimDisk(ConfState(voters=frozenset({1})))
    disk.append((_e(1, 1), _e(2, 1)))
    disk.set_hard_state(HardState(term=1, vote=1, commit=0))
    disk.sync()
    disk.append((_e(3, 1), _e(4, 1), _e(5, 1)))
    disk.set_hard_state(HardState(term=2, vote=0, commit=2))
    assert disk.written.last_index() == 5
    loss = disk.crash(random.Random(0), torn=False)
    assert loss.ops_lost == 2
    assert disk.written.last_index() == 2
    assert disk.written.hard_state() == HardState(term=1, vote=1, commit=0)


def test_torn_crash_keeps_a_prefix_in_write_order() -> None:
    seen = set()
    for seed in range(200):
        disk = SimDisk(ConfState(voters=frozenset({1})))
        disk.append(tuple(_e(i, 1) for i in range(1, 6)))
        disk.set_hard_state(HardState(term=1, vote=1, commit=5))
        disk.crash(random.Random(seed), torn=True)
        last = disk.written.last_index()
        hs = disk.written.hard_state()
        # The hard state was written after the entries: it survives only if they all did.
        assert hs.commit == 0 or last == 5
        seen.add(last)
    assert seen == {0, 1, 2, 3, 4, 5}


def test_compaction_survives_a_crash() -> None:
    disk = SimDisk(ConfState(voters=frozenset({1})))
    disk.append(tuple(_e(i, 1) for i in range(1, 6)))
    disk.set_hard_state(HardState(term=1, vote=1, commit=5))
    disk.compact(3, encode_state(3, 99))
    disk.crash(random.Random(0), torn=False)
    assert disk.written.first_index() == 4
    assert decode_state(disk.written.snapshot().data) == (3, 99)
    assert disk.written.last_index() == 5


def test_a_seed_reproduces_exactly() -> None:
    a, b = Simulation(7).run(), Simulation(7).run()
    assert a.ok and b.ok
    assert a.stats == b.stats
