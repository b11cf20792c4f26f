"""The table of a compacted partition: the latest value per key, in the node's RocksDB.

Every replica (leader and followers) of a partition whose topic has ``cleanup.policy`` with
``compact`` keeps a :class:`PartitionTable`. The partition's apply hook (node/stm.py, through
``Partition.apply``) hands it the committed entries; it applies them *per call, in bulk*: the
records of every data batch of the call are reduced to the last one per key, the previous
rows of those keys are read with one multi-get, and one RocksDB write batch puts the new
rows, deletes the tombstoned keys (a record whose value is None) and writes the table's
*applied offset* with them. So after a crash (SIGKILL, or a power cut that loses the tail of
RocksDB's WAL: the writes are not fsynced, the partition log is the source of truth) the table
is exactly a replay of the log up to its applied offset, and the replica replays the log
from there on when it starts (:meth:`PartitionTable.recover`).

**The table is a replay of the log.** ``rows == last record per key of the data records in
[log start, applied_offset)``, tombstones deleting. Control batches (the leader's no-op
entries, log-start batches) take offsets but set nothing. When the group's log start moves
(``compact,delete`` retention), rows set by records below it are removed, as the log no
longer holds them; a Raft snapshot install (the log replaced by one that starts later) clears
the table and it continues from there. A record without a key sets nothing: the produce path
refuses them on compacted topics, so only records written before the topic became compacted
have none, on every replica alike.

**Layout: one column family (``tables``), a key prefix per partition.** A column family per
partition would give each its own memtable and SST files (RocksDB sizes memory and open files
per family) and need a metadata change per topic create and delete; thousands of partitions
would pay that. With prefixes every table shares one memtable and WAL, a table is dropped by
one range delete, and one write batch spans any rows. Keys, with ``G`` the Raft group id as 8
big-endian bytes:

* ``b"m" G``: the table's meta: format version, applied offset, key count, checksum, then
  the partition's identity (``topic/partition/topic id``: a reused group id is detected);
* ``b"r" G key``: a row: offset (8), timestamp (8), CRC-32C of key and value (4), the value.

**Damage is detected, and the table rebuilt from the log** (cleared, then the log replayed
from its start) when at start the meta is missing (new, or the rows were dropped), names
another partition, is unreadable, says the table is beyond the log's end (records lost under
flush=os) or behind its start, or when the rows, all read back, do not add up to the meta's
key count and checksum (the sum of a 64-bit hash of each row's key, value and offset), or a
row's CRC does not match. That start-up check reads the whole table once.

**Point reads are served from memory when they can**: a table keeps the rows its ``get`` and
``get_many`` read in a dict (its *row cache*), and serves them from there next time instead of
RocksDB (whose point lookup, for a row in the memtable, costs several times a dict lookup plus
the row's decode). The cache is a mirror of the stored rows of the keys it holds, kept exact by
the write path: every write batch that puts or deletes a key updates or drops its cached row in
the same step (all on the event loop thread, so no read sees one without the other), and
clearing, pruning, rebuilding or dropping the table empties it. Rows enter it only when read
(writes do not fill it, so produce pays one dict lookup per key). The rows cached by all the
tables of a process share one budget (:class:`RowCacheBudget`, ``limits.table_row_cache_bytes``,
counting each row's key, value and an estimate of its objects); a table whose insert would pass
it empties every table's cache first (cheap and bounded, at the cost of a colder cache for a
while). Scans and watch snapshots read RocksDB (an iterator, one consistent view). Anything
that writes a table's rows must do so through :class:`PartitionTable`.

Reads (:meth:`PartitionTable.get`, ``get_many``, :meth:`PartitionTable.snapshot`) serve
whatever is applied on this replica; the Table service decides who may serve (the leader,
synced) and waits for a client's ``min_offset`` with :meth:`PartitionTable.wait_applied`.
Everything here runs on the event loop thread.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import struct
import weakref
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import repeat
from typing import TYPE_CHECKING, Any, Final, NamedTuple, Protocol, cast

import crc32c

from tidelog.errors import StorageError
from tidelog.node import limits
from tidelog.node.stm import UnappliableEntry
from tidelog.records import decode_last_per_key, iter_headers, unpack_header

if TYPE_CHECKING:
    from tidelog.node.metastore import MetaStore

log = logging.getLogger(__name__)

TABLES_COLUMN: Final = "tables"
_META_TAG: Final = b"m"
_ROW_TAG: Final = b"r"
_GROUP = struct.Struct(">Q")
_VERSION: Final = 1
#: version, applied offset, key count, checksum; then the identity (UTF-8).
_META = struct.Struct(">BQQQ")
#: offset, timestamp (ms), CRC-32C of key then value; then the value.
_ROW = struct.Struct(">qqI")
_MASK64: Final = (1 << 64) - 1
_MIX: Final = 0x9E3779B97F4A7C15
#: Bytes read from the log per step of a replay.
_REPLAY_READ_BYTES: Final = 4 * 1024 * 1024
#: Keys whose row (offset, CRC) a table remembers in memory (then it forgets them all).
_INDEX_KEYS_MAX: Final = 50_000
#: Rows a prune step reads before writing their deletes.
_PRUNE_STEP: Final = 10_000
#: What a cached row costs besides its key's and value's bytes (the TableRow tuple, the
#: bytes and int objects' headers, the dict slot), roughly, on 64-bit CPython.
ROW_CACHE_OVERHEAD_BYTES: Final = 200


class ReplayLog(Protocol):
    """What a table reads from the partition log to replay it (node/log's PartitionLog)."""

    @property
    def log_start_offset(self) -> int: ...
    @property
    def log_end_offset(self) -> int: ...

    def read(self, offset: int, max_bytes: int, *, upto: int | None = None) -> bytes: ...


class TableRow(NamedTuple):
    """One row. A NamedTuple: the cheapest object to build, as a scan or GetMany builds one
    per row (a frozen dataclass costs several times more), and a page of them transposes
    into the wire's columns with one ``zip(*rows)``."""

    key: bytes
    #: The log offset of the record that set this value.
    offset: int
    timestamp_ms: int
    #: Never None: a tombstone deletes the key.
    value: bytes


def _row_hash(crc: int, offset: int) -> int:
    return ((crc + 1) * _MIX + offset) & _MASK64


def _encode_row(key: bytes, offset: int, timestamp_ms: int, value: bytes) -> tuple[bytes, int]:
    crc = crc32c.crc32c(value, crc32c.crc32c(key))
    return _ROW.pack(offset, timestamp_ms, crc) + value, crc


def _damaged(key: bytes, data: bytes, where: str) -> StorageError:
    if len(data) < _ROW.size:
        return StorageError(f"{where}: table row of key {key[:64]!r} is {len(data)} bytes long")
    return StorageError(
        f"{where}: table row of key {key[:64]!r} fails its CRC (damaged); restarting the "
        "node rebuilds the table from the log"
    )


def _decode_row(key: bytes, data: bytes, where: str) -> tuple[TableRow, int]:
    """The row and its CRC; StorageError when the bytes are not a row of this key."""
    if len(data) < _ROW.size:
        raise _damaged(key, data, where)
    offset, ts, crc = _ROW.unpack_from(data)
    value = data[_ROW.size :]
    if crc32c.crc32c(value, crc32c.crc32c(key)) != crc:
        raise _damaged(key, data, where)
    return TableRow(key, offset, ts, value), crc


def _decode_rows(keys: Sequence[bytes], datas: Sequence[bytes], where: str) -> list[TableRow]:
    """The rows of ``keys`` from their stored bytes (none may be None), each CRC checked:
    the per-row work of scans and GetMany, with every lookup bound once (a row costs a
    struct unpack, two CRC-32C calls and a tuple). The cyclic garbage collector is paused
    meanwhile: the rows hold only bytes and ints, and the collections their allocation
    would trigger cost about as much as building them."""
    paused = gc.isenabled()
    gc.disable()
    try:
        return _decode_rows_checked(keys, datas, where)
    finally:
        if paused:
            gc.enable()


def _decode_rows_checked(
    keys: Sequence[bytes], datas: Sequence[bytes], where: str
) -> list[TableRow]:
    unpack, crc_of, size, row = _ROW.unpack_from, crc32c.crc32c, _ROW.size, TableRow
    out: list[TableRow] = []
    add = out.append
    try:
        for key, data in zip(keys, datas, strict=True):
            offset, ts, crc = unpack(data)
            value = data[size:]
            if crc_of(value, crc_of(key)) != crc:
                raise _damaged(key, data, where)
            add(row(key, offset, ts, value))
    except struct.error:
        bad = len(out)
        raise _damaged(keys[bad], datas[bad], where) from None
    return out


#: A row's fields (key, offset, timestamp_ms, value) in a plain tuple, or a TableRow: how
#: the row cache keeps rows (see PartitionTable._remember) and ``get_found`` answers.
RowFields = tuple[bytes, int, int, bytes]
_Cached = RowFields
#: ``tuple.__new__(TableRow, fields)``: a TableRow made in C from a tuple of its fields.
_new = tuple.__new__


def _as_rows(cached: list[_Cached]) -> list[TableRow]:
    """TableRows of cached rows (or of TableRows), made in C with the collector paused (as
    in :func:`_decode_rows`)."""
    paused = gc.isenabled()
    gc.disable()
    try:
        return list(map(_new, repeat(TableRow), cached))
    finally:
        if paused:
            gc.enable()


def _prefix_end(prefix: bytes) -> bytes | None:
    """The first byte string after every string that starts with ``prefix`` (None: none)."""
    p = bytearray(prefix)
    while p and p[-1] == 0xFF:
        p.pop()
    if not p:
        return None
    p[-1] += 1
    return bytes(p)


class TableSnapshot:
    """A consistent view of one table (a RocksDB iterator pins it): every read sees the
    table as it was at :meth:`PartitionTable.snapshot`, whatever is applied since. Use it as
    a context manager, or call :meth:`close`; an open snapshot keeps RocksDB from dropping
    the versions it sees."""

    __slots__ = ("_closed", "_it", "_rows", "_rows_end", "_where", "applied_offset")

    def __init__(self, it: Any, rows: bytes, applied_offset: int, where: str) -> None:
        self._it: Any = it
        self._rows = rows
        self._rows_end = _prefix_end(rows)
        self._where = where
        self._closed = False
        #: The view equals a replay of the log below this offset.
        self.applied_offset = applied_offset

    def __enter__(self) -> TableSnapshot:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def _iter(self) -> Any:
        if self._closed:
            raise ValueError("the table snapshot is closed")
        return self._it

    def get(self, key: bytes) -> TableRow | None:
        it = self._iter()
        full = self._rows + key
        it.seek(full)
        if not it.valid() or it.key() != full:
            return None
        return _decode_row(key, it.value(), self._where)[0]

    def scan(
        self,
        *,
        prefix: bytes | None = None,
        start: bytes | None = None,
        end: bytes | None = None,
        limit: int = 1000,
    ) -> list[TableRow]:
        """Rows in key byte order, at most ``limit``: keys from ``start`` (inclusive) to
        ``end`` (exclusive) that begin with ``prefix``; each bound optional."""
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        it = self._iter()
        lo = start or b""
        hi = end
        if prefix:
            lo = max(lo, prefix)
            pend = _prefix_end(prefix)
            if pend is not None and (hi is None or pend < hi):
                hi = pend
        if hi is not None and hi <= lo:
            return []
        rows, n = self._rows, len(self._rows)
        # Every key read lies below ``stop``, which is within this table's rows (the prefix
        # and range bounds are folded into it), so no other check is needed per row.
        stop = rows + hi if hi is not None else self._rows_end
        keys: list[bytes] = []
        datas: list[bytes] = []
        add_key, add_data = keys.append, datas.append
        valid, key_of, value_of, step = it.valid, it.key, it.value, it.next
        paused = gc.isenabled()
        gc.disable()  # as in _decode_rows: the keys, values and rows hold no cycle
        try:
            it.seek(rows + lo)
            left = limit
            while left and valid():
                k = key_of()
                if stop is not None and k >= stop:
                    break
                add_key(k[n:])
                add_data(value_of())
                step()
                left -= 1
            return _decode_rows_checked(keys, datas, self._where)
        finally:
            if paused:
                gc.enable()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._it = None


class RowCacheBudget:
    """The bytes the row caches of a set of tables (a node's) may hold together (module
    docstring): each row counts ``len(key) + len(value) + ROW_CACHE_OVERHEAD_BYTES``."""

    def __init__(self, max_bytes: int = limits.table_row_cache_bytes) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self.used = 0
        self._tables: weakref.WeakSet[PartitionTable] = weakref.WeakSet()

    def join(self, table: PartitionTable) -> None:
        self._tables.add(table)

    def make_room(self, size: int) -> bool:
        """Whether ``size`` more bytes fit; when not, every table's cache is emptied first
        (False if even an empty budget cannot hold them)."""
        if self.used + size <= self.max_bytes:
            return True
        for t in list(self._tables):
            t.forget_cached()
        return size <= self.max_bytes


#: The budget of the tables of this process (one node per process), unless given another.
NODE_ROW_CACHE = RowCacheBudget()


class PartitionTable:
    """The table of one replica of a compacted partition (see the module docstring)."""

    __slots__ = (
        "__weakref__",
        "_applied",
        "_budget",
        "_cache",
        "_cache_bytes",
        "_changed",
        "_checksum",
        "_closed",
        "_identity",
        "_index",
        "_keys",
        "_meta_key",
        "_rows",
        "_store",
        "group_id",
        "name",
        "rebuilds",
    )

    def __init__(
        self,
        store: MetaStore,
        group_id: int,
        identity: str,
        name: str,
        *,
        row_cache: RowCacheBudget | None = None,
    ) -> None:
        self._store = store
        self.group_id = group_id
        self._identity = identity
        #: ``topic/partition``, for messages.
        self.name = name
        g = _GROUP.pack(group_id)
        self._meta_key = _META_TAG + g
        self._rows = _ROW_TAG + g
        self._applied = 0
        self._keys = 0
        self._checksum = 0
        self._closed = False
        self._changed = asyncio.Event()
        #: (offset, CRC) of the stored row of a key, None for a key known to have none: a
        #: mirror of the stored table for the keys it holds (at most _INDEX_KEYS_MAX), which
        #: spares the write path the multi-get of the previous rows of hot keys.
        self._index: dict[bytes, tuple[int, int] | None] = {}
        #: The rows of the keys recently read, as stored (module docstring), and what they
        #: count in ``_budget``.
        self._cache: dict[bytes, _Cached] = {}
        self._cache_bytes = 0
        self._budget = NODE_ROW_CACHE if row_cache is None else row_cache
        self._budget.join(self)
        #: How often this replica rebuilt the table from the log (damage, snapshots).
        self.rebuilds = 0

    def __repr__(self) -> str:
        return f"PartitionTable({self.name!r}, applied={self._applied}, keys={self._keys})"

    # ---- the interface (tableapi, groups) ------------------------------------------------

    @property
    def applied_offset(self) -> int:
        """The next offset to apply: the table equals a replay of the log below it."""
        return self._applied

    def get(self, key: bytes) -> TableRow | None:
        cached = self._cache.get(key)
        if cached is not None:
            return _new(TableRow, cached)
        data = self._store.get(TABLES_COLUMN, self._rows + key)
        if data is None:
            return None
        row = _decode_row(key, data, self.name)[0]
        self._remember([row])
        return row

    def get_many(self, keys: Sequence[bytes]) -> list[TableRow | None]:
        """The row of each key (None when absent), in the order of ``keys``: the cached rows,
        one multi-get of the others, the rows found decoded in one loop."""
        present, fields = self._found(keys)
        found = _as_rows(fields)
        if len(found) == len(keys):
            return list[TableRow | None](found)
        out: list[TableRow | None] = [None] * len(keys)
        for i, r in zip(present, found, strict=True):
            out[i] = r
        return out

    def get_found(self, keys: Sequence[bytes]) -> list[RowFields]:
        """The rows of the keys that exist, in the order of ``keys`` (GetMany's answer), as
        plain tuples of their fields where they come from the cache (no TableRow made)."""
        return self._found(keys)[1]

    def _found(self, keys: Sequence[bytes]) -> tuple[list[int], list[RowFields]]:
        """The positions in ``keys`` of the keys that have a row, and their rows: the cached
        rows, then one multi-get of the others (whose rows found join the cache)."""
        got: list[_Cached | None] = list(map(self._cache.get, keys))
        misses = [i for i, r in enumerate(got) if r is None]
        if not misses:
            return list(range(len(keys))), cast("list[RowFields]", got)
        rows = self._rows
        asked = [keys[i] for i in misses] if len(misses) < len(keys) else keys
        datas = self._store.get_many(TABLES_COLUMN, [rows + k for k in asked])
        stored = [i for i, d in enumerate(datas) if d is not None]
        if len(stored) == len(datas):
            read = _decode_rows(asked, cast("list[bytes]", datas), self.name)
        else:
            read = _decode_rows(
                [asked[i] for i in stored],
                cast("list[bytes]", [datas[i] for i in stored]),
                self.name,
            )
        self._remember(read)
        for j, r in zip(stored, read, strict=True):
            got[misses[j]] = r
        if len(read) == len(misses):
            return list(range(len(keys))), cast("list[RowFields]", got)
        present = [i for i, r in enumerate(got) if r is not None]
        return present, cast("list[RowFields]", [got[i] for i in present])

    # ---- the row cache (module docstring) ------------------------------------------------

    def _remember(self, rows: list[TableRow]) -> None:
        """Cache rows just read from RocksDB (this table's current rows), within the budget."""
        if not rows:
            return
        overhead = ROW_CACHE_OVERHEAD_BYTES
        size = sum([len(r.key) + len(r.value) + overhead for r in rows])
        budget = self._budget
        if not budget.make_room(size):
            return
        cache = self._cache
        # Plain tuples, not TableRows: the collector stops tracking a plain tuple of bytes
        # and ints, never an instance of a tuple subclass (100,000 cached TableRows made
        # every full collection of the node ~40 ms longer).
        fields = cast("Iterator[RowFields]", map(tuple, rows))
        cache.update(zip([r.key for r in rows], fields, strict=True))
        # A key read twice in one call is stored once and counted twice: the count may
        # only overestimate what the cache holds.
        self._cache_bytes += size
        budget.used += size

    def _recache(self, latest: dict[bytes, tuple[int, int, bytes | None]]) -> None:
        """The keys just written: their cached rows become the new rows (or go, deleted)."""
        cache = self._cache
        grown = 0
        for key, (offset, ts, value) in latest.items():
            old = cache.get(key)
            if old is None:
                continue
            old_key, _offset, _ts, old_value = old
            if value is None:
                del cache[key]
                grown -= len(old_key) + len(old_value) + ROW_CACHE_OVERHEAD_BYTES
            else:
                # The key and value may be views of a log buffer (a replay): cache bytes.
                value = value if type(value) is bytes else bytes(value)
                cache[old_key] = (old_key, offset, ts, value)
                grown += len(value) - len(old_value)
        self._cache_bytes += grown
        budget = self._budget
        budget.used += grown
        if budget.used > budget.max_bytes:
            budget.make_room(0)

    def forget_cached(self) -> None:
        """Empty this table's row cache (a budget makes room, or the rows changed wholesale)."""
        self._cache.clear()
        self._budget.used -= self._cache_bytes
        self._cache_bytes = 0

    def cached_rows(self) -> int:
        """How many rows this table's cache holds (for tests and metrics)."""
        return len(self._cache)

    def snapshot(self) -> TableSnapshot:
        """A consistent view of the table as of now (its ``applied_offset`` with it)."""
        it = self._store.iterator(TABLES_COLUMN)
        # Everything is applied on this thread: the iterator's view is the table as of
        # self._applied (read through it anyway, so the two cannot disagree).
        it.seek(self._meta_key)
        applied = self._applied
        if it.valid() and it.key() == self._meta_key:
            applied = self._parse_meta(it.value())[1]
        return TableSnapshot(it, self._rows, applied, self.name)

    def key_count(self) -> int:
        return self._keys

    async def wait_applied(self, offset: int, timeout_s: float) -> bool:
        """True once the record at ``offset`` (and everything before it) is reflected
        (``applied_offset > offset``); False after ``timeout_s`` or when the table closes."""
        try:
            async with asyncio.timeout(timeout_s):
                while self._applied <= offset:
                    if self._closed:
                        return False
                    await self._changed.wait()
        except TimeoutError:
            return self._applied > offset
        return True

    # ---- applying (Partition) ------------------------------------------------------------

    def apply_entries(self, datas: Iterable[bytes]) -> None:
        """Apply committed entries' batches (raw entry data, in log order): one write."""
        self._apply_batches((d, 0) for d in datas if d)

    def _apply_batches(self, batches: Iterable[tuple[bytes | memoryview, int]]) -> int:
        """Apply the batches at ``(buf, pos)``; records below the applied offset are skipped
        (entries applied before a restart come again). Returns the records applied."""
        applied = self._applied
        latest: dict[bytes, tuple[int, int, bytes | None]] = {}
        n = 0
        for buf, pos in batches:
            h = unpack_header(buf, pos)
            end = h.base_offset + h.record_count
            if end <= applied:
                continue
            if h.base_offset > applied:
                raise UnappliableEntry(
                    f"{self.name}: table at offset {applied} was given the batch at offset "
                    f"{h.base_offset}: the records between are missing"
                )
            if not h.is_control:
                try:
                    winners = decode_last_per_key(
                        buf, pos, skip=applied - h.base_offset, verify_crc=False
                    )
                except Exception as exc:
                    raise UnappliableEntry(
                        f"{self.name}: the batch at offset {h.base_offset} cannot be decoded "
                        f"for the table: {exc}"
                    ) from exc
                if latest:
                    latest.update(winners)
                else:
                    latest = winners
                n += h.record_count - max(0, applied - h.base_offset)
            applied = end
        if applied != self._applied:
            self._write(latest, applied)
        return n

    def _write(self, latest: dict[bytes, tuple[int, int, bytes | None]], applied: int) -> None:
        rows = self._rows
        index = self._index
        unpack, pack, crc_of, mix = _ROW.unpack_from, _ROW.pack, crc32c.crc32c, _MIX
        missing = [k for k in latest if k not in index]
        if missing:
            got = self._store.get_many(TABLES_COLUMN, [rows + k for k in missing])
            for k, stored in zip(missing, got, strict=True):
                index[k] = None if stored is None else unpack(stored)[::2]
        count, checksum = self._keys, self._checksum
        puts: list[tuple[bytes, bytes]] = []
        deletes: list[bytes] = []
        now: list[tuple[bytes, tuple[int, int] | None]] = []
        # The hot path: _row_hash and _encode_row inlined (the sum is reduced mod 2^64 once).
        for key, (offset, ts, value) in latest.items():
            prev = index[key]
            if prev is not None:
                checksum -= (prev[1] + 1) * mix + prev[0]
                count -= 1
            if value is None:
                if prev is not None:
                    deletes.append(rows + key)
                    now.append((key, None))
                continue
            crc = crc_of(value, crc_of(key))
            puts.append((rows + key, pack(offset, ts, crc) + value))
            now.append((key, (offset, crc)))
            checksum += (crc + 1) * mix + offset
            count += 1
        checksum &= _MASK64
        puts.append((self._meta_key, self._meta(applied, count, checksum)))
        self._store.write_batch(TABLES_COLUMN, puts, deletes, sync=False)
        if self._cache:
            self._recache(latest)
        index.update(now)
        if len(index) > _INDEX_KEYS_MAX:
            index.clear()
        self._applied, self._keys, self._checksum = applied, count, checksum
        self._notify()

    def prune_below(self, offset: int) -> int:
        """The group's log start is ``offset`` now: remove the rows set by records below it
        (the log no longer holds them). Reads the whole table; returns the rows removed."""
        removed = 0
        count, checksum = self._keys, self._checksum
        deletes: list[bytes] = []
        for k, data in self._store.items(TABLES_COLUMN, self._rows):
            row_offset, _ts, crc = _ROW.unpack_from(data)
            if row_offset < offset:
                deletes.append(k)
                count -= 1
                checksum -= _row_hash(crc, row_offset)
        checksum &= _MASK64
        applied = max(self._applied, offset)
        self._index.clear()
        self.forget_cached()
        for i in range(0, max(len(deletes), 1), _PRUNE_STEP):
            step = deletes[i : i + _PRUNE_STEP]
            removed += len(step)
            last = i + _PRUNE_STEP >= len(deletes)
            meta = [(self._meta_key, self._meta(applied, count, checksum))] if last else []
            # The meta goes with the last step: a crash before it leaves rows gone that the
            # meta still counts, which the start-up check sees (and rebuilds).
            self._store.write_batch(TABLES_COLUMN, meta, step, sync=False)
        self._applied, self._keys, self._checksum = applied, count, checksum
        self._notify()
        return removed

    # ---- recovery ------------------------------------------------------------------------

    def recover(self, lg: ReplayLog, upto: int) -> None:
        """At start: load the table, check it (rebuild it if missing or damaged), then
        replay the committed log it lacks, ``[applied_offset, upto)``."""
        reason = self._load(lg)
        if reason is not None:
            if reason != "new":
                log.warning("%s: rebuilding the table from the log: %s", self.name, reason)
                self.rebuilds += 1
            elif upto > lg.log_start_offset:
                log.info("%s: building the table from the log (up to %d)", self.name, upto)
            self.clear(lg.log_start_offset)
        self.replay(lg, upto)

    def rebuild(self, lg: ReplayLog, upto: int, why: str) -> None:
        """Clear the table and replay the log from its start up to ``upto``."""
        log.warning("%s: rebuilding the table from the log: %s", self.name, why)
        self.rebuilds += 1
        self.clear(min(lg.log_start_offset, lg.log_end_offset))
        self.replay(lg, upto)

    def _load(self, lg: ReplayLog) -> str | None:
        """None when the stored table is sound, else why it is rebuilt ("new": none)."""
        data = self._store.get(TABLES_COLUMN, self._meta_key)
        if data is None:
            any_row = next(iter(self._store.items(TABLES_COLUMN, self._rows)), None)
            return "new" if any_row is None else "its meta is missing"
        try:
            _version, applied, count, checksum, identity = self._parse_meta(data)
        except StorageError as exc:
            return str(exc)
        if identity != self._identity:
            return f"it belongs to {identity!r}, not {self._identity!r} (a reused group id)"
        if applied > lg.log_end_offset:
            return f"its applied offset {applied} is beyond the log end {lg.log_end_offset}"
        if applied < lg.log_start_offset:
            return f"its applied offset {applied} is below the log start {lg.log_start_offset}"
        seen = 0
        total = 0
        try:
            for k, row in self._store.items(TABLES_COLUMN, self._rows):
                r, crc = _decode_row(k[len(self._rows) :], row, self.name)
                seen += 1
                total += _row_hash(crc, r.offset)
        except StorageError as exc:
            return str(exc)
        if seen != count or total & _MASK64 != checksum:
            return (
                f"its rows ({seen}) do not match its meta ({count} keys) and checksum: "
                "damaged or partly written"
            )
        self._applied, self._keys, self._checksum = applied, count, checksum
        return None

    def clear(self, applied: int) -> None:
        """Empty the table; it continues at offset ``applied``."""
        self._store.write_batch(
            TABLES_COLUMN,
            [(self._meta_key, self._meta(applied, 0, 0))],
            sync=False,
            delete_ranges=[(self._rows, self._rows_end())],
        )
        self._index.clear()
        self.forget_cached()
        self._applied, self._keys, self._checksum = applied, 0, 0
        self._notify()

    def replay(self, lg: ReplayLog, upto: int) -> int:
        """Apply the log's batches in ``[applied_offset, upto)``; the records applied."""
        n = 0
        if self._applied < lg.log_start_offset:
            self.clear(lg.log_start_offset)
        offset = self._applied
        while offset < upto:
            data = lg.read(offset, _REPLAY_READ_BYTES, upto=upto)
            if not data:
                break
            view = memoryview(data)
            batches = [(view, pos) for pos, h in iter_headers(view) if h.base_offset < upto]
            if not batches:
                break
            n += self._apply_batches(batches)
            if self._applied <= offset:
                break
            offset = self._applied
        return n

    # ---- lifecycle -----------------------------------------------------------------------

    def close(self) -> None:
        """Stop: waiters return False. The stored table stays (a restart continues it)."""
        self._closed = True
        self._notify()

    def drop(self) -> None:
        """Delete the stored table (topic deleted, replica moved away)."""
        self.close()
        self._index.clear()
        self.forget_cached()
        self._store.write_batch(
            TABLES_COLUMN,
            [],
            [self._meta_key],
            sync=False,
            delete_ranges=[(self._rows, self._rows_end())],
        )
        self._keys = 0

    # ---- helpers -------------------------------------------------------------------------

    def _rows_end(self) -> bytes:
        end = _prefix_end(self._rows)
        assert end is not None
        return end

    def _meta(self, applied: int, count: int, checksum: int) -> bytes:
        return _META.pack(_VERSION, applied, count, checksum) + self._identity.encode()

    def _parse_meta(self, data: bytes) -> tuple[int, int, int, int, str]:
        if len(data) < _META.size or data[0] != _VERSION:
            raise StorageError(f"{self.name}: the table's meta is unreadable ({len(data)} bytes)")
        version, applied, count, checksum = _META.unpack_from(data)
        try:
            identity = data[_META.size :].decode()
        except UnicodeDecodeError:
            raise StorageError(f"{self.name}: the table's meta names no partition") from None
        return version, applied, count, checksum, identity

    def _notify(self) -> None:
        event, self._changed = self._changed, asyncio.Event()
        event.set()


@dataclass(frozen=True, slots=True)
class StoredTable:
    """One table as stored (:func:`stored_tables`)."""

    group_id: int
    #: ``topic/partition/topic id``.
    identity: str
    applied_offset: int
    rows: list[TableRow]


def stored_tables(store: MetaStore) -> list[StoredTable]:
    """Every table in ``store``, rows included, read as they are (no check, no rebuild):
    for tests and debugging tools that open a stopped node's RocksDB."""
    out: list[StoredTable] = []
    for k, meta in list(store.items(TABLES_COLUMN, _META_TAG)):
        if len(k) != 9 or len(meta) < _META.size:
            continue
        gid = _GROUP.unpack(k[1:9])[0]
        _version, applied, _count, _checksum = _META.unpack_from(meta)
        rows_prefix = _ROW_TAG + k[1:9]
        where = f"group {gid}"
        rows = [
            _decode_row(rk[9:], data, where)[0]
            for rk, data in store.items(TABLES_COLUMN, rows_prefix)
        ]
        identity = meta[_META.size :].decode(errors="replace")
        out.append(StoredTable(gid, identity, applied, rows))
    return out


def drop_tables_except(store: MetaStore, keep: set[int]) -> list[int]:
    """Delete the stored tables of every group id not in ``keep`` (their partitions are
    gone from this node: deleted or moved while it was down). Returns the ids dropped."""
    dropped: list[int] = []
    for k, _v in store.items(TABLES_COLUMN, _META_TAG):
        gid = _GROUP.unpack(k[1:9])[0] if len(k) == 9 else None
        if gid is None or gid in keep:
            continue
        rows = _ROW_TAG + k[1:9]
        end = _prefix_end(rows)
        assert end is not None
        store.write_batch(TABLES_COLUMN, [], [k], sync=False, delete_ranges=[(rows, end)])
        dropped.append(gid)
    return dropped


__all__ = [
    "NODE_ROW_CACHE",
    "ROW_CACHE_OVERHEAD_BYTES",
    "TABLES_COLUMN",
    "PartitionTable",
    "ReplayLog",
    "RowCacheBudget",
    "RowFields",
    "StoredTable",
    "TableRow",
    "TableSnapshot",
    "drop_tables_except",
    "stored_tables",
]
