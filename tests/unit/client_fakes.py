"""An in-process fake Broker service for client tests that need failures on demand.

It keeps each partition as a plain list of records, answers Metadata, Produce, Fetch and
ListOffsets like a one-node cluster, and lets a test decide per Produce request or per
Fetch stream whether to fail and with which TidelogError. The real node is exercised by
the integration tests; this one exists to make leader changes and timeouts deterministic.

:class:`FakeReplicatedCluster` runs several such brokers as the nodes of one cluster that
share every partition's log, with a leader per partition that a test moves, announces in
Metadata late or never, or takes down: the failovers a client must follow.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import grpc
from grpc import aio

from tests.support import free_port
from tidelog.errors import (
    LeaderNotAvailable,
    NodeUnavailable,
    NotLeader,
    OffsetOutOfRange,
    OutOfOrderSequence,
    ProducerFenced,
    TidelogError,
    UnknownProducerId,
    UnknownTopic,
    trailing_metadata,
)
from tidelog.records import Record, decode_batches, encode_batch, iter_headers, validate_batches
from tidelog.v1 import admin_pb2, admin_pb2_grpc, broker_pb2, broker_pb2_grpc

Context = aio.ServicerContext[Any, Any]

#: (request number, request) -> an error to answer with, or None to serve it.
ProduceFault = Callable[[int, broker_pb2.ProduceRequest], TidelogError | None]
#: (stream number, responses sent so far on it) -> an error to end the stream with, or None.
FetchFault = Callable[[int, int], TidelogError | None]


#: Batches a partition remembers per producer (as the node: node/producer_state.py).
FAKE_BATCHES_KEPT = 5
SEQUENCE_MOD = 2**31


@dataclass
class FakeProducerEntry:
    epoch: int
    #: (first sequence, last sequence, base offset, last offset) of the last batches.
    batches: list[tuple[int, int, int, int]] = field(default_factory=list)


@dataclass
class FakeProducers:
    """The idempotence state of a fake cluster, by the node's rules (Kafka's): producer ids
    handed out, and per (topic, partition, producer id) the epoch and the last batches."""

    next_id: int = 1000
    entries: dict[tuple[str, int, int], FakeProducerEntry] = field(default_factory=dict)
    init_requests: int = 0
    #: What each stamped batch met: "accept", "duplicate", or the refusal's reason.
    verdicts: Counter[str] = field(default_factory=Counter)
    #: (partition, producer id, epoch, base sequence, records) of every stamped batch seen.
    seen: list[tuple[int, int, int, int, int]] = field(default_factory=list)

    def new_id(self) -> int:
        self.init_requests += 1
        self.next_id += 1
        return self.next_id

    def forget(self, topic: str, partition: int) -> None:
        """Expire every producer of the partition (producer.id.expiration.ms passed)."""
        for key in [k for k in self.entries if k[:2] == (topic, partition)]:
            del self.entries[key]

    def check(
        self, topic: str, partition: int, pid: int, epoch: int, seq: int, count: int
    ) -> TidelogError | tuple[int, int] | None:
        """An error, the original (base, last) offsets of a duplicate, or None to append."""
        self.seen.append((partition, pid, epoch, seq, count))
        last = (seq + count - 1) % SEQUENCE_MOD
        entry = self.entries.get((topic, partition, pid))
        verdict: TidelogError | tuple[int, int] | None = None
        if entry is None:
            if seq != 0:
                verdict = UnknownProducerId(f"unknown producer {pid}", producer_id=str(pid))
        elif epoch < entry.epoch:
            verdict = ProducerFenced(f"producer {pid} epoch {epoch} is fenced")
        elif epoch > entry.epoch:
            if seq != 0:
                verdict = OutOfOrderSequence(f"new epoch must start at 0, got {seq}")
        else:
            dup = next((b for b in entry.batches if b[:2] == (seq, last)), None)
            if dup is not None:
                verdict = (dup[2], dup[3])
            elif not entry.batches or seq != (entry.batches[-1][1] + 1) % SEQUENCE_MOD:
                expected = (entry.batches[-1][1] + 1) % SEQUENCE_MOD if entry.batches else 0
                verdict = OutOfOrderSequence(
                    f"expected sequence {expected}, got {seq}",
                    producer_id=str(pid),
                    expected_sequence=str(expected),
                    received_sequence=str(seq),
                )
        if isinstance(verdict, TidelogError):
            self.verdicts[verdict.reason] += 1
        else:
            self.verdicts["duplicate" if verdict is not None else "accept"] += 1
        return verdict

    def stored(
        self, topic: str, partition: int, pid: int, epoch: int, seq: int, count: int, base: int
    ) -> None:
        key = (topic, partition, pid)
        entry = self.entries.get(key)
        if entry is None or epoch > entry.epoch:
            entry = self.entries[key] = FakeProducerEntry(epoch)
        entry.batches.append((seq, (seq + count - 1) % SEQUENCE_MOD, base, base + count - 1))
        del entry.batches[:-FAKE_BATCHES_KEPT]


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
    #: Per request number, a delay before serving it (overrides produce_delay_s).
    produce_delay_fn: Callable[[int], float] | None = None
    #: Sequence refusals are answered this long after the node decided them (an answer
    #: overtaken by the answer of a request the node served later).
    refusal_delay_s: float = 0.0
    #: An error to answer with AFTER the batches were appended: a lost answer.
    answer_fault: ProduceFault | None = None
    producers: FakeProducers = field(default_factory=FakeProducers)
    #: An error every InitProducerId call answers with (a node without idempotence).
    init_fault: TidelogError | None = None
    #: Produce requests being served right now, and the most at once.
    serving: int = 0
    serving_max: int = 0

    def _delay_s(self, number: int) -> float:
        if self.produce_delay_fn is not None:
            return self.produce_delay_fn(number)
        return self.produce_delay_s

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
        self.serving += 1
        self.serving_max = max(self.serving_max, self.serving)
        try:
            delay_s = self._delay_s(number)
            if delay_s:
                await asyncio.sleep(delay_s)
            return await self._produce(number, request, context)
        finally:
            self.serving -= 1

    async def InitProducerId(
        self, request: broker_pb2.InitProducerIdRequest, context: Context
    ) -> broker_pb2.InitProducerIdResponse:
        if self.init_fault is not None:
            await self._abort(context, self.init_fault)
        if request.HasField("producer_id"):  # the same id, its epoch bumped
            self.producers.init_requests += 1
            return broker_pb2.InitProducerIdResponse(
                producer_id=request.producer_id, producer_epoch=request.producer_epoch + 1
            )
        return broker_pb2.InitProducerIdResponse(producer_id=self.producers.new_id())

    async def _produce(
        self, number: int, request: broker_pb2.ProduceRequest, context: Context
    ) -> broker_pb2.ProduceResponse:
        err = self.produce_fault(number, request) if self.produce_fault else None
        if err is None and request.topic not in self.topics:
            err = UnknownTopic(f"unknown topic {request.topic!r}")
        if err is not None:
            await self._abort(context, err)
        validate_batches(request.batches)
        log = self.log(request.topic, request.partition)
        base = len(log)
        buf = bytearray(request.batches)
        results: list[broker_pb2.BatchResult] = []
        for pos, h in iter_headers(bytes(buf)):
            if h.producer_id >= 0:
                verdict = self.producers.check(
                    request.topic,
                    request.partition,
                    h.producer_id,
                    h.producer_epoch,
                    h.base_sequence,
                    h.record_count,
                )
                if isinstance(verdict, TidelogError):
                    if self.refusal_delay_s:
                        await asyncio.sleep(self.refusal_delay_s)
                    await self._abort(context, verdict)
                elif verdict is not None:
                    results.append(
                        broker_pb2.BatchResult(
                            base_offset=verdict[0], last_offset=verdict[1], duplicate=True
                        )
                    )
                    continue
                self.producers.stored(
                    request.topic,
                    request.partition,
                    h.producer_id,
                    h.producer_epoch,
                    h.base_sequence,
                    h.record_count,
                    len(log),
                )
            # Stamp offsets the way the node does (outside the CRC).
            first = len(log)
            buf[pos : pos + 8] = first.to_bytes(8, "little", signed=True)
            log.extend(decode_batches(bytes(buf[pos : pos + h.size])))
            results.append(broker_pb2.BatchResult(base_offset=first, last_offset=len(log) - 1))
        lost = self.answer_fault(number, request) if self.answer_fault else None
        if lost is not None:
            await self._abort(context, lost)
        return broker_pb2.ProduceResponse(
            base_offset=results[0].base_offset if results else base,
            last_offset=results[-1].last_offset if results else len(log) - 1,
            results=results,
        )

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
            fault = self._stream_fault(request, stream, sent)
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

    def _stream_fault(
        self, request: broker_pb2.FetchRequest, stream: int, sent: int
    ) -> TidelogError | None:
        return self.fetch_fault(stream, sent) if self.fetch_fault else None

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


#: What a NOT_LEADER answer of a FakeReplicatedCluster names: the leader's id and address
#: (as the node does), only its address, or nothing.
Hints = Literal["id_and_address", "address", "none"]


@dataclass
class FakeNode(FakeBroker):
    """One node of a :class:`FakeReplicatedCluster`: serves a partition only while it leads
    it, and answers like a dead node (UNAVAILABLE without a tidelog error, as a refused
    connection does) while ``down``."""

    node_id: int = 1
    cluster: FakeReplicatedCluster | None = None
    down: bool = False
    #: Metadata answers after this many seconds (a node that accepts but does not answer).
    metadata_delay_s: float = 0.0
    #: Cleared while the node is paused (SIGSTOP): requests wait, then get the answer of
    #: the moment they are served (NOT_LEADER once another node leads), like a stale leader.
    running: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.running.set()

    def _cluster(self) -> FakeReplicatedCluster:
        assert self.cluster is not None
        return self.cluster

    async def _abort(self, context: Context, err: TidelogError) -> None:
        if isinstance(err, NodeUnavailable):
            await context.abort(grpc.StatusCode.UNAVAILABLE, err.message)
        await super()._abort(context, err)

    async def Metadata(
        self, request: broker_pb2.MetadataRequest, context: Context
    ) -> broker_pb2.MetadataResponse:
        c = self._cluster()
        c.metadata_requests[self.node_id] += 1
        if self.down:
            await self._abort(context, NodeUnavailable("fake node is down"))
        if self.metadata_delay_s:
            await asyncio.sleep(self.metadata_delay_s)
        names = list(request.topics) or sorted(c.topics)
        for name in names:
            if name not in c.topics:
                await self._abort(context, UnknownTopic(f"unknown topic {name!r}"))
        replicas = sorted(c.nodes)
        return broker_pb2.MetadataResponse(
            nodes=[
                broker_pb2.NodeInfo(node_id=i, address=n.address, alive=True)
                for i, n in sorted(c.nodes.items())
            ],
            controller_id=1,
            cluster_id="fake",
            topics=[
                broker_pb2.TopicMetadata(
                    name=name,
                    partitions=[
                        broker_pb2.PartitionMetadata(
                            partition=p,
                            leader=c.announced_leader(name, p),
                            replicas=replicas,
                            in_sync=replicas,
                            leader_term=c.term(name, p),
                        )
                        for p in range(c.topics[name])
                    ],
                )
                for name in names
            ],
        )

    async def Produce(
        self, request: broker_pb2.ProduceRequest, context: Context
    ) -> broker_pb2.ProduceResponse:
        c = self._cluster()
        c.produce_requests[self.node_id] += 1
        number = self.produce_requests
        self.produce_requests += 1
        # The leadership check comes after the delay: a request held by a slow or paused
        # node is refused if the leader moved meanwhile, as a deposed node refuses it.
        delay_s = self._delay_s(number)
        if delay_s:
            await asyncio.sleep(delay_s)
        await self.running.wait()
        err = c.check(self, request.topic, request.partition)
        if err is not None:
            await self._abort(context, err)
        return await self._produce(number, request, context)

    async def Fetch(
        self, request: broker_pb2.FetchRequest, context: Context
    ) -> AsyncIterator[broker_pb2.FetchResponse]:
        self._cluster().fetch_streams[self.node_id] += 1
        async for resp in super().Fetch(request, context):
            yield resp

    def _stream_fault(
        self, request: broker_pb2.FetchRequest, stream: int, sent: int
    ) -> TidelogError | None:
        return self._cluster().check(self, request.topic, request.partition)

    async def ListOffsets(
        self, request: broker_pb2.ListOffsetsRequest, context: Context
    ) -> broker_pb2.ListOffsetsResponse:
        err = self._cluster().check(self, request.topic, request.partition)
        if err is not None:
            await self._abort(context, err)
        return await super().ListOffsets(request, context)


class FakeAdmin(admin_pb2_grpc.AdminServicer):
    """DescribeTopics as a real node answers it: the log figures of its own replica, exact
    on the leader, 0 elsewhere (every fake node holds every replica, so "elsewhere" is any
    node that does not lead the partition)."""

    def __init__(self, cluster: FakeReplicatedCluster, node_id: int) -> None:
        self.cluster = cluster
        self.node_id = node_id
        self.describe_requests = 0

    async def DescribeTopics(
        self, request: admin_pb2.DescribeTopicsRequest, context: Context
    ) -> admin_pb2.DescribeTopicsResponse:
        self.describe_requests += 1
        c = self.cluster
        names = list(request.names) or sorted(c.topics)
        replicas = sorted(c.nodes)
        topics = []
        for name in names:
            parts = []
            for p in range(c.topics[name]):
                leads = c.leader(name, p) == self.node_id
                n = len(c.log(name, p)) if leads else 0
                parts.append(
                    admin_pb2.PartitionDescription(
                        partition=p,
                        leader=c.announced_leader(name, p),
                        replicas=replicas,
                        in_sync=replicas,
                        log_start_offset=0,
                        high_watermark=n,
                        size_bytes=n * 10,
                        leader_term=c.term(name, p),
                    )
                )
            topics.append(
                admin_pb2.TopicDescription(
                    name=name, replication_factor=len(replicas), partitions=parts
                )
            )
        return admin_pb2.DescribeTopicsResponse(topics=topics)

    async def CreateTopics(
        self, request: admin_pb2.CreateTopicsRequest, context: Context
    ) -> admin_pb2.CreateTopicsResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "the fake cluster's topics are fixed")
        raise AssertionError("unreachable")

    async def DeleteTopics(
        self, request: admin_pb2.DeleteTopicsRequest, context: Context
    ) -> admin_pb2.DeleteTopicsResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "the fake cluster's topics are fixed")
        raise AssertionError("unreachable")

    async def AlterTopicConfig(
        self, request: admin_pb2.AlterTopicConfigRequest, context: Context
    ) -> admin_pb2.AlterTopicConfigResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "the fake cluster has no configs")
        raise AssertionError("unreachable")

    async def CreatePartitions(
        self, request: admin_pb2.CreatePartitionsRequest, context: Context
    ) -> admin_pb2.CreatePartitionsResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "the fake cluster's topics are fixed")
        raise AssertionError("unreachable")

    async def DescribeCluster(
        self, request: admin_pb2.DescribeClusterRequest, context: Context
    ) -> admin_pb2.DescribeClusterResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "the fake cluster's shape is fixed")
        raise AssertionError("unreachable")

    async def DrainNode(
        self, request: admin_pb2.DrainNodeRequest, context: Context
    ) -> admin_pb2.DrainNodeResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "the fake cluster's shape is fixed")
        raise AssertionError("unreachable")

    async def RemoveNode(
        self, request: admin_pb2.RemoveNodeRequest, context: Context
    ) -> admin_pb2.RemoveNodeResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "the fake cluster's shape is fixed")
        raise AssertionError("unreachable")

    async def ReassignPartition(
        self, request: admin_pb2.ReassignPartitionRequest, context: Context
    ) -> admin_pb2.ReassignPartitionResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "the fake cluster's shape is fixed")
        raise AssertionError("unreachable")

    async def GetClusterConfig(
        self, request: admin_pb2.GetClusterConfigRequest, context: Context
    ) -> admin_pb2.GetClusterConfigResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "the fake cluster's shape is fixed")
        raise AssertionError("unreachable")

    async def SetClusterConfig(
        self, request: admin_pb2.SetClusterConfigRequest, context: Context
    ) -> admin_pb2.SetClusterConfigResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "the fake cluster's shape is fixed")
        raise AssertionError("unreachable")

    async def ForceRecoverPartition(
        self, request: admin_pb2.ForceRecoverPartitionRequest, context: Context
    ) -> admin_pb2.ForceRecoverPartitionResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "the fake cluster's shape is fixed")
        raise AssertionError("unreachable")

    async def ForceRecoverController(
        self, request: admin_pb2.ForceRecoverControllerRequest, context: Context
    ) -> admin_pb2.ForceRecoverControllerResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "the fake cluster's shape is fixed")
        raise AssertionError("unreachable")


class FakeReplicatedCluster:
    """``async with FakeReplicatedCluster({"t": 1}, nodes=3) as fc: ...fc.bootstrap...``

    Node 1 leads every partition until :meth:`move_leader` says otherwise; the leader that
    Metadata announces may lag behind the real one (``announce=False``) or be -1 (none).
    """

    def __init__(self, topics: dict[str, int], nodes: int = 3, *, hints: Hints = "id_and_address"):
        self.topics = dict(topics)
        self.logs: dict[tuple[str, int], list[Record]] = {}
        self.hints: Hints = hints
        self.leaders: dict[tuple[str, int], int] = {}
        self.announced: dict[tuple[str, int], int] = {}
        self.terms: dict[tuple[str, int], int] = {}
        self.produce_requests: Counter[int] = Counter()
        self.metadata_requests: Counter[int] = Counter()
        self.fetch_streams: Counter[int] = Counter()
        #: Shared by every node, as the partitions' replicated producer state is.
        self.producers = FakeProducers()
        ports: list[int] = []
        while len(ports) < nodes:
            port = free_port()
            if port not in ports:
                ports.append(port)
        self.nodes: dict[int, FakeNode] = {
            i: FakeNode(
                f"127.0.0.1:{port}",
                self.topics,
                self.logs,
                producers=self.producers,
                node_id=i,
                cluster=self,
            )
            for i, port in enumerate(ports, start=1)
        }
        self._servers: dict[int, aio.Server] = {}

    @property
    def bootstrap(self) -> str:
        return ",".join(n.address for _, n in sorted(self.nodes.items()))

    def address(self, node_id: int) -> str:
        return self.nodes[node_id].address

    def log(self, topic: str, partition: int) -> list[Record]:
        return self.logs.setdefault((topic, partition), [])

    def leader(self, topic: str, partition: int) -> int:
        return self.leaders.get((topic, partition), 1)

    def announced_leader(self, topic: str, partition: int) -> int:
        return self.announced.get((topic, partition), self.leader(topic, partition))

    def move_leader(
        self, topic: str, partition: int, node_id: int, *, announce: bool = True
    ) -> None:
        """Make ``node_id`` (-1: nobody) the leader; Metadata tells only if ``announce``."""
        key = (topic, partition)
        if not announce and key not in self.announced:
            self.announced[key] = self.leader(topic, partition)
        self.leaders[key] = node_id
        if node_id >= 0:
            self.terms[key] = self.term(topic, partition) + 1
        if announce:
            self.announced[key] = node_id

    def term(self, topic: str, partition: int) -> int:
        """The partition's leader term: 1, and one more with every move to a new leader."""
        return self.terms.get((topic, partition), 1)

    def check(self, node: FakeNode, topic: str, partition: int) -> TidelogError | None:
        """The error ``node`` answers a request for the partition with, if any."""
        if node.down:
            return NodeUnavailable("fake node is down")
        if topic not in self.topics:
            return UnknownTopic(f"unknown topic {topic!r}")
        leader = self.leader(topic, partition)
        if leader == node.node_id:
            return None
        if leader < 1:
            return LeaderNotAvailable(f"{topic}/{partition}: no leader right now")
        message = f"{topic}/{partition}: node {node.node_id} is not the leader"
        if self.hints == "none":
            return NotLeader(message)
        address = self.address(leader)
        if self.hints == "address":
            return NotLeader(message, leader_address=address)
        return NotLeader(message, leader_id=str(leader), leader_address=address)

    async def __aenter__(self) -> FakeReplicatedCluster:
        for node_id, node in self.nodes.items():
            server = aio.server()
            broker_pb2_grpc.add_BrokerServicer_to_server(node, server)
            admin_pb2_grpc.add_AdminServicer_to_server(FakeAdmin(self, node_id), server)
            server.add_insecure_port(node.address)
            await server.start()
            self._servers[node_id] = server
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.gather(*(s.stop(grace=None) for s in self._servers.values()))


__all__ = [
    "FakeAdmin",
    "FakeBroker",
    "FakeCluster",
    "FakeNode",
    "FakeProducers",
    "FakeReplicatedCluster",
    "Hints",
    "free_port",
]
