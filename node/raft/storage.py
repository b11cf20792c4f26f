"""The storage interface of the Raft core, and an in-memory implementation for tests.

The core only READS storage (``StorageReader``): on start it learns the hard state, the
membership and the log from it, and the leader reads entries from it to replicate them. All
writes are done by the driver while it processes a ``Ready`` (see ``types.Ready``):

    ready = node.ready()
    if ready.snapshot:     storage.apply_snapshot(ready.snapshot)
    if ready.entries:      storage.append(ready.entries)      # truncates a conflicting suffix
    if ready.hard_state:   storage.set_hard_state(ready.hard_state)
    if ready.must_sync:    fsync                              # BEFORE any message is sent
    send(ready.messages); apply(ready.committed); node.advance(ready)

Log positions: ``first_index()`` is the first index still held; the entry just before it
(``first_index() - 1``) is the compaction point, whose term stays known (``term`` answers for
it) so the leader can still check log matching at the boundary. An empty log has
``first_index() == 1`` and ``last_index() == 0``.

Retention truncates the prefix with ``compact(index)``: entries up to ``index`` disappear.
A follower that then needs one of them gets ``snapshot()`` instead, so the application must be
able to produce a snapshot covering at least the compaction point.
"""

from __future__ import annotations

from typing import Protocol

from .errors import (
    CompactedError,
    SnapshotOutOfDate,
    SnapshotTemporarilyUnavailable,
    UnavailableError,
)
from .types import (
    EMPTY_HARD_STATE,
    EMPTY_SNAPSHOT,
    ConfState,
    Entry,
    HardState,
    Snapshot,
    SnapshotMeta,
)

#: ``entries(..., max_bytes=NO_LIMIT_BYTES)`` returns every entry in range.
NO_LIMIT_BYTES = 1 << 62


class StorageReader(Protocol):
    """What the core reads. Every method is cheap and never blocks."""

    def hard_state(self) -> HardState:
        """The last persisted term, vote and commit index."""
        ...

    def conf_state(self) -> ConfState:
        """The membership in force at the last applied configuration (or snapshot)."""
        ...

    def conf_index(self) -> int:
        """The log index up to which ``conf_state`` includes every committed CONFIG entry
        (stored with it from ``Ready.conf_index``). The core looks for CONFIG entries only
        after it, so a driver that never stored one answers with the stored commit index
        (no CONFIG entry below it was ever committed) or 0."""
        ...

    def first_index(self) -> int:
        """The first index still held (compaction point + 1)."""
        ...

    def last_index(self) -> int:
        """The index of the last entry (the compaction point when the log is empty)."""
        ...

    def term(self, index: int) -> int:
        """The term of the entry at ``index``, for ``first_index()-1 <= index <= last_index()``.
        Raises ``CompactedError`` below that range and ``UnavailableError`` above it."""
        ...

    def entries(self, lo: int, hi: int, max_bytes: int) -> list[Entry]:
        """Entries ``[lo, hi)``, stopping before ``max_bytes`` (by ``Entry.size_bytes``) is
        exceeded but always returning at least one entry when the range is not empty.
        Raises ``CompactedError`` if ``lo < first_index()``, ``UnavailableError`` if
        ``hi > last_index() + 1``."""
        ...

    def snapshot(self) -> Snapshot:
        """The most recent snapshot (covering at least the compaction point), or raises
        ``SnapshotTemporarilyUnavailable`` if the application is still producing one."""
        ...


class Storage(StorageReader, Protocol):
    """What the driver writes, in the order of the ``Ready`` contract."""

    def set_hard_state(self, hard_state: HardState) -> None: ...

    def append(self, entries: list[Entry] | tuple[Entry, ...]) -> None:
        """Appends contiguous ``entries``; an existing entry at an index they cover, and every
        entry after it, is replaced (a conflicting suffix from an older leader)."""
        ...

    def truncate_suffix(self, from_index: int) -> None:
        """Removes every entry with index ``>= from_index`` (never below the compaction point)."""
        ...

    def compact(self, index: int) -> None:
        """Removes every entry with index ``<= index`` (retention); ``term(index)`` stays known."""
        ...

    def apply_snapshot(self, snapshot: Snapshot) -> None:
        """Replaces the log by ``snapshot``: the log becomes empty after ``snapshot.meta.index``
        and the membership becomes ``snapshot.meta.conf``."""
        ...


