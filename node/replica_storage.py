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
  Raft message; the owner trims what does not fit (and says so in its log).
* Format 4 is a *streamed* snapshot (``node/catchup.py``): the Raft message carries only
  where the snapshot's log range starts and ends (the batch holding the leader's logical
  start, and the offset after the snapshot's index, which is the leader's applied index)
  and the names, sizes and CRCs of its state parts. The follower copies the range's records
  and the parts over the internal listener in checksummed chunks before its Raft core ever
  sees the message; installing it adopts the copied log (``PartitionLog.adopt``), so the
  follower holds the same retained records as the leader. ``snapshot_maker`` makes them
  (a leader), ``stream_installer`` installs them (a follower).

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
from tidelog.node.raft_codec import is_conf_change_batch
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
#: A stored commit index with this bit set: the replica may have lost acknowledged entries,
#: it cannot tell how many (a flush=os log after a machine restart: its unsynced tail and the
#: unsynced hard states that recorded what it acknowledged may be gone together); the rest of
#: the value is its commit index. Below ``NEW_REPLICA``, above any real index.
LOSS_UNKNOWN: Final = 1 << 61
#: A group's configuration in force (groups whose membership changes through the log):
#: the index it is in force from, the counts of voters and learners, then their ids.
_CONF_PREFIX: Final = b"conf/"
#: A group this replica helped form brand new on this data directory (its owner established
#: that every first replica was fresh: node/controller_bootstrap.py): present, the replica is
#: an ordinary one from then on, even if the new-replica marker is still its stored commit.
_FORMED_PREFIX: Final = b"formed/"
_CONF_HEAD = struct.Struct(">QHH")
_CONF_ID = struct.Struct(">I")
_SNAPSHOT_DATA = struct.Struct(">BQ")
_SNAPSHOT_FORMAT: Final = 1
#: Format 2 adds the logical log start.
_SNAPSHOT_DATA_2 = struct.Struct(">BQQ")
_SNAPSHOT_FORMAT_2: Final = 2
#: Format 3: format 2's fields, then the length of the owner's state and the state.
_SNAPSHOT_DATA_3 = struct.Struct(">BQQI")
_SNAPSHOT_FORMAT_3: Final = 3
#: Format 4: the streamed range (start offset, logical start, end offset, the Raft index
#: and term before the start) and the count of state parts; then each part's name
#: (length-prefixed UTF-8), size and CRC-32C.
_SNAPSHOT_DATA_4 = struct.Struct(">BQQQQQH")
_SNAPSHOT_PART = struct.Struct(">QI")
_SNAPSHOT_FORMAT_4: Final = 4
#: State parts of one streamed snapshot at most, and the length of a part's name.
SNAPSHOT_PARTS_MAX: Final = 1024
PART_NAME_BYTES_MAX: Final = 255
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
    """What a stored batch is to Raft: EMPTY for the no-op control batch, CONFIG for a
    membership change (``raft_codec.conf_change_batch``), NORMAL otherwise."""
    h = unpack_header(data)
    if h.is_control:
        if h.size == NOOP_SIZE:
            return EntryKind.EMPTY
        if is_conf_change_batch(data):
            return EntryKind.CONFIG
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
class PartInfo:
    """One state part of a streamed snapshot, as the Raft message announces it."""

    name: str
    size: int
    crc32c: int


@dataclass(frozen=True, slots=True)
class StreamedRange:
    """What a streamed snapshot (format 4) asks the follower to copy before installing it."""

    #: Base offset of the first batch to copy (the one holding the logical start).
    start_offset: int
    #: The leader's logical log start (at or above ``start_offset``).
    logical_start: int
    #: The offset after the snapshot's Raft index: the copy ends there.
    end_offset: int
    #: The Raft index and term of the entry before the first copied batch.
    prev_index: int
    prev_term: int
    parts: tuple[PartInfo, ...] = ()


