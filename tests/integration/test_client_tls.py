"""TLS and authentication of the client listener, against real node processes with real
certificates (tests/support/tlscerts.py): a client trusting the right CA produces and consumes;
a wrong CA, an expired node certificate and a missing client certificate are refused with a
TLS error; bearer tokens and client certificates name a principal whose role decides whether
it may call Admin; without credentials a guarded node answers UNAUTHENTICATED."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.support.nodeproc import Node
from tests.support.tlscerts import Authority, Issued, authority
from tidelog.client import Admin, Consumer, Producer, TopicPartition
from tidelog.errors import NodeUnavailable, PermissionDenied, TlsError, Unauthenticated

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

CLIENT_TOKEN = "client-token-0123456789abcdef"
ADMIN_TOKEN = "admin-token-0123456789abcdef"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> tuple[Authority, Issued, Path]:
    base = tmp_path_factory.mktemp("pki")
    ca = authority(base, "cluster-ca")
    server = ca.issue(base, "node1", common_name="node-1", server=True)
    return ca, server, base


def tls_flags(server: Issued) -> tuple[str, ...]:
    return ("--tls-cert", str(server.cert_path), "--tls-key", str(server.key_path))


def started(node: Node) -> Iterator[Node]:
    node.start()
    try:
        yield node
    finally:
        node.kill()


@pytest.fixture(scope="module")
def tls_node(
    tmp_path_factory: pytest.TempPathFactory, pki: tuple[Authority, Issued, Path]
) -> Iterator[Node]:
    ca, server, _ = pki
    base = tmp_path_factory.mktemp("tls-node")
    yield from started(
        Node(base / "data", base / "node.log", extra_args=tls_flags(server), tls_ca=ca.cert_pem)
    )


async def produce_and_consume(address: str, topic: str, **conn: object) -> list[bytes]:
    async with Producer(address, **conn) as producer:  # type: ignore[arg-type]
        for i in range(5):
            await producer.send(topic, f"v{i}".encode())
    async with Consumer(address, auto_offset_reset="earliest", **conn) as consumer:  # type: ignore[arg-type]
        consumer.assign([TopicPartition(topic, 0)])
        got: list[bytes] = []
        async with asyncio.timeout(30):
            while len(got) < 5:
                got += [r.value or b"" for r in await consumer.poll(timeout_ms=500)]
    return got


async def test_tls_with_the_right_ca_produces_and_consumes(
    tls_node: Node, pki: tuple[Authority, Issued, Path]
) -> None:
    ca = pki[0]
    async with Admin(tls_node.address, ca=ca.cert_path) as admin:  # a path
        await admin.create_topics("tls-topic", 1)
    got = await produce_and_consume(tls_node.address, "tls-topic", ca=ca.cert_pem)  # PEM bytes
    assert got == [f"v{i}".encode() for i in range(5)]


async def test_a_plaintext_client_cannot_talk_to_a_tls_node(tls_node: Node) -> None:
    with pytest.raises(Exception) as info:
        async with Admin(tls_node.address, request_timeout_ms=3_000) as admin:
            await admin.describe_topics()
    assert "no node answered" in str(info.value)


async def test_a_wrong_ca_fails_with_a_tls_error(tls_node: Node, tmp_path: Path) -> None:
    other = authority(tmp_path, "other-ca")
    with pytest.raises(TlsError) as info:
        async with Producer(tls_node.address, ca=other.cert_pem):
            pass
    message = str(info.value)
    assert "TLS handshake with the node failed" in message
    assert "CERTIFICATE_VERIFY_FAILED" in message
    assert "--tls-ca" in message


def wait_logged(node: Node, text: str, timeout_s: float = 30) -> None:
    """For a node no client can verify: readiness from its log."""
    deadline = time.monotonic() + timeout_s
    while text not in node.log_path.read_text(errors="replace"):
        assert node.proc is not None and node.proc.poll() is None, node.log_path.read_text()
        assert time.monotonic() < deadline, f"{text!r} not logged within {timeout_s} s"
        time.sleep(0.05)


async def test_an_expired_node_certificate_is_refused(
    tmp_path: Path, pki: tuple[Authority, Issued, Path]
) -> None:
    ca, _, base = pki
    expired = ca.issue(base, "expired", common_name="node-1", server=True, expired=True)
    node = Node(tmp_path / "data", tmp_path / "node.log", extra_args=tls_flags(expired))
    node.spawn()
    try:
        wait_logged(node, "serving clients on")
        with pytest.raises(TlsError) as info:
            async with Admin(node.address, ca=ca.cert_pem) as admin:
                await admin.describe_topics()
        assert "certificate has expired" in str(info.value)
    finally:
        node.kill()


# ---- mutual TLS ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mtls_node(
    tmp_path_factory: pytest.TempPathFactory, pki: tuple[Authority, Issued, Path]
) -> Iterator[tuple[Node, Issued, Issued]]:
    ca, server, base = pki
    client_ca = authority(base / "clients", "client-ca")
    alice = client_ca.issue(base, "alice", common_name="alice")
    root = client_ca.issue(base, "root", common_name="root", organizations=("admin",))
    data = tmp_path_factory.mktemp("mtls-node")
    flags = (*tls_flags(server), "--tls-client-ca", str(client_ca.cert_path))
    node = Node(
        data / "data",
        data / "node.log",
        via_cli=True,  # the click side of the node's flag table
        extra_args=flags,
        tls_ca=ca.cert_pem,
        client_pem=(root.key_pem, root.cert_pem),
    )
    for n in started(node):
        yield n, alice, root


async def test_mtls_client_without_a_certificate_is_refused(
    mtls_node: tuple[Node, Issued, Issued], pki: tuple[Authority, Issued, Path]
) -> None:
    node, _, _ = mtls_node
    ca = pki[0]
    with pytest.raises(NodeUnavailable) as info:
        async with Producer(node.address, ca=ca.cert_pem):
            pass
    assert "requires client certificates" in str(info.value)


async def test_mtls_certificate_roles_split_client_and_admin(
    mtls_node: tuple[Node, Issued, Issued], pki: tuple[Authority, Issued, Path]
) -> None:
    node, alice, root = mtls_node
    ca = pki[0]
    as_alice = {"ca": ca.cert_pem, "client_cert": alice.cert_path, "client_key": alice.key_path}
    as_root = {"ca": ca.cert_pem, "client_cert": root.cert_pem, "client_key": root.key_pem}
    async with Admin(node.address, **as_alice) as admin:  # type: ignore[arg-type]
        with pytest.raises(PermissionDenied) as info:
            await admin.create_topics("mtls-topic", 1)
    assert "'alice'" in str(info.value) and "CreateTopics" in str(info.value)
    async with Admin(node.address, **as_root) as admin:  # type: ignore[arg-type]
        assert await admin.create_topics("mtls-topic", 1) == ["mtls-topic"]
    got = await produce_and_consume(node.address, "mtls-topic", **as_alice)
    assert got == [f"v{i}".encode() for i in range(5)]


# ---- bearer tokens -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def token_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    base = tmp_path_factory.mktemp("token-node")
    tokens = base / "tokens"
    tokens.write_text(
        "# token principal role\n"
        f"{CLIENT_TOKEN} app client\n"
        f"{ADMIN_TOKEN}  ops admin   # the operators\n"
    )
    tokens.chmod(0o600)
    # Health answers without a token: start() waits for SERVING over it.
    yield from started(
        Node(base / "data", base / "node.log", extra_args=("--auth-tokens-file", str(tokens)))
    )


async def test_client_token_produces_but_may_not_create_topics(token_node: Node) -> None:
    async with Admin(token_node.address, token=ADMIN_TOKEN) as admin:
        assert await admin.create_topics("tok-topic", 1) == ["tok-topic"]
    got = await produce_and_consume(token_node.address, "tok-topic", token=CLIENT_TOKEN)
    assert got == [f"v{i}".encode() for i in range(5)]
    async with Admin(token_node.address, token=CLIENT_TOKEN) as admin:
        with pytest.raises(PermissionDenied) as info:
            await admin.create_topics("tok-other", 1)
        with pytest.raises(PermissionDenied):
            await admin.describe_topics()
    assert "'app'" in str(info.value) and "needs the role admin" in str(info.value)
    async with Admin(token_node.address, token=ADMIN_TOKEN) as admin:
        assert [d.name for d in await admin.describe_topics()] == ["tok-topic"]


async def test_no_or_unknown_token_is_unauthenticated(token_node: Node) -> None:
    with pytest.raises(Unauthenticated) as info:
        async with Producer(token_node.address):
            pass
    assert "requires authentication" in str(info.value)
    with pytest.raises(Unauthenticated) as info:
        async with Admin(token_node.address, token="not-a-known-token-at-all") as admin:
            await admin.create_topics("t", 1)
    assert "does not know the bearer token" in str(info.value)


async def test_raw_status_codes_and_open_health(token_node: Node) -> None:
    """What a client without the tidelog library sees: the gRPC codes themselves."""
    from tidelog.v1 import admin_pb2, admin_pb2_grpc

    async with aio.insecure_channel(token_node.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        resp = await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
        admin = admin_pb2_grpc.AdminStub(channel)
        req = admin_pb2.CreateTopicsRequest(topics=[admin_pb2.TopicSpec(name="raw", partitions=1)])
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await admin.CreateTopics(req, timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await admin.CreateTopics(
                req, timeout=5, metadata=(("authorization", f"Bearer {CLIENT_TOKEN}"),)
            )
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED


# ---- the command line ----------------------------------------------------------------------


def tidelog(
    node: Node, *args: str, stdin: bytes | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[bytes]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("TIDELOG_")}
    full_env["TIDELOG_BOOTSTRAP"] = node.address
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "tidelog", *args],
        input=stdin,
        capture_output=True,
        env=full_env,
        timeout=60,
        check=False,
    )


def test_cli_token_file_and_token_env(token_node: Node, tmp_path: Path) -> None:
    admin_file = tmp_path / "admin.token"
    admin_file.write_text(ADMIN_TOKEN + "\n")
    created = tidelog(token_node, "topic", "create", "cli-tok", "--token-file", str(admin_file))
    assert created.returncode == 0, created.stderr.decode()
    as_client = {"TIDELOG_TOKEN": CLIENT_TOKEN}
    produced = tidelog(token_node, "produce", "cli-tok", stdin=b"a\nb\n", env=as_client)
    assert produced.returncode == 0, produced.stderr.decode()
    consumed = tidelog(
        token_node, "consume", "cli-tok", "--from-beginning", "--max", "2", env=as_client
    )
    assert consumed.returncode == 0, consumed.stderr.decode()
    assert consumed.stdout.decode().split() == ["a", "b"]
    denied = tidelog(token_node, "topic", "create", "cli-tok-2", env=as_client)
    assert denied.returncode == 1
    err = denied.stderr.decode()
    assert err.startswith("error: ") and "may not call CreateTopics" in err, err
    assert "Traceback" not in err
    anonymous = tidelog(token_node, "topic", "list")
    assert anonymous.returncode == 1
    assert "requires authentication" in anonymous.stderr.decode()


def test_cli_tls_ca_flag_and_env(tls_node: Node, pki: tuple[Authority, Issued, Path]) -> None:
    ca = pki[0]
    created = tidelog(tls_node, "topic", "create", "cli-tls", "--tls-ca", str(ca.cert_path))
    assert created.returncode == 0, created.stderr.decode()
    env = {"TIDELOG_TLS_CA": str(ca.cert_path)}
    produced = tidelog(tls_node, "produce", "cli-tls", stdin=b"x\n", env=env)
    assert produced.returncode == 0, produced.stderr.decode()
    consumed = tidelog(tls_node, "consume", "cli-tls", "--from-beginning", "--max", "1", env=env)
    assert consumed.stdout.decode().split() == ["x"], consumed.stderr.decode()
    plaintext = tidelog(tls_node, "topic", "list")
    assert plaintext.returncode == 1 and "Traceback" not in plaintext.stderr.decode()


def test_cli_mtls_client_certificate(
    mtls_node: tuple[Node, Issued, Issued], pki: tuple[Authority, Issued, Path]
) -> None:
    node, alice, root = mtls_node
    ca = pki[0]
    tls = ["--tls-ca", str(ca.cert_path)]
    as_root = [*tls, "--tls-cert", str(root.cert_path), "--tls-key", str(root.key_path)]
    created = tidelog(node, "topic", "create", "cli-mtls", *as_root)
    assert created.returncode == 0, created.stderr.decode()
    env = {"TIDELOG_TLS_CERT": str(alice.cert_path), "TIDELOG_TLS_KEY": str(alice.key_path)}
    denied = tidelog(node, "topic", "delete", "cli-mtls", *tls, env=env)
    assert denied.returncode == 1 and "'alice'" in denied.stderr.decode()
    half = tidelog(node, "topic", "list", *tls, "--tls-cert", str(alice.cert_path))
    assert half.returncode == 2 and "go together" in half.stderr.decode()
