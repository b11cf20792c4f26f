"""A hostile client against the node-to-node services of a real 3-node cluster (issue 9, A3
and A5): plain gRPC stubs from tidelog/v1 and hand-made RaftBatch bytes, the way the probes
of the issue were made. Each attack changed data, terms or metrics on the code before the
Raft checks (raft_codec bounds, transport peers, raft/guard.py, registration identity); each
test asserts it is refused and that the partition's data, the Raft state of every replica and
the controller's view of the nodes are exactly as before.

The cluster runs without node authentication (its internal listeners on loopback), so these
tests reach the Raft layer's own checks, the defence behind authentication: a forger that
holds no certificate or secret is refused before any of this by node/internal_auth.py
(tests/integration/test_node_auth.py), and one that holds a node's is refused when it claims
another node's id. The Raft and Cluster services are reached on the internal listener.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import struct
import urllib.request
from collections.abc import AsyncIterator, Iterator

import grpc
import pytest
from grpc import aio

from tests.support.nodeproc import Cluster, Node, spawn_cluster, until
from tidelog.controller.commands import Command, MarkNodeDead, RegisterNode, encode_command
from tidelog.records import decode_batches, encode_batch, stamp
from tidelog.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    broker_pb2,
    cluster_pb2,
    cluster_pb2_grpc,
    raft_pb2,
)

pytestmark = pytest.mark.integration

NODES = (1, 2, 3)
TOPIC = "hostile"
#: A topic with replicas on two nodes only, for a sender that is a peer but not a member.
PAIR_TOPIC = "hostile-pair"
RECORDS = 20
STREAM_METHOD = "/tidelog.v1.Raft/Stream"
#: How long forged messages get to do harm before the state is compared (several
#: heartbeats and election timeouts).
SETTLE_S = 2.5
KIND = raft_pb2.RaftMessageKind


def internal_address(node: Node) -> str:
    """Where a node serves Raft and Cluster: its internal listener (the client port answers
    them UNIMPLEMENTED)."""
    return node.internal_address


@pytest.fixture(scope="module")
def procs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[int, Node]]:
    nodes = spawn_cluster(tmp_path_factory.mktemp("hostile"), NODES, security="none")
    try:
        yield nodes
    finally:
        for n in nodes.values():
            n.kill()


@pytest.fixture
async def cluster(procs: dict[int, Node]) -> AsyncIterator[Cluster]:
    c = Cluster(procs, TOPIC)
    await c.wait_all_alive()
    md = await c.metadata(1)
    assert md is not None
    if TOPIC not in {t.name for t in md.topics}:
        admin = admin_pb2_grpc.AdminStub(c.channel(1))
        # These tests compare terms and leaders before and after forged messages: the
        # controller's balancing must not move leaders meanwhile.
        await admin.SetClusterConfig(
            admin_pb2.SetClusterConfigRequest(
                set={"leader.balance.enable": "false", "replica.balance.enable": "false"}
            ),
            timeout=30,
        )
        await admin.CreateTopics(
            admin_pb2.CreateTopicsRequest(
                topics=[
                    admin_pb2.TopicSpec(name=TOPIC, partitions=1, replication_factor=3),
                    admin_pb2.TopicSpec(name=PAIR_TOPIC, partitions=1, replication_factor=2),
                ]
            ),
            timeout=30,
        )

        async def led() -> bool:
            return len(await c.leaders()) == 1

        await until("the partition has a leader", led)
        for i in range(RECORDS):
            await produce(c, b"r%d" % i)
    yield c
    await c.close()


async def produce(c: Cluster, value: bytes, topic: str = TOPIC) -> int:
    for _ in range(100):
        md = await c.metadata(1)
        assert md is not None
        [t] = [t for t in md.topics if t.name == topic]
        leader = t.partitions[0].leader
        if leader > 0:
            try:
                resp = await c.broker(leader).Produce(
                    broker_pb2.ProduceRequest(
                        topic=topic, partition=0, batches=encode_batch([value]),
                        acks=broker_pb2.ACKS_ALL,
                    ),
                    timeout=10,
                )  # fmt: skip
                return resp.base_offset
            except grpc.RpcError:
                pass
        await asyncio.sleep(0.1)
    raise AssertionError(f"no leader of {topic} took a write")


async def read_all(c: Cluster) -> list[bytes | None]:
    """Every record of the partition, fetched from its leader."""
    leaders = await c.leaders()
    stream = c.broker(leaders[0]).Fetch(
        broker_pb2.FetchRequest(topic=TOPIC, partition=0, offset=0, once=True), timeout=10
    )
    out: list[bytes | None] = []
    async for resp in stream:
        out += [r.value for r in decode_batches(resp.batches)]
    return out


async def raft_state(c: Cluster) -> dict[int, tuple[object, ...]]:
    """What a forgery could change, per node: the replica's data (CRC-32C of its committed
    log, log start, high watermark) and Raft state (term, commit, leader), and the nodes as
    that node's controller state reports them."""
    out: dict[int, tuple[object, ...]] = {}
    for node in NODES:
        d = (await c.digests(node))[0]
        md = await c.metadata(node)
        assert md is not None
        nodes = sorted((n.node_id, n.address, n.alive) for n in md.nodes)
        out[node] = (d.crc32c, d.log_start_offset, d.high_watermark, d.term, d.commit_index,
                     d.leader, tuple(nodes))  # fmt: skip
    return out


