"""A local cluster: N node processes on 127.0.0.1, managed from one directory.

``tidelog cluster up --nodes 3`` starts the nodes detached (their own session, output to
``DIR/node-ID/node.log``, data in ``DIR/node-ID/data``) and records them in
``DIR/cluster.json``; ``status``, ``kill``, ``start`` and ``down`` work from that file alone,
and :func:`discover_bootstrap` lets every other command run in the same directory find the
cluster without a ``--bootstrap``. The default DIR is ``.tidelog/cluster`` under the current
directory.

Ports: gRPC ports are taken from the base port upward (default 9092: 9092, 9093, ...) and
metrics ports from the base port + ``METRICS_PORT_OFFSET`` upward (default 9192, 9193, ...),
skipping any port something already listens on. The first ``CONTROLLER_VOTERS_MAX`` nodes
are the controller's voters; every node is told the same voter list.

Why a pid file with identity checks rather than a supervisor: the nodes must outlive the
command that started them, and the chaos tester must be able to SIGKILL and SIGSTOP a
real process. A recorded pid can be reused by an unrelated process after a reboot, so a
pid only counts as our node when ``/proc/PID/cmdline`` names the node's data directory;
nothing here ever signals a process that fails that check.

``down`` keeps cluster.json and the data (unless ``--purge``), and a later ``up`` in the same
directory resumes the stopped cluster with the same ids, ports and data.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final, Literal

import grpc

from tidelog.errors import TidelogError
from tidelog.v1 import broker_pb2, broker_pb2_grpc

__all__ = [
    "BASE_PORT_DEFAULT",
    "CLUSTER_DIR_DEFAULT",
    "METRICS_PORT_OFFSET",
    "NODES_MAX",
    "NODE_READY_TIMEOUT_S",
    "PORT_MAX",
    "READY_TIMEOUT_S",
    "SIGNALS",
    "ClusterError",
    "ClusterFile",
    "ClusterStatus",
    "NodeSpec",
    "NodeStatus",
    "PartitionProblem",
    "ProcState",
    "UpResult",
    "allocate_ports",
    "build_status",
    "cluster_status",
    "controller_voters",
    "discover_bootstrap",
    "down",
    "kill_node",
    "load_cluster",
    "node_argv",
    "parse_proc_stat",
    "port_in_use",
    "process_state",
    "readiness_problem",
    "render_nodes",
    "render_status",
    "save_cluster",
    "signal_node",
    "start_node",
    "status_to_json",
    "up",
    "wait_node_ready",
]

CLUSTER_DIR_DEFAULT: Final = Path(".tidelog") / "cluster"
CLUSTER_FILE: Final = "cluster.json"
CLUSTER_FILE_VERSION: Final = 1
LOCK_FILE: Final = ".lock"
HOST: Final = "127.0.0.1"
BASE_PORT_DEFAULT: Final = 9092
#: Metrics ports start this far above the base port, so up to 100 nodes get contiguous,
#: non-overlapping gRPC and metrics ranges (9092.. and 9192.. by default).
METRICS_PORT_OFFSET: Final = 100
PORT_MAX: Final = 65535
NODES_MAX: Final = 100
#: The controller (Raft group 0) runs on the first nodes; more voters only slow it down.
CONTROLLER_VOTERS_MAX: Final = 3

#: How long ``up`` waits for a controller leader and every node registered.
READY_TIMEOUT_S: Final = 60.0
#: How long ``start`` waits for a restarted node to serve and see itself registered alive.
NODE_READY_TIMEOUT_S: Final = 60.0
#: How long ``down`` waits after SIGTERM before SIGKILL (the node drains for up to 10 s).
STOP_TIMEOUT_S: Final = 15.0
#: How long to wait for a SIGKILLed process to disappear.
KILL_WAIT_S: Final = 5.0
#: How long a command waits for another one holding the cluster directory's lock.
LOCK_WAIT_S: Final = 120.0
POLL_INTERVAL_S: Final = 0.1
#: Deadline of one Metadata RPC of these commands; a node that does not answer is skipped.
METADATA_TIMEOUT_S: Final = 2.0
#: Lines of a node's log quoted in an error about that node.
LOG_TAIL_LINES: Final = 5
LOG_TAIL_BYTES: Final = 8192
#: Reads of an empty /proc/PID/cmdline (a process being exec'd) before giving up on it.
CMDLINE_READS_MAX: Final = 50
CMDLINE_RETRY_S: Final = 0.002

assert 0 < CONTROLLER_VOTERS_MAX <= NODES_MAX <= METRICS_PORT_OFFSET
assert STOP_TIMEOUT_S > 10.0, "must exceed the node's drain timeout (node/limits.py)"

_CHANNEL_OPTIONS: Final = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 500),
]

SIGNALS: Final[Mapping[str, signal.Signals]] = {
    "KILL": signal.SIGKILL,
    "STOP": signal.SIGSTOP,
    "TERM": signal.SIGTERM,
}


class ClusterError(TidelogError):
    """Something about the local cluster the user can fix (named in the message)."""

    reason = "LOCAL_CLUSTER"


# ---------------------------------------------------------------------------------------------
# cluster.json


@dataclass(frozen=True, slots=True)
class NodeSpec:
    """One node of the local cluster as cluster.json records it; ``argv`` restarts it."""

    node_id: int
    pid: int
    address: str
    metrics_address: str
    data_dir: Path
    log_path: Path
    argv: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.node_id,
            "pid": self.pid,
            "address": self.address,
            "metrics_address": self.metrics_address,
            "data_dir": str(self.data_dir),
            "log": str(self.log_path),
            "argv": list(self.argv),
        }

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> NodeSpec:
        if not isinstance(obj, Mapping):
            raise ValueError("a node is not a JSON object")
        argv = obj["argv"]
        if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv) or not argv:
            raise ValueError("argv must be a non-empty list of strings")
        for key in ("id", "pid"):
            if not isinstance(obj[key], int) or isinstance(obj[key], bool):
                raise ValueError(f"{key} must be an integer")
        for key in ("address", "metrics_address", "data_dir", "log"):
            if not isinstance(obj[key], str):
                raise ValueError(f"{key} must be a string")
        return cls(
            node_id=obj["id"],
            pid=obj["pid"],
            address=obj["address"],
            metrics_address=obj["metrics_address"],
            data_dir=Path(obj["data_dir"]),
            log_path=Path(obj["log"]),
            argv=tuple(argv),
        )


@dataclass(frozen=True, slots=True)
class ClusterFile:
    """The contents of DIR/cluster.json."""

    directory: Path
    nodes: tuple[NodeSpec, ...]
    controller_voters: str
    created_ms: int

    def to_json(self) -> dict[str, Any]:
        return {
            "version": CLUSTER_FILE_VERSION,
            "created_ms": self.created_ms,
            "controller_voters": self.controller_voters,
            "nodes": [n.to_json() for n in self.nodes],
        }

    @classmethod
    def from_json(cls, obj: Mapping[str, Any], directory: Path) -> ClusterFile:
        if not isinstance(obj, Mapping):
            raise ValueError("the top level is not a JSON object")
        if obj.get("version") != CLUSTER_FILE_VERSION:
            raise ValueError(f"version {obj.get('version')!r} is not {CLUSTER_FILE_VERSION}")
        nodes = tuple(NodeSpec.from_json(n) for n in obj["nodes"])
        ids = [n.node_id for n in nodes]
        if len(set(ids)) != len(ids):
            raise ValueError(f"node ids repeat: {ids}")
        return cls(
            directory=directory,
            nodes=nodes,
            controller_voters=str(obj["controller_voters"]),
            created_ms=int(obj["created_ms"]),
        )

    @property
    def path(self) -> Path:
        return self.directory / CLUSTER_FILE

    def node(self, node_id: int) -> NodeSpec:
        for n in self.nodes:
            if n.node_id == node_id:
                return n
        known = ", ".join(str(n.node_id) for n in self.nodes)
        raise ClusterError(
            f"the local cluster in {self.directory} has no node {node_id} (nodes: {known})"
        )

    def with_pid(self, node_id: int, pid: int) -> ClusterFile:
        nodes = tuple(replace(n, pid=pid) if n.node_id == node_id else n for n in self.nodes)
        return replace(self, nodes=nodes)


def load_cluster(directory: Path) -> ClusterFile:
    """Read DIR/cluster.json; a missing or damaged file is a ClusterError saying what to do."""
    path = directory / CLUSTER_FILE
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ClusterError(
            f"no local cluster in {directory} ({CLUSTER_FILE} not found); start one with "
            "`tidelog cluster up --nodes 3` or pass --dir"
        ) from None
    except OSError as exc:
        raise ClusterError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        return ClusterFile.from_json(json.loads(text), directory)
    except (ValueError, KeyError, TypeError) as exc:
        raise ClusterError(
            f"{path} is not a tidelog cluster file ({exc}); remove {directory} "
            "(`tidelog cluster down --purge` if its nodes are stopped) or pass another --dir"
        ) from None


def save_cluster(cluster: ClusterFile) -> None:
    """Write cluster.json atomically: a reader never sees half a file."""
    cluster.directory.mkdir(parents=True, exist_ok=True)
    tmp = cluster.path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(cluster.to_json(), indent=2) + "\n")
    os.replace(tmp, cluster.path)


@contextlib.contextmanager
def _locked(directory: Path, wait_s: float = LOCK_WAIT_S) -> Iterator[None]:
    """Serialize commands that rewrite cluster.json or start processes in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise ClusterError(
                        f"another tidelog cluster command has held {directory / LOCK_FILE} "
                        f"for {wait_s:.0f} s; wait for it to finish"
                    ) from None
                time.sleep(POLL_INTERVAL_S)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def discover_bootstrap(cwd: Path | str) -> str | None:
    """The addresses of the running nodes of the local cluster under ``cwd`` (the default
    ``.tidelog/cluster``), comma-separated, or None when there is none (no file, a damaged
    file, or every node down): the CLI's default bootstrap when no other is given."""
    try:
        cluster = load_cluster(Path(cwd) / CLUSTER_DIR_DEFAULT)
    except ClusterError:
        return None
    live = [
        n.address for n in cluster.nodes if process_state(n.pid, n.data_dir) is ProcState.RUNNING
    ]
    return ",".join(live) or None


