"""The asynchronous consumer: reads assigned partitions in order, from positions it controls.

Each assigned partition has one fetcher task that keeps a server-streaming Fetch RPC open at
the partition's leader and queues the raw batch bytes it pushes, up to
``queue_bytes_max_per_partition`` (beyond that the fetcher stops reading and gRPC flow
control holds the node back). :meth:`Consumer.poll` decodes queued bytes on demand with the
columnar decoder of :mod:`tidelog.records`, skipping the records of a batch that lie below
the position (a batch is never split, so the first one may start earlier).

When the leader moves or dies the fetcher reopens the stream at the next offset it needs;
nothing is skipped or read twice. It follows the leader by the policy the producer uses
too (:mod:`tidelog.client.retry`): a NOT_LEADER naming the new leader is used at once, and
otherwise the short backoff before reconnecting ends early as soon as the polled metadata
shows a new leader. A position outside the log surfaces
as :class:`~tidelog.errors.OffsetOutOfRange` naming the valid range, unless
``auto_offset_reset`` says to jump to the earliest or latest offset.

With a ``group_id`` the consumer may instead :meth:`Consumer.subscribe` and let the group's
coordinator assign its partitions; the membership (heartbeats, reconciliation, commits) lives
in :mod:`tidelog.client.group`, and the consumer only starts and stops the fetchers it asks for.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import repeat
from types import TracebackType
from typing import Any, Literal

import grpc
import grpc.aio

from tidelog.client.connection import Connection, PemSource
from tidelog.client.group import (
    AUTO_COMMIT_INTERVAL_MS_DEFAULT,
    MAX_POLL_INTERVAL_MS_DEFAULT,
    SESSION_TIMEOUT_MS_DEFAULT,
    Assignor,
    Membership,
    PartitionsCallback,
    RemoteCoordinator,
    validate_pattern,
)
from tidelog.client.limits import RETRY_BACKOFF_MS_DEFAULT
from tidelog.client.metadata import ClusterMetadata, parse_bootstrap
from tidelog.client.retry import Retry
from tidelog.client.structs import ConsumerRecord, TopicPartition
from tidelog.errors import (
    InvalidRecord,
    NodeUnavailable,
    OffsetOutOfRange,
    TidelogError,
    UnknownPartition,
    UnknownTopic,
    from_rpc_error,
)
from tidelog.records import Record, decode_batches
from tidelog.v1 import broker_pb2, broker_pb2_grpc

__all__ = ["Consumer", "FetchedBatch", "NoOffset", "OffsetReset"]

log = logging.getLogger(__name__)

_MIB = 1024 * 1024
#: Batch bytes per Fetch response (the node always sends at least one whole batch).
FETCH_BYTES_MAX_DEFAULT = 4 * _MIB
FETCH_MAX_WAIT_MS_DEFAULT = 500
#: After a follower could not serve a partition, read it from the leader this long.
FOLLOWER_RETRY_S = 30.0
#: Bytes of fetched, not yet polled batches held per partition before its fetcher pauses.
QUEUE_BYTES_MAX_PER_PARTITION_DEFAULT = 16 * _MIB
POLL_MAX_RECORDS_DEFAULT = 10_000
LIST_OFFSETS_TIMEOUT_MS = 10_000
#: Attempts of a ListOffsets call that meets NOT_LEADER / an unreachable node.
LIST_OFFSETS_ATTEMPTS_MAX = 20
#: How long a consumer waits for an assigned topic to show up in metadata.
METADATA_WAIT_MS_DEFAULT = 5_000

OffsetReset = Literal["earliest", "latest", "error"]
#: Turns a record's key or value bytes into what poll() returns (None stays None).
Deserializer = Callable[[bytes], Any]


class NoOffset(TidelogError):
    """A partition has no position and ``auto_offset_reset="error"`` forbids picking one."""

    reason = "NO_OFFSET"


@dataclass(frozen=True, slots=True)
class FetchedBatch:
    """Records of one partition from one poll, as decoded (:class:`tidelog.records.Record`),
    for callers that want throughput over per-record objects."""

    topic: str
    partition: int
    records: list[Record]
    #: The partition's high watermark when these records were fetched: lag = hw - position.
    high_watermark: int


@dataclass(slots=True)
class _Chunk:
    """One Fetch response's batches, decoded lazily."""

    buf: bytes
    #: The fetcher's position when it asked: records below it are skipped.
    min_offset: int
    next_offset: int
    high_watermark: int
    records: list[Record] | None = None
    cursor: int = 0


