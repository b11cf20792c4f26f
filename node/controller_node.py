"""The controller on a node: Raft group 0, the cluster metadata it replicates, and the work
of the active controller (its leader).

Every node runs group 0: its voters elect the active controller, every other node follows the
log as a learner (added outside the log when its registration is applied). The voters are
the group's committed configuration, which lives in its log (CONFIG entries, as a
partition's) and its snapshots: ``--controller-voters`` only bootstraps a new cluster (and
names addresses to reach first); a node restarted with another list keeps the committed
voters and says so. The active controller changes the voters one at a time
(``_plan_voters``, ``controller/planning.plan_controller_voters``): a voter dead past
``replica.reprovision.ms``, or draining, is replaced by a live node. The log is a PartitionLog under ``<data-dir>/controller`` whose entries are
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
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import grpc
from grpc import aio

from tidelog.config import validate_partitions, validate_topic_configs, validate_topic_name
from tidelog.controller.commands import (
    NODE_ACTIVE,
    NODE_DRAINING,
    AddPartitions,
    AllocateProducerIds,
    AlterTopicConfig,
    Command,
    CommandDecodeError,
    CreateTopic,
    DeleteTopic,
    LeaderHint,
    MarkNodeAlive,
    MarkNodeDead,
    MovePartitions,
    PartitionMove,
    RegisterNode,
    RemoveNode,
    ReplicaReport,
    SetClusterConfig,
    SetNodeState,
    UpdatePartitionLeaders,
    UpdatePartitionReplicas,
    decode_command,
    encode_command,
)
from tidelog.controller.planning import (
    VOTER_PROMOTE,
    VOTER_TRANSFER,
    VOTER_WAIT,
    plan_controller_voters,
    plan_leader_transfers,
    plan_moves,
)
from tidelog.controller.settings import (
    LEADER_BALANCE_ENABLE,
    LEADER_BALANCE_TRANSFERS_PER_SECOND,
    bool_setting,
    check_known,
    int_setting,
    validate_cluster_settings,
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
    StorageError,
    TidelogError,
    TopicExists,
    UnknownTopic,
    excerpt,
    from_rpc_error,
)
from tidelog.node import limits
from tidelog.node.controller_bootstrap import Decision, Outcome, PeerAnswer, decide
from tidelog.node.controller_snapshots import (
    CONTROLLER_SNAPSHOT_ENTRIES_DEFAULT,
    ControllerSnapshot,
    SnapshotFile,
)
from tidelog.node.controller_snapshots import decode as decode_controller_snapshot
from tidelog.node.internal_auth import InternalAuth
from tidelog.node.io import REAL_FS, FileSystem
from tidelog.node.log import PartitionLog
from tidelog.node.multiraft import MultiRaft, RaftGroup
from tidelog.node.raft.core import NEW_REPLICA
from tidelog.node.raft.errors import (
    NotRaftLeader,
    ProposalDropped,
    SnapshotTemporarilyUnavailable,
)
from tidelog.node.raft.guard import MAX_TERM_GAP
from tidelog.node.raft.progress import ProgressState
from tidelog.node.raft.types import (
    NONE,
    ConfChangeKind,
    ConfState,
    Entry,
    EntryKind,
    Role,
    Snapshot,
    SnapshotMeta,
    SoftState,
)
from tidelog.node.raft_codec import conf_change_batch
from tidelog.node.replica_storage import RaftLogFile, next_offset
from tidelog.node.stm import BatchSpan, LostHow, StateMachine, UnappliableEntry
from tidelog.records import decode_values, encode_batch, stamped_copy
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
CATCHUP_READ: Final = f"/{_CLUSTER_SERVICE}/CatchupRead"
CONTROLLER_VOTERS: Final = f"/{_CLUSTER_SERVICE}/ControllerVoters"

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
#: Replication factor of a CreateTopics request that leaves it at 0: this many, or every
#: node alive when fewer are (rpk's and the CLI's rule; Kafka's broker default is 1, which
#: leaves a new user's topic without a second copy on a cluster built to survive a kill).
DEFAULT_REPLICATION_FACTOR: Final = 3
#: A group whose leadership the balancer moved is left alone this long (the new leader's
#: report takes a heartbeat or two to arrive).
leader_transfer_cooldown_ms: Final = 5_000
#: The balancer waits this long after the controller took over or a node's liveness
#: changed, so restarted nodes report what they lead before leadership is judged.
leader_balance_settle_ms: Final = 3_000

#: How often the active controller plans replica moves.
move_plan_interval_ms: Final = 1_000
#: How often a forming controller voter asks the others again (and each ask's timeout).
form_retry_ms: Final = 500
#: A learner of group 0 at most this many entries behind the leader's log is promoted.
voter_catchup_entries_max: Final = 64

#: A committed Raft configuration: (voters, learners).
ConfPair = tuple[frozenset[int], frozenset[int]]

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

    #: The file system the snapshot file is on (``node/io.py``; the node simulation's disk).
    snapshot_fs: FileSystem = REAL_FS

    def __init__(
        self,
        node_id: int,
        voters: Mapping[int, str],
        raft: MultiRaft,
        cluster_id: str,
        *,
        bootstrap_voters: frozenset[int] | None = None,
        node_dead_ms: int = node_dead_ms_default,
        heartbeat_ms: int = heartbeat_interval_ms,
        set_peer: Callable[[int, str], None] = lambda _node, _address: None,
        leading: Callable[[], Iterable[tuple[int, int]]] = lambda: (),
        directory_id: str = "",
        auth: InternalAuth | None = None,
        snapshot_entries: int = CONTROLLER_SNAPSHOT_ENTRIES_DEFAULT,
        confs: Callable[[], Mapping[int, ConfPair]] = lambda: {},
        transfer: Callable[[int, int], None] = lambda _group, _to: None,
    ) -> None:
        if node_dead_ms < 2 * heartbeat_ms:
            raise ValueError(
                f"node_dead_ms {node_dead_ms} must be at least twice the heartbeat interval "
                f"({heartbeat_ms} ms)"
            )
        super().__init__()
        self.node_id = node_id
        #: ``--controller-voters`` (or what --join was told): node ids -> internal addresses,
        #: the first contacts. Not the voters: those are the committed configuration
        #: (:attr:`voter_ids`).
        self.voters = dict(voters)
        #: The voters this data directory was first started with: group 0's configuration
        #: until one is stored (node/server.py keeps them).
        self.bootstrap_voters = (
            frozenset(voters) if bootstrap_voters is None else frozenset(bootstrap_voters)
        )
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
        #: The committed configurations of the groups this node leads (by group id).
        self._confs = confs
        #: Hands leadership of a local group to another node (leader balance).
        self._transfer = transfer
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
        #: Snapshot the state and truncate the log every this many applied entries
        #: (node/controller_snapshots.py); the file, and the index of the latest snapshot.
        self.snapshot_entries = snapshot_entries
        self._snapshot_file: SnapshotFile | None = None
        self.snapshot_index = 0
        self._snapshot_refused = False
        # Active controller only: the committed configurations leaders report (group ->
        # (term, voters, learners)), replica moves and leader transfers in flight.
        self._conf_reported: dict[int, tuple[int, tuple[int, ...], tuple[int, ...]]] = {}
        self._reports_inflight = False
        self._moves_inflight = False
        self._transfers_out: dict[int, list[tuple[int, int]]] = {}
        self._transferred_at: dict[int, float] = {}
        self._transfer_tokens = 0.0
        self._balance_at = 0.0
        self._planned_at = 0.0
        self._liveness_changed_at = 0.0
        #: Why partitions cannot move (no room), from the last plan; for status.
        self.stalled: dict[tuple[str, int], str] = {}
        #: The controller voter change in progress (active controller; "" when none).
        self.voter_change = ""
        #: Partition groups whose creation this node applied after its data directory's
        #: registration (see :meth:`group_newer_than_directory`).
        self._groups_after_directory: set[int] = set()
        #: A controller voter on an empty directory that has not yet decided whether it
        #: forms a new cluster or joins one (node/controller_bootstrap.py); ``waiting`` says
        #: why it still waits.
        self.forming = False
        self.waiting = ""
        #: This voter decided to form a new cluster on this data directory (stored: it stays
        #: fresh for the other forming voters while its log is empty, after a restart too).
        self._formed = False
        #: Called with the cluster id a voter holding state answered, when it differs from
        #: this node's (a new directory took a derived one).
        self.on_cluster_id: Callable[[str], None] = lambda _cluster_id: None

    # ---- lifecycle -----------------------------------------------------------------------

    @property
    def voter_ids(self) -> frozenset[int]:
        """The controller group's voters: its configuration in force on this node (the
        committed one), before ``open`` the bootstrap one."""
        if self.group is not None:
            return self.group.raw.conf_state.voters
        return self.bootstrap_voters

    @property
    def lone_voter(self) -> bool:
        """This node alone forms the controller quorum (a single-node cluster)."""
        return self.voter_ids == {self.node_id}

    def voter_addresses(self) -> dict[int, str]:
        """The voters with their internal addresses (as registered, else as given)."""
        out = {}
        for node_id in sorted(self.voter_ids):
            address = self.internal_address_of(node_id)
            if address:
                out[node_id] = address
        return out

    def open(
        self,
        controller_log: RaftLogFile,
        snapshot_path: Path | None = None,
        *,
        joining: bool = False,
    ) -> RaftGroup:
        """Start group 0 over its log: restore the latest snapshot (``snapshot_path``; None:
        no snapshots, the log is kept whole) and apply again the committed commands after
        it. A new replica of group 0 (an empty data directory) never bootstraps it on its
        own: a voter asks the other voters first (:attr:`forming`,
        node/controller_bootstrap.py); ``joining`` (``--join``): it joins the cluster it
        was told of, and never bootstraps."""
        voters = self.bootstrap_voters
        learners = frozenset({self.node_id}) - voters
        applied = 0
        if snapshot_path is not None:
            self._snapshot_file = SnapshotFile(snapshot_path, self.snapshot_fs)
            snap = self._snapshot_file.load()
            if snap is not None:
                self.state.restore(snap.state)
                applied = self.snapshot_index = snap.index
                if controller_log.term_at_index(snap.index) != snap.term:
                    # The snapshot was installed from a leader and the node stopped before
                    # its log was reset: the log continues after the snapshot.
                    controller_log.reset(snap.end_offset, snap.index, snap.term)
                log.info(
                    "controller state restored from the snapshot at index %d; replaying the "
                    "log from index %d", snap.index, snap.index + 1,
                )  # fmt: skip
        group = self._driver.add_group(
            CONTROLLER_GROUP_ID,
            controller_log,
            ConfState(voters=voters, learners=learners),
            self,
            durable=True,
            config=self._driver.timing.config(),
            applied=applied,
            # The voters change through the log (CONFIG entries): the stored configuration
            # wins over the bootstrap one once there is one.
            logged_conf=True,
            # A new replica helps elect a brand-new controller only once every listed voter
            # said it is fresh too (resolve_bootstrap); a lone voter at once.
            bootstrap=voters == {self.node_id},
        )
        raw = group.raw
        self._formed = self._driver.formed(group)
        self.forming = (
            not joining
            and voters != {self.node_id}
            and self.node_id in raw.conf_state.voters
            and raw.lost_to == NEW_REPLICA
            and group.storage.last_index() == 0
            and applied == 0
        )
        if self.forming:
            log.info(
                "controller: new replica of group 0 on an empty data directory: asking the "
                "other voters %s whether a cluster exists before forming one",
                ",".join(str(v) for v in sorted(raw.conf_state.voters - {self.node_id})),
            )
        committed = group.raw.conf_state.voters
        given = frozenset(self.voters)
        if given != committed and given != {self.node_id}:
            log.warning(
                "--controller-voters names nodes %s but the controller's committed "
                "configuration has voters %s: using the committed one (the flag only "
                "bootstraps a new cluster)",
                ",".join(map(str, sorted(given))), ",".join(map(str, sorted(committed))),
            )  # fmt: skip
        if self.node_id not in group.raw.conf_state.members:
            group.raw.add_learner(self.node_id)
        group.conf_listener = self._on_conf
        if self._snapshot_file is not None:
            group.storage.snapshot_maker = self._raft_snapshot
            group.storage.custom_installer = self._install_snapshot
        self.attach(group, self._driver)
        if applied:
            self._registered_in_snapshot()
        self._replay_target = group.raw.commit_index
        if self._replay_target == 0:
            self.replayed.set()
        for node_id, address in self.voters.items():
            if node_id != self.node_id:
                self._set_peer(node_id, address)
        if self.lone_voter:
            self._driver.campaign(group)  # nobody else can win; do not wait for a timeout
        self._sync_learners()
        return group

    @property
    def fresh(self) -> bool:
        """This node holds no controller state and has not joined a cluster: a voter that
        waits to form one, or that decided to (until its log has entries). What
        ``ControllerVoters`` answers other forming voters."""
        group = self.group
        if group is None or group.storage.last_index() != 0 or self.snapshot_index:
            return False
        raw = group.raw
        return self.forming or self._formed or (raw.lost_to == NEW_REPLICA and raw.bootstrap)

    def resolve_bootstrap(self, decision: Decision) -> None:
        """Act on :func:`controller_bootstrap.decide` while :attr:`forming`."""
        group = self.group
        if not self.forming or group is None:
            return
        if decision.outcome is Outcome.WAIT:
            if decision.reason != self.waiting:
                log.warning("controller: %s", decision.reason)
            self.waiting = decision.reason
            return
        self.forming = False
        self.waiting = ""
        if decision.outcome is Outcome.NEW:
            log.info(
                "controller: every listed voter is fresh: forming a new cluster %s",
                self.cluster_id,
            )
            group.raw.bootstrap = True
            self._formed = True
            self._driver.settle(group)
            return
        log.info(
            "controller: a voter holds the state of cluster %s: joining it as a new replica "
            "that does not vote until the controller leader reached it",
            decision.cluster_id,
        )
        if decision.cluster_id and decision.cluster_id != self.cluster_id:
            self.cluster_id = decision.cluster_id
            self.on_cluster_id(decision.cluster_id)

    async def _form_loop(self) -> None:
        """Ask the other listed voters what they hold until :meth:`resolve_bootstrap`
        decided (node/controller_bootstrap.py)."""
        while self.forming:
            others = sorted(self.voter_ids - {self.node_id})
            answers = await asyncio.gather(*(self._ask_fresh(n) for n in others))
            heard = dict(zip(others, answers, strict=True))
            self.resolve_bootstrap(decide(self.node_id, self.voter_ids, heard))
            if self.forming:
                await asyncio.sleep(form_retry_ms / 1000)

    async def _ask_fresh(self, node_id: int) -> PeerAnswer | None:
        address = self.internal_address_of(node_id)
        if not address:
            return None
        stub = cluster_pb2_grpc.ClusterStub(self._channel(address))  # type: ignore[no-untyped-call]
        try:
            resp: cluster_pb2.ControllerVotersResponse = await stub.ControllerVoters(
                cluster_pb2.ControllerVotersRequest(),
                timeout=form_retry_ms / 1000,
                metadata=self.auth.call_metadata(CONTROLLER_VOTERS),
            )
        except grpc.RpcError:
            return None
        return PeerAnswer(fresh=resp.fresh, cluster_id=resp.cluster_id)

    def _on_conf(self, group: RaftGroup, conf: ConfState) -> None:
        """Group 0's configuration in force changed (a committed CONFIG entry, a snapshot,
        a forced one): learners outside the log follow it."""
        log.info(
            "controller voters now %s (learners %s)", sorted(conf.voters), sorted(conf.learners)
        )
        self.voter_change = ""  # that step is done; the next plan says what is left
        self._sync_learners()
        self._heartbeat_now.set()

    def _sync_learners(self) -> None:
        """Every registered node that is not a voter is a learner of group 0 (outside the
        log: a learner never counts), on every node: whoever leads replicates to it. A
        CONFIG entry carries the learners its leader had, a new leader may have missed some,
        and a voter removed while it stays registered (a dead voter replaced) follows the
        log as a learner when it returns."""
        group = self.group
        if group is None:
            return
        raw = group.raw
        conf = raw.conf_state
        registered = set(self.state.nodes)
        touched = False
        for node_id in sorted(registered - conf.members):
            raw.add_learner(node_id)
            touched = True
        for node_id in sorted(conf.learners - registered - {self.node_id}):
            if self.replayed.is_set() and node_id not in self.voters:
                raw.remove_learner(node_id)
                touched = True
        # A replica whose configuration lags (it was down while the voters changed) must
        # not refuse the current leader: admit every registered node and first contact.
        group.allowed_peers = frozenset(registered) | frozenset(self.voters)
        if touched:
            self._driver.touch(group)

    def start(self, register: RegisterNode) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._register(register), name="controller-register"),
            loop.create_task(self._heartbeat_loop(), name="controller-heartbeat"),
            loop.create_task(self._monitor_loop(), name="controller-monitor"),
        ]
        if self.forming:
            self._tasks.append(loop.create_task(self._form_loop(), name="controller-form"))

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
            self._conf_reported = {}
            self._transfers_out = {}
            self._transferred_at = {}
            self._balance_at = now
            self._liveness_changed_at = now
            log.info("node %d is the active controller (term %d)", self.node_id, self.term)
        elif soft.role != Role.LEADER:
            if self._leader_since:
                log.info("node %d is no longer the active controller", self.node_id)
            self._leader_since = 0.0
        self._heartbeat_now.set()

    def restore_snapshot(self, snapshot: Snapshot) -> None:
        """A leader's snapshot was installed (``_install_snapshot`` stored it): take its
        state."""
        snap = decode_controller_snapshot(snapshot.data)
        self.state.restore(snap.state)
        self.snapshot_index = snap.index
        self._state_changed = True
        self._registered_in_snapshot()
        log.info("controller state installed from the leader's snapshot at index %d", snap.index)

    def _registered_in_snapshot(self) -> None:
        """What applying the registrations a snapshot replaced would have done: a peer for
        every other registered node, a learner of group 0 for every one not a voter."""
        for node_id, node in self.state.nodes.items():
            if node_id == self.node_id:
                continue
            self._set_peer(node_id, node.internal_address or node.address)
        self._sync_learners()

    # ---- snapshots and truncation (node/controller_snapshots.py) ------------------------------

    def _raft_snapshot(self) -> Snapshot | None:
        """``ReplicaStorage.snapshot_maker`` of group 0: the latest snapshot file."""
        f, group = self._snapshot_file, self.group
        data = None if f is None else f.read_bytes()
        if data is None or group is None:
            raise SnapshotTemporarilyUnavailable("no controller snapshot yet")
        snap = decode_controller_snapshot(data)
        # The learners the leader replicates to (added at their registrations, not in the
        # stored configuration): a learner installs only a snapshot that names it.
        meta = SnapshotMeta(snap.index, snap.term, group.raw.tracker.conf)
        return Snapshot(meta, data)

    def _install_snapshot(self, snapshot: Snapshot) -> None:
        """``ReplicaStorage.custom_installer`` of group 0: keep the file, then reset the log
        to continue after it (a crash in between: ``open`` resets it)."""
        snap = decode_controller_snapshot(snapshot.data)
        if (snap.index, snap.term) != (snapshot.meta.index, snapshot.meta.term):
            raise StorageError(
                f"controller snapshot at index {snap.index} term {snap.term} in a Raft "
                f"snapshot at index {snapshot.meta.index} term {snapshot.meta.term}"
            )
        assert self._snapshot_file is not None and self.group is not None
        self._snapshot_file.write_bytes(snapshot.data)
        self.group.storage.log.reset(snap.end_offset, snap.index, snap.term)

    def _maybe_snapshot(self) -> None:
        f, group = self._snapshot_file, self.group
        applied = self.applied_index
        if f is None or group is None or applied - self.snapshot_index < self.snapshot_entries:
            return
        lg = group.storage.log
        term = lg.term_at_index(applied)
        end = lg.end_offset_at_index(applied)
        if term is None or end is None:
            return
        snap = ControllerSnapshot(applied, term, end, self.state.snapshot())
        try:
            f.write(snap)
        except StorageError as exc:
            if not self._snapshot_refused:
                self._snapshot_refused = True
                log.error("controller log not truncated: %s", exc)
            return
        except OSError as exc:
            log.error("cannot write the controller snapshot: %s", exc)
            return
        self.snapshot_index = applied
        # Delete the segments closed at the previous snapshot (all below it), then close the
        # active one: the log keeps at most the entries since the previous snapshot.
        deleted = 0
        if isinstance(lg, PartitionLog):
            deleted = lg.advance_start(lg.segment_base_offsets[-1])
            lg.roll()
        log.info(
            "controller snapshot at index %d (%d bytes); %d log segment(s) deleted",
            applied, len(snap.state), deleted,
        )  # fmt: skip

    def apply(self, entries: tuple[Entry, ...]) -> list[ApplyResult | None]:
        results = [self._apply(e) for e in entries]
        if any(r is not None and r.changed for r in results):
            self._state_changed = True
        return results

    def on_applied(self, last_index: int) -> None:
        if not self.replayed.is_set() and last_index >= self._replay_target:
            self.replayed.set()
        self._maybe_snapshot()
        if self._state_changed:
            self._state_changed = False
            self._sync_learners()
            self.on_change()

    def on_storage_failure(self, group: RaftGroup, exc: BaseException) -> None:
        log.critical("the controller group stopped: %s; this node stops following metadata", exc)
        self.halted = exc
        self.stopped.set()

    @property
    def term(self) -> int:
        return self.group.raw.term if self.group is not None else 0

    def _apply(self, e: Entry) -> ApplyResult | None:
        if e.kind in (EntryKind.EMPTY, EntryKind.CONFIG) or not e.data:
            return None  # a voter change takes effect in the core (``_on_conf``)
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
        if result.changed and self.registered.is_set():
            if isinstance(command, CreateTopic | AddPartitions):
                record = self.state.topics.get(command.name)
                if record is not None:
                    born = record.partitions[len(record.partitions) - len(command.assignments) :]
                    self._groups_after_directory.update(a.group_id for a in born)
        return result

    def group_newer_than_directory(self, group_id: int) -> bool:
        """Whether this node applied the creation of partition group ``group_id`` after it
        applied its data directory's registration: the group is then no older than the
        directory, and its replicas on new directories may elect their first leader among
        themselves (``MultiRaft.add_group(bootstrap=True)``). False for a group created before
        (this directory replaced a wiped or lost one: its replica must not help elect anyone
        until a leader reached it, or a majority of wiped replicas would elect an empty log),
        and when it is unknown (the creation lies in a snapshot this node restored)."""
        return group_id in self._groups_after_directory

    def _on_registered(self, c: RegisterNode) -> None:
        if c.node_id == self.node_id:
            # Only a registration of this data directory: a wiped node that replays the
            # registration of the directory it replaced is not registered by it.
            if c.directory_id == self.directory_id:
                self.registered.set()
            return
        self._set_peer(c.node_id, c.internal_address or c.address)
        if self._leader_since and c.node_id not in self._last_seen:
            # Just registered (a node that joins while this controller leads): it is heard
            # of now, not since this controller took over, or it would be marked dead
            # before its first heartbeat.
            self._last_seen[c.node_id] = time.monotonic()
        if self.group is not None and c.node_id not in self.group.raw.conf_state.members:
            # Learners need no consensus (they never vote): every member adds it at the same
            # log position, so whoever leads replicates the metadata log to it.
            self.group.raw.add_learner(c.node_id)
            self._driver.touch(self.group)
            self.group.allowed_peers |= {c.node_id}

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

    async def create_partitions(self, name: str, total: int, *, validate_only: bool) -> int:
        req = cluster_pb2.ForwardRequest(
            create_partitions=admin_pb2.CreatePartitionsRequest(
                topic=name, total_count=total, validate_only=validate_only
            )
        )
        return (await self.forward(req)).applied_index

    async def drain_node(self, node_id: int, *, cancel: bool = False) -> tuple[int, int]:
        """Start (or stop) draining a node; (replicas on it, index)."""
        req = cluster_pb2.ForwardRequest(
            drain_node=admin_pb2.DrainNodeRequest(node_id=node_id, cancel=cancel)
        )
        resp = await self.forward(req)
        return resp.count, resp.applied_index

    async def remove_node(self, node_id: int) -> int:
        req = cluster_pb2.ForwardRequest(remove_node=admin_pb2.RemoveNodeRequest(node_id=node_id))
        return (await self.forward(req)).applied_index

    async def reassign_partition(
        self, topic: str, partition: int, replicas: Sequence[int], *, cancel: bool = False
    ) -> int:
        req = cluster_pb2.ForwardRequest(
            reassign_partition=admin_pb2.ReassignPartitionRequest(
                topic=topic, partition=partition, replicas=list(replicas), cancel=cancel
            )
        )
        return (await self.forward(req)).applied_index

    async def force_recover_partition(
        self, topic: str, partition: int
    ) -> cluster_pb2.ForwardResponse:
        """UNSAFE: recover a partition that lost a majority (node/recovery.py)."""
        req = cluster_pb2.ForwardRequest(
            force_recover_partition=admin_pb2.ForceRecoverPartitionRequest(
                topic=topic, partition=partition, from_survivors=True
            )
        )
        return await self.forward(req)

    async def set_cluster_config(self, set_: Mapping[str, str], delete: Sequence[str]) -> int:
        req = cluster_pb2.ForwardRequest(
            set_cluster_config=admin_pb2.SetClusterConfigRequest(
                set=dict(set_), delete=list(delete)
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
        contacts = {**self.voters, **self.voter_addresses()}
        others = [a for n, a in sorted(contacts.items()) if n != self.node_id]
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

    async def ask_peer(self, address: str, rpc: str, request: Any, timeout_s: float) -> Any:
        """Call the Cluster service's ``rpc`` on the node at ``address`` (its internal
        listener) with ``request`` stamped as coming from this node of this cluster; a
        failure is raised as the TidelogError it carries."""
        stub = cluster_pb2_grpc.ClusterStub(self._channel(address))  # type: ignore[no-untyped-call]
        request.from_node = self.node_id
        request.cluster_id = self.cluster_id
        try:
            return await getattr(stub, rpc)(
                request,
                timeout=timeout_s,
                metadata=self.auth.call_metadata(f"/{_CLUSTER_SERVICE}/{rpc}"),
            )
        except aio.AioRpcError as exc:
            raise from_rpc_error(exc) from None

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
                if which == "create_partitions":
                    cp = request.create_partitions
                    index = await self._add_partitions(cp.topic, cp.total_count, cp.validate_only)
                    return cluster_pb2.ForwardResponse(applied_index=index)
                if which == "drain_node":
                    d = request.drain_node
                    count, index = await self._drain(d.node_id, cancel=d.cancel)
                    return cluster_pb2.ForwardResponse(applied_index=index, count=count)
                if which == "remove_node":
                    index = await self._remove_node(request.remove_node.node_id)
                    return cluster_pb2.ForwardResponse(applied_index=index)
                if which == "reassign_partition":
                    r = request.reassign_partition
                    index = await self._reassign(
                        r.topic, r.partition, tuple(r.replicas), cancel=r.cancel
                    )
                    return cluster_pb2.ForwardResponse(applied_index=index)
                if which == "force_recover_partition":
                    from tidelog.node.recovery import force_recover_partition

                    f = request.force_recover_partition
                    report = await force_recover_partition(self, f.topic, f.partition)
                    return cluster_pb2.ForwardResponse(
                        applied_index=self.state.applied_index, force_recover=report
                    )
                if which == "set_cluster_config":
                    settings = request.set_cluster_config
                    index = await self._set_config(dict(settings.set), list(settings.delete))
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
            rf = spec.replication_factor or max(1, min(DEFAULT_REPLICATION_FACTOR, len(live)))
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

    async def _add_partitions(self, name: str, total: int, validate_only: bool) -> int:
        self.topic_record(name)  # UNKNOWN_TOPIC, with the usual hint
        command = self.state.prepare_add_partitions(name, total)
        load = self.state.replica_counts()
        for replicas in command.assignments:
            for node in replicas:
                load[node] = load.get(node, 0) + 1
        crowded = {n: c for n, c in load.items() if c > limits.partitions_per_node_max}
        if crowded:
            node, count = max(crowded.items(), key=lambda kv: kv[1])
            raise InvalidPartitions(
                f"adding these partitions would put {count} partition replicas on node "
                f"{node}, more than its limit of {limits.partitions_per_node_max}"
            )
        if validate_only:
            return self.applied_index
        return await self._propose_checked(command)

    async def _propose_checked(self, command: Command) -> int:
        self.state.check(command)
        [result] = await self._propose_all([command])
        result.raise_for_error()
        return result.index

    async def _drain(self, node_id: int, *, cancel: bool) -> tuple[int, int]:
        node = self.state.nodes.get(node_id)
        if node is None:
            raise InvalidRequest(
                f"node {node_id} is not registered; registered nodes: {sorted(self.state.nodes)}"
            )
        state = NODE_ACTIVE if cancel else NODE_DRAINING
        self.state.check(SetNodeState(node_id, state))  # the replicas' refusals first
        if not cancel and node_id in self.voter_ids:
            others = [
                i for i in self.state.active_node_ids() if i != node_id and i not in self.voter_ids
            ]
            if not others:
                raise InvalidRequest(
                    f"node {node_id} is a controller voter and no other live, active node "
                    "that is not a voter can take its vote: add a node first"
                )
        index = await self._propose_checked(SetNodeState(node_id, state))
        return len(self.state.replicas_on(node_id)), index

    async def _remove_node(self, node_id: int) -> int:
        voters = self.voter_ids
        if node_id in voters:
            if len(voters) == 1:
                raise InvalidRequest(
                    f"node {node_id} is the controller's last voter: it cannot be removed"
                )
            raise InvalidRequest(
                f"node {node_id} is a controller voter: drain it first (tidelog cluster drain "
                f"{node_id}) so its vote moves to another node, then remove it"
            )
        return await self._propose_checked(RemoveNode(node_id))

    async def _reassign(
        self, topic: str, partition: int, replicas: tuple[int, ...], *, cancel: bool
    ) -> int:
        a = self.state.partition(topic, partition)
        if cancel:
            if replicas:
                raise InvalidRequest("a cancel names no replicas")
            return await self._propose_checked(MovePartitions((PartitionMove(a.group_id, ()),)))
        if not replicas:
            raise InvalidRequest(f"{topic}/{partition}: name the new replicas (--replicas 1,2,4)")
        if a.target is not None:
            raise InvalidRequest(
                f"{topic}/{partition}: a move to {list(a.target)} is in progress; cancel it "
                "first (tidelog partition reassign --cancel)"
            )
        self.state.check_target(f"{topic}/{partition}", self.state.topic(topic), a, replicas)
        return await self._propose_checked(MovePartitions((PartitionMove(a.group_id, replicas),)))

    async def _set_config(self, set_: Mapping[str, str], delete: Sequence[str]) -> int:
        validate_cluster_settings(set_)
        check_known(tuple(delete))
        return await self._propose_checked(SetClusterConfig(set_, tuple(delete)))

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
            confs = self._conf_changes(leading)
            if leader == self.node_id:
                if self.is_leader:
                    try:
                        transfers = self.on_heartbeat(self.node_id, leading, confs)
                    except TidelogError as err:  # not applied its own registration yet
                        log.debug("own heartbeat: %s", err)
                    else:
                        self._run_transfers(transfers)
                continue
            address = self.internal_address_of(leader)
            if address is None:
                continue
            reports = []
            for g, t in leading:
                report = cluster_pb2.LeaderReport(group=g, term=t)
                conf = confs.get(g)
                if conf is not None:
                    report.has_conf = True
                    report.voters.extend(sorted(conf[0]))
                    report.learners.extend(sorted(conf[1]))
                reports.append(report)
            beat = cluster_pb2.NodeHeartbeat(
                node_id=self.node_id, cluster_id=self.cluster_id, leading=reports
            )
            stub = cluster_pb2_grpc.ClusterStub(self._channel(address))  # type: ignore[no-untyped-call]
            try:
                ack: cluster_pb2.HeartbeatAck = await stub.Heartbeat(
                    beat,
                    timeout=heartbeat_timeout_ms / 1000,
                    metadata=self.auth.call_metadata(HEARTBEAT),
                )
            except grpc.RpcError as exc:
                log.debug("heartbeat to controller %d failed: %s", leader, exc)
            else:
                self._run_transfers([(t.group, t.to) for t in ack.transfers])

    def _conf_changes(self, leading: Sequence[tuple[int, int]]) -> dict[int, ConfPair]:
        """The committed configurations of the groups led here that the metadata does not
        record yet (or whose move's target they reach): what the controller must learn."""
        confs = self._confs()
        if not confs:
            return {}
        out = {}
        state = self.state
        for group, _term in leading:
            conf = confs.get(group)
            located = state.locate_group(group)
            if conf is None or located is None or not conf[0]:
                continue
            a = state.topics[located[0]].partitions[located[1]]
            if set(a.replicas) != conf[0] or (a.target is not None and set(a.target) == conf[0]):
                out[group] = conf
        return out

    def _run_transfers(self, transfers: Iterable[tuple[int, int]]) -> None:
        for group, to in transfers:
            try:
                self._transfer(group, to)
            except Exception as exc:  # the group moved or lost its leader meanwhile
                log.debug("leader transfer of group %d to %d: %s", group, to, exc)

    def on_heartbeat(
        self,
        node_id: int,
        leading: Iterable[tuple[int, int]],
        confs: Mapping[int, ConfPair] | None = None,
    ) -> list[tuple[int, int]]:
        """The active controller heard from ``node_id``, which leads ``leading`` groups
        (``confs``: their committed configurations where the metadata lags). Returns the
        leader transfers the node should start: (group, to)."""
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
            # A node the move's target adds may lead before the metadata lists it among
            # the replicas (leadership handed to it): its configuration counts, its hint
            # waits until the replicas name it.
            if node_id not in current.hosts or term > current.leader_term + MAX_TERM_GAP:
                continue  # cannot lead it, or a term no election reached: not a hint
            if node_id in current.replicas:
                known = self._reported.get(group)
                if known is None or known[1] <= term:
                    self._reported[group] = (node_id, term)
            conf = (confs or {}).get(group)
            if conf is not None and term >= current.conf_term:
                seen = self._conf_reported.get(group)
                if seen is None or seen[0] <= term:
                    self._conf_reported[group] = (
                        term,
                        tuple(sorted(conf[0])),
                        tuple(sorted(conf[1])),
                    )
        return self._transfers_out.pop(node_id, [])

    async def _monitor_loop(self) -> None:
        interval_s = self.heartbeat_ms / 1000
        while True:
            await asyncio.sleep(interval_s)
            if not self.synced or not self._leader_since:
                continue
            try:
                self._check_liveness()
                self._send_hints()
                self._send_replica_reports()
                self._plan_moves()
                self._plan_voters()
                self._balance_leaders()
            except TidelogError as err:
                log.debug("controller monitor: %s", err)

    def _check_liveness(self) -> None:
        now = time.monotonic()
        dead_s = self.node_dead_ms / 1000
        for node in list(self.state.nodes.values()):
            nid = node.node_id
            if nid in self._liveness_inflight:
                continue
            if nid == self.node_id:
                if not node.alive:
                    # Marked dead by the previous controller (a pause, an overload) and
                    # leading now: it is alive, or reprovisioning would move its replicas.
                    log.info("node %d (this controller) is marked dead: marking it alive", nid)
                    self._track(nid, self._propose(MarkNodeAlive(nid)))
                    self._liveness_changed_at = now
                continue
            seen = self._last_seen.get(nid, self._leader_since)
            silent = now - seen
            if node.alive and silent > dead_s:
                log.warning("node %d silent for %.1f s: marking it dead", nid, silent)
                at_ms = int(time.time() * 1000)
                self._track(nid, self._propose(MarkNodeDead(nid, at_ms=at_ms)))
                self._liveness_changed_at = now
            elif not node.alive and silent < dead_s and nid in self._last_seen:
                log.info("node %d heartbeats again: marking it alive", nid)
                self._track(nid, self._propose(MarkNodeAlive(nid)))
                self._liveness_changed_at = now

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

    def _send_replica_reports(self) -> None:
        """Propose the committed configurations leaders reported that the state lags."""
        if self._reports_inflight or not self._conf_reported:
            return
        state = self.state
        reports = []
        for group, (term, voters, learners) in list(self._conf_reported.items()):
            located = state.locate_group(group)
            if located is None:
                del self._conf_reported[group]
                continue
            a = state.topics[located[0]].partitions[located[1]]
            reached = a.target is not None and set(a.target) == set(voters)
            if term < a.conf_term or (set(a.replicas) == set(voters) and not reached):
                del self._conf_reported[group]
                continue
            reports.append(ReplicaReport(group, term, voters, learners))
        if not reports:
            return
        self._reports_inflight = True
        fut = self._propose(UpdatePartitionReplicas(tuple(reports)))

        def done(f: asyncio.Future[ApplyResult]) -> None:
            self._reports_inflight = False
            if not f.cancelled():
                f.exception()

        fut.add_done_callback(done)

    def _plan_moves(self) -> None:
        """Start the moves reprovisioning, drains and replica balance call for (planned at
        most every ``move_plan_interval_ms``: a pass looks at every partition)."""
        now = time.monotonic()
        if self._moves_inflight or now - self._planned_at < move_plan_interval_ms / 1000:
            return
        self._planned_at = now
        plan = plan_moves(self.state, int(time.time() * 1000))
        self.stalled = dict(plan.stalled)
        if not plan.moves:
            return
        for m in plan.moves:
            located = self.state.locate_group(m.group_id)
            if located is not None:
                a = self.state.topics[located[0]].partitions[located[1]]
                log.info(
                    "moving %s/%d: replicas %s -> %s",
                    located[0], located[1], list(a.replicas), list(m.target),
                )  # fmt: skip
        self._moves_inflight = True
        fut = self._propose(MovePartitions(plan.moves))

        def done(f: asyncio.Future[ApplyResult]) -> None:
            self._moves_inflight = False
            if not f.cancelled() and f.exception() is None:
                result = f.result()
                if result.error is not None:
                    log.warning("replica moves refused: %s", result.error)

        fut.add_done_callback(done)

    def _plan_voters(self) -> None:
        """One step of a change of the controller's own voters (a dead or draining voter
        replaced, missing voters refilled), under the core's rules: one change in flight,
        after an entry of this leader's term is committed."""
        group = self.group
        if group is None:
            return
        raw = group.raw
        if raw.role != Role.LEADER or raw.lead_transferee != NONE:
            return
        if raw.conf_change_pending:
            return
        last = raw.last_index()

        def caught_up(node: int) -> bool:
            if node == self.node_id:
                return True
            pr = raw.progress(node)
            return (
                pr is not None
                and pr.state == ProgressState.REPLICATE
                and pr.match + voter_catchup_entries_max >= last
            )

        step = plan_controller_voters(
            self.state, raw.conf_state.voters, self.node_id, int(time.time() * 1000), caught_up
        )
        why = "" if step is None else step.why
        if why != self.voter_change and why:
            log.info("controller voters: %s", why)
        self.voter_change = why
        if step is None or step.kind == VOTER_WAIT:
            return
        if step.kind == VOTER_TRANSFER:
            raw.transfer_leadership(step.node)
            self._driver.touch(group)
            return
        kind = ConfChangeKind.PROMOTE if step.kind == VOTER_PROMOTE else ConfChangeKind.REMOVE
        try:
            cc = raw.check_conf_change(kind, step.node)
        except (ProposalDropped, NotRaftLeader):
            self._driver.touch(group)  # the core may have appended an entry of its term
            return
        except ValueError as exc:
            log.warning("controller voters: %s refused: %s", step.why, exc)
            return
        batch = conf_change_batch(cc)
        index = raw.last_index() + 1
        data = stamped_copy(batch, 0, len(batch), next_offset(raw, group.log), raw.term, index)
        try:
            raw.propose(data, EntryKind.CONFIG)
        except (ProposalDropped, NotRaftLeader):
            return
        log.warning(
            "controller voters: %s (%s node %d proposed at index %d: voters %s)",
            step.why, kind.name, step.node, index, sorted(cc.voters),
        )  # fmt: skip
        self._driver.touch(group)

    def voter_change_now(self) -> str:
        """The controller voter change in progress, for status: the active controller's
        own account, elsewhere what the plan calls for from this node's metadata."""
        if self.is_leader:
            return self.voter_change
        step = plan_controller_voters(
            self.state, self.voter_ids, NONE, int(time.time() * 1000), lambda _n: True
        )
        return "" if step is None else step.why

    def _balance_leaders(self) -> None:
        """Ask leaders to hand over leadership so each node leads about its share, at most
        ``leader.balance.transfers.per.second``."""
        settings = self.state.settings
        now = time.monotonic()
        elapsed, self._balance_at = now - self._balance_at, now
        if not bool_setting(settings, LEADER_BALANCE_ENABLE):
            return
        rate = int_setting(settings, LEADER_BALANCE_TRANSFERS_PER_SECOND)
        self._transfer_tokens = min(float(rate), self._transfer_tokens + rate * elapsed)
        if now - self._liveness_changed_at < leader_balance_settle_ms / 1000:
            return
        if self._liveness_inflight:
            return
        budget = int(self._transfer_tokens)
        if budget < 1:
            return
        cooldown_s = leader_transfer_cooldown_ms / 1000
        for g, at in list(self._transferred_at.items()):
            if now - at > cooldown_s:
                del self._transferred_at[g]
        leaders = {g: node for g, (node, _term) in self._reported.items()}
        transfers = plan_leader_transfers(
            self.state, leaders, budget, frozenset(self._transferred_at)
        )
        for t in transfers:
            self._transfer_tokens -= 1
            self._transferred_at[t.group_id] = now
            log.info(
                "leader balance: group %d from node %d to node %d",
                t.group_id, t.from_node, t.to_node,
            )  # fmt: skip
            if t.from_node == self.node_id:
                self._run_transfers([(t.group_id, t.to_node)])
            else:
                self._transfers_out.setdefault(t.from_node, []).append((t.group_id, t.to_node))


class ClusterService(cluster_pb2_grpc.ClusterServicer):
    """The internal Cluster service: forwarding, heartbeats, log digests."""

    def __init__(
        self,
        controller: Controller,
        digest: Callable[[cluster_pb2.LogDigestRequest], Awaitable[cluster_pb2.LogDigestResponse]],
        metrics: object,
        auth: InternalAuth | None = None,
        catchup_read: Callable[
            [cluster_pb2.CatchupReadRequest], AsyncIterator[cluster_pb2.CatchupChunk]
        ]
        | None = None,
        recover: Callable[[cluster_pb2.RecoverReplicaRequest], cluster_pb2.RecoverReplicaResponse]
        | None = None,
    ) -> None:
        self.controller = controller
        self._recover = recover
        self._digest = digest
        self._catchup_read = catchup_read
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
            transfers = c.on_heartbeat(
                request.node_id,
                [(r.group, r.term) for r in request.leading],
                {
                    r.group: (frozenset(r.voters), frozenset(r.learners))
                    for r in request.leading
                    if r.has_conf
                },
            )
        except TidelogError as err:
            await _abort(context, err)
        return cluster_pb2.HeartbeatAck(
            controller_id=c.node_id,
            transfers=[cluster_pb2.LeaderTransfer(group=g, to=to) for g, to in transfers],
        )

    async def LogDigest(
        self, request: cluster_pb2.LogDigestRequest, context: aio.ServicerContext[object, object]
    ) -> cluster_pb2.LogDigestResponse:
        try:
            self.auth.peer_id(context, LOG_DIGEST)
            return await self._digest(request)
        except TidelogError as err:
            await _abort(context, err)
        raise AssertionError("unreachable")

    async def CatchupRead(
        self, request: cluster_pb2.CatchupReadRequest, context: aio.ServicerContext[object, object]
    ) -> AsyncIterator[cluster_pb2.CatchupChunk]:
        """A catch-up copy's chunks (node/catchup.py), to an authenticated node."""
        c = self.controller
        try:
            peer = self.auth.peer_id(context, CATCHUP_READ)
            self.auth.check_sender(peer, request.from_node, "a catch-up read")
            if request.cluster_id != c.cluster_id:
                raise InvalidRequest(
                    f"catch-up read of node {request.from_node} of cluster "
                    f"{request.cluster_id!r} reached a node of cluster {c.cluster_id!r}"
                )
            if self._catchup_read is None:
                raise InvalidRequest("this node does not serve catch-up copies")
            async for chunk in self._catchup_read(request):
                yield chunk
        except TidelogError as err:
            await _abort(context, err)

    async def RecoverReplica(
        self,
        request: cluster_pb2.RecoverReplicaRequest,
        context: aio.ServicerContext[object, object],
    ) -> cluster_pb2.RecoverReplicaResponse:
        """Force-recover (node/recovery.py): only the active controller may ask."""
        from tidelog.node.recovery import recover_replica_method

        c = self.controller
        try:
            peer = self.auth.peer_id(context, recover_replica_method())
            self.auth.check_sender(peer, request.from_node, "a replica recovery")
            if request.cluster_id != c.cluster_id:
                raise InvalidRequest(
                    f"replica recovery from node {request.from_node} of cluster "
                    f"{request.cluster_id!r} reached a node of cluster {c.cluster_id!r}"
                )
            if request.force and request.from_node != c.leader_id:
                raise InvalidRequest(
                    f"node {request.from_node} is not the active controller; only it may "
                    "force a replica's configuration"
                )
            if self._recover is None:
                raise InvalidRequest("this node does not hold partition replicas")
            return self._recover(request)
        except TidelogError as err:
            await _abort(context, err)
        raise AssertionError("unreachable")

    async def RecoverController(
        self,
        request: cluster_pb2.RecoverControllerRequest,
        context: aio.ServicerContext[object, object],
    ) -> cluster_pb2.RecoverControllerResponse:
        """Force-recover of the controller (node/controller_recovery.py): any authenticated
        node may ask, since there is no active controller to."""
        from tidelog.node.controller_recovery import (
            recover_controller_method,
            serve_recover_controller,
        )

        c = self.controller
        try:
            peer = self.auth.peer_id(context, recover_controller_method())
            self.auth.check_sender(peer, request.from_node, "a controller recovery")
            if request.cluster_id != c.cluster_id:
                raise InvalidRequest(
                    f"controller recovery from node {request.from_node} of cluster "
                    f"{request.cluster_id!r} reached a node of cluster {c.cluster_id!r}"
                )
            return serve_recover_controller(c, request)
        except TidelogError as err:
            await _abort(context, err)
        raise AssertionError("unreachable")

    async def ControllerVoters(
        self,
        request: cluster_pb2.ControllerVotersRequest,
        context: aio.ServicerContext[object, object],
    ) -> cluster_pb2.ControllerVotersResponse:
        try:
            self.auth.peer_id(context, CONTROLLER_VOTERS)
        except TidelogError as err:
            await _abort(context, err)
        c = self.controller
        voters = c.voter_addresses()
        return cluster_pb2.ControllerVotersResponse(
            voters=",".join(f"{i}@{voters[i]}" for i in sorted(voters)),
            cluster_id=c.cluster_id,
            fresh=c.fresh,
        )


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
