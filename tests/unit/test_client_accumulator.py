"""The producer's accumulator without a broker: batch splitting, the byte bound, ordering."""

from __future__ import annotations

import itertools

import pytest

from tidelog.client.accumulator import (
    RECORD_OVERHEAD_BYTES,
    Accumulator,
    PendingBatch,
    cumulative_sizes,
    record_size,
)
from tidelog.client.structs import TopicPartition
from tidelog.errors import NotLeader
from tidelog.records import BATCH_OVERHEAD_BYTES, Codec, decode_records, encode_batch

TP = TopicPartition("t", 0)
NOW_S = 100.0
NOW_MS = 1_700_000_000_000


def make(batch_bytes_max: int = 1000, buffer_bytes_max: int = 10_000) -> Accumulator:
    return Accumulator(batch_bytes_max=batch_bytes_max, buffer_bytes_max=buffer_bytes_max)


def append(
    acc: Accumulator, value: bytes, key: bytes | None = None, tp: TopicPartition = TP
) -> tuple[PendingBatch, int, bool]:
    return acc.append(tp, value, key, None, None, record_size(value, key, None), NOW_S, NOW_MS)


def test_record_size_is_the_exact_encoded_size() -> None:
    values = [b"x" * 10, b"", b"y" * 77]
    keys = [b"k1", None, b"key-3"]
    encoded = len(encode_batch(values, keys, 5))
    total = BATCH_OVERHEAD_BYTES + sum(
        record_size(v, k, None) for v, k in zip(values, keys, strict=True)
    )
    assert encoded == total


def test_records_fill_a_batch_then_start_the_next() -> None:
    acc = make(batch_bytes_max=BATCH_OVERHEAD_BYTES + 3 * (RECORD_OVERHEAD_BYTES + 10))
    batches = []
    for i in range(7):
        batch, index, created = append(acc, b"%010d" % i)
        batches.append((batch, index, created))
    first, second, third = (batches[0][0], batches[3][0], batches[6][0])
    assert [b for b, _, _ in batches] == [first] * 3 + [second] * 3 + [third]
    assert [i for _, i, _ in batches] == [0, 1, 2, 0, 1, 2, 0]
    assert [c for _, _, c in batches] == [True, False, False, True, False, False, True]
    assert first.closed and second.closed and not third.closed
    assert first.size_bytes == acc.batch_bytes_max
    assert acc.buffered_bytes == sum(b.size_bytes for b in (first, second, third))


def test_a_record_larger_than_a_batch_travels_alone() -> None:
    acc = make(batch_bytes_max=200)
    append(acc, b"a")
    big, index, created = append(acc, b"b" * 500)
    assert created and index == 0 and big.record_count == 1 and big.closed
    after, _, created = append(acc, b"c")
    assert created and after is not big


def test_fill_cuts_send_many_into_batches_of_at_most_batch_bytes_max() -> None:
    acc = make(batch_bytes_max=1000, buffer_bytes_max=1_000_000)
    values = [bytes([65 + i % 26]) * (i % 50) for i in range(1000)]
    cum = cumulative_sizes(values, None)
    pos, segments = 0, []
    while pos < len(values):
        batch, index, taken, _ = acc.fill(TP, values, None, pos, NOW_S, NOW_MS, cum)
        segments.append((batch, index, taken))
        pos += taken
    assert sum(t for _, _, t in segments) == len(values)
    flat = [v for b, _, _ in segments for v in b.values]
    assert flat == values  # order kept, nothing lost or repeated
    for batch, _, _ in segments:
        assert batch.size_bytes <= 1000
        encoded = batch.encode(Codec.NONE)
        assert len(encoded) == batch.size_bytes
    # Every batch but the last is full: adding its successor's first record would overflow.
    for (b1, _, _), (b2, _, _) in itertools.pairwise(segments):
        assert b1.size_bytes + record_size(b2.values[0], None, None) > 1000


def test_fill_tops_up_the_open_batch_first() -> None:
    acc = make(batch_bytes_max=BATCH_OVERHEAD_BYTES + 10 * RECORD_OVERHEAD_BYTES)
    open_batch, _, _ = append(acc, b"")
    values = [b""] * 15
    batch, index, taken, created = acc.fill(TP, values, None, 0, NOW_S, NOW_MS)
    assert batch is open_batch and index == 1 and taken == 9 and not created and batch.closed
    batch2, index2, taken2, created2 = acc.fill(TP, values, None, 9, NOW_S, NOW_MS)
    assert created2 and index2 == 0 and taken2 == 6 and not batch2.closed


