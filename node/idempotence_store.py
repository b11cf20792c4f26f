"""Snapshots of the partitions' idempotence state in the node's RocksDB.

The producer state and msg-id window of every local replica (node/idempotence.py) are saved
with their applied offset every :data:`SNAPSHOT_INTERVAL_S` seconds (when they changed) and at
shutdown, in the ``idempotence`` column keyed by Raft group id. At start a replica restores
its snapshot and replays only the committed log after the applied offset, instead of the
whole log. A snapshot is an optimization: losing the latest one (it is written without
fsync) only lengthens the replay; one that is corrupt, or ahead of the local log under
flush=os (data lost), is dropped and the whole log is replayed. Under flush=durable a snapshot
ahead of the log is kept: it covers committed entries only (a follower that installed a
leader's Raft snapshot, which carries the leader's state, and restarted before catching up).

The same pass expires producers idle for ``producer.id.expiration.ms`` and msg-ids older
than ``message.dedup.window.ms``.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from tidelog.node.metastore import MetaStore
from tidelog.node.producer_state import CorruptProducerSnapshot

if TYPE_CHECKING:
    from tidelog.node.partition import Partition

log = logging.getLogger(__name__)

COLUMN = "idempotence"
SNAPSHOT_INTERVAL_S = 30.0
_KEY = struct.Struct(">Q")


class IdempotenceSnapshots:
    def __init__(self, store: MetaStore) -> None:
        self._store = store
        # group id -> applied offset of the last snapshot written.
        self._saved: dict[int, int] = {}

    def load_into(self, part: Partition) -> bool:
        """Restore ``part``'s idempotence state from its snapshot (before ``attach``)."""
        data = self._store.get(COLUMN, _KEY.pack(part.group_id))
        if data is None:
            return False
        try:
            part.idempotence.restore(data)
        except CorruptProducerSnapshot as exc:
            log.warning("%s/%d: idempotence snapshot dropped: %s", part.topic, part.index, exc)
            return False
        self._saved[part.group_id] = part.idempotence.state.applied_offset
        return True

    def forget(self, group_id: int) -> None:
        self._saved.pop(group_id, None)
        self._store.delete(COLUMN, _KEY.pack(group_id), sync=False)

    def collect(
        self, parts: Iterable[Partition], *, force: bool = False
    ) -> list[tuple[bytes, bytes]]:
        """The snapshots that changed since last written (on the loop: consistent)."""
        out = []
        for p in parts:
            if p.closed and not force:
                continue
            applied = p.idempotence.state.applied_offset
            if not force and self._saved.get(p.group_id) == applied:
                continue
            out.append((_KEY.pack(p.group_id), p.idempotence.snapshot()))
            self._saved[p.group_id] = applied
        return out

    def write(self, puts: list[tuple[bytes, bytes]]) -> None:
        if puts:
            self._store.write_batch(COLUMN, puts, sync=False)

    async def run(
        self, partitions: Callable[[], Iterable[Partition]], interval_s: float = SNAPSHOT_INTERVAL_S
    ) -> None:
        """Expire and snapshot every ``interval_s`` until cancelled."""
        while True:
            await asyncio.sleep(interval_s)
            now_ms = time.time_ns() // 1_000_000
            parts = [p for p in partitions() if not p.closed]
            for p in parts:
                p.idempotence.maintain(now_ms)
            puts = self.collect(parts)
            try:
                await asyncio.to_thread(self.write, puts)
            except Exception as exc:  # a snapshot is an optimization: log and go on
                log.warning("cannot write idempotence snapshots: %s", exc)
