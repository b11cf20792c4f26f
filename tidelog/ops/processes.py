"""Node processes: the node's command line (:func:`node_argv`, from the flag table in
node/settings.py) and its start (:func:`spawn_node`), which the local cluster and the tests
share; for the local cluster, the state of a node from /proc (running, stopped by SIGSTOP,
dead) with an identity check against pid reuse, signals, its log's tail; and ports (free,
in use, allocated from a base port).
"""

from __future__ import annotations

import enum
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Final

from tidelog.node.settings import to_argv
from tidelog.ops.cluster_file import ClusterError, NodeSpec
from tidelog.ops.limits import (
    CMDLINE_READS_MAX,
    CMDLINE_RETRY_S,
    CONTROLLER_VOTERS_MAX,
    EPHEMERAL_LOW_DEFAULT,
    FREE_PORT_FLOOR,
    FREE_PORT_MIN_SPAN,
    FREE_PORT_PID_STRIDE,
    HOST,
    INTERNAL_PORT_OFFSET,
    LOG_TAIL_BYTES,
    LOG_TAIL_LINES,
    METRICS_PORT_OFFSET,
    POLL_INTERVAL_S,
    PORT_MAX,
)

__all__ = [
    "SIGNALS",
    "ProcState",
    "allocate_internal_ports",
    "allocate_ports",
    "controller_voters",
    "free_port",
    "how_it_ended",
    "launch",
    "log_tail",
    "node_argv",
    "parse_proc_stat",
    "port_in_use",
    "port_of",
    "process_state",
    "signal_node",
    "spawn_node",
    "wait_state",
    "with_log_tail",
]


SIGNALS: Final[Mapping[str, signal.Signals]] = {
    "KILL": signal.SIGKILL,
    "STOP": signal.SIGSTOP,
    "TERM": signal.SIGTERM,
}


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
#: How reaped children ended (their Popen return code: negative for a signal), by pid.
_EXITS: dict[int, int] = {}


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
        _EXITS[pid] = child.returncode


def how_it_ended(pid: int) -> str:
    """How a process this one started and found dead ended: "exit status N" or "killed by
    SIGNAME"; for a process still there, that it does not look like the node it should be
    (its command line names another data directory); "" when unknown (not our child)."""
    _reap(pid)
    code = _EXITS.get(pid)
    if code is None:
        return "still running, but not as that node" if pid in _CHILDREN else ""
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


def _is_node_process(pid: int, data_dir: Path) -> bool:
    """Whether ``pid`` runs the node whose data lives in ``data_dir`` (not a reused pid).

    A process in the middle of exec shows an empty command line for a moment (the node
    execs twice: it replaces itself to tune the allocator), and on a loaded machine that
    moment can last longer than any fixed wait. A child this process started and has not
    reaped is the node it started, whatever its command line shows now; anyone else's
    empty command line is read again a few times before it counts as someone else's."""
    child = _CHILDREN.get(pid)
    for _ in range(CMDLINE_READS_MAX):
        try:
            raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return False
        if raw:
            return os.fsencode(str(data_dir)) in raw.split(b"\0")
        if child is not None and child.poll() is None:
            return True
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


def wait_state(node: NodeSpec, done: Callable[[ProcState], bool], timeout_s: float) -> ProcState:
    deadline = time.monotonic() + timeout_s
    while True:
        state = process_state(node.pid, node.data_dir)
        if done(state) or time.monotonic() >= deadline:
            return state
        time.sleep(POLL_INTERVAL_S / 2)


def spawn_node(
    argv: Sequence[str], log_path: Path, *, detached: bool, banner: str | None = None
) -> subprocess.Popen[bytes]:
    """Start a node process with no stdin and its output appended to ``log_path`` (after
    ``banner``, a line). ``detached``: in its own session, so a Ctrl-C in the shell does not
    reach it (the local cluster's nodes outlive the command); the tests' nodes stay in the
    test's session. Raises OSError when the program cannot start."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    with log_path.open("ab") as log:
        if banner is not None:
            log.write(f"{banner}\n".encode())
            log.flush()
        return subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=detached,
            close_fds=True,
            env=env,
        )


def launch(node: NodeSpec) -> int:
    """Start a local cluster's node detached (:func:`spawn_node`). Returns the pid."""
    node.data_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    banner = f"--- tidelog cluster: starting node {node.node_id} at {stamp}"
    try:
        proc = spawn_node(node.argv, node.log_path, detached=True, banner=banner)
    except OSError as exc:
        raise ClusterError(
            f"cannot start node {node.node_id} ({node.argv[0]}): {exc.strerror or exc}"
        ) from None
    _CHILDREN[proc.pid] = proc
    return proc.pid


def log_tail(path: Path) -> str:
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


