"""One replica of one partition on this node: its log, its high watermark and who waits on it.

Appending and committing are separate steps on purpose. Today the node is alone, so a batch
is committed once it is durable here (``flush=durable``: after the group commit's fsync) or
at once (``flush=os``). When Raft arrives, :meth:`Partition.append_as_leader` becomes the
leader's local append and :meth:`Partition.commit` is driven by the Raft commit index; the
produce waiters and fetch long polls below do not change.

Everything here runs on the event loop thread, except ``log.flush()``, which the group
committer (node/flusher.py) runs in a worker thread.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from typing import Protocol

from tidelog.config import TopicConfig
from tidelog.errors import (
    NodeUnavailable,
    OffsetOutOfRange,
    RequestTimedOut,
    StorageError,
    TidelogError,
    UnknownTopic,
)

log = logging.getLogger(__name__)

# Raft is not wired yet: every batch is appended in term 1 by the only replica.
SINGLE_NODE_TERM = 1


class LogLike(Protocol):
    """The part of node/log's PartitionLog a partition uses (lets tests swap in a fake)."""

    @property
    def log_start_offset(self) -> int: ...
    @property
    def log_end_offset(self) -> int: ...
    @property
    def flushed_offset(self) -> int: ...
    @property
    def size_bytes(self) -> int: ...
    @property
    def segment_count(self) -> int: ...

    def append(self, batches: bytes, raft_term: int) -> tuple[int, int]: ...
    def read(self, offset: int, max_bytes: int, *, upto: int) -> bytes: ...
    def offset_for_timestamp(self, timestamp_ms: int) -> tuple[int, int] | None: ...
    def flush(self) -> int: ...
    def enforce_retention(self, now_ms: int) -> object: ...
    def maybe_roll(self, now_ms: int) -> object: ...
    def update_config(self, config: TopicConfig) -> None: ...
    def close(self) -> None: ...
    def delete(self) -> None: ...


