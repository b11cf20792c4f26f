"""The replicated-state-machine seam (node/stm.py): term-checked waiters and the sync step,
driven through the same callbacks MultiRaft calls, over a stand-in group."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import pytest

from tidelog.errors import NotLeader, RequestTimedOut, TidelogError
from tidelog.node.multiraft import RaftGroup
from tidelog.node.raft.errors import ProposalDropped
from tidelog.node.raft.types import Entry, Role, SoftState
from tidelog.node.stm import LostHow, StateMachine


class FakeRaw:
    def __init__(self) -> None:
        self.role = Role.FOLLOWER
        self.term = 1
        self.leader_id = 0
        self.applied_index = 0
        self.last = 0

    def last_index(self) -> int:
        return self.last


class FakeStorage:
    """The stored log: index -> term."""

    def __init__(self) -> None:
        self.terms: dict[int, int] = {}

    def stored_term(self, index: int) -> int | None:
        return self.terms.get(index)


class FakeGroup:
    def __init__(self) -> None:
        self.raw = FakeRaw()
        self.storage = FakeStorage()


class Counter(StateMachine[int]):
    """A state machine whose state is the number of entries applied; each entry's result is
    the count after it."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.roles: list[tuple[Role, bool]] = []

    def apply(self, entries: tuple[Entry, ...]) -> list[int | None]:
        out: list[int | None] = []
        for _ in entries:
            self.count += 1
            out.append(self.count)
        return out

    def on_role_change(self, soft: SoftState, was_leader: bool) -> None:
        self.roles.append((soft.role, was_leader))

    def on_storage_failure(self, group: RaftGroup, exc: BaseException) -> None:
        raise AssertionError("not used")

    def not_leader_error(self) -> TidelogError:
        return NotLeader("not the leader")

    def dropped_error(self, exc: ProposalDropped) -> TidelogError:
        return NotLeader(exc.reason)

    def entry_lost_error(self, how: LostHow) -> TidelogError:
        return NotLeader(f"entry {how}")


def setup() -> tuple[Counter, FakeGroup, RaftGroup]:
    sm = Counter()
    fake = FakeGroup()
    group = cast(RaftGroup, fake)
    sm.attach(group, cast(Any, object()))
    return sm, fake, group


def lead(sm: Counter, fake: FakeGroup, group: RaftGroup, term: int, last: int) -> None:
    fake.raw.role, fake.raw.term, fake.raw.last = Role.LEADER, term, last
    sm.on_soft_state(group, SoftState(1, Role.LEADER))


def commit(sm: Counter, group: RaftGroup, *entries: tuple[int, int]) -> None:
    """Commit (index, term) entries, as stored first."""
    fake = cast(FakeGroup, group)
    for index, term in entries:
        fake.storage.terms[index] = term
    sm.on_committed(group, tuple(Entry(t, i, b"x") for i, t in entries))


@pytest.mark.timeout(5)
async def test_persisted_waiter_resolves_only_for_its_own_term() -> None:
    """Issue 8 defect 1: a leader of term 5 proposes index 10; before its round stores it,
    an APPEND of term 6 replaces index 10 in the unstored tail (no stored entry is cut, so
    no truncation is reported) and the next round stores (10, term 6). The acks=1 waiter of
    (10, term 5) must fail, not be told "stored"."""
    sm, fake, group = setup()
    ours = asyncio.create_task(sm.wait_persisted(10, 5, 1))
    theirs = asyncio.create_task(sm.wait_persisted(10, 6, 1))
    await asyncio.sleep(0)
    fake.storage.terms[10] = 6
    sm.on_persisted(group, 10)
    with pytest.raises(NotLeader, match="entry replaced"):
        await ours
    await theirs  # the entry that is stored there resolves its own waiter
    assert len(sm._persist_waiters) == 0


@pytest.mark.timeout(5)
async def test_persisted_waiter_of_a_stored_entry_resolves_and_later_ones_wait() -> None:
    sm, fake, group = setup()
    first = asyncio.create_task(sm.wait_persisted(3, 2, 1))
    later = asyncio.create_task(sm.wait_persisted(4, 2, 1))
    await asyncio.sleep(0)
    fake.storage.terms[3] = 2
    sm.on_persisted(group, 3)
    await first
    assert not later.done()
    sm.on_truncated(group, 4)
    with pytest.raises(NotLeader, match="overwritten"):
        await later


@pytest.mark.timeout(5)
async def test_commit_waiters_are_term_checked_and_get_the_apply_result() -> None:
    sm, _fake, group = setup()
    kept = sm.commit_future(1, 1)
    replaced = sm.commit_future(2, 1)
    commit(sm, group, (1, 1), (2, 2))
    assert await kept == 1 and sm.count == 2 and sm.applied_index == 2
    with pytest.raises(NotLeader, match="entry replaced"):
        await replaced


@pytest.mark.timeout(5)
async def test_a_deposed_leaders_waiter_still_resolves_if_its_entry_commits() -> None:
    """Stepping down does not fail a waiter: (index, term) names one entry, so if the next
    leader keeps and commits it, "committed" is the true answer."""
    sm, fake, group = setup()
    lead(sm, fake, group, term=3, last=0)
    waiter = asyncio.create_task(sm.wait_committed(1, 3, 1))
    await asyncio.sleep(0)
    fake.raw.role, fake.raw.term = Role.FOLLOWER, 4
    sm.on_soft_state(group, SoftState(2, Role.FOLLOWER))
    assert not waiter.done()
    commit(sm, group, (1, 3), (2, 4))
    assert await waiter == 1


