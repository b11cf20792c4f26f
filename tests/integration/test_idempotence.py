"""Idempotence across a leader kill, on a real 3-node cluster (``python -m tidelog.node``
processes on 127.0.0.1, free ports, temporary directories, all killed at the end).

The same msg-id sent twice to a topic with ``message.dedup.window.ms``, and the same
idempotent batch (producer id, epoch, sequence) sent twice, each once before and once after
kill -9 of the partition's leader: one record is stored, and the retry is answered with the
original offsets by the new leader, which rebuilt both states from the committed log.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from grpc import aio

from tests.support.nodeproc import Cluster, Node, spawn_cluster, until
from tidelog.errors import TidelogError, from_rpc_error
from tidelog.records import decode_batches, encode_batch
from tidelog.v1 import admin_pb2, admin_pb2_grpc, broker_pb2

pytestmark = pytest.mark.integration

TOPIC = "dedup"
NODES = (1, 2, 3)


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[dict[int, Node]]:
    nodes = spawn_cluster(tmp_path, NODES)
    try:
        yield nodes
    finally:
        for n in nodes.values():
            n.kill()


async def produce_somewhere(
    c: Cluster, among: tuple[int, ...], data: bytes, timeout_s: float = 20
) -> broker_pb2.ProduceResponse:
    """Produce to whichever of ``among`` leads, retrying retriable errors (a failover)."""
    deadline = time.monotonic() + timeout_s
    last: TidelogError | None = None
    while time.monotonic() < deadline:
        leaders = await c.leaders(among)
        node = leaders.get(0)
        if node is not None:
            try:
                resp: broker_pb2.ProduceResponse = await c.broker(node).Produce(
                    broker_pb2.ProduceRequest(
                        topic=TOPIC, batches=data, acks=broker_pb2.ACKS_ALL, timeout_ms=3000
                    ),
                    timeout=5,
                )
                return resp
            except aio.AioRpcError as exc:
                last = from_rpc_error(exc)
                if not last.retriable:
                    raise last from None
        await asyncio.sleep(0.1)
    raise AssertionError(f"no leader took the batch within {timeout_s} s: {last}")


async def read_all(c: Cluster, node: int) -> list[bytes | None]:
    out: list[bytes | None] = []
    async for m in c.broker(node).Fetch(
        broker_pb2.FetchRequest(topic=TOPIC, offset=0, once=True, max_wait_ms=100), timeout=10
    ):
        out += [r.value for r in decode_batches(m.batches)]
    return out


@pytest.mark.timeout(120)
async def test_same_msg_id_and_same_batch_across_a_leader_kill_store_once(
    procs: dict[int, Node],
) -> None:
    c = Cluster(procs, TOPIC)
    try:
        await c.wait_all_alive()
        spec = admin_pb2.TopicSpec(
            name=TOPIC,
            partitions=1,
            replication_factor=3,
            configs={"message.dedup.window.ms": "600000"},
        )
        await admin_pb2_grpc.AdminStub(c.channel(1)).CreateTopics(
            admin_pb2.CreateTopicsRequest(topics=[spec])
        )

        async def led() -> bool:
            return 0 in await c.leaders()

        await until("the partition has a leader", led)
        init = await c.broker(1).InitProducerId(broker_pb2.InitProducerIdRequest(), timeout=10)
        pid, epoch = init.producer_id, init.producer_epoch

        by_id = encode_batch([b"webhook-1"], headers=[[("msg-id", b"evt-1")]])
        by_seq = encode_batch(
            [b"p0", b"p1"], producer_id=pid, producer_epoch=epoch, base_sequence=0
        )
        first_id = await produce_somewhere(c, NODES, by_id)
        first_seq = await produce_somewhere(c, NODES, by_seq)
        assert not first_id.results[0].duplicate and not first_seq.results[0].duplicate

        victim = (await c.leaders())[0]
        procs[victim].kill()
        survivors = tuple(n for n in NODES if n != victim)

        # The retries, as a restarted webhook relay and a producer whose answer was lost
        # would send them (a fresh batch with the same msg-id; the very same batch).
        again_id = await produce_somewhere(
            c, survivors, encode_batch([b"webhook-1 resent"], headers=[[("msg-id", b"evt-1")]])
        )
        again_seq = await produce_somewhere(c, survivors, by_seq)
        assert again_id.results[0].duplicate and again_seq.results[0].duplicate
        assert again_id.base_offset == first_id.base_offset
        assert (again_seq.base_offset, again_seq.last_offset) == (
            first_seq.base_offset,
            first_seq.last_offset,
        )
        nxt = await produce_somewhere(
            c,
            survivors,
            encode_batch([b"p2"], producer_id=pid, producer_epoch=epoch, base_sequence=2),
        )
        assert not nxt.results[0].duplicate

        leader = (await c.leaders(survivors))[0]
        assert await read_all(c, leader) == [b"webhook-1", b"p0", b"p1", b"p2"]
    finally:
        await c.close()