class MemoryStorage:
    """An in-memory ``Storage`` for tests and the simulator.

    ``_ents[0]`` is a sentinel standing for the compaction point (its index and term), so
    ``_ents[i - offset]`` is the entry at index ``i`` with ``offset = _ents[0].index``.
    """

    __slots__ = ("_conf", "_conf_index", "_ents", "_hard_state", "_snapshot")

    def __init__(self, conf: ConfState | None = None) -> None:
        self._hard_state: HardState = EMPTY_HARD_STATE
        self._conf: ConfState = conf if conf is not None else ConfState()
        self._conf_index = 0
        self._snapshot: Snapshot = EMPTY_SNAPSHOT
        self._ents: list[Entry] = [Entry(term=0, index=0)]

    # ---- reads -------------------------------------------------------------------------

    def hard_state(self) -> HardState:
        return self._hard_state

    def conf_state(self) -> ConfState:
        return self._conf

    def conf_index(self) -> int:
        return self._conf_index

    def first_index(self) -> int:
        return self._ents[0].index + 1

    def last_index(self) -> int:
        return self._ents[-1].index

    def term(self, index: int) -> int:
        offset = self._ents[0].index
        if index < offset:
            raise CompactedError(index, offset + 1)
        if index > self._ents[-1].index:
            raise UnavailableError(index, self._ents[-1].index)
        return self._ents[index - offset].term

    def entries(self, lo: int, hi: int, max_bytes: int) -> list[Entry]:
        offset = self._ents[0].index
        if lo <= offset:
            raise CompactedError(lo, offset + 1)
        if hi > self._ents[-1].index + 1:
            raise UnavailableError(hi - 1, self._ents[-1].index)
        assert lo <= hi, f"entries: lo {lo} > hi {hi}"
        out: list[Entry] = []
        size = 0
        for e in self._ents[lo - offset : hi - offset]:
            size += e.size_bytes
            if out and size > max_bytes:
                break
            out.append(e)
        return out

    def snapshot(self) -> Snapshot:
        if self._snapshot.meta.index < self._ents[0].index:
            raise SnapshotTemporarilyUnavailable("no snapshot covers the compaction point yet")
        return self._snapshot

    # ---- writes (by the driver) ---------------------------------------------------------

    def set_hard_state(self, hard_state: HardState) -> None:
        self._hard_state = hard_state

    def set_conf_state(self, conf: ConfState, index: int | None = None) -> None:
        """Records the membership once a configuration change is applied (``Ready.conf_state``
        with ``Ready.conf_index``)."""
        self._conf = conf
        if index is not None:
            self._conf_index = index

    def append(self, entries: list[Entry] | tuple[Entry, ...]) -> None:
        if not entries:
            return
        first = entries[0].index
        assert entries[-1].index == first + len(entries) - 1, "append: entries not contiguous"
        offset = self._ents[0].index
        last = self._ents[-1].index
        assert first <= last + 1, f"append: gap between last index {last} and {first}"
        if entries[-1].index <= offset:
            return  # entirely covered by the compaction point (already in a snapshot)
        if first <= offset:
            entries = entries[offset + 1 - first :]
            first = offset + 1
        # Drop the conflicting (or identical) suffix, then append.
        del self._ents[first - offset :]
        self._ents.extend(entries)

    def truncate_suffix(self, from_index: int) -> None:
        offset = self._ents[0].index
        assert from_index > offset, f"truncate_suffix({from_index}) below compaction point"
        del self._ents[from_index - offset :]

    def compact(self, index: int) -> None:
        offset = self._ents[0].index
        if index <= offset:
            return
        last = self._ents[-1].index
        assert index <= last, f"compact({index}) beyond last index {last}"
        keep = self._ents[index - offset]
        self._ents = [Entry(term=keep.term, index=keep.index), *self._ents[index - offset + 1 :]]

    def create_snapshot(self, index: int, data: bytes, conf: ConfState | None = None) -> Snapshot:
        """Records a snapshot of the applied state at ``index`` (the application calls this
        before compacting past ``index``)."""
        if index <= self._snapshot.meta.index:
            raise SnapshotOutOfDate(f"snapshot at {index} is not newer than {self._snapshot}")
        offset = self._ents[0].index
        assert offset <= index <= self._ents[-1].index, f"create_snapshot({index}) outside log"
        meta = SnapshotMeta(index=index, term=self.term(index), conf=conf or self._conf)
        self._snapshot = Snapshot(meta=meta, data=data)
        return self._snapshot

    def apply_snapshot(self, snapshot: Snapshot) -> None:
        meta = snapshot.meta
        if meta.index <= self._snapshot.meta.index:
            raise SnapshotOutOfDate(f"snapshot at {meta.index} is not newer than the stored one")
        self._snapshot = snapshot
        self._conf = meta.conf
        self._conf_index = meta.index
        self._ents = [Entry(term=meta.term, index=meta.index)]
