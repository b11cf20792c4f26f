"""The controller on a node: Raft group 0, the cluster metadata it replicates, and the work
of the active controller (its leader).

Every node runs group 0: the configured voters (``--controller-voters``, the same on every
node; by default the node alone) elect the active controller, every other node follows the
log as a learner. The log is a PartitionLog under ``<data-dir>/controller`` whose entries are
control batches carrying one encoded command each (``controller/commands.py``). Every node
applies the committed commands to its own ``ClusterState`` in log order, so every node
answers Metadata from the same state, and the topic registry (``node/topics.py``) starts and
stops local partition replicas from it.

Changing metadata (creating, deleting, altering topics; registering a node) always goes
through the active controller: a node that is not it forwards the request (``Cluster.Forward``,
retried toward the new leader on NOT_LEADER), the controller validates it against its state,
computes the placement, proposes the command, and answers once the command is applied with
its index; the forwarding node then waits until it applied that index too, so the Metadata it
answers next already shows the change.

The active controller also tracks liveness: every node heartbeats it every
``heartbeat_interval_ms``, reporting the partitions it leads. A node silent for
``node_dead_ms`` is marked dead (MarkNodeDead; Raft itself has long moved its partitions'
leadership), and alive again when it reports back. Leadership reports that differ from the
recorded hints become one UpdatePartitionLeaders per interval, so nodes without a replica of
a partition still point clients at its leader.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

import grpc
from grpc import aio

from tidelog.config import validate_partitions, validate_topic_configs, validate_topic_name
from tidelog.controller.commands import (
    AllocateProducerIds,
    AlterTopicConfig,
    Command,
    CommandDecodeError,
    DeleteTopic,
    LeaderHint,
    MarkNodeAlive,
    MarkNodeDead,
    RegisterNode,
    UpdatePartitionLeaders,
    decode_command,
    encode_command,
)
from tidelog.controller.state import (
    CONTROLLER_GROUP_ID,
    ApplyResult,
    ClusterState,
    TopicRecord,
)
from tidelog.errors import (
    InvalidPartitions,
    InvalidReplicationFactor,
    InvalidRequest,
    LeaderNotAvailable,
    NodeIdentityConflict,
    NodeUnavailable,
    NotLeader,
    RequestTimedOut,
    TidelogError,
    TopicExists,
    UnknownTopic,
    excerpt,
    from_rpc_error,
)
from tidelog.node import limits
from tidelog.node.internal_auth import InternalAuth
from tidelog.node.multiraft import MultiRaft, RaftGroup
from tidelog.node.raft.errors import ProposalDropped
from tidelog.node.raft.guard import MAX_TERM_GAP
from tidelog.node.raft.types import NONE, ConfState, Entry, EntryKind, Role, Snapshot, SoftState
from tidelog.node.replica_storage import RaftLogFile
from tidelog.node.stm import BatchSpan, LostHow, StateMachine, UnappliableEntry
from tidelog.records import decode_values, encode_batch
from tidelog.v1 import admin_pb2, cluster_pb2, cluster_pb2_grpc

log = logging.getLogger(__name__)

#: Commands a node may forward as encoded bytes (``ForwardRequest.command``). Topic changes
#: come through their own request bodies (validated and placed here); liveness and leader
#: hints are proposed by the active controller alone, never on a caller's word. A node takes
#: a block of producer ids for the InitProducerId requests it serves (node/producer_ids.py).
FORWARDABLE_COMMANDS: Final = (RegisterNode, AllocateProducerIds)

_CLUSTER_SERVICE: Final = cluster_pb2.DESCRIPTOR.services_by_name["Cluster"].full_name
FORWARD: Final = f"/{_CLUSTER_SERVICE}/Forward"
HEARTBEAT: Final = f"/{_CLUSTER_SERVICE}/Heartbeat"
LOG_DIGEST: Final = f"/{_CLUSTER_SERVICE}/LogDigest"

CONTROLLER_DIR: Final = "controller"
#: How often nodes heartbeat the active controller (and it checks liveness and hints).
heartbeat_interval_ms: Final = 250
heartbeat_timeout_ms: Final = 1_000
#: A node silent this long is marked dead (``--node-dead-ms``).
node_dead_ms_default: Final = 3_000
#: How long a metadata change may take end to end (forwarding, commit, apply).
admin_timeout_ms: Final = 30_000
#: Pause between attempts while the controller is unknown or moving.
retry_backoff_ms: Final = 50
#: Replication factor of a CreateTopics request that leaves it at 0.
DEFAULT_REPLICATION_FACTOR: Final = 1

assert heartbeat_interval_ms < node_dead_ms_default
assert heartbeat_timeout_ms <= node_dead_ms_default

_CHANNEL_OPTIONS: Final = (
    ("grpc.max_send_message_length", limits.grpc_message_bytes_max),
    ("grpc.max_receive_message_length", limits.grpc_message_bytes_max),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1_000),
    ("grpc.enable_retries", 0),
)


def parse_voters(spec: str) -> dict[int, str]:
    """``"1@host:port,2@host:port"`` -> {1: "host:port", 2: "host:port"}; ValueError with a
    readable message otherwise."""
    voters: dict[int, str] = {}
    for raw in spec.split(","):
        item = raw.strip()
        if not item:
            continue
        node, sep, address = item.partition("@")
        if not sep or not node.strip().isdigit() or ":" not in address:
            raise ValueError(
                f"controller voter {item!r} is not ID@HOST:PORT (for example 1@127.0.0.1:9092)"
            )
        node_id = int(node)
        if node_id < 1:
            raise ValueError(f"controller voter {item!r}: node ids start at 1")
        if node_id in voters:
            raise ValueError(f"controller voter {node_id} appears twice in {spec!r}")
        voters[node_id] = address.strip()
    if not voters:
        raise ValueError("the controller voter list is empty")
    return voters


def command_batch(command: Command) -> bytes:
    """The stored form of a command: a one-record control batch (invisible to consumers),
    deterministic so that every replica stores the same bytes."""
    return encode_batch([encode_command(command)], timestamps_ms=0, control=True)


@dataclass(frozen=True, slots=True)
class TopicSpec:
    """One topic of a CreateTopics request, independent of protobuf."""

    name: str
    partitions: int
    replication_factor: int = 0
    configs: Mapping[str, str] | None = None


class Controller(StateMachine[ApplyResult]):
    """Group 0 on this node and the active controller's duties. A user of the
    replicated-state-machine seam (``node/stm.py``): its :meth:`apply` hook applies commands
    to ``ClusterState``, and a new active controller answers changes only once synced
    (``StateMachine.sync``), so it validates them against the state the old one left."""

    def __init__(
        self,
        node_id: int,
        voters: Mapping[int, str],
        raft: MultiRaft,
        cluster_id: str,
        *,
        node_dead_ms: int = node_dead_ms_default,
        heartbeat_ms: int = heartbeat_interval_ms,
        set_peer: Callable[[int, str], None] = lambda _node, _address: None,
        leading: Callable[[], Iterable[tuple[int, int]]] = lambda: (),
        directory_id: str = "",
        auth: InternalAuth | None = None,
    ) -> None:
        if node_dead_ms < 2 * heartbeat_ms:
            raise ValueError(
                f"node_dead_ms {node_dead_ms} must be at least twice the heartbeat interval "
                f"({heartbeat_ms} ms)"
            )
        super().__init__()
        self.node_id = node_id
        self.voters = dict(voters)
        self.cluster_id = cluster_id
        #: This node's data directory id (node/identity.py), which it registers with.
        self.directory_id = directory_id
        self.state = ClusterState()
        self.node_dead_ms = node_dead_ms
        self.heartbeat_ms = heartbeat_ms
        self._driver = raft
        #: Credentials of the channels to other nodes' internal listeners.
        self.auth = auth if auth is not None else InternalAuth(node_id)
        self._set_peer = set_peer
        self._leading = leading
        #: Called (on the loop) after committed commands changed the state.
        self.on_change: Callable[[], None] = lambda: None
        self._state_changed = False
        #: Set once the commands committed before this start are applied again.
        self.replayed = asyncio.Event()
        self._replay_target = 0
        self.registered = asyncio.Event()
        #: Set when group 0 stopped (a storage failure, or a committed command this node
        #: cannot apply); ``halted`` then holds why. The node no longer follows metadata.
        self.stopped = asyncio.Event()
        self.halted: BaseException | None = None
        self._admin_lock = asyncio.Lock()
        self._channels: dict[str, aio.Channel] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._heartbeat_now = asyncio.Event()
        # Active controller only: when it took over, when each node was last heard of,
        # what each node reports it leads, and which liveness changes are in flight.
        self._leader_since = 0.0
        self._last_seen: dict[int, float] = {}
        self._reported: dict[int, tuple[int, int]] = {}
        self._liveness_inflight: set[int] = set()
        self._hints_inflight = False

    # ---- lifecycle -----------------------------------------------------------------------

    @property
    def lone_voter(self) -> bool:
        """This node alone forms the controller quorum (a single-node cluster)."""
        return set(self.voters) == {self.node_id}

    def open(self, controller_log: RaftLogFile) -> RaftGroup:
        """Start group 0 over its log; the committed commands are applied again from the
        start (the state is rebuilt from the log at every start)."""
        voters = frozenset(self.voters)
        learners = frozenset({self.node_id}) - voters
        group = self._driver.add_group(
            CONTROLLER_GROUP_ID,
            controller_log,
            ConfState(voters=voters, learners=learners),
            self,
            durable=True,
            config=self._driver.timing.config(),
            applied=0,
        )
        self.attach(group, self._driver)
        self._replay_target = group.raw.commit_index
        if self._replay_target == 0:
            self.replayed.set()
        for node_id, address in self.voters.items():
            if node_id != self.node_id:
                self._set_peer(node_id, address)
        if self.lone_voter:
            self._driver.campaign(group)  # nobody else can win; do not wait for a timeout
        return group

    def start(self, register: RegisterNode) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._register(register), name="controller-register"),
            loop.create_task(self._heartbeat_loop(), name="controller-heartbeat"),
            loop.create_task(self._monitor_loop(), name="controller-monitor"),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            try:
                await task
            except asyncio.CancelledError:
                pass
        self._tasks = []
        channels, self._channels = list(self._channels.values()), {}
        await asyncio.gather(*(ch.close(None) for ch in channels), return_exceptions=True)
        self.fail_waiters(NodeUnavailable("the node is shutting down"))

    # ---- who leads -------------------------------------------------------------------------

    @property
    def leader_id(self) -> int:
        """The active controller this node knows of (``NONE`` if none)."""
        return self.group.raw.leader_id if self.group is not None else NONE

    def address_of(self, node_id: int) -> str | None:
        """The client address of a node (what Metadata hands to clients)."""
        node = self.state.nodes.get(node_id)
        if node is not None:
            return node.address
        return None

    def internal_address_of(self, node_id: int) -> str | None:
        """The address of a node's internal listener, which node-to-node calls dial: as
        registered, else as ``--controller-voters`` gives it."""
        node = self.state.nodes.get(node_id)
        if node is not None and node.internal_address:
            return node.internal_address
        return self.voters.get(node_id)

    def _not_controller(self, internal: bool = True) -> TidelogError:
        leader = self.leader_id
        if leader not in (NONE, self.node_id):
            where = self.internal_address_of if internal else self.address_of
            address = where(leader) or ""
            return NotLeader(
                f"node {self.node_id} is not the active controller; node {leader} is",
                leader_id=str(leader),
                leader_address=address,
            )
        return LeaderNotAvailable("the controller has no leader right now (an election runs)")

    # ---- the seam's hooks (node/stm.py) ------------------------------------------------------

    def not_leader_error(self) -> TidelogError:
        return self._not_controller()

    def dropped_error(self, exc: ProposalDropped) -> TidelogError:
        return LeaderNotAvailable(f"the controller cannot take changes now: {exc.reason}")

    def entry_lost_error(self, how: LostHow) -> TidelogError:
        return self._not_controller()

    def on_role_change(self, soft: SoftState, was_leader: bool) -> None:
        if soft.role == Role.LEADER and self._leader_since == 0.0:
            now = time.monotonic()
            self._leader_since = now
            # Nobody was watched before: everyone gets a full node_dead_ms from now.
            self._last_seen = {}
            self._reported = {}
            log.info("node %d is the active controller (term %d)", self.node_id, self.term)
        elif soft.role != Role.LEADER:
            if self._leader_since:
                log.info("node %d is no longer the active controller", self.node_id)
            self._leader_since = 0.0
        self._heartbeat_now.set()

    def restore_snapshot(self, snapshot: Snapshot) -> None:
        # The controller log is never compacted, so no leader ever sends one.
        log.error("controller log replaced by a snapshot at index %d", snapshot.meta.index)

    def apply(self, entries: tuple[Entry, ...]) -> list[ApplyResult | None]:
        results = [self._apply(e) for e in entries]
        if any(r is not None and r.changed for r in results):
            self._state_changed = True
        return results

    def on_applied(self, last_index: int) -> None:
        if not self.replayed.is_set() and last_index >= self._replay_target:
            self.replayed.set()
        if self._state_changed:
            self._state_changed = False
            self.on_change()

    def on_storage_failure(self, group: RaftGroup, exc: BaseException) -> None:
        log.critical("the controller group stopped: %s; this node stops following metadata", exc)
        self.halted = exc
        self.stopped.set()

    @property
    def term(self) -> int:
        return self.group.raw.term if self.group is not None else 0

    def _apply(self, e: Entry) -> ApplyResult | None:
        if e.kind == EntryKind.EMPTY or not e.data:
            return None
        # Never skip: a command this node cannot read (corrupt, or written by a newer
        # version in a rolling upgrade) stops group 0 here, loudly, instead of leaving this
        # node's state different from every other node's.
        try:
            [value] = decode_values(e.data)
        except (TidelogError, ValueError) as exc:
            raise UnappliableEntry(
                f"controller entry {e.index} (term {e.term}) is not a command batch: {exc}"
            ) from exc
        if value is None:
            return None
        try:
            command = decode_command(value)
        except CommandDecodeError as exc:
            raise UnappliableEntry(
                f"controller entry {e.index} (term {e.term}) cannot be read by this node: {exc}"
            ) from exc
        if e.index <= self.state.applied_index:
            return None
        result = self.state.apply(e.index, command)
        if result.ok and isinstance(command, RegisterNode):
            self._on_registered(command)
        return result

    def _on_registered(self, c: RegisterNode) -> None:
        if c.node_id == self.node_id:
            # Only a registration of this data directory: a wiped node that replays the
            # registration of the directory it replaced is not registered by it.
            if c.directory_id == self.directory_id:
                self.registered.set()
            return
        self._set_peer(c.node_id, c.internal_address or c.address)
        if c.node_id not in self.voters and self.group is not None:
            # Learners need no consensus (they never vote): every member adds it at the same
            # log position, so whoever leads replicates the metadata log to it.
            self.group.raw.add_learner(c.node_id)
            self._driver.touch(self.group)

    async def wait_applied(self, index: int, timeout_s: float) -> None:
        """Return once this node applied the controller log up to ``index``."""
        try:
            async with asyncio.timeout(timeout_s):
                while self.applied_index < index:
                    await self.changed().wait()
        except TimeoutError:
            raise RequestTimedOut(
                f"node {self.node_id} did not apply the controller log up to {index} within "
                f"{timeout_s * 1000:.0f} ms (applied {self.applied_index}); the change is committed "
                "and will show up"
            ) from None

    # ---- proposing (active controller) ----------------------------------------------------

    def _propose(self, command: Command) -> asyncio.Future[ApplyResult]:
        """Propose ``command`` as one stamped entry; the future is its apply result here."""
        batch = command_batch(command)
        p = self.propose_batches([BatchSpan(batch, 0, len(batch), 1)])
        return asyncio.ensure_future(self._result_of(self.commit_future(p.last_index, p.term)))

    async def _result_of(self, applied: asyncio.Future[ApplyResult | None]) -> ApplyResult:
        result = await applied
        if result is None:  # committed but not a command this node applied
            raise self._not_controller()
        return result

    async def propose(
        self, command: Command, timeout_s: float = admin_timeout_ms / 1000
    ) -> ApplyResult:
        """Propose on this node (the active controller) and wait until it is applied here."""
        fut = self._propose(command)
        try:
            async with asyncio.timeout(timeout_s):
                return await fut
        except TimeoutError:
            raise RequestTimedOut(
                f"the controller did not commit {type(command).__name__} within "
                f"{timeout_s * 1000:.0f} ms: too few controller voters are reachable"
            ) from None

    # ---- requests from any node ------------------------------------------------------------

    async def submit(self, command: Command, timeout_s: float = admin_timeout_ms / 1000) -> int:
        """Have the active controller apply ``command`` (here or forwarded); returns its index."""
        resp = await self.forward(
            cluster_pb2.ForwardRequest(command=encode_command(command)), timeout_s
        )
        return resp.applied_index

    async def create_topics(
        self, specs: Sequence[TopicSpec], *, validate_only: bool
    ) -> tuple[list[str], int]:
        req = cluster_pb2.ForwardRequest(
            create_topics=admin_pb2.CreateTopicsRequest(
                topics=[
                    admin_pb2.TopicSpec(
                        name=s.name,
                        partitions=s.partitions,
                        replication_factor=s.replication_factor,
                        configs=dict(s.configs or {}),
                    )
                    for s in specs
                ],
                validate_only=validate_only,
            )
        )
        resp = await self.forward(req)
        return list(resp.names), resp.applied_index

    async def delete_topics(self, names: Sequence[str]) -> tuple[list[str], int]:
        req = cluster_pb2.ForwardRequest(delete_topics=admin_pb2.DeleteTopicsRequest(names=names))
        resp = await self.forward(req)
        return list(resp.names), resp.applied_index

    async def alter_topic_config(
        self, name: str, set_: Mapping[str, str], delete: Sequence[str]
    ) -> int:
        req = cluster_pb2.ForwardRequest(
            alter_topic_config=admin_pb2.AlterTopicConfigRequest(
                topic=name, set=dict(set_), delete=list(delete)
            )
        )
        return (await self.forward(req)).applied_index

    async def forward(
        self, request: cluster_pb2.ForwardRequest, timeout_s: float = admin_timeout_ms / 1000
    ) -> cluster_pb2.ForwardResponse:
        """Run ``request`` on the active controller, wherever it is, retrying while it is
        unknown or moving. Errors of the request itself (a topic exists) are raised as is."""
        request.from_node = self.node_id
        request.cluster_id = self.cluster_id
        deadline = time.monotonic() + timeout_s
        last: TidelogError = self._not_controller()
        hint: str | None = None
        others = [a for n, a in sorted(self.voters.items()) if n != self.node_id]
        attempt = 0
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RequestTimedOut(
                    f"no controller took the request within {timeout_s * 1000:.0f} ms: {last}"
                )
            leader = self.leader_id
            address: str | None = None
            if leader == self.node_id and self.is_leader:
                return await self.handle_forward(request, remaining)
            if leader not in (NONE, self.node_id):
                address = self.internal_address_of(leader)
            elif hint is not None:
                address, hint = hint, None
            elif others:
                # Nobody known (a new node that is not a learner yet): ask the voters, which
                # answer with the controller's address.
                address = others[attempt % len(others)]
            attempt += 1
            if address is not None:
                stub = cluster_pb2_grpc.ClusterStub(self._channel(address))  # type: ignore[no-untyped-call]
                try:
                    resp: cluster_pb2.ForwardResponse = await stub.Forward(
                        request, timeout=remaining, metadata=self.auth.call_metadata(FORWARD)
                    )
                    return resp
                except aio.AioRpcError as exc:
                    err = from_rpc_error(exc)
                    # UNKNOWN_TOPIC is retriable for clients (their metadata may lag), but
                    # here the active controller checked its own state: that is final.
                    if not err.retriable or isinstance(err, UnknownTopic):
                        raise err from None
                    if isinstance(err, NotLeader) and err.metadata.get("leader_address"):
                        hint = err.metadata["leader_address"]
                    last = err
            await asyncio.sleep(min(retry_backoff_ms / 1000, max(0.0, remaining)))

    def _channel(self, address: str) -> aio.Channel:
        ch = self._channels.get(address)
        if ch is None:
            ch = self._channels[address] = self.auth.channel(address, _CHANNEL_OPTIONS)
        return ch

    async def handle_forward(
        self, request: cluster_pb2.ForwardRequest, timeout_s: float = admin_timeout_ms / 1000
    ) -> cluster_pb2.ForwardResponse:
        """The active controller's side of ``forward``."""
        if request.cluster_id != self.cluster_id:
            raise InvalidRequest(
                f"request from node {request.from_node} of cluster {request.cluster_id!r} "
                f"reached node {self.node_id} of cluster {self.cluster_id!r}"
            )
        if not self.is_leader:
            raise self._not_controller()
        which = request.WhichOneof("body")
        async with asyncio.timeout(timeout_s):
            # The sync step: validate against the state the previous controller left.
            await self.sync(timeout_s)
            async with self._admin_lock:
                if which == "create_topics":
                    c = request.create_topics
                    specs = [
                        TopicSpec(t.name, t.partitions, t.replication_factor, dict(t.configs))
                        for t in c.topics
                    ]
                    names, index = await self._create_topics(specs, c.validate_only)
                    return cluster_pb2.ForwardResponse(applied_index=index, names=names)
                if which == "delete_topics":
                    names, index = await self._delete_topics(list(request.delete_topics.names))
                    return cluster_pb2.ForwardResponse(applied_index=index, names=names)
                if which == "alter_topic_config":
                    a = request.alter_topic_config
                    index = await self._alter(a.topic, dict(a.set), list(a.delete))
                    return cluster_pb2.ForwardResponse(applied_index=index)
                if which == "command":
                    command = decode_command(request.command)
                    if not isinstance(command, FORWARDABLE_COMMANDS):
                        raise InvalidRequest(
                            f"a {command.TYPE} command cannot be forwarded to the controller"
                        )
                    result = await self.propose(command)
                    result.raise_for_error()
                    return cluster_pb2.ForwardResponse(applied_index=result.index)
        raise InvalidRequest("a forwarded request carries no change")

    # ---- admin changes, on the active controller -------------------------------------------

    async def _create_topics(
        self, specs: Sequence[TopicSpec], validate_only: bool
    ) -> tuple[list[str], int]:
        if not specs:
            raise InvalidRequest("CreateTopics names no topic")
        if len(specs) > limits.topics_per_request_max:
            raise InvalidRequest(
                f"CreateTopics names {len(specs)} topics, at most "
                f"{limits.topics_per_request_max} per request"
            )
        state = self.state
        seen: set[str] = set()
        commands = []
        live = state.live_node_ids()
        load = state.replica_counts()
        for spec in specs:
            name = spec.name
            validate_topic_name(name)
            if name in seen:
                raise InvalidRequest(f"topic {name!r} appears twice in one CreateTopics request")
            seen.add(name)
            if name in state.topics:
                raise TopicExists(f"topic {name!r} already exists")
            rf = spec.replication_factor or DEFAULT_REPLICATION_FACTOR
            configs = dict(spec.configs or {})
            try:
                validate_partitions(spec.partitions)
                if rf < 1:
                    raise InvalidReplicationFactor(
                        f"replication factor must be at least 1, got {spec.replication_factor}"
                    )
                validate_topic_configs(configs)
            except TidelogError as err:
                raise type(err)(f"topic {name!r}: {err.message}", **err.metadata) from None
            if rf > len(live):
                n = len(live)
                raise InvalidReplicationFactor(
                    f"topic {name!r}: replication factor {rf} is larger than the cluster: only "
                    f"{n} node{'' if n == 1 else 's'} in the cluster "
                    f"{'is' if n == 1 else 'are'} alive ({', '.join(map(str, live)) or 'none'}); "
                    "lower it or start more nodes"
                )
            command = state.prepare_create_topic(name, spec.partitions, rf, configs)
            for replicas in command.assignments:
                for node in replicas:
                    load[node] = load.get(node, 0) + 1
            commands.append(command)
        crowded = {n: c for n, c in load.items() if c > limits.partitions_per_node_max}
        if crowded:
            node, count = max(crowded.items(), key=lambda kv: kv[1])
            raise InvalidPartitions(
                f"creating these topics would put {count} partition replicas on node {node}, "
                f"more than its limit of {limits.partitions_per_node_max}"
            )
        names = [c.name for c in commands]
        if validate_only:
            return names, self.applied_index
        results = await self._propose_all(commands)
        for r in results:
            r.raise_for_error()
        return names, max(r.index for r in results)

    async def _delete_topics(self, names: Sequence[str]) -> tuple[list[str], int]:
        if not names:
            raise InvalidRequest("DeleteTopics names no topic")
        unique = list(dict.fromkeys(names))
        for name in unique:
            self.state.topic(name)  # every name must exist before anything is deleted
        results = await self._propose_all([DeleteTopic(n) for n in unique])
        for r in results:
            r.raise_for_error()
        return unique, max(r.index for r in results)

    async def _alter(self, name: str, set_: Mapping[str, str], delete: Sequence[str]) -> int:
        command = AlterTopicConfig(name, set_, tuple(delete))
        self.state.check(command)
        [result] = await self._propose_all([command])
        result.raise_for_error()
        return result.index

    async def _propose_all(self, commands: Sequence[Command]) -> list[ApplyResult]:
        futures = [self._propose(c) for c in commands]
        timeout_s = admin_timeout_ms / 1000
        try:
            async with asyncio.timeout(timeout_s):
                return list(await asyncio.gather(*futures))
        except TimeoutError:
            raise RequestTimedOut(
                f"the controller did not commit the change within {timeout_s * 1000:.0f} ms: "
                "too few controller voters are reachable; it may still be applied"
            ) from None

    def topic_record(self, name: str) -> TopicRecord:
        record = self.state.topics.get(name)
        if record is None:
            raise UnknownTopic(
                f"unknown topic {excerpt(name)}: create it first (tidelog topic create)"
            )
        return record

    # ---- registration, heartbeats, liveness -------------------------------------------------

    async def _register(self, command: RegisterNode) -> None:
        """Register (or re-register after a restart) through the active controller, retrying
        until it is applied: a node that never registers gets no replicas."""
        delay_s = retry_backoff_ms / 1000
        refused = ""
        while True:
            try:
                await self.submit(command, timeout_s=10)
            except NodeIdentityConflict as err:
                if err.message != refused:  # loud once per reason, not every retry
                    log.error("node %d: registration refused: %s", self.node_id, err)
                    refused = err.message
                await asyncio.sleep(delay_s)
                delay_s = min(1.0, delay_s * 2)
                continue
            except TidelogError as err:
                log.info("node %d not registered yet (%s); retrying", self.node_id, err)
                await asyncio.sleep(delay_s)
                delay_s = min(1.0, delay_s * 2)
                continue
            log.info("node %d registered with the controller", self.node_id)
            self.registered.set()
            return

    def heartbeat_now(self) -> None:
        """Send a heartbeat at once (leadership of a partition moved here)."""
        self._heartbeat_now.set()

    async def _heartbeat_loop(self) -> None:
        interval_s = self.heartbeat_ms / 1000
        while True:
            try:
                async with asyncio.timeout(interval_s):
                    await self._heartbeat_now.wait()
            except TimeoutError:
                pass
            self._heartbeat_now.clear()
            leader = self.leader_id
            if leader == NONE or not self.registered.is_set():
                # Heartbeats speak for the registered incarnation: a node whose registration
                # is refused (another data directory holds its id) must not keep that one
                # alive, or it could never be replaced.
                continue
            leading = list(self._leading())
            if leader == self.node_id:
                if self.is_leader:
                    try:
                        self.on_heartbeat(self.node_id, leading)
                    except TidelogError as err:  # not applied its own registration yet
                        log.debug("own heartbeat: %s", err)
                continue
            address = self.internal_address_of(leader)
            if address is None:
                continue
            beat = cluster_pb2.NodeHeartbeat(
                node_id=self.node_id,
                cluster_id=self.cluster_id,
                leading=[cluster_pb2.LeaderReport(group=g, term=t) for g, t in leading],
            )
            stub = cluster_pb2_grpc.ClusterStub(self._channel(address))  # type: ignore[no-untyped-call]
            try:
                await stub.Heartbeat(
                    beat,
                    timeout=heartbeat_timeout_ms / 1000,
                    metadata=self.auth.call_metadata(HEARTBEAT),
                )
            except grpc.RpcError as exc:
                log.debug("heartbeat to controller %d failed: %s", leader, exc)

    def on_heartbeat(self, node_id: int, leading: Iterable[tuple[int, int]]) -> None:
        """The active controller heard from ``node_id``, which leads ``leading`` groups."""
        if not self.is_leader:
            raise self._not_controller()
        state = self.state
        if node_id not in state.nodes:
            # Only registered nodes are watched: invented ids must not grow what is kept.
            raise InvalidRequest(f"heartbeat from node {node_id}, which is not registered")
        self._last_seen[node_id] = time.monotonic()
        for group, term in leading:
            located = state.locate_group(group)
            if located is None:
                continue  # not a partition (any more): nothing to hint
            current = state.topics[located[0]].partitions[located[1]]
            if node_id not in current.replicas or term > current.leader_term + MAX_TERM_GAP:
                continue  # cannot lead it, or a term no election reached: not a hint
            known = self._reported.get(group)
            if known is None or known[1] <= term:
                self._reported[group] = (node_id, term)

    async def _monitor_loop(self) -> None:
        interval_s = self.heartbeat_ms / 1000
        while True:
            await asyncio.sleep(interval_s)
            if not self.synced or not self._leader_since:
                continue
            try:
                self._check_liveness()
                self._send_hints()
            except TidelogError as err:
                log.debug("controller monitor: %s", err)

    def _check_liveness(self) -> None:
        now = time.monotonic()
        dead_s = self.node_dead_ms / 1000
        for node in list(self.state.nodes.values()):
            nid = node.node_id
            if nid == self.node_id or nid in self._liveness_inflight:
                continue
            seen = self._last_seen.get(nid, self._leader_since)
            silent = now - seen
            if node.alive and silent > dead_s:
                log.warning("node %d silent for %.1f s: marking it dead", nid, silent)
                self._track(nid, self._propose(MarkNodeDead(nid)))
            elif not node.alive and silent < dead_s and nid in self._last_seen:
                log.info("node %d heartbeats again: marking it alive", nid)
                self._track(nid, self._propose(MarkNodeAlive(nid)))

    def _track(self, nid: int, fut: asyncio.Future[ApplyResult]) -> None:
        self._liveness_inflight.add(nid)

        def done(f: asyncio.Future[ApplyResult]) -> None:
            self._liveness_inflight.discard(nid)
            if not f.cancelled():
                f.exception()  # retrieved: a failure is retried at the next check

        fut.add_done_callback(done)

    def _send_hints(self) -> None:
        if self._hints_inflight or not self._reported:
            return
        state = self.state
        hints: list[LeaderHint] = []
        for group, (leader, term) in list(self._reported.items()):
            located = state.locate_group(group)
            if located is None:
                del self._reported[group]
                continue
            topic, p = located
            current = state.topics[topic].partitions[p]
            if term > current.leader_term or (
                term == current.leader_term and leader != current.leader
            ):
                node = state.nodes.get(leader)
                if node is not None and node.alive and leader in current.replicas:
                    hints.append(LeaderHint(group, leader, term))
        if not hints:
            return
        self._hints_inflight = True
        fut = self._propose(UpdatePartitionLeaders(tuple(hints)))

        def done(f: asyncio.Future[ApplyResult]) -> None:
            self._hints_inflight = False
            if not f.cancelled():
                f.exception()

        fut.add_done_callback(done)


