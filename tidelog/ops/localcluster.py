"""A local cluster: N node processes on 127.0.0.1, managed from one directory.

``tidelog cluster up --nodes 3`` starts the nodes detached (their own session, output to
``DIR/node-ID/node.log``, data in ``DIR/node-ID/data``) and records them in
``DIR/cluster.json``; ``status``, ``kill``, ``start`` and ``down`` work from that file alone,
and :func:`discover_bootstrap` lets every other command run in the same directory find the
cluster without a ``--bootstrap``. The default DIR is ``.tidelog/cluster`` under the current
directory.

Ports: gRPC ports are taken from the base port upward (default 9092: 9092, 9093, ...) and
metrics ports from the base port + ``METRICS_PORT_OFFSET`` upward (default 9192, 9193, ...),
skipping any port something already listens on; internal (node-to-node) ports from the base
port + ``INTERNAL_PORT_OFFSET`` upward (default 9292, 9293, ...). The first ``CONTROLLER_VOTERS_MAX`` nodes
are the controller's voters; every node is told the same voter list.

Why a pid file with identity checks rather than a supervisor: the nodes must outlive the
command that started them, and the chaos tester must be able to SIGKILL and SIGSTOP a
real process. A recorded pid can be reused by an unrelated process after a reboot, so a
pid only counts as our node when ``/proc/PID/cmdline`` names the node's data directory;
nothing here ever signals a process that fails that check.

Node authentication: by default ``up`` makes a cluster CA and one certificate per node in
``DIR/certs/`` (tidelog/ops/certs.py) and the nodes talk mutual TLS on their internal
listeners; with ``tls=False`` (``--no-tls``) it writes a random cluster secret to
``DIR/cluster.secret`` (mode 0600) instead. The client listeners stay plain gRPC, so the CLI
and the clients reach the nodes as before.

``down`` keeps cluster.json and the data (unless ``--purge``), and a later ``up`` in the same
directory resumes the stopped cluster with the same ids, ports and data.

This module holds the operations (up, status, kill, start, down, discover_bootstrap) and
re-exports the names of its parts: :mod:`~tidelog.ops.cluster_file` (cluster.json and the
directory lock), :mod:`~tidelog.ops.processes` (node processes, ports, the node's argv),
:mod:`~tidelog.ops.probe` (Metadata over sync gRPC, readiness), :mod:`~tidelog.ops.status`
(the status and its rendering) and :mod:`~tidelog.ops.limits` (ports and timeouts).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from tidelog.ops.cluster_file import (
    ClusterError,
    ClusterFile,
    NodeSpec,
    load_cluster,
    locked,
    save_cluster,
)
from tidelog.ops.limits import (
    BASE_PORT_DEFAULT,
    CERTS_DIR,
    CLUSTER_DIR_DEFAULT,
    CLUSTER_FILE,
    HOST,
    INTERNAL_PORT_OFFSET,
    KILL_WAIT_S,
    METRICS_PORT_OFFSET,
    NODE_READY_TIMEOUT_S,
    NODES_MAX,
    POLL_INTERVAL_S,
    PORT_MAX,
    READY_TIMEOUT_S,
    SECRET_FILE,
    STOP_TIMEOUT_S,
)
from tidelog.ops.probe import Probe, readiness_problem
from tidelog.ops.processes import (
    SIGNALS,
    ProcState,
    allocate_internal_ports,
    allocate_ports,
    controller_voters,
    how_it_ended,
    launch,
    node_argv,
    parse_proc_stat,
    port_in_use,
    port_of,
    process_state,
    signal_node,
    wait_state,
    with_log_tail,
)
from tidelog.ops.status import (
    ClusterStatus,
    NodeStatus,
    PartitionProblem,
    UpResult,
    build_status,
    render_nodes,
    render_status,
    status_to_json,
)
from tidelog.v1 import broker_pb2

__all__ = [
    "BASE_PORT_DEFAULT",
    "CLUSTER_DIR_DEFAULT",
    "INTERNAL_PORT_OFFSET",
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
    "add_node",
    "allocate_ports",
    "build_status",
    "cluster_status",
    "controller_voters",
    "discover_bootstrap",
    "discover_bootstrap_in",
    "discover_tls_ca",
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


def discover_bootstrap(cwd: Path | str) -> str | None:
    """The addresses of the running nodes of the local cluster under ``cwd`` (the default
    ``.tidelog/cluster``), comma-separated, or None when there is none (no file, a damaged
    file, or every node down): the CLI's default bootstrap when no other is given."""
    return discover_bootstrap_in(Path(cwd) / CLUSTER_DIR_DEFAULT)


def discover_bootstrap_in(directory: Path) -> str | None:
    """As :func:`discover_bootstrap`, for the local cluster in ``directory``."""
    try:
        cluster = load_cluster(directory)
    except ClusterError:
        return None
    live = [
        n.address for n in cluster.nodes if process_state(n.pid, n.data_dir) is ProcState.RUNNING
    ]
    return ",".join(live) or None


