"""One node: storage, Raft, the gRPC server and its services, background tasks, metrics.

:class:`Node` owns the lifecycle. Startup opens the metadata store, binds the ports, starts
the Raft driver with the controller's group 0 (which replays the metadata log and so
re-creates the local partition replicas), and reports SERVING on the health service only once
the replayed metadata is applied and the replicas are open (and, for a lone node, once it is
registered), so the first request sees a consistent node. A node of a larger cluster reports
SERVING without waiting for the other nodes, so nodes can be started in any order.

Two listeners: the client listener (``--listen``) serves Broker, Admin, health and reflection;
the internal listener (``--internal-listen``) serves only the node-to-node Raft and Cluster
services, authenticated as node/internal_auth.py describes (mutual TLS, a cluster secret, or nothing
on loopback only). A node calls its peers on their internal addresses, which they register
with the controller next to their client address; clients only ever see the latter.

Shutdown drains in the order that loses nothing: health goes NOT_SERVING, fetch streams end
(UNAVAILABLE, so consumers reconnect), the server refuses new calls and lets in-flight ones
finish within a deadline while Raft still runs (an acks=all produce waits for its commit),
then the controller's tasks, the transport and the Raft driver stop, then the logs and the
store close.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from tidelog.config import TopicConfig
from tidelog.controller.commands import RegisterNode
from tidelog.controller.settings import (
    RECOVERY_BYTES_PER_SECOND,
    RECOVERY_LAG_BYTES,
    int_setting,
)
from tidelog.errors import NodeUnavailable
from tidelog.node import limits
from tidelog.node.admin_service import AdminService, shape_stats
from tidelog.node.auth import ClientListener, load_client_security
from tidelog.node.broker_service import BrokerService
from tidelog.node.catchup import (
    RECOVERY_LAG_BYTES_DEFAULT,
    CatchupManager,
    grpc_reader,
)
from tidelog.node.controller_node import (
    CATCHUP_READ,
    CONTROLLER_DIR,
    ClusterService,
    Controller,
    node_dead_ms_default,
    parse_voters,
)
from tidelog.node.controller_snapshots import CONTROLLER_SNAPSHOT_ENTRIES_DEFAULT, SNAPSHOT_FILE
from tidelog.node.group_coordinator import GroupRuntime
from tidelog.node.group_service import GroupService
from tidelog.node.idempotence_store import SNAPSHOT_INTERVAL_S, IdempotenceSnapshots
from tidelog.node.identity import (
    DIRECTORY_ID_KEY,
    NodeIdentity,
    machine_restarted,
    read_boot_id,
)
from tidelog.node.internal_auth import (
    AuthConfigError,
    InternalAuth,
    Mode,
    is_loopback,
    load_internal_auth,
)
from tidelog.node.log import PartitionLog
from tidelog.node.log.cleaner import CleanerSettings, LogCleaner
from tidelog.node.metastore import MetaStore
from tidelog.node.metrics import MetricsServer, NodeMetrics, RecoveryStats
from tidelog.node.multiraft import MultiRaft, RaftTiming
from tidelog.node.partition import LogLike
from tidelog.node.recovery import serve_recover_replica
from tidelog.node.replica_storage import HardStateStore
from tidelog.node.settings import RECOVERY_BYTES_PER_SECOND_DEFAULT, ClientSecurity
from tidelog.node.table_service import TableService
from tidelog.node.topics import LogOpener, TopicRegistry
from tidelog.node.trace import Tracer
from tidelog.node.transport import RaftTransport
from tidelog.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    broker_pb2,
    broker_pb2_grpc,
    cluster_pb2,
    cluster_pb2_grpc,
    group_pb2,
    group_pb2_grpc,
    table_pb2,
    table_pb2_grpc,
)

log = logging.getLogger(__name__)

# grpc_health exposes its asyncio servicer as a module attribute its stubs do not declare.
_AioHealthServicer: Any = health.aio.HealthServicer  # type: ignore[attr-defined]

NODE_COLUMN = "node"
_NODE_ID_KEY = b"node_id"
_CLUSTER_ID_KEY = b"cluster_id"
#: The identity of this data directory (a UUID made when the directory is first used), as
#: Redpanda's node UUID and KRaft's directory id: a wiped directory gets a new one.
#: The controller voters' ids the directory was first started with ("1,2,3").
_VOTERS_KEY = b"controller_voters"

#: How long startup waits for the replayed metadata, the local replicas and (lone node) the
#: registration before it reports SERVING anyway.
startup_ready_timeout_ms = 30_000
drain_poll_ms = 10
_CLUSTER_ID_NAMESPACE = uuid.UUID("7f0c1c4e-2a41-4c1b-9d5e-6f1d2b7a9c30")

BROKER_SERVICE = broker_pb2.DESCRIPTOR.services_by_name["Broker"].full_name
ADMIN_SERVICE = admin_pb2.DESCRIPTOR.services_by_name["Admin"].full_name
TABLE_SERVICE = table_pb2.DESCRIPTOR.services_by_name["Table"].full_name
GROUP_SERVICE = group_pb2.DESCRIPTOR.services_by_name["Group"].full_name

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


#: How long a node started with --join keeps asking for the controller voters.
join_timeout_ms = 30_000


async def _voters_from(address: str, auth: InternalAuth) -> tuple[dict[int, str], str]:
    """The controller voters (the committed configuration) and the cluster id, asked from
    the node at ``address`` (its internal listener)."""
    from tidelog.node.controller_node import CONTROLLER_VOTERS

    deadline = time.monotonic() + join_timeout_ms / 1000
    last = ""
    channel = auth.channel(address)
    try:
        stub = cluster_pb2_grpc.ClusterStub(channel)  # type: ignore[no-untyped-call]
        while time.monotonic() < deadline:
            try:
                resp: cluster_pb2.ControllerVotersResponse = await stub.ControllerVoters(
                    cluster_pb2.ControllerVotersRequest(),
                    timeout=2.0,
                    metadata=auth.call_metadata(CONTROLLER_VOTERS),
                )
                return parse_voters(resp.voters), resp.cluster_id
            except grpc.RpcError as exc:
                last = (
                    f"{exc.code().name}: {exc.details()}"
                    if isinstance(exc, aio.AioRpcError)
                    else str(exc)
                )
            except ValueError as exc:
                raise StartupError(
                    f"--join {address}: the node answered bad voters: {exc}"
                ) from None
            await asyncio.sleep(0.5)
    finally:
        await channel.close(None)
    raise StartupError(
        f"--join {address}: no answer with the controller voters within "
        f"{join_timeout_ms / 1000:.0f} s ({last}); give a running node's internal address "
        "(its --internal-listen) and the cluster's credentials"
    )


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


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def derived_cluster_id(voters: Iterable[int]) -> str:
    """The cluster id every node derives alike from the controller voters' ids, when none
    is stored or given: nodes started with the same ``--controller-voters`` agree on it."""
    ids = ",".join(str(i) for i in sorted(voters))
    return uuid.uuid5(_CLUSTER_ID_NAMESPACE, f"tidelog-voters:{ids}").hex


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
        controller_voters: str | None = None,
        timing: RaftTiming | None = None,
        node_dead_ms: int = node_dead_ms_default,
        cluster_id: str | None = None,
        rack: str | None = None,
        internal_listen: str | None = None,
        internal_advertised: str | None = None,
        internal_ca: Path | None = None,
        internal_cert: Path | None = None,
        internal_key: Path | None = None,
        cluster_secret_file: Path | None = None,
        client_security: ClientSecurity | None = None,
        trace_sample: int = 0,
        trace_log: bool = False,
        raft_port: int | None = 0,
        cleaner: CleanerSettings | None = None,
        recovery_bytes_per_second: int = RECOVERY_BYTES_PER_SECOND_DEFAULT,
        controller_snapshot_entries: int = CONTROLLER_SNAPSHOT_ENTRIES_DEFAULT,
        join: str | None = None,
    ) -> None:
        self.node_id = node_id
        #: A node's internal address to ask for the controller voters (``--join``).
        self.join = join
        #: The log cleaner of compacted partitions (started with the node).
        self.cleaner = LogCleaner(cleaner or CleanerSettings(), self._cleanable_logs)
        self._cleaner_task: asyncio.Task[None] | None = None
        #: Snapshot the controller state every this many entries (node/controller_snapshots).
        self.controller_snapshot_entries = controller_snapshot_entries
        #: ``replica.recovery.bytes.per.second`` (0: unlimited); read by recovery_rate.
        self.recovery_bytes_per_second = recovery_bytes_per_second
        self._catchup: CatchupManager | None = None
        self._parsed_settings: dict[str, tuple[str, int]] = {}
        #: TLS and authentication of the client listener (node/auth.py); None: neither.
        self.client_security = client_security or ClientSecurity()
        self.internal_listen = internal_listen
        self.internal_advertised = internal_advertised
        self._auth_files = (internal_ca, internal_cert, internal_key, cluster_secret_file)
        self.internal_port = 0
        self.internal_address = ""
        self.auth: InternalAuth | None = None
        self._internal_server: aio.Server | None = None
        self.rack = rack or None
        self._open_log = open_log
        self.listen = listen
        self.data_dir = data_dir
        self.metrics_port = metrics_port
        self.advertised = advertised
        self.controller_voters = controller_voters
        self.node_dead_ms = node_dead_ms
        self.cluster_id_flag = cluster_id
        self._joined_cluster_id = ""
        self.metrics = NodeMetrics()
        self.metrics.watch_disk(data_dir)
        #: Sampled spans of produce requests and follower appends (node/trace.py).
        self.tracer = Tracer(self.metrics.registry, trace_sample, trace_log)
        #: The Raft TCP listener's port (0: any free); None: none, peers use the gRPC stream.
        self.raft_port = raft_port
        self.timing = timing or RaftTiming()
        self.port = 0
        self.identity: NodeIdentity | None = None
        self._store: MetaStore | None = None
        self._raft: MultiRaft | None = None
        self._transport: RaftTransport | None = None
        self._controller: Controller | None = None
        self._controller_log: PartitionLog | None = None
        self._registry: TopicRegistry | None = None
        self._server: aio.Server | None = None
        self._health: Any = None
        self._table_service: TableService | None = None
        self._metrics_server: MetricsServer | None = None
        self._retention_task: asyncio.Task[None] | None = None
        self.retention_interval_s = limits.retention_interval_ms / 1000
        self._idem_snapshots: IdempotenceSnapshots | None = None
        self._idem_task: asyncio.Task[None] | None = None
        self._groups: GroupRuntime | None = None
        #: How often idle producers expire and idempotence snapshots are written.
        self.idempotence_interval_s = SNAPSHOT_INTERVAL_S

    @property
    def registry(self) -> TopicRegistry:
        assert self._registry is not None, "node not started"
        return self._registry

    @property
    def controller(self) -> Controller:
        assert self._controller is not None, "node not started"
        return self._controller

    def recovery_rate(self) -> int:
        """The current ``replica.recovery.bytes.per.second``, the one place catch-up (streamed
        copies and APPENDs to followers far behind) reads its rate from, at every chunk and
        message: the cluster setting when it is set (``cluster config set`` changes copies in
        progress), else this node's ``--replica-recovery-bytes-per-second``."""
        raw = self._setting(RECOVERY_BYTES_PER_SECOND)
        if raw is None:
            return self.recovery_bytes_per_second
        return self._parsed(RECOVERY_BYTES_PER_SECOND, raw)

    def recovery_lag_bytes(self) -> int:
        """``replica.recovery.lag.bytes``: how far behind a follower's catch-up is limited."""
        raw = self._setting(RECOVERY_LAG_BYTES)
        if raw is None:
            return RECOVERY_LAG_BYTES_DEFAULT
        return self._parsed(RECOVERY_LAG_BYTES, raw)

    def _setting(self, key: str) -> str | None:
        controller = self._controller
        return None if controller is None else controller.state.settings.get(key)

    def _parsed(self, key: str, raw: str) -> int:
        """``int_setting`` of a value read at every Raft message: parsed once per value."""
        cached = self._parsed_settings.get(key)
        if cached is not None and cached[0] == raw:
            return cached[1]
        value = int_setting({key: raw}, key)
        self._parsed_settings[key] = (raw, value)
        return value

    def _load_identity(
        self, store: MetaStore, voters: Iterable[int]
    ) -> tuple[str, str, bool, frozenset[int]]:
        """Check the data directory belongs to this node id; return the cluster id, the
        directory id, whether the directory is new (its id made now) and the controller
        voters it was first started with (its bootstrap configuration: the committed one
        until the controller group changes its voters through its log)."""
        cluster_id = self._load_cluster_id(store, voters)
        voter_ids = ",".join(str(i) for i in sorted(voters))
        stored_voters = store.get(NODE_COLUMN, _VOTERS_KEY)
        directory_id = store.get(NODE_COLUMN, DIRECTORY_ID_KEY)
        new = directory_id is None
        if directory_id is None:
            directory_id = uuid.uuid4().hex.encode()
            store.put(NODE_COLUMN, DIRECTORY_ID_KEY, directory_id)
            log.info("data directory %s: new directory id %s", self.data_dir, directory_id.decode())
        if stored_voters is None:
            store.put(NODE_COLUMN, _VOTERS_KEY, voter_ids.encode())
            bootstrap = frozenset(voters)
        else:
            bootstrap = frozenset(int(i) for i in stored_voters.decode().split(",") if i)
        return cluster_id, directory_id.decode(), new, bootstrap

    def _load_cluster_id(self, store: MetaStore, voters: Iterable[int]) -> str:
        raw = store.get(NODE_COLUMN, _NODE_ID_KEY)
        if raw is None:
            store.put(NODE_COLUMN, _NODE_ID_KEY, str(self.node_id).encode())
        elif int(raw) != self.node_id:
            raise StartupError(
                f"data directory {self.data_dir} belongs to node {int(raw)}, not node "
                f"{self.node_id}: start with --id {int(raw)} or use another --data-dir"
            )
        stored = store.get(NODE_COLUMN, _CLUSTER_ID_KEY)
        if stored is not None:
            if self.cluster_id_flag and self.cluster_id_flag != stored.decode():
                raise StartupError(
                    f"data directory {self.data_dir} belongs to cluster {stored.decode()}, not "
                    f"{self.cluster_id_flag}: use another --data-dir or drop --cluster-id"
                )
            return stored.decode()
        # A joining node takes the cluster's id as its node answered it: derived from the
        # voters it has now, it would differ once the controller's voters changed.
        cluster_id = self.cluster_id_flag or self._joined_cluster_id or derived_cluster_id(voters)
        store.put(NODE_COLUMN, _CLUSTER_ID_KEY, cluster_id.encode())
        return cluster_id

    async def start(self) -> None:
        t0 = time.monotonic()
        if self.node_id < 1:
            raise StartupError(f"node id must be at least 1, got {self.node_id}")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        try:
            host, port = split_host_port(self.listen)
        except ValueError as exc:
            raise StartupError(str(exc)) from None
        voters: dict[int, str] | None = None
        if self.controller_voters:
            try:
                voters = parse_voters(self.controller_voters)
            except ValueError as exc:
                raise StartupError(f"--controller-voters: {exc}") from None
        try:
            self._store = store = MetaStore(self.data_dir / "meta")
        except Exception as exc:
            if "lock" in str(exc).lower():
                raise StartupError(
                    f"data directory {self.data_dir} is in use by another node process"
                ) from exc
            raise StartupError(f"cannot open the metadata store in {self.data_dir}: {exc}") from exc

        ihost, iport = host, 0
        if self.internal_listen:
            try:
                ihost, iport = split_host_port(self.internal_listen)
            except ValueError as exc:
                raise StartupError(f"--internal-listen: {exc}") from None
        ca, cert, key, secret_file = self._auth_files
        try:
            self.auth = auth = load_internal_auth(
                self.node_id, ca=ca, cert=cert, key=key, secret_file=secret_file
            )
        except AuthConfigError as exc:
            raise StartupError(str(exc)) from None
        if auth.mode is Mode.NONE and not is_loopback(ihost):
            raise StartupError(
                f"refusing to serve the internal Raft and Cluster services on {ihost!r} without "
                "authentication: give --internal-ca, --internal-cert and --internal-key "
                "(mutual TLS; `tidelog certs`), or --cluster-secret-file (or "
                "TIDELOG_CLUSTER_SECRET), or listen on a loopback --internal-listen"
            )

        try:
            client_listener = load_client_security(self.client_security)
        except ValueError as exc:
            raise StartupError(str(exc)) from None
        server = aio.server(options=GRPC_OPTIONS)
        self._server = server
        self.port = self._bind_client_port(server, host, port, client_listener)
        internal = aio.server(options=GRPC_OPTIONS)
        self._internal_server = internal
        self.internal_port = self._add_internal_port(internal, auth, ihost, iport)
        try:
            self._metrics_server = self.metrics.serve(host or "0.0.0.0", self.metrics_port)
        except OSError as exc:
            raise StartupError(
                f"cannot serve metrics on port {self.metrics_port}: {exc.strerror or exc}"
            ) from exc

        joining = voters is None and bool(self.join)
        if voters is None and self.join:
            voters, self._joined_cluster_id = await _voters_from(self.join, auth)
        advertised = self.advertised or join_host_port(_reachable_host(host), self.port)
        internal_advertised = self.internal_advertised or join_host_port(
            _reachable_host(ihost), self.internal_port
        )
        self.internal_address = internal_advertised
        metrics_address = join_host_port(_reachable_host(host), self._metrics_server.port)
        if voters is None:
            voters = {self.node_id: internal_advertised}
        elif voters.get(self.node_id) == advertised:
            raise StartupError(
                f"--controller-voters gives node {self.node_id} its client address {advertised}; "
                "the voters' Raft traffic goes to their internal listeners: name each voter's "
                f"--internal-listen address (this node's is {internal_advertised})"
            )
        elif self.node_id in voters and voters[self.node_id] != internal_advertised:
            log.warning(
                "--controller-voters gives node %d the address %s, but its internal listener "
                "advertises %s", self.node_id, voters[self.node_id], internal_advertised,
            )  # fmt: skip
        cluster_id, directory_id, new_directory, bootstrap = self._load_identity(store, voters)
        self.identity = NodeIdentity(
            self.node_id,
            advertised,
            metrics_address,
            cluster_id,
            rack=self.rack or "",
            directory_id=directory_id,
        )

        self._raft = raft = MultiRaft(
            self.node_id, HardStateStore(store), self.metrics, self.timing
        )
        if self.tracer.every:
            raft.tracer = self.tracer
        # flush=os groups may have lost acknowledged entries in a machine restart (not in a
        # process restart: the page cache kept them): they recover before voting again.
        raft.machine_restarted = machine_restarted(store, NODE_COLUMN, read_boot_id())
        if new_directory and set(voters) != {self.node_id}:
            # A new directory may be a wiped one of a node the cluster knew: it may have voted
            # in the current term and acknowledged entries it no longer holds. Every group it
            # starts empty in this run (the controller's, the partitions') joins as a new
            # replica: no vote for a candidate holding entries until it caught up with a
            # leader (a new cluster or topic still elects: every log is empty).
            raft.new_directory = True
        self._transport = transport = RaftTransport(
            self.node_id,
            cluster_id,
            deliver=raft.deliver,
            registry=self.metrics.registry,
            auth=auth,
        )
        raft.set_sender(transport)
        # Streamed snapshots: copies in checksummed chunks over the internal listener, at
        # the recovery rate (node/catchup.py).
        self._catchup = catchup = CatchupManager(
            self.node_id,
            raft,
            grpc_reader(
                lambda node: transport.peers().get(node),
                auth.channel,
                auth.call_metadata,
                CATCHUP_READ,
            ),
            self.recovery_rate,
            lag_bytes=self.recovery_lag_bytes,
            cluster_id=lambda: self.controller.cluster_id,
        )
        raft.snapshot_gate = catchup.gate
        self._controller = controller = Controller(
            self.node_id,
            voters,
            raft,
            cluster_id,
            bootstrap_voters=bootstrap,
            node_dead_ms=self.node_dead_ms,
            set_peer=transport.set_peer,
            leading=lambda: self.registry.leading(),
            directory_id=directory_id,
            auth=auth,
            snapshot_entries=self.controller_snapshot_entries,
            confs=lambda: self.registry.conf_reports(),
            transfer=lambda group, to: self.registry.transfer(group, to),
        )
        self._idem_snapshots = snapshots = IdempotenceSnapshots(store)
        self._registry = registry = TopicRegistry(
            self.node_id,
            self.data_dir,
            self.metrics,
            raft,
            controller,
            self._open_log,
            snapshots=snapshots,
            tables=store,
            catchup=catchup,
        )
        # Quiescence (node/multiraft.py): idle partitions stop heartbeating; a quiet group
        # whose leader's node dies wakes when the controller marks that node dead or, sooner,
        # when this node's stream to it breaks.
        raft.quiesce = True
        transport.on_peer_failed = raft.peer_gone
        self.metrics.groups_quiet.set_function(lambda: raft.quiet_groups)
        dead_seen: set[int] = set()

        def on_metadata_change() -> None:
            registry.schedule()
            dead = {n.node_id for n in controller.state.nodes.values() if not n.alive}
            for node_id in dead - dead_seen:
                woken = raft.peer_gone(node_id)
                if woken:
                    log.info("node %d is dead: %d quiet groups it led wake up", node_id, woken)
            dead_seen.clear()
            dead_seen.update(dead)

        controller.on_change = on_metadata_change
        self.metrics.watch_partitions(registry.partition_stats)
        self.metrics.watch_shape(
            lambda: shape_stats(controller.state, registry, int(time.time() * 1000), controller)
        )
        self.metrics.watch_controller(lambda: controller.leader_id or 0)
        self.metrics.watch_recovery(
            lambda: RecoveryStats(
                catchup.bytes_sent,
                catchup.bytes_appended,
                self.recovery_rate(),
            )
        )
        try:
            self._controller_log = await asyncio.to_thread(
                PartitionLog, self.data_dir / CONTROLLER_DIR, TopicConfig.from_overrides({})
            )
        except Exception as exc:
            raise StartupError(f"cannot open the controller log in {self.data_dir}: {exc}") from exc
        controller.open(self._controller_log, self.data_dir / SNAPSHOT_FILE, joining=joining)

        services = (
            BrokerService(
                registry,
                controller,
                self.identity,
                self.metrics,
                guard=client_listener.guard,
                tracer=self.tracer,
            ),
            AdminService(
                registry, controller, self.identity, self.metrics, guard=client_listener.guard
            ),
        )
        broker_pb2_grpc.add_BrokerServicer_to_server(services[0], server)
        admin_pb2_grpc.add_AdminServicer_to_server(services[1], server)
        broker_service, admin_service = services

        def adopt_cluster_id(new_id: str) -> None:
            # A voter on a new directory took a derived cluster id; a voter holding the
            # cluster's state answered another (node/controller_bootstrap.py): this node
            # joins that cluster, under its id.
            log.warning("node %d takes the cluster id %s of its voters", self.node_id, new_id)
            store.put(NODE_COLUMN, _CLUSTER_ID_KEY, new_id.encode())
            transport.cluster_id = new_id
            assert self.identity is not None
            self.identity = replace(self.identity, cluster_id=new_id)
            broker_service.identity = admin_service.identity = self.identity

        controller.on_cluster_id = adopt_cluster_id
        self._table_service = TableService(registry, self.metrics, guard=client_listener.guard)
        table_pb2_grpc.add_TableServicer_to_server(self._table_service, server)
        self._groups = groups = GroupRuntime(registry, controller)
        self.metrics.watch_groups(lambda: groups.stats, lambda: groups.rebalances)
        group_pb2_grpc.add_GroupServicer_to_server(
            GroupService(groups, registry, self.metrics, self.node_id, guard=client_listener.guard),
            server,
        )
        # The internal services on the internal listener only: a caller of the client port
        # that names them gets UNIMPLEMENTED.
        cluster_pb2_grpc.add_ClusterServicer_to_server(
            ClusterService(
                controller,
                registry.digest,
                self.metrics,
                auth,
                lambda request: catchup.serve(request, registry.log_of_group(request.group)),
                recover=lambda req: serve_recover_replica(registry, controller.node_id, req),
            ),
            internal,
        )
        transport.add_servicer(internal)
        if self.raft_port is not None:
            try:
                await transport.listen(ihost, self.raft_port)
            except OSError as exc:
                raise StartupError(
                    f"cannot listen for Raft messages on {ihost or '*'}:{self.raft_port}: "
                    f"{exc.strerror or exc}"
                ) from exc
        self._health = _AioHealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            [
                BROKER_SERVICE,
                ADMIN_SERVICE,
                TABLE_SERVICE,
                GROUP_SERVICE,
                health.SERVICE_NAME,
                reflection.SERVICE_NAME,
            ],
            server,
        )
        raft.start()
        registry.start()
        await internal.start()
        await server.start()
        controller.start(
            RegisterNode(
                self.node_id, advertised, metrics_address, rack=self.rack,
                directory_id=directory_id,
                internal_address=internal_advertised,
            )
        )  # fmt: skip
        await self._until_ready()
        groups.start()
        for service in ("", BROKER_SERVICE, ADMIN_SERVICE, TABLE_SERVICE, GROUP_SERVICE):
            await self._health.set(service, health_pb2.HealthCheckResponse.SERVING)
        self._retention_task = asyncio.create_task(self._retention_loop(), name="retention")
        self._cleaner_task = asyncio.create_task(self.cleaner.run(), name="log-cleaner")
        self._idem_task = asyncio.create_task(
            snapshots.run(registry.partitions, self.idempotence_interval_s), name="idempotence"
        )
        log.info(
            "node %d serving clients on %s (%s, advertised %s), internal on %s (advertised %s, "
            "authentication: %s), metrics on http://%s/metrics, cluster %s, "
            "controller voters %s, %d topics, started in %.2fs",
            self.node_id, join_host_port(host, self.port), client_listener.description,
            advertised, join_host_port(ihost, self.internal_port), internal_advertised,
            auth.mode.value, metrics_address,
            cluster_id, ",".join(f"{i}@{a}" for i, a in sorted(voters.items())),
            len(registry.topics()), time.monotonic() - t0,
        )  # fmt: skip

    def _bind_client_port(
        self, server: aio.Server, host: str, port: int, listener: ClientListener
    ) -> int:
        """Bind the client listener (Broker, Admin, health, reflection): TLS when the node
        has ``--tls-cert``, else plaintext. Returns the port bound."""
        address = join_host_port(host, port)
        if listener.credentials is None and listener.guard.tokens and not _loopback(host):
            log.warning(
                "bearer tokens (--auth-tokens-file) on the plaintext listener %s travel in "
                "clear: add --tls-cert and --tls-key", address,
            )  # fmt: skip
        try:
            if listener.credentials is None:
                bound = server.add_insecure_port(address)
            else:
                bound = server.add_secure_port(address, listener.credentials)
        except RuntimeError:
            bound = 0
        if bound == 0:
            raise StartupError(f"cannot listen on {self.listen}: the address is in use or invalid")
        return bound

    def _add_internal_port(
        self, server: aio.Server, auth: InternalAuth, host: str, port: int
    ) -> int:
        """Bind the internal listener: mutual TLS when the node has certificates."""
        address = join_host_port(host, port)
        creds = auth.server_credentials()
        try:
            if creds is not None:
                bound = server.add_secure_port(address, creds)
            else:
                bound = server.add_insecure_port(address)
        except RuntimeError:
            bound = 0
        if bound == 0:
            raise StartupError(
                f"cannot listen on --internal-listen {address}: the address is in use or invalid"
            )
        return bound

    async def _until_ready(self) -> None:
        """Wait for what this node can finish alone: the replayed metadata applied, its
        replicas open, and (when it is the whole controller quorum) its registration."""
        controller = self.controller
        stopped = asyncio.ensure_future(controller.stopped.wait())
        replayed = asyncio.ensure_future(controller.replayed.wait())
        await asyncio.wait(
            (stopped, replayed),
            timeout=startup_ready_timeout_ms / 1000,
            return_when=asyncio.FIRST_COMPLETED,
        )
        stopped.cancel()
        replayed.cancel()
        if controller.halted is not None:
            raise StartupError(
                f"node {self.node_id} cannot follow the cluster's metadata: "
                f"{controller.halted}; upgrade this node to the cluster's version"
            )
        try:
            async with asyncio.timeout(startup_ready_timeout_ms / 1000):
                await controller.replayed.wait()
                await self.registry.wait_reconciled(controller.applied_index, 1e9)
                if controller.lone_voter:
                    await controller.registered.wait()
                    await self.registry.wait_reconciled(controller.applied_index, 1e9)
        except TimeoutError:
            log.warning(
                "node %d: metadata not ready after %d ms; serving anyway",
                self.node_id, startup_ready_timeout_ms,
            )  # fmt: skip

    async def _retention_loop(self) -> None:
        """Roll segments by age (every replica, its own segments); on the partitions this
        node leads, propose the log start retention.ms / retention.bytes allow, never above
        the high watermark (``Partition.enforce_retention``). Every replica deletes when it
        applies that start; a follower never deletes on its own clock."""
        while True:
            await asyncio.sleep(self.retention_interval_s)
            now_ms = time.time_ns() // 1_000_000
            for p in self.registry.partitions():
                if p.closed:
                    continue
                try:
                    p.log.maybe_roll(now_ms)
                    p.enforce_retention(now_ms)
                except Exception as exc:
                    p.fail_storage(exc)

    def _cleanable_logs(self) -> Iterator[tuple[PartitionLog, int]]:
        """Each open partition log of this node with its high watermark (every replica
        cleans its own copy, below what Raft has committed)."""
        if self._registry is None:
            return
        for p in self._registry.partitions():
            if not p.closed and isinstance(p.log, PartitionLog):
                yield p.log, p.high_watermark

    async def wait_closed(self) -> None:
        assert self._server is not None
        await self._server.wait_for_termination()

    async def stop(self, grace_s: float = limits.drain_timeout_ms / 1000) -> None:
        log.info("node %d stopping (drain deadline %.1fs)", self.node_id, grace_s)
        if self._health is not None:
            await self._health.enter_graceful_shutdown()
        for task in (self._retention_task, self._cleaner_task, self._idem_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._groups is not None:
            await self._groups.close()
        if self._registry is not None:
            stopping = NodeUnavailable("the node is shutting down: reconnect to another node")
            for p in self._registry.partitions():
                p.end_streams(stopping)
        if self._server is not None:
            # New calls are refused at once; client requests get until the deadline while
            # Raft keeps running (an acks=all produce needs its commit). The peers' Raft
            # streams never end by themselves: close them once the client requests are done.
            server_stop = asyncio.ensure_future(self._server.stop(grace_s))
            internal_stop = (
                asyncio.ensure_future(self._internal_server.stop(grace_s))
                if self._internal_server is not None
                else None
            )
            deadline = time.monotonic() + grace_s
            while self.metrics.in_flight and time.monotonic() < deadline and not server_stop.done():
                await asyncio.sleep(drain_poll_ms / 1000)
            if self._transport is not None:
                self._transport.close_inbound()
            if self._controller is not None:
                await self._controller.stop()
            await server_stop
            if internal_stop is not None:
                await internal_stop
        if self._controller is not None:
            await self._controller.stop()
        if self._transport is not None:
            await self._transport.close()
        if self._catchup is not None:
            await self._catchup.close()
        if self._raft is not None:
            await self._raft.stop()
        if self._registry is not None and self._idem_snapshots is not None:
            # Raft has stopped: the states are final; the next start replays nothing.
            try:
                self._idem_snapshots.write(
                    self._idem_snapshots.collect(self._registry.partitions(), force=True)
                )
            except Exception as exc:
                log.warning("cannot write idempotence snapshots at shutdown: %s", exc)
        if self._table_service is not None:
            self._table_service.scans.close()  # their RocksDB snapshots, before the store
        if self._registry is not None:
            await self._registry.close()
        if self._controller_log is not None:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self._controller_log.close)
        if self._store is not None:
            self._store.close()
        if self._metrics_server is not None:
            await asyncio.to_thread(self._metrics_server.close)
        log.info("node %d stopped", self.node_id)