def encode_streamed(r: StreamedRange) -> bytes:
    if not (r.start_offset <= r.logical_start and r.start_offset <= r.end_offset):
        raise StorageError(f"streamed snapshot range is not ordered: {r}")
    if len(r.parts) > SNAPSHOT_PARTS_MAX:
        raise StorageError(f"a streamed snapshot has {len(r.parts)} parts")
    out = [
        _SNAPSHOT_DATA_4.pack(
            _SNAPSHOT_FORMAT_4, r.start_offset, r.logical_start, r.end_offset,
            r.prev_index, r.prev_term, len(r.parts),
        )
    ]  # fmt: skip
    for part in r.parts:
        name = part.name.encode()
        if not 0 < len(name) <= PART_NAME_BYTES_MAX:
            raise StorageError(f"snapshot part name {part.name!r} is empty or too long")
        out.append(
            struct.pack(">H", len(name)) + name + _SNAPSHOT_PART.pack(part.size, part.crc32c)
        )
    return b"".join(out)


def _decode_streamed(data: bytes) -> StreamedRange:
    head = _SNAPSHOT_DATA_4.size
    if len(data) < head:
        raise StorageError(f"partition snapshot of format 4 is {len(data)} bytes")
    _fmt, start, logical, end, prev_index, prev_term, count = _SNAPSHOT_DATA_4.unpack_from(data)
    if count > SNAPSHOT_PARTS_MAX:
        raise StorageError(f"partition snapshot announces {count} parts")
    if (
        not (start <= logical <= UINT63_MAX and start <= end <= UINT63_MAX)
        or max(prev_index, prev_term) > UINT63_MAX
    ):
        raise StorageError(f"partition snapshot range {start}, {logical}, {end} is not ordered")
    pos = head
    parts: list[PartInfo] = []
    for _ in range(count):
        if pos + 2 > len(data):
            raise StorageError("partition snapshot ends inside its part list")
        (n,) = struct.unpack_from(">H", data, pos)
        pos += 2
        if not 0 < n <= PART_NAME_BYTES_MAX or pos + n + _SNAPSHOT_PART.size > len(data):
            raise StorageError("partition snapshot has a bad part name")
        try:
            name = bytes(data[pos : pos + n]).decode()
        except UnicodeDecodeError:
            raise StorageError("partition snapshot has a part name that is not UTF-8") from None
        pos += n
        size, crc = _SNAPSHOT_PART.unpack_from(data, pos)
        pos += _SNAPSHOT_PART.size
        parts.append(PartInfo(name, int(size), int(crc)))
    if pos != len(data):
        raise StorageError(f"partition snapshot has {len(data) - pos} bytes after its parts")
    if len({p.name for p in parts}) != len(parts):
        raise StorageError("partition snapshot names a part twice")
    return StreamedRange(
        int(start), int(logical), int(end), int(prev_index), int(prev_term), tuple(parts)
    )


