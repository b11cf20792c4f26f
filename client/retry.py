"""When a request for one partition goes again after a failure: one policy for the producer's
sender and the consumer's fetchers.

A leader error (:data:`LEADER_ERRORS`: the node is unreachable, not the leader, without a
leader, or does not know the topic yet) follows the leader rather than the clock: a
NOT_LEADER that names the new leader sends the retry there at once; otherwise the retry
waits a short doubling backoff (from ``retry_backoff_ms``, capped at
LEADER_RETRY_BACKOFF_MAX_MS) during which the partition's metadata is re-read every
LEADER_POLL_INTERVAL_MS, and goes to the new leader the moment one shows up (at most
LEADER_HOPS_IMMEDIATE_MAX times in a row). Other retriable errors wait the plain doubling
backoff, capped at RETRY_BACKOFF_MAX_MS. The limits and their reasons are in
:mod:`tidelog.client.limits`.

A :class:`Retry` belongs to one partition of one client object. Its user records failures
with :meth:`Retry.failed` (several failures before the next attempt count as one step, a
leader error if any of them was), asks :meth:`Retry.schedule` when the next attempt may go,
and may wait for a new leader with :meth:`Retry.new_leader` meanwhile; :meth:`Retry.wait`
does both for a caller that simply awaits its next attempt.
"""

from __future__ import annotations

import asyncio
import logging
import time

from tidelog.client.limits import (
    LEADER_HOPS_IMMEDIATE_MAX,
    LEADER_RETRY_BACKOFF_MAX_MS,
    RETRY_BACKOFF_MAX_MS,
)
from tidelog.client.metadata import LEADER_POLL_INTERVAL_MS, ClusterMetadata
from tidelog.client.structs import TopicPartition
from tidelog.errors import (
    LeaderNotAvailable,
    NodeUnavailable,
    NotLeader,
    RequestTimedOut,
    TidelogError,
    UnknownTopic,
)

__all__ = ["LEADER_ERRORS", "Retry", "is_leader_error"]

log = logging.getLogger(__name__)

#: Errors that mean this node cannot serve the partition now and the metadata may name one
#: that can: the leader moved, is being elected, is unreachable, or the node has not heard
#: of the topic yet (a topic just created reaches the nodes' metadata one by one).
LEADER_ERRORS: tuple[type[TidelogError], ...] = (
    NotLeader,
    LeaderNotAvailable,
    NodeUnavailable,
    RequestTimedOut,
    UnknownTopic,
)


def is_leader_error(err: TidelogError) -> bool:
    return isinstance(err, LEADER_ERRORS)


class Retry:
    """The retry state of one partition (module docstring)."""

    __slots__ = (
        "_failed",
        "_leader_error",
        "_pause",
        "backoff_ms",
        "failed_at",
        "hops",
        "leader_error",
        "meta",
        "retry_backoff_ms",
        "since_s",
        "tp",
    )

    def __init__(self, meta: ClusterMetadata, tp: TopicPartition, retry_backoff_ms: int) -> None:
        self.meta = meta
        self.tp = tp
        self.retry_backoff_ms = retry_backoff_ms
        #: The backoff of the next attempt (0: at once).
        self.backoff_ms = 0.0
        #: Whether the step last scheduled was after a leader error.
        self.leader_error = False
        #: Where the last leader error happened (None: no leader was known).
        self.failed_at: str | None = None
        #: Leader changes followed at once since the last success (LEADER_HOPS_IMMEDIATE_MAX).
        self.hops = 0
        #: When the trouble began (time.monotonic(); 0 while requests succeed).
        self.since_s = 0.0
        self._failed = False
        self._leader_error = False
        self._pause = False

    def succeeded(self) -> None:
        self.backoff_ms = 0.0
        self.hops = 0
        self.leader_error = False
        self.since_s = 0.0

    def pause(self) -> None:
        """A short pause of ``retry_backoff_ms`` before the next attempt, no leader error (a
        node ended a stream that delivered nothing)."""
        self._pause = True

    def failed(self, address: str | None, err: TidelogError) -> bool:
        """Record a failure of a request sent to ``address``; for a leader error, note an
        unreachable node and apply a NOT_LEADER hint. Returns whether the metadata now names
        a leader from the hint (False: the caller may want to refresh it)."""
        self._failed = True
        if not self.since_s:
            self.since_s = time.monotonic()
        if not is_leader_error(err):
            return False
        self._leader_error = True
        self.failed_at = address
        if address is None:
            return False
        if isinstance(err, NodeUnavailable):
            self.meta.note_unreachable(address)
        return self.meta.apply_leader_hint(self.tp.topic, self.tp.partition, err)

    def schedule(self) -> float:
        """The milliseconds before the next attempt, after the failures recorded since the
        last call: 0 at once when the leader moved already (a hint, a refresh), else the
        next step of the doubling backoff."""
        self._failed = False
        leader_error, self._leader_error = self._leader_error, False
        self.leader_error = leader_error
        if leader_error and self.hops < LEADER_HOPS_IMMEDIATE_MAX:
            address = self.meta.leader_address(self.tp.topic, self.tp.partition)
            if address is not None and address != self.failed_at:
                self.hops += 1
                self.backoff_ms = 0.0
                return 0.0
        cap_ms = LEADER_RETRY_BACKOFF_MAX_MS if leader_error else RETRY_BACKOFF_MAX_MS
        base_ms = self.retry_backoff_ms
        # Never 0: a retry_backoff_ms of 0 still doubles from 1 ms instead of spinning.
        self.backoff_ms = min(max(self.backoff_ms * 2, base_ms, 1), max(cap_ms, base_ms))
        return self.backoff_ms

    def watch_worthwhile(self) -> bool:
        """Whether waiting for a new leader during the scheduled backoff can win anything:
        after a leader error, with a backoff longer than half a metadata poll."""
        return self.leader_error and self.backoff_ms > LEADER_POLL_INTERVAL_MS / 2

    async def new_leader(self, timeout_s: float) -> str | None:
        """The address of a leader other than the one that failed, as soon as the metadata
        names one within ``timeout_s``, and only while the partition has not followed too
        many changes in a row; None otherwise. Following it counts as a hop and clears the
        backoff. Raises UnknownTopic when the topic is gone."""
        address = await self.meta.wait_for_leader(
            self.tp.topic,
            self.tp.partition,
            not_at=self.failed_at,
            timeout_s=timeout_s,
            since_s=self.since_s or None,
        )
        if address is None or self.hops >= LEADER_HOPS_IMMEDIATE_MAX:
            return None
        log.debug("%s: new leader at %s, retrying now", self.tp, address)
        self.hops += 1
        self.backoff_ms = 0.0
        return address

    async def wait(self) -> None:
        """Wait until the next attempt may go (at once when nothing failed)."""
        if self._pause and not self._failed:
            self._pause = False
            self.leader_error = False
            self.backoff_ms = max(float(self.retry_backoff_ms), 1.0)
            await asyncio.sleep(self.backoff_ms / 1000)
            return
        self._pause = False
        if not self._failed:
            return
        delay_ms = self.schedule()
        if not delay_ms:
            return
        loop = asyncio.get_running_loop()
        until_s = loop.time() + delay_ms / 1000
        if self.leader_error and await self.new_leader(delay_ms / 1000) is not None:
            return
        remaining_s = until_s - loop.time()
        if remaining_s > 0:
            await asyncio.sleep(remaining_s)
