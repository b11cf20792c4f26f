"""The Broker gRPC service: Produce, Fetch, ListOffsets, Metadata.

The data path costs O(batches) per request, never O(records): a produce request's batches
are validated (header, CRC, column lengths) and appended as the producer's bytes with one
write; a fetch response is a slice of the log, sent as is. Record counts for metrics come
from offsets (they are contiguous per record), not from the records.
"""

from __future__ import annotations

import asyncio
import functools
import struct
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field

import tidelog
from tidelog.config import TopicConfig, validate_topic_name
from tidelog.errors import BatchTooLarge, InvalidRequest, StorageError
from tidelog.node import limits, rpc
from tidelog.node.auth import CLUSTER, Guard, Resource
from tidelog.node.controller_node import Controller
from tidelog.node.fetch_quota import FetchQuota, FetchQuotaLimits
from tidelog.node.group_coordinator import OFFSETS_TOPIC
from tidelog.node.idempotence import BatchPlan
from tidelog.node.identity import NodeIdentity
from tidelog.node.metrics import NodeMetrics
from tidelog.node.partition import Partition
from tidelog.node.producer_ids import ProducerIdAllocator
from tidelog.node.topics import Topic, TopicRegistry
from tidelog.node.trace import Tracer
from tidelog.records import (
    HEADER_SIZE,
    LENGTH_PREFIX_SIZE,
    BatchHeader,
    ProduceLimits,
    check_batches,
    read_header,
    scan_batches,
)
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


def _proposal_bytes(
    buf: bytes, plans: list[BatchPlan]
) -> tuple[bytes, list[tuple[int, BatchHeader]]]:
    """The bytes and (position, header) of the batches to propose: the request's own, or a
    new buffer when some are replaced (control batches standing for msg-id duplicates)."""
    if all(p.replacement is None for p in plans):
        return buf, [(p.pos, p.header) for p in plans]
    parts: list[bytes] = []
    positions: list[tuple[int, BatchHeader]] = []
    at = 0
    view = memoryview(buf)
    for p in plans:
        chunk = (
            p.replacement
            if p.replacement is not None
            else bytes(view[p.pos : p.pos + p.header.size])
        )
        positions.append((at, read_header(chunk, 0)))
        parts.append(chunk)
        at += len(chunk)
    return b"".join(parts), positions


def _ms(raw: int, default_ms: int, max_ms: int, what: str) -> float:
    """A request's millisecond field as seconds: 0 picks the default, negatives are refused."""
    if raw < 0:
        raise InvalidRequest(f"{what} must be >= 0 ms (0 picks {default_ms} ms), got {raw}")
    return min(raw or default_ms, max_ms) / 1000


class _Queue:
    """The produce requests of one partition waiting for their check in a worker thread; a
    FIFO lock, so they are proposed in the order they arrived."""

    __slots__ = ("lock", "users")

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.users = 0


@dataclass(slots=True)
class _Admitted:
    """What a produce request's proposal gave: one result per batch (duplicates carry their
    original offsets) and the (index, term) of the entries its answer waits for."""

    results: list[pb.BatchResult]
    waits: list[tuple[int, int]] = field(default_factory=list)
    #: ``waits[i]`` is batch ``i``'s entry, so a failure can say how many leading batches
    #: were stored (idempotent requests: a retry finds those as duplicates anyway).
    per_batch: bool = False


