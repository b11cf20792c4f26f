"""Real node processes for the tests: free ports on 127.0.0.1, a temporary data directory,
readiness by gRPC health check, and a kill at the end. Shared by every test that starts
``python -m tidelog.node`` (or ``python -m tidelog node start``). The command line and the
spawning are the local cluster's (:func:`tidelog.ops.processes.node_argv`,
:func:`~tidelog.ops.processes.spawn_node`).

Every node gets its own internal (node-to-node) port. :func:`spawn_cluster` secures the
internal listeners as ``tidelog cluster up`` does: mutual TLS with a CA and node
certificates made in the cluster's directory (the default), a cluster secret file, or
nothing (loopback). :class:`Cluster` calls the internal ``Cluster`` service (LogDigest) with
node 1's credentials."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import grpc
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tidelog.node.controller_node import LOG_DIGEST
from tidelog.node.internal_auth import InternalAuth, TlsFiles
from tidelog.ops.processes import free_port, node_argv, spawn_node
from tidelog.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    broker_pb2,
    broker_pb2_grpc,
    cluster_pb2,
    cluster_pb2_grpc,
)

STARTUP_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 20.0


@dataclass
class Node:
    data_dir: Path
    log_path: Path
    node_id: int = 1
    port: int = field(default_factory=free_port)
    metrics_port: int = field(default_factory=free_port)
    #: ``--controller-voters``; None: the node is a one-node cluster on its own.
    voters: str | None = None
    #: Start through the CLI (``python -m tidelog node start``) instead of ``-m tidelog.node``.
    via_cli: bool = False
    #: More node flags (``--tls-cert``, ``--auth-tokens-file``, ...), appended as given.
    extra_args: tuple[str, ...] = ()
    #: The CA (PEM) that verifies the node's TLS certificate: readiness is then checked over
    #: TLS (with ``client_pem``, a (key, cert) pair, when the node requires client certs).
    tls_ca: bytes | None = None
    client_pem: tuple[bytes, bytes] | None = None
    proc: subprocess.Popen[bytes] | None = None
    internal_port: int = field(default_factory=free_port)
    #: (CA, certificate, key) of node-to-node TLS; or the cluster secret's file.
    tls: tuple[Path, Path, Path] | None = None
    secret_file: Path | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def internal_address(self) -> str:
        return f"127.0.0.1:{self.internal_port}"

    def argv(self) -> list[str]:
        return list(
            node_argv(
                self.node_id,
                self.address,
                self.data_dir,
                self.metrics_port,
                self.voters,
                via_cli=self.via_cli,
                internal_listen=self.internal_address,
                tls=self.tls,
                secret_file=self.secret_file,
            )
        ) + list(self.extra_args)

    def spawn(self) -> None:
        """Start the process without waiting (cluster members wait for each other)."""
        self.proc = spawn_node(self.argv(), self.log_path, detached=False)

    def wait_serving(self, timeout_s: float = STARTUP_TIMEOUT_S) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout_s
        if self.tls_ca is None:
            channel = grpc.insecure_channel(self.address)
        else:
            key, cert = self.client_pem or (None, None)
            creds = grpc.ssl_channel_credentials(self.tls_ca, key, cert)
            channel = grpc.secure_channel(self.address, creds)
        with channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"node exited early:\n{self.log_path.read_text()}")
                try:
                    resp = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if resp.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                if time.monotonic() > deadline:
                    self.kill()
                    raise RuntimeError(f"node not serving after {timeout_s} s")
                time.sleep(0.05)

    def start(self) -> None:
        self.spawn()
        self.wait_serving()

    def send_signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> int | None:
        """Send ``sig`` and wait for the exit (SIGKILL after a grace period); the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        code = self.proc.returncode
        self.proc = None
        return code

    def kill(self) -> None:
        """SIGKILL, resuming it first in case it was paused with SIGSTOP."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
        self.stop(signal.SIGKILL)


# ---- a cluster of node processes -----------------------------------------------------------

#: raft.types.Role.LEADER as LogDigest reports it.
ROLE_LEADER = 3


Security = Literal["tls", "secret", "none"]


def cluster_security(
    base: Path, ids: tuple[int, ...], security: Security
) -> tuple[dict[int, tuple[Path, Path, Path]], Path | None]:
    """Certificates (``tls``: a CA and one certificate per node in ``base/certs``) or a
    secret file (``secret``: ``base/cluster.secret``) for the nodes ``ids``."""
    if security == "tls":
        from tidelog.ops.certs import CA_CERT, local_cluster_certs

        files = local_cluster_certs(base / "certs", ids)
        return {i: (base / "certs" / CA_CERT, f.cert, f.key) for i, f in files.items()}, None
    if security == "secret":
        path = base / "cluster.secret"
        path.write_text("tests-" + "s" * 32 + "\n")
        return {}, path
    return {}, None


@contextlib.contextmanager
def running_cluster(base: Path, ids: tuple[int, ...]) -> Iterator[dict[int, Node]]:
    """:func:`spawn_cluster`, every node killed (SIGKILL) when the block ends."""
    nodes = spawn_cluster(base, ids)
    try:
        yield nodes
    finally:
        for n in nodes.values():
            n.kill()


def spawn_cluster(
    base: Path,
    ids: tuple[int, ...],
    security: Security = "tls",
    extra_args: Mapping[int, tuple[str, ...]] | None = None,
) -> dict[int, Node]:
    """Start one node per id (all of them controller voters) without waiting: they can only
    serve once a majority is up. ``security``: how the nodes authenticate each other;
    ``extra_args``: more flags for some nodes, by id."""
    ports = {i: (free_port(), free_port(), free_port()) for i in ids}
    voters = ",".join(f"{i}@127.0.0.1:{ports[i][2]}" for i in ids)
    tls, secret_file = cluster_security(base, ids, security)
    nodes = {
        i: Node(
            base / f"n{i}",
            base / f"n{i}.log",
            i,
            ports[i][0],
            ports[i][1],
            voters,
            internal_port=ports[i][2],
            tls=tls.get(i),
            secret_file=secret_file,
            extra_args=(extra_args or {}).get(i, ()),
        )
        for i in ids
    }
    try:
        for n in nodes.values():
            n.spawn()
    except BaseException:
        for n in nodes.values():
            n.kill()
        raise
    return nodes


async def until(what: str, check: Callable[[], Awaitable[bool]], timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"not within {timeout_s} s: {what}")


@dataclass
class Cluster:
    """gRPC views of a running cluster's nodes, for tests that kill and pause them."""

    nodes: dict[int, Node]
    #: The topic whose replicas ``digests`` and ``leaders`` look at.
    topic: str
    channels: dict[int, aio.Channel] = field(default_factory=dict)
    internal_channels: dict[int, aio.Channel] = field(default_factory=dict)

    @property
    def bootstrap(self) -> str:
        return ",".join(n.address for n in self.nodes.values())

    def channel(self, node: int) -> aio.Channel:
        ch = self.channels.get(node)
        if ch is None:
            ch = self.channels[node] = aio.insecure_channel(self.nodes[node].address)
        return ch

    def internal_auth(self) -> InternalAuth:
        """Node 1's credentials (the internal services answer nodes only)."""
        n = self.nodes[min(self.nodes)]
        if n.tls is not None:
            ca, cert, key = (p.read_bytes() for p in n.tls)
            return InternalAuth(n.node_id, tls=TlsFiles(ca, cert, key))
        if n.secret_file is not None:
            return InternalAuth(n.node_id, secret=n.secret_file.read_bytes().strip())
        return InternalAuth(n.node_id)

    def internal_channel(self, node: int) -> aio.Channel:
        ch = self.internal_channels.get(node)
        if ch is None:
            ch = self.internal_auth().channel(self.nodes[node].internal_address)
            self.internal_channels[node] = ch
        return ch

    def broker(self, node: int) -> broker_pb2_grpc.BrokerAsyncStub:
        return broker_pb2_grpc.BrokerStub(self.channel(node))  # type: ignore[return-value]

    async def metadata(self, node: int) -> broker_pb2.MetadataResponse | None:
        try:
            resp: broker_pb2.MetadataResponse = await self.broker(node).Metadata(
                broker_pb2.MetadataRequest(), timeout=2
            )
        except grpc.RpcError:
            return None
        return resp

    async def digests(self, node: int) -> dict[int, cluster_pb2.PartitionDigest]:
        stub = cluster_pb2_grpc.ClusterStub(self.internal_channel(node))
        md = self.internal_auth().call_metadata(LOG_DIGEST)
        resp = await stub.LogDigest(
            cluster_pb2.LogDigestRequest(topics=[self.topic]), timeout=10, metadata=md
        )
        return {p.partition: p for p in resp.partitions}

    async def leaders(self, among: tuple[int, ...] | None = None) -> dict[int, int]:
        """partition -> leader, asked of the replicas themselves (LogDigest roles)."""
        out: dict[int, int] = {}
        for node in among if among is not None else tuple(self.nodes):
            try:
                for p, d in (await self.digests(node)).items():
                    if d.role == ROLE_LEADER:
                        out[p] = node
            except grpc.RpcError:
                continue
        return out

    async def wait_all_alive(self, timeout_s: float = STARTUP_TIMEOUT_S) -> None:
        """Every node runs, and every node sees a controller and all nodes alive."""
        ids = sorted(self.nodes)

        async def ready() -> bool:
            for node_id, n in self.nodes.items():
                if n.proc is None or n.proc.poll() is not None:
                    tail = n.log_path.read_text()[-3000:]
                    raise AssertionError(f"node {node_id} exited:\n{tail}")
                md = await self.metadata(node_id)
                if md is None or md.controller_id < 0:
                    return False
                if sorted(x.node_id for x in md.nodes if x.alive) != ids:
                    return False
            return True

        await until("every node is up and alive", ready, timeout_s)

    async def with_topic(
        self, partitions: int, timeout_s: float = STARTUP_TIMEOUT_S, replication_factor: int = 3
    ) -> None:
        """Every node alive (:meth:`wait_all_alive`), the cluster's topic created if it is not
        yet (a module's cluster outlives each test), and every partition with a leader."""
        await self.wait_all_alive(timeout_s)
        md = await self.metadata(1)
        assert md is not None
        if self.topic not in {t.name for t in md.topics}:
            spec = admin_pb2.TopicSpec(
                name=self.topic, partitions=partitions, replication_factor=replication_factor
            )
            admin = admin_pb2_grpc.AdminStub(self.channel(1))  # type: ignore[no-untyped-call]
            await admin.CreateTopics(admin_pb2.CreateTopicsRequest(topics=[spec]), timeout=10)

        async def led() -> bool:
            return len(await self.leaders()) == partitions

        await until("every partition has a leader", led)

    async def close(self) -> None:
        for ch in [*self.channels.values(), *self.internal_channels.values()]:
            await ch.close(None)
        self.channels.clear()
        self.internal_channels.clear()