async def settled_state(c: Cluster) -> dict[int, tuple[object, ...]]:
    """The state once every replica has the leader's commit (heartbeats carry it)."""
    state: dict[int, tuple[object, ...]] = {}

    async def same() -> bool:
        nonlocal state
        state = await raft_state(c)
        return len({(s[0], s[2], s[3], s[4], s[5]) for s in state.values()}) == 1

    await until("every replica agrees", same)
    return state


async def send_raw(node: Node, *batches: bytes) -> grpc.StatusCode:
    """Write ``batches`` on one Raft stream to ``node``; the status the stream ends with."""
    async with aio.insecure_channel(internal_address(node)) as channel:
        call = channel.stream_unary(STREAM_METHOD, None, None)(None)
        try:
            for b in batches:
                await call.write(b)
            await call.done_writing()
            await call
        except aio.AioRpcError as exc:
            return exc.code()
        except asyncio.InvalidStateError:  # the server ended the stream while we wrote
            pass
        try:
            await call
        except aio.AioRpcError as exc:
            return exc.code()
        return grpc.StatusCode.OK


def batch(frm: int, to: int, cluster_id: str, *messages: raft_pb2.GroupMessage) -> bytes:
    b = raft_pb2.RaftBatch(from_node=frm, to_node=to, cluster_id=cluster_id)
    b.messages.extend(messages)
    return b.SerializeToString()


async def cluster_id(c: Cluster) -> str:
    md = await c.metadata(1)
    assert md is not None
    return md.cluster_id


def refused(node: Node, name: str, reason: str) -> float:
    text = metrics_text(node)
    m = re.search(rf'^{name}_total{{reason="{reason}"}} (\S+)$', text, re.MULTILINE)
    return float(m.group(1)) if m else 0.0


def metrics_text(node: Node) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{node.metrics_port}/metrics", timeout=5) as r:
        text: str = r.read().decode()
    return text


def forged_record(term: int, index: int) -> bytes:
    buf = bytearray(encode_batch([b"injected"]))
    stamp(buf, 0, RECORDS + 100, term, index)
    return bytes(buf)


def snapshot_data(log_start: int) -> bytes:
    """A partition snapshot as node/replica_storage.py encodes one (format 1, log start)."""
    return struct.pack(">BQ", 1, log_start)


# ---- the attacks -----------------------------------------------------------------------------


def append(group: int, frm: int, to: int, term: int, index: int) -> raft_pb2.GroupMessage:
    """An APPEND that extends the log at ``index`` by one committed record (the forged batch
    is well formed and stamped, as the issue's probe was)."""
    return raft_pb2.GroupMessage(
        group=group, kind=KIND.RAFT_MESSAGE_KIND_APPEND, from_node=frm, to_node=to, term=term,
        log_term=term - 1, index=index, commit=index + 1,
        entries=[raft_pb2.RaftEntry(term=term, index=index + 1,
                                    data=forged_record(term, index + 1))],
    )  # fmt: skip


