"""The node's settings: one table from which the flags, the environment variables and the
configuration file's keys are all built.

``python -m tidelog.node`` builds its argparse parser from :data:`NODE_FLAGS`
(:func:`add_arguments`), ``tidelog node start`` builds its click options from the same table
(tidelog/ops/cli.py), and every command line that starts a node (the allocator re-exec in
node/main.py, the local cluster, the tests) is rendered by :func:`to_argv`. Each setting
``--some-name`` is also the key ``some_name`` of a TOML file (``--config node.toml``) and the
environment variable ``TIDELOG_NODE_SOME_NAME``; :func:`resolve` merges them, a flag over the
environment over the file over the default, and remembers where each value came from
(``tidelog node config --print``). Values are checked once, by :func:`parse_flags` (and, with
the name the user wrote, by :func:`resolve`), so every way in accepts and refuses the same
values. docs/configuration.md describes each setting.

The environment prefix is ``TIDELOG_NODE_`` (not ``TIDELOG_``) because the CLI already reads
``TIDELOG_TLS_CERT``, ``TIDELOG_TLS_KEY``, ... as its own client-side settings; and
``TIDELOG_CLUSTER_SECRET`` keeps its meaning, the cluster secret itself
(node/internal_auth.py), never a setting's value.

This module imports nothing but the standard library: it is read before the node's
dependencies load.
"""

from __future__ import annotations

import argparse
import re
import socket
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

__all__ = [
    "ELECTION_TIMEOUT_MS_DEFAULT",
    "ENV_PREFIX",
    "HEARTBEAT_INTERVAL_MS_DEFAULT",
    "LOG_FORMATS",
    "LOG_LEVELS",
    "NODE_DEAD_MS_DEFAULT",
    "NODE_FLAGS",
    "ClientSecurity",
    "NodeFlag",
    "NodeFlags",
    "Resolved",
    "add_arguments",
    "id_from_hostname",
    "parse_flags",
    "resolve",
    "to_argv",
]

#: Defaults of the cluster flags.
ELECTION_TIMEOUT_MS_DEFAULT: Final = 1_000
HEARTBEAT_INTERVAL_MS_DEFAULT: Final = 100
NODE_DEAD_MS_DEFAULT: Final = 3_000
CLEANER_IO_BYTES_PER_SECOND_DEFAULT: Final = 64 * 1024 * 1024
CLEANER_MAP_BYTES_DEFAULT: Final = 64 * 1024 * 1024
CLEANER_INTERVAL_MS_DEFAULT: Final = 15_000
#: ``replica.recovery.bytes.per.second``'s default: 40 MiB/s. At 100 MiB/s a copy of a 1 GiB
#: node on a 2-core machine held a live 20 MiB/s producer to 0.47 of its rate; at 40 MiB/s
#: it kept 1.00 of it and the copy took 17 s instead of 8 (bench/reprovision_bench.py).
RECOVERY_BYTES_PER_SECOND_DEFAULT: Final = 40 * 1024 * 1024
LOG_LEVELS: Final = ("debug", "info", "warning", "error")
LOG_FORMATS: Final = ("text", "json")
PORT_MAX: Final = 65535
#: ``--some-name`` is the environment variable ``TIDELOG_NODE_SOME_NAME``.
ENV_PREFIX: Final = "TIDELOG_NODE_"

#: "path" is a directory, "file" a file, "addr" HOST:PORT, "bool" a switch (no value).
Kind = Literal["int", "str", "addr", "path", "file", "bool"]
_TRUE: Final = ("1", "true", "yes", "on")
_FALSE: Final = ("0", "false", "no", "off", "")


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
    #: False: not a key of the configuration file (``--config`` itself).
    in_file: bool = True

    @property
    def key(self) -> str:
        """The setting's key in a configuration file: ``--data-dir`` is ``data_dir``."""
        return self.name.removeprefix("--").replace("-", "_")

    @property
    def env(self) -> str:
        """The setting's environment variable: ``--data-dir`` is ``TIDELOG_NODE_DATA_DIR``."""
        return ENV_PREFIX + self.key.upper()

    def problem(self, value: object, label: str | None = None) -> str | None:
        """Why ``value`` is not acceptable for this flag, or None. ``label`` names the setting
        as the user wrote it (default: the flag)."""
        name = label or self.name
        if value is None:
            return f"{name} is required" if self.required else None
        if self.kind == "bool":
            if not isinstance(value, bool):
                return f"{name} must be true or false, got {value!r}"
            return None
        if self.kind == "int":
            if not isinstance(value, int) or isinstance(value, bool):
                return f"{name} must be an integer, got {value!r}"
            if self.min is not None and self.max is not None:
                if not self.min <= value <= self.max:
                    return f"{name} must be in {self.min}..{self.max}, got {value}"
            elif self.min is not None and value < self.min:
                return f"{name} must be >= {self.min}, got {value}"
            return None
        if not isinstance(value, str | Path) or not str(value):
            return f"{name} must be a non-empty string, got {value!r}"
        if self.kind == "addr":
            host, sep, port = str(value).rpartition(":")
            if not sep or not host or not port.isdigit() or int(port) > PORT_MAX:
                return f"{name} must be HOST:PORT with a port in 0..{PORT_MAX}, got {value!r}"
        if self.choices and value not in self.choices:
            return f"{name} must be one of {', '.join(self.choices)}, got {value!r}"
        return None

    def from_env(self, text: str) -> object:
        """An environment variable's text as this setting's type; ValueError names it."""
        if self.kind == "int":
            try:
                return int(text.strip())
            except ValueError:
                raise ValueError(f"{self.env} must be an integer, got {text!r}") from None
        if self.kind == "bool":
            if text.strip().lower() in _TRUE:
                return True
            if text.strip().lower() in _FALSE:
                return False
            allowed = "/".join(_TRUE + _FALSE[:-1])
            raise ValueError(f"{self.env} must be one of {allowed}, got {text!r}")
        return text