def discover_tls_ca(directory: Path) -> Path | None:
    """The CA the local cluster in ``directory`` records for its client listeners (cluster.json
    ``tls_ca``, relative to ``directory`` or absolute), or None."""
    try:
        return load_cluster(directory).tls_ca
    except ClusterError:
        return None


# ---------------------------------------------------------------------------------------------
# up


def up(
    directory: Path,
    nodes: int,
    base_port: int = BASE_PORT_DEFAULT,
    *,
    timeout_s: float = READY_TIMEOUT_S,
    note: Callable[[str], None] | None = None,
    tls: bool = True,
) -> UpResult:
    """Start an ``nodes``-node cluster in ``directory`` (or resume the stopped one there) and
    wait until it is ready. On failure the started nodes are stopped again and the error
    names the log to read."""
    if not 1 <= nodes <= NODES_MAX:
        raise ClusterError(f"--nodes {nodes} must be in 1..{NODES_MAX}")
    if not 1 <= base_port <= PORT_MAX:
        raise ClusterError(f"--base-port {base_port} must be in 1..{PORT_MAX}")
    directory = directory.absolute()
    with locked(directory):
        resumed = (directory / CLUSTER_FILE).exists()
        if resumed:
            cluster = _resumable(load_cluster(directory), nodes)
            if note is not None:
                note(f"resuming the stopped {nodes}-node cluster in {directory}")
        else:
            cluster = _new_cluster(directory, nodes, base_port, tls=tls)
            if note is not None:
                note(f"starting {nodes} node(s) in {directory}")
        try:
            for spec in cluster.nodes:
                cluster = cluster.with_pid(spec.node_id, launch(spec))
                save_cluster(cluster)
            controller = _wait_ready(cluster, timeout_s)
        except BaseException:
            _stop_all(cluster, quiet=True)
            raise
    return UpResult(cluster, controller, resumed)


def _new_cluster(directory: Path, nodes: int, base_port: int, *, tls: bool) -> ClusterFile:
    ports = allocate_ports(nodes, base_port)
    internal_ports = allocate_internal_ports(nodes, base_port, [p for g_m in ports for p in g_m])
    ids = list(range(1, nodes + 1))
    addresses = {i: f"{HOST}:{g}" for i, (g, _) in zip(ids, ports, strict=True)}
    internal = {i: f"{HOST}:{p}" for i, p in zip(ids, internal_ports, strict=True)}
    voters = controller_voters(internal)
    node_tls: dict[int, tuple[Path, Path, Path]] = {}
    secret_file: Path | None = None
    if tls:
        from tidelog.ops.certs import CA_CERT, CertError, local_cluster_certs

        certs_dir = directory / CERTS_DIR
        try:
            files = local_cluster_certs(certs_dir, ids)
        except (CertError, OSError) as exc:
            raise ClusterError(f"cannot make the node certificates in {certs_dir}: {exc}") from None
        node_tls = {i: (certs_dir / CA_CERT, f.cert, f.key) for i, f in files.items()}
    else:
        secret_file = _write_secret(directory / SECRET_FILE)
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
                argv=node_argv(
                    i,
                    addresses[i],
                    data_dir,
                    metrics_port,
                    voters,
                    internal_listen=internal[i],
                    tls=node_tls.get(i),
                    secret_file=secret_file,
                ),
                internal_address=internal[i],
            )
        )
    return ClusterFile(directory, tuple(specs), voters, time.time_ns() // 1_000_000)


def add_node(
    directory: Path,
    *,
    timeout_s: float = NODE_READY_TIMEOUT_S,
) -> NodeSpec:
    """Start one more node in the running local cluster in ``directory``: the next node id,
    free ports, its certificate (or the cluster secret), joining through a running node's
    internal listener (``--join``). Returns it once it serves, registered alive; the
    controller then balances replicas onto it."""
    directory = directory.absolute()
    with locked(directory):
        cluster = load_cluster(directory)
        running = [
            n
            for n in cluster.nodes
            if process_state(n.pid, n.data_dir) is ProcState.RUNNING and n.internal_address
        ]
        if not running:
            raise ClusterError(
                f"no node of the local cluster in {directory} is running: `tidelog cluster "
                "up` first (a new node joins through a running one)"
            )
        if len(cluster.nodes) >= NODES_MAX:
            raise ClusterError(f"the local cluster has {NODES_MAX} nodes, the most it may have")
        node_id = max(n.node_id for n in cluster.nodes) + 1
        taken = {
            port_of(a)
            for n in cluster.nodes
            for a in (n.address, n.metrics_address, n.internal_address)
            if a
        }
        base = port_of(cluster.nodes[0].address)
        [(port, metrics_port)] = allocate_ports(
            1, base, in_use=lambda p: p in taken or port_in_use(p)
        )
        [internal_port] = allocate_internal_ports(1, base, avoid=[*taken, port, metrics_port])
        tls: tuple[Path, Path, Path] | None = None
        secret_file: Path | None = None
        if (directory / SECRET_FILE).exists():
            secret_file = directory / SECRET_FILE
        else:
            from tidelog.ops.certs import CA_CERT, CertError, local_cluster_certs

            certs_dir = directory / CERTS_DIR
            try:
                files = local_cluster_certs(certs_dir, [node_id])[node_id]
            except (CertError, OSError) as exc:
                raise ClusterError(
                    f"cannot make the certificate of node {node_id}: {exc}"
                ) from None
            tls = (certs_dir / CA_CERT, files.cert, files.key)
        node_dir = directory / f"node-{node_id}"
        data_dir = node_dir / "data"
        address = f"{HOST}:{port}"
        internal = f"{HOST}:{internal_port}"
        spec = NodeSpec(
            node_id=node_id,
            pid=0,
            address=address,
            metrics_address=f"{HOST}:{metrics_port}",
            data_dir=data_dir,
            log_path=node_dir / "node.log",
            argv=node_argv(
                node_id,
                address,
                data_dir,
                metrics_port,
                None,
                internal_listen=internal,
                tls=tls,
                secret_file=secret_file,
                join=running[0].internal_address,
            ),
            internal_address=internal,
        )
        cluster = replace(cluster, nodes=(*cluster.nodes, spec))
        cluster = cluster.with_pid(node_id, launch(spec))
        save_cluster(cluster)
        spec = cluster.node(node_id)
    wait_node_ready(spec, timeout_s)
    return spec


def _write_secret(path: Path) -> Path:
    """A random cluster secret for ``--no-tls``, readable by this user only."""
    import secrets

    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32) + "\n")
    return path


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
        for addr in (n.address, n.metrics_address, n.internal_address):
            if addr and port_in_use(port_of(addr)):
                raise ClusterError(
                    f"cannot resume node {n.node_id}: port {port_of(addr)} ({addr}) is in "
                    f"use by another process; free it or `tidelog cluster down --purge` and "
                    "start afresh"
                )
    return cluster


