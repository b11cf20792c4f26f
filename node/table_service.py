"""The Table gRPC service: Get, GetMany, Scan and Watch over the RocksDB table of a compacted
partition (node/table.py), served by the partition's leader.

The leader answers from its own replica's table, which holds only committed records, so an
answer never shows a record a failover could lose; each answer says which offset it reflects
(``applied_offset``). ``min_offset`` waits for the table to reach a client's own write.

Scans page over one RocksDB snapshot per scan, kept here in a bounded cache
(:class:`ScanSnapshots`: at most ``limits.table_scans_max``, each closed after
``limits.table_scan_idle_ms`` without a page asked of it, least recently used evicted first).
A continuation token (node/table_token.py) names the snapshot, so every page of a scan sees
the same table; a page whose snapshot is gone (expired, evicted, another leader, a restart)
fails with SCAN_EXPIRED (ABORTED) rather than silently mixing two states.

Watch sends a snapshot's rows, then streams the committed log from the snapshot's applied
offset (as Fetch does) turned into put/delete changes: the snapshot equals a replay of the log
below that offset, so nothing is missed or repeated between the two. A watch resumed from an
offset streams the log from there without a snapshot.
"""

from __future__ import annotations

import asyncio
import os
import time
from bisect import bisect_left
from collections import OrderedDict
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from itertools import accumulate
from typing import TYPE_CHECKING

from tidelog.errors import (
    InvalidRequest,
    KeyTooLarge,
    NotATable,
    RequestTimedOut,
    ResourceExhausted,
    ScanExpired,
    excerpt,
)
from tidelog.node import limits, rpc
from tidelog.node.auth import Guard, Resource
from tidelog.node.broker_service import last_batch_position
from tidelog.node.metrics import NodeMetrics
from tidelog.node.partition import Partition
from tidelog.node.table_token import SCAN_ID_BYTES, ScanToken, decode_token, encode_token
from tidelog.node.topics import Topic, TopicRegistry
from tidelog.records import decode_batches, read_header
from tidelog.v1 import table_pb2 as pb
from tidelog.v1 import table_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from tidelog.node.table import PartitionTable, RowFields, TableRow, TableSnapshot

__all__ = ["ScanSnapshots", "TableService", "is_compacted", "key_bytes_max"]


def is_compacted(cleanup_policy: str) -> bool:
    return "compact" in (p.strip() for p in cleanup_policy.split(","))


def key_bytes_max(max_message_bytes: int) -> int:
    """The longest key a Table call may name on a topic: no longer key fits in a batch."""
    return min(max_message_bytes, limits.table_key_bytes_max)


def _row(r: TableRow) -> pb.TableRow:
    return pb.TableRow(key=r.key, value=r.value, offset=r.offset, timestamp_ms=r.timestamp_ms)


def _rows(rows: Sequence[RowFields]) -> pb.TableRows:
    """Rows in columns, not a message per row: the rows (tuples) transposed by one
    ``zip(*rows)``, each column handed to protobuf whole."""
    return _sized_rows(rows)[0]


def _sized_rows(rows: Sequence[RowFields]) -> tuple[pb.TableRows, int]:
    """:func:`_rows`, and the bytes of the rows' keys and values (summed in C, per column)."""
    if not rows:
        return pb.TableRows(), 0
    keys, offsets, timestamps, values = zip(*rows, strict=True)
    size = sum(map(len, keys)) + sum(map(len, values))
    rows_pb = pb.TableRows(keys=keys, values=values, offsets=offsets, timestamps_ms=timestamps)
    return rows_pb, size


def _ms(raw: int, default_ms: int, max_ms: int, what: str) -> float:
    if raw < 0:
        raise InvalidRequest(f"{what} must be >= 0 ms (0 picks {default_ms} ms), got {raw}")
    return min(raw or default_ms, max_ms) / 1000


def _after(key: bytes) -> bytes:
    """The smallest key greater than ``key`` in byte order."""
    return key + b"\x00"


@dataclass(slots=True)
class _OpenScan:
    snapshot: TableSnapshot
    part: Partition
    used_s: float


