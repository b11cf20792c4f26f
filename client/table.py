"""The Table client: the current value per key of a compacted topic, read from the nodes'
RocksDB tables (the Table gRPC service, proto/tidelog/v1/table.proto).

    async with Table("127.0.0.1:9092", "rates") as rates:
        row = await rates.get(b"EUR/USD")               # Row | None
        many = await rates.get_many([b"EUR/USD", b"GBP/USD"])
        async for page in rates.scan(prefix=b"EUR/"):   # pages in key order, per partition
            ...
        async for change in rates.watch():              # snapshot rows, then every change
            ...

A key's partition is the producer's (murmur2, :mod:`tidelog.client.partitioner`), and each
read goes to that partition's leader, following NOT_LEADER and failovers as the consumer
does (:mod:`tidelog.client.retry`). Every answer reflects a committed offset of its
partition; ``min_offset`` (an offset a producer got for a record of that partition) makes a
read wait until the table holds that record: read your own writes.

A topic-wide scan or watch is one per partition: keys are in byte order within a partition,
partitions one after another (scan) or interleaved (watch). :meth:`Table.read_all` returns
the whole table with the offset each partition reflects, which is where
``watch(from_offsets=...)`` continues without a gap or a duplicate.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
from collections import deque
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import repeat
from types import TracebackType
from typing import NamedTuple, TypeVar

import grpc
import grpc.aio

from tidelog.client.connection import Connection, PemSource
from tidelog.client.limits import RETRY_BACKOFF_MS_DEFAULT
from tidelog.client.metadata import ClusterMetadata, parse_bootstrap
from tidelog.client.partitioner import partition_for_key, partitions_for_keys
from tidelog.client.retry import Retry
from tidelog.client.structs import TopicPartition
from tidelog.errors import (
    NodeUnavailable,
    RequestTimedOut,
    TidelogError,
    UnknownPartition,
    UnknownTopic,
    from_rpc_error,
)
from tidelog.v1 import table_pb2 as pb
from tidelog.v1 import table_pb2_grpc as pb_grpc

__all__ = ["Row", "ScanPage", "Table", "TableChange", "TableContents", "TableWatch"]

log = logging.getLogger(__name__)

T = TypeVar("T")
#: A key as the Table methods take it: bytes, or a str sent as UTF-8.
Key = bytes | str

#: Keys per GetMany request (the node's limit).
GET_MANY_KEYS_PER_REQUEST = 10_000
#: Rows per scan page asked for by default (the node caps a page at 10,000 rows, ~4 MiB).
SCAN_PAGE_ROWS_DEFAULT = 5_000
#: Deadline of one Table request; a min_offset wait adds its own timeout to it.
REQUEST_TIMEOUT_MS_DEFAULT = 30_000
#: How long a min_offset read may wait for the table on the node (its default: 10 s).
MIN_OFFSET_TIMEOUT_MS_DEFAULT = 10_000
#: Attempts of one request that meets NOT_LEADER, no leader or an unreachable node.
ATTEMPTS_MAX = 20
METADATA_WAIT_MS_DEFAULT = 5_000
#: Watch events (lists of changes) buffered per watch before the partitions' streams pause.
WATCH_QUEUE_EVENTS_MAX = 64


class Row(NamedTuple):
    """The current value of a key: set by the record at ``offset`` of ``partition``. A
    NamedTuple, the cheapest object to build, as there is one per row of a scan."""

    key: bytes
    value: bytes
    offset: int
    timestamp_ms: int
    partition: int


@dataclass(frozen=True, slots=True)
class ScanPage:
    """One page of a scan: rows of one partition in key order, all read from the one snapshot
    of the partition's table that reflects ``applied_offset``."""

    partition: int
    rows: list[Row]
    applied_offset: int


@dataclass(frozen=True, slots=True)
class TableContents:
    """A whole table: ``rows`` by key, and per partition the offset they reflect (a consistent
    snapshot per partition), where ``watch(from_offsets=offsets)`` continues."""

    rows: dict[bytes, Row]
    offsets: dict[int, int]


