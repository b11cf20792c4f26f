"""The idempotent producer and the msg-id window, node side, in process: a real grpc.aio
server and controller over in-memory-instrumented logs (as test_node_services.py)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import pytest
from grpc import aio

from tests.support import free_port
from tests.unit.node_fakes import Client, InstrumentedLog
from tidelog.config import TopicConfig
from tidelog.controller.commands import AllocateProducerIds, RegisterNode
from tidelog.controller.state import ClusterState
from tidelog.errors import (
    InvalidRequest,
    OutOfOrderSequence,
    ProducerFenced,
    TidelogError,
    UnknownProducerId,
    from_rpc_error,
)
from tidelog.node.idempotence import PartitionIdempotence
from tidelog.node.idempotence_store import _KEY, COLUMN
from tidelog.node.metastore import MetaStore
from tidelog.node.producer_ids import ProducerIdAllocator
from tidelog.node.server import Node
from tidelog.records import decode_batches, encode_batch, iter_headers, stamp, validate_batches
from tidelog.v1 import broker_pb2

MSG_WINDOW = {"message.dedup.window.ms": "60000"}


def now_ms() -> int:
    """The records' timestamps and the admission clock of the pure tests: the node refuses
    timestamps far from its own clock (message.timestamp.after.max.ms), and the msg-id
    window counts from them."""
    return time.time_ns() // 1_000_000


def batch(
    values: list[bytes], pid: int = -1, epoch: int = -1, seq: int = -1, ids: list[str] | None = None
) -> bytes:
    headers = [[("msg-id", i.encode())] for i in ids] if ids is not None else None
    return encode_batch(
        values,
        headers=headers,
        producer_id=pid,
        producer_epoch=epoch,
        base_sequence=seq,
        timestamps_ms=now_ms(),  # now: inside the msg-id window and the timestamp bounds
    )


async def produce(client: Client, topic: str, data: bytes) -> broker_pb2.ProduceResponse:
    return await client.broker.Produce(
        broker_pb2.ProduceRequest(topic=topic, batches=data, acks=broker_pb2.ACKS_ALL)
    )


async def produce_error(client: Client, topic: str, data: bytes) -> TidelogError:
    with pytest.raises(aio.AioRpcError) as info:
        await produce(client, topic, data)
    return from_rpc_error(info.value)


async def fetch_all(client: Client, topic: str) -> list[bytes | None]:
    out: list[bytes | None] = []
    async for m in client.broker.Fetch(
        broker_pb2.FetchRequest(topic=topic, offset=0, once=True, max_wait_ms=10)
    ):
        out += [r.value for r in decode_batches(m.batches)]
    return out


async def init(client: Client, pid: int | None = None, epoch: int = 0) -> tuple[int, int]:
    req = broker_pb2.InitProducerIdRequest(producer_epoch=epoch)
    if pid is not None:
        req.producer_id = pid
    r = await client.broker.InitProducerId(req)
    return r.producer_id, r.producer_epoch


@pytest.mark.timeout(30)
async def test_init_producer_id_hands_out_distinct_ids_and_bumps_epochs(
    node: Node, client: Client
) -> None:
    ids = [await init(client) for _ in range(5)]
    assert len({pid for pid, _ in ids}) == 5 and all(epoch == 0 for _, epoch in ids)
    pid = ids[0][0]
    assert await init(client, pid, 0) == (pid, 1)
    assert await init(client, pid, 32767) != (pid, 32768)
    # The controller recorded the block: no other node (or a restart) gets these ids.
    block = node.controller.state.producer_id_block(1)
    assert block is not None and block.start <= pid < block.start + block.count
    assert node.controller.state.next_producer_id == block.start + block.count
    with pytest.raises(aio.AioRpcError) as info:
        await init(client, 10**15, 0)
    assert isinstance(from_rpc_error(info.value), InvalidRequest)


@pytest.mark.timeout(30)
async def test_a_retried_batch_is_stored_once_and_answered_with_its_offsets(
    client: Client,
) -> None:
    await client.create("t")
    pid, epoch = await init(client)
    await produce(client, "t", batch([b"x"]))  # offset 0, no producer
    first = await produce(client, "t", batch([b"a", b"b"], pid, epoch, 0))
    assert [(r.base_offset, r.last_offset, r.duplicate) for r in first.results] == [(1, 2, False)]
    again = await produce(client, "t", batch([b"a", b"b"], pid, epoch, 0))
    assert [(r.base_offset, r.last_offset, r.duplicate) for r in again.results] == [(1, 2, True)]
    assert (again.base_offset, again.last_offset) == (1, 2)
    nxt = await produce(client, "t", batch([b"c"], pid, epoch, 2))
    assert (nxt.base_offset, nxt.results[0].duplicate) == (3, False)
    assert await fetch_all(client, "t") == [b"x", b"a", b"b", b"c"]


@pytest.mark.timeout(30)
async def test_several_batches_of_one_request_mix_new_and_duplicate(client: Client) -> None:
    await client.create("t")
    pid, epoch = await init(client)
    await produce(client, "t", batch([b"a"], pid, epoch, 0))
    r = await produce(
        client, "t", batch([b"a"], pid, epoch, 0) + batch([b"b", b"c"], pid, epoch, 1)
    )
    assert [(x.base_offset, x.last_offset, x.duplicate) for x in r.results] == [
        (0, 0, True),
        (1, 2, False),
    ]
    assert await fetch_all(client, "t") == [b"a", b"b", b"c"]


@pytest.mark.timeout(30)
async def test_gap_fence_and_unknown_producer_are_refused(client: Client, node: Node) -> None:
    await client.create("t")
    pid, epoch = await init(client)
    await produce(client, "t", batch([b"a"], pid, epoch, 0))
    gap = await produce_error(client, "t", batch([b"c"], pid, epoch, 2))
    assert isinstance(gap, OutOfOrderSequence)
    assert gap.metadata["expected_sequence"] == "1" and gap.metadata["received_sequence"] == "2"
    assert gap.code == grpc.StatusCode.FAILED_PRECONDITION
    # A new session of the same id fences the old one once its first batch is stored.
    pid2, epoch2 = await init(client, pid, epoch)
    await produce(client, "t", batch([b"n"], pid2, epoch2, 0))
    fenced = await produce_error(client, "t", batch([b"b"], pid, epoch, 1))
    assert isinstance(fenced, ProducerFenced) and fenced.metadata["current_epoch"] == "1"
    other, _ = await init(client)
    unknown = await produce_error(client, "t", batch([b"u"], other, 0, 7))
    assert isinstance(unknown, UnknownProducerId)
    assert await fetch_all(client, "t") == [b"a", b"n"]
    part = node.registry.partition("t", 0)[1]
    c = part.idempotence.counters
    assert (c.out_of_order, c.fenced, c.unknown_producer) == (1, 1, 1)
    reg = node.metrics.registry
    labels = {"topic": "t", "partition": "0"}
    assert reg.get_sample_value("tidelog_idempotent_producers", labels) == 1
    for outcome in ("out_of_order", "fenced", "unknown_producer"):
        sample = reg.get_sample_value(
            "tidelog_idempotence_requests_total", {**labels, "outcome": outcome}
        )
        assert sample == 1, outcome


@pytest.mark.timeout(30)
async def test_concurrent_retries_of_one_batch_store_it_once(client: Client) -> None:
    await client.create("t")
    pid, epoch = await init(client)
    data = batch([b"a", b"b"], pid, epoch, 0)
    answers = await asyncio.gather(*(produce(client, "t", data) for _ in range(8)))
    assert {(a.base_offset, a.last_offset) for a in answers} == {(0, 1)}
    assert sum(not a.results[0].duplicate for a in answers) == 1
    assert await fetch_all(client, "t") == [b"a", b"b"]


@pytest.mark.timeout(40)
async def test_producer_state_survives_a_restart(tmp_path: Path) -> None:
    node = Node(1, "127.0.0.1:0", tmp_path, free_port(), open_log=InstrumentedLog)
    await node.start()
    c = Client(node)
    await c.create("t")
    pid, epoch = await init(c)
    await produce(c, "t", batch([b"a"], pid, epoch, 0))
    await produce(c, "t", batch([b"b"], pid, epoch, 1))
    await c.channel.close(None)
    await node.stop(1)
    # A snapshot with its applied offset was written at shutdown.
    node = Node(1, "127.0.0.1:0", tmp_path, free_port(), open_log=InstrumentedLog)
    await node.start()
    try:
        c = Client(node)
        part = node.registry.partition("t", 0)[1]
        assert part.idempotence.state.applied_offset == 2
        dup = await produce(c, "t", batch([b"b"], pid, epoch, 1))
        assert (dup.base_offset, dup.results[0].duplicate) == (1, True)
        assert isinstance(
            await produce_error(c, "t", batch([b"x"], pid, epoch, 5)), OutOfOrderSequence
        )
        await produce(c, "t", batch([b"c"], pid, epoch, 2))
        assert await fetch_all(c, "t") == [b"a", b"b", b"c"]
        await c.channel.close(None)
    finally:
        await node.stop(1)


@pytest.mark.timeout(40)
async def test_producer_state_is_rebuilt_from_the_log_without_a_snapshot(tmp_path: Path) -> None:
    node = Node(1, "127.0.0.1:0", tmp_path, free_port(), open_log=InstrumentedLog)
    await node.start()
    c = Client(node)
    await c.create("t")
    pid, epoch = await init(c)
    await produce(c, "t", batch([b"a", b"b"], pid, epoch, 0))
    group = node.registry.partition("t", 0)[1].group_id
    await c.channel.close(None)
    await node.stop(1)
    store = MetaStore(tmp_path / "meta")
    store.delete(COLUMN, _KEY.pack(group))
    store.close()
    node = Node(1, "127.0.0.1:0", tmp_path, free_port(), open_log=InstrumentedLog)
    await node.start()
    try:
        c = Client(node)
        dup = await produce(c, "t", batch([b"a", b"b"], pid, epoch, 0))
        assert (dup.base_offset, dup.last_offset, dup.results[0].duplicate) == (0, 1, True)
        await c.channel.close(None)
    finally:
        await node.stop(1)


@pytest.mark.timeout(30)
async def test_msg_id_window_stores_a_record_once(client: Client) -> None:
    await client.create("w", configs=MSG_WINDOW)
    first = await produce(client, "w", batch([b"one"], ids=["m1"]))
    again = await produce(client, "w", batch([b"one again"], ids=["m1"]))
    assert (again.base_offset, again.results[0].duplicate) == (first.base_offset, True)
    other = await produce(client, "w", batch([b"two"], ids=["m2"]))
    assert not other.results[0].duplicate
    # A record without the header is never a duplicate.
    await produce(client, "w", batch([b"plain"]))
    await produce(client, "w", batch([b"plain"]))
    # All of a batch already stored: a duplicate answered with the first and last offsets.
    both = await produce(client, "w", batch([b"x", b"y"], ids=["m1", "m2"]))
    assert (both.base_offset, both.last_offset, both.results[0].duplicate) == (0, 1, True)
    # A mix of new and stored ids is refused, not half stored.
    mixed = await produce_error(client, "w", batch([b"x", b"z"], ids=["m1", "m3"]))
    assert isinstance(mixed, InvalidRequest) and "msg-id" in str(mixed)
    assert await fetch_all(client, "w") == [b"one", b"two", b"plain", b"plain"]


@pytest.mark.timeout(30)
async def test_msg_ids_are_ignored_when_the_window_is_off(client: Client) -> None:
    await client.create("off")
    await produce(client, "off", batch([b"a"], ids=["m1"]))
    r = await produce(client, "off", batch([b"a"], ids=["m1"]))
    assert not r.results[0].duplicate
    assert await fetch_all(client, "off") == [b"a", b"a"]


@pytest.mark.timeout(30)
async def test_msg_id_duplicate_from_an_idempotent_producer_keeps_its_sequence(
    client: Client,
) -> None:
    await client.create("w", configs=MSG_WINDOW)
    await produce(client, "w", batch([b"one"], ids=["m1"]))
    # A restarted relay with a new producer id resends m1, then goes on with m2.
    pid, epoch = await init(client)
    dup = await produce(client, "w", batch([b"one"], pid, epoch, 0, ids=["m1"]))
    assert (dup.base_offset, dup.results[0].duplicate) == (0, True)
    nxt = await produce(client, "w", batch([b"two"], pid, epoch, 1, ids=["m2"]))
    assert not nxt.results[0].duplicate
    # The duplicate took an offset as an invisible control batch; consumers see two records.
    assert nxt.base_offset == 2
    assert await fetch_all(client, "w") == [b"one", b"two"]
    # And a retry of that sequence is still a duplicate of the original.
    again = await produce(client, "w", batch([b"one"], pid, epoch, 0, ids=["m1"]))
    assert (again.base_offset, again.results[0].duplicate) == (0, True)


def test_a_msg_id_in_flight_is_a_duplicate_of_the_proposal() -> None:
    idem = PartitionIdempotence("t/0", TopicConfig.from_overrides(MSG_WINDOW))
    data = batch([b"a"], ids=["m1"])
    headers = validate_batches(data)
    [plan] = idem.admit(data, headers, now_ms=now_ms())
    assert plan.proposes and plan.duplicate_of is None
    idem.proposed(plan, base_offset=5, raft_index=9, term=2)
    [retry] = idem.admit(data, headers, now_ms=now_ms())
    assert retry.duplicate_of == (5, 5) and retry.wait_for == (9, 2)
    # Once committed (applied), it is answered from the window without waiting.
    stamped = bytearray(data)
    stamp(stamped, 0, 5, 2, 9)
    idem.apply_committed(bytes(stamped))
    idem.committed(9)
    [later] = idem.admit(data, headers, now_ms=now_ms())
    assert later.duplicate_of == (5, 5) and later.wait_for is None
    # A truncated proposal is forgotten: the retry is new again.
    idem2 = PartitionIdempotence("t/0", TopicConfig.from_overrides(MSG_WINDOW))
    [p] = idem2.admit(data, headers, now_ms=now_ms())
    idem2.proposed(p, base_offset=5, raft_index=9, term=2)
    idem2.truncated(9)
    [p2] = idem2.admit(data, headers, now_ms=now_ms())
    assert p2.duplicate_of is None
    assert [h.record_count for _, h in iter_headers(data)] == [1]


def test_batches_of_one_request_follow_each_other() -> None:
    idem = PartitionIdempotence("t/0", TopicConfig.from_overrides({}))
    data = batch([b"a"], 7, 0, 0) + batch([b"b", b"c"], 7, 0, 1) + batch([b"d"], 7, 0, 3)
    plans = idem.admit(data, validate_batches(data), now_ms=now_ms())
    assert [p.proposes for p in plans] == [True, True, True]
    gap = batch([b"a"], 7, 0, 0) + batch([b"c"], 7, 0, 2)
    with pytest.raises(OutOfOrderSequence):
        idem.admit(gap, validate_batches(gap), now_ms=now_ms())
    twice = batch([b"a"], 7, 0, 0) + batch([b"a"], 7, 0, 0)
    with pytest.raises(InvalidRequest):
        idem.admit(twice, validate_batches(twice), now_ms=now_ms())
    # Nothing was recorded as in flight by a refused request.
    assert idem.view.pending_count == 0


@pytest.mark.timeout(30)
async def test_concurrent_requests_of_one_producer_are_stored_in_sequence_order(
    client: Client,
) -> None:
    await client.create("t")
    pid, epoch = await init(client)
    n = 16
    batches = [batch([b"%d" % i], pid, epoch, i) for i in range(n)]
    # gRPC does not order concurrent calls: whatever arrives early is refused, never stored
    # ahead of its predecessors.
    answers = await asyncio.gather(
        *(produce(client, "t", b) for b in batches), return_exceptions=True
    )
    for i, a in enumerate(answers):
        if isinstance(a, BaseException):
            assert isinstance(a, aio.AioRpcError)
            assert isinstance(from_rpc_error(a), OutOfOrderSequence), a
        else:
            assert a.base_offset == i  # sequence i sits at offset i: nothing got ahead
    # The producer resends what was refused, in order: everything ends up once, in order.
    for i, a in enumerate(answers):
        if isinstance(a, BaseException):
            r = await produce(client, "t", batches[i])
            assert r.base_offset == i
    assert await fetch_all(client, "t") == [b"%d" % i for i in range(n)]


class _FakeController:
    """Applies AllocateProducerIds to a real ClusterState, as the active controller does."""

    def __init__(self) -> None:
        self.state = ClusterState()
        self.index = 1
        self.state.apply(1, RegisterNode(4, "127.0.0.1:1"))
        self.submitted = 0

    async def submit(self, command: object, timeout_s: float = 1) -> int:
        assert isinstance(command, AllocateProducerIds)
        self.submitted += 1
        self.index += 1
        self.state.apply(self.index, command).raise_for_error()
        return self.index

    async def wait_applied(self, index: int, timeout_s: float) -> None:
        assert self.state.applied_index >= index


@pytest.mark.timeout(10)
async def test_allocator_takes_a_new_block_when_one_is_used_up() -> None:
    controller = _FakeController()
    a = ProducerIdAllocator(controller, 4, block_size=3)  # type: ignore[arg-type]
    ids = [await a.new_id() for _ in range(7)]
    assert ids == list(range(7)) and controller.submitted == 3
    # Another node's allocator (or this one after a restart) never gets these ids again.
    b = ProducerIdAllocator(controller, 4, block_size=3)  # type: ignore[arg-type]
    assert await b.new_id() == 9
    assert await a.init(2, 0) == (2, 1)
    assert (await a.init(2, 32767))[1] == 0


@pytest.mark.timeout(30)
async def test_idle_producers_expire_and_snapshots_are_written_periodically(
    tmp_path: Path,
) -> None:
    node = Node(1, "127.0.0.1:0", tmp_path, free_port(), open_log=InstrumentedLog)
    node.idempotence_interval_s = 0.1
    await node.start()
    try:
        c = Client(node)
        await c.create("e", configs={"producer.id.expiration.ms": "1000"})
        pid, epoch = await init(c)
        now = encode_batch([b"a"], producer_id=pid, producer_epoch=epoch, base_sequence=0)
        await produce(c, "e", now)
        part = node.registry.partition("e", 0)[1]
        store = node._store
        assert store is not None

        async def snapshot_written() -> bool:
            return store.get(COLUMN, _KEY.pack(part.group_id)) is not None

        for _ in range(50):
            if await snapshot_written() and len(part.idempotence.state) == 0:
                break
            await asyncio.sleep(0.1)
        assert await snapshot_written()
        assert len(part.idempotence.state) == 0 and part.idempotence.counters.expired == 1
        # The expired producer's next batch must start a new session.
        assert isinstance(
            await produce_error(c, "e", batch([b"b"], pid, epoch, 1)), UnknownProducerId
        )
        await c.channel.close(None)
    finally:
        await node.stop(1)
