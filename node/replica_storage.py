"""The Raft storage of one replica (``ReplicaStorage``, the core's ``StorageReader``): its
PartitionLog is the Raft log, RocksDB holds the rest.

Every Raft entry is one stored record batch (``Entry.data`` is the batch, stamped with its
base offset, Raft term and Raft index); there is no second copy of the data. Two kinds of
entry need a word:

* The EMPTY entry a new leader may append (``raft.types.EntryKind.EMPTY``) carries no data in
  the core. It is stored as a one-record *control* batch (``NOOP``: invisible to consumers,
  one offset) built deterministically (timestamp 0, no producer), so every replica writes the
  same bytes whether it got the entry from the leader's memory (no data) or from its log.
* A snapshot of a partition holds no records: the offset, Raft index and term the leader's
  stored log starts after, the leader's logical log start (at or above that offset:
  ``node/log/partition_log.py``), and the state the owner derives from the log, which the
  records below the log start no longer give: for a partition, its idempotence state
  (producers and msg-ids as of the leader's applied offset, ``state_source``). A follower
  that needs entries the leader no longer holds (retention deleted them) installs it with
  ``PartitionLog.reset``: records below the leader's log start are gone, as in Kafka, the
  follower's logical start is the leader's (it otherwise travels as a control batch, see
  ``node/partition.py``), and the owner restores the state (``decode_snapshot``). Formats
  1 (offset only) and 2 (offset and logical start) are still read; format 3 carries all
  three. The state is bounded by :data:`SNAPSHOT_STATE_BYTES_MAX` so the snapshot fits one
  Raft message; the owner trims what does not fit (and says so in its log) until snapshots
  are streamed in chunks.

Raft indexes and consumer offsets are translated only through the log (``term_at_index``,
``end_offset_at_index``); this module never keeps its own mapping.

The hard state lives in the node's RocksDB; :class:`HardStateStore` writes the hard states of
every group changed in a Ready round as ONE write batch (synced when any of them must be), the
metadata half of the group commit in ``node/multiraft.py``.

A small per-group cache keeps the entries appended recently, so that applying committed
entries and replicating to a follower that is only a little behind read memory, not the log.
"""

from __future__ import annotations

import logging
import struct
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Protocol

from tidelog.errors import StorageError
from tidelog.node.metastore import MetaStore
from tidelog.node.raft.core import NEW_REPLICA, RawNode
from tidelog.node.raft.errors import (
    CompactedError,
    SnapshotTemporarilyUnavailable,
    UnavailableError,
)
from tidelog.node.raft.types import (
    EMPTY_HARD_STATE,
    ConfState,
    Entry,
    EntryKind,
    HardState,
    Snapshot,
    SnapshotMeta,
)
from tidelog.records import HEADER_SIZE, batch_end_offset, encode_batch, stamp, unpack_header

log = logging.getLogger(__name__)

UINT63_MAX: Final = 2**63 - 1
KIB: Final = 1024
MIB: Final = 1024 * KIB

#: The canonical no-op batch; ``noop_batch`` stamps a copy.
NOOP: Final = encode_batch([None], timestamps_ms=0, control=True)
NOOP_SIZE: Final = len(NOOP)
#: Bytes of recent entries one group keeps in memory (beyond them, reads go to the log).
entry_cache_bytes_max: Final = 4 * MIB

RAFT_COLUMN: Final = "raft"
_HS_PREFIX: Final = b"hs/"
_GROUP_KEY = struct.Struct(">Q")
_HARD_STATE = struct.Struct(">QQQ")
_SNAPSHOT_DATA = struct.Struct(">BQ")
_SNAPSHOT_FORMAT: Final = 1
#: Format 2 adds the logical log start.
_SNAPSHOT_DATA_2 = struct.Struct(">BQQ")
_SNAPSHOT_FORMAT_2: Final = 2
#: Format 3: format 2's fields, then the length of the owner's state and the state.
_SNAPSHOT_DATA_3 = struct.Struct(">BQQI")
_SNAPSHOT_FORMAT_3: Final = 3
#: The owner's state in one snapshot at most: a snapshot travels as one Raft message
#: (``node/transport.message_bytes_max``, about 71 MiB), and a follower holds it in memory
#: while installing it. Beyond it the owner trims its state (``state_source``).
SNAPSHOT_STATE_BYTES_MAX: Final = 16 * MIB
assert NOOP_SIZE > HEADER_SIZE


