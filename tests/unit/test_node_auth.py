"""Authentication and the first split of rights (node/auth.py), the client's connection
options (client/connection.py), the node's security flags and the CLI's connection options,
without a network: the end-to-end paths are tests/integration/test_client_tls.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner

from tidelog.client.connection import Connection
from tidelog.errors import PermissionDenied, Unauthenticated
from tidelog.node.auth import (
    ANONYMOUS,
    CLUSTER,
    OPERATIONS,
    Guard,
    Principal,
    Resource,
    authorize,
    load_client_security,
    load_tokens,
)
from tidelog.node.settings import ClientSecurity, parse_flags
from tidelog.ops.cli_connection import client_options, connection_options
from tidelog.ops.cluster_file import ClusterFile, NodeSpec, load_cluster, save_cluster
from tidelog.ops.localcluster import discover_tls_ca

TOKEN_A = "a" * 20
TOKEN_B = "b" * 20


class FakeContext:
    """The two things Guard reads of a grpc.aio ServicerContext."""

    def __init__(
        self, metadata: tuple[tuple[str, str], ...] = (), auth: dict[str, list[bytes]] | None = None
    ) -> None:
        self._metadata = metadata
        self._auth = auth or {}

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def auth_context(self) -> dict[str, list[bytes]]:
        return self._auth


def bearer(token: str) -> FakeContext:
    return FakeContext((("authorization", f"Bearer {token}"),))


def tokens_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "tokens"
    path.write_text(text)
    path.chmod(0o600)
    return path


# ---- tokens file ----------------------------------------------------------------------------


def test_tokens_file_maps_tokens_to_principals(tmp_path: Path) -> None:
    path = tokens_file(tmp_path, f"# comment\n\n{TOKEN_A} app client\n{TOKEN_B} ops admin # x\n")
    guard = Guard(load_tokens(path))
    assert guard.principal(bearer(TOKEN_A)) == Principal("app", frozenset({"client"}))
    assert guard.principal(bearer(TOKEN_B)) == Principal("ops", frozenset({"admin"}))
    # The node keeps digests, not the tokens.
    assert TOKEN_A.encode() not in load_tokens(path)


@pytest.mark.parametrize(
    ("text", "error"),
    [
        (f"{TOKEN_A} app\n", "line 1: expected `token principal role`, got 2 fields"),
        (f"{TOKEN_A} app root\n", "line 1: unknown role 'root'"),
        ("short app client\n", "line 1: the token is shorter than 16 characters"),
        (f"{TOKEN_A} a client\n{TOKEN_A} b admin\n", "line 2: the token repeats"),
        ("# nothing\n", "holds no token"),
    ],
)
def test_bad_tokens_files_are_refused_naming_the_line(
    tmp_path: Path, text: str, error: str
) -> None:
    with pytest.raises(ValueError, match=error):
        load_tokens(tokens_file(tmp_path, text))


def test_a_missing_tokens_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot read the tokens file"):
        load_tokens(tmp_path / "absent")


# ---- rights ---------------------------------------------------------------------------------


def test_client_role_may_produce_and_consume_but_not_administer() -> None:
    app = Principal("app", frozenset({"client"}))
    for op in ("Produce", "Fetch", "ListOffsets", "Metadata", "InitProducerId"):
        assert authorize(app, op, Resource.topic("t")) is None
    for op in ("CreateTopics", "DeleteTopics", "DescribeTopics", "AlterTopicConfig"):
        why = authorize(app, op, Resource.topic("t"))
        assert why is not None and f"may not call {op}" in why and "role admin" in why


def test_admin_role_may_do_everything() -> None:
    ops = Principal("ops", frozenset({"admin"}))
    assert all(authorize(ops, op, CLUSTER) is None for op in OPERATIONS)
    assert authorize(ops, "Forge", CLUSTER) is not None


def test_no_role_may_do_nothing() -> None:
    nobody = Principal("nobody", frozenset())
    assert all(authorize(nobody, op, CLUSTER) is not None for op in OPERATIONS)


# ---- the guard ------------------------------------------------------------------------------


def test_an_open_guard_lets_everyone_do_everything() -> None:
    guard = Guard()
    assert not guard.enabled
    assert guard.check(FakeContext(), "CreateTopics") is ANONYMOUS


def test_guard_refuses_missing_bad_and_unknown_tokens(tmp_path: Path) -> None:
    guard = Guard(load_tokens(tokens_file(tmp_path, f"{TOKEN_A} app client\n")))
    with pytest.raises(Unauthenticated, match="requires authentication: give a bearer token"):
        guard.check(FakeContext(), "Produce")
    with pytest.raises(Unauthenticated, match="Bearer"):
        guard.check(FakeContext((("authorization", f"Basic {TOKEN_A}"),)), "Produce")
    with pytest.raises(Unauthenticated, match="does not know"):
        guard.check(bearer(TOKEN_B), "Produce")
    with pytest.raises(Unauthenticated, match="does not know"):
        guard.check(bearer("x" * 10_000), "Produce")
    assert guard.check(bearer(TOKEN_A), "Produce", Resource.topic("t")).name == "app"
    with pytest.raises(PermissionDenied) as info:
        guard.check(bearer(TOKEN_A), "CreateTopics", Resource.topic("t"))
    assert info.value.metadata == {"principal": "app", "operation": "CreateTopics"}


def cert_context(subject: str, cn: str) -> FakeContext:
    return FakeContext(auth={"x509_subject": [subject.encode()], "x509_common_name": [cn.encode()]})


def test_certificate_principal_roles_come_from_the_subject_organizations() -> None:
    guard = Guard(client_certificates=True)
    root = guard.principal(cert_context("O=admin,CN=root", "root"))
    assert root == Principal("root", frozenset({"admin"}), how="certificate")
    # No O naming a role: a certificate from the client CA makes a client.
    alice = guard.principal(cert_context("O=Example\\, Inc.,CN=alice", "alice"))
    assert alice.roles == frozenset({"client"})
    # An escaped comma does not make a role appear.
    trick = guard.principal(cert_context("O=x\\,O=admin,CN=eve", "eve"))
    assert trick.roles == frozenset({"client"})
    with pytest.raises(Unauthenticated, match="give a client certificate with a CN"):
        guard.principal(FakeContext())


def test_a_token_wins_over_the_certificate(tmp_path: Path) -> None:
    guard = Guard(
        load_tokens(tokens_file(tmp_path, f"{TOKEN_B} ops admin\n")), client_certificates=True
    )
    ctx = FakeContext(
        (("authorization", f"Bearer {TOKEN_B}"),),
        {"x509_subject": [b"CN=alice"], "x509_common_name": [b"alice"]},
    )
    assert guard.principal(ctx).name == "ops"


# ---- node flags -----------------------------------------------------------------------------

REQUIRED: dict[str, Any] = {
    "node_id": 1,
    "listen": "127.0.0.1:9092",
    "data_dir": "/d",
    "metrics_port": 9644,
}


@pytest.mark.parametrize(
    ("extra", "error"),
    [
        ({"tls_cert": "c.pem"}, "--tls-cert and --tls-key go together"),
        ({"tls_key": "k.pem"}, "--tls-cert and --tls-key go together"),
        ({"tls_client_ca": "ca.pem"}, "--tls-client-ca needs --tls-cert"),
    ],
)
def test_inconsistent_tls_flags_are_refused(extra: dict[str, str], error: str) -> None:
    with pytest.raises(ValueError, match=error):
        parse_flags({**REQUIRED, **extra})


def test_security_flags_survive_the_command_line() -> None:
    flags = parse_flags(
        {**REQUIRED, "tls_cert": "c.pem", "tls_key": "k.pem", "auth_tokens_file": "t"}
    )
    security = flags.client_security()
    assert security == ClientSecurity(Path("c.pem"), Path("k.pem"), None, Path("t"))
    assert security.argv() == [
        "--tls-cert",
        "c.pem",
        "--tls-key",
        "k.pem",
        "--auth-tokens-file",
        "t",
    ]


def test_unreadable_or_non_pem_files_are_refused_at_startup(tmp_path: Path) -> None:
    not_pem = tmp_path / "cert.txt"
    not_pem.write_text("hello")
    with pytest.raises(ValueError, match=r"--tls-cert .* is not a PEM file"):
        load_client_security(ClientSecurity(not_pem, not_pem))
    with pytest.raises(ValueError, match=r"--tls-cert .*absent"):
        load_client_security(ClientSecurity(tmp_path / "absent", not_pem))
    listener = load_client_security(ClientSecurity())
    assert listener.credentials is None and not listener.guard.enabled
    assert listener.description == "plaintext, no authentication"


# ---- client options -------------------------------------------------------------------------

PEM = b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"


def test_connection_options(tmp_path: Path) -> None:
    assert Connection.create() == Connection()
    ca = tmp_path / "ca.pem"
    ca.write_bytes(PEM)
    by_path = Connection.create(ca=ca)
    assert by_path.tls and by_path.ca == PEM
    assert Connection.create(ca=str(ca)) == by_path == Connection.create(ca=PEM)
    assert Connection.create(tls=True).ca is None
    with pytest.raises(ValueError, match="together"):
        Connection.create(client_cert=PEM)
    with pytest.raises(ValueError, match="not PEM"):
        Connection.create(ca=b"garbage")
    with pytest.raises(ValueError, match="cannot read"):
        Connection.create(ca=tmp_path / "absent")
    with pytest.raises(ValueError, match="spaces"):
        Connection.create(token="two words")
    assert "secret-token" not in repr(Connection.create(token="secret-token"))


@click.command()
@connection_options
def show() -> None:
    click.echo(json.dumps({k: str(v) for k, v in client_options().items()}, sort_keys=True))


def test_cli_connection_options(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_bytes(PEM)
    token = tmp_path / "token"
    token.write_text(" tok-123 \n")
    runner = CliRunner()
    plain = runner.invoke(show, [], env={"TIDELOG_TOKEN": ""})
    assert json.loads(plain.output) == {}
    result = runner.invoke(show, ["--tls-ca", str(ca), "--token-file", str(token)])
    assert json.loads(result.output) == {"ca": str(ca), "tls": "True", "token": "tok-123"}
    by_env = runner.invoke(show, [], env={"TIDELOG_TLS": "1", "TIDELOG_TOKEN": "tok-9"})
    assert json.loads(by_env.output) == {"tls": "True", "token": "tok-9"}
    half = runner.invoke(show, ["--tls-cert", str(ca)])
    assert half.exit_code == 2 and "go together" in half.output
    bad = runner.invoke(show, ["--tls-ca", str(token)])
    assert bad.exit_code == 2 and "not PEM" in bad.output


def test_cluster_file_records_an_optional_ca(tmp_path: Path) -> None:
    node = NodeSpec(1, 1, "127.0.0.1:1", "127.0.0.1:2", tmp_path / "n1", tmp_path / "l", ("x",))
    plain = ClusterFile(tmp_path, (node,), "1@127.0.0.1:1", 0)
    save_cluster(plain)
    assert "tls_ca" not in json.loads(plain.path.read_text())
    assert discover_tls_ca(tmp_path) is None
    save_cluster(ClusterFile(tmp_path, (node,), "1@127.0.0.1:1", 0, tls_ca=Path("ca.crt")))
    assert load_cluster(tmp_path).tls_ca == tmp_path / "ca.crt"
    assert discover_tls_ca(tmp_path) == tmp_path / "ca.crt"
