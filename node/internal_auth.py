"""How nodes authenticate each other on the internal listener (``Raft`` and ``Cluster``).

Three modes, chosen at start from the node's flags (:func:`load_internal_auth`):

* **mutual TLS** (``--internal-ca``, ``--internal-cert``, ``--internal-key``): the internal
  listener asks every caller for a certificate signed by the cluster CA, and the node's own
  channels to its peers present the node's certificate. The node id is bound to the
  certificate: its subject CN is ``node-N`` and it carries the SAN URI ``tidelog://node/N``
  (tidelog/ops/certs.py makes such certificates). An expired certificate, one of another CA
  or none at all fails the TLS handshake.
* **cluster secret** (``--cluster-secret-file`` or ``TIDELOG_CLUSTER_SECRET``; never a
  command-line value, which other users can read in ``ps``): a development mode without
  certificates. Every internal call carries the metadata ``tidelog-node`` (the sender's id),
  ``tidelog-ts`` (its clock, ms) and ``tidelog-mac``, the hex HMAC-SHA256 under the secret of
  ``node|method|ts``. The receiver recomputes it and refuses a wrong MAC or a timestamp more
  than ``secret_clock_skew_ms`` away from its own clock; the node id is then bound by the
  MAC. (A captured call can be replayed within the skew; TLS has no such window.)
* **none**: no authentication. Allowed only when the internal listener is on a loopback
  address (a node started otherwise refuses to start, naming the flags).

Whatever the mode, :meth:`InternalAuth.peer_id` answers who called (the node id, or None in
mode none) and :meth:`InternalAuth.check_sender` refuses a request whose claimed sender (a
RaftBatch's ``from_node``, a heartbeat's ``node_id``, a RegisterNode's id, a Forward's
``from_node``) is not that node, with PERMISSION_DENIED and the reason.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import ipaddress
import os
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Final

import grpc
from grpc import aio

from tidelog.errors import TidelogError

#: Environment variable that may carry the cluster secret (instead of a file).
SECRET_ENV: Final = "TIDELOG_CLUSTER_SECRET"
#: A cluster secret shorter than this is refused (it would be guessable).
SECRET_BYTES_MIN: Final = 16
#: How far the sender's timestamp may lie from the receiver's clock.
secret_clock_skew_ms: Final = 30_000
#: Metadata keys of the cluster-secret mode.
MD_NODE: Final = "tidelog-node"
MD_TS: Final = "tidelog-ts"
MD_MAC: Final = "tidelog-mac"
#: The certificate's subject CN and SAN URI that name node N.
CN_PREFIX: Final = "node-"
URI_PREFIX: Final = "tidelog://node/"

_CN_RE: Final = re.compile(r"node-([1-9][0-9]{0,9})")
_URI_RE: Final = re.compile(r"tidelog://node/([1-9][0-9]{0,9})")
_Context = aio.ServicerContext[Any, Any]


class Unauthenticated(TidelogError):
    """An internal call without valid credentials."""

    reason: ClassVar[str] = "PEER_NOT_AUTHENTICATED"
    code: ClassVar[grpc.StatusCode] = grpc.StatusCode.UNAUTHENTICATED


class SenderMismatch(TidelogError):
    """An authenticated node claimed to be another one."""

    reason: ClassVar[str] = "SENDER_MISMATCH"
    code: ClassVar[grpc.StatusCode] = grpc.StatusCode.PERMISSION_DENIED


class AuthConfigError(Exception):
    """The authentication flags are inconsistent or their files unreadable; says which."""


class Mode(enum.StrEnum):
    TLS = "tls"
    SECRET = "secret"
    NONE = "none"


def node_id_from_names(common_names: Sequence[str], uris: Sequence[str]) -> int | None:
    """The node id a certificate names: its SAN URI ``tidelog://node/N`` or else its CN
    ``node-N``; None when it names none (or two different ones)."""
    ids = {int(m.group(1)) for u in uris if (m := _URI_RE.fullmatch(u))}
    if not ids:
        ids = {int(m.group(1)) for c in common_names if (m := _CN_RE.fullmatch(c))}
    return ids.pop() if len(ids) == 1 else None


def mac(secret: bytes, node_id: int, method: str, ts_ms: int) -> str:
    return hmac.new(secret, f"{node_id}|{method}|{ts_ms}".encode(), hashlib.sha256).hexdigest()


def hello_mac(secret: bytes, nonce: bytes, from_node: int, to_node: int, cluster_id: str) -> bytes:
    """RaftHello.mac (proto/tidelog/v1/raft.proto, The TCP listener): bound to the
    listener's fresh nonce, so a captured handshake cannot be replayed."""
    msg = b"raft-tcp|" + nonce + f"|{from_node}|{to_node}|{cluster_id}".encode()
    return hmac.new(secret, msg, hashlib.sha256).digest()


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True, slots=True)
class TlsFiles:
    ca: bytes
    cert: bytes
    key: bytes


