"""The cluster metadata state machine: what the controller's Raft group (group 0) replicates.

Every node applies the same committed commands in the same order and so holds the same
``ClusterState``: nodes and their liveness, topics, their config overrides and partition
assignments, and leader hints. ``apply`` is deterministic (no clock, no randomness, no
iteration over unordered containers where order shows) and validates before it changes
anything: a rejected command yields an error result and leaves the metadata untouched,
identically everywhere. Raising is reserved for a driver's mistake (indexes not increasing).

Two counters: ``applied_index`` is the index of the last command applied (accepted or
rejected: the driver's progress); ``version`` is the index of the last command that changed
the metadata, so a Metadata answer can tell a client whether anything changed.

Partition Raft groups get stable ids ``topic_id * GROUP_ID_STRIDE + partition``; the topic id
is the index of the command that created the topic, so a topic deleted and created again
under the same name gets new groups, and stale replicas or messages of the old incarnation
cannot be mistaken for the new one. Group 0 is the controller.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

import crc32c

from tidelog.config import (
    PARTITIONS_MAX,
    TOPIC_CONFIG_KEYS,
    TopicConfig,
    effective_configs,
    validate_partitions,
    validate_topic_configs,
    validate_topic_name,
)
from tidelog.controller.commands import (
    LEADER_HINTS_MAX,
    NODE_ACTIVE,
    NODE_DRAINING,
    NODE_STATES,
    PRODUCER_ID_BLOCK_MAX,
    AddPartitions,
    AllocateProducerIds,
    AlterTopicConfig,
    Command,
    CreateTopic,
    DeleteTopic,
    ForceRecoverPartition,
    MarkNodeAlive,
    MarkNodeDead,
    MovePartitions,
    RegisterNode,
    RemoveNode,
    SetClusterConfig,
    SetNodeState,
    UpdatePartitionLeaders,
    UpdatePartitionReplicas,
    decode_command,
)
from tidelog.controller.placement import NodeInfo, assign_replicas
from tidelog.controller.recovery import check_command, recovered_assignment
from tidelog.controller.settings import (
    ALL_KEYS,
    check_known,
    topic_defaults,
    validate_cluster_settings,
)
from tidelog.errors import (
    InvalidConfig,
    InvalidPartitions,
    InvalidReplicationFactor,
    InvalidRequest,
    NodeIdentityConflict,
    StorageError,
    TidelogError,
    TopicExists,
    UnknownPartition,
    UnknownTopic,
    excerpt,
)

#: The Raft group of the controller itself.
CONTROLLER_GROUP_ID = 0
#: Group ids reserved per topic: one per possible partition.
GROUP_ID_STRIDE = PARTITIONS_MAX
#: Group ids travel as signed 64-bit integers.
GROUP_ID_MAX = 2**63 - 1
#: Node ids travel as int32 in the protos; 0 means "no node" (as in the Raft core).
NODE_ID_MAX = 2**31 - 1
ADDRESS_LENGTH_MAX = 255
RACK_LENGTH_MAX = 255
DIRECTORY_ID_LENGTH_MAX = 64
#: Raft terms travel as int64 (Metadata's leader_term): a larger one is malformed.
TERM_MAX = 2**63 - 1
#: "No leader known" in leader hints.
NO_LEADER = 0
_NO_DEFAULTS: Mapping[str, str] = MappingProxyType({})

_SNAPSHOT_MAGIC = b"TLCS"
_SNAPSHOT_FORMAT = 1
# magic, format, CRC-32C of the body
_SNAPSHOT_HEADER = struct.Struct(">4sBI")

assert GROUP_ID_STRIDE >= PARTITIONS_MAX, "partitions of two topics would share group ids"
assert CONTROLLER_GROUP_ID < GROUP_ID_STRIDE, "topic ids start at 1, above the controller"


def group_id_for(topic_id: int, partition: int) -> int:
    """The Raft group id of a partition: unique across topics and incarnations, never 0."""
    if topic_id < 1 or not 0 <= partition < GROUP_ID_STRIDE:
        raise ValueError(f"no group id for topic id {topic_id}, partition {partition}")
    group_id = topic_id * GROUP_ID_STRIDE + partition
    if group_id > GROUP_ID_MAX:
        raise ValueError(f"group id of topic id {topic_id} exceeds {GROUP_ID_MAX}")
    return group_id


def split_group_id(group_id: int) -> tuple[int, int]:
    """(topic_id, partition) of a partition group id; the inverse of ``group_id_for``."""
    if group_id < GROUP_ID_STRIDE:
        raise ValueError(f"group id {group_id} is not a partition group")
    return divmod(group_id, GROUP_ID_STRIDE)


@dataclass(frozen=True, slots=True)
class NodeRecord:
    node_id: int
    address: str
    metrics_address: str
    rack: str | None
    alive: bool
    registered_at_index: int
    #: The identity of the node's data directory (RegisterNode.directory_id); "" for a node
    #: registered before identities existed. Never reported by any API: presenting it is
    #: how a node proves it is the one registered.
    directory_id: str = ""
    #: Where the other nodes reach its internal listener ("": its client address).
    internal_address: str = ""
    #: ``NODE_ACTIVE`` or ``NODE_DRAINING`` (SetNodeState).
    state: str = NODE_ACTIVE
    #: When it was marked dead (the proposer's Unix ms; 0: alive, or not known).
    dead_since_ms: int = 0

    @property
    def active(self) -> bool:
        """Alive and not draining: may take new replicas."""
        return self.alive and self.state == NODE_ACTIVE


@dataclass(frozen=True, slots=True)
class PartitionAssignment:
    """A partition's replicas and its Raft group. ``leader`` and ``leader_term`` are the last
    leader observed (a hint for Metadata answers; ``NO_LEADER`` when unknown)."""

    partition: int
    #: The voters of the group as last reported by its leader (as placed, before that).
    replicas: tuple[int, ...]
    preferred_leader: int
    group_id: int
    leader: int = NO_LEADER
    leader_term: int = 0
    #: The replicas a move in progress ends with (preferred leader first); None: no move.
    target: tuple[int, ...] | None = None
    #: The term of the leader whose report ``replicas`` last followed (older ones are stale).
    conf_term: int = 0

    @property
    def hosts(self) -> frozenset[int]:
        """Every node that must hold a replica: the replicas and the move's target."""
        return frozenset(self.replicas) | frozenset(self.target or ())

    @property
    def moving(self) -> bool:
        return self.target is not None