def noop_batch(base_offset: int, term: int, index: int) -> bytes:
    """The stored form of an EMPTY entry at ``index`` of ``term``, starting at ``base_offset``."""
    buf = bytearray(NOOP)
    stamp(buf, 0, base_offset, term, index)
    return bytes(buf)


def entry_kind(data: bytes) -> EntryKind:
    """What a stored batch is to Raft: EMPTY for the no-op control batch, NORMAL otherwise."""
    h = unpack_header(data)
    if h.is_control and h.size == NOOP_SIZE:
        return EntryKind.EMPTY
    return EntryKind.NORMAL


def next_offset(raw: RawNode, partition_log: RaftLogFile) -> int:
    """The offset after the last entry of ``raw``'s Raft log, stored or not: where a leader's
    next proposal starts. Unstored entries carry their stamped batch, except EMPTY entries
    from the core, which become one-offset no-op batches."""
    first_unstored, unstored = raw.unstored_entries()
    empties = 0
    for e in reversed(unstored):
        if e.data:
            return batch_end_offset(e.data) + empties
        empties += 1
    end = partition_log.end_offset_at_index(first_unstored - 1)
    if end is None:
        raise StorageError(f"raft index {first_unstored - 1} is not in the log")
    return end + empties


@dataclass(frozen=True, slots=True)
class SnapshotData:
    """What a partition snapshot carries besides its Raft metadata."""

    #: Where the log continues after the snapshot (the leader's stored start).
    log_start_offset: int
    #: The owner's state (format 3), or None (formats 1 and 2, or an owner without state).
    state: bytes | None = None
    #: The leader's logical log start when above ``log_start_offset``, else None.
    logical_start: int | None = None

    @property
    def logical(self) -> int:
        """The logical log start a follower takes."""
        return self.log_start_offset if self.logical_start is None else self.logical_start


def encode_snapshot_data(
    log_start_offset: int, state: bytes | None = None, *, logical_start: int | None = None
) -> bytes:
    """The smallest format that holds what is given: 1 (offset), 2 (and a logical start
    above it), 3 (and the owner's state)."""
    logical = log_start_offset if logical_start is None else logical_start
    if logical < log_start_offset:
        raise StorageError(f"logical log start {logical} below the stored start {log_start_offset}")
    if state is None:
        if logical == log_start_offset:
            return _SNAPSHOT_DATA.pack(_SNAPSHOT_FORMAT, log_start_offset)
        return _SNAPSHOT_DATA_2.pack(_SNAPSHOT_FORMAT_2, log_start_offset, logical)
    if len(state) > SNAPSHOT_STATE_BYTES_MAX:
        raise StorageError(
            f"snapshot state of {len(state)} bytes exceeds {SNAPSHOT_STATE_BYTES_MAX} bytes"
        )
    head = _SNAPSHOT_DATA_3.pack(_SNAPSHOT_FORMAT_3, log_start_offset, logical, len(state))
    return head + state