# ---------------------------------------------------------------------------------------------
# Processes


class ProcState(enum.StrEnum):
    RUNNING = "running"
    #: Paused by SIGSTOP (state T in /proc): holds its ports but answers nothing.
    STOPPED = "stopped"
    DEAD = "dead"


#: Processes this Python process started, kept so that they are reaped (no zombies) and their
#: Popen objects never warn about a running child when collected.
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


def parse_proc_stat(text: str) -> ProcState:
    """The state of a process from the text of ``/proc/PID/stat``.

    The command name (field 2) is in parentheses and may itself contain spaces and ')', so
    the state is the first field after the last ')'."""
    _, sep, rest = text.rpartition(")")
    fields = rest.split()
    if not sep or not fields:
        raise ValueError(f"not a /proc/PID/stat line: {text[:80]!r}")
    state = fields[0]
    if state in ("T", "t"):
        return ProcState.STOPPED
    if state in ("Z", "X", "x"):
        return ProcState.DEAD
    return ProcState.RUNNING


def _reap(pid: int) -> None:
    child = _CHILDREN.get(pid)
    if child is not None and child.poll() is not None:
        del _CHILDREN[pid]


def _is_node_process(pid: int, data_dir: Path) -> bool:
    """Whether ``pid`` runs the node whose data lives in ``data_dir`` (not a reused pid).

    A process in the middle of exec shows an empty command line for a moment, so an empty
    one is read again a few times before it counts as someone else's."""
    for _ in range(CMDLINE_READS_MAX):
        try:
            raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return False
        if raw:
            return os.fsencode(str(data_dir)) in raw.split(b"\0")
        time.sleep(CMDLINE_RETRY_S)
    return False


