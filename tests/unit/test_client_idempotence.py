"""The idempotent producer against fakes that check sequences as the node does: order kept
with 5 requests in flight whose arrivals are reordered, retries that keep their sequence
(a lost answer stores nothing twice), refusals after a leader change, fencing, a node that
forgot the producer, the settings that conflict with idempotence, and the error that tells
an unknown outcome from a surely failed send."""

from __future__ import annotations

import asyncio

import pytest

from tests.unit.client_fakes import FakeBroker, FakeCluster, FakeReplicatedCluster
from tidelog.client import Producer
from tidelog.client.errors import OutcomeUnknown
from tidelog.errors import (
    NotLeader,
    OutOfOrderSequence,
    ProducerFenced,
    RequestTimedOut,
    TidelogError,
    Unsupported,
)
from tidelog.records import iter_headers
from tidelog.v1 import broker_pb2

pytestmark = pytest.mark.timeout(60)


def values_of(fake: FakeBroker, topic: str, partition: int) -> list[bytes | None]:
    return [r.value for r in fake.log(topic, partition)]


async def test_five_in_flight_with_reordered_arrivals_store_each_batch_once_in_send_order() -> None:
    """Every 4th request is held 30 ms, so the requests sent after it reach the node first;
    the node refuses them (their predecessor is not stored) and they go again after it."""
    async with FakeCluster({"t": 1}) as fake:
        fake.produce_delay_fn = lambda n: 0.03 if n % 4 == 0 else 0.0
        async with Producer(fake.address, linger_ms=0, batch_bytes_max=400) as p:
            assert p.idempotent and p.max_in_flight_per_partition == 5
            values = [b"%05d" % i for i in range(1500)]
            results = await p.send_many("t", values)
        assert values_of(fake, "t", 0) == values
        offsets = [(md.base_offset, md.record_count) for md in results]
        assert offsets == sorted(offsets) and offsets[0][0] == 0
        verdicts = fake.producers.verdicts
        # Arrivals really were reordered (and refused), several requests really were out at
        # once, and all of it under one producer id.
        assert verdicts["OUT_OF_ORDER_SEQUENCE"] + verdicts["UNKNOWN_PRODUCER_ID"] > 0
        assert fake.serving_max >= 2
        assert fake.producers.init_requests == 1
        assert len({pid for _, pid, _, _, _ in fake.producers.seen}) == 1


async def test_sends_at_once_and_queued_sends_interleave_in_order_with_contiguous_sequences() -> (
    None
):
    """Adaptive linger's two paths, mixed: a record sent while nothing is in flight goes at
    the next loop iteration with no linger timer; records sent while a request is out queue
    and go together once it answers. Linger is 30 s, so a batch that needed a timer would
    hang the test. Send order, offsets and sequences (one session, no gaps, no refusals)
    all come out as with one path alone."""
    async with FakeCluster({"t": 1}) as fake:
        fake.produce_delay_s = 0.005
        async with Producer(fake.address, linger_ms=30_000) as p:
            sent: list[bytes] = []
            futures = []

            def send(value: bytes) -> None:
                sent.append(value)
                futures.append(p.send("t", value))

            for r in range(30):
                send(b"lone-%d" % r)  # nothing in flight (awaited below): goes at once
                await asyncio.sleep(0)
                for i in range(r % 4):  # while it is out: these wait for its answer
                    send(b"queued-%d-%d" % (r, i))
                    await asyncio.sleep(0.001 * (r % 3))
                if r % 3 == 0:
                    send(b"burst-%d" % r)  # lands in the queued batch, or an idle one
                if r % 2 == 0:
                    await asyncio.wait_for(futures[-1], 10)
            results = await asyncio.wait_for(asyncio.gather(*futures), 10)
        assert values_of(fake, "t", 0) == sent
        assert [md.offset for md in results] == list(range(len(sent)))
        producers = fake.producers
        assert set(producers.verdicts) == {"accept"} and producers.init_requests == 1
        expected = 0
        for _, _, _, sequence, count in producers.seen:
            assert sequence == expected
            expected += count
        assert expected == len(sent) and len(producers.seen) < len(sent)


async def test_a_refusal_answered_after_the_earlier_batch_was_acknowledged_is_resent() -> None:
    """The node refuses a batch whose predecessor has not arrived yet, then stores the
    predecessor; the predecessor's answer overtakes the refusal. The refusal is not taken
    for lost state (every earlier batch now acknowledged): the batch went out before its
    predecessor was acknowledged, so it goes again and is stored."""
    async with FakeCluster({"t": 1}) as fake:
        async with Producer(fake.address, linger_ms=0, batch_bytes_max=400) as p:
            await p.send("t", b"first")
            fake.produce_delay_fn = lambda n: 0.05 if n == 1 else 0.0
            fake.refusal_delay_s = 0.2
            values = [b"%05d" % i for i in range(60)]
            results = await asyncio.wait_for(p.send_many("t", values), 10)
        assert values_of(fake, "t", 0) == [b"first", *values]
        assert sum(md.record_count for md in results) == 60 and results[0].base_offset == 1
        assert fake.producers.verdicts["OUT_OF_ORDER_SEQUENCE"] > 0
        assert fake.producers.init_requests == 1