@dataclass(frozen=True, slots=True)
class SnapshotData:
    """What a partition snapshot carries besides its Raft metadata."""

    #: Where the log continues after the snapshot (the leader's stored start).
    log_start_offset: int
    #: The owner's state (format 3), or None (formats 1 and 2, or an owner without state).
    state: bytes | None = None
    #: The leader's logical log start when above ``log_start_offset``, else None.
    logical_start: int | None = None
    #: Format 4: the range and parts to copy before installing (``node/catchup.py``).
    stream: StreamedRange | None = None

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
    elif fmt == _SNAPSHOT_FORMAT_4:
        r = _decode_streamed(data)
        return SnapshotData(
            r.start_offset,
            None,
            None if r.logical_start == r.start_offset else r.logical_start,
            r,
        )
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
        "_conf_index",
        "_hs",
        "custom_installer",
        "installed_parts",
        "log",
        "loss_unknown",
        "lost_to",
        "snapshot_maker",
        "state_source",
        "stream_installer",
    )

    def __init__(
        self,
        partition_log: RaftLogFile,
        hard_state: HardState,
        conf: ConfState,
        *,
        cache_bytes_max: int = entry_cache_bytes_max,
        conf_index: int | None = None,
    ) -> None:
        """``conf_index``: where the stored ``conf`` is in force from (None: no configuration
        was ever stored for the group, so no CONFIG entry up to its commit index took effect,
        and ``conf`` is its initial one)."""
        self.log = partition_log
        last = partition_log.last_index
        #: The stored commit index when the log no longer reaches it (0: no loss). The node
        #: acknowledged those entries: the core withholds its votes until it holds them again
        #: (``RawNode(lost_to=...)``), and the driver keeps storing it as the commit index
        #: until then, so that a second crash meanwhile still knows.
        self.lost_to = 0
        #: Stored with ``LOSS_UNKNOWN`` (``mark_loss_unknown``): recovering up to ``lost_to`` =
        #: one past its last index, since nothing says how far it acknowledged; the driver
        #: keeps storing the mark (not ``lost_to``) until a leader caught it up.
        self.loss_unknown = False
        if LOSS_UNKNOWN <= hard_state.commit < NEW_REPLICA:
            self.loss_unknown = True
            hard_state = HardState(
                hard_state.term, hard_state.vote, hard_state.commit - LOSS_UNKNOWN
            )
        if hard_state.commit >= NEW_REPLICA:
            # A new replica that had not caught up yet (the driver stores the marker). It
            # may hold entries all the same (the hard state that cleared the marker is a
            # commit-only write, not synced, or the log's fsync landed before it): its own
            # as a leader, or a leader's, committed or not. Nothing says which, so none
            # counts as committed; the commit index is relearned from a leader (RaftLog
            # still counts the log's compaction point and the owner's applied index).
            self.lost_to = NEW_REPLICA
            hard_state = HardState(hard_state.term, hard_state.vote, 0)
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
        if self.loss_unknown and not self.lost_to:
            self.lost_to = last + 1
        self._hs = hard_state
        self._conf = conf
        self._conf_index = hard_state.commit if conf_index is None else conf_index
        self._cache: deque[Entry] = deque()
        self._cache_bytes = 0
        self._cache_max_bytes = cache_bytes_max
        #: The owner's state for the snapshots this replica sends as leader, at most the
        #: given bytes (the partition's idempotence state; set by ``Partition.attach``).
        #: None: format-1 snapshots (offset only).
        self.state_source: Callable[[int], bytes] | None = None
        #: Makes the streamed snapshots (format 4) this replica sends as leader, or None
        #: when nothing lies beyond the log's start (then the formats above).
        self.snapshot_maker: Callable[[], Snapshot | None] | None = None
        #: Installs a streamed snapshot whose copy is complete (adopting the copied log);
        #: returns the state parts' bytes, kept in ``installed_parts`` for the owner.
        self.stream_installer: Callable[[Snapshot, StreamedRange], dict[str, bytes]] | None = None
        self.installed_parts: dict[str, bytes] = {}
        #: An owner whose snapshots are not a partition's (the controller,
        #: ``node/controller_snapshots.py``) installs them itself.
        self.custom_installer: Callable[[Snapshot], None] | None = None

    def mark_loss_unknown(self) -> None:
        """The replica may have lost acknowledged entries and cannot tell how many (see
        ``LOSS_UNKNOWN``): it recovers up to one past its last index at least (the core
        learns more from a leader's heartbeat) before it votes again."""
        self.loss_unknown = True
        if not self.lost_to:
            self.lost_to = self.log.last_index + 1

    # ---- StorageReader -------------------------------------------------------------------

    def hard_state(self) -> HardState:
        return self._hs

    def conf_state(self) -> ConfState:
        return self._conf

    def conf_index(self) -> int:
        return self._conf_index

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
            kind = entry_kind(data) if h.is_control else EntryKind.NORMAL
            out.append(Entry(h.raft_term, h.raft_index, data, kind))
        return out

    def snapshot(self) -> Snapshot:
        maker = self.snapshot_maker
        if maker is not None:
            streamed = maker()
            if streamed is not None:
                return streamed
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

    def set_conf_state(self, conf: ConfState, index: int | None = None) -> None:
        self._conf = conf
        if index is not None:
            self._conf_index = index

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
        if self.custom_installer is not None:
            self.custom_installer(snapshot)
            self._conf = meta.conf
            self._cache.clear()
            self._cache_bytes = 0
            return
        data = decode_snapshot(snapshot.data)
        if data.stream is not None:
            installer = self.stream_installer
            if installer is None:
                raise StorageError(
                    f"a streamed snapshot at raft index {meta.index} reached a replica that "
                    "cannot copy one"
                )
            self.installed_parts = installer(snapshot, data.stream)
            if self.log.last_index != meta.index or self.log.last_term != meta.term:
                raise StorageError(
                    f"the copied log ends at raft index {self.log.last_index} term "
                    f"{self.log.last_term}, not at the snapshot's {meta.index} term {meta.term}"
                )
        else:
            self.installed_parts = {}
            self.log.reset(data.log_start_offset, meta.index, meta.term, log_start=data.logical)
        self._conf = meta.conf
        self._conf_index = meta.index
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

    def save(
        self,
        states: dict[int, HardState],
        *,
        sync: bool,
        confs: dict[int, tuple[int, ConfState]] | None = None,
    ) -> None:
        """One write batch for all of them (the caller may run it in a worker thread), with
        the configurations that changed (``confs``: group -> (index in force from, conf)),
        so a configuration and the commit index that includes it are stored together."""
        items = [
            (self._key(g), _HARD_STATE.pack(hs.term, hs.vote, hs.commit))
            for g, hs in states.items()
        ]
        for g, (index, conf) in (confs or {}).items():
            items.append((self._conf_key(g), encode_conf(index, conf)))
        self._store.write_batch(RAFT_COLUMN, items, sync=sync)

    @staticmethod
    def _formed_key(group_id: int) -> bytes:
        return _FORMED_PREFIX + _GROUP_KEY.pack(group_id)

    @staticmethod
    def _conf_key(group_id: int) -> bytes:
        return _CONF_PREFIX + _GROUP_KEY.pack(group_id)

    def load_conf(self, group_id: int) -> tuple[int, ConfState] | None:
        """The stored configuration of a group whose membership changes through the log
        (with the index it is in force from), or None if none was ever stored."""
        raw = self._store.get(RAFT_COLUMN, self._conf_key(group_id))
        if raw is None:
            return None
        return decode_conf(raw, group_id)

    def formed(self, group_id: int) -> bool:
        """Whether :meth:`mark_formed` was stored for the group on this data directory."""
        return self._store.get(RAFT_COLUMN, self._formed_key(group_id)) is not None

    def mark_formed(self, group_id: int) -> None:
        """Record, synced, that this replica is one of the first of a brand-new group."""
        self._store.write_batch(RAFT_COLUMN, [(self._formed_key(group_id), b"1")], sync=True)

    def delete(self, group_id: int) -> None:
        self._store.delete(RAFT_COLUMN, self._key(group_id))
        self._store.delete(RAFT_COLUMN, self._conf_key(group_id))
        self._store.delete(RAFT_COLUMN, self._formed_key(group_id))


