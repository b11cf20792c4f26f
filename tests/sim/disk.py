"""A simulated disk that separates what was written from what was synced.

The core reads ``written`` (a ``MemoryStorage``), which every write reaches at once, as the
page cache would. ``durable`` is a second ``MemoryStorage`` that only receives a write when an
fsync covers it. A crash keeps the durable image plus, at most, a prefix of the unsynced writes
in the order they were issued (a write-ahead log survives as a prefix), the last surviving
entry batch possibly torn after any entry. The restarted node reads a fresh copy of that image.

A hard state is written atomically (it is small and checksummed in the real store), so it is
either kept whole or lost; only entry batches tear.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from tidelog.node.raft.storage import NO_LIMIT_BYTES, MemoryStorage
from tidelog.node.raft.types import ConfState, Entry, HardState, Snapshot


@dataclass(frozen=True, slots=True)
class _Append:
    entries: tuple[Entry, ...]


@dataclass(frozen=True, slots=True)
class _SetHardState:
    hard_state: HardState


@dataclass(frozen=True, slots=True)
class _SetConf:
    """The configuration in force and the index it is in force from (``Ready.conf_state``)."""

    conf: ConfState
    index: int


@dataclass(frozen=True, slots=True)
class _InstallSnapshot:
    snapshot: Snapshot


@dataclass(frozen=True, slots=True)
class _Compact:
    """The application's own snapshot at ``index`` followed by compaction up to it."""

    index: int
    data: bytes


_Op = _Append | _SetHardState | _SetConf | _InstallSnapshot | _Compact


def _apply(storage: MemoryStorage, op: _Op) -> None:
    if isinstance(op, _Append):
        storage.append(op.entries)
    elif isinstance(op, _SetHardState):
        storage.set_hard_state(op.hard_state)
    elif isinstance(op, _SetConf):
        storage.set_conf_state(op.conf, op.index)
    elif isinstance(op, _InstallSnapshot):
        storage.apply_snapshot(op.snapshot)
    else:
        storage.create_snapshot(op.index, op.data)
        storage.compact(op.index)


def copy_storage(src: MemoryStorage, conf: ConfState) -> MemoryStorage:
    """A fresh storage holding the same snapshot, log and hard state as ``src``."""
    dst = MemoryStorage(conf)
    first = src.first_index()
    if first > 1:
        dst.apply_snapshot(src.snapshot())
    last = src.last_index()
    if last >= first:
        dst.append(src.entries(first, last + 1, NO_LIMIT_BYTES))
    dst.set_hard_state(src.hard_state())
    dst.set_conf_state(src.conf_state(), src.conf_index())
    return dst


@dataclass(frozen=True, slots=True)
class CrashLoss:
    """What a crash threw away, for the trace."""

    ops_lost: int
    entries_torn: int


class SimDisk:
    """One node's disk across crashes (the disk outlives the process)."""

    __slots__ = ("_conf", "_unsynced", "durable", "syncs", "written")

    def __init__(self, conf: ConfState) -> None:
        self._conf = conf
        self.written = MemoryStorage(conf)
        self.durable = MemoryStorage(conf)
        self._unsynced: list[_Op] = []
        self.syncs = 0

    @property
    def dirty(self) -> bool:
        return bool(self._unsynced)

    def _write(self, op: _Op) -> None:
        _apply(self.written, op)
        self._unsynced.append(op)

    def install_snapshot(self, snapshot: Snapshot) -> None:
        self._write(_InstallSnapshot(snapshot))

    def append(self, entries: tuple[Entry, ...]) -> None:
        if entries:
            self._write(_Append(entries))

    def set_hard_state(self, hard_state: HardState) -> None:
        self._write(_SetHardState(hard_state))

    def set_conf(self, conf: ConfState, index: int) -> None:
        self._write(_SetConf(conf, index))

    def compact(self, index: int, data: bytes) -> None:
        """Snapshots the state machine at ``index`` and drops the log up to it; the snapshot
        file is fsynced before the log is cut (else a crash could leave neither), which also
        flushes every earlier write."""
        self._write(_Compact(index, data))
        self.sync()

    def sync(self) -> None:
        self.syncs += 1
        for op in self._unsynced:
            _apply(self.durable, op)
        self._unsynced.clear()

    def crash(self, rng: random.Random, torn: bool) -> CrashLoss:
        """Loses the unsynced writes (or, when ``torn``, all but a random prefix of them) and
        makes ``written`` a copy of what survived, as the restarted process would read it."""
        lost = len(self._unsynced)
        entries_torn = 0
        if torn and self._unsynced:
            keep = rng.randint(0, len(self._unsynced))
            for op in self._unsynced[:keep]:
                _apply(self.durable, op)
            lost -= keep
            if keep < len(self._unsynced):
                op = self._unsynced[keep]
                if isinstance(op, _Append):
                    cut = rng.randint(0, len(op.entries) - 1)
                    _apply(self.durable, _Append(op.entries[:cut]))
                    entries_torn = len(op.entries) - cut
        self._unsynced.clear()
        self.written = copy_storage(self.durable, self._conf)
        return CrashLoss(ops_lost=lost, entries_torn=entries_torn)
