"""node/internal_auth.py and tidelog/ops/certs.py without processes: what a certificate names, the
cluster-secret MAC and its checks, and the flag combinations a node refuses at start."""

from __future__ import annotations

import asyncio
import stat
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from tidelog.errors import TidelogError
from tidelog.node.internal_auth import (
    MD_MAC,
    MD_NODE,
    MD_TS,
    AuthConfigError,
    InternalAuth,
    SenderMismatch,
    Unauthenticated,
    is_loopback,
    load_internal_auth,
    mac,
    node_id_from_names,
)
from tidelog.ops.certs import CertError, create_ca, create_node_cert, local_cluster_certs

SECRET = b"0123456789abcdef0123"
METHOD = "/tidelog.v1.Cluster/Heartbeat"


class FakeContext:
    """What InternalAuth.peer_id reads of a grpc.aio context."""

    def __init__(self, metadata: tuple[tuple[str, str], ...] | None = None) -> None:
        self._metadata = metadata or ()

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def auth_context(self) -> dict[str, list[bytes]]:
        return {}


def ctx(metadata: Any) -> Any:
    return FakeContext(metadata)


def test_a_certificate_names_its_node_by_uri_or_cn() -> None:
    assert node_id_from_names(["node-3"], []) == 3
    assert node_id_from_names(["whatever"], ["tidelog://node/7", "127.0.0.1"]) == 7
    assert node_id_from_names(["node-3"], ["tidelog://node/7"]) == 7  # the URI wins
    assert node_id_from_names(["node-0"], []) is None
    assert node_id_from_names(["node-03"], []) is None
    assert node_id_from_names(["node-1x"], []) is None
    assert node_id_from_names([], ["tidelog://node/1", "tidelog://node/2"]) is None


def test_the_secret_mac_binds_node_method_and_time() -> None:
    now = 1_700_000_000_000
    sender = InternalAuth(4, secret=SECRET, clock_ms=lambda: now)
    receiver = InternalAuth(1, secret=SECRET, clock_ms=lambda: now + 1_000)
    md = sender.call_metadata(METHOD)
    assert md is not None and dict(md)[MD_NODE] == "4"
    assert receiver.peer_id(ctx(md), METHOD) == 4
    # Replayed on another method, with another node id, or far from the receiver's clock.
    with pytest.raises(Unauthenticated, match="MAC is wrong"):
        receiver.peer_id(ctx(md), "/tidelog.v1.Raft/Stream")
    forged = ((MD_NODE, "2"), (MD_TS, str(now)), (MD_MAC, dict(md)[MD_MAC]))
    with pytest.raises(Unauthenticated, match="MAC is wrong"):
        receiver.peer_id(ctx(forged), METHOD)
    late = InternalAuth(1, secret=SECRET, clock_ms=lambda: now + 31_000)
    with pytest.raises(Unauthenticated, match="31000 ms off"):
        late.peer_id(ctx(md), METHOD)
    with pytest.raises(Unauthenticated, match="carries no cluster-secret"):
        receiver.peer_id(ctx(()), METHOD)
    bad = ((MD_NODE, "-1"), (MD_TS, str(now)), (MD_MAC, mac(SECRET, 1, METHOD, now)))
    with pytest.raises(Unauthenticated, match="malformed"):
        receiver.peer_id(ctx(bad), METHOD)


def test_a_claimed_sender_must_be_the_authenticated_peer() -> None:
    auth = InternalAuth(1, secret=SECRET)
    auth.check_sender(3, 3, "a heartbeat")
    auth.check_sender(None, 3, "a heartbeat")  # mode none: nothing to compare
    with pytest.raises(SenderMismatch, match="claims to come from node 1") as info:
        auth.check_sender(3, 1, "a raft batch")
    assert isinstance(info.value, TidelogError)
    assert info.value.code.name == "PERMISSION_DENIED"


