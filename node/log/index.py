"""The two sparse indexes of a segment: relative offset -> file position, and max timestamp
so far -> relative offset.

Both are caches of what the segment's batch headers already say, so they live in memory as
``array`` columns, are written to disk whole when a segment is sealed (or the log closed), and
are rebuilt from a header scan whenever the file on disk is missing or does not agree with the
segment. Entries are fixed-size little-endian records so a file is checked by its length
alone before its contents are trusted:

- ``.index``: ``u32 relative_offset, u32 position`` (8 bytes). Relative offsets and positions
  both fit in 32 bits because the log rolls before either would overflow.
- ``.timeindex``: ``i64 max_timestamp_ms, i64 relative_offset`` (16 bytes). An entry says
  "every batch up to and including the one at this offset has a timestamp <= this".

An entry is taken at most once per ``index.interval.bytes`` of batches, which bounds memory
(8 bytes per 4 KiB by default) and the bytes a lookup has to scan past.
"""

from __future__ import annotations

import sys
from array import array
from bisect import bisect_left, bisect_right
from itertools import pairwise

#: The largest value a u32 index field holds; the log rolls before a segment reaches it.
U32_MAX = 2**32 - 1
OFFSET_ENTRY_BYTES = 8
TIME_ENTRY_BYTES = 16

assert array("I").itemsize == 4 and array("q").itemsize == 8

_SWAP = sys.byteorder != "little"


def _to_le(col: array[int]) -> bytes:
    if _SWAP:
        col = array(col.typecode, col)
        col.byteswap()
    return col.tobytes()


def _from_le(typecode: str, raw: bytes) -> array[int]:
    col = array(typecode)
    col.frombytes(raw)
    if _SWAP:
        col.byteswap()
    return col


def _interleave(typecode: str, a: array[int], b: array[int]) -> array[int]:
    out = array(typecode, bytes(2 * a.itemsize * len(a)))
    out[0::2] = a
    out[1::2] = b
    return out


class OffsetIndex:
    """Sparse ``relative offset -> position`` of batch starts, both strictly increasing.

    No entry is needed for the first batch: a lookup that finds no entry starts at (0, 0).
    """

    __slots__ = ("positions", "rel_offsets")

    def __init__(self) -> None:
        self.rel_offsets: array[int] = array("I")
        self.positions: array[int] = array("I")

    def __len__(self) -> int:
        return len(self.rel_offsets)

    def append(self, rel_offset: int, position: int) -> None:
        self.rel_offsets.append(rel_offset)
        self.positions.append(position)

    def floor(self, rel_offset: int) -> tuple[int, int]:
        """The entry with the largest relative offset <= ``rel_offset``, or (0, 0)."""
        i = bisect_right(self.rel_offsets, rel_offset) - 1
        if i < 0:
            return 0, 0
        return self.rel_offsets[i], self.positions[i]

    def last(self) -> tuple[int, int]:
        if not self.rel_offsets:
            return 0, 0
        return self.rel_offsets[-1], self.positions[-1]

    def truncate_from(self, rel_offset: int) -> None:
        """Drop the entries at or after ``rel_offset`` (a suffix truncation of the segment)."""
        keep = bisect_left(self.rel_offsets, rel_offset)
        del self.rel_offsets[keep:]
        del self.positions[keep:]

    def to_bytes(self) -> bytes:
        return _to_le(_interleave("I", self.rel_offsets, self.positions))

    @classmethod
    def from_bytes(cls, raw: bytes, segment_bytes: int) -> OffsetIndex | None:
        """The index a file holds, or None when it cannot be right for a segment of
        ``segment_bytes`` (torn length, entries out of order or past the end)."""
        if len(raw) % OFFSET_ENTRY_BYTES:
            return None
        flat = _from_le("I", raw)
        index = cls()
        index.rel_offsets = flat[0::2]
        index.positions = flat[1::2]
        if not _strictly_increasing(index.rel_offsets) or not _strictly_increasing(index.positions):
            return None
        if index.positions and index.positions[-1] >= segment_bytes:
            return None
        return index


class TimeIndex:
    """Sparse ``max timestamp so far -> relative offset``, timestamps strictly increasing."""

    __slots__ = ("rel_offsets", "timestamps")

    def __init__(self) -> None:
        self.timestamps: array[int] = array("q")
        self.rel_offsets: array[int] = array("q")

    def __len__(self) -> int:
        return len(self.timestamps)

    def append(self, timestamp_ms: int, rel_offset: int) -> None:
        self.timestamps.append(timestamp_ms)
        self.rel_offsets.append(rel_offset)

    def last_timestamp(self, default: int) -> int:
        return self.timestamps[-1] if self.timestamps else default

    def start_for(self, timestamp_ms: int) -> int:
        """A relative offset from which a forward scan finds the first batch whose max
        timestamp is >= ``timestamp_ms``: every batch up to the last entry below the target
        is older than the target, so the scan may start there."""
        i = bisect_left(self.timestamps, timestamp_ms) - 1
        return self.rel_offsets[i] if i >= 0 else 0

    def truncate_from(self, rel_offset: int) -> None:
        keep = bisect_left(self.rel_offsets, rel_offset)
        del self.timestamps[keep:]
        del self.rel_offsets[keep:]

    def to_bytes(self) -> bytes:
        return _to_le(_interleave("q", self.timestamps, self.rel_offsets))

    @classmethod
    def from_bytes(cls, raw: bytes) -> TimeIndex | None:
        if len(raw) % TIME_ENTRY_BYTES:
            return None
        flat = _from_le("q", raw)
        index = cls()
        index.timestamps = flat[0::2]
        index.rel_offsets = flat[1::2]
        if not _strictly_increasing(index.timestamps):
            return None
        rels = index.rel_offsets
        if any(b < a for a, b in pairwise(rels)) or (rels and rels[0] < 0):
            return None
        return index


def _strictly_increasing(col: array[int]) -> bool:
    return all(a < b for a, b in pairwise(col))