@pytest.mark.timeout(120)
async def test_forged_append_from_a_non_member_is_dropped(cluster: Cluster) -> None:
    c = cluster
    before = await settled_state(c)
    cid = await cluster_id(c)
    d = (await c.digests(1))[0]
    unknown = {n: refused(c.nodes[n], "tidelog_raft_batches_refused", "unknown_peer")
               for n in NODES}  # fmt: skip
    for to in NODES:
        for term in (d.term + 1, d.term + 5):
            forged = append(d.group, 99, to, term, d.commit_index)
            assert await send_raw(c.nodes[to], batch(99, to, cid, forged)) == grpc.StatusCode.OK
    await asyncio.sleep(SETTLE_S)
    assert await settled_state(c) == before
    assert await read_all(c) == [b"r%d" % i for i in range(RECORDS)]
    for n in NODES:
        assert refused(c.nodes[n], "tidelog_raft_batches_refused", "unknown_peer") > unknown[n]


@pytest.mark.timeout(120)
async def test_forged_append_from_a_peer_outside_the_group_is_dropped(cluster: Cluster) -> None:
    """Node 99 is no peer; a node of the cluster that holds no replica of the partition is a
    peer, and the group's configuration check drops what it claims to send."""
    c = cluster
    md = await c.metadata(1)
    assert md is not None
    [pair] = [t for t in md.topics if t.name == PAIR_TOPIC]
    members = sorted(pair.partitions[0].replicas)
    [outsider] = set(NODES) - set(members)
    cid = await cluster_id(c)
    c_pair = Cluster(c.nodes, PAIR_TOPIC)
    try:
        before = {n: (await c_pair.digests(n))[0] for n in members}
        not_member = {n: refused(c.nodes[n], "tidelog_raft_messages_refused", "not_member")
                      for n in members}  # fmt: skip
        for to in members:
            d = before[to]
            forged = append(d.group, outsider, to, d.term + 1, d.commit_index)
            code = await send_raw(c.nodes[to], batch(outsider, to, cid, forged))
            assert code == grpc.StatusCode.OK
        await asyncio.sleep(SETTLE_S)
        for n in members:
            after = (await c_pair.digests(n))[0]
            assert (after.crc32c, after.high_watermark, after.term, after.leader) == (
                before[n].crc32c, before[n].high_watermark, before[n].term, before[n].leader
            )  # fmt: skip
            assert (
                refused(c.nodes[n], "tidelog_raft_messages_refused", "not_member") > (not_member[n])
            )
    finally:
        await c_pair.close()


@pytest.mark.timeout(120)
async def test_forged_snapshot_from_a_non_leader_is_dropped(cluster: Cluster) -> None:
    c = cluster
    before = await settled_state(c)
    cid = await cluster_id(c)
    d = (await c.digests(1))[0]
    followers = [n for n in NODES if n != d.leader]
    snap = raft_pb2.RaftSnapshot(
        meta=raft_pb2.RaftSnapshotMeta(
            index=5000, term=d.term, conf=raft_pb2.RaftConfState(voters=list(NODES))
        ),
        data=snapshot_data(5000),
    )
    not_leader = sum(refused(c.nodes[n], "tidelog_raft_messages_refused", "not_leader")
                     for n in NODES)  # fmt: skip
    for to in NODES:
        # From a member that does not lead, in the current term and in the next one, and
        # from a node that is no peer at all.
        frm = next(n for n in followers if n != to)
        for sender, term in ((frm, d.term), (frm, d.term + 1), (99, d.term + 1)):
            forged = raft_pb2.GroupMessage(
                group=d.group, kind=KIND.RAFT_MESSAGE_KIND_SNAPSHOT, from_node=sender,
                to_node=to, term=term, snapshot=snap,
            )  # fmt: skip
            code = await send_raw(c.nodes[to], batch(sender, to, cid, forged))
            assert code == grpc.StatusCode.OK
    await asyncio.sleep(SETTLE_S)
    assert await settled_state(c) == before
    assert await read_all(c) == [b"r%d" % i for i in range(RECORDS)]
    after = sum(refused(c.nodes[n], "tidelog_raft_messages_refused", "not_leader") for n in NODES)
    assert after >= not_leader + 2 * len(NODES)