class ScanSnapshots:
    """The RocksDB snapshots of the scans in progress on this node (module docstring)."""

    def __init__(
        self,
        max_open: int = limits.table_scans_max,
        idle_s: float = limits.table_scan_idle_ms / 1000,
    ) -> None:
        self.max_open = max_open
        self.idle_s = idle_s
        self._open: OrderedDict[bytes, _OpenScan] = OrderedDict()
        self._sweep_at: asyncio.TimerHandle | None = None

    def __len__(self) -> int:
        return len(self._open)

    def add(self, part: Partition, snapshot: TableSnapshot) -> bytes:
        self.sweep()
        while len(self._open) >= self.max_open:
            _, old = self._open.popitem(last=False)
            old.snapshot.close()
        scan_id = os.urandom(SCAN_ID_BYTES)
        self._open[scan_id] = _OpenScan(snapshot, part, time.monotonic())
        self._schedule_sweep()
        return scan_id

    def get(self, scan_id: bytes, part: Partition) -> TableSnapshot:
        """The snapshot of a scan of ``part``; ScanExpired when it is gone."""
        self.sweep()
        entry = self._open.get(scan_id)
        if entry is None or entry.part is not part:
            raise ScanExpired(
                f"{part.topic}/{part.index}: scan expired, restart: its snapshot is gone "
                f"(idle for more than {self.idle_s:.0f} s, evicted by newer scans, or the "
                "partition's leader changed)"
            )
        entry.used_s = time.monotonic()
        self._open.move_to_end(scan_id)
        return entry.snapshot

    def done(self, scan_id: bytes) -> None:
        entry = self._open.pop(scan_id, None)
        if entry is not None:
            entry.snapshot.close()

    def sweep(self) -> None:
        """Close the snapshots idle too long, and those of partitions no longer served."""
        horizon = time.monotonic() - self.idle_s
        for scan_id, entry in list(self._open.items()):
            if entry.used_s < horizon or entry.part.closed or not entry.part.serving:
                del self._open[scan_id]
                entry.snapshot.close()

    def close(self) -> None:
        for entry in self._open.values():
            entry.snapshot.close()
        self._open.clear()
        if self._sweep_at is not None:
            self._sweep_at.cancel()

    def _schedule_sweep(self) -> None:
        if self._sweep_at is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return

        def run() -> None:
            self._sweep_at = None
            self.sweep()
            if self._open:
                self._schedule_sweep()

        self._sweep_at = loop.call_later(self.idle_s / 2, run)


