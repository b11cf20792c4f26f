"""Consumer-group membership: heartbeats to the group's coordinator and the reconciliation of
the partitions it assigns (the client side of KIP-848, proto/tidelog/v1/group.proto).

The coordinator decides; the member follows. A :class:`Membership` has two halves:

* The **heartbeat task** (its own asyncio task, so slow processing never delays it) sends
  GroupHeartbeat every ``heartbeat_interval_ms`` the coordinator asks for, at once when the
  member's ownership or subscription changed, and records each answer: the member id, its
  epoch and, when the answer carries one, the new target assignment. It also handles what
  happens to the member: fenced (UNKNOWN_MEMBER_ID, FENCED_MEMBER_EPOCH) or silent for a
  session timeout, the member stops fetching every partition at once, without committing,
  and joins again with epoch 0; past ``max_poll_interval_ms`` without a poll it leaves the
  group (epoch -1, or -2 for a static member) and joins again at the next poll, as Kafka's
  consumer does. A moved coordinator (NOT_COORDINATOR, an unreachable node) is found again
  by :class:`RemoteCoordinator` with the client's backoff (:mod:`tidelog.client.retry`).

* **Reconciliation** (:meth:`Membership.reconcile`) runs inside the application's ``poll``
  (as Kafka runs rebalance callbacks in poll), so callbacks never interleave with the
  processing of a batch the application holds. It first revokes what the target no longer
  holds: stop fetching, ``on_revoked``, commit their positions if auto-commit is on, then
  report the smaller ownership (the coordinator gives those partitions to their next owner
  only after this report). Then it takes the new partitions: fetch their committed offsets
  (``auto_offset_reset`` where there is none), start fetching, report, ``on_assigned``.
  Partitions lost to fencing get ``on_lost`` (``on_revoked`` when none is given), with no
  commit: another member may own them already.

An answer without an assignment means "no change"; an answer with an empty one means "you own
nothing" and, as the first assignment after joining, still calls ``on_assigned([])`` so an
application can tell "assigned nothing" from "not assigned yet" (:attr:`Membership.assigned`).

The membership talks to the coordinator through the small :class:`Coordinator` protocol and to
the consumer through :class:`MemberHost`, so its state machine is tested with a scripted fake
coordinator (tests/unit/test_client_group.py).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Literal, Protocol, TypeVar

import grpc
import grpc.aio

from tidelog.client.errors import PartitionRevoked
from tidelog.client.limits import RETRY_BACKOFF_MAX_MS
from tidelog.client.metadata import ClusterMetadata, transport_failure
from tidelog.client.retry import Retry
from tidelog.client.structs import TopicPartition
from tidelog.errors import (
    CoordinatorLoading,
    FencedMemberEpoch,
    InvalidSubscription,
    NodeUnavailable,
    NotCoordinator,
    RequestTimedOut,
    Revoked,
    StaleMemberEpoch,
    TidelogError,
    UnknownMemberId,
    from_rpc_error,
)
from tidelog.v1 import group_pb2, group_pb2_grpc

__all__ = [
    "ASSIGNORS",
    "Coordinator",
    "MemberHost",
    "Membership",
    "PartitionsCallback",
    "RemoteCoordinator",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: The server-side assignors a member may ask for (node: controller/groups/).
ASSIGNORS = ("uniform", "range")
Assignor = Literal["uniform", "range"]
#: The internal topic whose partition leaders coordinate the groups.
OFFSETS_TOPIC = "__consumer_offsets"
#: member_epoch of a heartbeat that joins, leaves, or leaves for a while (a static member).
JOIN_EPOCH = 0
LEAVE_EPOCH = -1
LEAVE_STATIC_EPOCH = -2
#: Kafka 4's defaults.
SESSION_TIMEOUT_MS_DEFAULT = 45_000
MAX_POLL_INTERVAL_MS_DEFAULT = 300_000
AUTO_COMMIT_INTERVAL_MS_DEFAULT = 5_000
#: The interval before the coordinator named one (the first heartbeat goes at once anyway).
HEARTBEAT_INTERVAL_MS_DEFAULT = 3_000
#: Deadline of one group RPC, coordinator look-ups and retries included.
GROUP_REQUEST_TIMEOUT_MS = 10_000
#: A commit (and an offset fetch) keeps retrying a moving coordinator this long.
COMMIT_TIMEOUT_MS = 30_000
#: The member gives up its partitions when no heartbeat succeeded for this share of the session
#: timeout: the coordinator expires it at the full timeout and hands them on, so the member must
#: have stopped by then (no partition read by two members at once).
SESSION_SAFETY = 0.8
#: Times a commit answered STALE_MEMBER_EPOCH is retried after a heartbeat brought the epoch.
STALE_EPOCH_RETRIES = 5
#: Time a leave heartbeat on close may take.
LEAVE_TIMEOUT_MS = 3_000

#: ``on_assigned`` / ``on_revoked`` / ``on_lost``: called with the partitions, sorted; may be a
#: plain function or a coroutine function.
PartitionsCallback = Callable[[list[TopicPartition]], Awaitable[None] | None]


class Coordinator(Protocol):
    """The group's coordinator, wherever it is now (RemoteCoordinator finds it)."""

    async def heartbeat(
        self, request: group_pb2.GroupHeartbeatRequest, timeout_ms: float
    ) -> group_pb2.GroupHeartbeatResponse: ...

    async def commit(self, request: group_pb2.OffsetCommitRequest, timeout_ms: float) -> None: ...

    async def fetch(
        self, request: group_pb2.OffsetFetchRequest, timeout_ms: float
    ) -> group_pb2.OffsetFetchResponse: ...


