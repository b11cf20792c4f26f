"""The values the Raft core exchanges with its driver: log entries, persistent state,
membership, messages and the ``Ready`` batch of work.

Everything here is an immutable, slotted dataclass so a message or entry can be shared by the
core, the simulator (which duplicates and reorders messages) and the storage without copies or
aliasing bugs. Node ids are positive integers; ``NONE`` (0) means "no node" (no vote, no known
leader). Terms and indexes start at 0 for the empty log; the first real entry has index 1.

Compatibility: the simulator and the cluster driver build against these types. Fields are only
ever added (with defaults), never renamed or removed.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

#: "No node": no vote cast, no leader known, no transfer target.
NONE = 0

#: Bytes counted per entry on top of its payload when sizing batches and in-flight windows,
#: so that a stream of empty entries is still bounded (term, index, kind and framing).
ENTRY_OVERHEAD_BYTES = 16


class EntryKind(enum.IntEnum):
    """What an entry carries; the application only interprets ``NORMAL`` payloads."""

    #: An opaque application payload (a record batch, a controller command).
    NORMAL = 0
    #: A membership change; its payload is the encoded ``ConfChange`` (the driver may wrap
    #: it, then it gives the core its own decoder: ``RawNode(conf_decoder=...)``).
    CONFIG = 1
    #: The entry a new leader appends at the start of its term. Committing it by counting
    #: commits every earlier entry (Raft §5.4.2); the application skips it when applying.
    EMPTY = 2


@dataclass(frozen=True, slots=True)
class Entry:
    """One log entry: an opaque payload at a position (index) written in a term."""

    term: int
    index: int
    data: bytes = b""
    kind: EntryKind = EntryKind.NORMAL

    @property
    def size_bytes(self) -> int:
        """Size used for batching and flow control: payload plus a fixed overhead."""
        return len(self.data) + ENTRY_OVERHEAD_BYTES


@dataclass(frozen=True, slots=True)
class HardState:
    """The state that must be durable before the messages that depend on it are sent:
    the current term, the vote cast in it, and the commit index (which may lag on disk:
    losing it is safe, it is relearned from the leader)."""

    term: int = 0
    vote: int = NONE
    commit: int = 0


EMPTY_HARD_STATE = HardState()


@dataclass(frozen=True, slots=True)
class ConfState:
    """The membership of a group, a first-class part of its state.

    ``voters`` elect leaders and count for quorum; ``learners`` receive the log but never vote,
    never count and never campaign. ``voters_outgoing`` is non-empty only during a joint
    configuration (membership changes, a later issue): then a decision needs a majority of
    ``voters`` AND a majority of ``voters_outgoing``.
    """

    voters: frozenset[int] = frozenset()
    learners: frozenset[int] = frozenset()
    voters_outgoing: frozenset[int] = frozenset()

    def __post_init__(self) -> None:
        assert not (self.voters & self.learners), "a node is either a voter or a learner"
        assert not (self.voters_outgoing & self.learners), "an outgoing voter is no learner"
        assert NONE not in self.voters and NONE not in self.learners, "node id 0 is reserved"

    @property
    def members(self) -> frozenset[int]:
        """Every node that receives the log."""
        return self.voters | self.voters_outgoing | self.learners

    def is_voter(self, node_id: int) -> bool:
        return node_id in self.voters or node_id in self.voters_outgoing


class ConfChangeKind(enum.IntEnum):
    """One membership change at a time (``core.py`` explains the choice)."""

    #: A node that is not a member becomes a learner (gets the log, no vote).
    ADD_LEARNER = 1
    #: A learner becomes a voter.
    PROMOTE = 2
    #: A voter or a learner leaves the group.
    REMOVE = 3
    #: Replace the voters outright (``RawNode.force_configuration``, never proposed: it is
    #: recorded so that an operator's unsafe recovery shows in the same history).
    FORCE = 4


#: version, kind, node id, voter count, learner count; then the ids (all big-endian).
_CONF_CHANGE_HEAD = struct.Struct(">BBIHH")
_CONF_CHANGE_VERSION = 1
_NODE_ID = struct.Struct(">I")
#: A group never has more members than this (a bound for strict decoding).
CONF_MEMBERS_MAX = 64


@dataclass(frozen=True, slots=True)
class ConfChange:
    """A membership change and the configuration it leads to.

    The resulting ``voters`` and ``learners`` travel with the change, so applying it is
    "take this configuration" on every replica whatever it believed before (a replica that
    replays the log from its start, or from a stale configuration, ends where the leader did);
    the leader checked at proposal time that the result is ``kind`` applied to its own
    configuration (:func:`apply_change`)."""

    kind: ConfChangeKind
    node_id: int
    voters: frozenset[int]
    learners: frozenset[int]

    @property
    def conf(self) -> ConfState:
        return ConfState(self.voters, self.learners)

    def encode(self) -> bytes:
        voters = sorted(self.voters)
        learners = sorted(self.learners)
        head = _CONF_CHANGE_HEAD.pack(
            _CONF_CHANGE_VERSION, self.kind, self.node_id, len(voters), len(learners)
        )
        return head + b"".join(_NODE_ID.pack(n) for n in (*voters, *learners))

    @classmethod
    def decode(cls, data: bytes) -> ConfChange:
        """Strict: ValueError for anything but exactly one valid change of this version."""
        if len(data) < _CONF_CHANGE_HEAD.size:
            raise ValueError(f"conf change of {len(data)} bytes")
        version, kind, node, nv, nl = _CONF_CHANGE_HEAD.unpack_from(data)
        if version != _CONF_CHANGE_VERSION:
            raise ValueError(f"conf change of version {version}")
        try:
            k = ConfChangeKind(kind)
        except ValueError:
            raise ValueError(f"conf change of unknown kind {kind}") from None
        if nv + nl > CONF_MEMBERS_MAX or nv == 0:
            raise ValueError(f"conf change with {nv} voters and {nl} learners")
        if len(data) != _CONF_CHANGE_HEAD.size + _NODE_ID.size * (nv + nl):
            raise ValueError(f"conf change of {len(data)} bytes for {nv + nl} members")
        ids = [
            _NODE_ID.unpack_from(data, _CONF_CHANGE_HEAD.size + _NODE_ID.size * i)[0]
            for i in range(nv + nl)
        ]
        voters, learners = frozenset(ids[:nv]), frozenset(ids[nv:])
        if len(voters) != nv or len(learners) != nl or voters & learners or NONE in ids:
            raise ValueError("conf change with repeated, shared or zero node ids")
        if k != ConfChangeKind.FORCE and node == NONE:
            raise ValueError("conf change of node 0")
        return cls(k, node, voters, learners)


def apply_change(conf: ConfState, kind: ConfChangeKind, node_id: int) -> ConfChange:
    """The change ``kind`` of ``node_id`` on ``conf`` (a simple configuration), or
    ValueError when it makes no sense there (adding a member, promoting a non-learner,
    removing a non-member or the last voter)."""
    if conf.voters_outgoing:
        raise ValueError("joint configurations are not used")
    if node_id == NONE:
        raise ValueError("node id 0 is reserved")
    voters, learners = conf.voters, conf.learners
    if kind == ConfChangeKind.ADD_LEARNER:
        if node_id in conf.members:
            raise ValueError(f"node {node_id} is already a member")
        learners = learners | {node_id}
    elif kind == ConfChangeKind.PROMOTE:
        if node_id not in learners:
            raise ValueError(f"node {node_id} is not a learner")
        learners = learners - {node_id}
        voters = voters | {node_id}
    elif kind == ConfChangeKind.REMOVE:
        if node_id not in conf.members:
            raise ValueError(f"node {node_id} is not a member")
        if voters == {node_id}:
            raise ValueError(f"node {node_id} is the last voter")
        voters = voters - {node_id}
        learners = learners - {node_id}
    else:
        raise ValueError(f"{kind.name} is not proposed")
    if len(voters) + len(learners) > CONF_MEMBERS_MAX:
        raise ValueError(f"more than {CONF_MEMBERS_MAX} members")
    return ConfChange(kind, node_id, voters, learners)


@dataclass(frozen=True, slots=True)
class SnapshotMeta:
    """Where a snapshot sits in the log: it replaces every entry up to ``index`` (whose term
    is ``term``) and carries the membership in force at that point."""

    index: int = 0
    term: int = 0
    conf: ConfState = ConfState()


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A state-machine image supplied by the application (opaque to the core)."""

    meta: SnapshotMeta = SnapshotMeta()
    data: bytes = b""

    @property
    def is_empty(self) -> bool:
        return self.meta.index == 0