class TableService(pb_grpc.TableServicer):
    def __init__(
        self, registry: TopicRegistry, metrics: NodeMetrics, *, guard: Guard | None = None
    ) -> None:
        self.guard = guard or Guard()
        self.registry = registry
        self.metrics = metrics
        self.scans = ScanSnapshots()
        self._watches = 0

    # -- lookups and checks -------------------------------------------------------------------

    def _table(self, name: str, index: int) -> tuple[Topic, Partition, PartitionTable]:
        """The serving leader's table of a partition, in the order a caller learns most:
        unknown topic, not a compacted topic, not the leader here."""
        topic = self.registry.topic(name)
        policy = topic.config.cleanup_policy
        if not is_compacted(policy):
            raise NotATable(
                f"topic {excerpt(name)} has cleanup.policy={policy}, so it keeps no table: "
                "the Table API reads topics whose cleanup.policy contains compact "
                f"(tidelog topic alter {name} --set cleanup.policy=compact)",
                topic=name,
                cleanup_policy=policy,
            )
        _, part = self.registry.partition(name, index)
        part.check_serving()
        table = part.table
        if table is None:
            raise NotATable(
                f"{name}/{index}: this replica keeps no table yet (cleanup.policy changed a "
                "moment ago?); retry",
                topic=name,
                cleanup_policy=policy,
            )
        return topic, part, table

    @staticmethod
    def _check_key(topic: Topic, key: bytes) -> None:
        most = key_bytes_max(topic.config.max_message_bytes)
        if len(key) > most:
            raise KeyTooLarge(
                f"a key of {len(key)} bytes is longer than the {most} bytes a key of topic "
                f"{excerpt(topic.name)} may have (bounded by its max.message.bytes and the "
                "node's limit)",
                key_bytes=str(len(key)),
                key_bytes_max=str(most),
            )

    async def _reach(
        self,
        part: Partition,
        table: PartitionTable,
        min_offset: int | None,
        timeout_ms: int,
        linearizable: bool = False,
    ) -> None:
        """Wait until the table reflects ``min_offset`` (no wait when None); with
        ``linearizable``, also until the leader confirmed it leads and applied everything
        committed before the request (the table is applied with the partition)."""
        if linearizable:
            await part.read_barrier(limits.read_barrier_timeout_ms / 1000)
        if min_offset is None:
            return
        if min_offset < 0:
            raise InvalidRequest(f"min_offset must be >= 0, got {min_offset}")
        timeout_s = _ms(
            timeout_ms, limits.table_wait_default_ms, limits.table_wait_max_ms, "timeout_ms"
        )
        if table.applied_offset > min_offset:
            return
        if not await table.wait_applied(min_offset, timeout_s):
            part.check_serving()
            raise RequestTimedOut(
                f"{part.topic}/{part.index}: the table reflects the offsets below "
                f"{table.applied_offset}, not min_offset {min_offset}, after "
                f"{timeout_s * 1000:.0f} ms (high watermark {part.high_watermark}); retry "
                "or check the offset"
            )
        part.check_serving()

    # -- the RPCs -----------------------------------------------------------------------------

    @rpc.unary("TableGet")
    async def Get(self, request: pb.TableGetRequest, context: rpc.Context) -> pb.TableGetResponse:
        self.guard.check(context, "TableGet", Resource.topic(request.topic))
        topic, part, table = self._table(request.topic, request.partition)
        self._check_key(topic, request.key)
        await self._reach(
            part,
            table,
            request.min_offset if request.HasField("min_offset") else None,
            request.timeout_ms,
            request.linearizable,
        )
        # Read the offset first: the row is at least as new as the offset said (nothing
        # awaits in between, so on the one event loop they are the same state anyway).
        applied = table.applied_offset
        row = table.get(request.key)
        if row is None:
            return pb.TableGetResponse(found=False, applied_offset=applied)
        return pb.TableGetResponse(found=True, row=_row(row), applied_offset=applied)

    @rpc.unary("TableGetMany")
    async def GetMany(
        self, request: pb.TableGetManyRequest, context: rpc.Context
    ) -> pb.TableGetManyResponse:
        self.guard.check(context, "TableGetMany", Resource.topic(request.topic))
        topic, part, table = self._table(request.topic, request.partition)
        keys: Sequence[bytes] = list(dict.fromkeys(request.keys))
        if len(request.keys) > limits.table_get_many_keys_max:
            raise InvalidRequest(
                f"GetMany names {len(request.keys)} keys, more than the limit of "
                f"{limits.table_get_many_keys_max} per request: split the keys"
            )
        if keys and max(map(len, keys)) > key_bytes_max(topic.config.max_message_bytes):
            self._check_key(topic, max(keys, key=len))
        await self._reach(
            part,
            table,
            request.min_offset if request.HasField("min_offset") else None,
            request.timeout_ms,
            request.linearizable,
        )
        applied = table.applied_offset
        found = table.get_found(keys)
        rows, size = _sized_rows(found)
        if size > limits.table_get_many_bytes_max:
            raise ResourceExhausted(
                f"the {len(found)} rows found hold {size} bytes, more than one answer may "
                f"carry ({limits.table_get_many_bytes_max}): ask for fewer keys per request"
            )
        return pb.TableGetManyResponse(rows=rows, applied_offset=applied)

    @rpc.unary("TableScan")
    async def Scan(
        self, request: pb.TableScanRequest, context: rpc.Context
    ) -> pb.TableScanResponse:
        self.guard.check(context, "TableScan", Resource.topic(request.topic))
        topic, part, table = self._table(request.topic, request.partition)
        limit = request.limit
        if limit < 0:
            raise InvalidRequest(
                f"limit must be >= 0 (0 picks {limits.table_page_rows_default}), got {limit}"
            )
        limit = min(limit or limits.table_page_rows_default, limits.table_page_rows_max)
        prefix = request.prefix or None
        start = request.start if request.HasField("start") else None
        end = request.end if request.HasField("end") else None
        for what, k in (("prefix", prefix), ("start", start), ("end", end)):
            if k is not None and len(k) > key_bytes_max(topic.config.max_message_bytes):
                raise KeyTooLarge(
                    f"the scan's {what} is {len(k)} bytes, longer than any key of topic "
                    f"{excerpt(topic.name)} may be"
                )
        if request.continuation_token:
            token = decode_token(request.continuation_token, request.topic, request.partition)
            snapshot = self.scans.get(token.scan_id, part)
            scan_id = token.scan_id
            after = _after(token.last_key)
            start = after if start is None or start < after else start
        else:
            await self._reach(
                part,
                table,
                request.min_offset if request.HasField("min_offset") else None,
                request.timeout_ms,
                request.linearizable,
            )
            snapshot = table.snapshot()
            scan_id = self.scans.add(part, snapshot)
        rows, more = _page(snapshot, prefix=prefix, start=start, end=end, limit=limit)
        applied = snapshot.applied_offset
        if not more:
            self.scans.done(scan_id)
            return pb.TableScanResponse(rows=_rows(rows), applied_offset=applied)
        next_token = encode_token(
            ScanToken(scan_id, request.topic, request.partition, applied, rows[-1].key)
        )
        return pb.TableScanResponse(
            rows=_rows(rows), continuation_token=next_token, applied_offset=applied
        )

    @rpc.stream("TableWatch")
    async def Watch(  # type: ignore[override]  # written by rpc.stream, see there
        self, request: pb.TableWatchRequest, context: rpc.Context
    ) -> AsyncGenerator[pb.TableWatchEvent, None]:
        self.guard.check(context, "TableWatch", Resource.topic(request.topic))
        _, part, table = self._table(request.topic, request.partition)
        if self._watches >= limits.table_watch_streams_max:
            raise ResourceExhausted(
                f"this node serves {self._watches} watch streams, its limit: retry later"
            )
        if request.HasField("from_offset"):
            offset = request.from_offset
            part.check_fetch_offset(offset)
        else:
            offset = -1
        self._watches += 1
        try:
            if offset < 0:
                # The snapshot: every row of the table at one applied offset, in pages.
                with table.snapshot() as snapshot:
                    start: bytes | None = None
                    while True:
                        part.check_streaming()
                        rows, more = _page(
                            snapshot,
                            prefix=None,
                            start=start,
                            end=None,
                            limit=limits.table_page_rows_max,
                        )
                        if more:
                            start = _after(rows[-1].key)
                            yield pb.TableWatchEvent(
                                rows=_rows(rows), snapshot=True, high_watermark=part.high_watermark
                            )
                            continue
                        offset = snapshot.applied_offset
                        yield pb.TableWatchEvent(
                            rows=_rows(rows),
                            snapshot=True,
                            snapshot_done=True,
                            next_offset=offset,
                            high_watermark=part.high_watermark,
                        )
                        break
            async for event in _changes(part, offset):
                yield event
        finally:
            self._watches -= 1