@pytest.mark.timeout(120)
async def test_a_huge_term_is_refused(cluster: Cluster) -> None:
    c = cluster
    before = await settled_state(c)
    cid = await cluster_id(c)
    d = (await c.digests(1))[0]
    codes = []
    for to in NODES:
        frm = next(n for n in NODES if n != to)
        # 2^64 - 1 broke Metadata on every node, for good: the batch is invalid.
        b = raft_pb2.RaftBatch(from_node=frm, to_node=to, cluster_id=cid)
        b.heartbeats.requests.groups.append(d.group)
        b.heartbeats.requests.terms.append(2**64 - 1)
        codes.append(await send_raw(c.nodes[to], b.SerializeToString()))
        # A valid int64 far beyond the group's term, as a heartbeat and as a vote.
        far = d.term + 2_000_000
        b = raft_pb2.RaftBatch(from_node=frm, to_node=to, cluster_id=cid)
        b.heartbeats.requests.groups.append(d.group)
        b.heartbeats.requests.terms.append(far)
        b.messages.append(
            raft_pb2.GroupMessage(group=d.group, kind=KIND.RAFT_MESSAGE_KIND_VOTE,
                                  from_node=frm, to_node=to, term=far, log_term=far,
                                  index=2**40)
        )  # fmt: skip
        assert await send_raw(c.nodes[to], b.SerializeToString()) == grpc.StatusCode.OK
    await asyncio.sleep(SETTLE_S)
    for n in NODES:
        assert await c.metadata(n) is not None, f"Metadata of node {n} fails"
    assert await settled_state(c) == before
    assert codes == [grpc.StatusCode.INVALID_ARGUMENT] * len(NODES)
    for n in NODES:
        assert refused(c.nodes[n], "tidelog_raft_messages_refused", "term_too_far") >= 2


@pytest.mark.timeout(120)
async def test_a_negative_sender_id_is_refused_and_no_group_goes_offline(
    cluster: Cluster,
) -> None:
    c = cluster
    cid = await cluster_id(c)
    d = (await c.digests(1))[0]
    codes = []
    for to in NODES:
        # The context of a leadership transfer overrides the voters' lease: the vote counts.
        vote = raft_pb2.GroupMessage(
            group=d.group, kind=KIND.RAFT_MESSAGE_KIND_VOTE, from_node=-5, to_node=to,
            term=d.term + 1, log_term=d.term + 1, index=2**40, context=b"transfer",
        )  # fmt: skip
        peer = next(n for n in NODES if n != to)
        for frm in (-5, peer):  # negative in the batch, or only in a message of a peer's batch
            codes.append(await send_raw(c.nodes[to], batch(frm, to, cid, vote)))
    await asyncio.sleep(SETTLE_S)
    # Every replica of both topics still takes part: a write commits on each.
    offset = await produce(c, b"after-negative")
    await produce(c, b"pair-after-negative", PAIR_TOPIC)

    async def replicated() -> bool:
        for n in NODES:
            if (await c.digests(n))[0].high_watermark != offset + 1:
                return False
        return True

    await until("every replica has the new record", replicated)
    for n in NODES:
        assert (await c.digests(n))[0].term == d.term
    assert codes == [grpc.StatusCode.INVALID_ARGUMENT] * 2 * len(NODES)


@pytest.mark.timeout(180)
async def test_invented_sender_ids_do_not_grow_metrics(cluster: Cluster) -> None:
    c = cluster
    cid = await cluster_id(c)
    node = c.nodes[1]
    group = (await c.digests(1))[0].group
    before = metrics_text(node)
    forged = []
    for frm in range(1000, 6000):
        b = raft_pb2.RaftBatch(from_node=frm, to_node=1, cluster_id=cid)
        b.heartbeats.requests.groups.append(group)
        b.heartbeats.requests.terms.append(1)
        forged.append(b.SerializeToString())
    assert await send_raw(node, *forged) == grpc.StatusCode.OK
    after = metrics_text(node)
    peers = {int(p) for p in re.findall(r'peer="(\d+)"', after)}
    assert peers <= set(NODES), f"series for peers {sorted(peers - set(NODES))[:5]}..."
    assert len(after) < len(before) * 1.1, (len(before), len(after))
    assert refused(node, "tidelog_raft_batches_refused", "unknown_peer") >= 5000


@pytest.mark.timeout(180)
async def test_topics_that_do_not_exist_create_no_metric_series(cluster: Cluster) -> None:
    c = cluster
    node = c.nodes[1]
    broker = c.broker(1)
    for i in range(300):
        name = f"no-such-topic-{i}"
        with pytest.raises(aio.AioRpcError):
            await broker.Produce(
                broker_pb2.ProduceRequest(topic=name, partition=0, batches=encode_batch([b"x"]),
                                          acks=broker_pb2.ACKS_ALL),
                timeout=10,
            )  # fmt: skip
        with pytest.raises(aio.AioRpcError):
            stream = broker.Fetch(
                broker_pb2.FetchRequest(topic=name, partition=0, offset=0, once=True), timeout=10
            )
            async for _ in stream:
                pass
    topics = set(re.findall(r'topic="([^"]*)"', metrics_text(node)))
    assert topics <= {TOPIC, PAIR_TOPIC}, sorted(topics)[:5]