@dataclass(frozen=True, slots=True)
class ProducerIdBlock:
    """The producer ids ``[start, start + count)`` given to a node by the command at ``index``
    (the node serves InitProducerId from them; no other node gets any of them)."""

    start: int
    count: int
    index: int


#: Producer ids are int64; the last one is never handed out.
PRODUCER_ID_MAX = 2**63 - 1


@dataclass(frozen=True, slots=True)
class TopicRecord:
    name: str
    #: The index of the command that created the topic.
    topic_id: int
    replication_factor: int
    #: Overrides only; ``effective_configs`` adds the defaults.
    configs: Mapping[str, str]
    partitions: tuple[PartitionAssignment, ...]
    #: The cluster's topic defaults (SetClusterConfig), below the topic's own overrides.
    cluster_defaults: Mapping[str, str] = field(default_factory=lambda: _NO_DEFAULTS)

    def effective_configs(self) -> dict[str, str]:
        return effective_configs({**self.cluster_defaults, **self.configs})

    def config(self) -> TopicConfig:
        return TopicConfig.from_overrides({**self.cluster_defaults, **self.configs})


@dataclass(frozen=True, slots=True)
class ApplyResult:
    """The outcome of one command, the same on every node.

    ``changed``: the metadata changed (``version`` is now ``index``). ``topic``: the topic as
    it stands after a CreateTopic or AlterTopicConfig, for the admin answer.
    """

    index: int
    error: TidelogError | None = None
    changed: bool = False
    topic: TopicRecord | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def raise_for_error(self) -> ApplyResult:
        if self.error is not None:
            raise self.error
        return self


class CorruptSnapshot(StorageError):
    """Snapshot bytes that fail their checksum or do not describe a consistent state."""


def _in_topic(name: str, err: TidelogError) -> TidelogError:
    return type(err)(f"topic {excerpt(name)}: {err.message}", **err.metadata)


def _unknown_topic(name: str) -> UnknownTopic:
    return UnknownTopic(f"unknown topic {excerpt(name)}: create it first (tidelog topic create)")