def test_a_short_secret_and_tls_plus_secret_are_refused(tmp_path: Path) -> None:
    with pytest.raises(AuthConfigError, match="at least 16"):
        InternalAuth(1, secret=b"short")
    (tmp_path / "s").write_bytes(SECRET)
    with pytest.raises(AuthConfigError, match="missing --internal-key"):
        load_internal_auth(1, ca=tmp_path / "s", cert=tmp_path / "s", key=None, secret_file=None)
    create_ca(tmp_path / "ca")
    create_node_cert(tmp_path / "ca", 1, ["127.0.0.1"], tmp_path / "ca")

    def with_tls(node_id: int, secret_file: Path | None = None) -> InternalAuth:
        d = tmp_path / "ca"
        return load_internal_auth(
            node_id,
            ca=d / "ca.crt",
            cert=d / "node-1.crt",
            key=d / "node-1.key",
            secret_file=secret_file,
        )

    with pytest.raises(AuthConfigError, match="not both"):
        with_tls(1, tmp_path / "s")
    # Node 2 with node 1's certificate: a startup error naming both.
    with pytest.raises(AuthConfigError, match="is for node 1, not node 2"):
        with_tls(2)
    assert with_tls(1).mode.value == "tls"
    assert load_internal_auth(1, ca=None, cert=None, key=None, secret_file=tmp_path / "s").mode == (
        "secret"
    )
    env = {"TIDELOG_CLUSTER_SECRET": SECRET.decode()}
    from_env = load_internal_auth(1, ca=None, cert=None, key=None, secret_file=None, environ=env)
    assert from_env.mode == "secret"
    assert load_internal_auth(
        1, ca=None, cert=None, key=None, secret_file=None, environ={}
    ).mode == ("none")


def test_loopback_addresses() -> None:
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "10.0.0.1", "", "example.com", "::"))


def test_node_certificates_bind_the_id_and_hosts(tmp_path: Path) -> None:
    create_ca(tmp_path)
    with pytest.raises(CertError, match="refusing to replace"):
        create_ca(tmp_path)
    assert stat.S_IMODE((tmp_path / "ca.key").stat().st_mode) == 0o600
    files = create_node_cert(tmp_path, 5, ["127.0.0.1", "n5.example", "::1"], tmp_path / "out")
    assert stat.S_IMODE(files.key.stat().st_mode) == 0o600
    cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "node-5"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["tidelog://node/5"]
    assert san.get_values_for_type(x509.DNSName) == ["n5.example"]
    assert [str(a) for a in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "::1"]
    ca = x509.load_pem_x509_certificate((tmp_path / "ca.crt").read_bytes())
    cert.verify_directly_issued_by(ca)
    with pytest.raises(CertError, match="cannot read the CA"):
        create_node_cert(tmp_path / "none", 1, ["h"], tmp_path)
    with pytest.raises(CertError, match="at least one --host"):
        create_node_cert(tmp_path, 1, [], tmp_path)


def test_local_cluster_certs_are_made_once(tmp_path: Path) -> None:
    first = local_cluster_certs(tmp_path, [1, 2])
    again = local_cluster_certs(tmp_path, [1, 2, 3])
    assert first[1].cert.read_bytes() == again[1].cert.read_bytes()
    assert set(again) == {1, 2, 3}


def test_tidelog_certs_ca_and_node_commands(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from tidelog.ops.cli import cli

    runner = CliRunner()
    out = runner.invoke(cli, ["certs", "ca", "--out", str(tmp_path / "ca")])
    assert out.exit_code == 0, out.output
    assert "ca.crt" in out.output
    args = ["certs", "node", "--id", "2", "--ca", str(tmp_path / "ca"), "--host", "10.0.0.2"]
    out = runner.invoke(cli, [*args, "--host", "n2", "--out", str(tmp_path / "n2")])
    assert out.exit_code == 0, out.output
    assert load_internal_auth(
        2,
        ca=tmp_path / "ca" / "ca.crt",
        cert=tmp_path / "n2" / "node-2.crt",
        key=tmp_path / "n2" / "node-2.key",
        secret_file=None,
    ).tls
    again = runner.invoke(cli, ["certs", "ca", "--out", str(tmp_path / "ca")])
    assert again.exit_code == 1
    assert "refusing to replace a cluster CA" in again.output


async def test_voters_naming_the_client_address_are_a_startup_error(tmp_path: Path) -> None:
    """The classic mistake after the listener split: --controller-voters still lists client
    ports, where no Raft is served. The node says so at start instead of never electing."""
    from tidelog.node.server import Node, StartupError
    from tidelog.ops.processes import free_port

    port = free_port()
    node = Node(1, f"127.0.0.1:{port}", tmp_path, 0, controller_voters=f"1@127.0.0.1:{port}")
    try:
        with pytest.raises(StartupError, match=rf"its client address 127\.0\.0\.1:{port}"):
            await asyncio.wait_for(node.start(), 10)
    finally:
        await node.stop(0)
