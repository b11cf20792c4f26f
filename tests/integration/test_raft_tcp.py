"""The Raft transport's TCP listener under hostile and mistaken callers, in each
authentication mode: real transports on 127.0.0.1 in one process (raft.proto, "The TCP
listener"). What must hold: nothing reaches the node before a valid handshake, a refusal
says why in one readable reason, a captured handshake cannot be replayed, and the listener
keeps serving honest peers afterwards."""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from grpc import aio

from tests.support import free_port
from tidelog.node import raft_tcp
from tidelog.node.internal_auth import InternalAuth, TlsFiles
from tidelog.node.raft.types import Message, MessageKind
from tidelog.node.raft_tcp import PeerRefused
from tidelog.node.transport import GRPC_SERVER_OPTIONS, RaftTransport
from tidelog.ops.certs import create_ca, create_node_cert
from tidelog.v1 import raft_pb2

WAIT_S = 10.0
CLUSTER = "cluster-a"
SECRET = b"s" * 32


@dataclass
class Node:
    node_id: int
    transport: RaftTransport
    server: aio.Server
    port: int
    deliveries: list[tuple[int, list[tuple[int, Message]]]] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def tcp_port(self) -> int:
        assert self.transport.tcp_port is not None
        return self.transport.tcp_port

    def refused(self, reason: str) -> float:
        value = self.transport.registry.get_sample_value(
            "tidelog_raft_batches_refused_total", {"reason": reason}
        )
        return value or 0.0


@pytest.fixture
async def make() -> AsyncIterator[Callable[[int, InternalAuth], object]]:
    nodes: list[Node] = []

    async def start(node_id: int, auth: InternalAuth) -> Node:
        deliveries: list[tuple[int, list[tuple[int, Message]]]] = []
        transport = RaftTransport(
            node_id, CLUSTER, deliver=lambda frm, items: deliveries.append((frm, items)), auth=auth
        )
        server = aio.server(options=GRPC_SERVER_OPTIONS)
        transport.add_servicer(server)
        port = free_port()
        creds = auth.server_credentials()
        if creds is None:
            server.add_insecure_port(f"127.0.0.1:{port}")
        else:
            server.add_secure_port(f"127.0.0.1:{port}", creds)
        await server.start()
        await transport.listen("127.0.0.1")
        node = Node(node_id, transport, server, port, deliveries)
        nodes.append(node)
        return node

    yield start
    for n in nodes:
        await n.transport.close()
        await n.server.stop(None)


