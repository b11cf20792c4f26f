"""Snapshots of the controller's state, so that its log (Raft group 0) is truncated.

Every ``controller_snapshot_entries`` applied entries, each node writes a snapshot of its
``ClusterState`` (``controller/state.py`` ``snapshot()``, canonical checksummed bytes) at its
applied index to ``<data dir>/controller.snapshot`` (write, fsync, rename, fsync the
directory), then deletes the controller log's closed segments below the previous snapshot's
roll point and rolls the active segment, so the log never holds much more than two intervals
of entries. A start restores the latest snapshot and replays only the entries after it.

A follower (a node joining late, or a learner far behind) that needs entries the leader
deleted gets the snapshot as ONE Raft SNAPSHOT message: the file's bytes, bounded by
:data:`CONTROLLER_SNAPSHOT_BYTES_MAX`, far below a Raft message's limit (about 71 MiB,
``node/transport.py``) and far above any plausible metadata (a topic costs about 100 bytes
plus 10 a partition). A state beyond the bound is never snapshotted (the log then keeps
growing and the node logs why) rather than sent and refused. The follower writes the file
before resetting its log, so a crash in between restarts from the snapshot.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import crc32c

from tidelog.errors import StorageError
from tidelog.node.io import REAL_FS, FileSystem

SNAPSHOT_FILE: Final = "controller.snapshot"
#: A controller snapshot travels as one Raft message: at most this many bytes.
CONTROLLER_SNAPSHOT_BYTES_MAX: Final = 32 * 1024 * 1024
#: Default of ``--controller-snapshot-entries``.
CONTROLLER_SNAPSHOT_ENTRIES_DEFAULT: Final = 10_000
_MAGIC: Final = b"TLCS"
_FORMAT: Final = 1
#: magic, format, Raft index, term, the log offset after the index, state length, its CRC.
_HEADER = struct.Struct(">4sBQQQII")


@dataclass(frozen=True, slots=True)
class ControllerSnapshot:
    index: int
    term: int
    #: The controller log's offset after ``index`` (where the log continues).
    end_offset: int
    state: bytes

    def encode(self) -> bytes:
        if len(self.state) > CONTROLLER_SNAPSHOT_BYTES_MAX - _HEADER.size:
            raise StorageError(
                f"controller state of {len(self.state)} bytes exceeds the snapshot bound of "
                f"{CONTROLLER_SNAPSHOT_BYTES_MAX} bytes"
            )
        head = _HEADER.pack(
            _MAGIC, _FORMAT, self.index, self.term, self.end_offset, len(self.state),
            crc32c.crc32c(self.state),
        )  # fmt: skip
        return head + self.state


def decode(data: bytes) -> ControllerSnapshot:
    """StorageError unless ``data`` is a whole, intact controller snapshot."""
    if len(data) < _HEADER.size or len(data) > CONTROLLER_SNAPSHOT_BYTES_MAX:
        raise StorageError(f"controller snapshot of {len(data)} bytes")
    magic, fmt, index, term, end, length, crc = _HEADER.unpack_from(data)
    if magic != _MAGIC or fmt != _FORMAT:
        raise StorageError(f"not a controller snapshot of format {_FORMAT}")
    state = bytes(data[_HEADER.size :])
    if len(state) != length or crc32c.crc32c(state) != crc:
        raise StorageError("controller snapshot fails its length or CRC-32C")
    return ControllerSnapshot(int(index), int(term), int(end), state)


class SnapshotFile:
    """The node's latest controller snapshot on disk (``fs``: the file-system seam,
    ``node/io.py``; the node simulation passes its simulated disk)."""

    def __init__(self, path: Path, fs: FileSystem = REAL_FS) -> None:
        self.path = path
        self._fs = fs

    def load(self) -> ControllerSnapshot | None:
        """The snapshot, or None when there is none; StorageError when it is damaged."""
        data = self.read_bytes()
        return None if data is None else decode(data)

    def read_bytes(self) -> bytes | None:
        try:
            return self._fs.read_bytes(self.path)
        except FileNotFoundError:
            return None

    def write(self, snap: ControllerSnapshot) -> None:
        self.write_bytes(snap.encode())

    def write_bytes(self, data: bytes) -> None:
        fs = self._fs
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = fs.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[fs.write(fd, view) :]
            fs.fsync(fd)
        finally:
            fs.close(fd)
        fs.replace(tmp, self.path)
        fs.fsync_dir(self.path.parent)


__all__ = [
    "CONTROLLER_SNAPSHOT_BYTES_MAX",
    "CONTROLLER_SNAPSHOT_ENTRIES_DEFAULT",
    "SNAPSHOT_FILE",
    "ControllerSnapshot",
    "SnapshotFile",
    "decode",
]
