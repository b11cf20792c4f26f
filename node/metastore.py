"""The node's one RocksDB instance (rocksdict), shared by everything that keeps metadata.

RocksDB allows a single read-write opener per database, so the node opens it once here and
hands out column families: ``raft`` (every group's hard state, node/replica_storage.py),
``node`` (the node's identity, cluster id, directory id and controller voters, node/server.py),
``idempotence`` (the partitions' producer-state snapshots, node/idempotence_store.py) and
``tables`` (the compacted partitions' tables, node/table.py). Writes that the node's
correctness depends on are synced (``sync`` defaults to True): a vote or term a node gave must
survive a power cut.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

from rocksdict import Options, Rdict, WriteBatch, WriteOptions


class MetaStore:
    def __init__(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        self._options = Options(raw_mode=True)
        self._options.create_if_missing(True)
        self.path = path
        self._db: Rdict | None = Rdict(str(path), self._options)
        self._columns: dict[str, Rdict] = {}
        self._handles: dict[str, Any] = {}
        self._sync = WriteOptions()
        self._sync.sync = True
        self._nosync = WriteOptions()

    def _column(self, name: str) -> Rdict:
        column = self._columns.get(name)
        if column is not None:
            return column
        if self._db is None:
            raise RuntimeError("the metadata store is closed")
        if name in Rdict.list_cf(str(self.path), self._options):
            column = self._db.get_column_family(name)
        else:
            column = self._db.create_column_family(name, Options(raw_mode=True))
        self._columns[name] = column
        return column

    def get(self, column: str, key: bytes) -> bytes | None:
        value = self._column(column).get(key)
        assert value is None or isinstance(value, bytes)
        return value

    def put(self, column: str, key: bytes, value: bytes, *, sync: bool = True) -> None:
        self._column(column).put(key, value, self._sync if sync else self._nosync)

    def delete(self, column: str, key: bytes, *, sync: bool = True) -> None:
        self._column(column).delete(key, self._sync if sync else self._nosync)

    def write_batch(
        self,
        column: str,
        puts: list[tuple[bytes, bytes]],
        deletes: list[bytes] | None = None,
        *,
        sync: bool = True,
        delete_ranges: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        """Several puts and deletes in one column, atomically, with (at most) one WAL sync:
        first ``delete_ranges`` (``[begin, end)`` each), then ``puts``, then ``deletes``.
        Safe to call from a worker thread while the event loop reads."""
        handle = self._handle(column)
        batch = WriteBatch(raw_mode=True)
        for begin, end in delete_ranges or ():
            batch.delete_range(begin, end, handle)
        for key, value in puts:
            batch.put(key, value, handle)
        for key in deletes or ():
            batch.delete(key, handle)
        assert self._db is not None
        self._db.write(batch, self._sync if sync else self._nosync)

    def _handle(self, column: str) -> Any:
        handle = self._handles.get(column)
        if handle is None:
            self._column(column)
            assert self._db is not None
            handle = self._handles[column] = self._db.get_column_family_handle(column)
        return handle

    def get_many(self, column: str, keys: list[bytes]) -> list[bytes | None]:
        """One RocksDB multi-get: the value of each key (None when absent), in order."""
        if not keys:
            return []
        values = self._column(column).get(cast("list[str | int | float | bytes | bool]", keys))
        assert isinstance(values, list)
        return values

    def iterator(self, column: str) -> Any:
        """A rocksdict iterator over ``column`` (``seek``, ``valid``, ``key``, ``value``,
        ``next``). It reads one consistent view: the database as of its creation, whatever
        is written later (rocksdict's ``Snapshot`` iterators do not honour the snapshot in
        the version we use, a plain iterator pins its own). Drop it to release that view."""
        return self._column(column).iter()

    def items(self, column: str, prefix: bytes = b"") -> Iterator[tuple[bytes, bytes]]:
        """Key order; only the keys that start with ``prefix``."""
        for key, value in self._column(column).items(from_key=prefix):
            assert isinstance(key, bytes) and isinstance(value, bytes)  # raw mode
            if not key.startswith(prefix):
                return
            yield key, value

    def close(self) -> None:
        # Column family handles keep the database (and its LOCK file) alive: drop them first.
        self._columns.clear()
        self._handles.clear()
        if self._db is not None:
            self._db.close()
            self._db = None
