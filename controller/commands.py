"""The commands of the controller's replicated metadata log, and their encoding.

Every node decodes the same committed bytes and applies them in log order, so the encoding is
deterministic (JSON with sorted keys, no spaces, ASCII only), versioned (``"v"``) and strictly
checked on the way in: a missing, unknown or mistyped field, an unknown command type or a
newer version raises CommandDecodeError rather than applying something half understood.
Meaning (does the topic exist, is the name valid) is checked by ``ClusterState.apply``, which
rejects a command identically on every node.

What is deliberately not a command: heartbeats. The active controller tracks them in memory
and writes only the transitions (MarkNodeDead, MarkNodeAlive). Placement is computed by the
proposer and written into CreateTopic, so applying it involves no choice.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, ClassVar

from tidelog.errors import InvalidRequest

#: The encoding this code writes; it reads this version only.
COMMAND_VERSION = 1
#: Largest encoded command accepted (a 10,000-partition topic with RF 5 takes about 200 KiB).
COMMAND_BYTES_MAX = 16 * 1024 * 1024
#: Leader observations carried by one UpdatePartitionLeaders.
LEADER_HINTS_MAX = 100_000


#: How much of a bad value an error message quotes.
_REPR_CHARS_MAX = 80


class CommandDecodeError(InvalidRequest):
    """Bytes that are not a command this node understands (corrupt, or from a newer version)."""


def _frozen_map(items: Mapping[str, str]) -> Mapping[str, str]:
    return MappingProxyType(dict(sorted(items.items())))


@dataclass(frozen=True, slots=True)
class RegisterNode:
    """A node announces itself (first start or restart, maybe at a new address); it is alive.

    ``directory_id`` is the random identity of the node's data directory
    (``node/identity.py``): a re-registration that changes the address must present the
    recorded one (``ClusterState`` refuses it otherwise). Absent ("") in commands written
    before it existed."""

    TYPE: ClassVar[str] = "register_node"
    node_id: int
    address: str
    metrics_address: str = ""
    rack: str | None = None
    directory_id: str = ""
    #: The node's internal listener (Raft, Cluster); "" for a node registered before the
    #: listeners were split, whose client address served both.
    internal_address: str = ""


@dataclass(frozen=True, slots=True)
class MarkNodeDead:
    """The active controller heard nothing from the node for ``node.dead.ms``.

    ``at_ms``: the proposer's wall clock when it decided (Unix ms; 0 in commands written
    before it existed), from which the reprovisioning deadline is counted. Data of the
    command, so applying it needs no clock."""

    TYPE: ClassVar[str] = "mark_node_dead"
    node_id: int
    at_ms: int = 0


@dataclass(frozen=True, slots=True)
class MarkNodeAlive:
    """A node marked dead heartbeats again (without re-registering)."""

    TYPE: ClassVar[str] = "mark_node_alive"
    node_id: int


@dataclass(frozen=True, slots=True)
class CreateTopic:
    """A new topic with its placement (``assignments[p]``: replicas of partition p, the
    preferred leader first), computed by the proposer with ``assign_replicas``."""

    TYPE: ClassVar[str] = "create_topic"
    name: str
    partitions: int
    replication_factor: int
    configs: Mapping[str, str]
    assignments: Sequence[tuple[int, ...]]

    def __post_init__(self) -> None:
        object.__setattr__(self, "configs", _frozen_map(self.configs))
        object.__setattr__(self, "assignments", tuple(tuple(r) for r in self.assignments))


@dataclass(frozen=True, slots=True)
class DeleteTopic:
    TYPE: ClassVar[str] = "delete_topic"
    name: str


@dataclass(frozen=True, slots=True)
class AlterTopicConfig:
    """Set some overrides and delete others (the node default applies again)."""

    TYPE: ClassVar[str] = "alter_topic_config"
    name: str
    set: Mapping[str, str]
    delete: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "set", _frozen_map(self.set))
        object.__setattr__(self, "delete", tuple(self.delete))


@dataclass(frozen=True, slots=True)
class AddPartitions:
    """Grow a topic by ``len(assignments)`` partitions (the new ones, in order; each its
    replicas with the preferred leader first), placed by the proposer."""

    TYPE: ClassVar[str] = "add_partitions"
    name: str
    assignments: Sequence[tuple[int, ...]]

    def __post_init__(self) -> None:
        object.__setattr__(self, "assignments", tuple(tuple(r) for r in self.assignments))


@dataclass(frozen=True, slots=True)
class LeaderHint:
    """The leader a partition's Raft group reported in a term (``leader`` 0: none known)."""

    group_id: int
    leader: int
    term: int


