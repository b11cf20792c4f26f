"""The Broker gRPC service: Produce, Fetch, ListOffsets, Metadata.

The data path costs O(batches) per request, never O(records): a produce request's batches
are validated (header, CRC, column lengths) and appended as the producer's bytes with one
write; a fetch response is a slice of the log, sent as is. Record counts for metrics come
from offsets (they are contiguous per record), not from the records.
"""

from __future__ import annotations

import asyncio
import struct
import time
from collections.abc import AsyncIterator

from tidelog.config import validate_topic_name
from tidelog.errors import BatchTooLarge, InvalidRequest, StorageError
from tidelog.node import limits, rpc
from tidelog.node.auth import CLUSTER, Guard, Resource
from tidelog.node.controller_node import Controller
from tidelog.node.identity import NodeIdentity
from tidelog.node.metrics import NodeMetrics
from tidelog.node.topics import TopicRegistry
from tidelog.records import HEADER_SIZE, LENGTH_PREFIX_SIZE, read_header, validate_batches
from tidelog.v1 import broker_pb2 as pb
from tidelog.v1 import broker_pb2_grpc as pb_grpc

_WAIT_FOR_COMMIT = frozenset({pb.ACKS_ALL, pb.ACKS_UNSPECIFIED})
_ACKS = frozenset({pb.ACKS_UNSPECIFIED, pb.ACKS_NONE, pb.ACKS_LEADER, pb.ACKS_ALL})
# batch_length is the int32 just before LENGTH_PREFIX_SIZE; it counts the bytes after it.
_BATCH_LENGTH = struct.Struct("<i")
_BATCH_LENGTH_AT = LENGTH_PREFIX_SIZE - _BATCH_LENGTH.size
_BATCH_LENGTH_MIN = HEADER_SIZE - LENGTH_PREFIX_SIZE


def last_batch_position(buf: bytes) -> int:
    """Where the last of the batches laid end to end in ``buf`` starts, reading only their
    length fields (the bytes come from the log, which checked them on the way in)."""
    pos, end = 0, len(buf)
    unpack = _BATCH_LENGTH.unpack_from
    while True:
        (length,) = unpack(buf, pos + _BATCH_LENGTH_AT)
        size = length + LENGTH_PREFIX_SIZE
        if length < _BATCH_LENGTH_MIN or pos + size > end:
            raise StorageError(f"the log returned a damaged batch at byte {pos} of a read")
        if pos + size == end:
            return pos
        pos += size


def _ms(raw: int, default_ms: int, max_ms: int, what: str) -> float:
    """A request's millisecond field as seconds: 0 picks the default, negatives are refused."""
    if raw < 0:
        raise InvalidRequest(f"{what} must be >= 0 ms (0 picks {default_ms} ms), got {raw}")
    return min(raw or default_ms, max_ms) / 1000


