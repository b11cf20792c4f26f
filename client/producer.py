"""The asynchronous producer: batches records per partition and sends them to the leaders.

Shape (after aiokafka and the Java client): :meth:`Producer.send` appends a record to the
:class:`~tidelog.client.accumulator.Accumulator` and returns at once with a cheap
:class:`RecordFuture`; one drainer per leader node (a loop callback) drains the batches that
are full or whose ``linger_ms`` ran out, with up to ``max_in_flight_per_partition`` Produce
requests per partition (5 with idempotence, the default; 1 without: :class:`Producer` says what order
each guarantees). A batch that fails with a retriable error (the leader moved, the node is down, a
timeout) goes back to the front of its partition's queue once the requests sent before it
have answered, so a partition's batches are resent in their original order. Other errors
fail the batch's records.

The sending side (in-flight windows, retries in order, following leader moves, requests
held by a silent node) is :mod:`tidelog.client.sender`; when a retry goes is the client's
one policy, :mod:`tidelog.client.retry`.

Records that cannot be appended yet (the topic's metadata is not known, or the buffer holds
``buffer_bytes_max``) wait in a FIFO per topic and are admitted in order as soon as possible;
that FIFO is bounded too (:class:`BufferFull` beyond it), so an event loop that never yields
cannot grow the producer without limit.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import functools
import logging
import time
from collections import deque
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, cast

from tidelog.client.accumulator import (
    Accumulator,
    PendingBatch,
    call_soon,
    cumulative_sizes,
    record_size,
)
from tidelog.client.connection import Connection, PemSource
from tidelog.client.limits import (
    IDEMPOTENT_IN_FLIGHT_MAX,
    IN_FLIGHT_NON_IDEMPOTENT_DEFAULT,
    RETRY_BACKOFF_MS_DEFAULT,
)
from tidelog.client.metadata import (
    ClusterMetadata,
    TopicInfo,
    parse_bootstrap,
)
from tidelog.client.partitioner import StickyPartitioner, partition_for_key
from tidelog.client.sender import Sender, SenderConfig
from tidelog.client.structs import BatchMetadata, Header, RecordMetadata, TopicPartition
from tidelog.errors import (
    InvalidRecord,
    TidelogError,
    UnknownPartition,
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
BUFFER_BYTES_MAX_DEFAULT = 64 * _MIB
RETRIES_DEFAULT = 2**31 - 1
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

#: ``on_delivery(error, metadata)``: exactly one of the two is None (confluent-kafka's shape).
DeliveryCallback = Callable[[TidelogError | None, RecordMetadata | None], None]
#: Turns a key or a value the caller passes into the bytes sent.
Serializer = Callable[[Any], bytes]


class BufferFull(TidelogError):
    """More records are waiting for room than the buffer holds: the caller sends faster than
    the cluster takes them without ever awaiting. Await the futures ``send`` returned (or
    ``flush()``) now and then."""

    reason = "BUFFER_FULL"


def resolve_idempotence(
    enable_idempotence: bool | None,
    acks: object,
    acks_value: broker_pb2.Acks.ValueType,
    max_in_flight_per_partition: int | None,
) -> bool:
    """Whether the producer is idempotent: as asked, or (unset) unless a setting conflicts,
    as Kafka's producer decides since 3.2."""
    acks_all = acks_value == broker_pb2.ACKS_ALL
    too_many = (
        max_in_flight_per_partition is not None
        and max_in_flight_per_partition > IDEMPOTENT_IN_FLIGHT_MAX
    )
    if enable_idempotence is None:
        if not acks_all or too_many:
            log.info(
                "idempotence is off: acks=%r, max_in_flight_per_partition=%r (it needs "
                "acks='all' and at most %d in flight)",
                acks,
                max_in_flight_per_partition,
                IDEMPOTENT_IN_FLIGHT_MAX,
            )
            return False
        return True
    if enable_idempotence and not acks_all:
        raise ValueError(
            f"enable_idempotence=True needs acks='all' (got acks={acks!r}): a batch only the "
            "leader stored can be lost in a failover and its sequence with it. Use "
            "acks='all', or enable_idempotence=False"
        )
    if enable_idempotence and too_many:
        raise ValueError(
            f"enable_idempotence=True allows at most {IDEMPOTENT_IN_FLIGHT_MAX} requests in "
            f"flight per partition (got max_in_flight_per_partition="
            f"{max_in_flight_per_partition}): the node remembers the last "
            f"{IDEMPOTENT_IN_FLIGHT_MAX} batches per producer to recognize a retry"
        )
    return enable_idempotence


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

    __slots__ = ("_admitted", "_batch", "_callbacks", "_error", "_index")

    def __init__(self, batch: PendingBatch | None, index: int) -> None:
        self._batch = batch
        self._index = index
        self._error: TidelogError | None = None
        self._admitted: asyncio.Future[None] | None = None
        #: Callbacks added while the record waits for admission (no batch yet).
        self._callbacks: list[Callable[[RecordFuture], None]] | None = None

    def done(self) -> bool:
        return self._error is not None or (self._batch is not None and self._batch.done)

    def exception(self) -> TidelogError | None:
        """The error of a completed send, or None if it succeeded; InvalidStateError if the
        record is not acknowledged yet."""
        try:
            self.result()
        except TidelogError as err:
            return err
        return None

    def add_done_callback(self, fn: Callable[[RecordFuture], None]) -> None:
        """Call ``fn(future)`` on the event loop once the record is acknowledged or failed
        (soon, if it already is), as :meth:`asyncio.Future.add_done_callback`. No task or
        asyncio future is made per record: the callbacks hang on the record's batch. Inside
        ``fn``, ``future.result()`` gives the metadata or raises, ``future.exception()``
        gives the error. An exception ``fn`` raises is logged and otherwise ignored."""
        batch = self._batch
        if batch is not None and self._error is None:
            batch.add_callback(functools.partial(fn, self))
        elif self._error is not None:
            _soon(functools.partial(fn, self))
        else:
            if self._callbacks is None:
                self._callbacks = []
            self._callbacks.append(fn)

    def _admitted_now(self) -> None:
        """The record got its batch (or its error): hand over callbacks added while parked."""
        callbacks, self._callbacks = self._callbacks, None
        for fn in callbacks or ():
            self.add_done_callback(fn)

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