#: Rows read from a snapshot per step of a page: the first step reads a few, later ones as
#: many as the average row size so far says fit in the page's bytes.
_FIRST_STEP_ROWS = 128
_STEP_ROWS_MAX = 4096


def _page(
    snapshot: TableSnapshot,
    *,
    prefix: bytes | None,
    start: bytes | None,
    end: bytes | None,
    limit: int,
) -> tuple[list[TableRow], bool]:
    """Up to ``limit`` rows (and about table_page_bytes_max bytes) from ``start``; whether more
    follow (one row past the page is read to tell)."""
    out: list[TableRow] = []
    size = 0
    budget = limits.table_page_bytes_max
    step = _FIRST_STEP_ROWS
    while True:
        want = min(limit - len(out) + 1, step)
        rows = snapshot.scan(prefix=prefix, start=start, end=end, limit=want)
        sizes = [len(r.key) + len(r.value) for r in rows]
        # A row joins the page unless the page is full (``limit`` rows, or ``budget``
        # bytes before it, and at least one row): the sizes before each row only grow, so
        # the rows that join are a prefix of ``rows``, found by one pass over the sums.
        before = list(accumulate(sizes, initial=size))
        full_at = bisect_left(before, budget)
        take = min(len(rows), limit - len(out), full_at if out else max(full_at, 1))
        out += rows[:take] if take < len(rows) else rows
        size += sum(sizes[:take])
        if take < len(rows):
            return out, True
        if len(rows) < want:
            return out, False
        start = _after(rows[-1].key)
        average = max(1, size // len(out))
        step = max(1, min(_STEP_ROWS_MAX, (budget - size) // average + 1))


async def _changes(part: Partition, offset: int) -> AsyncGenerator[pb.TableWatchEvent, None]:
    """The committed log of ``part`` from ``offset`` on, as changes, until cancelled: the
    Fetch loop of broker_service, with the records decoded (keyless records, which a
    compacted topic refuses, are skipped)."""
    keepalive_s = limits.table_watch_keepalive_ms / 1000
    while True:
        changed = part.changed()
        part.check_streaming()
        if offset < part.high_watermark:
            hw = part.high_watermark
            data = part.read(offset, limits.table_watch_read_bytes)
            if data:
                next_offset = read_header(data, last_batch_position(data)).last_offset + 1
                records = [
                    r
                    for r in decode_batches(data, min_offset=offset, verify_crc=False)
                    if r.key is not None
                ]
                deleted = [r.value is None for r in records]
                rows = pb.TableRows(
                    keys=[r.key for r in records],  # type: ignore[misc]  # not None: filtered
                    values=[r.value or b"" for r in records],
                    offsets=[r.offset for r in records],
                    timestamps_ms=[r.timestamp_ms for r in records],
                )
                offset = max(next_offset, offset)
                yield pb.TableWatchEvent(
                    rows=rows,
                    deleted=deleted if any(deleted) else (),
                    next_offset=offset,
                    high_watermark=hw,
                )
                continue
        try:
            async with asyncio.timeout(keepalive_s):
                await changed.wait()
        except TimeoutError:
            part.check_streaming()
            yield pb.TableWatchEvent(next_offset=offset, high_watermark=part.high_watermark)