EMPTY_SNAPSHOT = Snapshot()


class MessageKind(enum.IntEnum):
    """Kinds of messages between cores. Local actions (campaign, propose, transfer, read)
    are methods on the core, not messages; the ones here cross the network."""

    #: Would you vote for me at ``term``? Sent without bumping the local term (§9.6).
    PRE_VOTE = 0
    PRE_VOTE_RESP = 1
    VOTE = 2
    VOTE_RESP = 3
    #: Log entries after (``index``, ``log_term``), plus the leader's ``commit``.
    APPEND = 4
    #: ``index`` = the last index now matching; on reject, ``reject_hint`` and
    #: ``reject_hint_term`` let the leader skip back by whole terms.
    APPEND_RESP = 5
    #: Small and coalescible: only ``term``, ``commit`` and ``context`` matter.
    HEARTBEAT = 6
    HEARTBEAT_RESP = 7
    #: Leadership transfer: campaign now, ignoring the election timer and leader stickiness.
    TIMEOUT_NOW = 8
    #: Carries ``snapshot``; the follower answers with APPEND_RESP (``index`` = its new last
    #: index, or its commit index if the snapshot was old news).
    SNAPSHOT = 9
    #: Never sent by the core: a driver that streams snapshots out of band may send it to the
    #: leader (``reject`` = the transfer failed) instead of calling ``report_snapshot`` there.
    SNAPSHOT_RESP = 10
    #: A follower forwards a linearizable read request (``context``) to the leader.
    READ_INDEX = 11
    #: The leader's answer: ``index`` is the read index for ``context``.
    READ_INDEX_RESP = 12
    #: A follower forwards a leadership transfer request (``index`` = transferee id).
    TRANSFER_LEADER = 13


