"""Seams for the node's sources of nondeterminism: the file system under the partition logs.

Production code uses :data:`REAL_FS`, whose methods are the ``os`` functions themselves
(no wrapper frame on the hot path: ``fs.pwrite`` IS ``os.pwrite``). The node simulation
(``tests/sim/node``) passes its own :class:`FileSystem` that keeps files in memory, loses
what was not fsynced on a crash and can fail an fsync. The other seams are constructor
parameters where they are used: ``MultiRaft(executor=..., clock=...)`` for the fsync
thread pool and the monotonic clock, ``PartitionLog(clock_ms=...)`` for the wall clock,
``HardStateStore(store)`` for RocksDB; timers go through the running event loop.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Protocol

StrPath = str | Path


class FileSystem(Protocol):
    """The file operations of ``node/log`` (descriptors as ``os`` has them)."""

    def open(self, path: StrPath, flags: int, mode: int = 0o777) -> int: ...
    def close(self, fd: int) -> None: ...
    def dup(self, fd: int) -> int: ...
    def write(self, fd: int, data: bytes | bytearray | memoryview) -> int: ...
    def pwrite(self, fd: int, data: bytes | bytearray | memoryview, offset: int) -> int: ...
    def pread(self, fd: int, n: int, offset: int) -> bytes: ...
    def ftruncate(self, fd: int, length: int) -> None: ...
    def fsync(self, fd: int) -> None: ...
    def fdatasync(self, fd: int) -> None: ...
    def file_size(self, fd: int) -> int: ...
    def mtime_ns(self, fd: int) -> int: ...
    def replace(self, src: StrPath, dst: StrPath) -> None: ...
    def unlink(self, path: StrPath) -> None:
        """Remove a file; no error if it does not exist."""

    def read_bytes(self, path: StrPath) -> bytes: ...
    def listdir(self, path: StrPath) -> list[str]: ...
    def makedirs(self, path: StrPath) -> None:
        """Create the directory and its parents; no error if it exists."""

    def rmtree(self, path: StrPath) -> None: ...
    def fsync_dir(self, path: StrPath) -> None: ...


def _file_size(fd: int) -> int:
    return os.fstat(fd).st_size


def _mtime_ns(fd: int) -> int:
    return os.fstat(fd).st_mtime_ns


def _unlink(path: StrPath) -> None:
    Path(path).unlink(missing_ok=True)


def _read_bytes(path: StrPath) -> bytes:
    return Path(path).read_bytes()


def _makedirs(path: StrPath) -> None:
    os.makedirs(path, exist_ok=True)


def _fsync_dir(path: StrPath) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class OsFileSystem:
    """The real file system: each method is the ``os`` function (or a one-line helper)."""

    open = staticmethod(os.open)
    close = staticmethod(os.close)
    dup = staticmethod(os.dup)
    write = staticmethod(os.write)
    pwrite = staticmethod(os.pwrite)
    pread = staticmethod(os.pread)
    ftruncate = staticmethod(os.ftruncate)
    fsync = staticmethod(os.fsync)
    fdatasync = staticmethod(os.fdatasync)
    file_size = staticmethod(_file_size)
    mtime_ns = staticmethod(_mtime_ns)
    replace = staticmethod(os.replace)
    unlink = staticmethod(_unlink)
    read_bytes = staticmethod(_read_bytes)
    listdir = staticmethod(os.listdir)
    makedirs = staticmethod(_makedirs)
    rmtree = staticmethod(shutil.rmtree)
    fsync_dir = staticmethod(_fsync_dir)


REAL_FS: FileSystem = OsFileSystem()

__all__ = ["REAL_FS", "FileSystem", "OsFileSystem", "StrPath"]