class MemberHost(Protocol):
    """What the membership needs of its consumer."""

    def group_take(self, starts: Mapping[TopicPartition, int | None]) -> None:
        """Start fetching these partitions, at the committed offset (None: by the reset policy)."""

    def group_stop(self, tps: Sequence[TopicPartition]) -> None:
        """Stop fetching and returning these partitions; keep their positions (to commit)."""

    def group_drop(self, tps: Sequence[TopicPartition]) -> None:
        """Forget these partitions entirely (positions too)."""

    def group_positions(self, tps: Iterable[TopicPartition]) -> dict[TopicPartition, int]:
        """The positions of those of ``tps`` that have one."""

    def group_wake(self) -> None:
        """Something for poll to do (reconcile, an error to raise): wake a waiting poll."""


def _tps(entries: Iterable[group_pb2.TopicPartitions]) -> frozenset[TopicPartition]:
    return frozenset(TopicPartition(e.topic, p) for e in entries for p in e.partitions)


def topic_partitions(tps: Iterable[TopicPartition]) -> list[group_pb2.TopicPartitions]:
    by_topic: dict[str, list[int]] = {}
    for tp in tps:
        by_topic.setdefault(tp.topic, []).append(tp.partition)
    return [
        group_pb2.TopicPartitions(topic=t, partitions=sorted(ps))
        for t, ps in sorted(by_topic.items())
    ]


def _names(tps: Iterable[TopicPartition]) -> str:
    return ", ".join(str(tp) for tp in sorted(tps))


def validate_pattern(pattern: str) -> None:
    """Raise InvalidSubscription (one readable line) unless ``pattern`` compiles."""
    try:
        re.compile(pattern)
    except re.error as exc:
        raise InvalidSubscription(
            f"the subscription pattern {pattern!r} is not a valid regular expression: {exc}"
        ) from None


async def _call_back(fn: PartitionsCallback | None, tps: Sequence[TopicPartition]) -> None:
    if fn is None:
        return
    result = fn(sorted(tps))
    if inspect.isawaitable(result):
        await result


#: Errors after which the coordinator is looked up again: it moved, is loading, or is gone.
_MOVED = (NotCoordinator, CoordinatorLoading, NodeUnavailable, RequestTimedOut)


