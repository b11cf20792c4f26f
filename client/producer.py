"""The asynchronous producer: batches records per partition and sends them to the leaders.

Shape (after aiokafka and the Java client): :meth:`Producer.send` appends a record to the
:class:`~tidelog.client.accumulator.Accumulator` and returns at once with a cheap
:class:`RecordFuture`; one sender task per leader node drains the batches that are full or
whose ``linger_ms`` ran out, with up to ``max_in_flight_per_partition`` Produce requests per
partition. A batch that fails with a retriable error (the leader moved, the node is down, a
timeout) goes back to the front of its partition's queue once the requests sent before it
have answered, so a partition's batches are resent in their original order. Other errors
fail the batch's records.

Retries after a leader error (NOT_LEADER, LEADER_NOT_AVAILABLE, unreachable node, timeout)
follow the leader rather than the clock: a NOT_LEADER that names the new leader sends the
retry there at once; otherwise the retry waits a short doubling backoff (from
``retry_backoff_ms``, capped at LEADER_RETRY_BACKOFF_MAX_MS) during which the partition's
metadata is re-read every few tens of milliseconds, and goes to the new leader the moment
one shows up. So writes resume within about LEADER_POLL_INTERVAL_MS of the cluster electing
a new leader, while a dead leader is retried at most a few times a second.

A partition's requests in flight all go to one node. When the leader moves while some are
still unanswered at the old one, newer batches wait for those answers instead of going to
the new leader at once: the old node refuses them later (NOT_LEADER), and a newer batch
acknowledged by the new leader meanwhile would sit ahead of their retries in the log. A
node that holds requests without answering (paused, or black-holed) would then pin the
partition until the request timeout, so a request unanswered for LEADER_CHECK_AFTER_MS
starts watching the metadata, and once another node leads the partition the requests at
the silent one are abandoned and resent there, in order. The old node cannot commit what
it held: the new leader's election needed a majority that no longer follows it.

Records that cannot be appended yet (the topic's metadata is not known, or the buffer holds
``buffer_bytes_max``) wait in a FIFO per topic and are admitted in order as soon as possible;
that FIFO is bounded too (:class:`BufferFull` beyond it), so an event loop that never yields
cannot grow the producer without limit.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import time
from collections import deque
from collections.abc import Coroutine, Generator, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal, cast

import grpc
import grpc.aio

from tidelog.client.accumulator import (
    Accumulator,
    PendingBatch,
    cumulative_sizes,
    record_size,
)
from tidelog.client.connection import Connection, PemSource
from tidelog.client.metadata import (
    LEADER_POLL_INTERVAL_MS,
    ClusterMetadata,
    TopicInfo,
    parse_bootstrap,
)
from tidelog.client.partitioner import StickyPartitioner, partition_for_key
from tidelog.client.structs import BatchMetadata, Header, RecordMetadata, TopicPartition
from tidelog.errors import (
    LeaderNotAvailable,
    NodeUnavailable,
    NotLeader,
    RequestTimedOut,
    TidelogError,
    UnknownPartition,
    UnknownTopic,
    from_rpc_error,
)
from tidelog.records import Codec
from tidelog.v1 import broker_pb2

__all__ = [
    "BatchesFuture",
    "BufferFull",
    "Producer",
    "RecordFuture",
]

log = logging.getLogger(__name__)

_MIB = 1024 * 1024

LINGER_MS_DEFAULT = 5
BATCH_BYTES_MAX_DEFAULT = 1 * _MIB
#: A batch is one Produce request; the node refuses requests above 64 MiB.
BATCH_BYTES_LIMIT = 64 * _MIB
MAX_IN_FLIGHT_PER_PARTITION_DEFAULT = 8
BUFFER_BYTES_MAX_DEFAULT = 64 * _MIB
RETRIES_DEFAULT = 2**31 - 1
RETRY_BACKOFF_MS_DEFAULT = 100
#: Cap of the doubling backoff after errors that leave the leader in place (not enough
#: replicas): the cluster needs time, and asking more often does not give it any.
RETRY_BACKOFF_MAX_MS = 1_000
#: Cap after leader errors: the wait also watches the metadata for a new leader, so this
#: only bounds how often a leader that stays put (or dead) is asked again.
LEADER_RETRY_BACKOFF_MAX_MS = 250
#: Leader changes in a row a partition follows without any backoff; beyond it (two nodes
#: naming each other, a stale hint) the backoff applies until a request succeeds again.
LEADER_HOPS_IMMEDIATE_MAX = 3
#: How long a Produce request may go unanswered before the producer checks the metadata for
#: a new leader (module docstring); below the node's election timeout (1 s by default),
#: which no failover beats anyway.
LEADER_CHECK_AFTER_MS = 1_000
#: How often a partition without a leader checks its batches against delivery_timeout_ms.
LEADERLESS_EXPIRY_CHECK_MS = 500
REQUEST_TIMEOUT_MS_DEFAULT = 30_000
#: How long a record may wait, retries included, before it fails (Kafka's delivery.timeout.ms).
DELIVERY_TIMEOUT_MS_DEFAULT = 120_000
#: How long records for a topic wait for its metadata before they fail with UnknownTopic.
METADATA_WAIT_MS_DEFAULT = 5_000

_ACKS: dict[object, broker_pb2.Acks.ValueType] = {
    "all": broker_pb2.ACKS_ALL,
    -1: broker_pb2.ACKS_ALL,
    "-1": broker_pb2.ACKS_ALL,
    1: broker_pb2.ACKS_LEADER,
    "1": broker_pb2.ACKS_LEADER,
    0: broker_pb2.ACKS_NONE,
    "0": broker_pb2.ACKS_NONE,
}

Acks = Literal["all", 0, 1, -1]

#: Errors that mean the partition's leader moved, is being elected, or is unreachable: the
#: retry follows the metadata to the new leader (module docstring).
_LEADER_ERRORS = (NotLeader, LeaderNotAvailable, NodeUnavailable, RequestTimedOut, UnknownTopic)


class BufferFull(TidelogError):
    """More records are waiting for room than the buffer holds: the caller sends faster than
    the cluster takes them without ever awaiting. Await the futures ``send`` returned (or
    ``flush()``) now and then."""

    reason = "BUFFER_FULL"


def parse_acks(acks: object) -> broker_pb2.Acks.ValueType:
    try:
        return _ACKS[acks]
    except (KeyError, TypeError):
        raise ValueError(f"acks={acks!r} is not one of 'all', 1, 0") from None


# ---------------------------------------------------------------------------------------------
# What send() and send_many() hand back


class RecordFuture:
    """Awaitable result of one :meth:`Producer.send`: a pointer into its batch.

    No asyncio future exists per record; awaiting one waits on its batch. A record parked
    while its topic's metadata was unknown (or the buffer full) gets its batch on admission.
    """

    __slots__ = ("_admitted", "_batch", "_error", "_index")

    def __init__(self, batch: PendingBatch | None, index: int) -> None:
        self._batch = batch
        self._index = index
        self._error: TidelogError | None = None
        self._admitted: asyncio.Future[None] | None = None

    def done(self) -> bool:
        return self._error is not None or (self._batch is not None and self._batch.done)

    def result(self) -> RecordMetadata:
        """The metadata of a completed send; raises its error, or InvalidStateError if the
        record is not acknowledged yet."""
        if self._error is not None:
            raise self._error
        batch = self._batch
        if batch is None or not batch.done:
            raise asyncio.InvalidStateError("the record is not acknowledged yet")
        if batch.error is not None:
            raise batch.error
        offset = -1 if batch.base_offset < 0 else batch.base_offset + self._index
        return RecordMetadata(
            batch.topic, batch.partition, offset, batch.record_timestamp(self._index)
        )

    def __await__(self) -> Generator[Any, None, RecordMetadata]:
        if self._batch is None and self._error is None:
            assert self._admitted is not None
            yield from asyncio.shield(self._admitted).__await__()
        batch = self._batch
        if batch is not None and not batch.done:
            yield from batch.wait().__await__()
        return self.result()


class BatchesFuture:
    """Awaitable result of one :meth:`Producer.send_many`: the batches its records went to."""

    __slots__ = ("_admitted", "_error", "_expected", "_segments", "topic")

    def __init__(self, topic: str, expected: int) -> None:
        self.topic = topic
        self._expected = expected
        self._segments: list[tuple[PendingBatch, int, int]] = []
        self._error: TidelogError | None = None
        self._admitted: asyncio.Future[None] | None = None

    def _add(self, batch: PendingBatch, index: int, count: int) -> None:
        self._segments.append((batch, index, count))
        self._expected -= count

    def done(self) -> bool:
        if self._error is not None:
            return True
        return self._expected == 0 and all(b.done for b, _, _ in self._segments)

    def result(self) -> list[BatchMetadata]:
        if self._error is not None:
            raise self._error
        if not self.done():
            raise asyncio.InvalidStateError("the records are not acknowledged yet")
        out: list[BatchMetadata] = []
        for batch, index, count in self._segments:
            if batch.error is not None:
                raise batch.error
            base = -1 if batch.base_offset < 0 else batch.base_offset + index
            latency_ms = (batch.acked_s - batch.first_sent_s) * 1000 if batch.first_sent_s else 0.0
            out.append(
                BatchMetadata(
                    batch.topic,
                    batch.partition,
                    base,
                    count,
                    batch.record_timestamp(index),
                    latency_ms,
                )
            )
        return out

    def __await__(self) -> Generator[Any, None, list[BatchMetadata]]:
        if self._expected and self._error is None:
            assert self._admitted is not None
            yield from asyncio.shield(self._admitted).__await__()
        for batch, _, _ in self._segments:
            if not batch.done:
                yield from batch.wait().__await__()
        return self.result()


@dataclass(slots=True)
class _Parked:
    """A send or send_many waiting for its topic's metadata or for buffer room."""

    values: Sequence[bytes | None]
    keys: Sequence[bytes | None] | None
    partition: int | None
    headers: Sequence[Header] | None
    timestamp_ms: int | None
    size: int
    record: RecordFuture | None = None
    many: BatchesFuture | None = None
    #: send_many records already admitted (a large one is admitted piece by piece).
    done: int = 0
    cumulative: list[int] | None = None