def test_keys_and_timestamps_are_backfilled_when_they_first_appear() -> None:
    acc = make()
    size = record_size(b"v", None, None)
    b, _, _ = acc.append(TP, b"v0", None, None, None, size, NOW_S, NOW_MS)
    acc.append(TP, b"v1", b"k1", None, NOW_MS + 42, size, NOW_S, NOW_MS)
    acc.append(TP, b"v2", None, [("h", b"x")], None, size, NOW_S, NOW_MS)
    assert b.keys == [None, b"k1", None]
    assert b.timestamps == [NOW_MS, NOW_MS + 42, NOW_MS]
    assert b.headers == [(), (), [("h", b"x")]]
    records = decode_records(b.encode(Codec.NONE))
    assert [(r.key, r.value, r.timestamp_ms) for r in records] == [
        (None, b"v0", NOW_MS),
        (b"k1", b"v1", NOW_MS + 42),
        (None, b"v2", NOW_MS),
    ]
    assert records[2].headers == [("h", b"x")]


def test_byte_budget_admits_until_full_and_always_admits_into_an_empty_buffer() -> None:
    acc = make(batch_bytes_max=1000, buffer_bytes_max=2000)
    assert acc.has_room(10**9)  # empty: anything goes (alone)
    while acc.has_room(RECORD_OVERHEAD_BYTES + 100):
        append(acc, b"x" * 100)
    assert acc.buffered_bytes <= 2000
    assert acc.buffered_bytes + RECORD_OVERHEAD_BYTES + 100 > 2000
    # Completing the head batch gives its bytes back.
    head = acc.pop_ready(TP, NOW_S, 0.005, force=True)
    assert head is not None
    head.complete(0, NOW_S)
    acc.release(head)
    assert acc.has_room(RECORD_OVERHEAD_BYTES + 100)


def test_pop_ready_respects_linger_unless_full_or_forced() -> None:
    acc = make()
    append(acc, b"x")
    assert acc.pop_ready(TP, NOW_S + 0.001, 0.005, force=False) is None
    assert acc.pop_ready(TP, NOW_S + 0.005, 0.005, force=False) is not None
    append(acc, b"y")
    assert acc.pop_ready(TP, NOW_S, 0.005, force=True) is not None
    assert acc.pop_ready(TP, NOW_S, 0.005, force=True) is None


def test_a_batch_behind_another_is_ready_at_once() -> None:
    acc = make(batch_bytes_max=BATCH_OVERHEAD_BYTES + RECORD_OVERHEAD_BYTES + 1)
    append(acc, b"a")
    append(acc, b"b")
    first = acc.pop_ready(TP, NOW_S, 10.0, force=False)
    assert first is not None and first.values == [b"a"]


def test_retries_go_back_in_front_in_their_original_order() -> None:
    acc = make(batch_bytes_max=BATCH_OVERHEAD_BYTES + RECORD_OVERHEAD_BYTES + 1)
    for c in b"abcdef":
        append(acc, bytes([c]))
    sent = [acc.pop_ready(TP, NOW_S, 0, force=True) for _ in range(4)]
    assert [b.values[0] for b in sent if b] == [b"a", b"b", b"c", b"d"]
    # b and c failed (in either order of answers); a and d succeeded.
    failed = [sent[2], sent[1]]
    acc.push_front(TP, [b for b in failed if b])
    order = []
    while (b := acc.pop_ready(TP, NOW_S, 0, force=True)) is not None:
        order.append(b.values[0])
    assert order == [b"b", b"c", b"e", b"f"]


def test_batch_completion_wakes_waiters_and_records_errors() -> None:
    import asyncio

    async def main() -> None:
        acc = make()
        batch, _, _ = append(acc, b"x")
        fut = batch.wait()
        assert not fut.done()
        batch.fail(NotLeader("moved"), NOW_S)
        await fut
        assert isinstance(batch.error, NotLeader)
        assert batch.wait().done()
        with pytest.raises(AssertionError):
            batch.complete(1, NOW_S)

    asyncio.run(main())


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="no room"):
        Accumulator(batch_bytes_max=BATCH_OVERHEAD_BYTES, buffer_bytes_max=10_000)
    with pytest.raises(ValueError, match="at least"):
        Accumulator(batch_bytes_max=1000, buffer_bytes_max=999)


def test_batch_size_stays_exact_when_headers_appear_mid_batch() -> None:
    acc = make(batch_bytes_max=100_000, buffer_bytes_max=1_000_000)
    recs = [
        (b"a" * 5, None),
        (b"b" * 7, [("h1", b"xyz")]),
        (b"c", None),
        (b"d" * 3, [("k", None), ("k2", b"")]),
    ]
    batch = None
    for value, headers in recs:
        batch, _, _ = acc.append(
            TP, value, None, headers, None, record_size(value, None, headers), NOW_S, NOW_MS
        )
    assert batch is not None
    assert len(batch.encode(Codec.NONE)) == batch.size_bytes == acc.buffered_bytes