class ClusterState:
    """Nodes, topics and assignments as of ``applied_index``; mutated only by ``apply`` and
    ``restore``. Records handed out are immutable and stay valid after later changes."""

    def __init__(self) -> None:
        self._applied_index = 0
        self._version = 0
        self._nodes: dict[int, NodeRecord] = {}
        self._topics: dict[str, TopicRecord] = {}
        self._topic_by_id: dict[int, str] = {}
        self._by_node: dict[int, set[tuple[str, int]]] = {}
        self._next_producer_id = 0
        self._producer_blocks: dict[int, ProducerIdBlock] = {}
        self._settings: dict[str, str] = {}

    @classmethod
    def from_snapshot(cls, data: bytes) -> ClusterState:
        state = cls()
        state.restore(data)
        return state

    # -- reads ---------------------------------------------------------------------------

    @property
    def applied_index(self) -> int:
        return self._applied_index

    @property
    def next_producer_id(self) -> int:
        """The first producer id no node has been given."""
        return self._next_producer_id

    def producer_id_block(self, node_id: int) -> ProducerIdBlock | None:
        """The last block of producer ids given to ``node_id``."""
        return self._producer_blocks.get(node_id)

    @property
    def version(self) -> int:
        return self._version

    @property
    def nodes(self) -> Mapping[int, NodeRecord]:
        return MappingProxyType(self._nodes)

    @property
    def topics(self) -> Mapping[str, TopicRecord]:
        return MappingProxyType(self._topics)

    def live_node_ids(self) -> list[int]:
        return sorted(i for i, n in self._nodes.items() if n.alive)

    def active_node_ids(self) -> list[int]:
        """Alive and not draining: the nodes new replicas go to."""
        return sorted(i for i, n in self._nodes.items() if n.active)

    @property
    def settings(self) -> Mapping[str, str]:
        """The cluster settings set (controller/settings.py); unset keys take defaults."""
        return MappingProxyType(self._settings)

    def assignments(self) -> list[tuple[str, PartitionAssignment]]:
        """Every partition, by topic name then partition."""
        return [(name, p) for name in sorted(self._topics) for p in self._topics[name].partitions]

    def leader_counts(self) -> dict[int, int]:
        """Partitions each registered node leads, by the leader hints (0 included)."""
        counts = dict.fromkeys(sorted(self._nodes), 0)
        for topic in self._topics.values():
            for p in topic.partitions:
                if p.leader in counts:
                    counts[p.leader] += 1
        return counts

    def topic(self, name: str) -> TopicRecord:
        record = self._topics.get(name)
        if record is None:
            raise _unknown_topic(name)
        return record

    def partition(self, topic: str, partition: int) -> PartitionAssignment:
        record = self.topic(topic)
        if not 0 <= partition < len(record.partitions):
            raise UnknownPartition(
                f"topic {excerpt(topic)} has no partition {partition}; its partitions are "
                f"0..{len(record.partitions) - 1}"
            )
        return record.partitions[partition]

    def partition_group_id(self, topic: str, partition: int) -> int:
        return self.partition(topic, partition).group_id

    def locate_group(self, group_id: int) -> tuple[str, int] | None:
        """The (topic, partition) a group id belongs to now; None for the controller group
        and for groups of deleted topics."""
        if group_id < GROUP_ID_STRIDE:
            return None
        topic_id, partition = split_group_id(group_id)
        name = self._topic_by_id.get(topic_id)
        if name is None or partition >= len(self._topics[name].partitions):
            return None
        return name, partition

    def replicas_on(self, node_id: int) -> frozenset[tuple[str, int]]:
        """The (topic, partition) pairs with a replica on the node: what it must host."""
        return frozenset(self._by_node.get(node_id, ()))

    def replica_counts(self) -> dict[int, int]:
        """Replicas per registered node (0 included)."""
        return {i: len(self._by_node.get(i, ())) for i in sorted(self._nodes)}

    def preferred_leader_counts(self) -> dict[int, int]:
        counts = dict.fromkeys(sorted(self._nodes), 0)
        for topic in self._topics.values():
            for p in topic.partitions:
                counts[p.preferred_leader] = counts.get(p.preferred_leader, 0) + 1
        return counts

    def describe(self) -> dict[str, Any]:
        """Everything, as plain JSON-ready data in a stable order (for status and debugging)."""
        return {
            "applied_index": self._applied_index,
            "version": self._version,
            "nodes": [
                {
                    "node_id": n.node_id,
                    "address": n.address,
                    "metrics_address": n.metrics_address,
                    "internal_address": n.internal_address,
                    "rack": n.rack,
                    "alive": n.alive,
                    "state": n.state,
                    "dead_since_ms": n.dead_since_ms,
                    "registered_at_index": n.registered_at_index,
                    "replicas": len(self._by_node.get(n.node_id, ())),
                }
                for _, n in sorted(self._nodes.items())
            ],
            "settings": dict(sorted(self._settings.items())),
            "topics": [
                {
                    "name": t.name,
                    "topic_id": t.topic_id,
                    "replication_factor": t.replication_factor,
                    "configs": dict(t.configs),
                    "partitions": [
                        {
                            "partition": p.partition,
                            "group_id": p.group_id,
                            "replicas": list(p.replicas),
                            "preferred_leader": p.preferred_leader,
                            "leader": p.leader,
                            "leader_term": p.leader_term,
                            "target": None if p.target is None else list(p.target),
                        }
                        for p in t.partitions
                    ],
                }
                for _, t in sorted(self._topics.items())
            ],
        }

    # -- proposing -----------------------------------------------------------------------

    def prepare_create_topic(
        self,
        name: str,
        partitions: int,
        replication_factor: int,
        configs: Mapping[str, str] | None = None,
    ) -> CreateTopic:
        """The CreateTopic the active controller should propose: validated against this state
        (raising what ``apply`` would reject it with) and placed over the live nodes, the
        load of the existing topics taken into account."""
        configs = dict(configs or {})
        self._check_topic_spec(name, partitions, replication_factor, configs)
        live = [self._nodes[i] for i in self.active_node_ids()]
        loads = self.replica_counts()
        leads = self.preferred_leader_counts()
        assignments = assign_replicas(
            partitions,
            replication_factor,
            [NodeInfo(n.node_id, n.rack) for n in live],
            existing_load={n.node_id: loads[n.node_id] for n in live},
            existing_leaders={n.node_id: leads[n.node_id] for n in live},
        )
        command = CreateTopic(name, partitions, replication_factor, configs, assignments)
        self.check(command)
        return command

    def prepare_add_partitions(self, name: str, total: int) -> AddPartitions:
        """The AddPartitions that grows ``name`` to ``total`` partitions, placed over the
        live nodes with the load of every topic taken into account (as a new topic's)."""
        record = self.topic(name)
        have = len(record.partitions)
        if record.config().compacted:
            self._check_add_partitions(AddPartitions(name, [()]))
        if total <= have:
            raise InvalidPartitions(
                f"topic {name!r} has {have} partitions; a topic only grows, so give a count "
                f"above {have} (got {total})"
            )
        try:
            validate_partitions(total)
        except TidelogError as err:
            raise _in_topic(name, err) from None
        live = [self._nodes[i] for i in self.live_node_ids()]
        rf = record.replication_factor
        if rf > len(live):
            raise InvalidReplicationFactor(
                f"topic {name!r}: its replication factor {rf} is larger than the {len(live)} "
                f"live nodes {[n.node_id for n in live]}; start more nodes first"
            )
        loads = self.replica_counts()
        leads = self.preferred_leader_counts()
        assignments = assign_replicas(
            total - have,
            rf,
            [NodeInfo(n.node_id, n.rack) for n in live],
            existing_load={n.node_id: loads[n.node_id] for n in live},
            existing_leaders={n.node_id: leads[n.node_id] for n in live},
            seed_offset=have,
        )
        command = AddPartitions(name, assignments)
        self.check(command)
        return command

    def check(self, command: Command) -> None:
        """Raise the error ``apply`` would reject the command with now; change nothing."""
        match command:
            case RegisterNode():
                self._check_register(command)
            case MarkNodeDead() | MarkNodeAlive():
                self._check_known_node(command.node_id)
            case CreateTopic():
                self._check_create(command)
            case DeleteTopic():
                self.topic(command.name)
            case AlterTopicConfig():
                self._check_alter(command)
            case UpdatePartitionLeaders():
                self._check_hints(command)
            case AllocateProducerIds():
                self._check_allocate(command)
            case AddPartitions():
                self._check_add_partitions(command)
            case SetNodeState():
                self._check_set_state(command)
            case RemoveNode():
                self._check_remove(command)
            case MovePartitions():
                self._check_moves(command)
            case UpdatePartitionReplicas():
                self._check_reports(command)
            case SetClusterConfig():
                self._check_settings(command)
            case ForceRecoverPartition():
                self._check_force_recover(command)
            case _:
                raise TypeError(f"not a controller command: {command!r}")

    # -- applying ------------------------------------------------------------------------

    def apply(self, index: int, command: Command) -> ApplyResult:
        """Apply the command committed at ``index``: validate, then change, never half."""
        if index <= self._applied_index:
            raise ValueError(
                f"controller command at index {index} applied after index "
                f"{self._applied_index}: indexes must increase"
            )
        try:
            self.check(command)
        except TidelogError as err:
            result = ApplyResult(index, error=err)
        else:
            result = self._mutate(index, command)
        self._applied_index = index
        if result.changed:
            self._version = index
        return result

    def apply_encoded(self, index: int, data: bytes) -> ApplyResult:
        """``apply`` of an encoded command; CommandDecodeError if the bytes are not one."""
        return self.apply(index, decode_command(data))

    def _mutate(self, index: int, command: Command) -> ApplyResult:
        match command:
            case RegisterNode():
                return self._do_register(index, command)
            case MarkNodeDead():
                return self._do_set_alive(index, command.node_id, alive=False, at=command.at_ms)
            case MarkNodeAlive():
                return self._do_set_alive(index, command.node_id, alive=True)
            case CreateTopic():
                return self._do_create(index, command)
            case DeleteTopic():
                return self._do_delete(index, command)
            case AlterTopicConfig():
                return self._do_alter(index, command)
            case UpdatePartitionLeaders():
                return self._do_hints(index, command)
            case AllocateProducerIds():
                return self._do_allocate(index, command)
            case AddPartitions():
                return self._do_add_partitions(index, command)
            case SetNodeState():
                return self._do_set_state(index, command)
            case RemoveNode():
                return self._do_remove(index, command)
            case MovePartitions():
                return self._do_moves(index, command)
            case UpdatePartitionReplicas():
                return self._do_reports(index, command)
            case SetClusterConfig():
                return self._do_settings(index, command)
            case ForceRecoverPartition():
                return self._do_force_recover(index, command)
        raise TypeError(f"not a controller command: {command!r}")

    # -- nodes -----------------------------------------------------------------------------

    def _check_register(self, c: RegisterNode) -> None:
        if not 1 <= c.node_id <= NODE_ID_MAX:
            raise InvalidRequest(f"node id must be in [1, {NODE_ID_MAX}], got {c.node_id}")
        if not c.address or len(c.address) > ADDRESS_LENGTH_MAX:
            raise InvalidRequest(
                f"node {c.node_id}: address must be 1 to {ADDRESS_LENGTH_MAX} characters, "
                f"got {c.address!r}"
            )
        if len(c.internal_address) > ADDRESS_LENGTH_MAX:
            raise InvalidRequest(
                f"node {c.node_id}: internal address is longer than {ADDRESS_LENGTH_MAX} characters"
            )
        if len(c.metrics_address) > ADDRESS_LENGTH_MAX:
            raise InvalidRequest(
                f"node {c.node_id}: metrics address is longer than {ADDRESS_LENGTH_MAX} characters"
            )
        if c.rack is not None and not 1 <= len(c.rack) <= RACK_LENGTH_MAX:
            raise InvalidRequest(
                f"node {c.node_id}: rack must be 1 to {RACK_LENGTH_MAX} characters "
                f"(or absent), got {c.rack!r}"
            )
        if len(c.directory_id) > DIRECTORY_ID_LENGTH_MAX:
            raise InvalidRequest(
                f"node {c.node_id}: directory id is longer than {DIRECTORY_ID_LENGTH_MAX} "
                "characters"
            )
        old = self._nodes.get(c.node_id)
        if old is None or not old.directory_id or c.directory_id == old.directory_id:
            # A new node, the same data directory (maybe moved to a new address), or a node
            # registered before directory ids existed.
            return
        # Another data directory claims a registered node id: only a wiped or replaced disk
        # at the very same address, once the old incarnation is known to be gone, is the
        # same node. Anything else is a second node (or a forger) taking over the id, and
        # the other nodes would replicate to it.
        if c.address != old.address:
            raise NodeIdentityConflict(
                f"node {c.node_id} is registered at {old.address} with another data directory; "
                f"a registration from {c.address} must come from that data directory (start "
                f"the node from it) or use a new node id"
            )
        if old.alive:
            raise NodeIdentityConflict(
                f"node {c.node_id} at {c.address} is alive with another data directory; a new "
                "data directory is accepted once the old one is marked dead (node.dead.ms "
                "without heartbeats)"
            )

    def _check_known_node(self, node_id: int) -> None:
        if node_id not in self._nodes:
            raise InvalidRequest(
                f"node {node_id} is not registered; registered nodes: {sorted(self._nodes)}"
            )

    def _do_register(self, index: int, c: RegisterNode) -> ApplyResult:
        old = self._nodes.get(c.node_id)
        new = NodeRecord(
            node_id=c.node_id,
            address=c.address,
            metrics_address=c.metrics_address,
            rack=c.rack,
            alive=True,
            registered_at_index=old.registered_at_index if old is not None else index,
            directory_id=c.directory_id or (old.directory_id if old is not None else ""),
            internal_address=c.internal_address,
            state=old.state if old is not None else NODE_ACTIVE,
        )
        if new == old:
            return ApplyResult(index)
        self._nodes[c.node_id] = new
        return ApplyResult(index, changed=True)

    def _do_set_alive(self, index: int, node_id: int, *, alive: bool, at: int = 0) -> ApplyResult:
        old = self._nodes[node_id]
        if old.alive == alive:
            return ApplyResult(index)
        self._nodes[node_id] = replace(old, alive=alive, dead_since_ms=0 if alive else at)
        if not alive:
            # A hint naming a dead node is known to be wrong; the partition's group elects
            # another leader, which a later hint (of a higher term) records.
            cleared: dict[str, dict[int, tuple[int, int]]] = {}
            for topic, p in self._by_node.get(node_id, ()):
                current = self._topics[topic].partitions[p]
                if current.leader == node_id:
                    cleared.setdefault(topic, {})[p] = (NO_LEADER, current.leader_term)
            self._set_leaders(cleared)
        return ApplyResult(index, changed=True)

    # -- topics ----------------------------------------------------------------------------

    def _check_topic_spec(
        self, name: str, partitions: int, replication_factor: int, configs: Mapping[str, str]
    ) -> None:
        validate_topic_name(name)
        if name in self._topics:
            raise TopicExists(f"topic {name!r} already exists")
        try:
            validate_partitions(partitions)
            if replication_factor < 1:
                raise InvalidReplicationFactor(
                    f"replication factor must be at least 1, got {replication_factor}"
                )
            validate_topic_configs(configs)
        except TidelogError as err:
            raise _in_topic(name, err) from None
        live = self.live_node_ids()
        if replication_factor > len(live):
            raise InvalidReplicationFactor(
                f"topic {name!r}: replication factor {replication_factor} is larger than the "
                f"{len(live)} live nodes {live}; lower it or start more nodes"
            )

    def _check_create(self, c: CreateTopic) -> None:
        self._check_topic_spec(c.name, c.partitions, c.replication_factor, c.configs)
        if len(c.assignments) != c.partitions:
            raise InvalidRequest(
                f"topic {c.name!r}: {len(c.assignments)} assignments for {c.partitions} partitions"
            )
        for p, replicas in enumerate(c.assignments):
            if len(replicas) != c.replication_factor or len(set(replicas)) != len(replicas):
                raise InvalidRequest(
                    f"topic {c.name!r} partition {p}: replicas {list(replicas)} are not "
                    f"{c.replication_factor} distinct nodes"
                )
            for node_id in replicas:
                node = self._nodes.get(node_id)
                if node is None or not node.alive:
                    raise InvalidRequest(
                        f"topic {c.name!r} partition {p}: replica node {node_id} is "
                        f"{'not registered' if node is None else 'dead'}; live nodes are "
                        f"{self.live_node_ids()}"
                    )

    def _do_create(self, index: int, c: CreateTopic) -> ApplyResult:
        group_id_for(index, c.partitions - 1)  # raises before anything changes if too large
        record = TopicRecord(
            name=c.name,
            topic_id=index,
            replication_factor=c.replication_factor,
            configs=MappingProxyType(dict(c.configs)),
            partitions=tuple(
                PartitionAssignment(
                    partition=p,
                    replicas=tuple(replicas),
                    preferred_leader=replicas[0],
                    group_id=group_id_for(index, p),
                )
                for p, replicas in enumerate(c.assignments)
            ),
        )
        self._add_topic(record)
        return ApplyResult(index, changed=True, topic=record)

    def _do_delete(self, index: int, c: DeleteTopic) -> ApplyResult:
        record = self._topics.pop(c.name)
        del self._topic_by_id[record.topic_id]
        for p in record.partitions:
            for node_id in p.hosts:
                hosted = self._by_node[node_id]
                hosted.discard((record.name, p.partition))
                if not hosted:
                    del self._by_node[node_id]
        return ApplyResult(index, changed=True)

    def _check_alter(self, c: AlterTopicConfig) -> None:
        self.topic(c.name)
        both = sorted(set(c.set) & set(c.delete))
        if both:
            raise InvalidRequest(f"topic {c.name!r}: configs {both} are both set and deleted")
        try:
            validate_topic_configs(c.set)
        except TidelogError as err:
            raise _in_topic(c.name, err) from None
        unknown = sorted(k for k in c.delete if k not in TOPIC_CONFIG_KEYS)
        if unknown:
            raise InvalidConfig(
                f"topic {c.name!r}: cannot delete unknown configs {unknown}; known keys: "
                f"{', '.join(sorted(TOPIC_CONFIG_KEYS))}"
            )

    def _do_alter(self, index: int, c: AlterTopicConfig) -> ApplyResult:
        record = self._topics[c.name]
        configs = dict(record.configs)
        configs.update(c.set)
        for key in c.delete:
            configs.pop(key, None)
        if configs == dict(record.configs):
            return ApplyResult(index, topic=record)
        new = replace(record, configs=MappingProxyType(dict(sorted(configs.items()))))
        self._topics[c.name] = new
        return ApplyResult(index, changed=True, topic=new)

    def _check_add_partitions(self, c: AddPartitions) -> None:
        record = self.topic(c.name)
        if record.config().compacted:
            raise InvalidPartitions(
                f"topic {c.name!r} is compacted (cleanup.policy="
                f"{record.effective_configs()['cleanup.policy']}): more partitions would send "
                "its keys to other partitions than their current values, and reads by key "
                "would miss them; create a new topic with the partitions wanted instead"
            )
        total = len(record.partitions) + len(c.assignments)
        if not c.assignments:
            raise InvalidPartitions(f"topic {c.name!r}: adding partitions needs at least one")
        try:
            validate_partitions(total)
            group_id_for(record.topic_id, total - 1)
        except TidelogError as err:
            raise _in_topic(c.name, err) from None
        except ValueError as err:
            raise InvalidPartitions(f"topic {c.name!r}: {err}") from None
        rf = record.replication_factor
        for i, replicas in enumerate(c.assignments):
            p = len(record.partitions) + i
            if len(replicas) != rf or len(set(replicas)) != len(replicas):
                raise InvalidRequest(
                    f"topic {c.name!r} partition {p}: replicas {list(replicas)} are not "
                    f"{rf} distinct nodes"
                )
            for node_id in replicas:
                node = self._nodes.get(node_id)
                if node is None or not node.alive:
                    raise InvalidRequest(
                        f"topic {c.name!r} partition {p}: replica node {node_id} is "
                        f"{'not registered' if node is None else 'dead'}; live nodes are "
                        f"{self.live_node_ids()}"
                    )

    def _do_add_partitions(self, index: int, c: AddPartitions) -> ApplyResult:
        record = self._topics[c.name]
        first = len(record.partitions)
        added = tuple(
            PartitionAssignment(
                partition=first + i,
                replicas=tuple(replicas),
                preferred_leader=replicas[0],
                group_id=group_id_for(record.topic_id, first + i),
            )
            for i, replicas in enumerate(c.assignments)
        )
        new = replace(record, partitions=record.partitions + added)
        self._topics[c.name] = new
        for p in added:
            for node_id in p.replicas:
                self._by_node.setdefault(node_id, set()).add((new.name, p.partition))
        return ApplyResult(index, changed=True, topic=new)

    # -- node states, moves, settings --------------------------------------------------------

    def _check_set_state(self, c: SetNodeState) -> None:
        self._check_known_node(c.node_id)
        if c.state not in NODE_STATES:
            raise InvalidRequest(
                f"node state must be one of {', '.join(NODE_STATES)}, got {c.state!r}"
            )
        if c.state == NODE_DRAINING:
            stuck = self.unplaceable_without(c.node_id)
            if stuck:
                topic, p = stuck[0]
                raise InvalidReplicationFactor(
                    f"cannot drain node {c.node_id}: no other live, active node can take its "
                    f"replica of {topic}/{p} (every such node already holds one); "
                    f"{len(stuck)} replica{'s' if len(stuck) != 1 else ''} would have nowhere "
                    "to go: add a node first"
                )

    def unplaceable_without(self, node_id: int) -> list[tuple[str, int]]:
        """The partitions on ``node_id`` that no other alive, active node could take (each
        such node already holds a replica of it)."""
        candidates = {i for i in self.active_node_ids() if i != node_id}
        out = []
        for topic, p in sorted(self._by_node.get(node_id, ())):
            a = self._topics[topic].partitions[p]
            if not candidates - a.hosts:
                out.append((topic, p))
        return out

    def _do_set_state(self, index: int, c: SetNodeState) -> ApplyResult:
        old = self._nodes[c.node_id]
        if old.state == c.state:
            return ApplyResult(index)
        self._nodes[c.node_id] = replace(old, state=c.state)
        return ApplyResult(index, changed=True)

    def _check_remove(self, c: RemoveNode) -> None:
        self._check_known_node(c.node_id)
        node = self._nodes[c.node_id]
        hosted = len(self._by_node.get(c.node_id, ()))
        if hosted:
            raise InvalidRequest(
                f"node {c.node_id} still holds {hosted} replica{'s' if hosted != 1 else ''}: "
                f"drain it first (tidelog cluster drain {c.node_id}) and remove it once it "
                "holds none"
            )
        if node.alive and node.state != NODE_DRAINING:
            raise InvalidRequest(
                f"node {c.node_id} is alive and active: drain it (tidelog cluster drain "
                f"{c.node_id}) or stop it before removing it"
            )

    def _do_remove(self, index: int, c: RemoveNode) -> ApplyResult:
        del self._nodes[c.node_id]
        self._producer_blocks.pop(c.node_id, None)
        return ApplyResult(index, changed=True)

    def _check_moves(self, c: MovePartitions) -> None:
        if not c.moves:
            raise InvalidRequest("a move of no partition")
        seen: set[int] = set()
        for m in c.moves:
            located = self.locate_group(m.group_id)
            if located is None:
                raise UnknownPartition(f"no partition has Raft group {m.group_id} (deleted?)")
            if m.group_id in seen:
                raise InvalidRequest(f"partition group {m.group_id} is moved twice in one command")
            seen.add(m.group_id)
            topic, p = located
            record = self._topics[topic]
            a = record.partitions[p]
            where = f"{topic}/{p}"
            if not m.target:
                if a.target is None:
                    raise InvalidRequest(f"{where}: no move is in progress to cancel")
                continue
            self.check_target(where, record, a, m.target)

    def check_target(
        self, where: str, record: TopicRecord, a: PartitionAssignment, target: tuple[int, ...]
    ) -> None:
        """Raise unless ``target`` is a replica set partition ``a`` may move to now."""
        rf = record.replication_factor
        if len(target) != rf or len(set(target)) != len(target):
            raise InvalidReplicationFactor(
                f"{where}: the new replicas {list(target)} must be {rf} distinct nodes "
                f"(the topic's replication factor)"
            )
        for node_id in target:
            node = self._nodes.get(node_id)
            if node is None:
                raise InvalidRequest(
                    f"{where}: node {node_id} is not registered; registered nodes: "
                    f"{sorted(self._nodes)}"
                )
            if node_id in a.replicas:
                continue
            if not node.alive:
                raise InvalidRequest(f"{where}: node {node_id} is dead; it cannot take a replica")
            if node.state != NODE_ACTIVE:
                raise InvalidRequest(
                    f"{where}: node {node_id} is {node.state}; it cannot take a new replica"
                )

    def _do_moves(self, index: int, c: MovePartitions) -> ApplyResult:
        changed = False
        for m in c.moves:
            located = self.locate_group(m.group_id)
            assert located is not None
            topic, p = located
            a = self._topics[topic].partitions[p]
            rf = self._topics[topic].replication_factor
            target: tuple[int, ...] | None
            if m.target:
                target = m.target
            elif len(a.replicas) > rf:
                # Cancelled half way (a new voter promoted, the old one not yet removed):
                # back to the first RF, the replicas the move started from come first.
                target = a.replicas[:rf]
            else:
                target = None
            if target is not None and set(target) == set(a.replicas):
                # The same nodes (maybe another preferred leader): nothing to move.
                new = replace(a, replicas=tuple(target), preferred_leader=target[0], target=None)
            else:
                new = replace(a, target=target)
            if new != a:
                self._replace_partition(topic, new)
                changed = True
        return ApplyResult(index, changed=changed)

    def _check_reports(self, c: UpdatePartitionReplicas) -> None:
        if len(c.reports) > LEADER_HINTS_MAX:
            raise InvalidRequest(
                f"{len(c.reports)} replica reports in one command; at most {LEADER_HINTS_MAX}"
            )
        for r in c.reports:
            ids = (*r.voters, *r.learners)
            if (
                not 0 <= r.group_id <= GROUP_ID_MAX
                or not 0 <= r.term <= TERM_MAX
                or not all(1 <= i <= NODE_ID_MAX for i in ids)
                or len(set(ids)) != len(ids)
            ):
                raise InvalidRequest(f"malformed replica report {r}")

    def _do_reports(self, index: int, c: UpdatePartitionReplicas) -> ApplyResult:
        """Follow reports that are news; stale ones (an unknown group, an older term, no
        voters, an unregistered voter) are dropped, not errors."""
        changed = False
        for r in c.reports:
            located = self.locate_group(r.group_id)
            if located is None or not r.voters:
                continue
            topic, p = located
            a = self._topics[topic].partitions[p]
            if r.term < a.conf_term or not set(r.voters) <= self._nodes.keys():
                continue
            if not set(r.voters) <= a.hosts:
                # A leader only adds the nodes of the target: voters outside the replicas
                # and the target are no configuration this partition can have (a stale or
                # a forged report).
                continue
            voters = set(r.voters)
            target = a.target
            if target is not None and voters == set(target):
                replicas, target = tuple(target), None
                preferred = replicas[0]
            else:
                replicas = tuple(i for i in a.replicas if i in voters) + tuple(
                    sorted(voters - set(a.replicas))
                )
                preferred = a.preferred_leader if a.preferred_leader in voters else replicas[0]
            leader = a.leader if a.leader in voters else NO_LEADER
            new = replace(
                a,
                replicas=replicas,
                target=target,
                preferred_leader=preferred,
                leader=leader,
                conf_term=r.term,
            )
            if new != a:
                self._replace_partition(topic, new)
                changed = True
        return ApplyResult(index, changed=changed)

    def _check_settings(self, c: SetClusterConfig) -> None:
        both = sorted(set(c.set) & set(c.delete))
        if both:
            raise InvalidRequest(f"cluster settings {both} are both set and unset")
        if not c.set and not c.delete:
            raise InvalidRequest("a cluster config change that sets and unsets nothing")
        validate_cluster_settings(c.set)
        check_known(c.delete)

    def _do_settings(self, index: int, c: SetClusterConfig) -> ApplyResult:
        settings = dict(self._settings)
        settings.update(c.set)
        for key in c.delete:
            settings.pop(key, None)
        if settings == self._settings:
            return ApplyResult(index)
        old_defaults = topic_defaults(self._settings)
        self._settings = dict(sorted(settings.items()))
        defaults = topic_defaults(self._settings)
        if defaults != old_defaults:
            frozen = MappingProxyType(defaults)
            for name, record in list(self._topics.items()):
                self._topics[name] = replace(record, cluster_defaults=frozen)
        return ApplyResult(index, changed=True)

    def _check_force_recover(self, c: ForceRecoverPartition) -> None:
        located = self.locate_group(c.group_id)
        if located is None:
            raise UnknownPartition(f"no partition has Raft group {c.group_id} (deleted?)")
        a = self._topics[located[0]].partitions[located[1]]
        check_command(c, a.replicas, self._nodes)

    def _do_force_recover(self, index: int, c: ForceRecoverPartition) -> ApplyResult:
        """UNSAFE (controller/recovery.py): the survivors become the replicas."""
        located = self.locate_group(c.group_id)
        assert located is not None
        topic, p = located
        a = self._topics[topic].partitions[p]
        new = recovered_assignment(a, c)
        if new == a:
            return ApplyResult(index)
        self._replace_partition(topic, new)
        return ApplyResult(index, changed=True)

    def _add_topic(self, record: TopicRecord) -> None:
        record = replace(record, cluster_defaults=MappingProxyType(topic_defaults(self._settings)))
        self._topics[record.name] = record
        self._topic_by_id[record.topic_id] = record.name
        for p in record.partitions:
            for node_id in p.hosts:
                self._by_node.setdefault(node_id, set()).add((record.name, p.partition))

    def _replace_partition(self, topic: str, new: PartitionAssignment) -> None:
        """Swap one assignment, keeping the replicas-by-node index in step."""
        record = self._topics[topic]
        old = record.partitions[new.partition]
        key = (topic, new.partition)
        for node_id in old.hosts - new.hosts:
            hosted = self._by_node[node_id]
            hosted.discard(key)
            if not hosted:
                del self._by_node[node_id]
        for node_id in new.hosts - old.hosts:
            self._by_node.setdefault(node_id, set()).add(key)
        partitions = list(record.partitions)
        partitions[new.partition] = new
        self._topics[topic] = replace(record, partitions=tuple(partitions))

    # -- producer ids ----------------------------------------------------------------------

    def _check_allocate(self, c: AllocateProducerIds) -> None:
        self._check_known_node(c.node_id)
        if not 1 <= c.count <= PRODUCER_ID_BLOCK_MAX:
            raise InvalidRequest(
                f"a block of producer ids holds 1 to {PRODUCER_ID_BLOCK_MAX} ids, got {c.count}"
            )
        if self._next_producer_id + c.count > PRODUCER_ID_MAX:
            raise InvalidRequest("the cluster has handed out every producer id")

    def _do_allocate(self, index: int, c: AllocateProducerIds) -> ApplyResult:
        start = self._next_producer_id
        self._next_producer_id = start + c.count
        self._producer_blocks[c.node_id] = ProducerIdBlock(start, c.count, index)
        return ApplyResult(index)

    # -- leader hints ----------------------------------------------------------------------

    def _check_hints(self, c: UpdatePartitionLeaders) -> None:
        if len(c.hints) > LEADER_HINTS_MAX:
            raise InvalidRequest(
                f"{len(c.hints)} leader hints in one command; at most {LEADER_HINTS_MAX}"
            )
        for h in c.hints:
            if (
                not 0 <= h.group_id <= GROUP_ID_MAX
                or not 0 <= h.term <= TERM_MAX
                or not 0 <= h.leader <= NODE_ID_MAX
            ):
                raise InvalidRequest(f"malformed leader hint {h}")

    def _do_hints(self, index: int, c: UpdatePartitionLeaders) -> ApplyResult:
        """Record hints that are news: a higher term, or a leader found in a term recorded as
        leaderless. Hints for unknown groups (a deleted topic), naming a node that is not a
        replica or is dead, or from an older term are dropped: they are stale, not errors."""
        updates: dict[str, dict[int, tuple[int, int]]] = {}
        for h in c.hints:
            located = self.locate_group(h.group_id)
            if located is None:
                continue
            topic, p = located
            pending = updates.get(topic, {}).get(p)
            current = self._topics[topic].partitions[p]
            leader, term = pending if pending is not None else (current.leader, current.leader_term)
            if h.leader != NO_LEADER:
                node = self._nodes.get(h.leader)
                if h.leader not in current.replicas or node is None or not node.alive:
                    continue
            newer = h.term > term or (h.term == term and leader == NO_LEADER != h.leader)
            if newer:
                updates.setdefault(topic, {})[p] = (h.leader, h.term)
        changed = self._set_leaders(updates)
        return ApplyResult(index, changed=changed)

    def _set_leaders(self, updates: Mapping[str, Mapping[int, tuple[int, int]]]) -> bool:
        changed = False
        for topic in sorted(updates):
            record = self._topics[topic]
            partitions = list(record.partitions)
            for p, (leader, term) in updates[topic].items():
                old = partitions[p]
                if (old.leader, old.leader_term) != (leader, term):
                    partitions[p] = replace(old, leader=leader, leader_term=term)
                    changed = True
            self._topics[topic] = replace(record, partitions=tuple(partitions))
        return changed

    # -- snapshots -------------------------------------------------------------------------

    def snapshot(self) -> bytes:
        """The whole state as checksummed, canonical bytes (equal states, equal bytes)."""
        body = {
            "applied_index": self._applied_index,
            "version": self._version,
            "nodes": [
                [
                    n.node_id,
                    n.address,
                    n.metrics_address,
                    n.rack,
                    n.alive,
                    n.registered_at_index,
                    n.directory_id,
                    n.internal_address,
                ]
                # Node states only when not the default (rows stay as before otherwise).
                + (
                    []
                    if (n.state, n.dead_since_ms) == (NODE_ACTIVE, 0)
                    else [n.state, n.dead_since_ms]
                )
                for _, n in sorted(self._nodes.items())
            ],
            "topics": [
                {
                    "name": t.name,
                    "topic_id": t.topic_id,
                    "replication_factor": t.replication_factor,
                    "configs": dict(t.configs),
                    "partitions": [
                        [list(p.replicas), p.preferred_leader, p.leader, p.leader_term]
                        # Moves only once the partition had one (rows stay as before).
                        + (
                            []
                            if (p.target, p.conf_term) == (None, 0)
                            else [None if p.target is None else list(p.target), p.conf_term]
                        )
                        for p in t.partitions
                    ],
                }
                for _, t in sorted(self._topics.items())
            ],
            "next_producer_id": self._next_producer_id,
            "producer_id_blocks": [
                [node_id, b.start, b.count, b.index]
                for node_id, b in sorted(self._producer_blocks.items())
            ],
            "settings": dict(self._settings),
        }
        raw = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
        header = _SNAPSHOT_HEADER.pack(_SNAPSHOT_MAGIC, _SNAPSHOT_FORMAT, crc32c.crc32c(raw))
        return header + raw

    def restore(self, data: bytes) -> None:
        """Replace the whole state with a snapshot's; on CorruptSnapshot nothing changes."""
        loaded = _load_snapshot(data)
        self._applied_index = loaded._applied_index
        self._version = loaded._version
        self._nodes = loaded._nodes
        self._topics = loaded._topics
        self._topic_by_id = loaded._topic_by_id
        self._by_node = loaded._by_node
        self._next_producer_id = loaded._next_producer_id
        self._producer_blocks = loaded._producer_blocks
        self._settings = loaded._settings