@dataclass(slots=True)
class _PartitionState:
    in_flight: int = 0
    #: Batches that failed with a retriable error while others were in flight; they go back
    #: to the queue once in_flight drops to 0, so nothing overtakes them twice.
    failed: list[PendingBatch] = field(default_factory=list)
    #: After a failure, send one batch at a time until one succeeds (in-order recovery).
    recovering: bool = False
    retry_at_s: float = 0.0
    backoff_ms: float = 0.0
    #: When a wake-up for retry_at_s is already scheduled (one timer per backoff).
    wake_at_s: float = 0.0
    #: Whether a failure since the last requeue was a leader error, and at which address.
    leader_error: bool = False
    failed_at: str | None = None
    #: Leader changes followed at once since the last success (LEADER_HOPS_IMMEDIATE_MAX).
    hops: int = 0
    #: When the leader trouble began (time.monotonic(); 0 while requests succeed).
    trouble_since_s: float = 0.0
    #: Waits for a new leader during the backoff, to retry there at once.
    watch: asyncio.Task[None] | None = None
    #: The node every request in flight went to (the module docstring says why only one).
    in_flight_at: str | None = None
    #: The Produce calls in flight, to abandon them at a node that stopped answering.
    calls: set[grpc.aio.UnaryUnaryCall[Any, Any]] = field(default_factory=set)
    #: Calls cancelled because another node leads now, with that node's address.
    abandoned: dict[grpc.aio.UnaryUnaryCall[Any, Any], str] = field(default_factory=dict)
    #: Watches the metadata while a request goes unanswered (LEADER_CHECK_AFTER_MS).
    stall_watch: asyncio.Task[None] | None = None