def decode_snapshot(data: bytes) -> SnapshotData:
    """Every format; StorageError if the bytes are not ours."""
    if not data:
        raise StorageError("partition snapshot is empty")
    fmt = data[0]
    state: bytes | None = None
    if fmt == _SNAPSHOT_FORMAT:
        if len(data) != _SNAPSHOT_DATA.size:
            raise StorageError(
                f"partition snapshot is {len(data)} bytes, expected {_SNAPSHOT_DATA.size}"
            )
        _fmt, offset = _SNAPSHOT_DATA.unpack(data)
        logical = offset
    elif fmt == _SNAPSHOT_FORMAT_2:
        if len(data) != _SNAPSHOT_DATA_2.size:
            raise StorageError(
                f"partition snapshot of format 2 is {len(data)} bytes, expected "
                f"{_SNAPSHOT_DATA_2.size}"
            )
        _fmt, offset, logical = _SNAPSHOT_DATA_2.unpack(data)
    elif fmt == _SNAPSHOT_FORMAT_3:
        head = _SNAPSHOT_DATA_3.size
        if len(data) < head:
            raise StorageError(f"partition snapshot of format 3 is {len(data)} bytes")
        _fmt, offset, logical, length = _SNAPSHOT_DATA_3.unpack_from(data)
        if length > SNAPSHOT_STATE_BYTES_MAX or len(data) != head + length:
            raise StorageError(
                f"partition snapshot is {len(data)} bytes; its header says {head + length}"
            )
        state = bytes(data[head:])
    else:
        raise StorageError(f"partition snapshot has format {fmt}")
    if offset < 0 or offset > UINT63_MAX or not offset <= logical <= UINT63_MAX:
        raise StorageError(f"partition snapshot has offset {offset} and log start {logical}")
    return SnapshotData(int(offset), state, None if logical == offset else int(logical))


def decode_snapshot_data(data: bytes) -> int:
    """The offset a snapshot's log continues at; StorageError if the bytes are not ours."""
    return decode_snapshot(data).log_start_offset


class RaftLogFile(Protocol):
    """The part of ``node.log.PartitionLog`` the Raft storage uses."""

    @property
    def log_start_offset(self) -> int: ...
    @property
    def stored_start_offset(self) -> int: ...
    @property
    def log_end_offset(self) -> int: ...
    @property
    def first_index(self) -> int: ...
    @property
    def last_index(self) -> int: ...
    @property
    def last_term(self) -> int: ...

    def term_at_index(self, raft_index: int) -> int | None: ...
    def end_offset_at_index(self, raft_index: int) -> int | None: ...
    def entries_by_index(self, lo: int, hi: int, max_bytes: int) -> list[bytes]: ...
    def append_stamped(self, batches: bytes | bytearray | memoryview) -> None: ...
    def truncate_suffix(self, offset: int) -> None: ...
    def reset(
        self, next_offset: int, last_index: int, last_term: int, *, log_start: int | None = None
    ) -> None: ...
    def flush(self) -> int: ...


