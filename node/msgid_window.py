"""The message ids a partition stored recently: the state behind ``message.dedup.window.ms``.

A record whose ``msg-id`` header was already stored within the window is stored only once
(what NATS JetStream calls its duplicate window). Like the producer state, every replica
derives the window from the committed log (:meth:`MessageIdWindow.add` for each committed
record carrying the header, in offset order) and the leader adds the ids it proposed and that
are not committed yet, so a retry in flight is recognized too.

Memory is bounded by ``message.dedup.max.ids`` per partition: ids are kept in insertion
(= offset) order and the oldest is forgotten first once the bound is reached, or once its
record's timestamp is older than the window. An id is kept as a 16-byte BLAKE2b digest, so
a long header costs no more than a short one: about 200 bytes per id with the dictionary and
tuple overhead of CPython, 20 MB at the default bound of 100,000 ids.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections import OrderedDict
from dataclasses import dataclass

import crc32c

from tidelog.node.producer_state import CorruptProducerSnapshot

#: The record header whose value identifies a message.
MSG_ID_HEADER = "msg-id"
DIGEST_BYTES = 16

_MAGIC = b"TLMI"
_FORMAT = 1
_HEADER = struct.Struct("<4sHI")


def digest(msg_id: bytes) -> bytes:
    return hashlib.blake2b(msg_id, digest_size=DIGEST_BYTES).digest()


@dataclass(frozen=True, slots=True)
class StoredId:
    offset: int
    timestamp_ms: int


class MessageIdWindow:
    """Digest of a msg-id -> where (and when) it was first stored; oldest first."""

    __slots__ = ("_ids", "max_ids")

    def __init__(self, max_ids: int) -> None:
        self.max_ids = max_ids
        self._ids: OrderedDict[bytes, StoredId] = OrderedDict()

    def __len__(self) -> int:
        return len(self._ids)

    def lookup(self, key: bytes, now_ms: int, window_ms: int) -> StoredId | None:
        """The first storing of ``key`` if it is within the window at ``now_ms``."""
        found = self._ids.get(key)
        if found is None or found.timestamp_ms < now_ms - window_ms:
            return None
        return found

    def add(self, key: bytes, offset: int, timestamp_ms: int) -> None:
        """A stored record; a second storing of the same id keeps the first one's offset."""
        ids = self._ids
        if key in ids:
            return
        ids[key] = StoredId(offset, timestamp_ms)
        while len(ids) > self.max_ids:
            ids.popitem(last=False)

    def prune(self, now_ms: int, window_ms: int) -> int:
        """Forget the ids older than the window from the front; how many."""
        cutoff = now_ms - window_ms
        ids = self._ids
        n = 0
        while ids:
            key = next(iter(ids))
            if ids[key].timestamp_ms >= cutoff:
                break
            del ids[key]
            n += 1
        return n

    def set_max_ids(self, max_ids: int) -> None:
        self.max_ids = max_ids
        while len(self._ids) > max_ids:
            self._ids.popitem(last=False)

    def newest(self, keep: int) -> MessageIdWindow:
        """A copy with only the ``keep`` most recently stored ids (what fits a bounded
        snapshot; the oldest would be forgotten first anyway)."""
        out = MessageIdWindow(self.max_ids)
        items = list(self._ids.items())
        for key, stored in items[max(0, len(items) - max(0, keep)) :]:
            out._ids[key] = stored
        return out

    def clear(self) -> None:
        self._ids.clear()

    def snapshot(self) -> bytes:
        body = [[k.hex(), v.offset, v.timestamp_ms] for k, v in self._ids.items()]
        raw = json.dumps(body, separators=(",", ":")).encode()
        return _HEADER.pack(_MAGIC, _FORMAT, crc32c.crc32c(raw)) + raw

    @classmethod
    def restore(cls, data: bytes, max_ids: int) -> MessageIdWindow:
        if len(data) < _HEADER.size:
            raise CorruptProducerSnapshot("msg-id snapshot is shorter than its header")
        magic, fmt, crc = _HEADER.unpack_from(data)
        raw = data[_HEADER.size :]
        if magic != _MAGIC or fmt != _FORMAT or crc32c.crc32c(raw) != crc:
            raise CorruptProducerSnapshot("msg-id snapshot fails its header or CRC check")
        window = cls(max_ids)
        try:
            for key, offset, ts in json.loads(raw):
                if type(offset) is not int or type(ts) is not int:
                    raise TypeError(f"bad entry {key!r}")
                window.add(bytes.fromhex(key), offset, ts)
        except (ValueError, TypeError) as exc:
            raise CorruptProducerSnapshot(f"msg-id snapshot is inconsistent: {exc}") from None
        return window

    def __eq__(self, other: object) -> bool:
        return isinstance(other, MessageIdWindow) and list(self._ids.items()) == list(
            other._ids.items()
        )