class RemoteCoordinator:
    """The coordinator over gRPC: FindCoordinator at any node, then the RPC at the node it
    names; when that node says NOT_COORDINATOR (or cannot be reached, or is still loading)
    the next attempt asks FindCoordinator again, after the client's backoff."""

    def __init__(self, meta: ClusterMetadata, group_id: str, retry_backoff_ms: int) -> None:
        self._meta = meta
        self.group_id = group_id
        self._retry_backoff_ms = retry_backoff_ms
        self.address: str | None = None
        self.node_id = -1
        self._partition = -1
        #: Backoff state across calls: a coordinator that keeps failing backs off further.
        self._retry: Retry | None = None

    def forget(self) -> None:
        self.address = None

    async def find(self, timeout_ms: float) -> str:
        request = group_pb2.FindCoordinatorRequest(group_id=self.group_id)

        async def call(address: str) -> group_pb2.FindCoordinatorResponse:
            stub = group_pb2_grpc.GroupStub(self._meta.channel(address))
            resp: group_pb2.FindCoordinatorResponse = await stub.FindCoordinator(
                request, timeout=timeout_ms / 1000
            )
            return resp

        resp = await self._meta.call_any(f"find the coordinator of group {self.group_id!r}", call)
        if not resp.address:
            raise CoordinatorLoading(f"group {self.group_id!r} has no coordinator right now")
        self.address, self.node_id, self._partition = resp.address, resp.node_id, resp.partition
        return resp.address

    def _backoff(self) -> Retry:
        tp = TopicPartition(OFFSETS_TOPIC, self._partition)
        if self._retry is None:
            self._retry = Retry(self._meta, tp, self._retry_backoff_ms)
        # The group's partition is known once FindCoordinator answered: its leader is the
        # coordinator, so a leader error follows that partition's leader in the metadata.
        self._retry.tp = tp
        return self._retry

    async def _call(
        self,
        what: str,
        timeout_ms: float,
        fn: Callable[[group_pb2_grpc.GroupAsyncStub, float], Awaitable[T]],
    ) -> T:
        deadline = time.monotonic() + timeout_ms / 1000
        while True:
            retry = self._backoff()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RequestTimedOut(f"{what}: no coordinator answered within {timeout_ms:.0f} ms")
            # Never wait beyond the deadline for the backoff.
            try:
                async with asyncio.timeout(remaining):
                    await retry.wait()
            except TimeoutError:
                raise RequestTimedOut(
                    f"{what}: no coordinator answered within {timeout_ms:.0f} ms"
                ) from None
            remaining_ms = max(1.0, (deadline - time.monotonic()) * 1000)
            address = self.address
            try:
                if address is None:
                    address = await self.find(remaining_ms)
                    remaining_ms = max(1.0, (deadline - time.monotonic()) * 1000)
                stub = group_pb2_grpc.GroupStub(self._meta.channel(address))
                result = await fn(stub, remaining_ms / 1000)
            except grpc.aio.AioRpcError as exc:
                err = from_rpc_error(exc)
                if exc.code() == grpc.StatusCode.CANCELLED:
                    # A node shutting down cancels the calls it serves: look elsewhere.
                    err = NodeUnavailable(f"the coordinator at {address} cancelled the {what}")
                if transport_failure(exc) and address is not None:
                    self._meta.note_unreachable(address)
            except TidelogError as exc:
                err = exc
            else:
                retry.succeeded()
                return result
            if not isinstance(err, _MOVED):
                raise err
            log.debug("group %s: %s: %s; finding the coordinator again", self.group_id, what, err)
            self.address = None
            retry.failed(address, err)
            if time.monotonic() >= deadline:
                raise err

    async def heartbeat(
        self, request: group_pb2.GroupHeartbeatRequest, timeout_ms: float
    ) -> group_pb2.GroupHeartbeatResponse:
        async def go(
            stub: group_pb2_grpc.GroupAsyncStub, timeout_s: float
        ) -> group_pb2.GroupHeartbeatResponse:
            resp: group_pb2.GroupHeartbeatResponse = await stub.Heartbeat(
                request, timeout=timeout_s
            )
            return resp

        return await self._call("heartbeat", timeout_ms, go)

    async def commit(self, request: group_pb2.OffsetCommitRequest, timeout_ms: float) -> None:
        async def go(stub: group_pb2_grpc.GroupAsyncStub, timeout_s: float) -> None:
            await stub.OffsetCommit(request, timeout=timeout_s)

        await self._call("offset commit", timeout_ms, go)

    async def fetch(
        self, request: group_pb2.OffsetFetchRequest, timeout_ms: float
    ) -> group_pb2.OffsetFetchResponse:
        async def go(
            stub: group_pb2_grpc.GroupAsyncStub, timeout_s: float
        ) -> group_pb2.OffsetFetchResponse:
            resp: group_pb2.OffsetFetchResponse = await stub.OffsetFetch(request, timeout=timeout_s)
            return resp

        return await self._call("offset fetch", timeout_ms, go)

    async def describe(self, timeout_ms: float) -> group_pb2.DescribeGroupResponse:
        request = group_pb2.DescribeGroupRequest(group_id=self.group_id)

        async def go(
            stub: group_pb2_grpc.GroupAsyncStub, timeout_s: float
        ) -> group_pb2.DescribeGroupResponse:
            resp: group_pb2.DescribeGroupResponse = await stub.DescribeGroup(
                request, timeout=timeout_s
            )
            return resp

        return await self._call("describe group", timeout_ms, go)

    async def delete(self, timeout_ms: float) -> None:
        request = group_pb2.DeleteGroupRequest(group_id=self.group_id)

        async def go(stub: group_pb2_grpc.GroupAsyncStub, timeout_s: float) -> None:
            await stub.DeleteGroup(request, timeout=timeout_s)

        await self._call("delete group", timeout_ms, go)