class ClusterService(cluster_pb2_grpc.ClusterServicer):
    """The internal Cluster service: forwarding, heartbeats, log digests."""

    def __init__(
        self,
        controller: Controller,
        digest: Callable[[cluster_pb2.LogDigestRequest], Awaitable[cluster_pb2.LogDigestResponse]],
        metrics: object,
        auth: InternalAuth | None = None,
    ) -> None:
        self.controller = controller
        self._digest = digest
        self.metrics = metrics
        self.auth = auth if auth is not None else InternalAuth(controller.node_id)

    async def Forward(
        self, request: cluster_pb2.ForwardRequest, context: aio.ServicerContext[object, object]
    ) -> cluster_pb2.ForwardResponse:
        try:
            peer = self.auth.peer_id(context, FORWARD)
            self.auth.check_sender(peer, request.from_node, "a forwarded request")
            if peer is not None and request.WhichOneof("body") == "command":
                command = decode_command(request.command)
                if isinstance(command, RegisterNode):
                    self.auth.check_sender(peer, command.node_id, "a node registration")
            return await self.controller.handle_forward(request)
        except TidelogError as err:
            await _abort(context, err)
        raise AssertionError("unreachable")

    async def Heartbeat(
        self, request: cluster_pb2.NodeHeartbeat, context: aio.ServicerContext[object, object]
    ) -> cluster_pb2.HeartbeatAck:
        c = self.controller
        try:
            peer = self.auth.peer_id(context, HEARTBEAT)
            self.auth.check_sender(peer, request.node_id, "a heartbeat")
            if request.cluster_id != c.cluster_id:
                raise InvalidRequest(
                    f"heartbeat of node {request.node_id} of cluster {request.cluster_id!r} "
                    f"reached a node of cluster {c.cluster_id!r}"
                )
            c.on_heartbeat(request.node_id, [(r.group, r.term) for r in request.leading])
        except TidelogError as err:
            await _abort(context, err)
        return cluster_pb2.HeartbeatAck(controller_id=c.node_id)

    async def LogDigest(
        self, request: cluster_pb2.LogDigestRequest, context: aio.ServicerContext[object, object]
    ) -> cluster_pb2.LogDigestResponse:
        try:
            self.auth.peer_id(context, LOG_DIGEST)
            return await self._digest(request)
        except TidelogError as err:
            await _abort(context, err)
        raise AssertionError("unreachable")


async def _abort(context: aio.ServicerContext[object, object], err: TidelogError) -> None:
    from tidelog.errors import trailing_metadata

    await context.abort(err.code, err.message, trailing_metadata=trailing_metadata(err))


__all__ = [
    "CONTROLLER_DIR",
    "DEFAULT_REPLICATION_FACTOR",
    "FORWARDABLE_COMMANDS",
    "ClusterService",
    "Controller",
    "TopicSpec",
    "command_batch",
    "node_dead_ms_default",
    "parse_voters",
]