class BrokerService(pb_grpc.BrokerServicer):
    def __init__(
        self,
        registry: TopicRegistry,
        controller: Controller,
        identity: NodeIdentity,
        metrics: NodeMetrics,
        guard: Guard | None = None,
    ) -> None:
        #: Who may call what (node/auth.py); the default lets everyone do everything.
        self.guard = guard or Guard()
        self.registry = registry
        self.controller = controller
        self.identity = identity
        self.metrics = metrics

    @rpc.unary("Produce")
    async def Produce(self, request: pb.ProduceRequest, context: rpc.Context) -> pb.ProduceResponse:
        self.guard.check(context, "Produce", Resource.topic(request.topic))
        topic, part = self.registry.partition(request.topic, request.partition)
        acks = request.acks
        if acks not in _ACKS:
            raise InvalidRequest(
                f"unknown acks value {acks}: use ACKS_NONE, ACKS_LEADER or ACKS_ALL"
            )
        timeout_ms = request.timeout_ms
        if timeout_ms < 0 or timeout_ms > limits.produce_timeout_max_ms:
            raise InvalidRequest(
                f"timeout_ms must be in 0..{limits.produce_timeout_max_ms} (0 picks "
                f"{limits.produce_timeout_default_ms}), got {timeout_ms}"
            )
        buf = request.batches
        if len(buf) > limits.produce_request_bytes_max:
            raise BatchTooLarge(
                f"produce request carries {len(buf)} bytes of batches, more than the limit of "
                f"{limits.produce_request_bytes_max}: send fewer batches per request"
            )
        headers = validate_batches(buf, max_bytes=topic.config.max_message_bytes)
        base, last, index, term = part.propose(buf, headers)
        append_time_ms = time.time_ns() // 1_000_000
        tm = topic.metrics
        tm.records_in.inc(last - base + 1)
        tm.bytes_in.inc(len(buf))
        timeout_s = (timeout_ms or limits.produce_timeout_default_ms) / 1000
        if acks in _WAIT_FOR_COMMIT:
            await part.wait_committed(index, term, timeout_s)
        else:
            # acks=1 (and acks=0, whose client does not wait anyway): stored on the leader.
            await part.wait_persisted(index, term, timeout_s)
        return pb.ProduceResponse(
            base_offset=base,
            last_offset=last,
            log_start_offset=part.log_start_offset,
            append_time_ms=append_time_ms,
        )

    @rpc.stream("Fetch")
    async def Fetch(
        self, request: pb.FetchRequest, context: rpc.Context
    ) -> AsyncIterator[pb.FetchResponse]:
        self.guard.check(context, "Fetch", Resource.topic(request.topic))
        topic, part = self.registry.partition(request.topic, request.partition)
        if request.max_bytes < 0:
            raise InvalidRequest(
                f"max_bytes must be >= 0 (0 picks {limits.fetch_bytes_default}), got {request.max_bytes}"
            )
        max_bytes = min(request.max_bytes or limits.fetch_bytes_default, limits.fetch_bytes_max)
        wait_s = _ms(
            request.max_wait_ms,
            limits.fetch_wait_default_ms,
            limits.fetch_wait_max_ms,
            "max_wait_ms",
        )
        once = request.once
        offset = request.offset
        part.check_streaming()
        part.check_fetch_offset(offset)
        tm = topic.metrics
        while True:
            # Take the event before looking at the high watermark: a commit in between
            # sets this very event, so the wait below cannot miss it.
            changed = part.changed()
            part.check_streaming()
            hw = part.high_watermark
            if offset < hw:
                data = part.read(offset, max_bytes)
                if data:
                    first = read_header(data, 0)
                    last = read_header(data, last_batch_position(data))
                    next_offset = last.last_offset + 1
                    tm.records_out.inc(next_offset - first.base_offset)
                    tm.bytes_out.inc(len(data))
                    yield pb.FetchResponse(
                        batches=data,
                        high_watermark=hw,
                        log_start_offset=part.log_start_offset,
                        next_offset=next_offset,
                    )
                    offset = next_offset
                    if once:
                        return
                    continue
            try:
                async with asyncio.timeout(wait_s):
                    await changed.wait()
            except TimeoutError:
                part.check_streaming()
                yield pb.FetchResponse(
                    high_watermark=part.high_watermark,
                    log_start_offset=part.log_start_offset,
                    next_offset=offset,
                )
                if once:
                    return

    @rpc.unary("ListOffsets")
    async def ListOffsets(
        self, request: pb.ListOffsetsRequest, context: rpc.Context
    ) -> pb.ListOffsetsResponse:
        self.guard.check(context, "ListOffsets", Resource.topic(request.topic))
        _, part = self.registry.partition(request.topic, request.partition)
        part.check_serving()
        spec = request.spec
        timestamp_ms = -1
        if spec == pb.OFFSET_SPEC_LATEST:
            offset = part.high_watermark
        elif spec == pb.OFFSET_SPEC_EARLIEST:
            offset = part.log_start_offset
        elif spec == pb.OFFSET_SPEC_TIMESTAMP:
            offset, timestamp_ms = part.offset_for_timestamp(request.timestamp_ms)
        else:
            raise InvalidRequest(f"unknown offset spec {spec}: use LATEST, EARLIEST or TIMESTAMP")
        return pb.ListOffsetsResponse(
            offset=offset,
            timestamp_ms=timestamp_ms,
            log_start_offset=part.log_start_offset,
            high_watermark=part.high_watermark,
        )

    @rpc.unary("Metadata")
    async def Metadata(
        self, request: pb.MetadataRequest, context: rpc.Context
    ) -> pb.MetadataResponse:
        self.guard.check(context, "Metadata", CLUSTER)
        names = list(dict.fromkeys(request.topics))
        for name in names:
            validate_topic_name(name)
        topics = self.registry.topics(names or None)
        controller = self.controller
        return pb.MetadataResponse(
            nodes=node_infos(controller, self.identity),
            controller_id=controller.leader_id or -1,
            cluster_id=self.identity.cluster_id,
            topics=[
                pb.TopicMetadata(
                    name=t.name,
                    internal=t.name.startswith("__"),
                    partitions=[
                        pb.PartitionMetadata(
                            partition=a.partition,
                            leader=v.leader,
                            replicas=list(a.replicas),
                            in_sync=v.in_sync,
                            leader_term=v.term,
                        )
                        for a in t.record.partitions
                        for v in (self.registry.view(a),)
                    ],
                )
                for t in topics
            ],
        )


def node_infos(controller: Controller, me: NodeIdentity) -> list[pb.NodeInfo]:
    """The registered nodes (this one alone until it is registered)."""
    nodes = controller.state.nodes
    if not nodes:
        return [
            pb.NodeInfo(
                node_id=me.node_id,
                address=me.address,
                metrics_address=me.metrics_address,
                rack=me.rack,
                alive=True,
            )
        ]
    return [
        pb.NodeInfo(
            node_id=n.node_id,
            address=n.address,
            metrics_address=n.metrics_address,
            rack=n.rack or "",
            alive=n.alive,
        )
        for _, n in sorted(nodes.items())
    ]