class TableChange(NamedTuple):
    """One event of a watch: a row of the initial snapshot (``snapshot``), a new value, or a
    deletion (``value is None``) by the record at ``offset`` of ``partition``."""

    partition: int
    offset: int
    key: bytes
    value: bytes | None
    timestamp_ms: int
    snapshot: bool = False

    @property
    def deleted(self) -> bool:
        return self.value is None


def _key(k: Key) -> bytes:
    if type(k) is bytes:
        return k
    if isinstance(k, str):
        return k.encode()
    if isinstance(k, bytes | bytearray | memoryview):
        return bytes(k)
    raise TypeError(f"a table key is bytes or str, got {type(k).__name__}")


def _scan_call(
    request: pb.TableScanRequest, stub: pb_grpc.TableAsyncStub, timeout_s: float
) -> Awaitable[pb.TableScanResponse]:
    return stub.Scan(request, timeout=timeout_s)


def _row(r: pb.TableRow, partition: int) -> Row:
    return Row(r.key, r.value, r.offset, r.timestamp_ms, partition)


def _keys(keys: Iterable[Key]) -> list[bytes]:
    """The keys as bytes; a list of bytes (the usual case) is checked in one C-level pass."""
    ks = list(keys)
    if set(map(type, ks)) <= {bytes}:
        return ks  # type: ignore[return-value]  # every key is bytes, just checked
    return [_key(k) for k in ks]


#: ``tuple.__new__(Row, fields)`` builds a Row from a tuple in C; ``Row(*fields)`` goes
#: through the NamedTuple's Python ``__new__``, several times slower per row.
_new_row = tuple.__new__


def _columns(rows: pb.TableRows, partition: int) -> tuple[list[bytes], list[Row]]:
    """The keys of a page and its rows, decoded column by column: each column copied out of
    the message once (a list), then the rows made in C from the zipped columns. The cyclic
    garbage collector is paused meanwhile: the tuples built hold only bytes and ints (no
    cycle to find), and the collections their allocation would trigger (one per ~700
    objects) cost as much as building them."""
    keys = list(rows.keys)
    values, offsets, stamps = list(rows.values), list(rows.offsets), list(rows.timestamps_ms)
    if not len(keys) == len(values) == len(offsets) == len(stamps):
        raise TidelogError(
            f"malformed rows from the node: {len(keys)} keys, {len(values)} values, "
            f"{len(offsets)} offsets, {len(stamps)} timestamps"
        )
    paused = gc.isenabled()
    gc.disable()
    try:
        fields = zip(keys, values, offsets, stamps, repeat(partition))
        return keys, list(map(_new_row, repeat(Row), fields))
    finally:
        if paused:
            gc.enable()


def _rows(rows: pb.TableRows, partition: int) -> list[Row]:
    """The rows of a page (:func:`_columns`)."""
    return _columns(rows, partition)[1]


def _changes(event: pb.TableWatchEvent, partition: int) -> list[TableChange]:
    rows = event.rows
    values: Iterable[bytes | None] = rows.values
    if event.deleted:
        values = [None if d else v for v, d in zip(rows.values, event.deleted, strict=True)]
    return list(
        map(
            TableChange,
            repeat(partition),
            rows.offsets,
            rows.keys,
            values,
            rows.timestamps_ms,
            repeat(event.snapshot),
        )
    )