class _Fetcher:
    """The one task that streams one partition into its queue."""

    def __init__(self, consumer: Consumer, tp: TopicPartition, position: int | None) -> None:
        self.consumer = consumer
        self.tp = tp
        #: Next offset to ask the node for (ahead of the consumer's position by the queue).
        self.fetch_offset = position
        self.chunks: deque[_Chunk] = deque()
        self.queued_bytes = 0
        self.error: TidelogError | None = None
        self.high_watermark = -1
        #: Whether the current stream delivered anything (resets the reconnect backoff).
        self.progressed = False
        self.room = asyncio.Event()
        self.task = asyncio.get_running_loop().create_task(self._run(), name=f"fetch {tp}")

    def cancel(self) -> None:
        self.task.cancel()

    def take(self, chunk: _Chunk) -> None:
        self.queued_bytes -= len(chunk.buf)
        if self.queued_bytes < self.consumer._queue_bytes_max:
            self.room.set()

    async def _run(self) -> None:
        c = self.consumer
        tp = self.tp
        meta = c._meta_()
        retry = Retry(meta, tp, c._retry_backoff_ms)
        try:
            while True:
                await retry.wait()
                self.progressed = False
                address: str | None = None
                follower = False
                try:
                    if self.fetch_offset is None:
                        reset = await c._reset_offset(tp, None)
                        # position() may have resolved it meanwhile: one answer wins.
                        self.fetch_offset = c._positions.setdefault(tp, reset)
                    address, follower = await c._fetch_target(tp)
                    await self._stream(meta.broker(address), follower)
                    # The node ended the stream without an error (it is shutting down, say):
                    # reopen, at once if it delivered something, else after a pause.
                    if self.progressed:
                        retry.succeeded()
                    else:
                        retry.pause()
                    continue
                except grpc.aio.AioRpcError as exc:
                    err = from_rpc_error(exc)
                except TidelogError as exc:
                    err = exc
                if self.progressed:
                    retry.succeeded()  # the stream worked for a while: this is a fresh failure
                if follower:
                    # The rack-local follower could not serve (it lost its leader, is
                    # recovering, or went away): read from the leader for a while.
                    c._follower_failed(tp)
                    if err.retriable or isinstance(err, OffsetOutOfRange):
                        log.debug("follower fetch of %s: %s; using the leader", tp, err)
                        continue
                if isinstance(err, OffsetOutOfRange) and c._reset != "error":
                    self.fetch_offset = await c._reset_offset(tp, err)
                    self._restart_at(self.fetch_offset)
                    continue
                if not err.retriable:
                    raise err
                if isinstance(err, UnknownTopic):
                    await c._refresh_quietly()
                    if meta.topic(tp.topic) is None:
                        raise err
                log.debug("fetch %s: %s; retrying", tp, err)
                retry.failed(address, err)
        except asyncio.CancelledError:
            raise
        except TidelogError as err:
            self.error = err
            c._data.set()
        except Exception as exc:  # a bug or an unexpected transport failure: surface it
            self.error = TidelogError(f"fetching {tp} failed: {exc!r}")
            log.exception("fetcher for %s failed", tp)
            c._data.set()

    def _restart_at(self, offset: int) -> None:
        """An automatic reset moved the position: what is queued is from before it."""
        self.chunks.clear()
        self.queued_bytes = 0
        self.consumer._positions[self.tp] = offset

    async def _stream(self, stub: broker_pb2_grpc.BrokerAsyncStub, follower: bool) -> None:
        c = self.consumer
        assert self.fetch_offset is not None
        request = broker_pb2.FetchRequest(
            topic=self.tp.topic,
            partition=self.tp.partition,
            offset=self.fetch_offset,
            max_bytes=c._max_bytes,
            max_wait_ms=c._fetch_max_wait_ms,
            allow_follower=follower,
        )
        call = stub.Fetch(request)
        try:
            async for resp in call:
                self.progressed = True
                self.high_watermark = resp.high_watermark
                if resp.batches:
                    chunk = _Chunk(
                        resp.batches, self.fetch_offset, resp.next_offset, resp.high_watermark
                    )
                    self.chunks.append(chunk)
                    self.queued_bytes += len(resp.batches)
                    c._data.set()
                if resp.next_offset > self.fetch_offset:
                    self.fetch_offset = resp.next_offset
                while self.queued_bytes >= c._queue_bytes_max:
                    self.room.clear()
                    await self.room.wait()
        finally:
            call.cancel()


