"""murmur2 and partition choice must match the Java Kafka client bit for bit."""

from __future__ import annotations

import random

import pytest

from tidelog.client.partitioner import (
    StickyPartitioner,
    murmur2,
    partition_for_key,
    partitions_for_keys,
    to_positive,
)

# apache/kafka, clients/src/test/java/org/apache/kafka/common/utils/UtilsTest.java,
# testMurmur2: the expected values are Java's signed 32-bit results.
KAFKA_MURMUR2_VECTORS = [
    (b"21", -973932308),
    (b"foobar", -790332482),
    (b"a-little-bit-long-string", -985981536),
    (b"a-little-bit-longer-string", -1486304829),
    (b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8", -58897971),
    (b"abc", 479470107),
]


@pytest.mark.parametrize(("key", "expected"), KAFKA_MURMUR2_VECTORS)
def test_murmur2_matches_kafka_utils_test(key: bytes, expected: int) -> None:
    assert murmur2(key) == expected


def test_murmur2_is_signed_int32_for_every_tail_length() -> None:
    rng = random.Random(7)
    for length in range(0, 40):
        h = murmur2(rng.randbytes(length))
        assert -(2**31) <= h < 2**31


def test_to_positive_clears_the_sign_bit_like_kafka() -> None:
    # apache/kafka UtilsTest.testAbs / Utils.toPositive: MIN_VALUE maps to 0, not to abs().
    assert to_positive(-(2**31)) == 0
    assert to_positive(-1) == 2**31 - 1
    assert to_positive(10) == 10


@pytest.mark.parametrize(("key", "expected"), KAFKA_MURMUR2_VECTORS)
@pytest.mark.parametrize("partitions", [1, 3, 7, 12, 100])
def test_partition_for_key_is_kafkas_formula(key: bytes, expected: int, partitions: int) -> None:
    # BuiltInPartitioner.partitionForKey: toPositive(murmur2(key)) % numPartitions.
    assert partition_for_key(key, partitions) == (expected & 0x7FFFFFFF) % partitions


def test_partition_for_key_known_values() -> None:
    # Worked from the vectors above: toPositive(-973932308) = 1173551340.
    assert partition_for_key(b"21", 10) == 0
    assert partition_for_key(b"21", 7) == 1173551340 % 7
    assert partition_for_key(b"abc", 4) == 479470107 % 4 == 3


def test_partition_for_key_rejects_no_partitions() -> None:
    with pytest.raises(ValueError, match="at least one partition"):
        partition_for_key(b"k", 0)


def test_sticky_partitioner_rotates_round_robin() -> None:
    sp = StickyPartitioner(random.Random(1))
    first = sp.current("t", 4)
    assert sp.current("t", 4) == first
    seen = [sp.next("t", 4) for _ in range(8)]
    assert seen == [(first + i) % 4 for i in range(1, 9)]
    # A topic's partitions are independent of another's.
    assert 0 <= sp.current("other", 2) < 2


def test_sticky_partitioner_survives_fewer_partitions() -> None:
    sp = StickyPartitioner(random.Random(3))
    for _ in range(20):
        sp.next("t", 50)
    assert 0 <= sp.current("t", 2) < 2


def _murmur2_word_by_word(data: bytes) -> int:
    """The plain transcription of Kafka's Utils.murmur2 (the fast one folds and batches)."""
    m, mask = 0x5BD1E995, 0xFFFFFFFF
    length = len(data)
    h = (0x9747B28C ^ length) & mask
    whole = length - (length & 3)
    for i in range(0, whole, 4):
        k = int.from_bytes(data[i : i + 4], "little")
        k = (k * m) & mask
        k ^= k >> 24
        k = (k * m) & mask
        h = ((h * m) & mask) ^ k
    rest = length & 3
    if rest == 3:
        h ^= data[whole + 2] << 16
    if rest >= 2:
        h ^= data[whole + 1] << 8
    if rest >= 1:
        h ^= data[whole]
        h = (h * m) & mask
    h ^= h >> 13
    h = (h * m) & mask
    h ^= h >> 15
    return h - (1 << 32) if h & 0x80000000 else h


def test_murmur2_equals_the_word_by_word_algorithm_for_any_key() -> None:
    rng = random.Random(7)
    # Every length up to past the 63-word unpacker table, then random long keys.
    keys = [rng.randbytes(n) for n in range(0, 300)] + [
        rng.randbytes(rng.randrange(300, 5000)) for _ in range(50)
    ]
    for key in keys:
        assert murmur2(key) == _murmur2_word_by_word(key), key


def test_partitions_for_keys_is_partition_for_key_per_key() -> None:
    keys = [b"key-%d" % i for i in range(2000)] + [b""]
    for count in (1, 3, 16):
        assert partitions_for_keys(keys, count) == [partition_for_key(k, count) for k in keys]
    with pytest.raises(ValueError):
        partitions_for_keys(keys, 0)