class Table:
    """The table of one compacted topic (module docstring). Connection options are those of
    :class:`~tidelog.client.Producer` (``tls``, ``ca``, ``client_cert``, ``client_key``,
    ``token``). ``linearizable=True`` makes every get, get_many and scan confirm first, in a
    Raft round, that the node still leads (no stale read from a deposed leader), at the cost
    of one round trip to the followers per request."""

    def __init__(
        self,
        bootstrap: str | Sequence[str],
        topic: str,
        *,
        request_timeout_ms: int = REQUEST_TIMEOUT_MS_DEFAULT,
        min_offset_timeout_ms: int = MIN_OFFSET_TIMEOUT_MS_DEFAULT,
        retry_backoff_ms: int = RETRY_BACKOFF_MS_DEFAULT,
        metadata_wait_ms: int = METADATA_WAIT_MS_DEFAULT,
        linearizable: bool = False,
        tls: bool = False,
        ca: PemSource | None = None,
        client_cert: PemSource | None = None,
        client_key: PemSource | None = None,
        token: str | None = None,
    ) -> None:
        if request_timeout_ms <= 0 or min_offset_timeout_ms <= 0:
            raise ValueError("request_timeout_ms and min_offset_timeout_ms must be > 0")
        self.topic = topic
        self._bootstrap = parse_bootstrap(bootstrap)
        self._connection = Connection.create(
            tls=tls, ca=ca, client_cert=client_cert, client_key=client_key, token=token
        )
        self._request_timeout_ms = request_timeout_ms
        self._min_offset_timeout_ms = min_offset_timeout_ms
        self._retry_backoff_ms = retry_backoff_ms
        self._metadata_wait_ms = metadata_wait_ms
        self._linearizable = linearizable
        self._meta: ClusterMetadata | None = None
        self._stubs: dict[str, pb_grpc.TableAsyncStub] = {}
        self._watches: set[TableWatch] = set()

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect and load the topic's metadata; UnknownTopic when it does not exist."""
        if self._meta is not None:
            return
        meta = ClusterMetadata(self._bootstrap, connection=self._connection)
        try:
            await meta.refresh()
            await meta.wait_for_topic(self.topic, wait_ms=self._metadata_wait_ms)
        except BaseException:
            await meta.close()
            raise
        self._meta = meta

    async def close(self) -> None:
        for w in list(self._watches):
            await w.close()
        if self._meta is None:
            return
        meta, self._meta = self._meta, None
        self._stubs.clear()
        await meta.close()

    stop = close

    async def __aenter__(self) -> Table:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def _meta_(self) -> ClusterMetadata:
        if self._meta is None:
            raise TidelogError("the table is not started: use `async with` or await start()")
        return self._meta

    # -- partitions -----------------------------------------------------------------------------

    def partition_count(self) -> int:
        info = self._meta_().topic(self.topic)
        if info is None:
            raise UnknownTopic(f"topic {self.topic!r} is not known", topic=self.topic)
        return info.partition_count

    def partition_for(self, key: Key) -> int:
        """The partition holding ``key``: the one the producer sends it to."""
        return partition_for_key(_key(key), self.partition_count())

    def _partitions(self, partition: int | None) -> list[int]:
        count = self.partition_count()
        if partition is None:
            return list(range(count))
        if not 0 <= partition < count:
            raise UnknownPartition(
                f"topic {self.topic!r} has partitions 0..{count - 1}; there is no "
                f"partition {partition}",
                topic=self.topic,
            )
        return [partition]

    # -- reads ----------------------------------------------------------------------------------

    async def get(
        self, key: Key, *, min_offset: int | None = None, partition: int | None = None
    ) -> Row | None:
        """The current value of ``key``, or None. ``min_offset``: wait until the table holds
        the record at that offset of the key's partition (a producer's RecordMetadata.offset).
        ``partition`` overrides the partitioner (for records sent to an explicit one)."""
        k = _key(key)
        p = self.partition_for(k) if partition is None else self._partitions(partition)[0]
        request = pb.TableGetRequest(
            topic=self.topic,
            partition=p,
            key=k,
            min_offset=min_offset,
            timeout_ms=self._min_offset_timeout_ms if min_offset is not None else 0,
            linearizable=self._linearizable,
        )
        resp: pb.TableGetResponse = await self._unary(
            p, lambda stub, t: stub.Get(request, timeout=t), waits=min_offset is not None
        )
        return _row(resp.row, p) if resp.found else None

    async def get_many(
        self, keys: Iterable[Key], *, min_offsets: Mapping[int, int] | None = None
    ) -> dict[bytes, Row]:
        """The current rows of the keys that exist, by key (missing keys are absent). One
        request per partition (and per 10,000 keys), sent at once. ``min_offsets``:
        partition -> offset each partition's table must hold first."""
        by_part: dict[int, list[bytes]] = {}
        count = self.partition_count()
        if count == 1:  # no hashing: every key is in partition 0
            if ks := _keys(keys):
                by_part[0] = ks
        else:
            ks = _keys(keys)
            for k, p in zip(ks, partitions_for_keys(ks, count), strict=True):
                by_part.setdefault(p, []).append(k)
        calls: list[Awaitable[tuple[list[bytes], list[Row]]]] = []
        for p, ks in by_part.items():
            wait = None if min_offsets is None else min_offsets.get(p)
            for i in range(0, len(ks), GET_MANY_KEYS_PER_REQUEST):
                calls.append(self._get_many(p, ks[i : i + GET_MANY_KEYS_PER_REQUEST], wait))
        out: dict[bytes, Row] = {}
        for found, rows in await asyncio.gather(*calls):
            out.update(zip(found, rows, strict=True))
        return out

    async def _get_many(
        self, p: int, keys: list[bytes], min_offset: int | None
    ) -> tuple[list[bytes], list[Row]]:
        request = pb.TableGetManyRequest(
            topic=self.topic,
            partition=p,
            keys=keys,
            min_offset=min_offset,
            timeout_ms=self._min_offset_timeout_ms if min_offset is not None else 0,
            linearizable=self._linearizable,
        )
        resp: pb.TableGetManyResponse = await self._unary(
            p, lambda stub, t: stub.GetMany(request, timeout=t), waits=min_offset is not None
        )
        return _columns(resp.rows, p)

    async def scan(
        self,
        *,
        prefix: Key | None = None,
        start: Key | None = None,
        end: Key | None = None,
        partition: int | None = None,
        page_size: int = SCAN_PAGE_ROWS_DEFAULT,
        min_offsets: Mapping[int, int] | None = None,
    ) -> AsyncGenerator[ScanPage, None]:
        """The rows with ``prefix`` and/or in ``[start, end)``, in pages: each partition's (or
        only ``partition``'s) rows in key order, from one snapshot of its table. A page asked
        after that snapshot expired on the node (the scan was idle for a minute, or its
        leader changed) raises ScanExpired: restart the scan."""
        if page_size <= 0:
            raise ValueError(f"page_size must be > 0, got {page_size}")
        for p in self._partitions(partition):
            wait = None if min_offsets is None else min_offsets.get(p)
            async for page in self._scan_partition(p, prefix, start, end, page_size, wait):
                yield page

    async def _scan_partition(
        self,
        p: int,
        prefix: Key | None,
        start: Key | None,
        end: Key | None,
        page_size: int,
        wait: int | None,
    ) -> AsyncGenerator[ScanPage, None]:
        """One partition's pages. The next page is asked for as soon as a page arrives, so the
        node reads it while this side decodes and the caller handles the current one."""
        base = pb.TableScanRequest(
            topic=self.topic,
            partition=p,
            prefix=_key(prefix) if prefix is not None else b"",
            start=_key(start) if start is not None else None,
            end=_key(end) if end is not None else None,
            limit=page_size,
        )

        def ask(token: bytes) -> asyncio.Task[pb.TableScanResponse]:
            request = pb.TableScanRequest()
            request.CopyFrom(base)
            request.continuation_token = token
            if not token:
                request.linearizable = self._linearizable
                if wait is not None:
                    request.min_offset = wait
                    request.timeout_ms = self._min_offset_timeout_ms
            return asyncio.ensure_future(
                self._unary(
                    p, functools.partial(_scan_call, request), waits=not token and wait is not None
                )
            )

        pending: asyncio.Task[pb.TableScanResponse] | None = ask(b"")
        try:
            while pending is not None:
                resp = await pending
                token = resp.continuation_token
                pending = ask(token) if token else None
                yield ScanPage(p, _rows(resp.rows, p), resp.applied_offset)
        finally:
            if pending is not None and not pending.done():
                pending.cancel()
                await asyncio.gather(pending, return_exceptions=True)

    async def read_all(
        self, *, prefix: Key | None = None, partition: int | None = None
    ) -> TableContents:
        """Every row (with ``prefix``) in one call, and the offset each partition's rows
        reflect: ``watch(from_offsets=contents.offsets)`` keeps a copy current from there.
        The partitions are read at once, one scan each."""

        async def one(p: int) -> tuple[int, list[ScanPage]]:
            pages = self._scan_partition(p, prefix, None, None, SCAN_PAGE_ROWS_DEFAULT, None)
            return p, [page async for page in pages]

        rows: dict[bytes, Row] = {}
        offsets: dict[int, int] = {}
        for p, pages in await asyncio.gather(*(one(p) for p in self._partitions(partition))):
            for page in pages:
                offsets[p] = page.applied_offset
                rows.update((r.key, r) for r in page.rows)
        return TableContents(rows, offsets)

    def watch(
        self,
        from_offsets: Mapping[int, int] | None = None,
        *,
        partitions: Iterable[int] | None = None,
    ) -> TableWatch:
        """Changes of the table as they are committed: for each partition without an offset
        in ``from_offsets``, first the rows of a snapshot (``change.snapshot``), then every
        change after it; a partition with one resumes from that offset (no snapshot). Use as
        ``async with table.watch() as w: async for change in w: ...`` (its streams run until
        ``w.close()`` or the table's close); ``w.positions`` says where to resume."""
        parts = (
            self._partitions(None)
            if partitions is None
            else [q for p in partitions for q in self._partitions(p)]
        )
        w = TableWatch(self, parts, dict(from_offsets or {}))
        self._watches.add(w)
        return w

    # -- requests -------------------------------------------------------------------------------

    def _stub(self, address: str) -> pb_grpc.TableAsyncStub:
        stub = self._stubs.get(address)
        if stub is None:
            stub = self._stubs[address] = pb_grpc.TableStub(self._meta_().channel(address))
        return stub

    async def _leader(self, partition: int) -> str:
        meta = self._meta_()
        await meta.wait_for_topic(self.topic, wait_ms=self._metadata_wait_ms)
        address = meta.leader_address(self.topic, partition)
        if address is None:
            await meta.refresh(force=False)
            address = meta.leader_address(self.topic, partition)
            if address is None:
                raise NodeUnavailable(f"partition {self.topic}/{partition} has no leader right now")
        return address

    async def _unary(
        self,
        partition: int,
        call: Callable[[pb_grpc.TableAsyncStub, float], Awaitable[T]],
        *,
        waits: bool = False,
    ) -> T:
        """``call(stub, timeout_s)`` at the partition's leader, retried after leader errors. A
        min_offset the node could not reach in time (``waits``) is not retried: the caller
        said how long to wait; nor is a linearizable read whose majority did not answer in
        the node's 5 s."""
        meta = self._meta_()
        retry = Retry(meta, TopicPartition(self.topic, partition), self._retry_backoff_ms)
        timeout_s = (
            self._request_timeout_ms + (self._min_offset_timeout_ms if waits else 0)
        ) / 1000
        for attempt in range(ATTEMPTS_MAX):
            await retry.wait()
            address: str | None = None
            try:
                address = await self._leader(partition)
                return await call(self._stub(address), timeout_s)
            except grpc.aio.AioRpcError as exc:
                err = from_rpc_error(exc)
            except NodeUnavailable as exc:
                err = exc
            if not err.retriable or attempt == ATTEMPTS_MAX - 1:
                raise err
            if (waits or self._linearizable) and isinstance(err, RequestTimedOut):
                raise err  # the node waited its bound already (min_offset, or a majority)
            if isinstance(err, UnknownTopic):
                await self._refresh_quietly()
                if meta.topic(self.topic) is None:
                    raise err
            log.debug("table %s/%d: %s; retrying", self.topic, partition, err)
            retry.failed(address, err)
        raise AssertionError("unreachable")

    async def _refresh_quietly(self) -> None:
        try:
            await self._meta_().refresh(force=False)
        except TidelogError as err:
            log.debug("metadata refresh failed: %s", err)