class Partition:
    __slots__ = (
        "_changed",
        "_closed_error",
        "_hw",
        "_on_dirty",
        "_stream_error",
        "_waiters",
        "config",
        "index",
        "log",
        "topic",
    )

    def __init__(
        self,
        topic: str,
        index: int,
        partition_log: LogLike,
        config: TopicConfig,
        on_dirty: Callable[[Partition], None],
    ) -> None:
        self.topic = topic
        self.index = index
        self.log = partition_log
        self.config = config
        self._on_dirty = on_dirty
        # What survived on disk is committed: on one node nothing else could have it.
        self._hw = partition_log.log_end_offset
        # Produce waiters in offset order (appends happen in offset order): (end offset, future).
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()
        # Set (and replaced) whenever the high watermark moves or the partition closes.
        self._changed = asyncio.Event()
        self._closed_error: TidelogError | None = None
        self._stream_error: TidelogError | None = None

    def __repr__(self) -> str:
        return f"Partition({self.topic!r}, {self.index}, hw={self._hw})"

    # -- state ---------------------------------------------------------------------------

    @property
    def high_watermark(self) -> int:
        """Offset one past the last committed record: what Fetch serves and LATEST returns."""
        return self._hw

    @property
    def log_start_offset(self) -> int:
        return self.log.log_start_offset

    @property
    def dirty(self) -> bool:
        """Whether appended bytes are not yet fsynced."""
        return self.log.log_end_offset > self.log.flushed_offset

    def check_open(self) -> None:
        if self._closed_error is not None:
            raise self._closed_error

    def check_streaming(self) -> None:
        """For fetch streams: also fails once the node ends its streams (shutdown)."""
        if self._closed_error is not None:
            raise self._closed_error
        if self._stream_error is not None:
            raise self._stream_error

    def changed(self) -> asyncio.Event:
        """An event set at the next high-watermark move or close. Take it before checking the
        condition you wait for, then wait on it: no wake-up can fall in between."""
        return self._changed

    # -- leader append and commit --------------------------------------------------------

    def append_as_leader(self, batches: bytes) -> tuple[int, int]:
        """Append validated batches with one write; returns (base offset, last offset).

        The batches are not visible to consumers until :meth:`commit` moves the high
        watermark past them."""
        self.check_open()
        base, last = self.log.append(batches, SINGLE_NODE_TERM)
        if self.config.flush == "os":
            self.commit(last + 1)
        else:
            self._on_dirty(self)
        return base, last

    def commit(self, offset: int) -> None:
        """Move the high watermark to ``offset`` (never backwards) and wake who waits."""
        if offset <= self._hw:
            return
        self._hw = offset
        waiters = self._waiters
        while waiters and waiters[0][0] <= offset:
            _, fut = waiters.popleft()
            if not fut.done():
                fut.set_result(None)
        self._fire()

    def _fire(self) -> None:
        event = self._changed
        self._changed = asyncio.Event()
        event.set()

    async def wait_committed(self, end_offset: int, timeout_s: float) -> None:
        """Return once the high watermark reaches ``end_offset``; RequestTimedOut after
        ``timeout_s``. The batch stays in the log either way (as in Kafka)."""
        if self._hw >= end_offset:
            return
        self.check_open()
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((end_offset, fut))
        try:
            async with asyncio.timeout(timeout_s):
                await fut
        except TimeoutError:
            # Drop our entry now: a stuck disk must not let timed-out waiters pile up.
            try:
                self._waiters.remove((end_offset, fut))
            except ValueError:
                pass
            raise RequestTimedOut(
                f"{self.topic}/{self.index}: offset {end_offset - 1} was appended but not "
                f"committed within {timeout_s * 1000:.0f} ms; it may still become visible"
            ) from None

    # -- reads ---------------------------------------------------------------------------

    def check_fetch_offset(self, offset: int) -> None:
        start, hw = self.log.log_start_offset, self._hw
        if not start <= offset <= hw:
            raise OffsetOutOfRange(
                f"{self.topic}/{self.index}: offset {offset} is outside the log, "
                f"valid offsets are {start}..{hw} (log start offset..high watermark)",
                log_start_offset=str(start),
                high_watermark=str(hw),
            )

    def read(self, offset: int, max_bytes: int) -> bytes:
        """Whole committed batches from the one holding ``offset``; at least one batch."""
        self.check_open()
        self.check_fetch_offset(offset)
        return self.log.read(offset, max_bytes, upto=self._hw)

    def offset_for_timestamp(self, timestamp_ms: int) -> tuple[int, int]:
        """(offset, timestamp) of the first committed batch with a record at or after
        ``timestamp_ms``; (high watermark, -1) when there is none."""
        self.check_open()
        found = self.log.offset_for_timestamp(timestamp_ms)
        if found is None or found[0] >= self._hw:
            return self._hw, -1
        return found

    # -- configuration and lifecycle -----------------------------------------------------

    def update_config(self, config: TopicConfig) -> None:
        self.check_open()
        self.log.update_config(config)
        self.config = config
        if config.flush == "os":
            # What was waiting for an fsync is committed now.
            self.commit(self.log.log_end_offset)
        elif self.dirty:
            self._on_dirty(self)

    def fail(self, error: TidelogError) -> None:
        """Stop serving: every waiter and stream gets ``error`` (topic deleted, node stopping,
        disk failure). Idempotent; the first error wins."""
        if self._closed_error is not None:
            return
        self._closed_error = error
        while self._waiters:
            _, fut = self._waiters.popleft()
            if not fut.done():
                fut.set_exception(error)
        self._fire()

    def end_streams(self, error: TidelogError) -> None:
        """End fetch streams (they get ``error``) but keep accepting and committing appends:
        the first step of a drain, so produce requests still in flight can finish."""
        if self._stream_error is None:
            self._stream_error = error
            self._fire()

    def close_for_shutdown(self) -> None:
        self.fail(NodeUnavailable(f"{self.topic}/{self.index}: the node is shutting down"))

    def close_for_delete(self) -> None:
        self.fail(UnknownTopic(f"topic {self.topic!r} was deleted"))

    def fail_storage(self, exc: BaseException) -> None:
        log.error(
            "%s/%d: storage failure, partition taken offline: %s", self.topic, self.index, exc
        )
        self.fail(StorageError(f"{self.topic}/{self.index}: storage failure: {exc}"))

    @property
    def closed(self) -> bool:
        return self._closed_error is not None