@dataclass(frozen=True, slots=True)
class UpdatePartitionLeaders:
    """Leaders observed in the partition Raft groups, batched by the active controller.

    Only hints: each group's Raft log is the authority on its leader. They let any node answer
    Metadata for partitions it does not host. Hints keyed by group id cannot land on a topic
    recreated under the same name, and a hint older than the one recorded is ignored.
    """

    TYPE: ClassVar[str] = "update_partition_leaders"
    hints: tuple[LeaderHint, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "hints", tuple(self.hints))


#: Largest block of producer ids one AllocateProducerIds may take.
PRODUCER_ID_BLOCK_MAX = 1_000_000


@dataclass(frozen=True, slots=True)
class AllocateProducerIds:
    """A node takes the next ``count`` producer ids (it serves InitProducerId from them).
    The controller's state hands out each id once, also across controller failovers."""

    TYPE: ClassVar[str] = "allocate_producer_ids"
    node_id: int
    count: int


#: Node states (``SetNodeState``): an active node takes replicas; a draining one has every
#: replica moved off and takes no new one.
NODE_ACTIVE = "active"
NODE_DRAINING = "draining"
NODE_STATES = (NODE_ACTIVE, NODE_DRAINING)


@dataclass(frozen=True, slots=True)
class SetNodeState:
    """Start (``draining``) or stop (``active``) draining a node."""

    TYPE: ClassVar[str] = "set_node_state"
    node_id: int
    state: str


@dataclass(frozen=True, slots=True)
class RemoveNode:
    """Forget a node that holds no replica and is dead or drained."""

    TYPE: ClassVar[str] = "remove_node"
    node_id: int


@dataclass(frozen=True, slots=True)
class PartitionMove:
    """Partition group ``group_id`` should end with replicas ``target`` (preferred leader
    first); an empty target cancels the move in progress."""

    group_id: int
    target: tuple[int, ...]


#: Moves carried by one MovePartitions.
MOVES_MAX = 100_000


@dataclass(frozen=True, slots=True)
class MovePartitions:
    """Start (or cancel) replica moves: reassignments, drains, reprovisioning, balancing.
    The leader of each group drives its Raft configuration to the target and reports the
    committed configurations back (UpdatePartitionReplicas)."""

    TYPE: ClassVar[str] = "move_partitions"
    moves: tuple[PartitionMove, ...]

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "moves", tuple(PartitionMove(m.group_id, tuple(m.target)) for m in self.moves)
        )


@dataclass(frozen=True, slots=True)
class ReplicaReport:
    """The committed Raft configuration of a partition group, reported by its leader in
    ``term``."""

    group_id: int
    term: int
    voters: tuple[int, ...]
    learners: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class UpdatePartitionReplicas:
    """Committed configurations of partition groups, batched by the active controller; the
    assignments' ``replicas`` follow them, and a move whose target is reached ends."""

    TYPE: ClassVar[str] = "update_partition_replicas"
    reports: tuple[ReplicaReport, ...]

    def __post_init__(self) -> None:
        object.__setattr__(
            self,
            "reports",
            tuple(
                ReplicaReport(r.group_id, r.term, tuple(r.voters), tuple(r.learners))
                for r in self.reports
            ),
        )


@dataclass(frozen=True, slots=True)
class SetClusterConfig:
    """Set some cluster settings and unset others (controller/settings.py)."""

    TYPE: ClassVar[str] = "set_cluster_config"
    set: Mapping[str, str]
    delete: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "set", _frozen_map(self.set))
        object.__setattr__(self, "delete", tuple(self.delete))


@dataclass(frozen=True, slots=True)
class ForceRecoverPartition:
    """UNSAFE (tidelog partition force-recover): partition group ``group_id`` lost a majority
    of its replicas for good; its replicas become ``survivors``, the first of them the
    survivor whose log is kept (and the preferred leader). See controller/recovery.py."""

    TYPE: ClassVar[str] = "force_recover_partition"
    group_id: int
    survivors: tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "survivors", tuple(self.survivors))


Command = (
    RegisterNode
    | MarkNodeDead
    | MarkNodeAlive
    | CreateTopic
    | DeleteTopic
    | AlterTopicConfig
    | UpdatePartitionLeaders
    | AllocateProducerIds
    | AddPartitions
    | SetNodeState
    | RemoveNode
    | MovePartitions
    | UpdatePartitionReplicas
    | SetClusterConfig
    | ForceRecoverPartition
)