class InternalAuth:
    """The node's side of internal authentication: credentials for its listener and its
    channels, call metadata, and the check of who called."""

    def __init__(
        self,
        node_id: int,
        *,
        tls: TlsFiles | None = None,
        secret: bytes | None = None,
        clock_ms: Any = None,
    ) -> None:
        if tls is not None and secret is not None:
            raise AuthConfigError("use either TLS or a cluster secret for nodes, not both")
        if secret is not None and len(secret) < SECRET_BYTES_MIN:
            raise AuthConfigError(
                f"the cluster secret has {len(secret)} bytes; at least {SECRET_BYTES_MIN} needed"
            )
        self.node_id = node_id
        self.tls = tls
        self._secret = secret
        self._clock_ms = clock_ms or (lambda: time.time_ns() // 1_000_000)
        self.mode = Mode.TLS if tls else Mode.SECRET if secret else Mode.NONE

    # ---- the listener and the channels -------------------------------------------------------

    def server_credentials(self) -> grpc.ServerCredentials | None:
        """TLS credentials that require a client certificate of the cluster CA, or None."""
        if self.tls is None:
            return None
        return grpc.ssl_server_credentials(
            [(self.tls.key, self.tls.cert)],
            root_certificates=self.tls.ca,
            require_client_auth=True,
        )

    def channel(self, address: str, options: Sequence[tuple[str, Any]] = ()) -> aio.Channel:
        """A channel to a peer's internal listener, presenting this node's certificate."""
        if self.tls is None:
            return aio.insecure_channel(address, options=options)
        creds = grpc.ssl_channel_credentials(
            root_certificates=self.tls.ca,
            private_key=self.tls.key,
            certificate_chain=self.tls.cert,
        )
        return aio.secure_channel(address, creds, options=options)

    def call_metadata(self, method: str) -> tuple[tuple[str, str], ...] | None:
        """Metadata for an internal call of ``method`` (``/pkg.Service/Method``)."""
        if self._secret is None:
            return None
        ts = self._clock_ms()
        return (
            (MD_NODE, str(self.node_id)),
            (MD_TS, str(ts)),
            (MD_MAC, mac(self._secret, self.node_id, method, ts)),
        )

    # ---- the receiving side -------------------------------------------------------------------

    def peer_id(self, context: _Context, method: str) -> int | None:
        """The node that made this call; None in mode none. Raises Unauthenticated."""
        if self.mode is Mode.TLS:
            props = context.auth_context()
            cns = [v.decode(errors="replace") for v in props.get("x509_common_name", [])]
            sans = [
                v.decode(errors="replace")
                for key in ("x509_subject_alternative_name", "peer_uri")
                for v in props.get(key, [])
            ]
            nid = node_id_from_names(cns, sans)
            if nid is None:
                raise Unauthenticated(
                    f"the peer's certificate names no node (CN {cns!r}): internal calls need "
                    "a node certificate of the cluster CA (`tidelog certs node`)"
                )
            return nid
        if self.mode is Mode.SECRET:
            assert self._secret is not None
            md = {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}
            node, ts, got = md.get(MD_NODE), md.get(MD_TS), md.get(MD_MAC)
            if node is None or ts is None or got is None:
                raise Unauthenticated(
                    f"internal call {method} carries no cluster-secret authentication: the "
                    "caller has no --cluster-secret-file (or another secret)"
                )
            if not (node.isascii() and node.isdigit() and ts.isascii() and ts.isdigit()):
                raise Unauthenticated("malformed cluster-secret authentication metadata")
            nid, ts_ms = int(node), int(ts)
            if not hmac.compare_digest(mac(self._secret, nid, method, ts_ms), got):
                raise Unauthenticated(
                    f"internal call {method} from node {nid}: the cluster-secret MAC is wrong "
                    "(the caller uses another cluster secret)"
                )
            skew = abs(self._clock_ms() - ts_ms)
            if skew > secret_clock_skew_ms:
                raise Unauthenticated(
                    f"internal call {method} from node {nid}: its timestamp is {skew} ms off "
                    f"this node's clock (at most {secret_clock_skew_ms} ms allowed)"
                )
            return nid
        return None

    # ---- the Raft TCP listener (node/raft_tcp.py) -----------------------------------------

    def hello_mac(self, nonce: bytes, to_node: int, cluster_id: str) -> bytes:
        """RaftHello.mac of this node for a listener's challenge; empty without a secret."""
        if self._secret is None:
            return b""
        return hello_mac(self._secret, nonce, self.node_id, to_node, cluster_id)

    def hello_peer(
        self, nonce: bytes, from_node: int, to_node: int, cluster_id: str, got: bytes
    ) -> int | None:
        """Under a cluster secret, the node a RaftHello authenticates (its ``from_node``);
        None in the other modes (TLS names the caller in its certificate). Raises
        Unauthenticated."""
        if self.mode is not Mode.SECRET:
            return None
        assert self._secret is not None
        if not got:
            raise Unauthenticated(
                f"a raft connection from node {from_node} carries no cluster-secret "
                "authentication: the caller has no --cluster-secret-file (or another secret)"
            )
        want = hello_mac(self._secret, nonce, from_node, to_node, cluster_id)
        if not hmac.compare_digest(want, got):
            raise Unauthenticated(
                f"a raft connection from node {from_node}: the cluster-secret MAC is wrong "
                "(the caller uses another cluster secret)"
            )
        return from_node

    def check_sender(self, peer: int | None, claimed: int, what: str) -> None:
        """Refuse ``what`` claiming to come from ``claimed`` when the peer is another node."""
        if peer is not None and peer != claimed:
            raise SenderMismatch(
                f"{what} claims to come from node {claimed}, but the caller authenticated as "
                f"node {peer}"
            )


async def abort(context: _Context, err: TidelogError) -> None:
    from tidelog.errors import trailing_metadata

    await context.abort(err.code, err.message, trailing_metadata=trailing_metadata(err))


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise AuthConfigError(f"cannot read {what} {path}: {exc.strerror or exc}") from None


def load_internal_auth(
    node_id: int,
    *,
    ca: Path | None,
    cert: Path | None,
    key: Path | None,
    secret_file: Path | None,
    environ: Mapping[str, str] | None = None,
) -> InternalAuth:
    """The node's internal authentication from its flags and environment."""
    env = os.environ if environ is None else environ
    tls_given = [n for n, v in (("--internal-ca", ca), ("--internal-cert", cert),
                                ("--internal-key", key)) if v is not None]  # fmt: skip
    secret: bytes | None = None
    if secret_file is not None:
        secret = _read(secret_file, "--cluster-secret-file").strip()
    elif env.get(SECRET_ENV):
        secret = env[SECRET_ENV].strip().encode()
    if tls_given:
        if len(tls_given) != 3:
            missing = {"--internal-ca", "--internal-cert", "--internal-key"} - set(tls_given)
            raise AuthConfigError(
                f"node TLS needs --internal-ca, --internal-cert and --internal-key; missing "
                f"{', '.join(sorted(missing))}"
            )
        if secret is not None:
            raise AuthConfigError(
                "give either node TLS (--internal-ca/--internal-cert/--internal-key) or a "
                f"cluster secret (--cluster-secret-file or {SECRET_ENV}), not both"
            )
        assert ca is not None and cert is not None and key is not None
        files = TlsFiles(
            _read(ca, "--internal-ca"), _read(cert, "--internal-cert"), _read(key, "--internal-key")
        )
        _check_own_certificate(node_id, files.cert, cert)
        return InternalAuth(node_id, tls=files)
    if secret is not None:
        return InternalAuth(node_id, secret=secret)
    return InternalAuth(node_id)


def _check_own_certificate(node_id: int, pem: bytes, path: Path) -> None:
    """The node's certificate must name this node: a misplaced file is a startup error,
    not a cluster whose every peer refuses us."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError as exc:
        raise AuthConfigError(f"--internal-cert {path} is not a PEM certificate: {exc}") from None
    cns = [str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        uris = ext.value.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    named = node_id_from_names(cns, uris)
    if named != node_id:
        raise AuthConfigError(
            f"--internal-cert {path} is for {'no node' if named is None else f'node {named}'}"
            f", not node {node_id}: `tidelog certs node --id {node_id}` makes one"
        )


__all__ = [
    "MD_MAC",
    "MD_NODE",
    "MD_TS",
    "SECRET_ENV",
    "AuthConfigError",
    "InternalAuth",
    "Mode",
    "SenderMismatch",
    "TlsFiles",
    "Unauthenticated",
    "abort",
    "hello_mac",
    "is_loopback",
    "load_internal_auth",
    "mac",
    "node_id_from_names",
]