def _load_snapshot(data: bytes) -> ClusterState:
    if len(data) < _SNAPSHOT_HEADER.size:
        raise CorruptSnapshot(f"controller snapshot is {len(data)} bytes, shorter than its header")
    magic, fmt, crc = _SNAPSHOT_HEADER.unpack_from(data)
    if magic != _SNAPSHOT_MAGIC:
        raise CorruptSnapshot(f"not a controller snapshot (magic {magic!r})")
    if fmt != _SNAPSHOT_FORMAT:
        raise CorruptSnapshot(
            f"controller snapshot format {fmt} is not understood by this node (it reads "
            f"format {_SNAPSHOT_FORMAT}); upgrade this node"
        )
    raw = data[_SNAPSHOT_HEADER.size :]
    if crc32c.crc32c(raw) != crc:
        raise CorruptSnapshot("controller snapshot fails its CRC-32C check")
    try:
        return _build(json.loads(raw))
    except CorruptSnapshot:
        raise
    except (
        ValueError,
        TypeError,
        KeyError,
        IndexError,
        AttributeError,
        RecursionError,
        TidelogError,
    ) as exc:
        raise CorruptSnapshot(f"controller snapshot is inconsistent: {exc!r}") from None


def _int(value: Any) -> int:
    if type(value) is not int:
        raise TypeError(f"expected an integer, got {value!r}")
    return value


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {value!r}")
    return value