def process_state(pid: int, data_dir: Path | None = None) -> ProcState:
    """Whether ``pid`` runs, is stopped, or is gone. With ``data_dir``, a live pid that does
    not run the node of that data directory counts as dead (the pid was reused)."""
    if pid <= 0:
        return ProcState.DEAD
    _reap(pid)
    proc = Path("/proc")
    if not proc.is_dir():  # not Linux: liveness only, no stopped state or identity check
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return ProcState.DEAD
        except PermissionError:
            return ProcState.DEAD if data_dir is not None else ProcState.RUNNING
        return ProcState.RUNNING
    try:
        state = parse_proc_stat((proc / str(pid) / "stat").read_text())
    except (OSError, ValueError):
        return ProcState.DEAD
    if state is ProcState.DEAD:
        return state
    if data_dir is not None and not _is_node_process(pid, data_dir):
        return ProcState.DEAD
    return state


def signal_node(node: NodeSpec, sig: signal.Signals) -> None:
    """Send ``sig`` to the node's process after checking it is that node."""
    if process_state(node.pid, node.data_dir) is ProcState.DEAD:
        raise ClusterError(
            f"node {node.node_id} is not running (pid {node.pid} is gone); "
            f"`tidelog cluster start {node.node_id}` starts it"
        )
    try:
        os.kill(node.pid, sig)
    except ProcessLookupError:
        raise ClusterError(f"node {node.node_id} (pid {node.pid}) exited just now") from None
    except PermissionError:
        raise ClusterError(
            f"not allowed to signal node {node.node_id} (pid {node.pid}): it belongs to "
            "another user"
        ) from None


def _wait_state(node: NodeSpec, done: Callable[[ProcState], bool], timeout_s: float) -> ProcState:
    deadline = time.monotonic() + timeout_s
    while True:
        state = process_state(node.pid, node.data_dir)
        if done(state) or time.monotonic() >= deadline:
            return state
        time.sleep(POLL_INTERVAL_S / 2)


def _launch(node: NodeSpec) -> int:
    """Start the node detached: its own session (a Ctrl-C in the shell does not reach it),
    no stdin, output appended to its log. Returns the pid."""
    node.data_dir.mkdir(parents=True, exist_ok=True)
    node.log_path.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    with node.log_path.open("ab") as log:
        log.write(f"--- tidelog cluster: starting node {node.node_id} at {stamp}\n".encode())
        log.flush()
        try:
            proc = subprocess.Popen(
                list(node.argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                close_fds=True,
                env=env,
            )
        except OSError as exc:
            raise ClusterError(
                f"cannot start node {node.node_id} ({node.argv[0]}): {exc.strerror or exc}"
            ) from None
    _CHILDREN[proc.pid] = proc
    return proc.pid


def _log_tail(path: Path) -> str:
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - LOG_TAIL_BYTES))
            data = f.read().decode(errors="replace")
    except OSError:
        return ""
    lines = [ln.strip() for ln in data.splitlines() if ln.strip()]
    return " | ".join(lines[-LOG_TAIL_LINES:])


def _with_tail(message: str, node: NodeSpec) -> str:
    tail = _log_tail(node.log_path)
    return f"{message}; see {node.log_path}" + (f" (last lines: {tail})" if tail else "")


# ---------------------------------------------------------------------------------------------
# Ports and argv