@dataclass(slots=True)
class _Item:
    partition: int
    changes: list[TableChange]
    #: The resume offset once every change of the item is seen (None: mid-snapshot).
    next_offset: int | None
    error: TidelogError | None = None


class TableWatch:
    """The changes of a watch (:meth:`Table.watch`): an async iterator of
    :class:`TableChange`, one stream per partition at its leader, reopened after failovers
    where it stopped. A partition's snapshot is collected whole before its rows are yielded,
    so a failover during it restarts the snapshot instead of yielding rows twice."""

    def __init__(self, table: Table, partitions: list[int], from_offsets: dict[int, int]) -> None:
        self._table = table
        self._queue: asyncio.Queue[_Item] = asyncio.Queue(WATCH_QUEUE_EVENTS_MAX)
        self._pending: deque[TableChange] = deque()
        self._current: _Item | None = None
        #: Partition -> the offset a watch resumed after the changes yielded so far continues
        #: from (``Table.watch(from_offsets=w.positions)``); absent until its snapshot is out.
        self.positions: dict[int, int] = {p: o for p, o in from_offsets.items() if p in partitions}
        self._snapshots_left = {p for p in partitions if p not in from_offsets}
        #: Partition -> the offset its snapshot reflected (the rows equal a replay of the log
        #: below it; the changes after them start there), once its rows are yielded.
        self.snapshot_offsets: dict[int, int] = {}
        self._closed = False
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._run(p, from_offsets.get(p)), name=f"watch {table.topic}/{p}")
            for p in partitions
        ]

    @property
    def snapshot_done(self) -> bool:
        """Whether every partition's snapshot rows have been yielded."""
        return not self._snapshots_left

    def __aiter__(self) -> TableWatch:
        return self

    async def __anext__(self) -> TableChange:
        while True:
            if self._pending:
                change = self._pending.popleft()
                item = self._current
                assert item is not None
                if not change.snapshot:
                    self.positions[item.partition] = change.offset + 1
                if not self._pending:
                    self._finish(item)
                return change
            if self._closed and self._queue.empty():
                raise StopAsyncIteration
            item = await self._queue.get()
            if item.error is not None:
                await self.close()
                raise item.error
            self._current = item
            if item.changes:
                self._pending.extend(item.changes)
            else:
                self._finish(item)

    def _finish(self, item: _Item) -> None:
        if item.next_offset is None:
            return
        self.positions[item.partition] = item.next_offset
        if item.partition in self._snapshots_left:
            self._snapshots_left.discard(item.partition)
            self.snapshot_offsets[item.partition] = item.next_offset

    async def close(self) -> None:
        self._closed = True
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._table._watches.discard(self)

    async def __aenter__(self) -> TableWatch:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _run(self, partition: int, offset: int | None) -> None:
        table = self._table
        meta = table._meta_()
        retry = Retry(meta, TopicPartition(table.topic, partition), table._retry_backoff_ms)
        try:
            while True:
                await retry.wait()
                address: str | None = None
                progressed = False
                try:
                    address = await table._leader(partition)
                    request = pb.TableWatchRequest(
                        topic=table.topic, partition=partition, from_offset=offset
                    )
                    snapshot: list[TableChange] = []
                    async for event in table._stub(address).Watch(request):
                        progressed = True
                        if offset is None:
                            snapshot += _changes(event, partition)
                            if event.snapshot_done:
                                offset = event.next_offset
                                await self._queue.put(_Item(partition, snapshot, offset))
                                snapshot = []
                            continue
                        offset = max(offset, event.next_offset)
                        await self._queue.put(_Item(partition, _changes(event, partition), offset))
                    retry.pause()  # the node ended the stream (shutting down): reopen
                    continue
                except grpc.aio.AioRpcError as exc:
                    err = from_rpc_error(exc)
                except TidelogError as exc:
                    err = exc
                if progressed:
                    retry.succeeded()
                if not err.retriable:
                    raise err
                if isinstance(err, UnknownTopic):
                    await table._refresh_quietly()
                    if meta.topic(table.topic) is None:
                        raise err
                log.debug("watch %s/%d: %s; reopening", table.topic, partition, err)
                retry.failed(address, err)
        except asyncio.CancelledError:
            raise
        except TidelogError as err:
            await self._queue.put(_Item(partition, [], None, err))
        except Exception as exc:  # a bug or an unexpected transport failure: surface it
            log.exception("watch of %s/%d failed", table.topic, partition)
            await self._queue.put(
                _Item(partition, [], None, TidelogError(f"watching failed: {exc!r}"))
            )
