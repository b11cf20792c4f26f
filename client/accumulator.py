"""The producer's record accumulator: records waiting to be sent, grouped into batches.

Plain data and no I/O, so it is tested without a broker. Each partition has a deque of
pending batches; records are appended to the last, open batch until it reaches
``batch_bytes_max``, and the sender takes batches from the front. The bytes of every batch
not yet acknowledged count against ``buffer_bytes_max``: the producer stops admitting records
when it is reached, which bounds the memory a producer can hold for a slow or absent node.

Record sizes are the exact columnar sizes of :mod:`tidelog.records` before compression (12
bytes of columns per record plus key and value), so a batch stays under its bound.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import operator
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from itertools import accumulate, repeat

from tidelog.client.structs import Header, TopicPartition
from tidelog.errors import TidelogError
from tidelog.records import BATCH_OVERHEAD_BYTES, Codec, encode_batch

__all__ = [
    "RECORD_OVERHEAD_BYTES",
    "Accumulator",
    "PendingBatch",
    "record_size",
]

log = logging.getLogger(__name__)

#: Column bytes per record: a timestamp delta, a key length and a value length (int32 each).
RECORD_OVERHEAD_BYTES = 12
#: Per header: a uint16 key length and an int32 value length.
HEADER_OVERHEAD_BYTES = 6
#: Once any record of a batch has headers, every record has a uint16 header count.
HEADERS_COUNT_BYTES = 2
#: Slack when comparing a batch's age to linger_ms: the timer that fires at creation +
#: linger may read a clock a hair earlier in floating point, and must still find it ready.
LINGER_SLACK_S = 0.0005


def record_size(value: bytes | None, key: bytes | None, headers: Sequence[Header] | None) -> int:
    size = RECORD_OVERHEAD_BYTES
    if value is not None:
        size += len(value)
    if key is not None:
        size += len(key)
    if headers:
        size += HEADERS_COUNT_BYTES
        for name, hval in headers:
            size += HEADER_OVERHEAD_BYTES + len(name.encode()) + (0 if hval is None else len(hval))
    return size


class PendingBatch:
    """Records bound for one partition and sent in one request, with their fate.

    Columns are kept as parallel lists (keys, headers and timestamps only once a record has
    one), which is the shape ``encode_batch`` wants. Completion is recorded on the batch
    itself; an asyncio future is made only for someone who awaits it before it completes,
    so a batch nobody waits for costs no future and leaves no unretrieved exception.
    """

    __slots__ = (
        "acked_s",
        "attempts",
        "base_offset",
        "callbacks",
        "closed",
        "created_s",
        "done",
        "error",
        "first_sent_s",
        "headers",
        "keys",
        "maybe_written",
        "partition",
        "payload",
        "producer_epoch",
        "producer_id",
        "sent_behind",
        "seq",
        "sequence",
        "size_bytes",
        "timestamp_ms",
        "timestamps",
        "topic",
        "values",
        "waiters",
    )

    def __init__(
        self, topic: str, partition: int, seq: int, created_s: float, timestamp_ms: int
    ) -> None:
        self.topic = topic
        self.partition = partition
        #: Order of creation within the partition: retries are resent in this order.
        self.seq = seq
        self.created_s = created_s
        #: The timestamp of records appended without one: the wall clock at creation.
        self.timestamp_ms = timestamp_ms
        self.values: list[bytes | None] = []
        self.keys: list[bytes | None] | None = None
        self.headers: list[Sequence[Header]] | None = None
        self.timestamps: list[int] | None = None
        self.size_bytes = BATCH_OVERHEAD_BYTES
        self.closed = False
        self.payload: bytes | None = None
        self.attempts = 0
        self.first_sent_s = 0.0
        self.acked_s = 0.0
        self.base_offset = -1
        self.done = False
        self.error: TidelogError | None = None
        self.waiters: list[asyncio.Future[None]] | None = None
        #: Run (soon, on the event loop) once the batch completes: RecordFuture callbacks.
        self.callbacks: list[Callable[[], None]] | None = None
        #: The idempotent producer's stamp (-1: none), set once when the sender first drains
        #: the batch and kept on every retry (client/sender.py).
        self.producer_id = -1
        self.producer_epoch = -1
        self.sequence = -1
        #: Whether the latest attempt left while a batch before it was not yet acknowledged:
        #: a sequence refusal of that attempt may then predate the earlier batch's store.
        self.sent_behind = False
        #: Whether an attempt's outcome is unknown (no answer; the node may have stored it).
        self.maybe_written = False

    @property
    def record_count(self) -> int:
        return len(self.values)

    def __repr__(self) -> str:
        state = "done" if self.done else ("closed" if self.closed else "open")
        return (
            f"PendingBatch({self.topic}/{self.partition} seq={self.seq} "
            f"records={len(self.values)} bytes={self.size_bytes} {state})"
        )

    def append(
        self,
        value: bytes | None,
        key: bytes | None,
        headers: Sequence[Header] | None,
        timestamp_ms: int | None,
        size: int,
    ) -> int:
        index = len(self.values)
        self.values.append(value)
        if key is not None or self.keys is not None:
            if self.keys is None:
                self.keys = [None] * index
            self.keys.append(key)
        if headers or self.headers is not None:
            if self.headers is None:
                self.headers = [()] * index
            self.headers.append(headers or ())
        if timestamp_ms is not None or self.timestamps is not None:
            if self.timestamps is None:
                self.timestamps = [self.timestamp_ms] * index
            self.timestamps.append(self.timestamp_ms if timestamp_ms is None else timestamp_ms)
        self.size_bytes += size
        return index

    def extend(
        self, values: Sequence[bytes | None], keys: Sequence[bytes | None] | None, size: int
    ) -> int:
        index = len(self.values)
        n = len(values)
        self.values.extend(values)
        if keys is not None or self.keys is not None:
            if self.keys is None:
                self.keys = [None] * index
            self.keys.extend(keys if keys is not None else repeat(None, n))
        if self.headers is not None:
            self.headers.extend(repeat((), n))
        if self.timestamps is not None:
            self.timestamps.extend(repeat(self.timestamp_ms, n))
        self.size_bytes += size
        return index

    def record_timestamp(self, index: int) -> int:
        return self.timestamp_ms if self.timestamps is None else self.timestamps[index]

    def stamp(self, producer_id: int, producer_epoch: int, sequence: int) -> None:
        """Give the batch its idempotent identity (the encoded bytes are rebuilt)."""
        self.producer_id = producer_id
        self.producer_epoch = producer_epoch
        self.sequence = sequence
        self.payload = None

    def encode(self, codec: Codec) -> bytes:
        """The wire bytes, built once: a retry resends the same batch, CRC and all."""
        if self.payload is None:
            self.payload = encode_batch(
                self.values,
                self.keys,
                self.timestamp_ms if self.timestamps is None else self.timestamps,
                self.headers,
                codec=codec,
                producer_id=self.producer_id,
                producer_epoch=self.producer_epoch,
                base_sequence=self.sequence,
            )
        return self.payload

    # -- completion -----------------------------------------------------------------------------

    def wait(self) -> asyncio.Future[None]:
        """A future that completes (always with None) when the batch does."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self.done:
            fut.set_result(None)
        else:
            if self.waiters is None:
                self.waiters = []
            self.waiters.append(fut)
        return fut

    def add_callback(self, fn: Callable[[], None]) -> None:
        """Call ``fn()`` soon after the batch completes (at once, soon, if it has)."""
        if self.done:
            call_soon([fn])
            return
        if self.callbacks is None:
            self.callbacks = []
        self.callbacks.append(fn)

    def complete(self, base_offset: int, now_s: float) -> None:
        self._finish(now_s)
        self.base_offset = base_offset
        self._run_callbacks()

    def fail(self, error: TidelogError, now_s: float) -> None:
        self._finish(now_s)
        self.error = error
        self._run_callbacks()

    def _run_callbacks(self) -> None:
        callbacks, self.callbacks = self.callbacks, None
        if callbacks:
            call_soon(callbacks)

    def _finish(self, now_s: float) -> None:
        assert not self.done, f"{self!r} completed twice"
        self.done = True
        self.acked_s = now_s
        # The columns are no longer needed; only the offsets are.
        self.payload = None
        waiters, self.waiters = self.waiters, None
        for fut in waiters or ():
            if not fut.done():
                fut.set_result(None)


