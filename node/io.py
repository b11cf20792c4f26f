"""Seams for the node's sources of nondeterminism: the file system under the partition logs.

Production code uses :data:`REAL_FS`, whose methods call the ``os`` functions (one call
per file operation, none per record). The node simulation
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


class OsFileSystem:
    """The real file system. Each method calls the ``os`` function of the same name, looked
    up at call time (one Python call per operation: nothing per record), so a test that
    patches ``os.fdatasync`` still sees every sync."""

    @staticmethod
    def open(path: StrPath, flags: int, mode: int = 0o777) -> int:
        return os.open(path, flags, mode)

    @staticmethod
    def close(fd: int) -> None:
        os.close(fd)

    @staticmethod
    def dup(fd: int) -> int:
        return os.dup(fd)

    @staticmethod
    def write(fd: int, data: bytes | bytearray | memoryview) -> int:
        return os.write(fd, data)

    @staticmethod
    def pwrite(fd: int, data: bytes | bytearray | memoryview, offset: int) -> int:
        return os.pwrite(fd, data, offset)

    @staticmethod
    def pread(fd: int, n: int, offset: int) -> bytes:
        return os.pread(fd, n, offset)

    @staticmethod
    def ftruncate(fd: int, length: int) -> None:
        os.ftruncate(fd, length)

    @staticmethod
    def fsync(fd: int) -> None:
        os.fsync(fd)

    @staticmethod
    def fdatasync(fd: int) -> None:
        os.fdatasync(fd)

    @staticmethod
    def file_size(fd: int) -> int:
        return os.fstat(fd).st_size

    @staticmethod
    def mtime_ns(fd: int) -> int:
        return os.fstat(fd).st_mtime_ns

    @staticmethod
    def replace(src: StrPath, dst: StrPath) -> None:
        os.replace(src, dst)

    @staticmethod
    def unlink(path: StrPath) -> None:
        Path(path).unlink(missing_ok=True)

    @staticmethod
    def read_bytes(path: StrPath) -> bytes:
        return Path(path).read_bytes()

    @staticmethod
    def listdir(path: StrPath) -> list[str]:
        return os.listdir(path)

    @staticmethod
    def makedirs(path: StrPath) -> None:
        os.makedirs(path, exist_ok=True)

    @staticmethod
    def rmtree(path: StrPath) -> None:
        shutil.rmtree(path)

    @staticmethod
    def fsync_dir(path: StrPath) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


REAL_FS: FileSystem = OsFileSystem()

__all__ = ["REAL_FS", "FileSystem", "OsFileSystem", "StrPath"]