def encode_command(command: Command) -> bytes:
    body: dict[str, Any]
    match command:
        case RegisterNode():
            body = {
                "node_id": command.node_id,
                "address": command.address,
                "metrics_address": command.metrics_address,
                "rack": command.rack,
            }
            if command.directory_id:
                body["directory_id"] = command.directory_id
            if command.internal_address:
                body["internal_address"] = command.internal_address
        case MarkNodeDead():
            body = {"node_id": command.node_id}
            if command.at_ms:
                body["at_ms"] = command.at_ms
        case MarkNodeAlive() | RemoveNode():
            body = {"node_id": command.node_id}
        case SetNodeState():
            body = {"node_id": command.node_id, "state": command.state}
        case MovePartitions():
            body = {"moves": [[m.group_id, *m.target] for m in command.moves]}
        case UpdatePartitionReplicas():
            body = {
                "reports": [
                    [r.group_id, r.term, list(r.voters), list(r.learners)] for r in command.reports
                ]
            }
        case SetClusterConfig():
            body = {"set": dict(command.set), "delete": list(command.delete)}
        case ForceRecoverPartition():
            body = {"group_id": command.group_id, "survivors": list(command.survivors)}
        case CreateTopic():
            body = {
                "name": command.name,
                "partitions": command.partitions,
                "replication_factor": command.replication_factor,
                "configs": dict(command.configs),
                "assignments": [list(r) for r in command.assignments],
            }
        case DeleteTopic():
            body = {"name": command.name}
        case AlterTopicConfig():
            body = {"name": command.name, "set": dict(command.set), "delete": list(command.delete)}
        case UpdatePartitionLeaders():
            body = {"hints": [[h.group_id, h.leader, h.term] for h in command.hints]}
        case AllocateProducerIds():
            body = {"node_id": command.node_id, "count": command.count}
        case AddPartitions():
            body = {"name": command.name, "assignments": [list(r) for r in command.assignments]}
        case _:
            raise TypeError(f"not a controller command: {command!r}")
    body["v"] = COMMAND_VERSION
    body["type"] = command.TYPE
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def decode_command(data: bytes) -> Command:
    if len(data) > COMMAND_BYTES_MAX:
        raise CommandDecodeError(
            f"controller command is {len(data)} bytes; at most {COMMAND_BYTES_MAX} allowed"
        )
    try:
        raw = json.loads(data, object_pairs_hook=_no_duplicate_keys)
    except (ValueError, RecursionError) as exc:
        raise CommandDecodeError(f"controller command is not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise CommandDecodeError(
            f"controller command must be a JSON object, got {type(raw).__name__}"
        )
    version = raw.get("v")
    if type(version) is not int:
        raise CommandDecodeError("controller command has no integer version field 'v'")
    if version != COMMAND_VERSION:
        raise CommandDecodeError(
            f"controller command version {version} is not understood by this node (it reads "
            f"version {COMMAND_VERSION}); upgrade this node to match the cluster"
        )
    kind = raw.get("type")
    fields = _Fields(str(kind), raw)
    command: Command
    if kind == RegisterNode.TYPE:
        command = RegisterNode(
            node_id=fields.integer("node_id"),
            address=fields.string("address"),
            metrics_address=fields.string("metrics_address"),
            rack=fields.optional_str("rack"),
            directory_id=fields.string_or("directory_id", ""),
            internal_address=fields.string("internal_address") if "internal_address" in raw else "",
        )
    elif kind == MarkNodeDead.TYPE:
        command = MarkNodeDead(
            node_id=fields.integer("node_id"),
            at_ms=fields.integer("at_ms") if "at_ms" in raw else 0,
        )
    elif kind == RemoveNode.TYPE:
        command = RemoveNode(node_id=fields.integer("node_id"))
    elif kind == SetNodeState.TYPE:
        command = SetNodeState(node_id=fields.integer("node_id"), state=fields.string("state"))
    elif kind == MovePartitions.TYPE:
        rows = fields.int_rows("moves", width=None)
        if len(rows) > MOVES_MAX:
            raise CommandDecodeError(
                f"move_partitions carries {len(rows)} moves; at most {MOVES_MAX} allowed"
            )
        if any(not row for row in rows):
            raise CommandDecodeError("move_partitions has an empty move")
        command = MovePartitions(moves=tuple(PartitionMove(row[0], tuple(row[1:])) for row in rows))
    elif kind == UpdatePartitionReplicas.TYPE:
        command = UpdatePartitionReplicas(reports=tuple(fields.replica_reports("reports")))
    elif kind == SetClusterConfig.TYPE:
        command = SetClusterConfig(
            set=fields.str_map("set"), delete=tuple(fields.str_list("delete"))
        )
    elif kind == ForceRecoverPartition.TYPE:
        command = ForceRecoverPartition(
            group_id=fields.integer("group_id"),
            survivors=tuple(fields.int_list("survivors")),
        )
    elif kind == MarkNodeAlive.TYPE:
        command = MarkNodeAlive(node_id=fields.integer("node_id"))
    elif kind == CreateTopic.TYPE:
        command = CreateTopic(
            name=fields.string("name"),
            partitions=fields.integer("partitions"),
            replication_factor=fields.integer("replication_factor"),
            configs=fields.str_map("configs"),
            assignments=[tuple(r) for r in fields.int_rows("assignments", width=None)],
        )
    elif kind == DeleteTopic.TYPE:
        command = DeleteTopic(name=fields.string("name"))
    elif kind == AlterTopicConfig.TYPE:
        command = AlterTopicConfig(
            name=fields.string("name"),
            set=fields.str_map("set"),
            delete=tuple(fields.str_list("delete")),
        )
    elif kind == UpdatePartitionLeaders.TYPE:
        rows = fields.int_rows("hints", width=3)
        if len(rows) > LEADER_HINTS_MAX:
            raise CommandDecodeError(
                f"update_partition_leaders carries {len(rows)} hints; "
                f"at most {LEADER_HINTS_MAX} allowed"
            )
        command = UpdatePartitionLeaders(hints=tuple(LeaderHint(*row) for row in rows))
    elif kind == AllocateProducerIds.TYPE:
        command = AllocateProducerIds(
            node_id=fields.integer("node_id"), count=fields.integer("count")
        )
    elif kind == AddPartitions.TYPE:
        command = AddPartitions(
            name=fields.string("name"),
            assignments=[tuple(r) for r in fields.int_rows("assignments", width=None)],
        )
    else:
        raise CommandDecodeError(f"unknown controller command type {kind!r}")
    fields.finish()
    return command


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen = [k for k, _ in pairs]
        dupes = sorted({k for k in seen if seen.count(k) > 1})
        raise ValueError(f"duplicate keys {dupes}")
    return out


