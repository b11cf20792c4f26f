"""The node's command-line settings: one table from which both entry points are built.

``python -m tidelog.node`` builds its argparse parser from :data:`NODE_FLAGS`
(:func:`add_arguments`), ``tidelog node start`` builds its click options from the same table
(tidelog/ops/cli.py), and every command line that starts a node (the allocator re-exec in
node/main.py, the local cluster, the tests) is rendered by :func:`to_argv`. Values from
either parser are checked once, by :func:`parse_flags`, so both accept and refuse the same
command lines. docs/configuration.md describes each flag.

This module imports nothing but the standard library: it is read before the node's
dependencies load.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

__all__ = [
    "ELECTION_TIMEOUT_MS_DEFAULT",
    "HEARTBEAT_INTERVAL_MS_DEFAULT",
    "LOG_LEVELS",
    "NODE_DEAD_MS_DEFAULT",
    "NODE_FLAGS",
    "ClientSecurity",
    "NodeFlag",
    "NodeFlags",
    "add_arguments",
    "parse_flags",
    "to_argv",
]

#: Defaults of the cluster flags.
ELECTION_TIMEOUT_MS_DEFAULT: Final = 1_000
HEARTBEAT_INTERVAL_MS_DEFAULT: Final = 100
NODE_DEAD_MS_DEFAULT: Final = 3_000
LOG_LEVELS: Final = ("debug", "info", "warning", "error")
PORT_MAX: Final = 65535

#: "path" is a directory, "file" a file.
Kind = Literal["int", "str", "path", "file"]


@dataclass(frozen=True, slots=True)
class NodeFlag:
    """One flag of the node: its name, the parameter it fills, its type, default and limits."""

    name: str
    dest: str
    kind: Kind
    help: str
    default: int | str | None = None
    required: bool = False
    #: Inclusive bounds of an int flag.
    min: int | None = None
    max: int | None = None
    choices: tuple[str, ...] = ()
    metavar: str | None = None

    def problem(self, value: object) -> str | None:
        """Why ``value`` is not acceptable for this flag, or None."""
        if value is None:
            return f"{self.name} is required" if self.required else None
        if self.kind == "int":
            if not isinstance(value, int) or isinstance(value, bool):
                return f"{self.name} must be an integer, got {value!r}"
            if self.min is not None and self.max is not None:
                if not self.min <= value <= self.max:
                    return f"{self.name} must be in {self.min}..{self.max}, got {value}"
            elif self.min is not None and value < self.min:
                return f"{self.name} must be >= {self.min}, got {value}"
        if self.choices and value not in self.choices:
            return f"{self.name} must be one of {', '.join(self.choices)}, got {value!r}"
        return None


NODE_FLAGS: Final[tuple[NodeFlag, ...]] = (
    NodeFlag("--id", "node_id", "int", "Node id, unique in the cluster.", required=True, min=1),
    NodeFlag(
        "--listen", "listen", "str", "gRPC host:port to listen on (port 0: any free).",
        required=True,
    ),
    NodeFlag(
        "--data-dir", "data_dir", "path", "Where the node keeps its logs and metadata.",
        required=True,
    ),
    NodeFlag(
        "--metrics-port", "metrics_port", "int", "Prometheus port (0: any free).",
        required=True, min=0, max=PORT_MAX,
    ),
    NodeFlag("--advertised", "advertised", "str", "host:port clients dial (default: --listen)."),
    NodeFlag(
        "--internal-listen", "internal_listen", "str",
        "host:port of the internal listener, which alone serves the node-to-node Raft and "
        "Cluster services (default: the host of --listen, any free port).",
    ),
    NodeFlag(
        "--internal-advertised", "internal_advertised", "str",
        "host:port the other nodes dial (default: --internal-listen).",
    ),
    NodeFlag(
        "--internal-ca", "internal_ca", "file",
        "PEM file of the cluster CA: node-to-node mutual TLS (with --internal-cert/-key).",
    ),
    NodeFlag(
        "--internal-cert", "internal_cert", "file",
        "PEM certificate of this node, signed by the cluster CA, naming node-ID.",
    ),
    NodeFlag("--internal-key", "internal_key", "file", "PEM private key of --internal-cert."),
    NodeFlag(
        "--cluster-secret-file", "cluster_secret_file", "file",
        "File holding the cluster secret that authenticates nodes without TLS (or set "
        "TIDELOG_CLUSTER_SECRET); never pass the secret itself on the command line.",
    ),
    NodeFlag("--log-level", "log_level", "str", "Log level.", default="info", choices=LOG_LEVELS),
    NodeFlag(
        "--controller-voters", "controller_voters", "str",
        "The controller's Raft voters, the same list on every node (default: this node "
        "alone, a one-node cluster); every other node follows the metadata log as a learner.",
        metavar="ID@HOST:PORT,...",
    ),
    NodeFlag(
        "--election-timeout-ms", "election_timeout_ms", "int",
        "Raft election timeout (followers wait a random time in [T, 1.5T)).",
        default=ELECTION_TIMEOUT_MS_DEFAULT, min=1,
    ),
    NodeFlag(
        "--heartbeat-interval-ms", "heartbeat_interval_ms", "int",
        "Raft leader heartbeat interval.", default=HEARTBEAT_INTERVAL_MS_DEFAULT, min=1,
    ),
    NodeFlag(
        "--node-dead-ms", "node_dead_ms", "int",
        "The controller marks a node dead after this much silence.",
        default=NODE_DEAD_MS_DEFAULT, min=1,
    ),
    NodeFlag(
        "--cluster-id", "cluster_id", "str",
        "Cluster id (default: derived from the controller voters' ids).",
    ),
    NodeFlag(
        "--rack", "rack", "str",
        "Failure domain of this node (a partition's replicas go to distinct racks).",
    ),
    # -- the client listener's security (node/auth.py; docs/configuration.md#tls-and-authentication)
    NodeFlag(
        "--tls-cert", "tls_cert", "file",
        "PEM certificate (chain) of the client listener: clients connect with TLS.",
    ),
    NodeFlag("--tls-key", "tls_key", "file", "PEM private key of --tls-cert."),
    NodeFlag(
        "--tls-client-ca", "tls_client_ca", "file",
        "PEM CA of client certificates: clients must present one it signed (mutual TLS); "
        "its CN names the client, its O values that name a role (client, admin) its roles.",
    ),
    NodeFlag(
        "--auth-tokens-file", "auth_tokens_file", "file",
        "File of `token principal role` lines: clients authenticate with a bearer token "
        "(roles: client, admin). Tokens are never given on the command line.",
    ),
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class NodeFlags:
    """The values of :data:`NODE_FLAGS`, checked (one field per flag, named by its dest)."""

    node_id: int
    listen: str
    data_dir: Path
    metrics_port: int
    advertised: str | None
    log_level: str
    controller_voters: str | None
    election_timeout_ms: int
    heartbeat_interval_ms: int
    node_dead_ms: int
    cluster_id: str | None
    rack: str | None
    internal_listen: str | None = None
    internal_advertised: str | None = None
    internal_ca: Path | None = None
    internal_cert: Path | None = None
    internal_key: Path | None = None
    cluster_secret_file: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    auth_tokens_file: Path | None = None

    def client_security(self) -> ClientSecurity:
        return ClientSecurity(
            self.tls_cert, self.tls_key, self.tls_client_ca, self.auth_tokens_file
        )


@dataclass(frozen=True, slots=True)
class ClientSecurity:
    """The client listener's TLS and authentication flags (all None: plaintext, everyone
    may do everything, as before). :func:`tidelog.node.auth.load_client_security` reads the
    files."""

    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    auth_tokens_file: Path | None = None

    def problem(self) -> str | None:
        if (self.tls_cert is None) != (self.tls_key is None):
            return "--tls-cert and --tls-key go together"
        if self.tls_client_ca is not None and self.tls_cert is None:
            return "--tls-client-ca needs --tls-cert and --tls-key (mutual TLS is TLS)"
        return None

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    def argv(self) -> list[str]:
        return to_argv(
            {
                "tls_cert": self.tls_cert,
                "tls_key": self.tls_key,
                "tls_client_ca": self.tls_client_ca,
                "auth_tokens_file": self.auth_tokens_file,
            }
        )


def parse_flags(values: Mapping[str, object]) -> NodeFlags:
    """Check parsed values (by dest; a missing optional flag takes its default) and return
    them typed. ValueError names the first flag that is wrong."""
    known = {f.dest for f in NODE_FLAGS}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown node setting(s): {', '.join(unknown)}")
    out: dict[str, object] = {}
    for flag in NODE_FLAGS:
        value = values.get(flag.dest, flag.default)
        problem = flag.problem(value)
        if problem is not None:
            raise ValueError(problem)
        if flag.kind in ("path", "file") and value is not None:
            value = Path(str(value))
        out[flag.dest] = value
    flags = NodeFlags(**out)  # type: ignore[arg-type]
    problem = flags.client_security().problem()
    if problem is not None:
        raise ValueError(problem)
    return flags


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add every flag of the table to an argparse parser (checks: :func:`parse_flags`)."""
    types = {"int": int, "str": str, "path": Path, "file": Path}
    for flag in NODE_FLAGS:
        help_text = flag.help
        if flag.default is not None:
            help_text = f"{help_text.removesuffix('.')} (default {flag.default})."
        parser.add_argument(
            flag.name,
            dest=flag.dest,
            type=types[flag.kind],
            required=flag.required,
            default=flag.default,
            choices=list(flag.choices) or None,
            metavar=flag.metavar,
            help=help_text,
        )


def to_argv(values: Mapping[str, object]) -> list[str]:
    """The flags for ``values`` (by dest), in table order; None values are left out."""
    by_dest = {f.dest: f for f in NODE_FLAGS}
    unknown = sorted(set(values) - set(by_dest))
    if unknown:
        raise ValueError(f"unknown node setting(s): {', '.join(unknown)}")
    out: list[str] = []
    for flag in NODE_FLAGS:
        value = values.get(flag.dest)
        if value is not None:
            out += [flag.name, str(value)]
    return out
