"""The group consumer's membership state machine (client/group.py) against a scripted fake
coordinator: each heartbeat gets the next scripted answer (a response or an error), and a fake
consumer records what it was told to fetch. Reconciliation revokes before it assigns, commits
revoked partitions before reporting them gone, calls back in Kafka's order, tells an explicit
empty assignment from no change, and drops everything without a commit when fenced."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import pytest

from tidelog.client.errors import PartitionRevoked
from tidelog.client.group import Membership, topic_partitions
from tidelog.client.structs import TopicPartition
from tidelog.errors import (
    FencedMemberEpoch,
    InvalidSubscription,
    NodeUnavailable,
    Revoked,
    StaleMemberEpoch,
    TidelogError,
    UnknownMemberId,
)
from tidelog.v1 import group_pb2

pytestmark = pytest.mark.timeout(30)

T0, T1, T2, T3 = (TopicPartition("t", p) for p in range(4))
INTERVAL_MS = 20

Answer = group_pb2.GroupHeartbeatResponse | TidelogError


def answer(
    epoch: int, assignment: Iterable[TopicPartition] | None = None, member_id: str = "m1"
) -> group_pb2.GroupHeartbeatResponse:
    resp = group_pb2.GroupHeartbeatResponse(
        member_id=member_id, member_epoch=epoch, heartbeat_interval_ms=INTERVAL_MS
    )
    if assignment is not None:
        resp.assignment.CopyFrom(group_pb2.GroupAssignment(partitions=topic_partitions(assignment)))
    return resp


class FakeCoordinator:
    """Answers heartbeats from a script, then "no change" at the last epoch; keeps commits."""

    def __init__(self, events: list[tuple[str, Any]]) -> None:
        self.events = events
        self.script: deque[Answer] = deque()
        self.requests: list[group_pb2.GroupHeartbeatRequest] = []
        self.commits: list[group_pb2.OffsetCommitRequest] = []
        self.commit_errors: deque[TidelogError] = deque()
        self.committed: dict[TopicPartition, int] = {}
        self.member_id = ""
        self.epoch = 0
        self.down = False

    async def heartbeat(
        self, request: group_pb2.GroupHeartbeatRequest, timeout_ms: float
    ) -> group_pb2.GroupHeartbeatResponse:
        if self.down:
            raise NodeUnavailable("the coordinator is down")
        self.requests.append(request)
        if self.script:
            got = self.script.popleft()
            if isinstance(got, TidelogError):
                raise got
            self.member_id, self.epoch = got.member_id, got.member_epoch
            return got
        return answer(self.epoch, member_id=self.member_id or "m1")

    async def commit(self, request: group_pb2.OffsetCommitRequest, timeout_ms: float) -> None:
        self.commits.append(request)
        if self.commit_errors:
            raise self.commit_errors.popleft()
        for e in request.offsets:
            self.committed[TopicPartition(e.topic, e.partition)] = e.offset
        self.events.append(
            ("commit", {TopicPartition(e.topic, e.partition): e.offset for e in request.offsets})
        )

    async def fetch(
        self, request: group_pb2.OffsetFetchRequest, timeout_ms: float
    ) -> group_pb2.OffsetFetchResponse:
        wanted = {TopicPartition(e.topic, p) for e in request.partitions for p in e.partitions}
        return group_pb2.OffsetFetchResponse(
            offsets=[
                group_pb2.OffsetEntry(topic=tp.topic, partition=tp.partition, offset=o)
                for tp, o in self.committed.items()
                if tp in wanted
            ]
        )


class FakeHost:
    """The consumer side: what is fetched, from where, and the positions poll reached."""

    def __init__(self, events: list[tuple[str, Any]]) -> None:
        self.events = events
        self.fetching: dict[TopicPartition, int | None] = {}
        self.positions: dict[TopicPartition, int] = {}
        self.woken = 0

    def group_take(self, starts: Mapping[TopicPartition, int | None]) -> None:
        self.events.append(("take", dict(starts)))
        self.fetching.update(starts)
        for tp, o in starts.items():
            if o is not None:  # else the fetcher resolves it by the reset policy, later
                self.positions[tp] = o

    def group_stop(self, tps: Sequence[TopicPartition]) -> None:
        self.events.append(("stop", sorted(tps)))
        for tp in tps:
            self.fetching.pop(tp, None)

    def group_drop(self, tps: Sequence[TopicPartition]) -> None:
        self.events.append(("drop", sorted(tps)))
        for tp in tps:
            self.fetching.pop(tp, None)
            self.positions.pop(tp, None)

    def group_positions(self, tps: Iterable[TopicPartition]) -> dict[TopicPartition, int]:
        return {tp: self.positions[tp] for tp in tps if tp in self.positions}

    def group_wake(self) -> None:
        self.woken += 1


class Rig:
    def __init__(self, **options: Any) -> None:
        self.events: list[tuple[str, Any]] = []
        self.coord = FakeCoordinator(self.events)
        self.host = FakeHost(self.events)
        options.setdefault("retry_backoff_ms", 5)
        self.m = Membership(self.coord, self.host, group_id="g", **options)
        self.m.subscribe(
            ["t"],
            on_assigned=lambda tps: self.events.append(("assigned", tps)),
            on_revoked=lambda tps: self.events.append(("revoked", tps)),
            on_lost=lambda tps: self.events.append(("lost", tps)),
        )

    def named(self, *kinds: str) -> list[tuple[str, Any]]:
        return [e for e in self.events if e[0] in kinds]

    async def heartbeats(self, n: int) -> None:
        """Wait until ``n`` more heartbeats were answered (or refused)."""
        target = len(self.coord.requests) + n
        await until(lambda: len(self.coord.requests) >= target)

    async def script(self, *answers: Answer) -> None:
        """Queue answers and wait until they were all used and one more heartbeat went."""
        self.coord.script.extend(answers)
        await until(lambda: not self.coord.script)
        await self.heartbeats(1)


async def until(cond: Callable[[], bool], timeout_s: float = 5.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not cond():
            await asyncio.sleep(0.002)


def owned_of(req: group_pb2.GroupHeartbeatRequest) -> set[TopicPartition] | None:
    if not req.owned_set:
        return None
    return {TopicPartition(e.topic, p) for e in req.owned for p in e.partitions}


async def test_join_sends_everything_then_takes_the_assignment_from_the_committed_offsets() -> None:
    rig = Rig(session_timeout_ms=30_000, assignor="range", group_instance_id="i-1")
    rig.coord.committed[T0] = 5
    rig.m.start()
    await rig.script(answer(1, [T0, T1]))
    first = rig.coord.requests[0]
    assert first.member_id == "" and first.member_epoch == 0
    assert first.group_instance_id == "i-1" and first.server_assignor == "range"
    assert first.session_timeout_ms == 30_000 and first.rebalance_timeout_ms == 300_000
    assert first.subscription_set and list(first.subscribed_topic_names) == ["t"]
    assert owned_of(first) == set()
    # Nothing is taken until poll reconciles.
    assert rig.host.fetching == {} and rig.m.pending
    await rig.m.reconcile()
    assert rig.named("take", "assigned") == [
        ("take", {T0: 5, T1: None}),
        ("assigned", [T0, T1]),
    ]
    assert rig.m.owned == {T0, T1} and rig.m.assigned
    # The next heartbeat reports the new ownership once, then only the member id and epoch.
    await rig.heartbeats(2)
    reports = [owned_of(r) for r in rig.coord.requests[1:]]
    assert {T0, T1} in reports
    later = rig.coord.requests[-1]
    assert owned_of(later) is None and not later.subscription_set
    assert later.member_id == "m1" and later.member_epoch == 1
    assert not later.HasField("server_assignor")
    await rig.m.close(leave=False)


async def test_revokes_commits_and_reports_before_it_takes_new_partitions() -> None:
    rig = Rig()
    rig.m.start()
    await rig.script(answer(1, [T0, T1]))
    await rig.m.reconcile()
    rig.host.positions[T0] = 42  # poll returned records up to 41
    rig.events.clear()
    await rig.script(answer(2, [T1, T2]))
    reports_before = len(rig.coord.requests)
    await rig.m.reconcile()
    assert rig.events == [
        ("stop", [T0]),
        ("revoked", [T0]),
        ("commit", {T0: 42}),
        ("drop", [T0]),
        ("take", {T2: None}),
        ("assigned", [T2]),
    ]
    assert rig.coord.commits[-1].member_id == "m1" and rig.coord.commits[-1].member_epoch == 2
    await rig.heartbeats(2)
    reports = [owned_of(r) for r in rig.coord.requests[reports_before:]]
    assert {T1, T2} in reports
    assert all(r is None or T0 not in r for r in reports)
    await rig.m.close(leave=False)


async def test_a_commit_for_a_revoked_partition_fails_at_once() -> None:
    rig = Rig()
    rig.m.start()
    await rig.script(answer(1, [T0]))
    await rig.m.reconcile()
    sent = len(rig.coord.commits)
    with pytest.raises(PartitionRevoked, match=r"t/1") as info:
        await rig.m.commit({T0: 3, T1: 7})
    assert isinstance(info.value, Revoked) and "does not own" in str(info.value)
    assert len(rig.coord.commits) == sent  # nothing was sent
    # The coordinator's REVOKED answer is the same error type.
    rig.coord.commit_errors.append(Revoked("t/0 belongs to m2"))
    with pytest.raises(PartitionRevoked, match="m2"):
        await rig.m.commit({T0: 3})
    await rig.m.commit({T0: 4})
    assert rig.coord.committed[T0] == 4
    await rig.m.close(leave=False)


async def test_a_stale_epoch_commit_waits_for_the_new_epoch_and_goes_again() -> None:
    rig = Rig()
    rig.m.start()
    await rig.script(answer(1, [T0]))
    await rig.m.reconcile()
    rig.coord.commit_errors.append(StaleMemberEpoch("epoch 1 is stale: 2"))
    rig.coord.script.append(answer(2))
    await rig.m.commit({T0: 9})
    assert [c.member_epoch for c in rig.coord.commits[-2:]] == [1, 2]
    assert rig.coord.committed[T0] == 9
    await rig.m.close(leave=False)


async def test_an_empty_assignment_is_an_answer_and_no_assignment_is_no_change() -> None:
    rig = Rig()
    rig.m.start()
    await rig.script(answer(1))  # joined, nothing assigned yet
    await rig.m.reconcile()
    assert rig.named("assigned", "revoked") == [] and not rig.m.assigned
    await rig.script(answer(1, []))  # explicitly nothing
    await rig.m.reconcile()
    assert rig.named("assigned", "revoked") == [("assigned", [])] and rig.m.assigned
    await rig.script(answer(2, [T3]))
    await rig.m.reconcile()
    await rig.script(answer(2))  # no change: nothing happens
    await rig.m.reconcile()
    assert rig.m.owned == {T3}
    await rig.script(answer(3, []))  # everything goes, nothing comes
    await rig.m.reconcile()
    assert rig.named("assigned", "revoked") == [
        ("assigned", []),
        ("assigned", [T3]),
        ("revoked", [T3]),
    ]
    assert rig.m.owned == set()
    await rig.m.close(leave=False)


@pytest.mark.parametrize("error", [FencedMemberEpoch("fenced"), UnknownMemberId("unknown")])
async def test_fenced_drops_everything_without_commit_and_joins_again(error: TidelogError) -> None:
    rig = Rig()
    rig.m.start()
    await rig.script(answer(1, [T0, T1]))
    await rig.m.reconcile()
    rig.host.positions[T0] = 10
    rig.events.clear()
    commits = len(rig.coord.commits)
    await rig.script(error, answer(1, [T2], member_id="m1"))
    # Fetching stopped before the application polled again.
    assert rig.host.fetching == {T2: None} or rig.host.fetching == {}
    assert ("drop", [T0, T1]) in rig.events
    rejoin = next(
        r for r in rig.coord.requests if r.member_epoch == 0 and r is not rig.coord.requests[0]
    )
    assert owned_of(rejoin) == set()
    assert rejoin.member_id == ("" if isinstance(error, UnknownMemberId) else "m1")
    assert rejoin.subscription_set
    await rig.m.reconcile()
    assert rig.named("lost", "revoked", "assigned") == [("lost", [T0, T1]), ("assigned", [T2])]
    assert len(rig.coord.commits) == commits  # a lost partition is not committed
    with pytest.raises(PartitionRevoked):
        await rig.m.commit({T0: 11})
    await rig.m.close(leave=False)


async def test_an_assignment_that_changes_during_on_revoked_is_followed() -> None:
    rig = Rig()
    gate = asyncio.Event()

    async def slow_revoke(tps: list[TopicPartition]) -> None:
        rig.events.append(("revoked", tps))
        await gate.wait()

    rig.m.on_revoked = slow_revoke
    rig.m.start()
    await rig.script(answer(1, [T0, T1]))
    await rig.m.reconcile()
    rig.events.clear()
    await rig.script(answer(2, [T1]))
    job = asyncio.create_task(rig.m.reconcile())
    await until(lambda: ("revoked", [T0]) in rig.events)
    # Heartbeats go on while the callback is slow, and bring another change.
    await rig.script(answer(3, [T2]))
    gate.set()
    await job
    assert rig.named("revoked", "assigned") == [
        ("revoked", [T0]),
        ("revoked", [T1]),
        ("assigned", [T2]),
    ]
    assert rig.m.owned == {T2}
    await rig.m.close(leave=False)


@pytest.mark.parametrize("instance", [None, "i-7"])
async def test_close_revokes_commits_and_leaves(instance: str | None) -> None:
    rig = Rig(group_instance_id=instance)
    rig.m.start()
    await rig.script(answer(4, [T0, T1]))
    await rig.m.reconcile()
    rig.host.positions[T1] = 77
    rig.events.clear()
    await rig.m.close()
    assert rig.named("stop", "revoked", "commit", "drop") == [
        ("stop", [T0, T1]),
        ("revoked", [T0, T1]),
        ("commit", {T1: 77}),
        ("drop", [T0, T1]),
    ]
    leave = rig.coord.requests[-1]
    assert leave.member_id == "m1"
    assert leave.member_epoch == (-1 if instance is None else -2)
    if instance is not None:
        assert leave.group_instance_id == instance
    n = len(rig.coord.requests)
    await asyncio.sleep(3 * INTERVAL_MS / 1000)
    assert len(rig.coord.requests) == n  # no heartbeat after the leave


async def test_without_auto_commit_revocation_commits_nothing() -> None:
    rig = Rig(enable_auto_commit=False)
    rig.m.start()
    await rig.script(answer(1, [T0]))
    await rig.m.reconcile()
    rig.host.positions[T0] = 5
    await rig.script(answer(2, []))
    await rig.m.reconcile()
    await rig.m.close()
    assert rig.coord.commits == []
    assert rig.named("revoked") == [("revoked", [T0])]


async def test_auto_commit_on_the_interval_commits_changed_positions_only() -> None:
    rig = Rig(auto_commit_interval_ms=30)
    rig.m.start()
    await rig.script(answer(1, [T0, T1]))
    await rig.m.reconcile()
    rig.m.auto_commit_due()  # not due yet
    await asyncio.sleep(0.05)
    assert rig.coord.commits == []
    rig.host.positions[T0] = 3
    rig.m.auto_commit_due()
    await until(lambda: len(rig.coord.commits) == 1)
    # T1 has no position yet (nothing was committed and nothing read): only T0 goes.
    assert rig.named("commit") == [("commit", {T0: 3})]
    await asyncio.sleep(0.05)
    rig.m.auto_commit_due()
    await asyncio.sleep(0.02)
    assert len(rig.coord.commits) == 1  # nothing moved since
    await rig.m.close(leave=False)


async def test_a_poll_timeout_leaves_the_group_and_the_next_poll_joins_again() -> None:
    rig = Rig(max_poll_interval_ms=150)
    rig.m.start()
    rig.m.poll_started()
    await rig.script(answer(1, [T0]))
    await rig.m.reconcile()
    rig.m.poll_ended()
    # The application stops polling: after 150 ms the member leaves (epoch -1) and drops T0.
    await until(lambda: any(r.member_epoch == -1 for r in rig.coord.requests))
    assert rig.host.fetching == {}
    n = len(rig.coord.requests)
    await asyncio.sleep(0.1)
    assert len(rig.coord.requests) == n  # a stale member sends nothing
    rig.coord.script.append(answer(5, [T0], member_id="m1"))
    rig.m.poll_started()
    await until(lambda: not rig.coord.script)
    assert rig.coord.requests[n].member_epoch == 0
    await rig.m.reconcile()
    rig.m.poll_ended()
    assert rig.named("lost", "assigned") == [
        ("assigned", [T0]),
        ("lost", [T0]),
        ("assigned", [T0]),
    ]
    await rig.m.close(leave=False)


async def test_a_member_cut_off_from_its_coordinator_gives_up_its_partitions() -> None:
    rig = Rig(session_timeout_ms=300)
    rig.m.start()
    await rig.script(answer(1, [T0]))
    await rig.m.reconcile()
    rig.coord.down = True
    # Before the coordinator's session timeout (300 ms) the member has stopped reading.
    async with asyncio.timeout(0.3):
        await until(lambda: ("drop", [T0]) in rig.events)
    rig.coord.down = False
    await until(lambda: rig.coord.requests[-1].member_epoch == 0)
    await rig.m.reconcile()
    assert ("lost", [T0]) in rig.events
    await rig.m.close(leave=False)


async def test_an_invalid_pattern_is_one_readable_error() -> None:
    rig = Rig()
    with pytest.raises(InvalidSubscription, match=r"'\(' is not a valid regular expression"):
        rig.m.subscribe(pattern="(")


async def test_a_refused_heartbeat_is_raised_by_check() -> None:
    rig = Rig()
    rig.coord.script.append(InvalidSubscription("bad regex"))
    rig.m.start()
    await until(lambda: rig.m.error is not None)
    with pytest.raises(InvalidSubscription, match="bad regex"):
        rig.m.check()
    await rig.m.close(leave=False)
