"""The cluster CA and the node certificates for node-to-node mutual TLS.

``tidelog certs ca --out DIR`` writes ``DIR/ca.crt`` and ``DIR/ca.key``; ``tidelog certs node
--id N --ca DIR --host H ... --out DIR`` writes ``DIR/node-N.crt`` and ``DIR/node-N.key``,
signed by that CA. ``tidelog cluster up`` does both in ``CLUSTER_DIR/certs/`` for a local
cluster. A node runs with ``--internal-ca ca.crt --internal-cert node-N.crt --internal-key
node-N.key``.

A node certificate binds the node id (node/internal_auth.py reads it back): subject CN ``node-N`` and
the SAN URI ``tidelog://node/N``, plus a DNS or IP SAN for every ``--host`` the peers dial
(gRPC checks the dialled host against them). It may serve as both TLS server and client.
Keys are EC P-256, written with mode 0600; nothing here is encrypted at rest.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tidelog.node.internal_auth import CN_PREFIX, URI_PREFIX

CA_CERT: Final = "ca.crt"
CA_KEY: Final = "ca.key"
CA_DAYS_DEFAULT: Final = 3650
NODE_DAYS_DEFAULT: Final = 825
#: Hosts a local cluster's node certificates name.
LOCAL_HOSTS: Final = ("127.0.0.1", "localhost")


class CertError(Exception):
    """A certificate cannot be made; the message says why."""


@dataclass(frozen=True, slots=True)
class NodeCertFiles:
    cert: Path
    key: Path


def node_cert_name(node_id: int) -> str:
    return f"node-{node_id}.crt"


def node_key_name(node_id: int) -> str:
    return f"node-{node_id}.key"


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _write(path: Path, data: bytes, *, private: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    fd = os.open(path, flags, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


_CA_KEY_USAGE: Final = x509.KeyUsage(
    digital_signature=True,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=True,
    crl_sign=True,
    encipher_only=False,
    decipher_only=False,
)


def create_ca(out: Path, *, name: str = "tidelog cluster CA", days: int = CA_DAYS_DEFAULT) -> Path:
    """A new self-signed CA in ``out`` (ca.crt, ca.key); refuses to overwrite one."""
    if (out / CA_KEY).exists():
        raise CertError(f"{out / CA_KEY} exists: refusing to replace a cluster CA")
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_CA_KEY_USAGE, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write(out / CA_KEY, _key_pem(key), private=True)
    _write(out / CA_CERT, cert.public_bytes(serialization.Encoding.PEM), private=False)
    return out / CA_CERT


def _load_ca(ca_dir: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    try:
        cert = x509.load_pem_x509_certificate((ca_dir / CA_CERT).read_bytes())
        key = serialization.load_pem_private_key((ca_dir / CA_KEY).read_bytes(), password=None)
    except OSError as exc:
        raise CertError(
            f"cannot read the CA in {ca_dir}: {exc.strerror or exc} "
            "(`tidelog certs ca --out DIR` makes one)"
        ) from None
    except ValueError as exc:
        raise CertError(f"the CA in {ca_dir} is not a PEM certificate and key: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertError(f"{ca_dir / CA_KEY} is not an EC key made by `tidelog certs ca`")
    return cert, key


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        return x509.DNSName(host)


def create_node_cert(
    ca_dir: Path,
    node_id: int,
    hosts: Sequence[str],
    out: Path,
    *,
    days: int = NODE_DAYS_DEFAULT,
    not_before: datetime.datetime | None = None,
    not_after: datetime.datetime | None = None,
) -> NodeCertFiles:
    """A certificate for node ``node_id`` signed by the CA in ``ca_dir``, valid for
    ``hosts``; written to ``out/node-N.crt`` and ``out/node-N.key``. ``not_before`` and
    ``not_after`` override the validity (tests make expired certificates with them)."""
    if node_id < 1:
        raise CertError(f"node id must be at least 1, got {node_id}")
    if not hosts:
        raise CertError("a node certificate needs at least one --host its peers dial")
    ca_cert, ca_key = _load_ca(ca_dir)
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    start = not_before or now - datetime.timedelta(minutes=5)
    end = not_after or now + datetime.timedelta(days=days)
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(f"{URI_PREFIX}{node_id}")]
    names += [_san(h) for h in dict.fromkeys(hosts)]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{CN_PREFIX}{node_id}")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    files = NodeCertFiles(out / node_cert_name(node_id), out / node_key_name(node_id))
    _write(files.key, _key_pem(key), private=True)
    _write(files.cert, cert.public_bytes(serialization.Encoding.PEM), private=False)
    return files


def local_cluster_certs(directory: Path, node_ids: Sequence[int]) -> dict[int, NodeCertFiles]:
    """The CA (made once) and one certificate per node in ``directory`` for a local cluster
    on 127.0.0.1; existing node certificates are kept."""
    if not (directory / CA_KEY).exists():
        create_ca(directory, name="tidelog local cluster CA")
    out: dict[int, NodeCertFiles] = {}
    for i in node_ids:
        files = NodeCertFiles(directory / node_cert_name(i), directory / node_key_name(i))
        if not (files.cert.exists() and files.key.exists()):
            files = create_node_cert(directory, i, LOCAL_HOSTS, directory)
        out[i] = files
    return out


__all__ = [
    "CA_CERT",
    "CA_KEY",
    "LOCAL_HOSTS",
    "CertError",
    "NodeCertFiles",
    "create_ca",
    "create_node_cert",
    "local_cluster_certs",
    "node_cert_name",
    "node_key_name",
]