async def test_a_lost_answer_is_resent_with_the_same_sequence_and_stored_once() -> None:
    lost = {2, 5, 6}

    def answer_lost(n: int, req: broker_pb2.ProduceRequest) -> TidelogError | None:
        return RequestTimedOut("the answer was lost") if n in lost else None

    async with FakeCluster({"t": 1}) as fake:
        fake.answer_fault = answer_lost
        async with Producer(fake.address, linger_ms=0, retry_backoff_ms=1) as p:
            mds = []
            for i in range(10):
                mds.append(await p.send("t", b"v%d" % i))
        assert values_of(fake, "t", 0) == [b"v%d" % i for i in range(10)]
        # The futures got the offsets of the first (stored) attempt.
        assert [md.offset for md in mds] == list(range(10))
        assert fake.producers.verdicts["duplicate"] == len(lost)
        seen = fake.producers.seen
        # Each resend carried exactly the identity of the attempt whose answer was lost.
        for n in lost:
            assert seen[n] == seen[n + 1]
        assert len(seen) == 10 + len(lost)
        assert sorted({s[3] for s in seen}) == list(range(10))


async def test_sequences_survive_a_leader_change_with_requests_in_flight() -> None:
    """Node 1 holds its requests 50 ms and loses the lead meanwhile: the batches it held
    are refused (NOT_LEADER) and resent to node 2 with their sequences, ahead of every newer
    batch; nothing is stored twice or out of order."""
    async with FakeReplicatedCluster({"t": 1}) as fc:
        fc.nodes[1].produce_delay_s = 0.05
        async with Producer(fc.bootstrap, linger_ms=0, batch_bytes_max=300) as p:
            values = [b"%05d" % i for i in range(600)]
            handle = p.send_many("t", values)
            await asyncio.sleep(0.02)
            fc.move_leader("t", 0, 2)
            results = await asyncio.wait_for(handle, 20)
        assert [r.value for r in fc.log("t", 0)] == values
        assert sum(md.record_count for md in results) == 600
        assert fc.produce_requests[2] > 0
        assert fc.producers.init_requests == 1


async def test_out_of_order_for_the_first_unacknowledged_batch_fails_it_and_the_rest_goes_on() -> (
    None
):
    """The node answers OUT_OF_ORDER_SEQUENCE for a batch whose every predecessor was
    acknowledged (it lost data): that batch fails with the error, and the partition's next
    batches are stored, in order, in a new session (a new producer id)."""

    def fault(n: int, req: broker_pb2.ProduceRequest) -> TidelogError | None:
        return OutOfOrderSequence("expected sequence 7, got 3") if n == 3 else None

    async with FakeCluster({"t": 1}) as fake:
        fake.produce_fault = fault
        async with Producer(fake.address, linger_ms=0) as p:
            for i in range(3):
                await p.send("t", b"v%d" % i)
            with pytest.raises(OutOfOrderSequence, match="every earlier batch was acknowledged"):
                await p.send("t", b"v3")
            for i in range(4, 8):
                await p.send("t", b"v%d" % i)
        assert values_of(fake, "t", 0) == [b"v%d" % i for i in (0, 1, 2, 4, 5, 6, 7)]
        assert fake.producers.init_requests == 2
        pids = [pid for _, pid, _, _, _ in fake.producers.seen]
        assert pids[0] != pids[-1]
        # The refused request never reached the sequence check; the next batch starts the
        # new session at sequence 0.
        assert [seq for _, _, _, seq, _ in fake.producers.seen] == [0, 1, 2, 0, 1, 2, 3]


async def test_fencing_fails_the_batch_and_every_later_send() -> None:
    def fault(n: int, req: broker_pb2.ProduceRequest) -> TidelogError | None:
        return ProducerFenced("producer 1001 epoch 0 is fenced") if n >= 2 else None

    async with FakeCluster({"t": 1}) as fake:
        fake.produce_fault = fault
        async with Producer(fake.address, linger_ms=0) as p:
            await p.send("t", b"a")
            await p.send("t", b"b")
            with pytest.raises(ProducerFenced, match="close it and create a new one"):
                await p.send("t", b"c")
            with pytest.raises(ProducerFenced):
                p.send("t", b"d")
        assert values_of(fake, "t", 0) == [b"a", b"b"]
        assert fake.produce_requests == 3  # fenced is not retried