def call_soon(callbacks: list[Callable[[], None]]) -> None:
    """Run user callbacks on the next loop iteration, never inside the sender: a callback
    that sends again or raises cannot disturb the batch bookkeeping."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        _run_all(callbacks)
    else:
        loop.call_soon(_run_all, callbacks)


def _run_all(callbacks: list[Callable[[], None]]) -> None:
    for fn in callbacks:
        try:
            fn()
        except Exception:
            log.exception("a delivery callback raised (the producer carries on)")


class Accumulator:
    """``dict[TopicPartition, deque[PendingBatch]]`` with a byte budget."""

    def __init__(self, *, batch_bytes_max: int, buffer_bytes_max: int) -> None:
        if batch_bytes_max <= BATCH_OVERHEAD_BYTES:
            raise ValueError(
                f"batch_bytes_max={batch_bytes_max} leaves no room for records after the "
                f"{BATCH_OVERHEAD_BYTES}-byte batch header"
            )
        if buffer_bytes_max < batch_bytes_max:
            raise ValueError(
                f"buffer_bytes_max={buffer_bytes_max} must be at least "
                f"batch_bytes_max={batch_bytes_max}"
            )
        self.batch_bytes_max = batch_bytes_max
        self.buffer_bytes_max = buffer_bytes_max
        self.batches: dict[TopicPartition, deque[PendingBatch]] = {}
        #: Bytes of every batch created and not yet completed (queued or in flight).
        self.buffered_bytes = 0
        self._next_seq: dict[TopicPartition, int] = {}

    # -- admission ------------------------------------------------------------------------------

    def has_room(self, nbytes: int) -> bool:
        """Whether ``nbytes`` more fit in the budget. An empty buffer takes anything, so a
        record larger than the whole budget still gets through (alone)."""
        return self.buffered_bytes == 0 or self.buffered_bytes + nbytes <= self.buffer_bytes_max

    def open_batch(self, tp: TopicPartition) -> PendingBatch | None:
        dq = self.batches.get(tp)
        if dq:
            last = dq[-1]
            if not last.closed:
                return last
        return None

    def fits_open_batch(self, tp: TopicPartition, size: int) -> bool:
        batch = self.open_batch(tp)
        return batch is not None and batch.size_bytes + size <= self.batch_bytes_max

    def _new_batch(self, tp: TopicPartition, now_s: float, now_ms: int) -> PendingBatch:
        seq = self._next_seq.get(tp, 0)
        self._next_seq[tp] = seq + 1
        batch = PendingBatch(tp.topic, tp.partition, seq, now_s, now_ms)
        dq = self.batches.get(tp)
        if dq is None:
            dq = self.batches[tp] = deque()
        elif dq and not dq[-1].closed:
            dq[-1].closed = True
        dq.append(batch)
        self.buffered_bytes += BATCH_OVERHEAD_BYTES
        return batch

    def append(
        self,
        tp: TopicPartition,
        value: bytes | None,
        key: bytes | None,
        headers: Sequence[Header] | None,
        timestamp_ms: int | None,
        size: int,
        now_s: float,
        now_ms: int,
    ) -> tuple[PendingBatch, int, bool]:
        """Append one record; returns its batch, its index there, and whether the batch is
        new (the caller starts the linger timer, and the previous batch became sendable)."""
        batch = self.open_batch(tp)
        created = False
        if batch is not None:
            size += _headers_extra(batch, bool(headers))
        if batch is None or (batch.values and batch.size_bytes + size > self.batch_bytes_max):
            if batch is not None:
                size -= _headers_extra(batch, bool(headers))
            batch = self._new_batch(tp, now_s, now_ms)
            created = True
        index = batch.append(value, key, headers, timestamp_ms, size)
        self.buffered_bytes += size
        if batch.size_bytes >= self.batch_bytes_max:
            batch.closed = True
        return batch, index, created

    def fill(
        self,
        tp: TopicPartition,
        values: Sequence[bytes | None],
        keys: Sequence[bytes | None] | None,
        start: int,
        now_s: float,
        now_ms: int,
        cumulative: Sequence[int] | None = None,
    ) -> tuple[PendingBatch, int, int, bool]:
        """Append ``values[start:]`` to the partition's open batch (or a new one) until the
        batch is full; returns ``(batch, index in batch, records taken, batch is new)``.

        ``cumulative`` is the running sum of record sizes (``cumulative_sizes``), computed once
        per call of ``send_many``: the cut is found by bisection, with no per-record loop.
        """
        n = len(values)
        assert 0 <= start < n, (start, n)
        if cumulative is None:
            cumulative = cumulative_sizes(values, keys)
        before = cumulative[start - 1] if start else 0
        batch = self.open_batch(tp)
        created = False
        if (
            batch is None
            or batch.headers is not None  # its records carry a header count: start afresh
            or batch.size_bytes + cumulative[start] - before > self.batch_bytes_max
        ):
            batch = self._new_batch(tp, now_s, now_ms)
            created = True
        room = self.batch_bytes_max - batch.size_bytes
        end = bisect.bisect_right(cumulative, before + room, lo=start, hi=n)
        end = max(end, start + 1)  # a record larger than a batch travels alone
        size = cumulative[end - 1] - before
        index = batch.extend(values[start:end], None if keys is None else keys[start:end], size)
        self.buffered_bytes += size
        if end < n or batch.size_bytes >= self.batch_bytes_max:
            batch.closed = True
        return batch, index, end - start, created

    # -- draining -------------------------------------------------------------------------------

    def head(self, tp: TopicPartition) -> PendingBatch | None:
        dq = self.batches.get(tp)
        return dq[0] if dq else None

    def pop_ready(
        self, tp: TopicPartition, now_s: float, linger_s: float, force: bool
    ) -> PendingBatch | None:
        """The front batch if it may be sent now: it is full or closed, its linger time is
        over, or a flush asked for everything."""
        dq = self.batches.get(tp)
        if not dq:
            return None
        head = dq[0]
        lingered = now_s - head.created_s + LINGER_SLACK_S >= linger_s
        if not (head.closed or force or lingered or len(dq) > 1):
            return None
        head.closed = True
        dq.popleft()
        return head

    def push_front(self, tp: TopicPartition, batches: Sequence[PendingBatch]) -> None:
        """Requeue batches for a retry ahead of everything newer, in their original order."""
        dq = self.batches.get(tp)
        if dq is None:
            dq = self.batches[tp] = deque()
        for batch in sorted(batches, key=operator.attrgetter("seq"), reverse=True):
            batch.closed = True
            dq.appendleft(batch)

    def release(self, batch: PendingBatch) -> None:
        """Give back a completed batch's bytes."""
        self.buffered_bytes -= batch.size_bytes
        assert self.buffered_bytes >= 0, self.buffered_bytes

    def drop(self, tp: TopicPartition) -> list[PendingBatch]:
        """Remove and return every queued batch of a partition (to fail them)."""
        dq = self.batches.pop(tp, None)
        return list(dq or ())

    def queued_partitions(self) -> list[TopicPartition]:
        return [tp for tp, dq in self.batches.items() if dq]

    def queued_batches(self) -> int:
        return sum(len(dq) for dq in self.batches.values())


def _headers_extra(batch: PendingBatch, has_headers: bool) -> int:
    """Header-count bytes a record adds to ``batch`` beyond its own record_size: the counts
    of the earlier records when it is the first with headers, or its own zero count when it
    has none but the batch has."""
    if has_headers:
        return 0 if batch.headers is not None else HEADERS_COUNT_BYTES * len(batch.values)
    return HEADERS_COUNT_BYTES if batch.headers is not None else 0


def cumulative_sizes(
    values: Sequence[bytes | None], keys: Sequence[bytes | None] | None
) -> list[int]:
    """Running totals of record sizes, built from C-level iterators (no Python loop) unless
    a value is None (a tombstone)."""
    lens: Iterable[int] = (
        map(len, values)  # type: ignore[arg-type]
        if None not in values
        else (0 if v is None else len(v) for v in values)
    )
    sizes = map(operator.add, lens, repeat(RECORD_OVERHEAD_BYTES))
    if keys is not None:
        sizes = map(operator.add, sizes, (0 if k is None else len(k) for k in keys))
    return list(accumulate(sizes))
