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
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass
from itertools import repeat
from types import TracebackType
from typing import Any, Literal

import grpc
import grpc.aio

from tidelog.client.connection import Connection, PemSource
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
                try:
                    if self.fetch_offset is None:
                        reset = await c._reset_offset(tp, None)
                        # position() may have resolved it meanwhile: one answer wins.
                        self.fetch_offset = c._positions.setdefault(tp, reset)
                    address = await c._leader(tp)
                    await self._stream(meta.broker(address))
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

    async def _stream(self, stub: broker_pb2_grpc.BrokerAsyncStub) -> None:
        c = self.consumer
        assert self.fetch_offset is not None
        request = broker_pb2.FetchRequest(
            topic=self.tp.topic,
            partition=self.tp.partition,
            offset=self.fetch_offset,
            max_bytes=c._max_bytes,
            max_wait_ms=c._fetch_max_wait_ms,
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

    async def stop(self) -> None:
        if self._meta is None:
            return
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
        self._assignment = wanted
        if self._meta is not None:
            for tp in wanted:
                if tp not in self._fetchers:
                    self._start_fetcher(tp)

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
        deadline = time.monotonic() + timeout_ms / 1000
        if until_end:
            await self._learn_ends()
        while True:
            self._data.clear()
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
            if f is None:
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
