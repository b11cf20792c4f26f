"""Node-to-node authentication on real node processes (issue 9, A1 and A2).

A 3-node cluster with mutual TLS on its internal listeners (certificates made as ``tidelog
cluster up`` makes them) serves clients on its plain client ports, and refuses on its
internal listeners: a certificate of another CA, an expired certificate, no certificate,
and a node that presents its own valid certificate while claiming to be another node
(RaftBatch sender, heartbeat, registration, forward). The client port answers the internal
services with UNIMPLEMENTED. A cluster authenticated by a cluster secret works and refuses a
wrong secret; a node with neither TLS nor a secret refuses to start on a non-loopback
internal address.
"""

from __future__ import annotations

import asyncio
import datetime
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
from grpc import aio

from tests.support.nodeproc import Cluster, Node, spawn_cluster, until
from tidelog.client import Consumer, Producer, TopicPartition
from tidelog.controller.commands import RegisterNode, encode_command
from tidelog.node.controller_node import FORWARD, HEARTBEAT
from tidelog.node.internal_auth import InternalAuth, TlsFiles
from tidelog.node.transport import STREAM_METHOD
from tidelog.ops.certs import create_ca, create_node_cert
from tidelog.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    broker_pb2,
    broker_pb2_grpc,
    cluster_pb2,
    cluster_pb2_grpc,
    raft_pb2,
)

pytestmark = pytest.mark.integration

NODES = (1, 2, 3)
TOPIC = "auth"
STARTUP_TIMEOUT_S = 30.0
RPC_TIMEOUT_S = 5.0


@pytest.fixture(scope="module")
def tls_procs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict[int, Node]]]:
    base = tmp_path_factory.mktemp("tls")
    nodes = spawn_cluster(base, NODES, "tls")
    try:
        yield base, nodes
    finally:
        for n in nodes.values():
            n.kill()


@pytest.fixture
async def tls_cluster(tls_procs: tuple[Path, dict[int, Node]]) -> AsyncIterator[Cluster]:
    c = Cluster(tls_procs[1], TOPIC)
    await c.wait_all_alive(STARTUP_TIMEOUT_S)
    yield c
    await c.close()


def files(cert_dir: Path, node_id: int, ca: Path) -> TlsFiles:
    return TlsFiles(
        ca.read_bytes(),
        (cert_dir / f"node-{node_id}.crt").read_bytes(),
        (cert_dir / f"node-{node_id}.key").read_bytes(),
    )


async def heartbeat(
    auth: InternalAuth, address: str, node_id: int, cluster_id: str = ""
) -> cluster_pb2.HeartbeatAck:
    """A Cluster.Heartbeat from ``auth``'s identity, claiming ``node_id``."""
    async with auth.channel(address) as ch:
        stub = cluster_pb2_grpc.ClusterStub(ch)
        ack: cluster_pb2.HeartbeatAck = await stub.Heartbeat(
            cluster_pb2.NodeHeartbeat(node_id=node_id, cluster_id=cluster_id),
            timeout=RPC_TIMEOUT_S,
            metadata=auth.call_metadata(HEARTBEAT),
        )
        return ack


async def raft_batch(auth: InternalAuth, address: str, batch: raft_pb2.RaftBatch) -> None:
    async with auth.channel(address) as ch:
        call = ch.stream_unary(STREAM_METHOD, None, None)(
            None, metadata=auth.call_metadata(STREAM_METHOD), timeout=RPC_TIMEOUT_S
        )
        try:
            await call.write(batch.SerializeToString())
            await call.done_writing()
        except aio.AioRpcError:
            pass  # the node may end the call before taking the batch: its status says why
        except asyncio.InvalidStateError:
            pass  # the call already ended
        await call


async def nodes_view(c: Cluster, node: int) -> list[tuple[int, str]]:
    """The registered nodes and their addresses, as ``node`` answers Metadata."""
    md = await c.metadata(node)
    assert md is not None
    return sorted((n.node_id, n.address) for n in md.nodes)


# ---- the client port ------------------------------------------------------------------------


