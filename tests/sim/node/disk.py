"""The simulated disk of one node: a ``node.io.FileSystem`` in memory, plus its RocksDB.

Every file is an inode with two images: ``data`` (what reads see: the page cache) and
``synced`` (what an fsync made durable). Directory entries are durable only once the
directory is fsynced (``fsync_dir``), as POSIX promises and no more: a created or renamed
file whose directory was not synced may vanish in a machine crash.

* ``crash(power=False)``: the process dies, the page cache survives (everything written
  stays).
* ``crash(power=True)``: the machine dies: each directory goes back to its durable
  entries, each file to its synced image plus, when the page cache only appended to it, a
  random prefix of the unsynced tail (the last write torn anywhere). A file truncated since
  its last fsync comes back either as synced, or cut where the truncation cut it plus a
  random prefix of what was written after (the truncation reached the disk, the rewrite
  only in part).
* ``wipe()``: the whole data directory is lost (a replaced disk).
* ``fail_next_fsyncs``: the next fsyncs raise EIO (the data stays unsynced).

:class:`SimMetaStore` stands in for ``node.metastore.MetaStore`` (the hard states): a synced
write batch makes itself and every earlier write durable (RocksDB's WAL); unsynced batches
survive a power loss only as a prefix.
"""

from __future__ import annotations

import errno
import os
import random
from collections.abc import Iterator
from pathlib import Path

from tidelog.node.io import StrPath


class _Inode:
    __slots__ = ("data", "number", "synced", "trunc_low")

    def __init__(self, number: int) -> None:
        self.number = number
        self.data = bytearray()
        self.synced = b""
        #: The shortest length a truncation cut the file to since its last fsync.
        self.trunc_low: int | None = None

    def cut(self, length: int) -> None:
        if length < len(self.data):
            del self.data[length:]
        self.trunc_low = length if self.trunc_low is None else min(self.trunc_low, length)


def _split(path: StrPath) -> tuple[str, str]:
    p = str(path)
    d, _, name = p.rpartition("/")
    return d, name