NODE_FLAGS: Final[tuple[NodeFlag, ...]] = (
    NodeFlag(
        "--config", "config", "file",
        "TOML file of settings (keys: the flags' names with _ for -); flags and "
        "TIDELOG_NODE_* variables override it.", in_file=False,
    ),
    NodeFlag("--id", "node_id", "int", "Node id, unique in the cluster.", required=True, min=1),
    NodeFlag(
        "--id-from-hostname", "id_from_hostname", "bool",
        "Take the node id from the host name's StatefulSet ordinal: tidelog-2 is node 3 "
        "(instead of --id).",
    ),
    NodeFlag(
        "--listen", "listen", "addr", "gRPC host:port to listen on (port 0: any free).",
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
    NodeFlag("--advertised", "advertised", "addr", "host:port clients dial (default: --listen)."),
    NodeFlag(
        "--internal-listen", "internal_listen", "addr",
        "host:port of the internal listener, which alone serves the node-to-node Raft and "
        "Cluster services (default: the host of --listen, any free port).",
    ),
    NodeFlag(
        "--internal-advertised", "internal_advertised", "addr",
        "host:port the other nodes dial (default: --internal-listen).",
    ),
    NodeFlag(
        "--raft-port", "raft_port", "int",
        "Port of the TCP listener (on the internal listener's host) that carries the Raft "
        "messages from the other nodes; 0: any free one (the peers ask for it, "
        "Raft.Endpoint).", default=0, min=0, max=PORT_MAX,
    ),
    NodeFlag(
        "--raft-stream-only", "raft_stream_only", "bool",
        "No Raft TCP listener: the other nodes send Raft messages on the internal gRPC "
        "listener's stream (slower; docs/latency.md).",
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
        "--log-format", "log_format", "str",
        "Log lines as text, or as one JSON object a line for log shippers.",
        default="text", choices=LOG_FORMATS,
    ),
    NodeFlag(
        "--controller-voters", "controller_voters", "str",
        "The controller's Raft voters, the same list on every node (default: this node "
        "alone, a one-node cluster); every other node follows the metadata log as a learner.",
        metavar="ID@HOST:PORT,...",
    ),
    NodeFlag(
        "--join", "join", "addr",
        "Join the cluster of the node at this internal address (its --internal-listen): "
        "the controller voters are asked from it (instead of --controller-voters).",
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
        "--replica-recovery-bytes-per-second", "replica_recovery_bytes_per_second", "int",
        "replica.recovery.bytes.per.second: the rate at which this node sends catch-up "
        "copies to replicas behind the log's start (0: unlimited).",
        default=RECOVERY_BYTES_PER_SECOND_DEFAULT, min=0,
    ),
    NodeFlag(
        "--controller-snapshot-entries", "controller_snapshot_entries", "int",
        "Snapshot the controller's state and truncate its log every this many entries.",
        default=10_000, min=1,
    ),
    NodeFlag(
        "--cluster-id", "cluster_id", "str",
        "Cluster id (default: derived from the controller voters' ids).",
    ),
    NodeFlag(
        "--rack", "rack", "str",
        "Failure domain of this node (a partition's replicas go to distinct racks).",
    ),
    NodeFlag(
        "--trace-sample", "trace_sample", "int",
        "Trace every Nth produce request and follower append: the time of each step goes "
        "to the tidelog_trace_* histograms (docs/latency.md); 0 turns tracing off.",
        default=0, min=0,
    ),
    NodeFlag(
        "--trace-log", "trace_log", "bool",
        "With --trace-sample: also log one line per traced produce request.",
    ),
    # -- the log cleaner of compacted topics (node/log/cleaner.py)
    NodeFlag(
        "--cleaner-io-bytes-per-second", "cleaner_io_bytes_per_second", "int",
        "Bytes per second the log cleaner reads and writes, all partitions together "
        "(0: unlimited).", default=CLEANER_IO_BYTES_PER_SECOND_DEFAULT, min=0,
    ),
    NodeFlag(
        "--cleaner-map-bytes", "cleaner_map_bytes", "int",
        "Memory of the log cleaner's key -> offset map; a larger dirty part is cleaned over "
        "several runs.", default=CLEANER_MAP_BYTES_DEFAULT, min=4096,
    ),
    NodeFlag(
        "--cleaner-interval-ms", "cleaner_interval_ms", "int",
        "How often the log cleaner looks for a compacted partition to clean.",
        default=CLEANER_INTERVAL_MS_DEFAULT, min=10,
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
    log_format: str = "text"
    config: Path | None = None
    id_from_hostname: bool = False
    trace_sample: int = 0
    trace_log: bool = False
    raft_port: int = 0
    raft_stream_only: bool = False
    cleaner_io_bytes_per_second: int = CLEANER_IO_BYTES_PER_SECOND_DEFAULT
    cleaner_map_bytes: int = CLEANER_MAP_BYTES_DEFAULT
    cleaner_interval_ms: int = CLEANER_INTERVAL_MS_DEFAULT
    replica_recovery_bytes_per_second: int = RECOVERY_BYTES_PER_SECOND_DEFAULT
    controller_snapshot_entries: int = 10_000
    join: str | None = None

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
        value = values.get(flag.dest)
        if value is None or (flag.kind == "bool" and value is False):
            value = False if flag.kind == "bool" and flag.default is None else flag.default
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


def help_text(flag: NodeFlag) -> str:
    """A flag's help with its default and its environment variable (both parsers)."""
    text = flag.help.removesuffix(".")
    if flag.default is not None:
        text += f" (default {flag.default})"
    return f"{text}. Env: {flag.env}."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add every flag of the table to an argparse parser (checks: :func:`parse_flags`).

    No flag is required and none has a default here: a flag left out is None, so that
    :func:`resolve` can take the value from the environment, the file or the default."""
    types = {"int": int, "str": str, "addr": str, "path": Path, "file": Path}
    for flag in NODE_FLAGS:
        if flag.kind == "bool":
            parser.add_argument(
                flag.name, dest=flag.dest, action="store_const", const=True, default=None,
                help=help_text(flag),
            )  # fmt: skip
            continue
        parser.add_argument(
            flag.name,
            dest=flag.dest,
            type=types[flag.kind],
            default=None,
            choices=list(flag.choices) or None,
            metavar=flag.metavar,
            help=help_text(flag),
        )


def to_argv(values: Mapping[str, object]) -> list[str]:
    """The flags for ``values`` (by dest), in table order; None (and False) values are left
    out, a true switch is its name alone."""
    by_dest = {f.dest: f for f in NODE_FLAGS}
    unknown = sorted(set(values) - set(by_dest))
    if unknown:
        raise ValueError(f"unknown node setting(s): {', '.join(unknown)}")
    out: list[str] = []
    for flag in NODE_FLAGS:
        value = values.get(flag.dest)
        if flag.kind == "bool":
            if value:
                out.append(flag.name)
        elif value is not None:
            out += [flag.name, str(value)]
    return out


# ---------------------------------------------------------------------------------------------
# Flags, environment, file, defaults


#: Where a value came from, weakest first.
SOURCES: Final = ("default", "file", "env", "flag")
_ORDINAL = re.compile(r"-(\d+)$")


@dataclass(frozen=True, slots=True)
class Resolved:
    """The effective settings (by dest) and, for each, where it came from: ``"flag --x"``,
    ``"env TIDELOG_NODE_X"``, ``"file PATH"``, ``"hostname NAME"`` or ``"default"``."""

    values: dict[str, object]
    sources: dict[str, str]
    #: Set when the cluster secret comes from TIDELOG_CLUSTER_SECRET (its value is not kept).
    secret_env: bool = False

    def flags(self) -> NodeFlags:
        return parse_flags(self.values)

    def render(self) -> str:
        """The effective settings as a TOML file, each line's comment saying where its value
        came from (``tidelog node config --print``). Unset settings are comments."""
        rows: list[tuple[str, str]] = []
        for flag in NODE_FLAGS:
            if not flag.in_file:
                continue
            value = self.values.get(flag.dest)
            source = self.sources.get(flag.dest, "default")
            if value is None:
                rows.append((f"# {flag.key} =", "not set"))
            elif isinstance(value, bool):
                rows.append((f"{flag.key} = {'true' if value else 'false'}", source))
            elif isinstance(value, int):
                rows.append((f"{flag.key} = {value}", source))
            else:
                text = str(value).replace("\\", "\\\\").replace('"', '\\"')
                rows.append((f'{flag.key} = "{text}"', source))
        width = max(len(left) for left, _ in rows)
        lines = [f"{left:<{width}}  # {right}" for left, right in rows]
        config = self.values.get("config")
        head = [f"# tidelog node settings (config file: {config or 'none'})"]
        if self.secret_env:
            head.append("# cluster secret: from TIDELOG_CLUSTER_SECRET (not shown)")
        return "\n".join(head + lines) + "\n"


def id_from_hostname(hostname: str) -> int:
    """The node id of a StatefulSet pod: its ordinal plus one (``tidelog-2`` is node 3)."""
    match = _ORDINAL.search(hostname.split(".", 1)[0])
    if match is None:
        raise ValueError(
            f"--id-from-hostname: the host name {hostname!r} does not end in -ORDINAL "
            "(a StatefulSet pod name such as tidelog-2, which is node 3)"
        )
    return int(match.group(1)) + 1


def _load_file(path: Path) -> dict[str, object]:
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ValueError(f"--config {path}: cannot read it: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"--config {path}: not valid TOML: {exc}") from None
    known = {f.key for f in NODE_FLAGS if f.in_file}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(
            f"--config {path}: unknown setting(s) {', '.join(unknown)} "
            f"(allowed: {', '.join(sorted(known))})"
        )
    return data


def resolve(
    given: Mapping[str, object],
    env: Mapping[str, str] | None = None,
    hostname: str | None = None,
) -> Resolved:
    """Merge the settings: ``given`` (a parser's values by dest, None where a flag was left
    out) over ``env`` (TIDELOG_NODE_*) over the ``--config`` file over the defaults. Each
    value is checked with the name the user wrote (``--id``, ``TIDELOG_NODE_ID``, ``id in
    node.toml``); ValueError says which setting, its value and what is allowed.
    ``hostname`` (default: this host's) serves ``--id-from-hostname``."""
    env = {} if env is None else env
    by_dest = {f.dest: f for f in NODE_FLAGS}
    unknown = sorted(set(given) - set(by_dest))
    if unknown:
        raise ValueError(f"unknown node setting(s): {', '.join(unknown)}")
    config_flag = by_dest["config"]
    config: object = given.get("config")
    config_source = f"flag {config_flag.name}"
    if config is None and env.get(config_flag.env):
        config, config_source = env[config_flag.env], f"env {config_flag.env}"
    file_values = _load_file(Path(str(config))) if config is not None else {}
    values: dict[str, object] = {}
    sources: dict[str, str] = {}
    for flag in NODE_FLAGS:
        value: object = given.get(flag.dest)
        if flag.kind == "bool" and value is False:
            value = None  # a switch left out (click reads it as False)
        if value is not None:
            source, label = f"flag {flag.name}", flag.name
        elif env.get(flag.env) not in (None, ""):
            value = flag.from_env(env[flag.env])
            source, label = f"env {flag.env}", flag.env
        elif flag.key in file_values:
            value = file_values[flag.key]
            source, label = f"file {config}", f"{flag.key} in {config}"
        else:
            value, source, label = flag.default, "default", flag.name
        if flag.dest == "config":
            source = config_source if config is not None else "default"
        if value is not None:
            problem = flag.problem(value, label)
            if problem is not None:
                raise ValueError(problem)
        values[flag.dest] = value
        sources[flag.dest] = source
    if values.get("id_from_hostname"):
        if values.get("node_id") is not None:
            raise ValueError(
                f"the node id is set twice: id_from_hostname ({sources['id_from_hostname']}) "
                f"and id ({sources['node_id']}); give one"
            )
        host = hostname if hostname is not None else socket.gethostname()
        values["node_id"] = id_from_hostname(host)
        sources["node_id"] = f"hostname {host}"
    for flag in NODE_FLAGS:
        if flag.required and values.get(flag.dest) is None:
            also = " or --id-from-hostname" if flag.dest == "node_id" else ""
            raise ValueError(
                f"{flag.name} is required{also} (or {flag.env}, or {flag.key} in --config)"
            )
    secret_env = bool(env.get("TIDELOG_CLUSTER_SECRET"))
    return Resolved(values, sources, secret_env)