async def test_internal_services_on_the_client_port_are_unimplemented(
    tls_cluster: Cluster,
) -> None:
    address = tls_cluster.nodes[2].address
    plain = InternalAuth(1)  # plain gRPC, as the client port speaks
    with pytest.raises(aio.AioRpcError) as info:
        await heartbeat(plain, address, 1)
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    with pytest.raises(aio.AioRpcError) as info:
        await raft_batch(plain, address, raft_pb2.RaftBatch(from_node=1, to_node=2))
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    async with aio.insecure_channel(address) as ch:
        for call in (
            cluster_pb2_grpc.ClusterStub(ch).Forward(
                cluster_pb2.ForwardRequest(from_node=1), timeout=RPC_TIMEOUT_S
            ),
            cluster_pb2_grpc.ClusterStub(ch).LogDigest(
                cluster_pb2.LogDigestRequest(), timeout=RPC_TIMEOUT_S
            ),
        ):
            with pytest.raises(aio.AioRpcError) as info:
                await call
            assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
        # ... while the public API answers on it.
        md = await broker_pb2_grpc.BrokerStub(ch).Metadata(broker_pb2.MetadataRequest())
        assert sorted(n.node_id for n in md.nodes) == list(NODES)
    # And the internal listener speaks no plain gRPC at all.
    with pytest.raises(aio.AioRpcError) as info:
        await heartbeat(plain, tls_cluster.nodes[2].internal_address, 1)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


# ---- TLS: who may call ----------------------------------------------------------------------


async def test_produce_and_consume_through_a_tls_cluster(tls_cluster: Cluster) -> None:
    c = tls_cluster
    admin = admin_pb2_grpc.AdminStub(c.channel(1))
    await admin.CreateTopics(
        admin_pb2.CreateTopicsRequest(
            topics=[admin_pb2.TopicSpec(name=TOPIC, partitions=3, replication_factor=3)]
        ),
        timeout=30,
    )

    async def led() -> bool:
        return len(await c.leaders()) == 3

    await until("every partition has a leader", led)
    values = [b"tls-%d" % i for i in range(300)]
    async with Producer(c.bootstrap, acks="all") as producer:
        results = await asyncio.gather(*(producer.send(TOPIC, v) for v in values))
    assert len(results) == len(values)
    got: list[bytes] = []
    async with Consumer(c.bootstrap) as consumer:
        consumer.assign([TopicPartition(TOPIC, p) for p in range(3)])
        await consumer.seek_to_beginning()
        async with asyncio.timeout(30):
            while len(got) < len(values):
                got += [r.value for r in await consumer.poll(timeout_ms=500) if r.value]
    assert sorted(got) == sorted(values)

    async def replicated() -> bool:
        # Raft over the TLS channels: every replica holds the same committed log.
        views = []
        for n in NODES:
            d = await c.digests(n)
            views.append({p: (x.high_watermark, x.crc32c) for p, x in d.items()})
        return len(views[0]) == 3 and all(v == views[0] for v in views)

    await until("the replicas hold the same committed logs", replicated)


async def test_a_certificate_of_another_ca_is_refused(tls_cluster: Cluster, tmp_path: Path) -> None:
    base = tls_cluster.nodes[1].tls
    assert base is not None
    real_ca = base[0]
    create_ca(tmp_path / "rogue")
    create_node_cert(tmp_path / "rogue", 1, ["127.0.0.1"], tmp_path / "rogue")
    # The forger trusts the real CA for the server, and presents node 1 of its own CA.
    rogue = InternalAuth(1, tls=files(tmp_path / "rogue", 1, real_ca))
    target = tls_cluster.nodes[2].internal_address
    with pytest.raises(aio.AioRpcError) as info:
        await heartbeat(rogue, target, 1)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    # No certificate at all (server-authenticated TLS only) is refused the same way.
    creds = grpc.ssl_channel_credentials(root_certificates=real_ca.read_bytes())
    async with aio.secure_channel(target, creds) as ch:
        with pytest.raises(aio.AioRpcError) as info:
            await cluster_pb2_grpc.ClusterStub(ch).LogDigest(
                cluster_pb2.LogDigestRequest(), timeout=RPC_TIMEOUT_S
            )
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    # The control: node 1's real certificate gets through to the same listener.
    assert (await tls_cluster.digests(2)) is not None