class ReplicaStorage:
    """``raft.storage.StorageReader`` over a partition log, plus the driver's writes."""

    __slots__ = (
        "_cache",
        "_cache_bytes",
        "_cache_max_bytes",
        "_conf",
        "_hs",
        "log",
        "lost_to",
        "state_source",
    )

    def __init__(
        self,
        partition_log: RaftLogFile,
        hard_state: HardState,
        conf: ConfState,
        *,
        cache_bytes_max: int = entry_cache_bytes_max,
    ) -> None:
        self.log = partition_log
        last = partition_log.last_index
        #: The stored commit index when the log no longer reaches it (0: no loss). The node
        #: acknowledged those entries: the core withholds its votes until it holds them again
        #: (``RawNode(lost_to=...)``), and the driver keeps storing it as the commit index
        #: until then, so that a second crash meanwhile still knows.
        self.lost_to = 0
        if hard_state.commit >= NEW_REPLICA:
            # A new replica that had not caught up yet (the driver stores the marker).
            self.lost_to = NEW_REPLICA
            hard_state = HardState(hard_state.term, hard_state.vote, last)
        elif hard_state.commit > last:
            # Only possible when the log lost fsynced data, or lost writes it never fsynced
            # (flush=os after a machine crash): what it no longer holds cannot be committed here.
            log.warning(
                "raft log ends at index %d but the stored commit index is %d: acknowledged "
                "entries were lost; this replica does not vote until the leader sent them again",
                last,
                hard_state.commit,
            )
            self.lost_to = hard_state.commit
            hard_state = HardState(hard_state.term, hard_state.vote, last)
        self._hs = hard_state
        self._conf = conf
        self._cache: deque[Entry] = deque()
        self._cache_bytes = 0
        self._cache_max_bytes = cache_bytes_max
        #: The owner's state for the snapshots this replica sends as leader, at most the
        #: given bytes (the partition's idempotence state; set by ``Partition.attach``).
        #: None: format-1 snapshots (offset only).
        self.state_source: Callable[[int], bytes] | None = None

    # ---- StorageReader -------------------------------------------------------------------

    def hard_state(self) -> HardState:
        return self._hs

    def conf_state(self) -> ConfState:
        return self._conf

    def first_index(self) -> int:
        return self.log.first_index

    def last_index(self) -> int:
        return self.log.last_index

    def term(self, index: int) -> int:
        t = self.log.term_at_index(index)
        if t is not None:
            return t
        first = self.log.first_index
        if index < first:
            raise CompactedError(index, first)
        raise UnavailableError(index, self.log.last_index)

    def stored_term(self, index: int) -> int | None:
        """The term of the stored entry at ``index`` (None if the log does not hold it),
        from the cache of recent entries when it has it: the state machines' waiters ask
        this for every entry a round stored."""
        cache = self._cache
        if cache and cache[0].index <= index <= cache[-1].index:
            return cache[index - cache[0].index].term
        return self.log.term_at_index(index)

    def entries(self, lo: int, hi: int, max_bytes: int) -> list[Entry]:
        first = self.log.first_index
        if lo < first:
            raise CompactedError(lo, first)
        last = self.log.last_index
        if hi > last + 1:
            raise UnavailableError(hi - 1, last)
        if lo >= hi:
            return []
        cache = self._cache
        if cache and cache[0].index <= lo <= cache[-1].index:
            start = lo - cache[0].index
            out: list[Entry] = []
            size = 0
            for i in range(start, min(len(cache), start + hi - lo)):
                e = cache[i]
                size += e.size_bytes
                if out and size > max_bytes:
                    break
                out.append(e)
            return out
        out = []
        for data in self.log.entries_by_index(lo, hi, max_bytes):
            h = unpack_header(data)
            kind = EntryKind.EMPTY if h.is_control and h.size == NOOP_SIZE else EntryKind.NORMAL
            out.append(Entry(h.raft_term, h.raft_index, data, kind))
        return out

    def snapshot(self) -> Snapshot:
        index = self.log.first_index - 1
        term = self.log.term_at_index(index)
        if term is None:
            raise SnapshotTemporarilyUnavailable(
                f"the term of raft index {index}, where the log starts, is not known"
            )
        source = self.state_source
        state = None if source is None else source(SNAPSHOT_STATE_BYTES_MAX)
        data = encode_snapshot_data(
            self.log.stored_start_offset, state, logical_start=self.log.log_start_offset
        )
        return Snapshot(SnapshotMeta(index, term, self._conf), data)

    # ---- writes by the driver ------------------------------------------------------------

    def set_hard_state(self, hard_state: HardState) -> None:
        self._hs = hard_state

    def set_conf_state(self, conf: ConfState) -> None:
        self._conf = conf

    def append(self, entries: tuple[Entry, ...] | list[Entry]) -> int | None:
        """Store ``entries`` (contiguous) with one write, replacing a conflicting suffix from
        the first entry whose term differs from the stored one (identical entries are kept).
        Returns the first index removed from the log when a suffix was truncated, else None."""
        if not entries:
            return None
        lg = self.log
        # Entries the log already holds with the same term are the same entries (Log Matching):
        # skip them, and truncate only from the first that differs. Rewriting them would
        # remove fsynced, acknowledged entries from the disk for a while and fail their waiters.
        last = lg.last_index
        skip = 0
        while skip < len(entries) and entries[skip].index <= last:
            if lg.term_at_index(entries[skip].index) != entries[skip].term:
                break
            skip += 1
        if skip:
            entries = entries[skip:]
            if not entries:
                return None
        first = entries[0].index
        truncated: int | None = None
        if first <= last:
            end = lg.end_offset_at_index(first - 1)
            if end is None:
                raise StorageError(
                    f"cannot truncate the raft log at index {first}: the log holds "
                    f"[{lg.first_index}, {lg.last_index}]"
                )
            lg.truncate_suffix(end)
            truncated = first
            self._drop_cache_from(first)
        if first != lg.last_index + 1:
            raise StorageError(
                f"raft entries from index {first} do not continue the log ending at {lg.last_index}"
            )
        offset = lg.log_end_offset
        parts: list[bytes] = []
        stored: list[Entry] = []
        for e in entries:
            data = e.data
            if data:
                offset = batch_end_offset(data)
                stored.append(e)
            else:
                data = noop_batch(offset, e.term, e.index)
                offset += 1
                stored.append(Entry(e.term, e.index, data, EntryKind.EMPTY))
            parts.append(data)
        lg.append_stamped(parts[0] if len(parts) == 1 else b"".join(parts))
        self._cache_extend(stored)
        return truncated

    def install_snapshot(self, snapshot: Snapshot) -> None:
        """Empty the log and make it continue after the snapshot's point (the owner restores
        the state it carries: ``GroupHandler.on_snapshot``)."""
        meta = snapshot.meta
        data = decode_snapshot(snapshot.data)
        self.log.reset(data.log_start_offset, meta.index, meta.term, log_start=data.logical)
        self._conf = meta.conf
        self._cache.clear()
        self._cache_bytes = 0

    def trim_cache(self, keep_from_index: int) -> None:
        """Forget cached entries below ``keep_from_index`` (applied, and replicated where
        the caller cares): they are read from the log if ever needed again."""
        cache = self._cache
        while cache and cache[0].index < keep_from_index:
            self._cache_bytes -= cache.popleft().size_bytes

    def _cache_extend(self, entries: list[Entry]) -> None:
        cache = self._cache
        if cache and cache[-1].index + 1 != entries[0].index:
            cache.clear()
            self._cache_bytes = 0
        cache.extend(entries)
        self._cache_bytes += sum(e.size_bytes for e in entries)
        while len(cache) > 1 and self._cache_bytes > self._cache_max_bytes:
            self._cache_bytes -= cache.popleft().size_bytes

    def _drop_cache_from(self, index: int) -> None:
        cache = self._cache
        while cache and cache[-1].index >= index:
            self._cache_bytes -= cache.pop().size_bytes