def with_log_tail(message: str, node: NodeSpec) -> str:
    tail = log_tail(node.log_path)
    return f"{message}; see {node.log_path}" + (f" (last lines: {tail})" if tail else "")


# ---------------------------------------------------------------------------------------------
# Ports and argv


def free_port(host: str = HOST) -> int:
    """A port nothing listens on right now, for tests and benchmarks, never one this process
    has given out before.

    It comes from below the kernel's ephemeral range (``ip_local_port_range``) when there is
    room there: a port the kernel picked (bind to port 0) is one it may hand again, as the
    source port of any outgoing connection, between this call and the moment a node binds
    it, and the node then fails to start with "address in use". Below the range only another
    listener can take it. Each process walks the range from its own offset (its pid), so
    parallel test workers do not race for the same ports.
    """
    global _port_cursor
    lo, hi = FREE_PORT_FLOOR, _ephemeral_low()
    if hi - lo >= FREE_PORT_MIN_SPAN:
        span = hi - lo
        if _port_cursor is None:
            _port_cursor = (os.getpid() * FREE_PORT_PID_STRIDE) % span
        for _ in range(span):
            port = lo + _port_cursor
            _port_cursor = (_port_cursor + 1) % span
            if not port_in_use(port, host):
                return port
    with socket.socket() as s:
        s.bind((host, 0))
        picked: int = s.getsockname()[1]
        return picked


#: Where :func:`free_port` goes next in its range (an offset from the floor); None until the
#: first call.
_port_cursor: int | None = None


def _ephemeral_low(path: Path = Path("/proc/sys/net/ipv4/ip_local_port_range")) -> int:
    """The first port of the kernel's ephemeral range (the Linux default where unknown)."""
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return EPHEMERAL_LOW_DEFAULT


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
    grpc_ports = _free_run(count, base_port, "gRPC", taken, in_use)
    metrics_ports = _free_run(count, metrics_base_port, "metrics", taken, in_use)
    return list(zip(grpc_ports, metrics_ports, strict=True))


def allocate_internal_ports(
    count: int,
    base_port: int,
    avoid: Sequence[int] = (),
    in_use: Callable[[int], bool] = port_in_use,
) -> list[int]:
    """``count`` internal (node-to-node) ports from ``base_port + INTERNAL_PORT_OFFSET`` up,
    each neither in use nor in ``avoid`` (the ports :func:`allocate_ports` gave out)."""
    if count < 1:
        raise ValueError(f"count={count} must be >= 1")
    return _free_run(count, base_port + INTERNAL_PORT_OFFSET, "internal", set(avoid), in_use)


def _free_run(
    count: int, first: int, what: str, taken: set[int], in_use: Callable[[int], bool]
) -> list[int]:
    def next_free(start: int) -> int:
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

    ports: list[int] = []
    start = first
    for _ in range(count):
        ports.append(next_free(start))
        start = ports[-1] + 1
    return ports


def controller_voters(addresses: Mapping[int, str]) -> str:
    """``1@h:p,2@h:p,3@h:p``: the lowest CONTROLLER_VOTERS_MAX node ids."""
    ids = sorted(addresses)[:CONTROLLER_VOTERS_MAX]
    return ",".join(f"{i}@{addresses[i]}" for i in ids)


def node_argv(
    node_id: int,
    address: str,
    data_dir: Path,
    metrics_port: int,
    voters: str | None,
    python: str = sys.executable,
    *,
    via_cli: bool = False,
    internal_listen: str | None = None,
    tls: tuple[Path, Path, Path] | None = None,
    secret_file: Path | None = None,
    join: str | None = None,
) -> tuple[str, ...]:
    """The command line of one node: ``python -m tidelog.node`` (the CLI's dependencies
    unloaded), or ``python -m tidelog node start`` with ``via_cli``; the flags come from the
    node's table (node/settings.py). ``tls`` is (CA, certificate, key) of node-to-node TLS,
    ``secret_file`` the cluster secret's file. The local cluster stores it in cluster.json so that
    ``start`` restarts exactly the same node; the integration tests start nodes with it."""
    command = ("-m", "tidelog", "node", "start") if via_cli else ("-m", "tidelog.node")
    flags = to_argv(
        {
            "node_id": node_id,
            "listen": address,
            "data_dir": data_dir,
            "metrics_port": metrics_port,
            "controller_voters": voters,
            "internal_listen": internal_listen,
            "internal_ca": tls[0] if tls else None,
            "internal_cert": tls[1] if tls else None,
            "internal_key": tls[2] if tls else None,
            "cluster_secret_file": secret_file,
            "join": join,
        }
    )
    return (python, *command, *flags)


def port_of(address: str) -> int:
    return int(address.rpartition(":")[2])