#: States of a membership.
UNJOINED = "unjoined"  # not started, or between a loss and the next join
STABLE = "stable"  # a member (possibly reconciling)
STALE = "stale"  # left after max_poll_interval_ms; joins again at the next poll
CLOSED = "closed"


class Membership:
    """One consumer's membership of one group (module docstring)."""

    def __init__(
        self,
        coordinator: Coordinator,
        host: MemberHost,
        *,
        group_id: str,
        group_instance_id: str | None = None,
        session_timeout_ms: int = SESSION_TIMEOUT_MS_DEFAULT,
        max_poll_interval_ms: int = MAX_POLL_INTERVAL_MS_DEFAULT,
        assignor: str = "uniform",
        enable_auto_commit: bool = True,
        auto_commit_interval_ms: int = AUTO_COMMIT_INTERVAL_MS_DEFAULT,
        retry_backoff_ms: int = 100,
        rack_id: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not group_id:
            raise ValueError("group_id must not be empty")
        if assignor not in ASSIGNORS:
            raise ValueError(f"assignor={assignor!r} is not one of {', '.join(ASSIGNORS)}")
        if session_timeout_ms <= 0 or max_poll_interval_ms <= 0 or auto_commit_interval_ms <= 0:
            raise ValueError(
                "session_timeout_ms, max_poll_interval_ms and auto_commit_interval_ms must be > 0"
            )
        self._coord = coordinator
        self._host = host
        self.group_id = group_id
        self.group_instance_id = group_instance_id
        self._session_timeout_ms = session_timeout_ms
        self._max_poll_interval_ms = max_poll_interval_ms
        self._assignor = assignor
        self._auto_commit = enable_auto_commit
        self._auto_commit_interval_s = auto_commit_interval_ms / 1000
        self._retry_backoff_ms = max(1, retry_backoff_ms)
        self._clock = clock
        self._rack_id = rack_id

        self.member_id = ""
        self.epoch = JOIN_EPOCH
        self.state = UNJOINED
        self.heartbeat_interval_ms = HEARTBEAT_INTERVAL_MS_DEFAULT
        #: Partitions the member owns (reported or about to be).
        self.owned: set[TopicPartition] = set()
        #: Whether an assignment arrived (and was taken) since the member joined.
        self.assigned = False
        #: The latest assignment the coordinator sent and reconcile() has not finished yet.
        self._target: frozenset[TopicPartition] | None = None
        self._target_seq = 0
        #: Partitions lost (fencing, a session lost, a poll timeout) awaiting on_lost.
        self._lost: list[list[TopicPartition]] = []
        self._topics: list[str] = []
        self._pattern: str | None = None
        self.on_assigned: PartitionsCallback | None = None
        self.on_revoked: PartitionsCallback | None = None
        self.on_lost: PartitionsCallback | None = None
        #: Bumped on every change the coordinator must hear about; _sent_* is what it heard.
        self._owned_version = 0
        self._sent_owned_version = -1
        self._subscription_version = 0
        self._sent_subscription_version = -1
        #: Send every field next time (join, and after any failed heartbeat).
        self._full = True
        #: A fatal error (an invalid subscription, not authorized): raised by poll.
        self.error: TidelogError | None = None
        self._wake = asyncio.Event()
        #: Set after every heartbeat answer (commit retries on STALE_MEMBER_EPOCH wait for it).
        self._answered = asyncio.Event()
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._auto_task: asyncio.Task[None] | None = None
        self._last_auto_commit = clock()
        #: Offsets this member committed (or found committed), to skip unchanged auto-commits.
        self._committed: dict[TopicPartition, int] = {}
        self._last_poll = clock()
        self._in_poll = False
        self._last_ok = clock()
        #: Heartbeats answered, for tests and the benchmark.
        self.heartbeats = 0

    # -- configuration --------------------------------------------------------------------------

    def subscribe(
        self,
        topics: Sequence[str] = (),
        *,
        pattern: str | None = None,
        on_assigned: PartitionsCallback | None = None,
        on_revoked: PartitionsCallback | None = None,
        on_lost: PartitionsCallback | None = None,
    ) -> None:
        if pattern is not None and topics:
            raise ValueError("subscribe to topics or to a pattern, not both")
        if pattern is not None:
            validate_pattern(pattern)
        self._topics = list(dict.fromkeys(topics))
        self._pattern = pattern
        self.on_assigned, self.on_revoked, self.on_lost = on_assigned, on_revoked, on_lost
        self._subscription_version += 1
        self._wake.set()

    @property
    def subscription(self) -> list[str] | str:
        return self._pattern if self._pattern is not None else list(self._topics)

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None and self.state != CLOSED:
            self._last_poll = self._last_ok = self._clock()
            self._task = asyncio.get_running_loop().create_task(
                self._run_guarded(), name=f"group {self.group_id} heartbeat"
            )

    async def close(self, *, leave: bool = True) -> None:
        """Give up every partition (on_revoked, then a final auto-commit) and leave the group:
        epoch -1, or -2 for a static member (the coordinator keeps its partitions for its
        replacement until the session timeout)."""
        if self.state == CLOSED:
            return
        async with self._lock:
            await self._run_lost_callbacks()
            owned = sorted(self.owned)
            if owned and self.state == STABLE:
                self._host.group_stop(owned)
                try:
                    await _call_back(self.on_revoked, owned)
                finally:
                    if self._auto_commit:
                        await self._commit_quietly(self._host.group_positions(owned))
            self._host.group_drop(owned)
            self.owned.clear()
            self.state = CLOSED
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if self._auto_task is not None:
            await asyncio.gather(self._auto_task, return_exceptions=True)
        if leave and self.member_id:
            await self._leave()

    async def _leave(self) -> None:
        epoch = LEAVE_EPOCH if self.group_instance_id is None else LEAVE_STATIC_EPOCH
        request = group_pb2.GroupHeartbeatRequest(
            group_id=self.group_id, member_id=self.member_id, member_epoch=epoch
        )
        if self.group_instance_id is not None:
            request.group_instance_id = self.group_instance_id
        try:
            await self._coord.heartbeat(request, LEAVE_TIMEOUT_MS)
        except TidelogError as err:
            # The session timeout removes the member anyway.
            log.info("group %s: leaving failed (%s); the session timeout will", self.group_id, err)
        self.member_id, self.epoch = "", JOIN_EPOCH

    # -- the heartbeat task ---------------------------------------------------------------------

    def _request(self) -> group_pb2.GroupHeartbeatRequest:
        req = group_pb2.GroupHeartbeatRequest(
            group_id=self.group_id, member_id=self.member_id, member_epoch=self.epoch
        )
        full = self._full or self.epoch == JOIN_EPOCH
        if full:
            if self.group_instance_id is not None:
                req.group_instance_id = self.group_instance_id
            req.rebalance_timeout_ms = self._max_poll_interval_ms
            req.session_timeout_ms = self._session_timeout_ms
            req.server_assignor = self._assignor
            if self._rack_id is not None:
                req.rack_id = self._rack_id
        if full or self._sent_subscription_version != self._subscription_version:
            if self._pattern is not None:
                req.subscribed_topic_regex = self._pattern
            else:
                req.subscribed_topic_names.extend(self._topics)
                req.subscription_set = True
        if full or self._sent_owned_version != self._owned_version:
            req.owned.extend(topic_partitions(self.owned))
            req.owned_set = True
        return req

    async def _run_guarded(self) -> None:
        try:
            await self._run()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug: surface it in poll rather than go silent
            log.exception("group %s: the heartbeat task failed", self.group_id)
            self.error = TidelogError(
                f"the heartbeat task of group {self.group_id!r} failed: {exc!r}"
            )
            self._host.group_wake()

    async def _run(self) -> None:
        failures = 0
        fenced = 0
        while True:
            if self.state == STALE:
                self._wake.clear()
                await self._wake.wait()
                continue
            if self._poll_expired():
                await self._leave_on_poll_timeout()
                continue
            request = self._request()
            owned_version, subscription_version = self._owned_version, self._subscription_version
            sent_at = self._clock()
            timeout_ms = min(
                GROUP_REQUEST_TIMEOUT_MS,
                max(
                    100.0,
                    self._session_timeout_ms * SESSION_SAFETY - (sent_at - self._last_ok) * 1000,
                ),
            )
            self._wake.clear()
            try:
                resp = await self._coord.heartbeat(request, timeout_ms)
            except (UnknownMemberId, FencedMemberEpoch, StaleMemberEpoch) as err:
                log.info("group %s: fenced (%s); joining again", self.group_id, err)
                self._lose(reset_member_id=isinstance(err, UnknownMemberId))
                fenced += 1
                if fenced > 1:  # fenced again right after joining: do not spin
                    await self._sleep(self._failure_backoff_ms(fenced - 1))
                continue
            except TidelogError as err:
                self._full = True
                if not err.retriable:
                    log.warning("group %s: heartbeat refused: %s", self.group_id, err)
                    self.error = err
                    self._host.group_wake()
                    return
                failures += 1
                if (
                    self._clock() - self._last_ok
                ) * 1000 >= self._session_timeout_ms * SESSION_SAFETY:
                    if self.owned or self.epoch != JOIN_EPOCH:
                        log.warning(
                            "group %s: no heartbeat answered for %.1f s (%s); giving up "
                            "the partitions and joining again",
                            self.group_id,
                            self._clock() - self._last_ok,
                            err,
                        )
                        self._lose(reset_member_id=False)
                # Wake in time to give the partitions up if the trouble lasts.
                left_ms = (
                    self._session_timeout_ms * SESSION_SAFETY
                    - (self._clock() - self._last_ok) * 1000
                )
                await self._sleep(min(self._failure_backoff_ms(failures), max(1.0, left_ms)))
                continue
            failures = fenced = 0
            self._last_ok = sent_at
            self._full = False
            self._sent_owned_version = max(self._sent_owned_version, owned_version)
            self._sent_subscription_version = max(
                self._sent_subscription_version, subscription_version
            )
            self._apply(resp)
            await self._sleep(self.heartbeat_interval_ms)

    def _failure_backoff_ms(self, failures: int) -> float:
        return float(min(self._retry_backoff_ms * 2 ** min(failures - 1, 16), RETRY_BACKOFF_MAX_MS))

    async def _sleep(self, ms: float) -> None:
        """Until the next heartbeat is due, or something to tell the coordinator comes up."""
        if self._wake.is_set():
            return
        try:
            async with asyncio.timeout(ms / 1000):
                await self._wake.wait()
        except TimeoutError:
            pass

    def _apply(self, resp: group_pb2.GroupHeartbeatResponse) -> None:
        self.heartbeats += 1
        if resp.member_id:
            self.member_id = resp.member_id
        self.epoch = resp.member_epoch
        if resp.heartbeat_interval_ms > 0:
            self.heartbeat_interval_ms = resp.heartbeat_interval_ms
        if self.state == UNJOINED:
            self.state = STABLE
        self._answered.set()
        self._answered = asyncio.Event()
        if resp.HasField("assignment"):
            self._target = _tps(resp.assignment.partitions)
            self._target_seq += 1
            self._host.group_wake()

    def _lose(self, *, reset_member_id: bool) -> None:
        """Fenced, or the session is surely gone: stop every partition now, on_lost later (at
        the next poll), and join again."""
        lost = sorted(self.owned)
        if lost:
            self._host.group_drop(lost)
            self._lost.append(lost)
        self.owned.clear()
        self._owned_version += 1
        self._target = None
        self.assigned = False
        self.epoch = JOIN_EPOCH
        if reset_member_id:
            self.member_id = ""
        self.state = UNJOINED
        self._full = True
        self._last_ok = self._clock()
        self._host.group_wake()

    def _poll_expired(self) -> bool:
        if self._in_poll or self.state != STABLE:
            return False
        return (self._clock() - self._last_poll) * 1000 > self._max_poll_interval_ms

    async def _leave_on_poll_timeout(self) -> None:
        log.warning(
            "group %s: no poll for %d ms (max_poll_interval_ms): leaving the group; the "
            "next poll joins again",
            self.group_id,
            self._max_poll_interval_ms,
        )
        self._lose(reset_member_id=False)
        await self._leave()
        self.state = STALE

    # -- called by poll -------------------------------------------------------------------------

    def poll_started(self) -> None:
        self._in_poll = True
        self._last_poll = self._clock()
        if self.state == STALE:
            self.state = UNJOINED
            self._full = True
            self._wake.set()

    def poll_ended(self) -> None:
        self._in_poll = False
        self._last_poll = self._clock()

    def check(self) -> None:
        """Raise the fatal error the heartbeat task met, if any."""
        if self.error is not None:
            raise self.error

    @property
    def pending(self) -> bool:
        """Whether reconcile() has work: callbacks for lost partitions, or a new assignment."""
        return bool(self._lost) or self._target is not None

    async def reconcile(self) -> None:
        """Bring the ownership to the coordinator's latest assignment (module docstring)."""
        if not self.pending:
            return
        async with self._lock:
            while self.state != CLOSED:
                if await self._run_lost_callbacks():
                    continue
                target, seq = self._target, self._target_seq
                if target is None:
                    return
                revoke = sorted(self.owned - target)
                if revoke:
                    await self._revoke(revoke)
                    continue
                add = sorted(target - self.owned)
                if add or not self.assigned:
                    took = await self._take(add, seq)
                    if took is None:
                        return
                    if not took:
                        continue
                if self._target_seq == seq:
                    self._target = None

    async def _run_lost_callbacks(self) -> bool:
        if not self._lost:
            return False
        lost = self._lost.pop(0)
        await _call_back(self.on_lost or self.on_revoked, lost)
        return True

    async def _revoke(self, revoke: list[TopicPartition]) -> None:
        self._host.group_stop(revoke)
        try:
            await _call_back(self.on_revoked, revoke)
            # A loss during the callback dropped them already (no commit then).
            if self._auto_commit and set(revoke) <= self.owned:
                await self._settle_auto_commit()
                await self._commit_quietly(self._host.group_positions(revoke))
        finally:
            if set(revoke) <= self.owned:
                self.owned.difference_update(revoke)
                self._host.group_drop(revoke)
                for tp in revoke:
                    self._committed.pop(tp, None)
                self._owned_version += 1
                self._wake.set()

    async def _take(self, add: list[TopicPartition], seq: int) -> bool | None:
        """Start the new partitions. False: the member's standing changed meanwhile (the
        caller looks again); None: the committed offsets could not be read (the next poll
        tries again)."""
        committed: dict[TopicPartition, int] = {}
        if add:
            try:
                committed = await self.fetch_committed(add)
            except TidelogError as err:
                log.warning(
                    "group %s: could not read the committed offsets of %s: %s; trying again",
                    self.group_id,
                    _names(add),
                    err,
                )
                return None
        target = self._target
        if target is None or not set(add) <= target or self.owned & set(add):
            return False
        self._host.group_take({tp: committed.get(tp) for tp in add})
        self._committed.update(committed)
        self.owned.update(add)
        self.assigned = True
        self._owned_version += 1
        self._wake.set()
        await _call_back(self.on_assigned, add)
        return True

    # -- offsets --------------------------------------------------------------------------------

    async def fetch_committed(self, tps: Sequence[TopicPartition]) -> dict[TopicPartition, int]:
        """The group's committed offsets of ``tps`` (those without one are absent)."""
        request = group_pb2.OffsetFetchRequest(
            group_id=self.group_id, partitions=topic_partitions(tps)
        )
        resp = await self._coord.fetch(request, COMMIT_TIMEOUT_MS)
        wanted = set(tps)
        out: dict[TopicPartition, int] = {}
        for e in resp.offsets:
            tp = TopicPartition(e.topic, e.partition)
            if tp in wanted and e.offset >= 0:
                out[tp] = e.offset
        return out

    async def commit(self, offsets: Mapping[TopicPartition, int]) -> None:
        """Commit ``offsets`` (the next offset to read, per partition) as this member; a
        partition it does not own fails at once with PartitionRevoked."""
        offsets = {TopicPartition(*tp): int(o) for tp, o in offsets.items()}
        not_owned = [tp for tp in offsets if tp not in self.owned]
        if not_owned or (offsets and self.state != STABLE):
            bad = not_owned or list(offsets)
            raise PartitionRevoked(
                f"cannot commit {_names(bad)} for group {self.group_id!r}: this member does "
                "not own "
                + ("it" if len(bad) == 1 else "them")
                + " (revoked by a rebalance, lost, or never assigned); its new owner "
                "commits it now",
                partitions=",".join(str(tp) for tp in sorted(bad)),
            )
        if not offsets:
            return
        for attempt in range(STALE_EPOCH_RETRIES + 1):
            epoch = self.epoch
            request = group_pb2.OffsetCommitRequest(
                group_id=self.group_id,
                member_id=self.member_id,
                member_epoch=epoch,
                offsets=[
                    group_pb2.OffsetEntry(topic=tp.topic, partition=tp.partition, offset=o)
                    for tp, o in sorted(offsets.items())
                ],
            )
            try:
                await self._coord.commit(request, COMMIT_TIMEOUT_MS)
            except StaleMemberEpoch:
                if attempt == STALE_EPOCH_RETRIES:
                    raise
                # A newer epoch is on its way in a heartbeat answer: get it, then again.
                answered = self._answered
                self._wake.set()
                try:
                    async with asyncio.timeout(GROUP_REQUEST_TIMEOUT_MS / 1000):
                        await answered.wait()
                except TimeoutError:
                    pass
                gone = [tp for tp in offsets if tp not in self.owned]
                if gone:
                    raise PartitionRevoked(
                        f"cannot commit {_names(gone)} for group {self.group_id!r}: revoked "
                        "while the commit was under way",
                        partitions=",".join(str(tp) for tp in sorted(gone)),
                    ) from None
                continue
            except Revoked as err:
                if isinstance(err, PartitionRevoked):
                    raise
                raise PartitionRevoked(
                    f"the coordinator of group {self.group_id!r} refused the commit: {err}",
                    **err.metadata,
                ) from None
            self._committed.update(offsets)
            return

    async def _commit_quietly(self, offsets: Mapping[TopicPartition, int]) -> None:
        changed = {tp: o for tp, o in offsets.items() if self._committed.get(tp) != o}
        if not changed:
            return
        try:
            await self.commit(changed)
        except TidelogError as err:
            log.warning(
                "group %s: auto-commit of %s failed: %s", self.group_id, _names(changed), err
            )

    def auto_commit_due(self) -> None:
        """Called by poll: commit the positions of the owned partitions in the background when
        auto_commit_interval_ms has passed. They cover what earlier polls returned, which the
        application has processed by the time it polls again (at least once)."""
        if not self._auto_commit or self.state != STABLE or not self.owned:
            return
        now = self._clock()
        if now - self._last_auto_commit < self._auto_commit_interval_s:
            return
        if self._auto_task is not None and not self._auto_task.done():
            return
        self._last_auto_commit = now
        positions = self._host.group_positions(self.owned)
        self._auto_task = asyncio.get_running_loop().create_task(
            self._commit_quietly(positions), name=f"group {self.group_id} auto-commit"
        )

    async def _settle_auto_commit(self) -> None:
        """A background auto-commit goes first: nothing older lands after a revocation's."""
        task = self._auto_task
        if task is not None and not task.done():
            await asyncio.gather(task, return_exceptions=True)