class HardStateStore:
    """Hard states of every group of the node in one RocksDB column family, keyed by group."""

    def __init__(self, store: MetaStore) -> None:
        self._store = store

    @staticmethod
    def _key(group_id: int) -> bytes:
        return _HS_PREFIX + _GROUP_KEY.pack(group_id)

    def load(self, group_id: int) -> HardState:
        raw = self._store.get(RAFT_COLUMN, self._key(group_id))
        if raw is None:
            return EMPTY_HARD_STATE
        if len(raw) != _HARD_STATE.size:
            raise StorageError(f"raft hard state of group {group_id} is {len(raw)} bytes")
        term, vote, commit = _HARD_STATE.unpack(raw)
        return HardState(term, vote, commit)

    def save(self, states: dict[int, HardState], *, sync: bool) -> None:
        """One write batch for all of them (the caller may run it in a worker thread)."""
        self._store.write_batch(
            RAFT_COLUMN,
            [
                (self._key(g), _HARD_STATE.pack(hs.term, hs.vote, hs.commit))
                for g, hs in states.items()
            ],
            sync=sync,
        )

    def delete(self, group_id: int) -> None:
        self._store.delete(RAFT_COLUMN, self._key(group_id))


__all__ = [
    "NOOP",
    "NOOP_SIZE",
    "RAFT_COLUMN",
    "SNAPSHOT_STATE_BYTES_MAX",
    "HardStateStore",
    "RaftLogFile",
    "ReplicaStorage",
    "SnapshotData",
    "decode_snapshot",
    "decode_snapshot_data",
    "encode_snapshot_data",
    "entry_cache_bytes_max",
    "entry_kind",
    "next_offset",
    "noop_batch",
]