def encode_conf(index: int, conf: ConfState) -> bytes:
    voters = sorted(conf.voters)
    learners = sorted(conf.learners)
    head = _CONF_HEAD.pack(index, len(voters), len(learners))
    return head + b"".join(_CONF_ID.pack(n) for n in (*voters, *learners))


def decode_conf(raw: bytes, group_id: int) -> tuple[int, ConfState]:
    """Strict: StorageError for bytes that are not one stored configuration."""
    if len(raw) < _CONF_HEAD.size:
        raise StorageError(f"raft configuration of group {group_id} is {len(raw)} bytes")
    index, nv, nl = _CONF_HEAD.unpack_from(raw)
    if len(raw) != _CONF_HEAD.size + _CONF_ID.size * (nv + nl) or nv == 0:
        raise StorageError(
            f"raft configuration of group {group_id} is {len(raw)} bytes for {nv} voters "
            f"and {nl} learners"
        )
    ids = [
        _CONF_ID.unpack_from(raw, _CONF_HEAD.size + _CONF_ID.size * i)[0] for i in range(nv + nl)
    ]
    voters, learners = frozenset(ids[:nv]), frozenset(ids[nv:])
    if len(voters) != nv or len(learners) != nl or voters & learners or 0 in ids:
        raise StorageError(f"raft configuration of group {group_id} repeats node ids")
    return int(index), ConfState(voters, learners)


__all__ = [
    "LOSS_UNKNOWN",
    "NOOP",
    "NOOP_SIZE",
    "RAFT_COLUMN",
    "SNAPSHOT_STATE_BYTES_MAX",
    "HardStateStore",
    "PartInfo",
    "RaftLogFile",
    "ReplicaStorage",
    "SnapshotData",
    "StreamedRange",
    "decode_snapshot",
    "decode_snapshot_data",
    "encode_snapshot_data",
    "encode_streamed",
    "entry_cache_bytes_max",
    "entry_kind",
    "next_offset",
    "noop_batch",
]