async def wait_until(predicate: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {WAIT_S}s waiting for {what}")
        await asyncio.sleep(0.01)


def append(frm: int, to: int, index: int) -> Message:
    return Message(MessageKind.APPEND, frm, to, 1, index=index)


async def raw_connection(
    port: int, tls: ssl.SSLContext | None = None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
    """A connection that has read the listener's challenge; its nonce."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=tls)
    challenge = raft_pb2.RaftChallenge.FromString(
        await raft_tcp.read_frame(reader, raft_tcp.handshake_bytes_max)
    )
    assert challenge.version == raft_tcp.VERSION
    assert len(challenge.nonce) == raft_tcp.NONCE_BYTES
    return reader, writer, challenge.nonce


async def answer(reader: asyncio.StreamReader) -> raft_pb2.RaftWelcome:
    async with asyncio.timeout(WAIT_S):
        return raft_pb2.RaftWelcome.FromString(
            await raft_tcp.read_frame(reader, raft_tcp.handshake_bytes_max)
        )


async def closed(reader: asyncio.StreamReader) -> bool:
    async with asyncio.timeout(WAIT_S):
        return await reader.read(1) == b""


async def connects_and_delivers(a: Node, b: Node, index: int) -> None:
    """``a`` reaches ``b`` over TCP and its message is delivered."""
    a.transport.set_peer(b.node_id, b.address)
    b.transport.set_peer(a.node_id, a.address)
    a.transport.send(b.node_id, 1, append(a.node_id, b.node_id, index))
    await wait_until(
        lambda: any(m.index == index for _, items in b.deliveries for _, m in items),
        f"message {index} from node {a.node_id}",
    )
    assert a.transport.peer_status(b.node_id).carrier == "tcp"


# ---- no authentication (loopback only) ---------------------------------------------------


@pytest.mark.timeout(30)
async def test_garbage_handshake_and_batches_are_refused_and_the_listener_keeps_serving(
    make: Callable[[int, InternalAuth], object],
) -> None:
    b: Node = await make(2, InternalAuth(2))  # type: ignore[misc]
    b.transport.set_peer(1, f"127.0.0.1:{free_port()}")

    # Not a RaftHello: refused with a reason, then closed.
    reader, writer, _ = await raw_connection(b.tcp_port)
    writer.write(raft_tcp.frame(b"\xff\xff\xff"))
    welcome = await answer(reader)
    assert welcome.code == "INVALID_ARGUMENT" and "RaftHello" in welcome.message
    assert await closed(reader)
    writer.close()

    # A frame beyond the handshake bound is not read: the connection just ends.
    reader, writer, _ = await raw_connection(b.tcp_port)
    writer.write(raft_tcp.frame_header(raft_tcp.handshake_bytes_max + 1))
    assert await closed(reader)
    writer.close()

    # A valid handshake, then a batch with an invalid value: refused and counted.
    reader, writer, _ = await raw_connection(b.tcp_port)
    hello = raft_pb2.RaftHello(version=1, from_node=1, to_node=2, cluster_id=CLUSTER)
    writer.write(raft_tcp.frame(hello.SerializeToString()))
    assert (await answer(reader)).reason == ""
    bad = raft_pb2.RaftBatch(from_node=1, to_node=2, cluster_id=CLUSTER)
    bad.heartbeats.requests.groups.append(1)
    bad.heartbeats.requests.terms.append(2**64 - 1)
    writer.write(raft_tcp.frame(bad.SerializeToString()))
    welcome = await answer(reader)
    assert welcome.code == "INVALID_ARGUMENT", welcome
    assert await closed(reader)
    writer.close()
    assert b.refused("invalid") == 1
    assert b.deliveries == []

    # A handshake for another node or cluster.
    for to, cluster in ((3, CLUSTER), (2, "cluster-b")):
        reader, writer, _ = await raw_connection(b.tcp_port)
        hello = raft_pb2.RaftHello(version=1, from_node=1, to_node=to, cluster_id=cluster)
        writer.write(raft_tcp.frame(hello.SerializeToString()))
        welcome = await answer(reader)
        assert welcome.reason == "PEER_MISMATCH" and welcome.code == "FAILED_PRECONDITION"
        writer.close()

    a: Node = await make(1, InternalAuth(1))  # type: ignore[misc]
    await connects_and_delivers(a, b, 7)


@pytest.mark.timeout(30)
async def test_a_caller_that_never_finishes_its_handshake_is_dropped(
    make: Callable[[int, InternalAuth], object], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(raft_tcp, "handshake_timeout_ms", 300)
    b: Node = await make(2, InternalAuth(2))  # type: ignore[misc]
    reader, writer, _ = await raw_connection(b.tcp_port)
    started = time.monotonic()
    assert await closed(reader)
    assert time.monotonic() - started < 5
    writer.close()


# ---- the cluster secret ------------------------------------------------------------------


def signed_hello(auth: InternalAuth, nonce: bytes, *, from_node: int) -> raft_pb2.RaftHello:
    """A hello to node 2 claiming ``from_node``, with ``auth``'s MAC for ``nonce``."""
    return raft_pb2.RaftHello(
        version=1, from_node=from_node, to_node=2, cluster_id=CLUSTER,
        mac=auth.hello_mac(nonce, 2, CLUSTER),
    )  # fmt: skip


@pytest.mark.timeout(30)
async def test_a_secret_listener_refuses_a_wrong_or_missing_mac_and_a_replayed_handshake(
    make: Callable[[int, InternalAuth], object],
) -> None:
    b: Node = await make(2, InternalAuth(2, secret=SECRET))  # type: ignore[misc]
    b.transport.set_peer(1, f"127.0.0.1:{free_port()}")

    wrong = InternalAuth(1, secret=b"w" * 32)
    with pytest.raises(PeerRefused, match=r"UNAUTHENTICATED: .*MAC is wrong"):
        await raft_tcp.connect("127.0.0.1", b.tcp_port, wrong, None, 1, 2, CLUSTER)
    with pytest.raises(PeerRefused, match=r"UNAUTHENTICATED: .*no cluster-secret"):
        await raft_tcp.connect("127.0.0.1", b.tcp_port, InternalAuth(1), None, 1, 2, CLUSTER)

    # An honest handshake, recorded, then replayed on a new connection: a new nonce.
    right = InternalAuth(1, secret=SECRET)
    reader, writer, nonce = await raw_connection(b.tcp_port)
    hello = signed_hello(right, nonce, from_node=1)
    writer.write(raft_tcp.frame(hello.SerializeToString()))
    assert (await answer(reader)).reason == ""
    writer.close()
    reader, writer, nonce2 = await raw_connection(b.tcp_port)
    assert nonce2 != nonce
    writer.write(raft_tcp.frame(hello.SerializeToString()))
    welcome = await answer(reader)
    assert welcome.reason == "PEER_NOT_AUTHENTICATED" and "MAC is wrong" in welcome.message
    writer.close()
    # A right MAC for node 1 cannot claim node 3 either: the MAC covers the sender.
    reader, writer, nonce = await raw_connection(b.tcp_port)
    forged = signed_hello(right, nonce, from_node=3)
    writer.write(raft_tcp.frame(forged.SerializeToString()))
    assert (await answer(reader)).reason == "PEER_NOT_AUTHENTICATED"
    writer.close()
    assert b.deliveries == []

    a: Node = await make(1, right)  # type: ignore[misc]
    await connects_and_delivers(a, b, 9)


# ---- mutual TLS --------------------------------------------------------------------------


def tls_files(ca_dir: Path, node_id: int, out: Path) -> TlsFiles:
    files = create_node_cert(ca_dir, node_id, ["127.0.0.1"], out)
    return TlsFiles(
        (ca_dir / "ca.crt").read_bytes(), files.cert.read_bytes(), files.key.read_bytes()
    )


@pytest.mark.timeout(30)
async def test_tls_connections_are_bound_to_the_certificates_node(
    make: Callable[[int, InternalAuth], object], tmp_path: Path
) -> None:
    ca = tmp_path / "ca"
    create_ca(ca)
    auths = {n: InternalAuth(n, tls=tls_files(ca, n, tmp_path / f"n{n}")) for n in (1, 2, 3)}
    a: Node = await make(1, auths[1])  # type: ignore[misc]
    b: Node = await make(2, auths[2])  # type: ignore[misc]
    await connects_and_delivers(a, b, 5)
    await connects_and_delivers(b, a, 6)

    # Node 3's valid certificate claiming to be node 1: PERMISSION_DENIED.
    forger = raft_tcp.client_context(auths[3])
    with pytest.raises(PeerRefused, match=r"PERMISSION_DENIED: .*claims to come from node 1"):
        await raft_tcp.connect("127.0.0.1", b.tcp_port, auths[3], forger, 1, 2, CLUSTER)
    # The caller checks the listener too: node 2's listener is not node 3's.
    with pytest.raises(PeerRefused, match="certificate of node 2, not of node 3"):
        await raft_tcp.connect("127.0.0.1", b.tcp_port, auths[1], forger, 1, 3, CLUSTER)

    # A certificate of another CA, or none: the TLS handshake fails.
    other = tmp_path / "other-ca"
    create_ca(other)
    stranger = InternalAuth(1, tls=tls_files(other, 1, tmp_path / "stranger"))
    with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
        await raft_tcp.connect(
            "127.0.0.1", b.tcp_port, stranger, raft_tcp.client_context(stranger), 1, 2, CLUSTER
        )
    plain = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    plain.check_hostname = False
    plain.verify_mode = ssl.CERT_NONE
    served = False
    with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
        await raw_connection(b.tcp_port, plain)
        served = True
    assert not served, "the listener sent its challenge to a caller without a certificate"
    assert b.refused("invalid") == 0
    assert [m.index for _, items in b.deliveries for _, m in items] == [5]


@pytest.mark.timeout(30)
async def test_a_listener_on_a_name_of_several_addresses_has_one_port() -> None:
    """``localhost`` may resolve to ::1 and 127.0.0.1; with port 0 each would get a port of
    its own, and the peers learn only one (Raft.Endpoint)."""
    transport = RaftTransport(1, CLUSTER, deliver=lambda _frm, _items: None)
    try:
        port = await transport.listen("localhost")
        server = transport._tcp_server
        assert server is not None
        assert {sock.getsockname()[1] for sock in server.sockets} == {port}
        _reader, writer = await asyncio.open_connection("localhost", port)
        writer.close()
    finally:
        await transport.close()
