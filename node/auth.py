"""Who is calling the client API, and what they may do.

Authentication is off unless the node is started with ``--auth-tokens-file`` or
``--tls-client-ca``; then every Broker and Admin call must come from a known principal:

- a **bearer token**, sent as ``authorization: Bearer <token>`` metadata, looked up in the
  tokens file (lines ``token principal role``; the node keeps only the tokens' SHA-256);
- else the **client certificate** of a mutual-TLS connection (``--tls-client-ca``): the
  principal is its subject's CN, its roles the subject's O values that name a role, ``client``
  when none does (the client CA vouches for the subject).

A caller with neither gets UNAUTHENTICATED; a known principal whose roles do not allow the
operation gets PERMISSION_DENIED with the reason. Health and reflection are not guarded.

Rights are checked by :func:`authorize` on an (operation, resource) pair, the shape per-topic
ACLs and quotas need later: today a role allows a set of operations on every resource.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import logging
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import grpc

from tidelog.errors import PermissionDenied, Unauthenticated
from tidelog.node.settings import ClientSecurity

__all__ = [
    "ANONYMOUS",
    "AUTHORIZATION_HEADER",
    "CLUSTER",
    "OPERATIONS",
    "ROLES",
    "ClientListener",
    "Guard",
    "Principal",
    "Resource",
    "authorize",
    "load_client_security",
    "load_tokens",
]

log = logging.getLogger(__name__)

#: The metadata key a bearer token travels in (lower case, as gRPC delivers it).
AUTHORIZATION_HEADER: Final = "authorization"
_BEARER = "bearer "
#: A longer header is refused before it is hashed.
TOKEN_BYTES_MAX: Final = 4096


class Role(enum.StrEnum):
    CLIENT = "client"
    ADMIN = "admin"


#: Every operation of the client API that is guarded, by the name the servicer uses.
#: InitProducerId is listed ahead of its RPC (idempotent producers, issue 10).
CLIENT_OPERATIONS: Final = frozenset(
    {
        "Produce",
        "Fetch",
        "ListOffsets",
        "Metadata",
        "InitProducerId",
        # The Table service (node/table_service.py): reads, a client's right.
        "TableGet",
        "TableGetMany",
        "TableScan",
        "TableWatch",
        # Consumer groups (node/group_service.py): a member's calls, and the reads.
        "FindCoordinator",
        "GroupHeartbeat",
        "OffsetCommit",
        "OffsetFetch",
        "ListGroups",
        "DescribeGroup",
    }
)
ADMIN_OPERATIONS: Final = frozenset(
    {
        "CreateTopics",
        "DeleteTopics",
        "DescribeTopics",
        "AlterTopicConfig",
        "CreatePartitions",
        # A group's deletion, and offsets committed without a member (reset-offsets).
        "DeleteGroup",
        "AdminOffsetCommit",
        "DescribeCluster",
        "DrainNode",
        "RemoveNode",
        "ReassignPartition",
        "GetClusterConfig",
        "SetClusterConfig",
        "ForceRecoverPartition",
        "ForceRecoverController",
    }
)
OPERATIONS: Final = CLIENT_OPERATIONS | ADMIN_OPERATIONS

#: What each role may do. ``admin`` may do everything, the Admin service included.
ROLES: Final[Mapping[str, frozenset[str]]] = {
    Role.CLIENT: CLIENT_OPERATIONS,
    Role.ADMIN: OPERATIONS,
}


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller. ``how`` says what proved it (token, certificate, none)."""

    name: str
    roles: frozenset[str]
    how: str = "token"


#: The caller when authentication is off: allowed everything, as before authentication.
ANONYMOUS: Final = Principal("anonymous", frozenset(ROLES), how="none")


@dataclass(frozen=True, slots=True)
class Resource:
    """What an operation acts on: a topic, or the cluster (metadata, topic creation)."""

    kind: str
    name: str

    @staticmethod
    def topic(name: str) -> Resource:
        return Resource("topic", name)


CLUSTER: Final = Resource("cluster", "")


def authorize(principal: Principal, operation: str, resource: Resource) -> str | None:
    """None when ``principal`` may run ``operation`` on ``resource``, else why not.

    Today rights come from roles alone; per-topic ACLs would look ``resource`` up here."""
    if operation not in OPERATIONS:
        return f"{operation} is not an operation a client may be granted"
    if any(operation in ROLES.get(role, frozenset()) for role in principal.roles):
        return None
    needs = sorted(r for r, ops in ROLES.items() if operation in ops)
    have = ", ".join(sorted(principal.roles)) or "no role"
    return (
        f"principal {principal.name!r} ({have}) may not call {operation}: it needs the role "
        f"{' or '.join(needs)}"
    )


def _digest(token: str | bytes) -> bytes:
    raw = token.encode() if isinstance(token, str) else token
    return hashlib.sha256(raw).digest()


def load_tokens(path: Path) -> dict[bytes, Principal]:
    """Read a tokens file: ``token principal role`` per line, ``#`` comments and blank lines
    allowed. Returns SHA-256(token) -> principal; ValueError names the line that is wrong."""
    try:
        mode = os.stat(path).st_mode
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"cannot read the tokens file {path}: {exc.strerror or exc}") from None
    if mode & (stat.S_IRGRP | stat.S_IROTH):
        log.warning("the tokens file %s is readable by other users: chmod 600 it", path)
    out: dict[bytes, Principal] = {}
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        where = f"{path} line {number}"
        if len(fields) != 3:
            raise ValueError(f"{where}: expected `token principal role`, got {len(fields)} fields")
        token, name, role = fields
        if role not in ROLES:
            raise ValueError(f"{where}: unknown role {role!r} (roles: {', '.join(ROLES)})")
        if len(token) < 16:
            raise ValueError(f"{where}: the token is shorter than 16 characters")
        key = _digest(token)
        if key in out:
            raise ValueError(f"{where}: the token repeats an earlier line's")
        out[key] = Principal(name, frozenset({role}), how="token")
    if not out:
        raise ValueError(f"the tokens file {path} holds no token")
    return out