def _soon(fn: Callable[[], None]) -> None:
    call_soon([fn])


def _on_delivery_adapter(
    on_delivery: DeliveryCallback,
) -> Callable[[RecordFuture], None]:
    def call(fut: RecordFuture) -> None:
        err = fut.exception()
        on_delivery(err, None if err is not None else fut.result())

    return call


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


# ---------------------------------------------------------------------------------------------


class Producer:
    """``async with Producer("127.0.0.1:9092") as p: md = await p.send("t", b"v")``.

    **Idempotence** (``enable_idempotence``, on by default as in Kafka since 3.0): the
    producer gets a producer id from the cluster on its first send, and every batch carries
    that id, an epoch and a per-partition sequence number, stamped once when the batch is
    first sent and kept on every retry. The partition's leader stores a batch only if its
    sequence follows the last one stored, and answers a batch it already stored with the
    original offsets. Left unset, idempotence is on unless ``acks`` is not "all" or
    ``max_in_flight_per_partition`` is above 5 (then it is off, as Kafka's producer does);
    ``enable_idempotence=True`` with either of those is a ValueError.

    **Batching** (``linger_ms``, ``adaptive_linger``): records of a partition gather into
    one batch until it holds ``batch_bytes_max``. With ``adaptive_linger`` (the default) a
    partition with no request in flight sends its batch as soon as the caller yields to the
    event loop, so a lone record waits for nothing; while requests are out, new records
    gather until an answer comes back (then they go at once, together) or, once the batch
    holds 64 KiB, for up to ``linger_ms``; a full batch always goes (up to
    ``max_in_flight_per_partition`` requests). So batches grow with the load, and small
    requests do not queue behind each other on the nodes (Nagle's algorithm; docs/latency.md
    has the figures). ``adaptive_linger=False`` always waits ``linger_ms`` (the Java
    client's ``linger.ms``).

    **What order is guaranteed**, per partition (records of one key go to one partition):

    * Idempotent (the default; up to 5 requests in flight per partition): the records are
      stored in the order of ``send``, each exactly once, retries included (lost answers,
      timeouts, leader changes): a batch that arrives before the one ahead of it is refused
      and resent after it. A batch fails only with a reported error, and then the batches
      after it are still stored in send order; an error other than
      :class:`~tidelog.client.errors.OutcomeUnknown` means its records were not stored.
    * Not idempotent (``enable_idempotence=False``): ONE request in flight per partition by
      default, so records are stored in send order while nothing fails (gRPC does not order
      concurrent calls, so two requests in flight may be stored either way round). A retry
      after a lost answer or a timeout may store a batch twice; retries themselves keep the
      order (a failed batch is resent before any later one). With
      ``max_in_flight_per_partition`` > 1 even failure-free order is not guaranteed.

    A send that fails with :class:`~tidelog.client.errors.OutcomeUnknown` may have been
    stored (its request went unanswered); any other error means it was not. With
    idempotence on, the producer settles unknown outcomes itself by resending with the same
    sequence, so OutcomeUnknown only comes when it gives up (``delivery_timeout_ms``). When
    a partition forgets the producer (idle past the node's ``producer.id.expiration.ms``,
    or its batches deleted by retention) the producer starts a new session (a new id)
    instead of failing. PRODUCER_FENCED (a newer session of the same id) ends the
    producer: every pending and later send fails with :class:`ProducerFenced`.
    """

    def __init__(
        self,
        bootstrap: str | Sequence[str],
        *,
        acks: Acks | str = "all",
        linger_ms: float = LINGER_MS_DEFAULT,
        adaptive_linger: bool = True,
        batch_bytes_max: int = BATCH_BYTES_MAX_DEFAULT,
        max_in_flight_per_partition: int | None = None,
        enable_idempotence: bool | None = None,
        compression: str | Codec | None = "none",
        compression_type: str | Codec | None = None,
        key_serializer: Serializer | None = None,
        value_serializer: Serializer | None = None,
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
        if compression_type is not None:
            if compression not in ("none", None, Codec.NONE):
                raise ValueError(
                    "give compression= or its aiokafka name compression_type=, not both"
                )
            compression = compression_type
        self._codec = Codec.parse(compression or "none")
        self._key_serializer = key_serializer
        self._value_serializer = value_serializer
        if linger_ms < 0:
            raise ValueError(f"linger_ms={linger_ms} must be >= 0")
        if not 0 < batch_bytes_max <= BATCH_BYTES_LIMIT:
            raise ValueError(
                f"batch_bytes_max={batch_bytes_max} must be in (0, {BATCH_BYTES_LIMIT}]"
            )
        self._idempotent = resolve_idempotence(
            enable_idempotence, acks, self._acks, max_in_flight_per_partition
        )
        if max_in_flight_per_partition is None:
            max_in_flight_per_partition = (
                IDEMPOTENT_IN_FLIGHT_MAX if self._idempotent else IN_FLIGHT_NON_IDEMPOTENT_DEFAULT
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
        self._adaptive_linger = adaptive_linger
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
        self._sender: Sender | None = None
        self._parked: dict[str, deque[_Parked]] = {}
        self._parked_bytes = 0
        self._admitters: dict[str, asyncio.Task[None]] = {}
        self._room = asyncio.Event()
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
        self._sender = Sender(
            self._meta,
            self._acc,
            SenderConfig(
                acks=self._acks,
                codec=self._codec,
                linger_s=self._linger_s,
                max_in_flight=self._max_in_flight,
                retries=self._retries,
                retry_backoff_ms=self._retry_backoff_ms,
                request_timeout_ms=self._request_timeout_ms,
                delivery_timeout_s=self._delivery_timeout_s,
                idempotent=self._idempotent,
                adaptive_linger=self._adaptive_linger,
            ),
            on_released=self._on_released,
            force_drain=lambda: self._flushing > 0,
        )

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
            admitters = list(self._admitters.values())
            for t in admitters:
                t.cancel()
            await asyncio.gather(self._sender_().close(), *admitters, return_exceptions=True)
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
    def idempotent(self) -> bool:
        """Whether batches carry a producer id and sequences (the class docstring)."""
        return self._idempotent

    @property
    def max_in_flight_per_partition(self) -> int:
        return self._max_in_flight

    @property
    def metadata(self) -> ClusterMetadata:
        if self._meta is None:
            raise TidelogError("the producer is not started: use `async with` or await start()")
        return self._meta

    async def partitions_for(self, topic: str) -> list[TopicPartition]:
        """Every partition of ``topic``, in order (raises UnknownTopic if it does not exist);
        the same answer as :meth:`Consumer.partitions_for`."""
        info = await self.metadata.wait_for_topic(topic, wait_ms=self._metadata_wait_ms)
        return [TopicPartition(topic, p) for p in range(info.partition_count)]

    # -- send -----------------------------------------------------------------------------------

    def send(
        self,
        topic: str,
        value: Any,
        key: Any = None,
        *,
        partition: int | None = None,
        headers: Sequence[Header] | None = None,
        timestamp_ms: int | None = None,
        on_delivery: DeliveryCallback | None = None,
    ) -> RecordFuture:
        """Queue one record and return at once; ``await`` the result for its RecordMetadata.

        ``send`` is a plain method, not a coroutine (aiokafka's ``send`` is a coroutine that
        returns a future): ``await producer.send(...)`` waits for the acknowledgement. Code
        ported from aiokafka as ``fut = await producer.send(...); md = await fut`` works and
        gives the same metadata (a RecordMetadata awaits to itself), but its first ``await``
        already waits for the record to be stored: to keep many records in flight, keep the
        futures (``futs.append(producer.send(...))``) and await them later, or pass
        ``on_delivery``.

        The partition is ``partition`` if given, murmur2 of the key for keyed records (as in
        Kafka), or the topic's sticky partition for keyless ones. ``key`` and ``value`` are
        bytes (bytearray and memoryview are copied to bytes) or None, or anything the
        producer's ``key_serializer`` / ``value_serializer`` turns into bytes (None is never
        serialized: a None value is a tombstone). ``on_delivery(error, metadata)`` is called
        on the event loop once the record is stored (error None) or failed (metadata None),
        as confluent-kafka's; :meth:`RecordFuture.add_done_callback` is the same hook.
        """
        meta = self.metadata
        if self._closed:
            raise TidelogError("the producer is closed")
        if self._sender is not None and self._sender.fatal is not None:
            raise self._sender.fatal
        if value is not None and (self._value_serializer is not None or type(value) is not bytes):
            value = self._to_bytes(value, self._value_serializer, "value")
        if key is not None and (self._key_serializer is not None or type(key) is not bytes):
            key = self._to_bytes(key, self._key_serializer, "key")
        size = record_size(value, key, headers)
        info = meta.topics.get(topic)
        if info is not None and topic not in self._parked and self._acc.has_room(size):
            tp = self._choose(info, key, partition, size)
            batch, index = self._append_one(tp, value, key, headers, timestamp_ms, size)
            done = RecordFuture(batch, index)
            if on_delivery is not None:
                done.add_done_callback(_on_delivery_adapter(on_delivery))
            return done
        fut = RecordFuture(None, -1)
        if on_delivery is not None:
            fut.add_done_callback(_on_delivery_adapter(on_delivery))
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
        values: Sequence[Any],
        keys: Sequence[Any] | None = None,
        *,
        partition: int | None = None,
    ) -> BatchesFuture:
        """Queue many records at once, the fast path for bulk appends: the accumulator cuts
        ``values`` into batches of ``batch_bytes_max`` with no per-record Python work (keyed
        records are first grouped by partition). ``await`` the result for one BatchMetadata
        per batch the records went to. The producer's serializers apply as in :meth:`send`
        (costing a call per record); without them values must be bytes. A None value is a
        tombstone, never serialized."""
        meta = self.metadata
        if self._closed:
            raise TidelogError("the producer is closed")
        if self._sender is not None and self._sender.fatal is not None:
            raise self._sender.fatal
        if self._value_serializer is not None:
            ser = self._value_serializer
            values = [None if v is None else self._to_bytes(v, ser, "value") for v in values]
        if keys is not None and self._key_serializer is not None:
            kser = self._key_serializer
            keys = [None if k is None else self._to_bytes(k, kser, "key") for k in keys]
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
        value: Any,
        key: Any = None,
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

    @staticmethod
    def _to_bytes(obj: object, serializer: Serializer | None, what: str) -> bytes:
        """A key or value as the bytes to send, or an InvalidRecord that says what to do."""
        if serializer is not None:
            try:
                out = serializer(obj)
            except Exception as exc:
                raise InvalidRecord(
                    f"the {what}_serializer raised {type(exc).__name__}: {exc} (for the "
                    f"{what} {obj!r:.80})"
                ) from exc
            if type(out) is bytes:
                return out
            obj = out
            if not isinstance(obj, (bytearray, memoryview)):
                raise InvalidRecord(
                    f"the {what}_serializer returned {type(obj).__name__}, not bytes: make it "
                    f"return bytes (for example json.dumps(v).encode())"
                )
        if isinstance(obj, (bytes, bytearray, memoryview)):
            return bytes(obj)
        hint = f"{what}.encode()" if isinstance(obj, str) else f"bytes of the {what}"
        raise InvalidRecord(
            f"a record {what} must be bytes or None, not {type(obj).__name__}: pass {hint}, "
            f"or create the Producer with {what}_serializer= to convert it"
        )

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
        elif created and self._adaptive_linger:
            # Sent at once if nothing of the partition is in flight (the sender decides);
            # the drain runs after the caller yields, so a burst of sends shares the batch.
            self._wake(tp)
            if self._sender is not None and self._sender.sends_at_once(tp):
                return  # no linger timer: it would only wake the drain for nothing
        self._loop_().call_later(self._linger_s, self._wake, tp)

    def _append_many(
        self,
        info: TopicInfo,
        values: Sequence[bytes | None],
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
        values: Sequence[bytes | None],
        keys: Sequence[bytes | None],
        handle: BatchesFuture,
    ) -> None:
        n = info.partition_count
        groups: dict[int, tuple[list[bytes | None], list[bytes | None]]] = {}
        sticky = self._sticky.current(info.name, n)
        for value, key in zip(values, keys, strict=True):
            if key is not None and type(key) is not bytes:
                key = self._to_bytes(key, None, "key")
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
        fut._admitted_now()
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
            if isinstance(target, RecordFuture):
                target._admitted_now()
            if target._admitted is not None and not target._admitted.done():
                target._admitted.set_result(None)
        if dq:
            log.warning("records for topic %r failed: %s", topic, err)

    # -- internals: sending ---------------------------------------------------------------------

    def _sender_(self) -> Sender:
        assert self._sender is not None
        return self._sender

    def _wake(self, tp: TopicPartition) -> None:
        if self._sender is not None:
            self._sender.wake(tp)

    def _on_released(self) -> None:
        self._room.set()
        self._check_idle()

    def _fail_everything(self, err: TidelogError) -> None:
        for topic in list(self._parked):
            self._fail_parked(topic, err)
        for tp in list(self._acc.batches):
            self._sender_().fail_partition(tp, err)
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