@dataclass(frozen=True, slots=True)
class Message:
    """One message from ``frm`` to ``to``. Unused fields keep their defaults."""

    kind: MessageKind
    frm: int
    to: int
    term: int
    log_term: int = 0
    index: int = 0
    entries: tuple[Entry, ...] = ()
    commit: int = 0
    reject: bool = False
    reject_hint: int = 0
    reject_hint_term: int = 0
    context: bytes = b""
    snapshot: Snapshot | None = None

    @property
    def size_bytes(self) -> int:
        """Bytes of entry payload this message carries (for in-flight accounting)."""
        return sum(e.size_bytes for e in self.entries)


class Role(enum.IntEnum):
    FOLLOWER = 0
    PRE_CANDIDATE = 1
    CANDIDATE = 2
    LEADER = 3


@dataclass(frozen=True, slots=True)
class SoftState:
    """Volatile state worth reporting when it changes (not persisted)."""

    leader_id: int = NONE
    role: Role = Role.FOLLOWER


@dataclass(frozen=True, slots=True)
class ReadState:
    """A linearizable read is safe once the local applied index reaches ``index``.
    ``context`` is the caller's request id given to ``read_index``."""

    index: int
    context: bytes


@dataclass(frozen=True, slots=True)
class Ready:
    """A batch of work the core hands its driver. The contract, in this order:

    1. If ``snapshot`` is set, install it (storage ``apply_snapshot``; the state machine loads
       its data).
    2. Persist ``entries`` (storage ``append``, which truncates a conflicting suffix) and
       ``hard_state`` if set; when ``must_sync`` is true, fsync before going on.
       Votes, terms and appended entries must be durable BEFORE any message leaves: a
       vote or an append acknowledgement that is forgotten after a crash breaks safety.
    3. Send ``messages`` (in any order; the network may reorder anyway).
    4. Apply ``committed`` entries to the state machine in order (they are already durable
       on a majority; skip ``EntryKind.EMPTY``), serve ``read_states`` once applied.
    5. Call ``advance(ready)`` with this same object.

    ``soft_state`` is set when the leader or role changed (for metrics and routing).
    ``conf_state`` is set when the configuration in force changed through the log (a
    committed CONFIG entry, an installed snapshot, a forced configuration): the driver stores
    it with ``conf_index`` (the log index it is in force from) in the same write as
    ``hard_state``, so that a restart finds it again (``StorageReader.conf_index``).
    """

    hard_state: HardState | None = None
    entries: tuple[Entry, ...] = ()
    must_sync: bool = False
    committed: tuple[Entry, ...] = ()
    messages: tuple[Message, ...] = ()
    snapshot: Snapshot | None = None
    read_states: tuple[ReadState, ...] = ()
    soft_state: SoftState | None = None
    conf_state: ConfState | None = None
    conf_index: int = 0

    @property
    def is_empty(self) -> bool:
        return (
            self.conf_state is None
            and self.hard_state is None
            and not self.entries
            and not self.committed
            and not self.messages
            and self.snapshot is None
            and not self.read_states
            and self.soft_state is None
        )


__all__ = [
    "CONF_MEMBERS_MAX",
    "EMPTY_HARD_STATE",
    "EMPTY_SNAPSHOT",
    "ENTRY_OVERHEAD_BYTES",
    "NONE",
    "ConfChange",
    "ConfChangeKind",
    "ConfState",
    "Entry",
    "EntryKind",
    "HardState",
    "Message",
    "MessageKind",
    "ReadState",
    "Ready",
    "Role",
    "Snapshot",
    "SnapshotMeta",
    "SoftState",
    "apply_change",
]