def _subject_fields(subject: str) -> list[tuple[str, str]]:
    """``O=admin,CN=alice`` (RFC 4514, as gRPC reports x509_subject) -> [(O, admin), ...]."""
    out: list[tuple[str, str]] = []
    part: list[str] = []
    chars = iter(subject)
    for ch in chars:
        if ch == "\\":
            part.append(next(chars, ""))
        elif ch in ",+":
            out.append(_field("".join(part)))
            part = []
        else:
            part.append(ch)
    if part:
        out.append(_field("".join(part)))
    return out


def _field(text: str) -> tuple[str, str]:
    key, _, value = text.partition("=")
    return key.strip().upper(), value.strip()


@functools.lru_cache(maxsize=1024)
def _certificate_principal(subject: str, common_name: str) -> Principal:
    roles = frozenset(v for k, v in _subject_fields(subject) if k == "O" and v in ROLES)
    return Principal(common_name, roles or frozenset({Role.CLIENT}), how="certificate")


def _first(auth_context: Mapping[str, Any], key: str) -> str:
    values = auth_context.get(key) or ()
    for value in values:
        return value.decode() if isinstance(value, bytes) else str(value)
    return ""


class Guard:
    """The check at the top of every Broker and Admin method: who calls (:meth:`principal`)
    and whether they may (:meth:`check`). ``Guard()`` lets everyone do everything."""

    def __init__(
        self,
        tokens: Mapping[bytes, Principal] | None = None,
        *,
        client_certificates: bool = False,
    ) -> None:
        self._tokens = dict(tokens or {})
        self.client_certificates = client_certificates
        #: Whether bearer tokens are accepted.
        self.tokens = bool(self._tokens)
        self.enabled = bool(self._tokens) or client_certificates

    def principal(self, context: Any) -> Principal:
        """The authenticated caller of ``context`` (a grpc.aio ServicerContext)."""
        if not self.enabled:
            return ANONYMOUS
        header = ""
        for key, value in context.invocation_metadata() or ():
            if key == AUTHORIZATION_HEADER:
                header = value if isinstance(value, str) else value.decode("latin-1")
                break
        if header:
            if not header[: len(_BEARER)].lower() == _BEARER:
                raise Unauthenticated("the authorization header is not `Bearer <token>`")
            if len(header) > TOKEN_BYTES_MAX or not self._tokens:
                raise Unauthenticated("this node does not know the bearer token given")
            found = self._tokens.get(_digest(header[len(_BEARER) :].strip()))
            if found is None:
                raise Unauthenticated("this node does not know the bearer token given")
            return found
        if self.client_certificates:
            auth = context.auth_context()
            name = _first(auth, "x509_common_name")
            if name:
                return _certificate_principal(_first(auth, "x509_subject"), name)
        ways = []
        if self.tokens:
            ways.append("a bearer token (token= / --token-file / TIDELOG_TOKEN)")
        if self.client_certificates:
            ways.append("a client certificate with a CN (client_cert= / --tls-cert)")
        raise Unauthenticated(f"this node requires authentication: give {' or '.join(ways)}")

    def check(self, context: Any, operation: str, resource: Resource = CLUSTER) -> Principal:
        """The caller, if it may run ``operation`` on ``resource``; else Unauthenticated or
        PermissionDenied (TidelogErrors: the servicer's decorator turns them into statuses)."""
        if not self.enabled:
            return ANONYMOUS
        principal = self.principal(context)
        why = authorize(principal, operation, resource)
        if why is not None:
            raise PermissionDenied(why, principal=principal.name, operation=operation)
        return principal


@dataclass(frozen=True, slots=True)
class ClientListener:
    """What the client listener needs from its security flags: the TLS credentials to bind
    with (None: plaintext) and the guard of the Broker and Admin services."""

    credentials: grpc.ServerCredentials | None
    guard: Guard

    @property
    def description(self) -> str:
        tls = "plaintext" if self.credentials is None else "TLS"
        if self.guard.client_certificates:
            tls = "mutual TLS"
        auth = "authentication required" if self.guard.enabled else "no authentication"
        return f"{tls}, {auth}"


def _read(flag: str, path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"{flag} {path}: {exc.strerror or exc}") from None
    if b"-----BEGIN " not in data:
        raise ValueError(f"{flag} {path} is not a PEM file")
    return data


def load_client_security(security: ClientSecurity) -> ClientListener:
    """Read the files the flags name; ValueError says which flag's file is wrong."""
    problem = security.problem()
    if problem is not None:
        raise ValueError(problem)
    credentials: grpc.ServerCredentials | None = None
    if security.tls_cert is not None and security.tls_key is not None:
        chain = _read("--tls-cert", security.tls_cert)
        key = _read("--tls-key", security.tls_key)
        client_ca = (
            _read("--tls-client-ca", security.tls_client_ca)
            if security.tls_client_ca is not None
            else None
        )
        credentials = grpc.ssl_server_credentials(
            [(key, chain)], root_certificates=client_ca, require_client_auth=client_ca is not None
        )
    tokens = (
        load_tokens(security.auth_tokens_file) if security.auth_tokens_file is not None else None
    )
    guard = Guard(tokens, client_certificates=security.tls_client_ca is not None)
    return ClientListener(credentials, guard)
