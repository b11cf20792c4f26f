"""Run a node in the foreground: ``tidelog node start`` and ``python -m tidelog.node``.

Memory allocator tuning happens here because it cannot happen later. glibc reads its
``MALLOC_*_`` variables once, when the process starts. With its defaults it hands every
large buffer (a produce request, a fetch response: 100 KB to MBs) back to the kernel when
freed and page-faults it in again on the next request, which cost 15-18% of server time
(+40% throughput on grpc.aio unary once disabled). So when the
variables are missing, :func:`run_node` re-executes the same process (same pid, so
supervisors and pid files keep working) as ``python -m tidelog.node ...`` with them set.
``TIDELOG_NO_REEXEC=1`` turns that off; values already in the environment are respected.
The re-executed process gets every effective setting as a flag and none of the
``TIDELOG_NODE_*`` variables nor ``--config``: it runs with exactly what this one resolved.
"""

from __future__ import annotations

import asyncio
import faulthandler
import logging
import os
import resource
import signal
import sys
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path

import prometheus_client

from tidelog.node import limits
from tidelog.node.multiraft import RaftTiming
from tidelog.node.settings import (
    CLEANER_INTERVAL_MS_DEFAULT,
    CLEANER_IO_BYTES_PER_SECOND_DEFAULT,
    CLEANER_MAP_BYTES_DEFAULT,
    ELECTION_TIMEOUT_MS_DEFAULT,
    ENV_PREFIX,
    HEARTBEAT_INTERVAL_MS_DEFAULT,
    NODE_DEAD_MS_DEFAULT,
    RECOVERY_BYTES_PER_SECOND_DEFAULT,
    ClientSecurity,
    NodeFlags,
    parse_flags,
    to_argv,
)

log = logging.getLogger("tidelog.node")

#: Bytes. Allocations below the mmap threshold come from the heap and are reused; trim and
#: top pad keep freed heap memory in the process instead of returning it per request.
MALLOC_ENV = {
    "MALLOC_MMAP_THRESHOLD_": str(32 * 1024 * 1024),
    "MALLOC_TRIM_THRESHOLD_": str(256 * 1024 * 1024),
    "MALLOC_TOP_PAD_": str(64 * 1024 * 1024),
}
_NO_REEXEC = "TIDELOG_NO_REEXEC"
_REEXECED = "TIDELOG_MALLOC_TUNED"


#: Raft ticks every this many milliseconds; the timeouts above are converted to ticks.
TICK_MS = 50