class SimDisk:
    """``node.io.FileSystem`` over memory; see the module docstring."""

    def __init__(self, rng: random.Random, name: str) -> None:
        self.rng = rng
        self.name = name
        # directory -> name -> inode (what lookups see) and the durable entries.
        self._dirs: dict[str, dict[str, _Inode]] = {}
        self._durable_dirs: dict[str, dict[str, _Inode]] = {}
        self._fds: dict[int, _Inode] = {}
        self._next_fd = 3
        self._next_inode = 1
        self.fail_next_fsyncs = 0
        self.fsyncs = 0
        self.fsync_failures = 0

    # ---- crashes ---------------------------------------------------------------------------

    def crash(self, *, power: bool) -> str:
        """Close every descriptor; on a power loss, forget what was not synced. Returns a
        line for the trace."""
        self._fds.clear()
        self.fail_next_fsyncs = 0
        if not power:
            return "process crash (page cache kept)"
        lost_files = 0
        torn = 0
        new_dirs: dict[str, dict[str, _Inode]] = {}
        for d, entries in self._durable_dirs.items():
            new_dirs[d] = dict(entries)
        for d in self._dirs:
            lost_files += len(set(self._dirs[d]) - set(new_dirs.get(d, {})))
        seen: set[int] = set()
        for entries in new_dirs.values():
            for ino in entries.values():
                if ino.number in seen:
                    continue
                seen.add(ino.number)
                data, synced = bytes(ino.data), ino.synced
                if data == synced:
                    continue
                if len(data) > len(synced) and data.startswith(synced):
                    keep = self.rng.randint(0, len(data) - len(synced))
                    if keep < len(data) - len(synced):
                        torn += 1
                    ino.data = bytearray(data[: len(synced) + keep])
                elif ino.trunc_low is not None and self.rng.random() < 0.5:
                    # The truncation reached the disk, the writes after it only in part.
                    low = ino.trunc_low
                    torn += 1
                    ino.data = bytearray(data[: low + self.rng.randint(0, len(data) - low)])
                else:  # the unsynced truncation (and the writes after it) never reached it
                    torn += 1
                    ino.data = bytearray(synced)
                ino.synced = bytes(ino.data)
                ino.trunc_low = None
        self._dirs = new_dirs
        self._durable_dirs = {d: dict(e) for d, e in new_dirs.items()}
        return f"power loss: {lost_files} unsynced files lost, {torn} files cut back"

    def wipe(self) -> None:
        self._dirs.clear()
        self._durable_dirs.clear()
        self._fds.clear()

    # ---- helpers ---------------------------------------------------------------------------

    def _lookup(self, path: StrPath) -> _Inode | None:
        d, name = _split(path)
        return self._dirs.get(d, {}).get(name)

    def _fd(self, fd: int) -> _Inode:
        ino = self._fds.get(fd)
        if ino is None:
            raise OSError(errno.EBADF, "bad file descriptor")
        return ino

    def _new_fd(self, ino: _Inode) -> int:
        fd = self._next_fd
        self._next_fd += 1
        self._fds[fd] = ino
        return fd

    def _fsync_point(self) -> None:
        self.fsyncs += 1
        if self.fail_next_fsyncs > 0:
            self.fail_next_fsyncs -= 1
            self.fsync_failures += 1
            raise OSError(errno.EIO, f"simulated fsync failure on {self.name}")

    def files(self) -> Iterator[tuple[str, int]]:
        for d, entries in sorted(self._dirs.items()):
            for name, ino in sorted(entries.items()):
                yield f"{d}/{name}", len(ino.data)

    # ---- FileSystem ------------------------------------------------------------------------

    def open(self, path: StrPath, flags: int, mode: int = 0o777) -> int:
        d, name = _split(path)
        if flags & getattr(os, "O_DIRECTORY", 0):
            if d not in self._dirs and str(path) not in self._dirs:
                raise FileNotFoundError(errno.ENOENT, "no such directory", str(path))
        entries = self._dirs.get(d)
        if entries is None:
            raise FileNotFoundError(errno.ENOENT, "no such directory", str(path))
        ino = entries.get(name)
        if ino is None:
            if not flags & os.O_CREAT:
                raise FileNotFoundError(errno.ENOENT, "no such file", str(path))
            ino = _Inode(self._next_inode)
            self._next_inode += 1
            entries[name] = ino
        elif flags & os.O_TRUNC:
            ino.cut(0)
        return self._new_fd(ino)

    def close(self, fd: int) -> None:
        self._fd(fd)
        del self._fds[fd]

    def dup(self, fd: int) -> int:
        return self._new_fd(self._fd(fd))

    def write(self, fd: int, data: bytes | bytearray | memoryview) -> int:
        ino = self._fd(fd)
        ino.data += bytes(data)
        return len(data)

    def pwrite(self, fd: int, data: bytes | bytearray | memoryview, offset: int) -> int:
        ino = self._fd(fd)
        raw = bytes(data)
        if offset > len(ino.data):
            ino.data += bytes(offset - len(ino.data))
        ino.data[offset : offset + len(raw)] = raw
        return len(raw)

    def pread(self, fd: int, n: int, offset: int) -> bytes:
        return bytes(self._fd(fd).data[offset : offset + n])

    def ftruncate(self, fd: int, length: int) -> None:
        ino = self._fd(fd)
        if length < len(ino.data):
            ino.cut(length)
        else:
            ino.data += bytes(length - len(ino.data))

    def fsync(self, fd: int) -> None:
        ino = self._fd(fd)
        self._fsync_point()
        ino.synced = bytes(ino.data)
        ino.trunc_low = None

    fdatasync = fsync

    def file_size(self, fd: int) -> int:
        return len(self._fd(fd).data)

    def mtime_ns(self, fd: int) -> int:
        self._fd(fd)
        return 0

    def replace(self, src: StrPath, dst: StrPath) -> None:
        sd, sn = _split(src)
        dd, dn = _split(dst)
        ino = self._dirs.get(sd, {}).pop(sn, None)
        if ino is None:
            raise FileNotFoundError(errno.ENOENT, "no such file", str(src))
        self._dirs.setdefault(dd, {})[dn] = ino

    def unlink(self, path: StrPath) -> None:
        d, name = _split(path)
        self._dirs.get(d, {}).pop(name, None)

    def read_bytes(self, path: StrPath) -> bytes:
        ino = self._lookup(path)
        if ino is None:
            raise FileNotFoundError(errno.ENOENT, "no such file", str(path))
        return bytes(ino.data)

    def listdir(self, path: StrPath) -> list[str]:
        entries = self._dirs.get(str(path))
        if entries is None:
            raise FileNotFoundError(errno.ENOENT, "no such directory", str(path))
        return sorted(entries)

    def makedirs(self, path: StrPath) -> None:
        # Directories themselves are durable at once (their parents are fsynced by mkdir -p
        # in practice); only their entries need fsync_dir.
        p = str(Path(path))
        self._dirs.setdefault(p, {})
        self._durable_dirs.setdefault(p, {})

    def rmtree(self, path: StrPath) -> None:
        p = str(Path(path))
        for d in [d for d in self._dirs if d == p or d.startswith(p + "/")]:
            del self._dirs[d]
            self._durable_dirs.pop(d, None)

    def fsync_dir(self, path: StrPath) -> None:
        p = str(Path(path))
        if p not in self._dirs:
            raise FileNotFoundError(errno.ENOENT, "no such directory", p)
        self._fsync_point()
        self._durable_dirs[p] = dict(self._dirs[p])