@pytest.mark.timeout(5)
async def test_a_waiter_below_an_older_terms_waiter_is_not_held_up_by_it() -> None:
    """A deposed term's waiter at index 10 that nothing resolved yet must not stop a later
    term's waiter at index 8 from resolving when index 8 commits."""
    sm, _fake, group = setup()
    old = sm.commit_future(10, 1)
    new = sm.commit_future(8, 3)
    commit(sm, group, *((i, 1) for i in range(1, 8)), (8, 3))
    assert await new == 8
    assert not old.done()
    commit(sm, group, (9, 3), (10, 3))
    with pytest.raises(NotLeader, match="replaced"):
        await old


@pytest.mark.timeout(5)
async def test_timed_out_waiter_leaves_nothing_behind() -> None:
    sm, _fake, _group = setup()
    with pytest.raises(RequestTimedOut, match="not committed within 10 ms"):
        await sm.wait_committed(1, 1, 0.01)
    assert len(sm._commit_waiters) == 0


@pytest.mark.timeout(5)
async def test_sync_waits_until_earlier_terms_are_applied() -> None:
    sm, fake, group = setup()
    commit(sm, group, (1, 1), (2, 1))
    # Elected in term 2 holding entries up to 5 (3 and 4 from term 1, its EMPTY at 5).
    lead(sm, fake, group, term=2, last=5)
    assert sm.roles == [(Role.LEADER, False)]
    assert sm.is_leader and not sm.synced
    syncing = asyncio.create_task(sm.sync(1))
    await asyncio.sleep(0)
    commit(sm, group, (3, 1), (4, 1))
    await asyncio.sleep(0)
    assert not syncing.done()
    commit(sm, group, (5, 2))
    await syncing
    assert sm.synced and sm.count == 5
    # A second soft-state change while leading keeps the sync point.
    sm.on_soft_state(group, SoftState(1, Role.LEADER))
    assert sm.synced and sm.roles[-1] == (Role.LEADER, True)


@pytest.mark.timeout(5)
async def test_sync_fails_off_the_leader_and_when_leadership_is_lost() -> None:
    sm, fake, group = setup()
    with pytest.raises(NotLeader, match="not the leader"):
        await sm.sync(1)
    lead(sm, fake, group, term=2, last=3)
    syncing = asyncio.create_task(sm.sync(1))
    await asyncio.sleep(0)
    fake.raw.role = Role.FOLLOWER
    sm.on_soft_state(group, SoftState(2, Role.FOLLOWER))
    with pytest.raises(NotLeader, match="not the leader"):
        await syncing
    assert not sm.synced and sm.roles[-1] == (Role.FOLLOWER, True)
    lead(sm, fake, group, term=3, last=3)
    with pytest.raises(RequestTimedOut, match="earlier terms"):
        await sm.sync(0.01)


@pytest.mark.timeout(5)
async def test_closing_fails_every_waiter_and_later_ones() -> None:
    sm, _fake, _group = setup()
    a = asyncio.create_task(sm.wait_committed(1, 1, 1))
    b = asyncio.create_task(sm.wait_persisted(1, 1, 1))
    await asyncio.sleep(0)
    ev = sm.changed()
    sm.fail_waiters(NotLeader("closed"))
    sm.fail_waiters(NotLeader("second"))  # the first error wins
    assert ev.is_set()
    for t in (a, b):
        with pytest.raises(NotLeader, match="closed"):
            await t
    with pytest.raises(NotLeader, match="closed"):
        await sm.wait_committed(2, 1, 1)


@pytest.mark.timeout(5)
async def test_wait_each_reports_the_leading_entries_that_committed() -> None:
    """Issue 8 defect 7 (backpressure seed 26): a request of three batches (entries 4, 5,
    6 of term 2) whose entries 4 and 5 commit while a new leader overwrites 6. Waiting on
    the last entry alone told the client "not committed" for all three; waiting on each
    says two were. Every waiter is registered at once (entries settled before their turn
    still count) and none is left behind."""
    sm, _fake, group = setup()
    waiting = asyncio.create_task(sm.wait_each([(4, 2), (5, 2), (6, 2)], 1, committed=True))
    await asyncio.sleep(0)
    commit(sm, group, (1, 1), (2, 1), (3, 1), (4, 2), (5, 2))
    sm.on_truncated(group, 6)
    done, error = await waiting
    assert done == 2
    assert isinstance(error, NotLeader) and "overwritten" in str(error)
    assert len(sm._commit_waiters) == 0
    # Nothing to wait for, and all of them stored:
    assert await sm.wait_each([], 1, committed=True) == (0, None)
    both = asyncio.create_task(sm.wait_each([(6, 3), (7, 3)], 1, committed=False))
    await asyncio.sleep(0)
    _fake.storage.terms.update({6: 3, 7: 3})
    sm.on_persisted(group, 7)
    assert await both == (2, None)


@pytest.mark.timeout(5)
async def test_wait_each_times_out_and_leaves_nothing_behind() -> None:
    sm, _fake, group = setup()
    waiting = asyncio.create_task(sm.wait_each([(1, 1), (2, 1)], 0.05, committed=True))
    await asyncio.sleep(0)
    commit(sm, group, (1, 1))
    with pytest.raises(RequestTimedOut, match="raft index 2 was appended but not committed"):
        await waiting
    assert len(sm._commit_waiters) == 0