def _wait_ready(cluster: ClusterFile, timeout_s: float) -> int:
    """Wait for a controller leader and every node registered; returns the controller id."""
    ids = [n.node_id for n in cluster.nodes]
    deadline = time.monotonic() + timeout_s
    with Probe() as probe:
        while True:
            for n in cluster.nodes:
                if process_state(n.pid, n.data_dir) is ProcState.DEAD:
                    raise ClusterError(
                        with_log_tail(f"node {n.node_id} exited while the cluster started", n)
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
                    raise ClusterError(with_log_tail(message, cluster.node(blame)))
                logs = cluster.directory / "node-*" / "node.log"
                raise ClusterError(f"{message}; see the node logs {logs}")
            time.sleep(POLL_INTERVAL_S * 2)


# ---------------------------------------------------------------------------------------------
# status


def cluster_status(directory: Path) -> ClusterStatus:
    """Process states from /proc and the cluster's view from the first running node that
    knows a controller leader (stopped nodes are not asked: they would never answer)."""
    cluster = load_cluster(directory.absolute())
    states = {n.node_id: process_state(n.pid, n.data_dir) for n in cluster.nodes}
    best: tuple[broker_pb2.MetadataResponse, str] | None = None
    with Probe() as probe:
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
        return wait_state(node, lambda s: s is not ProcState.RUNNING, KILL_WAIT_S)
    if signum is signal.SIGTERM:
        if before is ProcState.STOPPED:
            with contextlib.suppress(ProcessLookupError):
                os.kill(node.pid, signal.SIGCONT)
        return wait_state(node, lambda s: s is ProcState.DEAD, STOP_TIMEOUT_S)
    return wait_state(node, lambda s: s is ProcState.DEAD, KILL_WAIT_S)


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
    with locked(directory):
        cluster = load_cluster(directory)
        node = cluster.node(node_id)
        state = process_state(node.pid, node.data_dir)
        if state is ProcState.RUNNING:
            raise ClusterError(f"node {node_id} is already running (pid {node.pid})")
        if state is ProcState.STOPPED:
            os.kill(node.pid, signal.SIGCONT)
            action = "resumed"
        else:
            for addr in (node.address, node.metrics_address, node.internal_address):
                if addr and port_in_use(port_of(addr)):
                    raise ClusterError(
                        f"cannot restart node {node_id}: port {port_of(addr)} ({addr}) is "
                        "in use by another process"
                    )
            cluster = cluster.with_pid(node_id, launch(node))
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
    with Probe() as probe:
        while True:
            state = process_state(node.pid, node.data_dir)
            if state is ProcState.DEAD:
                ended = how_it_ended(node.pid)
                how = f" ({ended})" if ended else ""
                raise ClusterError(
                    with_log_tail(f"node {node.node_id} exited after starting{how}", node)
                )
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
                raise ClusterError(with_log_tail(message, node))
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
    with locked(directory):
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