class _Sender:
    """The one task that drains the accumulator for the partitions led by one node."""

    def __init__(self, producer: Producer, address: str) -> None:
        self.producer = producer
        self.address = address
        self.pending: set[TopicPartition] = set()
        self.event = asyncio.Event()
        self.task = asyncio.get_running_loop().create_task(self._run(), name=f"sender {address}")

    def wake(self, tp: TopicPartition) -> None:
        self.pending.add(tp)
        self.event.set()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self.event.wait()
            self.event.clear()
            pending, self.pending = self.pending, set()
            now = loop.time()
            for tp in pending:
                self.producer._drain(tp, self, now)


# ---------------------------------------------------------------------------------------------


class Producer:
    """``async with Producer("127.0.0.1:9092") as p: md = await p.send("t", b"v")``."""

    def __init__(
        self,
        bootstrap: str | Sequence[str],
        *,
        acks: Acks | str = "all",
        linger_ms: float = LINGER_MS_DEFAULT,
        batch_bytes_max: int = BATCH_BYTES_MAX_DEFAULT,
        max_in_flight_per_partition: int = MAX_IN_FLIGHT_PER_PARTITION_DEFAULT,
        compression: str | Codec = "none",
        retries: int = RETRIES_DEFAULT,
        retry_backoff_ms: int = RETRY_BACKOFF_MS_DEFAULT,
        request_timeout_ms: int = REQUEST_TIMEOUT_MS_DEFAULT,
        delivery_timeout_ms: int = DELIVERY_TIMEOUT_MS_DEFAULT,
        buffer_bytes_max: int = BUFFER_BYTES_MAX_DEFAULT,
        metadata_wait_ms: int = METADATA_WAIT_MS_DEFAULT,
        tls: bool = False,
        ca: PemSource | None = None,
        client_cert: PemSource | None = None,
        client_key: PemSource | None = None,
        token: str | None = None,
    ) -> None:
        self._acks = parse_acks(acks)
        self._codec = Codec.parse(compression)
        if linger_ms < 0:
            raise ValueError(f"linger_ms={linger_ms} must be >= 0")
        if not 0 < batch_bytes_max <= BATCH_BYTES_LIMIT:
            raise ValueError(
                f"batch_bytes_max={batch_bytes_max} must be in (0, {BATCH_BYTES_LIMIT}]"
            )
        if max_in_flight_per_partition < 1:
            raise ValueError(f"max_in_flight_per_partition={max_in_flight_per_partition} < 1")
        if retries < 0 or retry_backoff_ms < 0:
            raise ValueError("retries and retry_backoff_ms must be >= 0")
        if request_timeout_ms <= 0 or delivery_timeout_ms <= 0:
            raise ValueError("request_timeout_ms and delivery_timeout_ms must be > 0")
        self._bootstrap = parse_bootstrap(bootstrap)
        self._connection = Connection.create(
            tls=tls, ca=ca, client_cert=client_cert, client_key=client_key, token=token
        )
        self._linger_s = linger_ms / 1000
        self._max_in_flight = max_in_flight_per_partition
        self._retries = retries
        self._retry_backoff_ms = retry_backoff_ms
        self._request_timeout_ms = request_timeout_ms
        self._delivery_timeout_s = delivery_timeout_ms / 1000
        self._metadata_wait_ms = metadata_wait_ms
        self._acc = Accumulator(batch_bytes_max=batch_bytes_max, buffer_bytes_max=buffer_bytes_max)
        self._sticky = StickyPartitioner()
        self._meta: ClusterMetadata | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._parts: dict[TopicPartition, _PartitionState] = {}
        self._senders: dict[str, _Sender] = {}
        self._parked: dict[str, deque[_Parked]] = {}
        self._parked_bytes = 0
        self._admitters: dict[str, asyncio.Task[None]] = {}
        self._room = asyncio.Event()
        #: Partitions without a known leader, each with the task waiting for one.
        self._leaderless: dict[TopicPartition, asyncio.Task[None]] = {}
        self._background: set[asyncio.Task[None]] = set()
        self._idle_waiters: list[asyncio.Future[None]] = []
        self._flushing = 0
        self._closed = False

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect and load the cluster's metadata; fails if no bootstrap node answers."""
        if self._meta is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._meta = ClusterMetadata(self._bootstrap, connection=self._connection)
        try:
            await self._meta.refresh()
        except BaseException:
            await self._meta.close()
            self._meta = None
            raise

    async def stop(self, timeout_ms: float | None = None) -> None:
        """Send what is buffered, then close. Records that cannot be delivered fail after
        ``delivery_timeout_ms``, or when ``timeout_ms`` runs out first."""
        if self._meta is None or self._closed:
            return
        try:
            if timeout_ms is None:
                await self.flush()
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.flush(), timeout_ms / 1000)
        finally:
            self._closed = True
            tasks: list[asyncio.Task[Any]] = [s.task for s in self._senders.values()]
            tasks += self._admitters.values()
            tasks += self._background
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._fail_everything(TidelogError("the producer was closed before delivering"))
            await self._meta.close()

    close = stop

    async def __aenter__(self) -> Producer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    @property
    def metadata(self) -> ClusterMetadata:
        if self._meta is None:
            raise TidelogError("the producer is not started: use `async with` or await start()")
        return self._meta

    async def partitions_for(self, topic: str) -> int:
        """The partition count of ``topic`` (raises UnknownTopic if it does not exist)."""
        info = await self.metadata.wait_for_topic(topic, wait_ms=self._metadata_wait_ms)
        return info.partition_count

    # -- send -----------------------------------------------------------------------------------

    def send(
        self,
        topic: str,
        value: bytes | None,
        key: bytes | None = None,
        *,
        partition: int | None = None,
        headers: Sequence[Header] | None = None,
        timestamp_ms: int | None = None,
    ) -> RecordFuture:
        """Queue one record; ``await`` the result for its RecordMetadata.

        The partition is ``partition`` if given, murmur2 of the key for keyed records (as in
        Kafka), or the topic's sticky partition for keyless ones.
        """
        meta = self.metadata
        if self._closed:
            raise TidelogError("the producer is closed")
        size = record_size(value, key, headers)
        info = meta.topics.get(topic)
        if info is not None and topic not in self._parked and self._acc.has_room(size):
            tp = self._choose(info, key, partition, size)
            batch, index = self._append_one(tp, value, key, headers, timestamp_ms, size)
            return RecordFuture(batch, index)
        fut = RecordFuture(None, -1)
        fut._admitted = self._loop_().create_future()
        self._park(
            topic,
            _Parked(
                [value],
                None if key is None else [key],
                partition,
                headers,
                timestamp_ms,
                size,
                record=fut,
            ),
        )
        return fut

    def send_many(
        self,
        topic: str,
        values: Sequence[bytes],
        keys: Sequence[bytes | None] | None = None,
        *,
        partition: int | None = None,
    ) -> BatchesFuture:
        """Queue many records at once, the fast path for bulk appends: the accumulator cuts
        ``values`` into batches of ``batch_bytes_max`` with no per-record Python work (keyed
        records are first grouped by partition). ``await`` the result for one BatchMetadata
        per batch the records went to."""
        meta = self.metadata
        if self._closed:
            raise TidelogError("the producer is closed")
        if keys is not None and len(keys) != len(values):
            raise ValueError(f"got {len(keys)} keys for {len(values)} values")
        handle = BatchesFuture(topic, len(values))
        if not values:
            return handle
        cumulative = cumulative_sizes(values, keys)
        size = cumulative[-1]
        info = meta.topics.get(topic)
        if info is not None and topic not in self._parked and self._acc.has_room(size):
            self._append_many(info, values, keys, partition, handle, 0, cumulative)
            return handle
        handle._admitted = self._loop_().create_future()
        self._park(
            topic,
            _Parked(values, keys, partition, None, None, size, many=handle, cumulative=cumulative),
        )
        return handle

    async def send_and_wait(
        self,
        topic: str,
        value: bytes | None,
        key: bytes | None = None,
        *,
        partition: int | None = None,
        headers: Sequence[Header] | None = None,
        timestamp_ms: int | None = None,
    ) -> RecordMetadata:
        return await self.send(
            topic, value, key, partition=partition, headers=headers, timestamp_ms=timestamp_ms
        )

    async def flush(self) -> None:
        """Send every buffered record now (ignoring linger) and wait until all are answered.
        Failures are reported on the records' futures, not here."""
        self.metadata  # noqa: B018 - raises if not started
        self._flushing += 1
        try:
            while not self._idle():
                for tp in self._acc.queued_partitions():
                    self._wake(tp)
                fut = self._loop_().create_future()
                self._idle_waiters.append(fut)
                await fut
        finally:
            self._flushing -= 1

    # -- internals: admission -------------------------------------------------------------------

    def _loop_(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None
        return self._loop

    def _choose(
        self, info: TopicInfo, key: bytes | None, partition: int | None, size: int
    ) -> TopicPartition:
        n = info.partition_count
        if partition is not None:
            if not 0 <= partition < n:
                raise UnknownPartition(
                    f"topic {info.name!r} has partitions 0..{n - 1}; there is no partition "
                    f"{partition}",
                    topic=info.name,
                )
            return TopicPartition(info.name, partition)
        if key is not None:
            return TopicPartition(info.name, partition_for_key(key, n))
        tp = TopicPartition(info.name, self._sticky.current(info.name, n))
        if n > 1 and not self._acc.fits_open_batch(tp, size):
            # The sticky partition's batch is full or gone: stick to the next one (KIP-480).
            tp = TopicPartition(info.name, self._sticky.next(info.name, n))
        return tp

    def _append_one(
        self,
        tp: TopicPartition,
        value: bytes | None,
        key: bytes | None,
        headers: Sequence[Header] | None,
        timestamp_ms: int | None,
        size: int,
    ) -> tuple[PendingBatch, int]:
        now_s = self._loop_().time()
        batch, index, created = self._acc.append(
            tp, value, key, headers, timestamp_ms, size, now_s, time.time_ns() // 1_000_000
        )
        if created or batch.closed:
            self._on_batch_created_or_full(tp, created, batch)
        return batch, index

    def _on_batch_created_or_full(
        self, tp: TopicPartition, created: bool, batch: PendingBatch
    ) -> None:
        if batch.closed or self._linger_s == 0 or self._flushing:
            self._wake(tp)
            return
        dq = self._acc.batches.get(tp)
        if created and dq is not None and len(dq) > 1:
            self._wake(tp)  # the previous batch is complete and may go
        self._loop_().call_later(self._linger_s, self._wake, tp)

    def _append_many(
        self,
        info: TopicInfo,
        values: Sequence[bytes],
        keys: Sequence[bytes | None] | None,
        partition: int | None,
        handle: BatchesFuture,
        start: int,
        cumulative: list[int],
        stop: int | None = None,
    ) -> None:
        """Append ``values[start:stop]``; keyless ones fill one batch per partition in turn."""
        n = len(values) if stop is None else stop
        if keys is not None and partition is None:
            self._append_keyed(info, values[start:n], keys[start:n], handle)
            return
        if partition is not None:
            self._choose(info, None, partition, 0)  # validates the partition
        now_s = self._loop_().time()
        now_ms = time.time_ns() // 1_000_000
        view_values = values if n == len(values) else values[:n]
        view_cum = cumulative if n == len(cumulative) else cumulative[:n]
        pos = start
        while pos < n:
            if partition is not None:
                tp = TopicPartition(info.name, partition)
            else:
                first = view_cum[pos] - (view_cum[pos - 1] if pos else 0)
                tp = self._choose(info, None, None, first)
            batch, index, taken, created = self._acc.fill(
                tp, view_values, keys, pos, now_s, now_ms, view_cum
            )
            handle._add(batch, index, taken)
            pos += taken
            if created or batch.closed:
                self._on_batch_created_or_full(tp, created, batch)

    def _append_keyed(
        self,
        info: TopicInfo,
        values: Sequence[bytes],
        keys: Sequence[bytes | None],
        handle: BatchesFuture,
    ) -> None:
        n = info.partition_count
        groups: dict[int, tuple[list[bytes], list[bytes | None]]] = {}
        sticky = self._sticky.current(info.name, n)
        for value, key in zip(values, keys, strict=True):
            p = sticky if key is None else partition_for_key(key, n)
            group = groups.get(p)
            if group is None:
                group = groups[p] = ([], [])
            group[0].append(value)
            group[1].append(key)
        for p, (vals, ks) in groups.items():
            self._append_many(info, vals, ks, p, handle, 0, cumulative_sizes(vals, ks))

    def _park(self, topic: str, item: _Parked) -> None:
        if self._parked_bytes and self._parked_bytes + item.size > self._acc.buffer_bytes_max:
            raise BufferFull(
                f"{self._parked_bytes} bytes of records already wait for room in the producer "
                f"buffer (buffer_bytes_max={self._acc.buffer_bytes_max}): await the futures "
                "send() returned, or `await producer.flush()`, to let the sender catch up"
            )
        dq = self._parked.get(topic)
        if dq is None:
            dq = self._parked[topic] = deque()
        dq.append(item)
        self._parked_bytes += item.size
        if topic not in self._admitters:
            self._admitters[topic] = self._loop_().create_task(
                self._admit(topic), name=f"admit {topic}"
            )

    async def _admit(self, topic: str) -> None:
        """Move a topic's parked records into the accumulator, in order, as metadata and
        buffer room allow."""
        meta = self.metadata
        dq = self._parked[topic]
        try:
            try:
                info = await meta.wait_for_topic(topic, wait_ms=self._metadata_wait_ms)
            except TidelogError as err:
                self._fail_parked(topic, err)
                return
            while dq:
                item = dq[0]
                if item.many is None:
                    if not self._acc.has_room(item.size):
                        await self._wait_room()
                        continue
                    self._admit_one(info, item)
                    dq.popleft()
                    self._parked_bytes -= item.size
                    continue
                if not self._admit_many_piece(info, item):
                    await self._wait_room()
                    continue
                if item.done == len(item.values):
                    dq.popleft()
        except TidelogError as err:
            self._fail_parked(topic, err)
        finally:
            if not dq:
                self._parked.pop(topic, None)
            self._admitters.pop(topic, None)
            self._check_idle()

    def _admit_one(self, info: TopicInfo, item: _Parked) -> None:
        fut = item.record
        assert fut is not None and fut._admitted is not None
        value = item.values[0]
        key = None if item.keys is None else item.keys[0]
        try:
            tp = self._choose(info, key, item.partition, item.size)
        except TidelogError as err:
            fut._error = err
        else:
            fut._batch, fut._index = self._append_one(
                tp, value, key, item.headers, item.timestamp_ms, item.size
            )
        if not fut._admitted.done():
            fut._admitted.set_result(None)

    def _admit_many_piece(self, info: TopicInfo, item: _Parked) -> bool:
        """Admit as many of a parked send_many's records as fit; False if none fit."""
        handle = item.many
        cumulative = item.cumulative
        assert handle is not None and handle._admitted is not None and cumulative is not None
        start = item.done
        before = cumulative[start - 1] if start else 0
        if self._acc.buffered_bytes == 0:
            stop = len(item.values)
        else:
            budget = self._acc.buffer_bytes_max - self._acc.buffered_bytes
            stop = bisect.bisect_right(cumulative, before + budget, lo=start)
            if stop == start:
                return False
        try:
            values = cast("Sequence[bytes]", item.values)  # send_many takes no None values
            self._append_many(
                info, values, item.keys, item.partition, handle, start, cumulative, stop
            )
        except TidelogError as err:
            handle._error = err
            stop = len(item.values)
        admitted_bytes = cumulative[stop - 1] - before
        self._parked_bytes -= admitted_bytes
        item.done = stop
        if stop == len(item.values) and not handle._admitted.done():
            handle._admitted.set_result(None)
        return True

    async def _wait_room(self) -> None:
        self._room.clear()
        await self._room.wait()

    def _fail_parked(self, topic: str, err: TidelogError) -> None:
        dq = self._parked.pop(topic, None)
        for item in dq or ():
            self._parked_bytes -= item.size - (
                0 if item.cumulative is None or not item.done else item.cumulative[item.done - 1]
            )
            target = item.record if item.record is not None else item.many
            assert target is not None
            target._error = err
            if target._admitted is not None and not target._admitted.done():
                target._admitted.set_result(None)
        if dq:
            log.warning("records for topic %r failed: %s", topic, err)

    # -- internals: sending ---------------------------------------------------------------------

    def _state(self, tp: TopicPartition) -> _PartitionState:
        st = self._parts.get(tp)
        if st is None:
            st = self._parts[tp] = _PartitionState()
        return st

    def _wake(self, tp: TopicPartition) -> None:
        """Tell the partition's leader's sender to look at it."""
        if self._closed:
            return
        address = self.metadata.leader_address(tp.topic, tp.partition)
        if address is None:
            if tp not in self._leaderless:
                self._leaderless[tp] = self._spawn(self._await_leader(tp), f"leader of {tp}")
            return
        sender = self._senders.get(address)
        if sender is None:
            sender = self._senders[address] = _Sender(self, address)
        sender.wake(tp)

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        """A background task that stop() cancels."""
        task = self._loop_().create_task(coro, name=name)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def _await_leader(self, tp: TopicPartition) -> None:
        """Wait for a leader of a partition that has none (metadata is polled meanwhile);
        batches that outlive delivery_timeout_ms meanwhile fail."""
        meta = self.metadata
        since_s = time.monotonic()
        try:
            while True:
                try:
                    address = await meta.wait_for_leader(
                        tp.topic,
                        tp.partition,
                        timeout_s=LEADERLESS_EXPIRY_CHECK_MS / 1000,
                        since_s=since_s,
                    )
                except UnknownTopic:
                    self._fail_partition(
                        tp,
                        UnknownTopic(
                            f"topic {tp.topic!r} no longer exists (deleted while producing?)",
                            topic=tp.topic,
                        ),
                    )
                    return
                except TidelogError as err:  # the producer is closing
                    log.debug("waiting for a leader of %s stopped: %s", tp, err)
                    return
                if address is not None:
                    break
                self._expire(tp)
                if self._acc.head(tp) is None and not self._state(tp).failed:
                    return
        finally:
            self._leaderless.pop(tp, None)
        self._wake(tp)

    def _drain(self, tp: TopicPartition, sender: _Sender, now_s: float) -> None:
        st = self._state(tp)
        address = self.metadata.leader_address(tp.topic, tp.partition)
        if address != sender.address:
            self._wake(tp)  # the leader moved: hand the partition to its sender
            return
        if st.in_flight and st.in_flight_at != address:
            # Requests are still out at the old leader: newer batches wait for its answers
            # (module docstring); the last answer wakes the partition again.
            return
        if now_s < st.retry_at_s:
            if st.wake_at_s != st.retry_at_s:
                st.wake_at_s = st.retry_at_s
                self._loop_().call_at(st.retry_at_s, self._wake, tp)
            return
        limit = 1 if st.recovering else self._max_in_flight
        force = self._flushing > 0 or self._closed
        while st.in_flight < limit:
            batch = self._acc.pop_ready(tp, now_s, self._linger_s, force)
            if batch is None:
                break
            if now_s - batch.created_s > self._delivery_timeout_s:
                self._fail_batch(batch, self._timed_out(batch))
                continue
            st.in_flight += 1
            st.in_flight_at = sender.address
            self._spawn(self._produce(sender.address, tp, st, batch), f"produce {tp}")

    async def _produce(
        self, address: str, tp: TopicPartition, st: _PartitionState, batch: PendingBatch
    ) -> None:
        loop = self._loop_()
        err: TidelogError | None = None
        resp: broker_pb2.ProduceResponse | None = None
        try:
            payload = batch.encode(self._codec)
        except ValueError as exc:
            st.in_flight -= 1
            self._fail_batch(batch, TidelogError(f"cannot encode the batch: {exc}"))
            self._after_response(tp, st)
            return
        if not batch.first_sent_s:
            batch.first_sent_s = loop.time()
        batch.attempts += 1
        request = broker_pb2.ProduceRequest(
            topic=tp.topic,
            partition=tp.partition,
            batches=payload,
            acks=self._acks,
            timeout_ms=self._request_timeout_ms,
        )
        call: grpc.aio.UnaryUnaryCall[Any, Any] | None = None
        stall_check: asyncio.TimerHandle | None = None
        try:
            call = self.metadata.broker(address).Produce(  # type: ignore[assignment]
                request, timeout=self._request_timeout_ms / 1000 + 1
            )
            assert call is not None
            st.calls.add(call)
            stall_check = loop.call_later(
                LEADER_CHECK_AFTER_MS / 1000, self._on_stalled, tp, st, address
            )
            resp = await call
        except grpc.aio.AioRpcError as exc:
            err = from_rpc_error(exc)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            moved_to = None if call is None else st.abandoned.get(call)
            if moved_to is None or (current is not None and current.cancelling()):
                # stop() cancelled the request; nobody may wait on this batch forever.
                st.in_flight -= 1
                self._forget_call(st, call, stall_check)
                if not batch.done:
                    self._fail_batch(
                        batch, TidelogError("the producer was closed before delivering")
                    )
                raise
            err = NotLeader(
                f"{tp}: no answer from {address} in {LEADER_CHECK_AFTER_MS} ms and "
                f"{moved_to} leads the partition now; resending there"
            )
        except Exception as exc:  # the channel closed under us, or similar: retry elsewhere
            err = NodeUnavailable(f"produce to {address} failed: {exc!r}")
        self._forget_call(st, call, stall_check)
        st.in_flight -= 1
        if err is None:
            assert resp is not None
            if st.recovering and not st.failed:
                st.recovering = False
            st.backoff_ms = 0
            st.hops = 0
            st.trouble_since_s = 0.0
            self.metadata.note_reachable(address)
            base = -1 if self._acks == broker_pb2.ACKS_NONE else resp.base_offset
            self._complete_batch(batch, base)
        else:
            self._on_error(address, tp, st, batch, err)
        self._after_response(tp, st)

    def _forget_call(
        self,
        st: _PartitionState,
        call: grpc.aio.UnaryUnaryCall[Any, Any] | None,
        stall_check: asyncio.TimerHandle | None,
    ) -> None:
        if stall_check is not None:
            stall_check.cancel()
        if call is not None:
            st.calls.discard(call)
            st.abandoned.pop(call, None)
        if not st.calls and st.stall_watch is not None:
            st.stall_watch.cancel()
            st.stall_watch = None

    def _on_stalled(self, tp: TopicPartition, st: _PartitionState, address: str) -> None:
        """A request to ``address`` has gone unanswered for LEADER_CHECK_AFTER_MS: watch the
        metadata for another leader (one watch per partition)."""
        if self._closed or st.stall_watch is not None or not st.calls:
            return
        if st.in_flight_at != address:
            return
        st.stall_watch = self._spawn(self._watch_stalled(tp, st, address), f"stalled {tp}")

    async def _watch_stalled(self, tp: TopicPartition, st: _PartitionState, address: str) -> None:
        """Abandon the requests held by ``address`` once another node leads the partition;
        cancelled (by _forget_call) when they are all answered first."""
        try:
            leader = await self.metadata.wait_for_leader(tp.topic, tp.partition, not_at=address)
        except TidelogError:
            return  # the topic is gone or the producer closing: the requests report it
        finally:
            if st.stall_watch is asyncio.current_task():
                st.stall_watch = None
        if leader is None or st.in_flight_at != address or not st.calls:
            return
        log.info(
            "%s: %s holds %d requests unanswered and %s leads now: resending there",
            tp,
            address,
            len(st.calls),
            leader,
        )
        self.metadata.note_unreachable(address)
        for call in list(st.calls):
            st.abandoned[call] = leader
            call.cancel()

    def _on_error(
        self,
        address: str,
        tp: TopicPartition,
        st: _PartitionState,
        batch: PendingBatch,
        err: TidelogError,
    ) -> None:
        now_s = self._loop_().time()
        expired = now_s - batch.created_s > self._delivery_timeout_s
        if not err.retriable or batch.attempts > self._retries or expired:
            if expired and err.retriable:
                err = self._timed_out(batch, err)
            log.warning("batch for %s failed (%d records): %s", tp, batch.record_count, err)
            self._fail_batch(batch, err)
            return
        log.debug("retrying batch for %s after %s", tp, err)
        st.failed.append(batch)
        st.recovering = True
        if not isinstance(err, _LEADER_ERRORS):
            return
        meta = self.metadata
        st.leader_error = True
        st.failed_at = address
        if not st.trouble_since_s:
            st.trouble_since_s = time.monotonic()
        if isinstance(err, NodeUnavailable):
            meta.note_unreachable(address)
        if not meta.apply_leader_hint(tp.topic, tp.partition, err):
            self._spawn(self._refresh_quietly(tp.topic), f"refresh {tp.topic}")

    async def _refresh_quietly(self, topic: str) -> None:
        try:
            await self.metadata.refresh(force=False, topics=[topic])
        except TidelogError as err:
            log.debug("metadata refresh failed: %s", err)

    def _after_response(self, tp: TopicPartition, st: _PartitionState) -> None:
        if st.failed and st.in_flight == 0:
            # Every request sent before the failed ones has answered: requeue the failed
            # batches ahead of everything newer, in order, and wait out the backoff.
            self._acc.push_front(tp, st.failed)
            st.failed.clear()
            self._schedule_retry(tp, st)
        self._wake(tp)

    def _schedule_retry(self, tp: TopicPartition, st: _PartitionState) -> None:
        """Set when the requeued batches go again: at once at a new leader, else after the
        backoff, or earlier if a new leader shows up meanwhile."""
        now_s = self._loop_().time()
        leader_error, st.leader_error = st.leader_error, False
        failed_at, st.failed_at = st.failed_at, None
        if st.watch is not None:
            st.watch.cancel()
            st.watch = None
        if leader_error and st.hops < LEADER_HOPS_IMMEDIATE_MAX:
            address = self.metadata.leader_address(tp.topic, tp.partition)
            if address is not None and address != failed_at:
                # The leader moved already (a NOT_LEADER hint, or a refresh): go there now.
                st.hops += 1
                st.backoff_ms = 0
                st.retry_at_s = now_s
                return
        cap_ms = LEADER_RETRY_BACKOFF_MAX_MS if leader_error else RETRY_BACKOFF_MAX_MS
        # Never 0: a retry_backoff_ms of 0 still doubles from 1 ms instead of spinning.
        st.backoff_ms = min(
            max(st.backoff_ms * 2, self._retry_backoff_ms, 1), max(cap_ms, self._retry_backoff_ms)
        )
        st.retry_at_s = now_s + st.backoff_ms / 1000
        if leader_error and st.backoff_ms > LEADER_POLL_INTERVAL_MS / 2:
            st.watch = self._spawn(
                self._watch_leader(tp, st, failed_at, st.retry_at_s), f"watch leader of {tp}"
            )

    async def _watch_leader(
        self, tp: TopicPartition, st: _PartitionState, failed_at: str | None, retry_at_s: float
    ) -> None:
        """Keep the partition's metadata fresh during the backoff (the retry then goes to
        the leader of the moment), and cut the backoff short when a leader other than
        ``failed_at`` shows up, unless the partition followed too many changes in a row."""
        timeout_s = retry_at_s - self._loop_().time()
        try:
            address = await self.metadata.wait_for_leader(
                tp.topic,
                tp.partition,
                not_at=failed_at,
                timeout_s=timeout_s,
                since_s=st.trouble_since_s or None,
            )
        except TidelogError:
            return  # the topic is gone or the producer closing: the retry reports it
        finally:
            if st.watch is asyncio.current_task():
                st.watch = None
        if address is None or st.retry_at_s != retry_at_s:
            return  # the backoff ran out, or a newer failure rescheduled the retry
        if st.hops >= LEADER_HOPS_IMMEDIATE_MAX:
            return
        log.debug("%s: new leader at %s, retrying now", tp, address)
        st.hops += 1
        st.backoff_ms = 0
        st.retry_at_s = 0.0
        self._wake(tp)

    def _complete_batch(self, batch: PendingBatch, base_offset: int) -> None:
        batch.complete(base_offset, self._loop_().time())
        self._released(batch)

    def _fail_batch(self, batch: PendingBatch, err: TidelogError) -> None:
        batch.fail(err, self._loop_().time())
        self._released(batch)

    def _released(self, batch: PendingBatch) -> None:
        self._acc.release(batch)
        self._room.set()
        self._check_idle()

    def _timed_out(self, batch: PendingBatch, cause: TidelogError | None = None) -> TidelogError:
        waited = self._loop_().time() - batch.created_s
        why = f" (last error: {cause})" if cause is not None else ""
        return RequestTimedOut(
            f"{batch.record_count} records for {batch.topic}/{batch.partition} were not "
            f"acknowledged within delivery_timeout_ms={self._delivery_timeout_s * 1000:.0f} "
            f"(waited {waited:.1f} s){why}"
        )

    def _expire(self, tp: TopicPartition) -> None:
        now_s = self._loop_().time()
        dq = self._acc.batches.get(tp)
        while dq and now_s - dq[0].created_s > self._delivery_timeout_s:
            batch = dq.popleft()
            self._fail_batch(batch, self._timed_out(batch))

    def _fail_partition(self, tp: TopicPartition, err: TidelogError) -> None:
        st = self._state(tp)
        batches = self._acc.drop(tp) + st.failed
        st.failed = []
        for batch in batches:
            self._fail_batch(batch, err)
        if batches:
            log.warning("%d batches for %s failed: %s", len(batches), tp, err)

    def _fail_everything(self, err: TidelogError) -> None:
        for topic in list(self._parked):
            self._fail_parked(topic, err)
        for tp in list(self._acc.batches):
            self._fail_partition(tp, err)
        for fut in self._idle_waiters:
            if not fut.done():
                fut.set_result(None)

    def _idle(self) -> bool:
        return self._acc.buffered_bytes == 0 and not self._parked

    def _check_idle(self) -> None:
        if self._idle_waiters and self._idle():
            waiters, self._idle_waiters = self._idle_waiters, []
            for fut in waiters:
                if not fut.done():
                    fut.set_result(None)