async def test_an_expired_certificate_is_refused(tls_cluster: Cluster, tmp_path: Path) -> None:
    ca, _, _ = tls_cluster.nodes[1].tls or (None, None, None)
    assert ca is not None
    now = datetime.datetime.now(datetime.UTC)
    create_node_cert(
        ca.parent, 1, ["127.0.0.1"], tmp_path,
        not_before=now - datetime.timedelta(days=2), not_after=now - datetime.timedelta(days=1),
    )  # fmt: skip
    expired = InternalAuth(1, tls=files(tmp_path, 1, ca))
    with pytest.raises(aio.AioRpcError) as info:
        await heartbeat(expired, tls_cluster.nodes[2].internal_address, 1)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_a_node_claiming_another_nodes_id_is_permission_denied(
    tls_cluster: Cluster,
) -> None:
    """Node 3's own valid certificate, but the messages claim node 1: refused, and the
    cluster's view of its nodes is unchanged."""
    c = tls_cluster
    ca, _, _ = c.nodes[3].tls or (None, None, None)
    assert ca is not None
    forger = InternalAuth(3, tls=files(ca.parent, 3, ca))
    md = await c.metadata(1)
    assert md is not None
    cluster_id = md.cluster_id
    before = await nodes_view(c, 1)
    target = c.nodes[2].internal_address

    # A RaftBatch from "node 1": the sender is not the certificate's node.
    forged = raft_pb2.RaftBatch(from_node=1, to_node=2, cluster_id=cluster_id)
    with pytest.raises(aio.AioRpcError) as info:
        await raft_batch(forger, target, forged)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "claims to come from node 1" in (info.value.details() or "")
    assert "authenticated as node 3" in (info.value.details() or "")

    # A heartbeat for node 1, to every node (one of them is the controller).
    for n in NODES:
        with pytest.raises(aio.AioRpcError) as info:
            await heartbeat(forger, c.nodes[n].internal_address, 1, cluster_id)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED

    # Re-registering node 1 at the forger's address, as node 3 forwarding it, and as "node 1".
    command = encode_command(RegisterNode(1, "127.0.0.1:1", internal_address="127.0.0.1:1"))
    async with forger.channel(target) as ch:
        stub = cluster_pb2_grpc.ClusterStub(ch)
        for sender in (3, 1):
            with pytest.raises(aio.AioRpcError) as info:
                await stub.Forward(
                    cluster_pb2.ForwardRequest(
                        from_node=sender, cluster_id=cluster_id, command=command
                    ),
                    timeout=RPC_TIMEOUT_S,
                    metadata=forger.call_metadata(FORWARD),
                )
            assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    # Honest traffic of the same certificate still passes: node 3's own heartbeat.
    for n in NODES:
        try:
            await heartbeat(forger, c.nodes[n].internal_address, 3, cluster_id)
        except aio.AioRpcError as exc:  # not the controller (NOT_LEADER), but not refused
            assert exc.code() not in (
                grpc.StatusCode.PERMISSION_DENIED,
                grpc.StatusCode.UNAUTHENTICATED,
            ), exc.details()
    await asyncio.sleep(0.5)
    for n in NODES:
        assert await nodes_view(c, n) == before


# ---- the cluster secret -------------------------------------------------------------------


@pytest.fixture
async def secret_cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    nodes = spawn_cluster(tmp_path, NODES, "secret")
    c = Cluster(nodes, TOPIC)
    try:
        await c.wait_all_alive(STARTUP_TIMEOUT_S)
        yield c
    finally:
        await c.close()
        for n in nodes.values():
            n.kill()


async def test_a_secret_cluster_works_and_refuses_a_wrong_secret(secret_cluster: Cluster) -> None:
    c = secret_cluster
    md = await c.metadata(1)
    assert md is not None and md.controller_id in NODES
    # The nodes reached each other (all registered alive) and answer LogDigest to a holder
    # of the secret.
    assert await c.digests(2) == {}
    secret_file = c.nodes[1].secret_file
    assert secret_file is not None
    right = secret_file.read_bytes().strip()
    target = c.nodes[2].internal_address
    cases = {
        "a wrong secret": InternalAuth(1, secret=b"not-the-cluster-secret!"),
        "no secret": InternalAuth(1),
        "a stale timestamp": InternalAuth(1, secret=right, clock_ms=lambda: 1_000),
    }
    for what, auth in cases.items():
        with pytest.raises(aio.AioRpcError) as info:
            await heartbeat(auth, target, 1, md.cluster_id)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED, what
    # The secret's holder as node 3 claiming node 1.
    with pytest.raises(aio.AioRpcError) as info:
        await raft_batch(
            InternalAuth(3, secret=right),
            target,
            raft_pb2.RaftBatch(from_node=1, to_node=2, cluster_id=md.cluster_id),
        )
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED


# ---- neither --------------------------------------------------------------------------------


def test_no_tls_and_no_secret_refuses_a_non_loopback_internal_listener(tmp_path: Path) -> None:
    # 192.0.2.1 (TEST-NET-1) is never bound: the node must refuse before it tries.
    node = Node(tmp_path / "n1", tmp_path / "n1.log", 1)
    argv = node.argv()
    argv[argv.index("--internal-listen") + 1] = "192.0.2.1:9292"
    from tidelog.ops.processes import spawn_node

    proc = spawn_node(argv, node.log_path, detached=False)
    try:
        assert proc.wait(timeout=STARTUP_TIMEOUT_S) == 1
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log = node.log_path.read_text()
    assert "refusing to serve the internal Raft and Cluster services on '192.0.2.1'" in log
    for flag in ("--internal-ca", "--internal-cert", "--internal-key", "--cluster-secret-file"):
        assert flag in log