class _Fields:
    """Typed, named access to the fields of one decoded command; ``finish`` rejects extras."""

    def __init__(self, kind: str, raw: dict[str, Any]) -> None:
        self._kind = kind
        self._raw = raw
        self._used = {"v", "type"}

    def _get(self, key: str) -> Any:
        if key not in self._raw:
            raise CommandDecodeError(f"{self._kind} command lacks field {key!r}")
        self._used.add(key)
        return self._raw[key]

    def _bad(self, key: str, expected: str) -> CommandDecodeError:
        got = repr(self._raw[key])
        if len(got) > _REPR_CHARS_MAX:
            got = got[:_REPR_CHARS_MAX] + "..."
        return CommandDecodeError(
            f"{self._kind} command field {key!r} must be {expected}, got {got}"
        )

    def integer(self, key: str) -> int:
        value = self._get(key)
        if type(value) is not int:
            raise self._bad(key, "an integer")
        return value

    def string(self, key: str) -> str:
        value = self._get(key)
        if not isinstance(value, str):
            raise self._bad(key, "a string")
        return value

    def string_or(self, key: str, default: str) -> str:
        """A string field that older encodings lack (``default`` then)."""
        if key not in self._raw:
            return default
        return self.string(key)

    def optional_str(self, key: str) -> str | None:
        value = self._get(key)
        if value is not None and not isinstance(value, str):
            raise self._bad(key, "a string or null")
        return value

    def str_map(self, key: str) -> dict[str, str]:
        value = self._get(key)
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            raise self._bad(key, "an object of strings")
        return value

    def str_list(self, key: str) -> list[str]:
        value = self._get(key)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self._bad(key, "a list of strings")
        return value

    def int_list(self, key: str) -> list[int]:
        value = self._get(key)
        if not isinstance(value, list) or not all(type(x) is int for x in value):
            raise self._bad(key, "a list of integers")
        return value

    def int_rows(self, key: str, width: int | None) -> list[list[int]]:
        value = self._get(key)
        expected = "a list of lists of integers" + (f", {width} each" if width else "")
        if not isinstance(value, list):
            raise self._bad(key, expected)
        for row in value:
            if not isinstance(row, list) or (width is not None and len(row) != width):
                raise self._bad(key, expected)
            if not all(type(x) is int for x in row):
                raise self._bad(key, expected)
        return value

    def replica_reports(self, key: str) -> list[ReplicaReport]:
        value = self._get(key)
        expected = "a list of [group, term, [voters], [learners]] rows"
        if not isinstance(value, list) or len(value) > MOVES_MAX:
            raise self._bad(key, expected)
        out = []
        for row in value:
            if not isinstance(row, list) or len(row) != 4:
                raise self._bad(key, expected)
            group, term, voters, learners = row
            if type(group) is not int or type(term) is not int:
                raise self._bad(key, expected)
            for ids in (voters, learners):
                if not isinstance(ids, list) or not all(type(x) is int for x in ids):
                    raise self._bad(key, expected)
            out.append(ReplicaReport(group, term, tuple(voters), tuple(learners)))
        return out

    def finish(self) -> None:
        extra = sorted(set(self._raw) - self._used)
        if extra:
            raise CommandDecodeError(f"{self._kind} command has unknown fields {extra}")
