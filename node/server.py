"""One node: storage, the gRPC server and its services, background tasks, metrics.

:class:`Node` owns the lifecycle. Startup opens the metadata store and every partition log
(recovering them) before the gRPC port accepts anything, so the first request sees a
consistent node. Shutdown drains in the order that loses nothing: health goes
NOT_SERVING, fetch streams end (UNAVAILABLE, so consumers reconnect), the server refuses new
calls and lets in-flight ones finish within a deadline while the group committer still runs
(an acks=all produce waits for its fsync), then the last fsync round, then the logs and the
store close.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
import uuid
from pathlib import Path
from typing import Any

from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from tidelog.config import TopicConfig
from tidelog.errors import NodeUnavailable
from tidelog.node import limits
from tidelog.node.admin_service import AdminService
from tidelog.node.broker_service import BrokerService
from tidelog.node.identity import NodeIdentity
from tidelog.node.metastore import MetaStore
from tidelog.node.metrics import MetricsServer, NodeMetrics
from tidelog.node.multiraft import MultiRaft, RaftTiming
from tidelog.node.partition import LogLike
from tidelog.node.raft_storage import HardStateStore
from tidelog.node.topics import LogOpener, TopicRegistry
from tidelog.v1 import admin_pb2, admin_pb2_grpc, broker_pb2, broker_pb2_grpc

log = logging.getLogger(__name__)

# grpc_health exposes its asyncio servicer as a module attribute its stubs do not declare.
_AioHealthServicer: Any = health.aio.HealthServicer  # type: ignore[attr-defined]

NODE_COLUMN = "node"
_NODE_ID_KEY = b"node_id"
_CLUSTER_ID_KEY = b"cluster_id"

BROKER_SERVICE = broker_pb2.DESCRIPTOR.services_by_name["Broker"].full_name
ADMIN_SERVICE = admin_pb2.DESCRIPTOR.services_by_name["Admin"].full_name

GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", limits.grpc_message_bytes_max),
    ("grpc.max_send_message_length", limits.grpc_message_bytes_max),
    # Fetch streams idle between keep-alives; let clients ping them without being kicked.
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.so_reuseport", 0),
]


class StartupError(Exception):
    """The node cannot start for a reason the operator can fix; the message says which."""


def split_host_port(address: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` -> (host, port), with a readable error."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"address {address!r} is not host:port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    value = int(port)
    if not 0 <= value <= 65535:
        raise ValueError(f"port {value} of {address!r} is out of range 0..65535")
    return host, value


def join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _reachable_host(host: str) -> str:
    """What to advertise when listening on a wildcard address."""
    if host in ("", "0.0.0.0", "::"):
        return socket.gethostname()
    return host


def open_partition_log(directory: Path, config: TopicConfig) -> LogLike:
    from tidelog.node.log import PartitionLog

    return PartitionLog(directory, config)


class Node:
    def __init__(
        self,
        node_id: int,
        listen: str,
        data_dir: Path,
        metrics_port: int,
        advertised: str | None = None,
        *,
        open_log: LogOpener = open_partition_log,
        timing: RaftTiming | None = None,
    ) -> None:
        self.node_id = node_id
        self._open_log = open_log
        self.listen = listen
        self.data_dir = data_dir
        self.metrics_port = metrics_port
        self.advertised = advertised
        self.metrics = NodeMetrics()
        self.timing = timing or RaftTiming()
        self.port = 0
        self.identity: NodeIdentity | None = None
        self._store: MetaStore | None = None
        self._raft: MultiRaft | None = None
        self._registry: TopicRegistry | None = None
        self._server: aio.Server | None = None
        self._health: Any = None
        self._metrics_server: MetricsServer | None = None
        self._retention_task: asyncio.Task[None] | None = None
        self.retention_interval_s = limits.retention_interval_ms / 1000

    @property
    def registry(self) -> TopicRegistry:
        assert self._registry is not None, "node not started"
        return self._registry

    def _load_identity(self, store: MetaStore) -> str:
        """Check the data directory belongs to this node id; return the cluster id."""
        raw = store.get(NODE_COLUMN, _NODE_ID_KEY)
        if raw is None:
            store.put(NODE_COLUMN, _NODE_ID_KEY, str(self.node_id).encode())
        elif int(raw) != self.node_id:
            raise StartupError(
                f"data directory {self.data_dir} belongs to node {int(raw)}, not node "
                f"{self.node_id}: start with --id {int(raw)} or use another --data-dir"
            )
        cluster_id = store.get(NODE_COLUMN, _CLUSTER_ID_KEY)
        if cluster_id is None:
            cluster_id = uuid.uuid4().hex.encode()
            store.put(NODE_COLUMN, _CLUSTER_ID_KEY, cluster_id)
        return cluster_id.decode()

    async def start(self) -> None:
        t0 = time.monotonic()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        try:
            host, port = split_host_port(self.listen)
        except ValueError as exc:
            raise StartupError(str(exc)) from None
        try:
            self._store = store = MetaStore(self.data_dir / "meta")
        except Exception as exc:
            if "lock" in str(exc).lower():
                raise StartupError(
                    f"data directory {self.data_dir} is in use by another node process"
                ) from exc
            raise StartupError(f"cannot open the metadata store in {self.data_dir}: {exc}") from exc
        cluster_id = self._load_identity(store)

        self._raft = MultiRaft(self.node_id, HardStateStore(store), self.metrics, self.timing)
        self._registry = TopicRegistry(
            store, self.data_dir, self.metrics, self._raft, self._open_log
        )
        await self._registry.load()
        self.metrics.watch_partitions(self._registry.partition_stats)

        server = aio.server(options=GRPC_OPTIONS)
        self._server = server
        try:
            self.port = server.add_insecure_port(join_host_port(host, port))
        except RuntimeError:
            self.port = 0
        if self.port == 0:
            raise StartupError(f"cannot listen on {self.listen}: the address is in use or invalid")
        try:
            self._metrics_server = self.metrics.serve(host or "0.0.0.0", self.metrics_port)
        except OSError as exc:
            raise StartupError(
                f"cannot serve metrics on port {self.metrics_port}: {exc.strerror or exc}"
            ) from exc

        advertised = self.advertised or join_host_port(_reachable_host(host), self.port)
        metrics_address = join_host_port(_reachable_host(host), self._metrics_server.port)
        self.identity = NodeIdentity(self.node_id, advertised, metrics_address, cluster_id)

        broker_pb2_grpc.add_BrokerServicer_to_server(
            BrokerService(self._registry, self.identity, self.metrics), server
        )
        admin_pb2_grpc.add_AdminServicer_to_server(
            AdminService(self._registry, self.identity, self.metrics), server
        )
        self._health = _AioHealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            [BROKER_SERVICE, ADMIN_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME], server
        )
        self._raft.start()
        await server.start()
        for service in ("", BROKER_SERVICE, ADMIN_SERVICE):
            await self._health.set(service, health_pb2.HealthCheckResponse.SERVING)
        self._retention_task = asyncio.create_task(self._retention_loop(), name="retention")
        log.info(
            "node %d serving on %s (advertised %s), metrics on http://%s/metrics, "
            "cluster %s, %d topics, started in %.2fs",
            self.node_id, join_host_port(host, self.port), advertised, metrics_address,
            cluster_id, len(self._registry.topics()), time.monotonic() - t0,
        )  # fmt: skip

    async def _retention_loop(self) -> None:
        """Roll segments by age and delete what retention.ms / retention.bytes allow."""
        while True:
            await asyncio.sleep(self.retention_interval_s)
            now_ms = time.time_ns() // 1_000_000
            for p in self.registry.partitions():
                if p.closed:
                    continue
                try:
                    p.log.maybe_roll(now_ms)
                    p.log.enforce_retention(now_ms)
                except Exception as exc:
                    p.fail_storage(exc)

    async def wait_closed(self) -> None:
        assert self._server is not None
        await self._server.wait_for_termination()

    async def stop(self, grace_s: float = limits.drain_timeout_ms / 1000) -> None:
        log.info("node %d stopping (drain deadline %.1fs)", self.node_id, grace_s)
        if self._health is not None:
            await self._health.enter_graceful_shutdown()
        if self._retention_task is not None:
            self._retention_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._retention_task
        if self._registry is not None:
            stopping = NodeUnavailable("the node is shutting down: reconnect to another node")
            for p in self._registry.partitions():
                p.end_streams(stopping)
        if self._server is not None:
            await self._server.stop(grace_s)
        if self._raft is not None:
            await self._raft.stop()
        if self._registry is not None:
            await self._registry.close()
        if self._store is not None:
            self._store.close()
        if self._metrics_server is not None:
            await asyncio.to_thread(self._metrics_server.close)
        log.info("node %d stopped", self.node_id)