@pytest.mark.timeout(120)
async def test_forged_registration_and_liveness_are_refused(cluster: Cluster) -> None:
    c = cluster
    cid = await cluster_id(c)
    before = await settled_state(c)
    md = await c.metadata(1)
    assert md is not None
    controller = md.controller_id
    victim = next(n for n in NODES if n != controller)
    forgeries: list[tuple[Command, grpc.StatusCode]] = [
        # Node `victim` "moves" to the forger's address (it then got replication traffic).
        (RegisterNode(victim, "127.0.0.1:1", ""), grpc.StatusCode.FAILED_PRECONDITION),
        (RegisterNode(victim, "127.0.0.1:1", "", directory_id="0" * 32),
         grpc.StatusCode.FAILED_PRECONDITION),
        # A live node marked dead on a caller's word.
        (MarkNodeDead(victim), grpc.StatusCode.INVALID_ARGUMENT),
    ]  # fmt: skip
    async with aio.insecure_channel(internal_address(c.nodes[controller])) as channel:
        stub = cluster_pb2_grpc.ClusterStub(channel)
        for command, code in forgeries:
            request = cluster_pb2.ForwardRequest(
                from_node=victim, cluster_id=cid, command=encode_command(command)
            )
            with pytest.raises(aio.AioRpcError) as info:
                await stub.Forward(request, timeout=10)
            assert info.value.code() == code, info.value.details()
        # A registered node's leadership report with a term no int64 holds (it would have
        # become the hint every Metadata answer carries).
        group = (await c.digests(1))[0].group
        beat = cluster_pb2.NodeHeartbeat(
            node_id=victim,
            cluster_id=cid,
            leading=[cluster_pb2.LeaderReport(group=group, term=t) for t in (2**63, 2**64 - 1)],
        )
        await stub.Heartbeat(beat, timeout=10)
        # Heartbeats from invented node ids (the controller kept a record of each).
        for ghost in (99, -7, 2**31 - 1):
            beat = cluster_pb2.NodeHeartbeat(
                node_id=ghost, cluster_id=cid, leading=[cluster_pb2.LeaderReport(group=7, term=9)]
            )
            with pytest.raises(aio.AioRpcError) as info:
                await stub.Heartbeat(beat, timeout=10)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    await asyncio.sleep(SETTLE_S)
    assert await settled_state(c) == before
    for n in NODES:
        md = await c.metadata(n)
        assert md is not None, f"Metadata of node {n} fails"
        assert all(p.leader_term < 2**20 for t in md.topics for p in t.partitions)


@pytest.mark.timeout(180)
async def test_a_wiped_data_directory_at_the_same_address_registers_again(
    cluster: Cluster,
) -> None:
    """Not an attack: the identity check must not lock out a node whose disk was replaced.
    Its registration is refused while the old incarnation counts as alive, and accepted once
    the controller marks it dead (the new process neither heartbeats before it registered nor
    takes the replayed registration of the old directory for its own).
    Last in the module: it leaves node 3 with a new data directory."""
    c = cluster
    victim = 3
    node = c.nodes[victim]
    node.kill()
    shutil.rmtree(node.data_dir)
    first_run = len(node.log_path.read_text())
    node.spawn()

    def new_log() -> str:
        return node.log_path.read_text()[first_run:]

    async def registered_again() -> bool:
        if node.proc is None or node.proc.poll() is not None:
            raise AssertionError(f"node {victim} exited:\n{new_log()[-3000:]}")
        if f"node {victim} registered with the controller" not in new_log():
            return False
        md = await c.metadata(1)
        return md is not None and any(n.node_id == victim and n.alive for n in md.nodes)

    await until("the node with a new data directory is registered and alive", registered_again, 60)
    # Whether it was refused first depends on how fast it restarted (node.dead.ms is 3 s);
    # either way it ends registered, under its new data directory.
    md = await c.metadata(1)
    assert md is not None
    [n] = [x for x in md.nodes if x.node_id == victim]
    assert n.address == node.address