@dataclass(frozen=True, slots=True)
class ClusterSettings:
    """The node's cluster flags, checked."""

    controller_voters: str | None = None
    election_timeout_ms: int = ELECTION_TIMEOUT_MS_DEFAULT
    heartbeat_interval_ms: int = HEARTBEAT_INTERVAL_MS_DEFAULT
    node_dead_ms: int = NODE_DEAD_MS_DEFAULT
    cluster_id: str | None = None
    #: Failure domain of this node; placement keeps a partition's replicas in distinct racks.
    rack: str | None = None
    #: The internal listener (Raft, Cluster) and the address the other nodes dial.
    internal_listen: str | None = None
    internal_advertised: str | None = None
    #: Node-to-node mutual TLS (all three) or a cluster secret file (node/internal_auth.py).
    internal_ca: Path | None = None
    internal_cert: Path | None = None
    internal_key: Path | None = None
    cluster_secret_file: Path | None = None
    #: Sampled tracing of produce requests (node/trace.py): every Nth, 0 off; log lines too.
    trace_sample: int = 0
    trace_log: bool = False
    #: The Raft TCP listener's port (0: any free), or none at all (node/transport.py).
    raft_port: int = 0
    raft_stream_only: bool = False
    #: The log cleaner of compacted topics (node/log/cleaner.py).
    cleaner_io_bytes_per_second: int = CLEANER_IO_BYTES_PER_SECOND_DEFAULT
    cleaner_map_bytes: int = CLEANER_MAP_BYTES_DEFAULT
    cleaner_interval_ms: int = CLEANER_INTERVAL_MS_DEFAULT
    #: ``replica.recovery.bytes.per.second`` (node/catchup.py; 0: unlimited).
    replica_recovery_bytes_per_second: int = RECOVERY_BYTES_PER_SECOND_DEFAULT
    #: Snapshot the controller state and truncate its log every this many entries.
    controller_snapshot_entries: int = 10_000
    #: Any node's internal address, asked for the controller voters (``--join``).
    join: str | None = None

    def __post_init__(self) -> None:
        if self.join is not None and self.controller_voters is not None:
            raise ValueError("--join and --controller-voters exclude each other: give one")
        if self.controller_voters is not None:
            from tidelog.node.controller_node import parse_voters

            parse_voters(self.controller_voters)
        self.timing()  # raises ValueError for inconsistent timeouts
        if self.node_dead_ms < 2 * self.heartbeat_interval_ms or self.node_dead_ms < 500:
            raise ValueError(
                f"--node-dead-ms {self.node_dead_ms} is too short: at least 500 ms and twice "
                "the heartbeat interval"
            )

    def timing(self) -> RaftTiming:
        tick = min(TICK_MS, self.heartbeat_interval_ms)
        return RaftTiming(
            tick_ms=tick,
            heartbeat_interval_ms=self.heartbeat_interval_ms,
            election_timeout_ms=self.election_timeout_ms,
        )

    def argv(self) -> list[str]:
        # Every field is the flag of the same dest (node/settings.py); None and an empty
        # string are left out.
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return to_argv({k: None if v == "" else v for k, v in values.items()})


def node_flags(values: Mapping[str, object]) -> tuple[NodeFlags, ClusterSettings]:
    """The flags of either entry point (values by dest, node/settings.py), checked; raises
    ValueError naming the flag that is wrong."""
    flags = parse_flags(values)
    settings = ClusterSettings(**{f.name: getattr(flags, f.name) for f in fields(ClusterSettings)})
    return flags, settings


def run_flags(flags: NodeFlags, settings: ClusterSettings) -> None:
    """:func:`run_node` with checked flags (:func:`node_flags`)."""
    run_node(
        flags.node_id,
        flags.listen,
        flags.data_dir,
        flags.metrics_port,
        flags.advertised,
        flags.log_level,
        settings,
        flags.client_security(),
        log_format=flags.log_format,
    )


def node_argv(
    node_id: int,
    listen: str,
    data_dir: Path,
    metrics_port: int,
    advertised: str | None,
    log_level: str,
    settings: ClusterSettings | None = None,
    security: ClientSecurity | None = None,
    log_format: str = "text",
) -> list[str]:
    argv = [sys.executable, "-m", "tidelog.node"]
    argv += to_argv(
        {
            "node_id": node_id,
            "listen": listen,
            "data_dir": data_dir,
            "metrics_port": metrics_port,
            "advertised": advertised or None,
            "log_level": log_level,
            "log_format": log_format if log_format != "text" else None,
        }
    )
    if settings is not None:
        argv += settings.argv()
    if security is not None:
        argv += security.argv()
    return argv


def _reexec_with_malloc_tuning(argv: list[str]) -> None:
    """Replace this process with one whose glibc allocator is tuned (see module doc)."""
    if (
        os.environ.get(_NO_REEXEC)
        or os.environ.get(_REEXECED)
        or not sys.platform.startswith("linux")
    ):
        return
    if all(k in os.environ for k in MALLOC_ENV):
        return
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    for key, value in MALLOC_ENV.items():
        env.setdefault(key, value)
    env[_REEXECED] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, argv, env)


class JsonFormatter(logging.Formatter):
    """One JSON object a line (``--log-format json``): time (RFC 3339, UTC), level, logger,
    message, and the exception's traceback when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        import json
        import time

        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        out: dict[str, object] = {
            "time": f"{stamp}.{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def _configure_logging(log_level: str, log_format: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=log_level.upper(), handlers=[handler])


def _raise_open_files_limit() -> None:
    """Every partition keeps a few files open; take the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            pass