class Consumer:
    """``async with Consumer("127.0.0.1:9092") as c: c.assign([TopicPartition("t", 0)])``.

    Without a position (no seek), a partition starts at ``auto_offset_reset``: "latest" by
    default as in Kafka; "earliest"; or "error" to insist on an explicit seek. When a
    position falls outside the log, "earliest"/"latest" jump there and the default raises
    OffsetOutOfRange (Kafka's "none"), since silently skipping data a caller sought is worse.

    **Follower fetching** (Kafka's KIP-392): with ``client_rack`` set, a partition is read
    from an in-sync replica in that rack (a node started with ``--rack``) when the leader is
    elsewhere, which saves cross-rack traffic. A follower serves only what it knows is
    committed, so its records arrive a little later than the leader's and the high
    watermark it reports (lag, ``until_end``) may trail the leader's. When it cannot serve
    (it lost its leader, is recovering, or is gone) the partition is read from the leader
    for FOLLOWER_RETRY_S before the follower is tried again.
    """

    def __init__(
        self,
        bootstrap: str | Sequence[str],
        *,
        max_bytes: int = FETCH_BYTES_MAX_DEFAULT,
        fetch_max_wait_ms: int = FETCH_MAX_WAIT_MS_DEFAULT,
        auto_offset_reset: OffsetReset | None = None,
        queue_bytes_max_per_partition: int = QUEUE_BYTES_MAX_PER_PARTITION_DEFAULT,
        retry_backoff_ms: int = RETRY_BACKOFF_MS_DEFAULT,
        metadata_wait_ms: int = METADATA_WAIT_MS_DEFAULT,
        verify_crc: bool = True,
        key_deserializer: Deserializer | None = None,
        value_deserializer: Deserializer | None = None,
        tls: bool = False,
        ca: PemSource | None = None,
        client_cert: PemSource | None = None,
        client_key: PemSource | None = None,
        token: str | None = None,
        client_rack: str | None = None,
        group_id: str | None = None,
        group_instance_id: str | None = None,
        enable_auto_commit: bool = True,
        auto_commit_interval_ms: int = AUTO_COMMIT_INTERVAL_MS_DEFAULT,
        session_timeout_ms: int = SESSION_TIMEOUT_MS_DEFAULT,
        max_poll_interval_ms: int = MAX_POLL_INTERVAL_MS_DEFAULT,
        assignor: Assignor = "uniform",
    ) -> None:
        if auto_offset_reset not in (None, "earliest", "latest", "error"):
            raise ValueError(
                f"auto_offset_reset={auto_offset_reset!r} is not 'earliest', 'latest' or 'error'"
            )
        if max_bytes <= 0 or fetch_max_wait_ms < 0 or queue_bytes_max_per_partition <= 0:
            raise ValueError("max_bytes and queue bytes must be > 0, fetch_max_wait_ms >= 0")
        self._bootstrap = parse_bootstrap(bootstrap)
        self._connection = Connection.create(
            tls=tls, ca=ca, client_cert=client_cert, client_key=client_key, token=token
        )
        self._max_bytes = max_bytes
        self._fetch_max_wait_ms = fetch_max_wait_ms
        self._initial: OffsetReset = auto_offset_reset or "latest"
        self._reset: OffsetReset = auto_offset_reset or "error"
        self._queue_bytes_max = queue_bytes_max_per_partition
        self._retry_backoff_ms = retry_backoff_ms
        self._metadata_wait_ms = metadata_wait_ms
        self._verify_crc = verify_crc
        self._key_deserializer = key_deserializer
        self._value_deserializer = value_deserializer
        self._meta: ClusterMetadata | None = None
        self._assignment: list[TopicPartition] = []
        self._positions: dict[TopicPartition, int] = {}
        self._fetchers: dict[TopicPartition, _Fetcher] = {}
        self._data = asyncio.Event()
        self._rr = 0
        self._iter_buffer: deque[ConsumerRecord] = deque()
        #: High watermarks looked up by poll(until_end=True) before a fetch reported one.
        self._ends: dict[TopicPartition, int] = {}
        self._client_rack = client_rack or None
        #: Partitions whose follower failed, read from the leader until this monotonic time.
        self._leader_only_until: dict[TopicPartition, float] = {}
        self._paused: set[TopicPartition] = set()
        if group_instance_id is not None and group_id is None:
            raise ValueError("group_instance_id needs a group_id")
        self._group_id = group_id
        self._group_options: dict[str, Any] = {
            "group_instance_id": group_instance_id,
            "session_timeout_ms": session_timeout_ms,
            "max_poll_interval_ms": max_poll_interval_ms,
            "assignor": assignor,
            "enable_auto_commit": enable_auto_commit,
            "auto_commit_interval_ms": auto_commit_interval_ms,
            "retry_backoff_ms": retry_backoff_ms,
            "rack_id": self._client_rack,
        }
        #: The group membership once subscribe() was called (None: manual assignment).
        self._membership: Membership | None = None
        self._subscription: tuple[tuple[str, ...], str | None, dict[str, Any]] | None = None
        if group_id is not None:
            # Validate the options now, not at the first subscribe.
            Membership(_NoCoordinator(), self, group_id=group_id, **self._group_options)

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect and load metadata; fails if no bootstrap node answers."""
        if self._meta is not None:
            return
        self._meta = ClusterMetadata(self._bootstrap, connection=self._connection)
        try:
            await self._meta.refresh()
        except BaseException:
            await self._meta.close()
            self._meta = None
            raise
        for tp in self._assignment:
            self._start_fetcher(tp)
        if self._subscription is not None:
            self._join()

    async def stop(self) -> None:
        """Close the consumer. A group member first gives up its partitions (on_revoked, a
        last auto-commit) and leaves the group (a static member: for the session timeout)."""
        if self._meta is None:
            return
        membership, self._membership = self._membership, None
        if membership is not None:
            await membership.close()
        fetchers = list(self._fetchers.values())
        self._fetchers.clear()
        for f in fetchers:
            f.cancel()
        await asyncio.gather(*(f.task for f in fetchers), return_exceptions=True)
        await self._meta.close()
        self._meta = None

    close = stop

    async def __aenter__(self) -> Consumer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def _meta_(self) -> ClusterMetadata:
        if self._meta is None:
            raise TidelogError("the consumer is not started: use `async with` or await start()")
        return self._meta

    # -- assignment and positions ---------------------------------------------------------------

    def assign(self, partitions: Iterable[TopicPartition]) -> None:
        """Read exactly these partitions (replacing any earlier assignment)."""
        if self._subscription is not None:
            raise TidelogError(
                "this consumer subscribed to a group: its group assigns its partitions "
                "(use another Consumer for manual assignment)"
            )
        wanted = list(dict.fromkeys(TopicPartition(*tp) for tp in partitions))
        for tp in list(self._fetchers):
            if tp not in wanted:
                self._fetchers.pop(tp).cancel()
        for tp in list(self._positions):
            if tp not in wanted:
                del self._positions[tp]
        for tp in list(self._ends):
            if tp not in wanted:
                del self._ends[tp]
        self._paused.intersection_update(wanted)
        self._assignment = wanted
        if self._meta is not None:
            for tp in wanted:
                if tp not in self._fetchers:
                    self._start_fetcher(tp)

    # -- consumer groups ------------------------------------------------------------------------

    def subscribe(
        self,
        topics: str | Iterable[str] = (),
        *,
        pattern: str | None = None,
        on_assigned: PartitionsCallback | None = None,
        on_revoked: PartitionsCallback | None = None,
        on_lost: PartitionsCallback | None = None,
    ) -> None:
        """Join the consumer's group (``group_id``) for ``topics``, or for every topic whose
        name matches ``pattern`` (Python ``re``, full match; topics created later join in).

        The coordinator assigns the partitions. ``on_revoked(partitions)`` runs (inside poll)
        before partitions go to another member, after fetching them stopped and before their
        positions are auto-committed; ``on_assigned(partitions)`` after new ones start, with
        ``[]`` once when the first assignment is empty; ``on_lost(partitions)`` when the
        member was fenced and its partitions are already someone else's (default:
        on_revoked). Each may be a function or a coroutine function. Calling subscribe again
        changes the subscription."""
        if self._group_id is None:
            raise TidelogError("subscribe() needs a consumer created with group_id=...")
        if self._assignment and self._subscription is None:
            raise TidelogError(
                "this consumer has partitions assigned by hand: assign([]) first, or use "
                "another Consumer for the group"
            )
        names = (topics,) if isinstance(topics, str) else tuple(topics)
        if pattern is not None:
            if names:
                raise ValueError("subscribe to topics or to a pattern, not both")
            validate_pattern(pattern)
        elif not names:
            raise ValueError("subscribe to at least one topic, or to a pattern")
        callbacks = {"on_assigned": on_assigned, "on_revoked": on_revoked, "on_lost": on_lost}
        self._subscription = (names, pattern, callbacks)
        if self._membership is not None:
            self._membership.subscribe(names, pattern=pattern, **callbacks)
        elif self._meta is not None:
            self._join()

    def _join(self) -> None:
        assert self._subscription is not None and self._group_id is not None
        names, pattern, callbacks = self._subscription
        membership = Membership(
            RemoteCoordinator(self._meta_(), self._group_id, self._retry_backoff_ms),
            self,
            group_id=self._group_id,
            **self._group_options,
        )
        membership.subscribe(names, pattern=pattern, **callbacks)
        self._membership = membership
        membership.start()

    def subscription(self) -> list[str] | str | None:
        """The topics subscribed to, the pattern, or None (manual assignment)."""
        if self._subscription is None:
            return None
        names, pattern, _ = self._subscription
        return pattern if pattern is not None else list(names)

    async def unsubscribe(self) -> None:
        """Leave the group (on_revoked, a last auto-commit first) and read nothing."""
        membership, self._membership = self._membership, None
        self._subscription = None
        if membership is not None:
            await membership.close()

    @property
    def member_id(self) -> str:
        """The id the coordinator gave this member ("" before it joined)."""
        return "" if self._membership is None else self._membership.member_id

    @property
    def has_assignment(self) -> bool:
        """A group member: whether the group's first assignment arrived since it joined
        (possibly an empty one), as opposed to "not assigned yet". Manual: always True."""
        if self._subscription is None:
            return True
        return self._membership is not None and self._membership.assigned

    @property
    def member_epoch(self) -> int:
        return 0 if self._membership is None else self._membership.epoch

    def _group(self) -> Membership:
        if self._membership is None:
            if self._group_id is None:
                raise TidelogError("this consumer has no group_id: commits need a group")
            raise TidelogError("this consumer has not joined its group: subscribe() and start")
        return self._membership

    def commit_async(
        self, offsets: Mapping[TopicPartition, int] | None = None
    ) -> asyncio.Task[None]:
        """Start a commit (see :meth:`commit`) and return its task, without waiting. A
        partition this member does not own fails the task at once with PartitionRevoked."""
        membership = self._group()
        chosen = self._commit_offsets(membership, offsets)
        return asyncio.get_running_loop().create_task(membership.commit(chosen))

    async def commit(
        self, offsets: Mapping[TopicPartition, int] | None = None, *, wait: bool = True
    ) -> None:
        """Commit the group's offsets: ``offsets`` (partition -> the next offset to read), or
        the position of every owned partition (what poll returned so far). Waits for the
        coordinator's answer unless ``wait=False`` (then it runs on in the background, a
        failure logged: :meth:`commit_async` returns its task instead). A partition this member
        does not own (any more) fails at once with
        :class:`~tidelog.client.errors.PartitionRevoked`."""
        task = self.commit_async(offsets)
        if wait:
            await task
        else:
            task.add_done_callback(_log_commit_failure)

    def _commit_offsets(
        self, membership: Membership, offsets: Mapping[TopicPartition, int] | None
    ) -> dict[TopicPartition, int]:
        if offsets is not None:
            return {TopicPartition(*tp): int(o) for tp, o in offsets.items()}
        return self.group_positions(membership.owned)

    async def committed(
        self, partitions: Iterable[TopicPartition] | None = None
    ) -> dict[TopicPartition, int | None]:
        """The group's committed offset of each partition (default: the owned ones); None
        where nothing was committed."""
        membership = self._group()
        tps = (
            [TopicPartition(*tp) for tp in partitions]
            if partitions is not None
            else sorted(membership.owned)
        )
        got = await membership.fetch_committed(tps)
        return {tp: got.get(tp) for tp in tps}

    async def lag(self) -> dict[TopicPartition, int]:
        """Per assigned partition, the records between the position and the high watermark
        (the fetcher's last, else looked up)."""
        tps = list(self._assignment)
        positions = {tp: await self.position(tp) for tp in tps}
        unknown = [tp for tp in tps if self.high_watermark(tp) < 0]
        ends = await self.end_offsets(unknown) if unknown else {}
        out: dict[TopicPartition, int] = {}
        for tp in tps:
            hw = max(self.high_watermark(tp), ends.get(tp, -1), self._ends.get(tp, -1))
            out[tp] = max(0, hw - positions[tp])
        return out

    # -- pause / resume -------------------------------------------------------------------------

    def pause(self, *partitions: TopicPartition) -> None:
        """Return no records of these partitions until resume() (the fetch keeps its place;
        a group member keeps them and keeps heartbeating)."""
        for tp in partitions:
            self._paused.add(self._check_assigned(tp))

    def resume(self, *partitions: TopicPartition) -> None:
        for tp in partitions:
            self._paused.discard(TopicPartition(*tp))
        self._data.set()

    def paused(self) -> list[TopicPartition]:
        return sorted(self._paused)

    # -- MemberHost (tidelog.client.group) ------------------------------------------------------

    def group_take(self, starts: Mapping[TopicPartition, int | None]) -> None:
        for tp, offset in starts.items():
            if offset is None:
                self._positions.pop(tp, None)
            else:
                self._positions[tp] = offset
            if tp not in self._assignment:
                self._assignment.append(tp)
            if self._meta is not None:
                self._start_fetcher(tp)
        self._data.set()

    def group_stop(self, tps: Sequence[TopicPartition]) -> None:
        gone = set(tps)
        for tp in gone:
            f = self._fetchers.pop(tp, None)
            if f is not None:
                f.cancel()
        self._assignment = [tp for tp in self._assignment if tp not in gone]

    def group_drop(self, tps: Sequence[TopicPartition]) -> None:
        self.group_stop(tps)
        for tp in tps:
            self._positions.pop(tp, None)
            self._ends.pop(tp, None)
            self._paused.discard(tp)

    def group_positions(self, tps: Iterable[TopicPartition]) -> dict[TopicPartition, int]:
        return {tp: self._positions[tp] for tp in tps if tp in self._positions}

    def group_wake(self) -> None:
        self._data.set()

    def assignment(self) -> list[TopicPartition]:
        return list(self._assignment)

    def _start_fetcher(self, tp: TopicPartition) -> None:
        old = self._fetchers.pop(tp, None)
        if old is not None:
            old.cancel()
        self._fetchers[tp] = _Fetcher(self, tp, self._positions.get(tp))

    def _check_assigned(self, tp: TopicPartition) -> TopicPartition:
        tp = TopicPartition(*tp)
        if tp not in self._assignment:
            raise TidelogError(f"partition {tp} is not assigned to this consumer: assign() it")
        return tp

    def seek(self, tp: TopicPartition, offset: int) -> None:
        """Read ``tp`` from ``offset`` on, dropping anything fetched but not yet polled."""
        tp = self._check_assigned(tp)
        if offset < 0:
            raise ValueError(f"offset {offset} is negative")
        self._positions[tp] = offset
        if self._meta is not None:
            self._start_fetcher(tp)

    async def seek_to_beginning(self, *partitions: TopicPartition) -> dict[TopicPartition, int]:
        """Move to the earliest offset still in the log; returns the new positions."""
        return await self._seek_spec(partitions, broker_pb2.OFFSET_SPEC_EARLIEST, 0)

    async def seek_to_end(self, *partitions: TopicPartition) -> dict[TopicPartition, int]:
        """Move past the last committed record: only records produced from now on arrive."""
        return await self._seek_spec(partitions, broker_pb2.OFFSET_SPEC_LATEST, 0)

    async def seek_to_time(
        self, timestamp_ms: int, *partitions: TopicPartition
    ) -> dict[TopicPartition, int]:
        """Move to the first record with a timestamp >= ``timestamp_ms`` (or to the end)."""
        return await self._seek_spec(partitions, broker_pb2.OFFSET_SPEC_TIMESTAMP, timestamp_ms)

    async def _seek_spec(
        self,
        partitions: Sequence[TopicPartition],
        spec: broker_pb2.OffsetSpec.ValueType,
        timestamp_ms: int,
    ) -> dict[TopicPartition, int]:
        tps = [self._check_assigned(tp) for tp in partitions] or list(self._assignment)
        found = await asyncio.gather(*(self._list_offset(tp, spec, timestamp_ms) for tp in tps))
        out: dict[TopicPartition, int] = {}
        for tp, resp in zip(tps, found, strict=True):
            self.seek(tp, resp.offset)
            out[tp] = resp.offset
        return out

    async def position(self, tp: TopicPartition) -> int:
        """The offset of the next record poll() returns for ``tp``."""
        tp = self._check_assigned(tp)
        pos = self._positions.get(tp)
        if pos is None:
            pos = await self._reset_offset(tp, None)
            if tp not in self._positions:
                self._positions[tp] = pos
            pos = self._positions[tp]
        return pos

    async def beginning_offsets(
        self, partitions: Iterable[TopicPartition]
    ) -> dict[TopicPartition, int]:
        tps = [TopicPartition(*tp) for tp in partitions]
        got = await asyncio.gather(
            *(self._list_offset(tp, broker_pb2.OFFSET_SPEC_EARLIEST, 0) for tp in tps)
        )
        return {tp: r.offset for tp, r in zip(tps, got, strict=True)}

    async def end_offsets(
        self, partitions: Iterable[TopicPartition], *, linearizable: bool = False
    ) -> dict[TopicPartition, int]:
        """The high watermark of each partition: one past its last committed record.
        ``linearizable``: the leader first confirms with a majority that it still leads, so
        the answer covers every record acknowledged before the call (one more round trip;
        without it a deposed leader may answer from a stale view, docs/operations.md)."""
        tps = [TopicPartition(*tp) for tp in partitions]
        got = await asyncio.gather(
            *(
                self._list_offset(tp, broker_pb2.OFFSET_SPEC_LATEST, 0, linearizable=linearizable)
                for tp in tps
            )
        )
        return {tp: r.offset for tp, r in zip(tps, got, strict=True)}

    async def partitions_for(self, topic: str) -> list[TopicPartition]:
        """Every partition of ``topic`` (raises UnknownTopic when it does not exist)."""
        info = await self._meta_().wait_for_topic(topic, wait_ms=self._metadata_wait_ms)
        return [TopicPartition(topic, p.partition) for p in info.partitions]

    # -- polling --------------------------------------------------------------------------------

    async def poll(
        self,
        timeout_ms: float = 1000,
        max_records: int = POLL_MAX_RECORDS_DEFAULT,
        *,
        until_end: bool = False,
    ) -> list[ConsumerRecord]:
        """Up to ``max_records`` records, waiting up to ``timeout_ms`` for the first.

        ``until_end``: do not wait for records that are not written yet: when every assigned
        partition is at its end (:meth:`at_end`), return ``[]`` at once. ``while records :=
        await c.poll(until_end=True)`` reads what the partitions hold and stops; an empty
        answer before ``timeout_ms`` means the end, and :meth:`at_end` tells it apart from a
        timeout. An empty partition is at its end at once."""
        out: list[ConsumerRecord] = []
        for fb in await self.poll_batches(timeout_ms, max_records, until_end=until_end):
            topic, part = fb.topic, fb.partition
            n = len(fb.records)
            out += map(
                _consumer_record,
                repeat(topic, n),
                repeat(part, n),
                fb.records,
            )
        if self._key_deserializer is not None or self._value_deserializer is not None:
            out = [self._deserialize(r) for r in out]
        return out

    def _deserialize(self, r: ConsumerRecord) -> ConsumerRecord:
        key, value = r.key, r.value
        try:
            if key is not None and self._key_deserializer is not None:
                key = self._key_deserializer(key)
            if value is not None and self._value_deserializer is not None:
                value = self._value_deserializer(value)
        except Exception as exc:
            raise InvalidRecord(
                f"a deserializer raised {type(exc).__name__}: {exc} for the record at "
                f"{r.topic}/{r.partition} offset {r.offset}; the poll's records count as "
                f"read: seek(TopicPartition({r.topic!r}, {r.partition}), {r.offset}) to "
                "read them again"
            ) from exc
        return r._replace(key=key, value=value)

    async def poll_batches(
        self,
        timeout_ms: float = 1000,
        max_records: int = POLL_MAX_RECORDS_DEFAULT,
        *,
        until_end: bool = False,
    ) -> list[FetchedBatch]:
        """Like :meth:`poll`, without building a ConsumerRecord per record."""
        self._meta_()
        membership = self._membership
        if membership is None:
            return await self._poll_batches(timeout_ms, max_records, until_end=until_end)
        membership.poll_started()
        try:
            return await self._poll_batches(timeout_ms, max_records, until_end=until_end)
        finally:
            membership.poll_ended()

    async def _poll_batches(
        self, timeout_ms: float, max_records: int, *, until_end: bool
    ) -> list[FetchedBatch]:
        deadline = time.monotonic() + timeout_ms / 1000
        membership = self._membership
        if membership is not None:
            membership.auto_commit_due()
        if until_end:
            await self._learn_ends()
        while True:
            self._data.clear()
            if membership is not None:
                membership.check()
                if membership.pending:
                    await membership.reconcile()
                    if until_end:
                        await self._learn_ends()
            got = self._collect(max_records)
            if got:
                return got
            if until_end and self.at_end():
                return []
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return []
            try:
                await asyncio.wait_for(self._data.wait(), remaining)
            except TimeoutError:
                return []

    def _collect(self, max_records: int) -> list[FetchedBatch]:
        out: list[FetchedBatch] = []
        budget = max_records
        tps = self._assignment
        if not tps:
            return out
        start = self._rr % len(tps)
        self._rr += 1
        for tp in tps[start:] + tps[:start]:
            f = self._fetchers.get(tp)
            if f is None or tp in self._paused:
                continue
            if f.error is not None and not f.chunks:
                err, f.error = f.error, None
                # A failed partition stays stopped until the caller seeks (or reassigns).
                raise err
            while f.chunks and budget > 0:
                chunk = f.chunks[0]
                if chunk.records is None:
                    try:
                        chunk.records = decode_batches(
                            chunk.buf, min_offset=chunk.min_offset, verify_crc=self._verify_crc
                        )
                    except TidelogError:
                        f.chunks.popleft()
                        f.take(chunk)
                        raise
                recs = chunk.records
                if chunk.cursor == 0 and len(recs) <= budget:
                    take = recs  # the common case: the whole chunk, no copy
                else:
                    take = recs[chunk.cursor : chunk.cursor + budget]
                chunk.cursor += len(take)
                if chunk.cursor >= len(recs):
                    f.chunks.popleft()
                    f.take(chunk)
                    self._positions[tp] = max(chunk.next_offset, self._positions.get(tp, 0))
                    if take:
                        self._positions[tp] = max(self._positions[tp], take[-1].offset + 1)
                else:
                    self._positions[tp] = take[-1].offset + 1
                if take:
                    budget -= len(take)
                    out.append(FetchedBatch(tp.topic, tp.partition, take, chunk.high_watermark))
            if budget <= 0:
                break
        return out

    def at_end(self, *partitions: TopicPartition) -> bool:
        """Whether each of ``partitions`` (default: every assigned one) is at its end: the
        position has reached the high watermark last seen (from the fetch stream, or looked
        up by ``poll(until_end=True)``) and nothing fetched is left to poll. New records
        make a partition not at its end again."""
        tps = [TopicPartition(*tp) for tp in partitions] or self._assignment
        for tp in tps:
            pos = self._positions.get(tp)
            f = self._fetchers.get(tp)
            if pos is None or f is None or f.chunks:
                return False
            hw = max(f.high_watermark, self._ends.get(tp, -1))
            if hw < 0 or pos < hw:
                return False
        return True

    async def _learn_ends(self) -> None:
        """Resolve every assigned partition's position, and look up the end of those whose
        fetch stream has not reported a high watermark yet."""
        tps = list(self._assignment)
        await asyncio.gather(*(self.position(tp) for tp in tps))
        unknown = [
            tp
            for tp in tps
            if tp not in self._ends
            and (tp not in self._fetchers or self._fetchers[tp].high_watermark < 0)
        ]
        if unknown:
            self._ends.update(await self.end_offsets(unknown))

    def __aiter__(self) -> AsyncIterator[ConsumerRecord]:
        return self

    async def __anext__(self) -> ConsumerRecord:
        while not self._iter_buffer:
            self._iter_buffer.extend(await self.poll(timeout_ms=1000))
        return self._iter_buffer.popleft()

    def high_watermark(self, tp: TopicPartition) -> int:
        """The last high watermark the fetcher saw for ``tp`` (-1 before the first answer)."""
        f = self._fetchers.get(TopicPartition(*tp))
        return -1 if f is None else f.high_watermark

    # -- internals ------------------------------------------------------------------------------

    async def _fetch_target(self, tp: TopicPartition) -> tuple[str, bool]:
        """Where to fetch ``tp`` from, and whether that is a follower (client_rack)."""
        leader = await self._leader(tp)
        rack = self._client_rack
        if rack is None or time.monotonic() < self._leader_only_until.get(tp, 0.0):
            return leader, False
        meta = self._meta_()
        info = meta.topic(tp.topic)
        if info is None or not 0 <= tp.partition < info.partition_count:
            return leader, False
        part = info.partitions[tp.partition]
        lead = meta.nodes.get(part.leader)
        if lead is not None and lead.rack == rack:
            return leader, False
        for node_id in part.in_sync:
            node = meta.nodes.get(node_id)
            if node_id != part.leader and node is not None and node.alive and node.rack == rack:
                return node.address, True
        return leader, False

    def _follower_failed(self, tp: TopicPartition) -> None:
        self._leader_only_until[tp] = time.monotonic() + FOLLOWER_RETRY_S

    async def _leader(self, tp: TopicPartition) -> str:
        meta = self._meta_()
        info = await meta.wait_for_topic(tp.topic, wait_ms=self._metadata_wait_ms)
        if not 0 <= tp.partition < info.partition_count:
            raise UnknownPartition(
                f"topic {tp.topic!r} has partitions 0..{info.partition_count - 1}; "
                f"there is no partition {tp.partition}",
                topic=tp.topic,
            )
        address = meta.leader_address(tp.topic, tp.partition)
        if address is None:
            await meta.refresh(force=False)
            address = meta.leader_address(tp.topic, tp.partition)
            if address is None:
                raise NodeUnavailable(f"partition {tp} has no leader right now")
        return address

    async def _refresh_quietly(self) -> None:
        try:
            await self._meta_().refresh(force=False)
        except TidelogError as err:
            log.debug("metadata refresh failed: %s", err)

    async def _list_offset(
        self,
        tp: TopicPartition,
        spec: broker_pb2.OffsetSpec.ValueType,
        timestamp_ms: int,
        *,
        linearizable: bool = False,
    ) -> broker_pb2.ListOffsetsResponse:
        meta = self._meta_()
        request = broker_pb2.ListOffsetsRequest(
            topic=tp.topic,
            partition=tp.partition,
            spec=spec,
            timestamp_ms=timestamp_ms,
            linearizable=linearizable,
        )
        retry = Retry(meta, tp, self._retry_backoff_ms)
        for attempt in range(LIST_OFFSETS_ATTEMPTS_MAX):
            await retry.wait()
            address: str | None = None
            try:
                address = await self._leader(tp)
                resp: broker_pb2.ListOffsetsResponse = await meta.broker(address).ListOffsets(
                    request, timeout=LIST_OFFSETS_TIMEOUT_MS / 1000
                )
                return resp
            except grpc.aio.AioRpcError as exc:
                err = from_rpc_error(exc)
            except NodeUnavailable as exc:
                err = exc
            if not err.retriable or attempt == LIST_OFFSETS_ATTEMPTS_MAX - 1:
                raise err
            retry.failed(address, err)
        raise AssertionError("unreachable")

    async def _reset_offset(self, tp: TopicPartition, cause: OffsetOutOfRange | None) -> int:
        """Where a partition without a usable position starts, by the reset policy."""
        policy = self._initial if cause is None else self._reset
        if policy == "error":
            if cause is not None:
                raise cause
            raise NoOffset(
                f"partition {tp} has no position: seek() it first, or create the consumer "
                "with auto_offset_reset='earliest' or 'latest'"
            )
        spec = (
            broker_pb2.OFFSET_SPEC_EARLIEST
            if policy == "earliest"
            else (broker_pb2.OFFSET_SPEC_LATEST)
        )
        resp = await self._list_offset(tp, spec, 0)
        if cause is not None:
            log.warning("%s; resetting %s to its %s offset %d", cause, tp, policy, resp.offset)
        return resp.offset


def _consumer_record(topic: str, partition: int, r: Record) -> ConsumerRecord:
    return ConsumerRecord(topic, partition, r.offset, r.timestamp_ms, r.key, r.value, r.headers)


def _log_commit_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.warning("commit failed: %s", exc)


class _NoCoordinator:
    """Stands in for the coordinator while Consumer.__init__ validates the group options."""

    async def heartbeat(self, request: Any, timeout_ms: float) -> Any:
        raise AssertionError("not a coordinator")

    async def commit(self, request: Any, timeout_ms: float) -> None:
        raise AssertionError("not a coordinator")

    async def fetch(self, request: Any, timeout_ms: float) -> Any:
        raise AssertionError("not a coordinator")