def port_in_use(port: int, host: str = HOST) -> bool:
    """Whether binding ``host:port`` fails, the way the node's gRPC server would bind it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def allocate_ports(
    count: int,
    base_port: int,
    metrics_base_port: int | None = None,
    in_use: Callable[[int], bool] = port_in_use,
) -> list[tuple[int, int]]:
    """``count`` pairs of (gRPC port, metrics port): gRPC ports from ``base_port`` up,
    metrics ports from ``metrics_base_port`` (default base + METRICS_PORT_OFFSET) up, each
    the next one that is neither in use nor already given out."""
    if count < 1:
        raise ValueError(f"count={count} must be >= 1")
    if metrics_base_port is None:
        metrics_base_port = base_port + METRICS_PORT_OFFSET
    taken: set[int] = set()

    def next_free(start: int, first: int, what: str) -> int:
        port = start
        while port <= PORT_MAX:
            if port not in taken and not in_use(port):
                taken.add(port)
                return port
            port += 1
        raise ClusterError(
            f"not enough free {what} ports from {first} to {PORT_MAX} for {count} nodes; "
            "pass a lower --base-port"
        )

    grpc_ports: list[int] = []
    start = base_port
    for _ in range(count):
        grpc_ports.append(next_free(start, base_port, "gRPC"))
        start = grpc_ports[-1] + 1
    metrics_ports: list[int] = []
    start = metrics_base_port
    for _ in range(count):
        metrics_ports.append(next_free(start, metrics_base_port, "metrics"))
        start = metrics_ports[-1] + 1
    return list(zip(grpc_ports, metrics_ports, strict=True))


def controller_voters(addresses: Mapping[int, str]) -> str:
    """``1@h:p,2@h:p,3@h:p``: the lowest CONTROLLER_VOTERS_MAX node ids."""
    ids = sorted(addresses)[:CONTROLLER_VOTERS_MAX]
    return ",".join(f"{i}@{addresses[i]}" for i in ids)


def node_argv(
    node_id: int,
    address: str,
    data_dir: Path,
    metrics_port: int,
    voters: str,
    python: str = sys.executable,
) -> tuple[str, ...]:
    """The command line of one node (``python -m tidelog.node``, the CLI's dependencies
    unloaded); stored in cluster.json so that ``start`` restarts exactly the same node."""
    return (
        python, "-m", "tidelog.node",
        "--id", str(node_id),
        "--listen", address,
        "--data-dir", str(data_dir),
        "--metrics-port", str(metrics_port),
        "--controller-voters", voters,
    )  # fmt: skip


def _port_of(address: str) -> int:
    return int(address.rpartition(":")[2])


# ---------------------------------------------------------------------------------------------
# Metadata over sync gRPC


class _Probe:
    """Sync Metadata calls to the nodes, one channel per address, closed at the end."""

    def __init__(self) -> None:
        self._channels: dict[str, grpc.Channel] = {}

    def __enter__(self) -> _Probe:
        return self

    def __exit__(self, *exc: object) -> None:
        for ch in self._channels.values():
            ch.close()
        self._channels.clear()

    def metadata(
        self, address: str, timeout_s: float = METADATA_TIMEOUT_S
    ) -> broker_pb2.MetadataResponse | None:
        ch = self._channels.get(address)
        if ch is None:
            ch = self._channels[address] = grpc.insecure_channel(address, options=_CHANNEL_OPTIONS)
        stub = broker_pb2_grpc.BrokerStub(ch)
        try:
            resp: broker_pb2.MetadataResponse = stub.Metadata(
                broker_pb2.MetadataRequest(), timeout=timeout_s
            )
        except grpc.RpcError:
            return None
        return resp


def readiness_problem(
    node_ids: Sequence[int], answers: Mapping[int, broker_pb2.MetadataResponse | None]
) -> tuple[int | None, str] | None:
    """What keeps the cluster from being ready, as (node to blame or None, reason), or None
    when every node answers Metadata with a controller leader and every node registered
    alive. Every answer must be complete so that any node can serve as a bootstrap."""
    for node_id in node_ids:
        resp = answers.get(node_id)
        if resp is None:
            return node_id, f"node {node_id} does not answer Metadata yet"
    for node_id in node_ids:
        resp = answers[node_id]
        assert resp is not None
        if resp.controller_id < 0:
            return None, f"node {node_id} sees no controller leader"
        alive = {n.node_id for n in resp.nodes if n.alive}
        missing = [i for i in node_ids if i not in alive]
        if missing:
            names = ",".join(map(str, missing))
            return missing[0], f"node {node_id} does not list node(s) {names} as registered alive"
    return None


# ---------------------------------------------------------------------------------------------
# up


@dataclass(frozen=True, slots=True)
class UpResult:
    cluster: ClusterFile
    controller_id: int
    #: Whether ``up`` restarted a stopped cluster found in the directory.
    resumed: bool


def up(
    directory: Path,
    nodes: int,
    base_port: int = BASE_PORT_DEFAULT,
    *,
    timeout_s: float = READY_TIMEOUT_S,
    note: Callable[[str], None] | None = None,
) -> UpResult:
    """Start an ``nodes``-node cluster in ``directory`` (or resume the stopped one there) and
    wait until it is ready. On failure the started nodes are stopped again and the error
    names the log to read."""
    if not 1 <= nodes <= NODES_MAX:
        raise ClusterError(f"--nodes {nodes} must be in 1..{NODES_MAX}")
    if not 1 <= base_port <= PORT_MAX:
        raise ClusterError(f"--base-port {base_port} must be in 1..{PORT_MAX}")
    directory = directory.absolute()
    with _locked(directory):
        resumed = (directory / CLUSTER_FILE).exists()
        if resumed:
            cluster = _resumable(load_cluster(directory), nodes)
            if note is not None:
                note(f"resuming the stopped {nodes}-node cluster in {directory}")
        else:
            cluster = _new_cluster(directory, nodes, base_port)
            if note is not None:
                note(f"starting {nodes} node(s) in {directory}")
        try:
            for spec in cluster.nodes:
                cluster = cluster.with_pid(spec.node_id, _launch(spec))
                save_cluster(cluster)
            controller = _wait_ready(cluster, timeout_s)
        except BaseException:
            _stop_all(cluster, quiet=True)
            raise
    return UpResult(cluster, controller, resumed)


def _new_cluster(directory: Path, nodes: int, base_port: int) -> ClusterFile:
    ports = allocate_ports(nodes, base_port)
    ids = list(range(1, nodes + 1))
    addresses = {i: f"{HOST}:{g}" for i, (g, _) in zip(ids, ports, strict=True)}
    voters = controller_voters(addresses)
    specs: list[NodeSpec] = []
    for i, (_, metrics_port) in zip(ids, ports, strict=True):
        node_dir = directory / f"node-{i}"
        data_dir = node_dir / "data"
        specs.append(
            NodeSpec(
                node_id=i,
                pid=0,
                address=addresses[i],
                metrics_address=f"{HOST}:{metrics_port}",
                data_dir=data_dir,
                log_path=node_dir / "node.log",
                argv=node_argv(i, addresses[i], data_dir, metrics_port, voters),
            )
        )
    return ClusterFile(directory, tuple(specs), voters, time.time_ns() // 1_000_000)


def _resumable(cluster: ClusterFile, nodes: int) -> ClusterFile:
    """The cluster of an existing cluster.json, if it is stopped, the requested size, and its
    ports are free."""
    live = [
        f"node {n.node_id} (pid {n.pid})"
        for n in cluster.nodes
        if process_state(n.pid, n.data_dir) is not ProcState.DEAD
    ]
    if live:
        raise ClusterError(
            f"a local cluster is already running in {cluster.directory}: {', '.join(live)}; "
            "`tidelog cluster status` shows it, `tidelog cluster down` stops it"
        )
    if len(cluster.nodes) != nodes:
        raise ClusterError(
            f"{cluster.directory} holds a stopped {len(cluster.nodes)}-node cluster, not "
            f"{nodes}; `tidelog cluster up --nodes {len(cluster.nodes)}` resumes it, "
            "`tidelog cluster down --purge` removes it, or pass another --dir"
        )
    for n in cluster.nodes:
        for addr in (n.address, n.metrics_address):
            if port_in_use(_port_of(addr)):
                raise ClusterError(
                    f"cannot resume node {n.node_id}: port {_port_of(addr)} ({addr}) is in "
                    f"use by another process; free it or `tidelog cluster down --purge` and "
                    "start afresh"
                )
    return cluster


def _wait_ready(cluster: ClusterFile, timeout_s: float) -> int:
    """Wait for a controller leader and every node registered; returns the controller id."""
    ids = [n.node_id for n in cluster.nodes]
    deadline = time.monotonic() + timeout_s
    with _Probe() as probe:
        while True:
            for n in cluster.nodes:
                if process_state(n.pid, n.data_dir) is ProcState.DEAD:
                    raise ClusterError(
                        _with_tail(f"node {n.node_id} exited while the cluster started", n)
                    )
            answers = {n.node_id: probe.metadata(n.address) for n in cluster.nodes}
            problem = readiness_problem(ids, answers)
            if problem is None:
                first = answers[ids[0]]
                assert first is not None
                return first.controller_id
            if time.monotonic() >= deadline:
                blame, why = problem
                message = f"the cluster is not ready after {timeout_s:.0f} s: {why}"
                if blame is not None:
                    raise ClusterError(_with_tail(message, cluster.node(blame)))
                logs = cluster.directory / "node-*" / "node.log"
                raise ClusterError(f"{message}; see the node logs {logs}")
            time.sleep(POLL_INTERVAL_S * 2)


# ---------------------------------------------------------------------------------------------
# status


@dataclass(frozen=True, slots=True)
class NodeStatus:
    node_id: int
    #: None for a node the cluster knows that cluster.json does not (started elsewhere).
    pid: int | None
    process: ProcState | None
    address: str
    metrics_address: str
    #: Whether the controller lists the node and whether it thinks it alive; None when no
    #: node answered Metadata.
    registered: bool | None
    alive: bool | None
    is_controller: bool
    leaders: int
    replicas: int


@dataclass(frozen=True, slots=True)
class PartitionProblem:
    topic: str
    partition: int
    leader: int
    replicas: tuple[int, ...]
    in_sync: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class ClusterStatus:
    directory: Path
    nodes: tuple[NodeStatus, ...]
    #: None: no node answered; -1: the answering node knows no controller leader.
    controller_id: int | None
    #: The address whose Metadata this status shows.
    metadata_from: str | None
    topics: int
    partitions: int
    under_replicated: tuple[PartitionProblem, ...]
    leaderless: tuple[PartitionProblem, ...]
    notes: tuple[str, ...] = field(default=())


def build_status(
    cluster: ClusterFile,
    states: Mapping[int, ProcState],
    metadata: broker_pb2.MetadataResponse | None,
    metadata_from: str | None = None,
) -> ClusterStatus:
    """The status from the process states and one Metadata answer (pure, for tests)."""
    leaders: dict[int, int] = {}
    replicas: dict[int, int] = {}
    under: list[PartitionProblem] = []
    leaderless: list[PartitionProblem] = []
    partitions = 0
    registered: dict[int, broker_pb2.NodeInfo] = {}
    topics = 0
    if metadata is not None:
        registered = {n.node_id: n for n in metadata.nodes}
        topics = len(metadata.topics)
        for t in sorted(metadata.topics, key=lambda t: t.name):
            for p in sorted(t.partitions, key=lambda p: p.partition):
                partitions += 1
                if p.leader >= 0:
                    leaders[p.leader] = leaders.get(p.leader, 0) + 1
                for r in p.replicas:
                    replicas[r] = replicas.get(r, 0) + 1
                problem = PartitionProblem(
                    t.name, p.partition, p.leader, tuple(p.replicas), tuple(p.in_sync)
                )
                if p.leader < 0:
                    leaderless.append(problem)
                if len(set(p.in_sync) & set(p.replicas)) < len(p.replicas):
                    under.append(problem)
    controller = None if metadata is None else metadata.controller_id
    rows: list[NodeStatus] = []
    for spec in cluster.nodes:
        info = registered.get(spec.node_id)
        rows.append(
            NodeStatus(
                node_id=spec.node_id,
                pid=spec.pid,
                process=states.get(spec.node_id, ProcState.DEAD),
                address=spec.address,
                metrics_address=spec.metrics_address,
                registered=None if metadata is None else info is not None,
                alive=None if metadata is None else (info is not None and info.alive),
                is_controller=controller == spec.node_id,
                leaders=leaders.get(spec.node_id, 0),
                replicas=replicas.get(spec.node_id, 0),
            )
        )
    ours = {n.node_id for n in cluster.nodes}
    for node_id, info in sorted(registered.items()):
        if node_id in ours:
            continue
        rows.append(
            NodeStatus(
                node_id=node_id,
                pid=None,
                process=None,
                address=info.address,
                metrics_address=info.metrics_address,
                registered=True,
                alive=info.alive,
                is_controller=controller == node_id,
                leaders=leaders.get(node_id, 0),
                replicas=replicas.get(node_id, 0),
            )
        )
    notes: list[str] = []
    if metadata is None:
        notes.append("no running node answered Metadata: registration and partitions unknown")
    return ClusterStatus(
        directory=cluster.directory,
        nodes=tuple(rows),
        controller_id=controller,
        metadata_from=metadata_from,
        topics=topics,
        partitions=partitions,
        under_replicated=tuple(under),
        leaderless=tuple(leaderless),
        notes=tuple(notes),
    )


def cluster_status(directory: Path) -> ClusterStatus:
    """Process states from /proc and the cluster's view from the first running node that
    knows a controller leader (stopped nodes are not asked: they would never answer)."""
    cluster = load_cluster(directory.absolute())
    states = {n.node_id: process_state(n.pid, n.data_dir) for n in cluster.nodes}
    best: tuple[broker_pb2.MetadataResponse, str] | None = None
    with _Probe() as probe:
        for n in cluster.nodes:
            if states[n.node_id] is not ProcState.RUNNING:
                continue
            resp = probe.metadata(n.address)
            if resp is None:
                continue
            if best is None:
                best = (resp, n.address)
            if resp.controller_id >= 0:
                best = (resp, n.address)
                break
    if best is None:
        return build_status(cluster, states, None)
    return build_status(cluster, states, best[0], best[1])


def _registration(n: NodeStatus) -> str:
    """What the controller thinks of the node: alive, dead, no (unknown to it), ? (no answer)."""
    if n.registered is None:
        return "?"
    if not n.registered:
        return "no"
    return "alive" if n.alive else "dead"


def _problem_json(p: PartitionProblem) -> dict[str, Any]:
    return {
        "topic": p.topic,
        "partition": p.partition,
        "leader": p.leader,
        "replicas": list(p.replicas),
        "in_sync": list(p.in_sync),
    }


def status_to_json(status: ClusterStatus) -> dict[str, Any]:
    return {
        "directory": str(status.directory),
        "controller_id": status.controller_id,
        "metadata_from": status.metadata_from,
        "topics": status.topics,
        "partitions": status.partitions,
        "nodes": [
            {
                "id": n.node_id,
                "pid": n.pid,
                "process": None if n.process is None else n.process.value,
                "address": n.address,
                "metrics_address": n.metrics_address,
                "registered": n.registered,
                "alive": n.alive,
                "controller": n.is_controller,
                "leaders": n.leaders,
                "replicas": n.replicas,
            }
            for n in status.nodes
        ],
        "under_replicated": [_problem_json(p) for p in status.under_replicated],
        "leaderless": [_problem_json(p) for p in status.leaderless],
        "notes": list(status.notes),
    }


def render_status(status: ClusterStatus) -> list[Any]:
    """Rich renderables: the node table, a summary line, and the troubled partitions."""
    from rich.table import Table
    from rich.text import Text

    table = Table(title=f"local cluster {status.directory}", title_justify="left")
    table.add_column("node", justify="right")
    table.add_column("pid", justify="right")
    table.add_column("process")
    table.add_column("registered")
    table.add_column("gRPC", no_wrap=True)
    table.add_column("metrics", no_wrap=True)
    table.add_column("leaders", justify="right")
    table.add_column("replicas", justify="right")
    styles = {ProcState.RUNNING: "green", ProcState.STOPPED: "yellow", ProcState.DEAD: "red"}
    for n in status.nodes:
        node = f"{n.node_id}*" if n.is_controller else str(n.node_id)
        process = Text("-") if n.process is None else Text(n.process.value, style=styles[n.process])
        table.add_row(
            node,
            "-" if n.pid is None else str(n.pid),
            process,
            _registration(n),
            n.address,
            n.metrics_address,
            str(n.leaders),
            str(n.replicas),
        )
    out: list[Any] = [table]
    if status.controller_id is None:
        controller = "unknown (no node answered)"
    elif status.controller_id < 0:
        controller = "none (no controller leader)"
    else:
        controller = f"node {status.controller_id} (marked *)"
    out.append(
        Text(
            f"controller: {controller}; {status.topics} topic(s), {status.partitions} "
            f"partition(s), {len(status.under_replicated)} under-replicated, "
            f"{len(status.leaderless)} leaderless"
        )
    )
    troubled = {(p.topic, p.partition): p for p in status.leaderless + status.under_replicated}
    if troubled:
        parts = Table(title="partitions needing attention", title_justify="left")
        for col in ("topic", "partition", "leader", "replicas", "in sync", "problem"):
            parts.add_column(col)
        leaderless = {(p.topic, p.partition) for p in status.leaderless}
        under = {(p.topic, p.partition) for p in status.under_replicated}
        for key in sorted(troubled):
            p = troubled[key]
            kinds = (("leaderless", leaderless), ("under-replicated", under))
            problems = [what for what, keys in kinds if key in keys]
            parts.add_row(
                p.topic,
                str(p.partition),
                "-" if p.leader < 0 else str(p.leader),
                ",".join(map(str, p.replicas)),
                ",".join(map(str, p.in_sync)),
                ", ".join(problems),
            )
        out.append(parts)
    for note in status.notes:
        out.append(Text(f"note: {note}", style="yellow"))
    return out


def render_nodes(result: UpResult, cwd: Path | None = None) -> list[Any]:
    """Rich renderables for ``up``: the nodes, the controller, how other commands find it."""
    from rich.table import Table
    from rich.text import Text

    cluster = result.cluster
    verb = "resumed" if result.resumed else "started"
    table = Table(title=f"local cluster {verb} in {cluster.directory}", title_justify="left")
    for col in ("node", "pid", "gRPC", "metrics", "log"):
        justify: Literal["left", "right"] = "right" if col in ("node", "pid") else "left"
        table.add_column(col, justify=justify, no_wrap=True)
    for n in cluster.nodes:
        node = f"{n.node_id}*" if n.node_id == result.controller_id else str(n.node_id)
        log = (
            n.log_path.relative_to(cluster.directory)
            if n.log_path.is_relative_to(cluster.directory)
            else n.log_path
        )
        table.add_row(node, str(n.pid), n.address, n.metrics_address, str(log))
    bootstrap = ",".join(n.address for n in cluster.nodes)
    home = (cwd or Path.cwd()).absolute()
    if cluster.directory == home / CLUSTER_DIR_DEFAULT:
        found = f"commands run in {home} find it; elsewhere pass --bootstrap {bootstrap}"
    else:
        found = (
            f"pass --bootstrap {bootstrap} (or set TIDELOG_BOOTSTRAP) and --dir "
            f"{cluster.directory} to the cluster commands"
        )
    return [table, Text(f"controller leader: node {result.controller_id} (marked *)"), Text(found)]


# ---------------------------------------------------------------------------------------------
# kill, start, down


def kill_node(directory: Path, node_id: int, sig: str = "KILL") -> ProcState:
    """Signal one node (KILL, STOP or TERM) and wait for the effect; returns its state.

    TERM on a stopped node also sends CONT, or the node could never act on it."""
    try:
        signum = SIGNALS[sig.upper()]
    except KeyError:
        raise ClusterError(f"--signal {sig} is not one of {', '.join(SIGNALS)}") from None
    cluster = load_cluster(directory.absolute())
    node = cluster.node(node_id)
    before = process_state(node.pid, node.data_dir)
    if signum is signal.SIGSTOP and before is ProcState.STOPPED:
        raise ClusterError(
            f"node {node_id} is already stopped; `tidelog cluster start {node_id}` resumes it"
        )
    signal_node(node, signum)
    if signum is signal.SIGSTOP:
        return _wait_state(node, lambda s: s is not ProcState.RUNNING, KILL_WAIT_S)
    if signum is signal.SIGTERM:
        if before is ProcState.STOPPED:
            with contextlib.suppress(ProcessLookupError):
                os.kill(node.pid, signal.SIGCONT)
        return _wait_state(node, lambda s: s is ProcState.DEAD, STOP_TIMEOUT_S)
    return _wait_state(node, lambda s: s is ProcState.DEAD, KILL_WAIT_S)


def start_node(
    directory: Path,
    node_id: int,
    *,
    wait: bool = True,
    timeout_s: float = NODE_READY_TIMEOUT_S,
) -> str:
    """Restart a dead node with its recorded command line, or SIGCONT a stopped one; with
    ``wait``, return once it serves and sees itself registered alive. Returns what was done
    ("restarted" or "resumed")."""
    directory = directory.absolute()
    with _locked(directory):
        cluster = load_cluster(directory)
        node = cluster.node(node_id)
        state = process_state(node.pid, node.data_dir)
        if state is ProcState.RUNNING:
            raise ClusterError(f"node {node_id} is already running (pid {node.pid})")
        if state is ProcState.STOPPED:
            os.kill(node.pid, signal.SIGCONT)
            action = "resumed"
        else:
            for addr in (node.address, node.metrics_address):
                if port_in_use(_port_of(addr)):
                    raise ClusterError(
                        f"cannot restart node {node_id}: port {_port_of(addr)} ({addr}) is "
                        "in use by another process"
                    )
            cluster = cluster.with_pid(node_id, _launch(node))
            save_cluster(cluster)
            node = cluster.node(node_id)
            action = "restarted"
    if wait:
        wait_node_ready(node, timeout_s)
    return action


def wait_node_ready(node: NodeSpec, timeout_s: float = NODE_READY_TIMEOUT_S) -> None:
    """Wait until the node itself answers Metadata knowing a controller leader and listing
    itself registered alive. Asking the node itself matters: right after a quick restart
    the others may still list it alive from before it died."""
    deadline = time.monotonic() + timeout_s
    with _Probe() as probe:
        while True:
            state = process_state(node.pid, node.data_dir)
            if state is ProcState.DEAD:
                raise ClusterError(_with_tail(f"node {node.node_id} exited after starting", node))
            resp = probe.metadata(node.address) if state is ProcState.RUNNING else None
            if resp is not None and resp.controller_id >= 0:
                if any(n.node_id == node.node_id and n.alive for n in resp.nodes):
                    return
            if time.monotonic() >= deadline:
                why = (
                    "it does not answer Metadata"
                    if resp is None
                    else "it sees no controller leader"
                    if resp.controller_id < 0
                    else "it is not registered alive"
                )
                message = f"node {node.node_id} is not ready after {timeout_s:.0f} s: {why}"
                raise ClusterError(_with_tail(message, node))
            time.sleep(POLL_INTERVAL_S)


def _stop_all(cluster: ClusterFile, *, quiet: bool = False) -> dict[int, str]:
    """SIGTERM every live node (CONT for stopped ones), wait, SIGKILL the stragglers.
    Returns per node: "stopped", "killed" or "not running"."""
    outcome: dict[int, str] = {}
    pending: list[NodeSpec] = []
    for n in cluster.nodes:
        state = process_state(n.pid, n.data_dir)
        if state is ProcState.DEAD:
            outcome[n.node_id] = "not running"
            continue
        try:
            os.kill(n.pid, signal.SIGTERM)
            if state is ProcState.STOPPED:
                os.kill(n.pid, signal.SIGCONT)
        except ProcessLookupError:
            outcome[n.node_id] = "not running"
            continue
        except PermissionError:
            if quiet:
                continue
            raise ClusterError(
                f"not allowed to signal node {n.node_id} (pid {n.pid}): another user's"
            ) from None
        pending.append(n)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while pending and time.monotonic() < deadline:
        pending = [n for n in pending if not _gone(n, outcome, "stopped")]
        if pending:
            time.sleep(POLL_INTERVAL_S)
    for n in pending:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if process_state(n.pid, n.data_dir) is not ProcState.DEAD:
                os.kill(n.pid, signal.SIGKILL)
    deadline = time.monotonic() + KILL_WAIT_S
    while pending and time.monotonic() < deadline:
        pending = [n for n in pending if not _gone(n, outcome, "killed")]
        if pending:
            time.sleep(POLL_INTERVAL_S / 2)
    for n in pending:
        outcome[n.node_id] = "still running"
    return outcome


def _gone(node: NodeSpec, outcome: dict[int, str], how: str) -> bool:
    if process_state(node.pid, node.data_dir) is ProcState.DEAD:
        outcome[node.node_id] = how
        return True
    return False


def down(directory: Path, *, purge: bool = False) -> dict[int, str]:
    """Stop every node (SIGTERM, then SIGKILL after STOP_TIMEOUT_S); keep cluster.json and
    the data so ``up`` resumes the cluster, or remove the directory with ``purge``.

    Returns per node what happened: "stopped", "killed", "not running" or "still running"."""
    directory = directory.absolute()
    with _locked(directory):
        cluster = load_cluster(directory)
        outcome = _stop_all(cluster)
        stuck = [i for i, what in outcome.items() if what == "still running"]
        if stuck:
            raise ClusterError(
                f"node(s) {','.join(map(str, stuck))} survived SIGKILL for {KILL_WAIT_S:.0f} s "
                "(uninterruptible I/O?); run `tidelog cluster down` again"
            )
    if purge:
        try:
            shutil.rmtree(directory)
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                raise ClusterError(f"cannot remove {directory}: {exc.strerror or exc}") from None
    return outcome
