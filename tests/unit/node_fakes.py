"""The real partition log with knobs the node's unit tests need: a flush that is slow or fails
on demand, and counters of flushes, rolls and retention runs; and :class:`Client`, the gRPC
stubs of an in-process node (the ``node`` and ``client`` fixtures of tests/unit/conftest.py).

The node drives Raft over the log (Raft indexes, truncation, snapshots), so tests use the
real log in a temporary directory rather than an in-memory imitation of all of that.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

from grpc import aio

from tidelog.config import TopicConfig
from tidelog.node.log import PartitionLog
from tidelog.node.server import Node
from tidelog.records import encode_batch
from tidelog.v1 import admin_pb2, admin_pb2_grpc, broker_pb2, broker_pb2_grpc


class InstrumentedLog(PartitionLog):
    def __init__(self, directory: Path, config: TopicConfig | None = None) -> None:
        super().__init__(directory, config or TopicConfig.from_overrides({}))
        self.flush_calls = 0
        self.flush_delay_s = 0.0
        self.flush_error: Exception | None = None
        self.flushing_now = 0
        self.closed = False
        self.deleted = False
        self.rolls = 0
        self.retention_runs = 0
        #: The first raft index of a suffix replaced since the last flush began (None: every
        #: replaced entry is fsynced); what a power loss could bring back is from there.
        self.replaced_unsynced_from: int | None = None
        self._counter_lock = threading.Lock()

    def truncate_suffix(self, offset: int) -> None:
        cut = offset < self.log_end_offset
        super().truncate_suffix(offset)
        if cut and self.replaced_unsynced_from is None:
            self.replaced_unsynced_from = self.last_index + 1

    def flush(self) -> int:
        with self._counter_lock:
            self.flushing_now += 1
        try:
            if self.flush_delay_s:
                time.sleep(self.flush_delay_s)
            if self.flush_error is not None:
                raise self.flush_error
            self.flush_calls += 1
            replaced = self.replaced_unsynced_from
            done = super().flush()
            if self.replaced_unsynced_from == replaced:
                self.replaced_unsynced_from = None
            return done
        finally:
            with self._counter_lock:
                self.flushing_now -= 1

    def retention_point(self, now_ms: int | None = None, *, below: int | None = None) -> int | None:
        self.retention_runs += 1
        return super().retention_point(now_ms, below=below)

    def maybe_roll(self, now_ms: int | None = None) -> bool:
        self.rolls += 1
        return super().maybe_roll(now_ms)

    def close(self) -> None:
        assert self.flushing_now == 0, "closed while a flush runs"
        super().close()
        self.closed = True

    def delete(self) -> None:
        assert self.flushing_now == 0, "deleted while a flush runs"
        super().delete()
        self.deleted = True
        self.closed = True


class Client:
    def __init__(self, node: Node) -> None:
        self.channel = aio.insecure_channel(f"127.0.0.1:{node.port}")
        self.broker = broker_pb2_grpc.BrokerStub(self.channel)
        self.admin = admin_pb2_grpc.AdminStub(self.channel)

    async def create(
        self, name: str, partitions: int = 1, configs: dict[str, str] | None = None
    ) -> None:
        await self.admin.CreateTopics(
            admin_pb2.CreateTopicsRequest(
                topics=[admin_pb2.TopicSpec(name=name, partitions=partitions, configs=configs)]
            )
        )

    async def produce(
        self, topic: str, values: list[bytes], acks: broker_pb2.Acks.ValueType = broker_pb2.ACKS_ALL
    ) -> broker_pb2.ProduceResponse:
        return await self.broker.Produce(
            broker_pb2.ProduceRequest(topic=topic, batches=encode_batch(values), acks=acks)
        )