class SimMetaStore:
    """The part of ``node.metastore.MetaStore`` that ``HardStateStore`` uses, in memory."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self._data: dict[tuple[str, bytes], bytes | None] = {}
        self._durable: dict[tuple[str, bytes], bytes | None] = {}
        self._unsynced: list[list[tuple[tuple[str, bytes], bytes | None]]] = []
        self.fail_next_writes = 0

    def _apply(self, ops: list[tuple[tuple[str, bytes], bytes | None]], sync: bool) -> None:
        if self.fail_next_writes > 0:
            self.fail_next_writes -= 1
            raise OSError(errno.EIO, "simulated RocksDB write failure")
        for k, v in ops:
            self._data[k] = v
        self._unsynced.append(ops)
        if sync:
            for batch in self._unsynced:
                for k, v in batch:
                    self._durable[k] = v
            self._unsynced.clear()

    def get(self, column: str, key: bytes) -> bytes | None:
        return self._data.get((column, key))

    def put(self, column: str, key: bytes, value: bytes, *, sync: bool = True) -> None:
        self._apply([((column, key), value)], sync)

    def delete(self, column: str, key: bytes, *, sync: bool = True) -> None:
        self._apply([((column, key), None)], sync)

    def write_batch(
        self,
        column: str,
        puts: list[tuple[bytes, bytes]],
        deletes: list[bytes] | None = None,
        *,
        sync: bool = True,
    ) -> None:
        ops: list[tuple[tuple[str, bytes], bytes | None]] = [((column, k), v) for k, v in puts]
        ops += [((column, k), None) for k in deletes or ()]
        self._apply(ops, sync)

    def crash(self, *, power: bool) -> None:
        self.fail_next_writes = 0
        if not power:
            return
        keep = self.rng.randint(0, len(self._unsynced))
        for batch in self._unsynced[:keep]:
            for k, v in batch:
                self._durable[k] = v
        self._unsynced.clear()
        self._data = dict(self._durable)

    def wipe(self) -> None:
        self._data.clear()
        self._durable.clear()
        self._unsynced.clear()


__all__ = ["SimDisk", "SimMetaStore"]