def _list(value: Any) -> list[Any]:
    if not isinstance(value, list):
        raise TypeError(f"expected a list, got {value!r}")
    return value


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"expected a boolean, got {value!r}")
    return value


def _str_map(value: Any) -> dict[str, str]:
    if not isinstance(value, dict):
        raise TypeError(f"expected an object, got {value!r}")
    return {_str(k): _str(v) for k, v in value.items()}


def _build(body: Any) -> ClusterState:
    """A state from a decoded snapshot body, checking what ``apply`` guarantees."""
    if not isinstance(body, dict):
        raise TypeError(f"expected an object, got {type(body).__name__}")
    state = ClusterState()
    state._applied_index = _int(body["applied_index"])
    state._version = _int(body["version"])
    if not 0 <= state._version <= state._applied_index:
        raise ValueError(f"version {state._version} after applied index {state._applied_index}")
    for row in _list(body["nodes"]):
        row = _list(row)
        # Snapshots written before directory ids existed have six fields, before the
        # internal listener seven, before node states eight.
        if len(row) not in (6, 7, 8, 10):
            raise ValueError(f"node row has {len(row)} fields")
        node_id, address, metrics_address, rack, alive, registered_at = row[:6]
        directory_id = _str(row[6]) if len(row) >= 7 else ""
        internal_address = _str(row[7]) if len(row) >= 8 else ""
        node_state = _str(row[8]) if len(row) == 10 else NODE_ACTIVE
        dead_since_ms = _int(row[9]) if len(row) == 10 else 0
        if node_state not in NODE_STATES:
            raise ValueError(f"node state {node_state!r}")
        node = NodeRecord(
            node_id=_int(node_id),
            address=_str(address),
            metrics_address=_str(metrics_address),
            rack=None if rack is None else _str(rack),
            alive=_bool(alive),
            registered_at_index=_int(registered_at),
            directory_id=directory_id,
            internal_address=internal_address,
            state=node_state,
            dead_since_ms=dead_since_ms,
        )
        if node.node_id in state._nodes or not 1 <= node.node_id <= NODE_ID_MAX:
            raise ValueError(f"node id {node.node_id} repeated or out of range")
        if not 1 <= node.registered_at_index <= state._applied_index:
            raise ValueError(f"node {node.node_id} registered at {node.registered_at_index}")
        state._nodes[node.node_id] = node
    # Absent from snapshots written before cluster settings existed.
    settings = _str_map(body.get("settings", {}))
    if not set(settings) <= ALL_KEYS:
        raise ValueError(f"unknown cluster settings {sorted(set(settings) - ALL_KEYS)}")
    state._settings = dict(sorted(validate_cluster_settings(settings).items()))
    for t in _list(body["topics"]):
        name = _str(t["name"])
        validate_topic_name(name)
        topic_id = _int(t["topic_id"])
        rf = _int(t["replication_factor"])
        configs = validate_topic_configs(_str_map(t["configs"]))
        if name in state._topics or topic_id in state._topic_by_id:
            raise ValueError(f"topic {name!r} (id {topic_id}) repeated")
        if not 1 <= topic_id <= state._applied_index:
            raise ValueError(f"topic {name!r} id {topic_id} out of range")
        partitions = []
        for p, row in enumerate(_list(t["partitions"])):
            # Rows written before replica moves existed have four fields.
            row = _list(row)
            if len(row) not in (4, 6):
                raise ValueError(f"topic {name!r} partition {p}: row of {len(row)} fields")
            raw_replicas, raw_preferred, raw_leader, raw_term = row[:4]
            replicas = tuple(_int(r) for r in _list(raw_replicas))
            preferred, leader = _int(raw_preferred), _int(raw_leader)
            target = None
            conf_term = 0
            if len(row) == 6:
                target = None if row[4] is None else tuple(_int(r) for r in _list(row[4]))
                conf_term = _int(row[5])
            # A move in progress may hold one replica more (or fewer) than the factor.
            if not replicas or len(set(replicas)) != len(replicas):
                raise ValueError(f"topic {name!r} partition {p}: replicas {replicas} for RF {rf}")
            if target is not None and (len(target) != rf or len(set(target)) != rf):
                raise ValueError(f"topic {name!r} partition {p}: target {target} for RF {rf}")
            if not set(replicas) | set(target or ()) <= state._nodes.keys():
                raise ValueError(f"topic {name!r} partition {p}: unregistered replica")
            if preferred not in replicas or leader not in (*replicas, NO_LEADER):
                raise ValueError(f"topic {name!r} partition {p}: leader outside the replicas")
            partitions.append(
                PartitionAssignment(
                    partition=p,
                    replicas=replicas,
                    preferred_leader=preferred,
                    group_id=group_id_for(topic_id, p),
                    leader=leader,
                    leader_term=_int(raw_term),
                    target=target,
                    conf_term=conf_term,
                )
            )
        validate_partitions(len(partitions))
        state._add_topic(
            TopicRecord(
                name=name,
                topic_id=topic_id,
                replication_factor=rf,
                configs=MappingProxyType(dict(sorted(configs.items()))),
                partitions=tuple(partitions),
            )
        )
    # Absent from snapshots written before producer ids existed.
    state._next_producer_id = _int(body.get("next_producer_id", 0))
    if not 0 <= state._next_producer_id <= PRODUCER_ID_MAX:
        raise ValueError(f"next producer id {state._next_producer_id} out of range")
    for node_id, start, count, at in _list(body.get("producer_id_blocks", [])):
        block = ProducerIdBlock(_int(start), _int(count), _int(at))
        if block.start < 0 or block.start + block.count > state._next_producer_id:
            raise ValueError(f"producer id block {block} of node {node_id} out of range")
        state._producer_blocks[_int(node_id)] = block
    return state