class BrokerService(pb_grpc.BrokerServicer):
    def __init__(
        self,
        registry: TopicRegistry,
        controller: Controller,
        identity: NodeIdentity,
        metrics: NodeMetrics,
        producer_ids: ProducerIdAllocator | None = None,
        *,
        guard: Guard | None = None,
        tracer: Tracer | None = None,
    ) -> None:
        #: Who may call what (node/auth.py); the default lets everyone do everything.
        self.guard = guard or Guard()
        #: Samples produce requests (--trace-sample; node/trace.py); None: off.
        self.tracer = tracer if tracer is not None and tracer.every else None
        self.registry = registry
        self.controller = controller
        self.identity = identity
        self.metrics = metrics
        self.producer_ids = producer_ids or ProducerIdAllocator(controller, identity.node_id)
        self.fetch_quota = FetchQuota(
            FetchQuotaLimits(
                streams_per_peer_max=limits.fetch_streams_per_peer_max,
                streams_per_node_max=limits.fetch_streams_per_node_max,
                buffered_bytes_per_peer_max=limits.fetch_buffered_bytes_per_peer_max,
                buffered_bytes_per_node_max=limits.fetch_buffered_bytes_per_node_max,
                grant_bytes_min=limits.fetch_grant_bytes_min,
            )
        )
        # Partitions (by group id) with produce requests checked in a worker thread.
        self._queued: dict[int, _Queue] = {}
        self._check_slots = asyncio.Semaphore(limits.produce_check_threads)

    @rpc.unary("InitProducerId")
    async def InitProducerId(
        self, request: pb.InitProducerIdRequest, context: rpc.Context
    ) -> pb.InitProducerIdResponse:
        self.guard.check(context, "InitProducerId", CLUSTER)
        existing = request.producer_id if request.HasField("producer_id") else None
        pid, epoch = await self.producer_ids.init(existing, request.producer_epoch)
        return pb.InitProducerIdResponse(producer_id=pid, producer_epoch=epoch)

    @rpc.unary("Produce")
    async def Produce(self, request: pb.ProduceRequest, context: rpc.Context) -> pb.ProduceResponse:
        self.guard.check(context, "Produce", Resource.topic(request.topic))
        if request.topic == OFFSETS_TOPIC:
            # Its records are the group coordinators' state: only they write it.
            raise InvalidRequest(
                f"{OFFSETS_TOPIC} is internal: commit offsets through the Group service"
            )
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
        timeout_s = (timeout_ms or limits.produce_timeout_default_ms) / 1000
        span = None if self.tracer is None else self.tracer.produce(topic.name, part.index)

        def propose(headers: list[tuple[int, BatchHeader]]) -> _Admitted:
            if part.idempotence.needs_ready_leader(headers):
                return self._admit_idempotent(topic, part, buf, headers)
            waits: list[tuple[int, int]] = []
            base, last, _index, _term = part.propose(
                buf, headers, lambda _i, _base, index, term: waits.append((index, term))
            )
            offset = base
            results = []
            for _, h in headers:
                results.append(
                    pb.BatchResult(base_offset=offset, last_offset=offset + h.record_count - 1)
                )
                offset += h.record_count
            tm = topic.metrics
            tm.records_in.inc(last - base + 1)
            tm.bytes_in.inc(len(buf))
            return _Admitted(results, waits, per_batch=True)

        admitted = await self._check_and_propose(part, topic.config, buf, propose)
        append_time_ms = time.time_ns() // 1_000_000
        if span is not None and admitted.waits:
            span.proposed = time.monotonic_ns()
            span.index = admitted.waits[-1][0]
            part.trace(span)
        if admitted.waits:
            # Each batch's entry, in request order: if a new leader overwrote a later one
            # while earlier ones committed, the answer says how many (batches_stored).
            await part.wait_batches(
                admitted.waits,
                committed=acks in _WAIT_FOR_COMMIT,
                timeout_s=timeout_s,
                per_batch=admitted.per_batch,
            )
        results = admitted.results
        if span is not None and self.tracer is not None and admitted.waits:
            self.tracer.finish(span)
        return pb.ProduceResponse(
            base_offset=results[0].base_offset,
            last_offset=results[-1].last_offset,
            log_start_offset=part.log_start_offset,
            append_time_ms=append_time_ms,
            results=results,
        )

    def _admit_idempotent(
        self,
        topic: Topic,
        part: Partition,
        buf: bytes,
        headers: list[tuple[int, BatchHeader]],
    ) -> _Admitted:
        """Batches with a producer id, or for a topic with a msg-id window: checked against the
        partition's idempotence state, then the new ones proposed. No await between the check
        and the propose: on the one event loop they are atomic, so two requests of one
        producer cannot both pass the check for the same sequence."""
        # The state must be the committed log's: a new leader first commits (and so applies)
        # what earlier terms left, or a retry from before the failover could pass as new.
        part.check_idempotence_ready()
        idem = part.idempotence
        plans = idem.admit(buf, headers, time.time_ns() // 1_000_000)
        proposing = [p for p in plans if p.proposes]
        offsets: dict[int, tuple[int, int]] = {}
        waits: list[tuple[int, int]] = [p.wait_for for p in plans if p.wait_for is not None]
        if proposing:
            data, positions = _proposal_bytes(buf, proposing)

            def on_proposed(i: int, base: int, index: int, term: int) -> None:
                plan = proposing[i]
                idem.proposed(plan, base, index, term)
                offsets[id(plan)] = (base, base + plan.header.record_count - 1)
                waits.append((index, term))

            part.propose(data, positions, on_proposed)
        tm = topic.metrics
        new = [p for p in proposing if p.replacement is None]
        tm.records_in.inc(sum(p.header.record_count for p in new))
        tm.bytes_in.inc(sum(p.header.size for p in new))
        results = []
        for p in plans:
            if p.duplicate_of is not None:
                base, last = p.duplicate_of
                results.append(pb.BatchResult(base_offset=base, last_offset=last, duplicate=True))
            else:
                base, last = offsets[id(p)]
                results.append(pb.BatchResult(base_offset=base, last_offset=last))
        return _Admitted(results, waits)

    async def _check_and_propose(
        self,
        part: Partition,
        config: TopicConfig,
        buf: bytes,
        propose: Callable[[list[tuple[int, BatchHeader]]], _Admitted],
    ) -> _Admitted:
        """Check the batches and propose them. The O(batches) part runs here and refuses a
        decompression bomb at once; the O(records) part runs here too when the request is
        small, else in a worker thread, so the event loop that drives Raft never spends more
        than a GIL slice on it. A partition's requests are proposed in arrival order either
        way: a small one waits behind a large one still being checked."""
        mmb = config.max_message_bytes
        lim = ProduceLimits(
            batch_bytes_max=mmb,
            batch_records_max=limits.batch_records_max,
            expanded_bytes_max=limits.produce_expanded_bytes_max(mmb),
        )
        scan = scan_batches(buf, lim)
        now_ms = time.time_ns() // 1_000_000
        check = functools.partial(
            check_batches,
            buf,
            scan,
            lim,
            timestamp_min_ms=now_ms - config.timestamp_before_max_ms,
            timestamp_max_ms=now_ms + config.timestamp_after_max_ms,
            keys_required_by=part.topic if config.compacted else None,
        )
        gid = part.group_id
        if scan.check_bytes <= limits.produce_inline_check_bytes_max and gid not in self._queued:
            check()
            return propose(scan.headers)
        lock = self._queued.get(gid)
        if lock is None:
            lock = self._queued[gid] = _Queue()
        lock.users += 1
        try:
            async with lock.lock:
                async with self._check_slots:
                    await asyncio.to_thread(check)
                return propose(scan.headers)
        finally:
            lock.users -= 1
            if not lock.users:
                del self._queued[gid]

    @rpc.stream("Fetch")
    async def Fetch(  # type: ignore[override]  # written by rpc.stream, see there
        self, request: pb.FetchRequest, context: rpc.Context
    ) -> AsyncGenerator[pb.FetchResponse, None]:
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
        follower = request.allow_follower
        part.check_reading(follower)
        part.check_fetch_offset(offset, follower=follower and not part.serving)
        tm = topic.metrics
        quota = self.fetch_quota
        peer = context.peer() or "unknown"
        quota.open(peer)
        try:
            while True:
                # Take the event before looking at the high watermark: a commit in between
                # sets this very event, so the wait below cannot miss it.
                changed = part.changed()
                part.check_reading(follower)
                if offset < part.high_watermark:
                    # The response's bytes are reserved before it is read and returned once
                    # gRPC took it (the generator resumes after the write): see fetch_quota.
                    held = await quota.reserve(peer, max_bytes)
                    try:
                        part.check_reading(follower)
                        hw = part.high_watermark
                        data = part.read(offset, held)
                        quota.adjust(peer, held, len(data))
                        held = len(data)
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
                    finally:
                        quota.release(peer, held)
                try:
                    async with asyncio.timeout(wait_s):
                        await changed.wait()
                except TimeoutError:
                    part.check_reading(follower)
                    yield pb.FetchResponse(
                        high_watermark=part.high_watermark,
                        log_start_offset=part.log_start_offset,
                        next_offset=offset,
                    )
                    if once:
                        return
        finally:
            quota.close(peer)

    @rpc.unary("ListOffsets")
    async def ListOffsets(
        self, request: pb.ListOffsetsRequest, context: rpc.Context
    ) -> pb.ListOffsetsResponse:
        self.guard.check(context, "ListOffsets", Resource.topic(request.topic))
        _, part = self.registry.partition(request.topic, request.partition)
        part.check_serving()
        if request.linearizable:
            # Confirm leadership with a majority first: a deposed leader (paused, cut off)
            # fails here instead of answering from its stale view.
            await part.read_barrier(limits.read_barrier_timeout_ms / 1000)
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
            controller_waiting=controller.waiting,
            cluster_id=self.identity.cluster_id,
            server_version=tidelog.__version__,
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