def _install_uvloop() -> None:
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


async def serve(
    node_id: int,
    listen: str,
    data_dir: Path,
    metrics_port: int,
    advertised: str | None = None,
    settings: ClusterSettings | None = None,
    security: ClientSecurity | None = None,
) -> None:
    """Start a node and run it until SIGTERM or SIGINT, then drain and stop.

    A second signal during the drain cuts it short."""
    from tidelog.node.log.cleaner import CleanerSettings
    from tidelog.node.server import Node

    settings = settings or ClusterSettings()
    node = Node(
        node_id,
        listen,
        data_dir,
        metrics_port,
        advertised,
        controller_voters=settings.controller_voters,
        timing=settings.timing(),
        node_dead_ms=settings.node_dead_ms,
        cluster_id=settings.cluster_id,
        rack=settings.rack,
        internal_listen=settings.internal_listen,
        internal_advertised=settings.internal_advertised,
        internal_ca=settings.internal_ca,
        internal_cert=settings.internal_cert,
        internal_key=settings.internal_key,
        cluster_secret_file=settings.cluster_secret_file,
        client_security=security,
        trace_sample=settings.trace_sample,
        trace_log=settings.trace_log,
        raft_port=None if settings.raft_stream_only else settings.raft_port,
        cleaner=CleanerSettings(
            io_bytes_per_second=settings.cleaner_io_bytes_per_second,
            map_bytes=settings.cleaner_map_bytes,
            interval_ms=settings.cleaner_interval_ms,
        ),
        recovery_bytes_per_second=settings.replica_recovery_bytes_per_second,
        controller_snapshot_entries=settings.controller_snapshot_entries,
        join=settings.join,
    )
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = 0
    drain: asyncio.Future[None] | None = None

    def on_signal(signum: int) -> None:
        nonlocal signals
        signals += 1
        if signals == 1:
            log.info("received %s: draining", signal.Signals(signum).name)
            stop.set()
        else:
            log.warning("received %s again: stopping without waiting", signal.Signals(signum).name)
            if drain is not None:
                drain.cancel()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        await node.start()
    except BaseException:
        await node.stop(0)
        raise
    await stop.wait()
    drain = asyncio.ensure_future(node.stop(limits.drain_timeout_ms / 1000))
    try:
        await asyncio.shield(drain)
    except asyncio.CancelledError:
        await node.stop(0)


def run_node(
    node_id: int,
    listen: str,
    data_dir: Path,
    metrics_port: int,
    advertised: str | None = None,
    log_level: str = "info",
    settings: ClusterSettings | None = None,
    security: ClientSecurity | None = None,
    log_format: str = "text",
) -> None:
    """Run one node in the foreground until SIGTERM/SIGINT (blocking).

    May replace the calling process (execve) to tune the memory allocator first; see the
    module docstring."""
    data_dir = Path(data_dir)
    _reexec_with_malloc_tuning(
        node_argv(
            node_id,
            listen,
            data_dir.resolve(),
            metrics_port,
            advertised,
            log_level,
            settings,
            security,
            log_format,
        )
    )
    _configure_logging(log_level, log_format)
    # A crash below Python (a signal such as SIGSEGV or SIGABRT in a native library) then
    # leaves the Python stacks in the node's log instead of nothing.
    faulthandler.enable()
    _raise_open_files_limit()
    _install_uvloop()
    # A `_created` timestamp per series doubles what every scrape carries, for nothing.
    prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]
    from tidelog.node.server import StartupError

    try:
        asyncio.run(serve(node_id, listen, data_dir, metrics_port, advertised, settings, security))
    except StartupError as exc:
        log.error("node %d cannot start: %s", node_id, exc)
        raise SystemExit(1) from None