async def test_a_node_that_forgot_the_producer_gets_a_new_session_not_an_error() -> None:
    async with FakeCluster({"t": 1}) as fake:
        async with Producer(fake.address, linger_ms=0) as p:
            for i in range(3):
                await p.send("t", b"v%d" % i)
            fake.producers.forget("t", 0)  # producer.id.expiration.ms passed
            mds = [await p.send("t", b"v%d" % i) for i in range(3, 6)]
        assert [md.offset for md in mds] == [3, 4, 5]
        assert values_of(fake, "t", 0) == [b"v%d" % i for i in range(6)]
        assert fake.producers.verdicts["UNKNOWN_PRODUCER_ID"] == 1
        assert fake.producers.init_requests == 2
        # The refused batch went again in the new session from sequence 0.
        (_, pid1, _, seq1, _), (_, pid2, _, seq2, _) = fake.producers.seen[3:5]
        assert seq1 == 3 and seq2 == 0 and pid1 != pid2


def test_settings_that_conflict_with_idempotence() -> None:
    with pytest.raises(ValueError, match=r"enable_idempotence=True needs acks='all' \(got acks=1"):
        Producer("127.0.0.1:1", acks=1, enable_idempotence=True)
    with pytest.raises(ValueError, match="enable_idempotence=True allows at most 5"):
        Producer("127.0.0.1:1", enable_idempotence=True, max_in_flight_per_partition=6)
    default = Producer("127.0.0.1:1")
    assert default.idempotent and default.max_in_flight_per_partition == 5
    # Unset, a conflicting setting turns idempotence off (as Kafka's producer does), and
    # without it one request is in flight per partition.
    for p in (
        Producer("127.0.0.1:1", acks=1),
        Producer("127.0.0.1:1", acks=0),
        Producer("127.0.0.1:1", enable_idempotence=False),
    ):
        assert not p.idempotent and p.max_in_flight_per_partition == 1
    many = Producer("127.0.0.1:1", max_in_flight_per_partition=8)
    assert not many.idempotent and many.max_in_flight_per_partition == 8


async def test_without_idempotence_one_request_is_in_flight_per_partition() -> None:
    async with FakeCluster({"t": 1}) as fake:
        fake.produce_delay_fn = lambda n: 0.03 if n % 4 == 0 else 0.0
        async with Producer(
            fake.address, linger_ms=0, batch_bytes_max=400, enable_idempotence=False
        ) as p:
            values = [b"%05d" % i for i in range(300)]
            await p.send_many("t", values)
        assert values_of(fake, "t", 0) == values
        assert fake.serving_max == 1
        assert fake.producers.seen == []  # no stamps
        assert fake.producers.init_requests == 0


async def test_an_unknown_outcome_fails_with_its_own_error() -> None:
    """Without idempotence and without retries: a lost answer (stored!) fails with
    OutcomeUnknown, a refusal (surely not stored) with the node's error."""
    async with FakeCluster({"t": 1}) as fake:
        fake.answer_fault = lambda n, req: RequestTimedOut("lost") if n == 0 else None
        fake.produce_fault = lambda n, req: NotLeader("moved") if n == 1 else None
        async with Producer(fake.address, enable_idempotence=False, retries=0, linger_ms=0) as p:
            with pytest.raises(OutcomeUnknown, match="may be stored"):
                await p.send("t", b"stored")
            with pytest.raises(NotLeader) as refused:
                await p.send("t", b"refused")
            assert not isinstance(refused.value, OutcomeUnknown)
        assert values_of(fake, "t", 0) == [b"stored"]


async def test_idempotent_producer_gives_up_on_an_unknown_outcome_after_the_delivery_timeout() -> (
    None
):
    stamps: list[tuple[int, int, int]] = []

    def slow(n: int, req: broker_pb2.ProduceRequest) -> TidelogError | None:
        for _, h in iter_headers(req.batches):
            stamps.append((h.producer_id, h.producer_epoch, h.base_sequence))
        return RequestTimedOut("replicas are slow")

    async with FakeCluster({"t": 1}) as fake:
        fake.produce_fault = slow
        async with Producer(fake.address, delivery_timeout_ms=300, retry_backoff_ms=10) as p:
            with pytest.raises(OutcomeUnknown, match="delivery_timeout_ms"):
                await p.send("t", b"v")
        # Every attempt carried the same stamp.
        assert len(stamps) > 1 and len(set(stamps)) == 1 and stamps[0][0] >= 0


async def test_a_cluster_without_producer_ids_fails_the_send_with_what_to_do() -> None:
    async with FakeCluster({"t": 1}) as fake:
        fake.init_fault = Unsupported("InitProducerId is not implemented")
        async with Producer(fake.address) as p:
            with pytest.raises(TidelogError, match="enable_idempotence=False"):
                await p.send("t", b"v")
        assert fake.produce_requests == 0
        async with Producer(fake.address, enable_idempotence=False) as p:
            assert (await p.send("t", b"v")).offset == 0
