"""An in-process fake Broker service for client tests that need failures on demand.

It keeps each partition as a plain list of records, answers Metadata, Produce, Fetch and
ListOffsets like a one-node cluster, and lets a test decide per Produce request or per
Fetch stream whether to fail and with which TidelogError. The real node is exercised by
the integration tests; this one exists to make leader changes and timeouts deterministic.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from grpc import aio

from tidelog.errors import OffsetOutOfRange, TidelogError, UnknownTopic, trailing_metadata
from tidelog.records import Record, decode_batches, encode_batch, iter_headers, validate_batches
from tidelog.v1 import broker_pb2, broker_pb2_grpc

Context = aio.ServicerContext[Any, Any]

#: (request number, request) -> an error to answer with, or None to serve it.
ProduceFault = Callable[[int, broker_pb2.ProduceRequest], TidelogError | None]
#: (stream number, responses sent so far on it) -> an error to end the stream with, or None.
FetchFault = Callable[[int, int], TidelogError | None]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class FakeBroker(broker_pb2_grpc.BrokerServicer):
    address: str
    topics: dict[str, int]
    logs: dict[tuple[str, int], list[Record]] = field(default_factory=dict)
    produce_fault: ProduceFault | None = None
    fetch_fault: FetchFault | None = None
    produce_requests: int = 0
    fetch_streams: int = 0
    #: Fetch responses carry at most this many batches, to make many responses.
    fetch_batches_max: int = 1
    produce_delay_s: float = 0.0

    def log(self, topic: str, partition: int) -> list[Record]:
        return self.logs.setdefault((topic, partition), [])

    async def _abort(self, context: Context, err: TidelogError) -> None:
        await context.abort(err.code, err.message, trailing_metadata=trailing_metadata(err))

    async def Metadata(
        self, request: broker_pb2.MetadataRequest, context: Context
    ) -> broker_pb2.MetadataResponse:
        return broker_pb2.MetadataResponse(
            nodes=[broker_pb2.NodeInfo(node_id=1, address=self.address, alive=True)],
            controller_id=1,
            cluster_id="fake",
            topics=[
                broker_pb2.TopicMetadata(
                    name=name,
                    partitions=[
                        broker_pb2.PartitionMetadata(
                            partition=p, leader=1, replicas=[1], in_sync=[1], leader_term=1
                        )
                        for p in range(n)
                    ],
                )
                for name, n in self.topics.items()
            ],
        )

    async def Produce(
        self, request: broker_pb2.ProduceRequest, context: Context
    ) -> broker_pb2.ProduceResponse:
        number = self.produce_requests
        self.produce_requests += 1
        if self.produce_delay_s:
            await asyncio.sleep(self.produce_delay_s)
        err = self.produce_fault(number, request) if self.produce_fault else None
        if err is None and request.topic not in self.topics:
            err = UnknownTopic(f"unknown topic {request.topic!r}")
        if err is not None:
            await self._abort(context, err)
        validate_batches(request.batches)
        log = self.log(request.topic, request.partition)
        base = len(log)
        buf = bytearray(request.batches)
        for pos, h in iter_headers(bytes(buf)):
            # Stamp offsets the way the node does (outside the CRC).
            buf[pos : pos + 8] = (len(log)).to_bytes(8, "little", signed=True)
            log.extend(decode_batches(bytes(buf[pos : pos + h.size])))
        return broker_pb2.ProduceResponse(base_offset=base, last_offset=len(log) - 1)

    async def Fetch(
        self, request: broker_pb2.FetchRequest, context: Context
    ) -> AsyncIterator[broker_pb2.FetchResponse]:
        stream = self.fetch_streams
        self.fetch_streams += 1
        log = self.log(request.topic, request.partition)
        if request.offset > len(log):
            err: TidelogError = OffsetOutOfRange(
                f"offset {request.offset} is outside [0, {len(log)}]",
                log_start_offset="0",
                high_watermark=str(len(log)),
            )
            await self._abort(context, err)
        offset = request.offset
        sent = 0
        while True:
            fault = self.fetch_fault(stream, sent) if self.fetch_fault else None
            if fault is not None:
                await self._abort(context, fault)
            if offset < len(log):
                # Serve batches of up to 10 records aligned to multiples of 10, so a fetch
                # from the middle starts before the position (as the node may do).
                parts = []
                for _ in range(self.fetch_batches_max):
                    if offset >= len(log):
                        break
                    start = offset - offset % 10
                    chunk = log[start : start + 10]
                    parts.append(
                        encode_batch(
                            [r.value for r in chunk],
                            [r.key for r in chunk],
                            [r.timestamp_ms for r in chunk],
                            base_offset=start,
                        )
                    )
                    offset = start + len(chunk)
                sent += 1
                yield broker_pb2.FetchResponse(
                    batches=b"".join(parts), high_watermark=len(log), next_offset=offset
                )
            else:
                await asyncio.sleep(0.01)

    async def ListOffsets(
        self, request: broker_pb2.ListOffsetsRequest, context: Context
    ) -> broker_pb2.ListOffsetsResponse:
        log = self.log(request.topic, request.partition)
        if request.spec == broker_pb2.OFFSET_SPEC_EARLIEST:
            offset = 0
        elif request.spec == broker_pb2.OFFSET_SPEC_LATEST:
            offset = len(log)
        else:
            offset = next(
                (r.offset for r in log if r.timestamp_ms >= request.timestamp_ms), len(log)
            )
        return broker_pb2.ListOffsetsResponse(
            offset=offset, timestamp_ms=-1, log_start_offset=0, high_watermark=len(log)
        )


class FakeCluster:
    """``async with FakeCluster({"t": 2}) as fake: ...fake.bootstrap...``"""

    def __init__(self, topics: dict[str, int]) -> None:
        self.port = free_port()
        self.bootstrap = f"127.0.0.1:{self.port}"
        self.broker = FakeBroker(self.bootstrap, dict(topics))
        self._server: aio.Server | None = None

    async def __aenter__(self) -> FakeBroker:
        self._server = aio.server(
            options=[
                ("grpc.max_receive_message_length", 80 * 1024 * 1024),
                ("grpc.max_send_message_length", 80 * 1024 * 1024),
            ]
        )
        broker_pb2_grpc.add_BrokerServicer_to_server(self.broker, self._server)
        self._server.add_insecure_port(self.bootstrap)
        await self._server.start()
        return self.broker

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        await self._server.stop(grace=None)


__all__ = ["FakeBroker", "FakeCluster", "free_port"]
