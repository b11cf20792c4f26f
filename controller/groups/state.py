"""The consumer-group state machine of one ``__consumer_offsets`` partition (after KIP-848).

Pure: no I/O, no asyncio, no clock (callers pass ``now_ms``), no randomness (callers pass
the id a new member gets). One ``GroupCoordinator`` holds every group of its partition.

Protocol, in the words of its state:

- The **group epoch** counts changes the assignor must see: a member joined or was removed,
  a subscription or the group's assignor changed, a subscribed topic appeared or grew.
- The **target assignment** (one set of partitions per member) is computed by the group's
  assignor whenever the group epoch passes the **assignment epoch**; it then equals it.
- Each member has a **current assignment**: its member epoch, the partitions it may own
  (``assigned``) and those it still owns but must give up (``pending``). A member moves to a
  new target in safe steps, on its own heartbeats: first, if it holds partitions the target
  does not give it, it keeps its epoch and is told the smaller set (state ``unrevoked``); once
  it reports ownership without them, the member epoch jumps to the assignment epoch and it
  gets every target partition no other member still holds (``assigned`` or ``pending``); the
  rest come on later heartbeats as their previous owners release them (``unreleased``).
  So the coordinator never grants a partition while another member may own it, and a member
  whose target did not change keeps its partitions with no pause (only its epoch moves).
- A member is removed when it leaves (epoch -1), when its session expires (no heartbeat for
  its session timeout), or when it does not revoke within its rebalance timeout. A static
  member (``group_instance_id``) that leaves with epoch -2 stays, holding its partitions,
  until its session expires; a new member with the same instance id takes its place, its
  epoch and its partitions without any group epoch change.

Persistence: every change is a list of ``Record`` (see records.py). The coordinator computes
a change on a copy of the group and returns the records with the answer; the caller writes
them (acks=all) and only then calls ``apply`` and sends the answer. ``apply`` is the only way
the persisted state changes, live or on rebuild, so a replay of the records (in log order, or
the table's key order) gives the same state. Session and revocation timers are not persisted:
``start_timers`` starts them afresh after a rebuild, as Kafka does. Calls for one coordinator
must be serialized (compute, write, apply) by the caller.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from tidelog.controller.groups.assignors import (
    ASSIGNORS,
    DEFAULT_ASSIGNOR,
    TP,
    AssignmentSpec,
    MemberSpec,
)
from tidelog.controller.groups.records import (
    KIND_CURRENT,
    KIND_GROUP,
    KIND_MEMBER,
    KIND_OFFSET,
    KIND_TARGET,
    KIND_TARGET_EPOCH,
    MEMBER_ID_BYTES_MAX,
    Record,
    decode_tps,
    decode_value,
    encode_tps,
    encode_value,
    group_key,
    group_prefix,
    member_key,
    offset_key,
    parse_key,
    target_epoch_key,
)
from tidelog.errors import (
    FencedMemberEpoch,
    GroupNotEmpty,
    InvalidRequest,
    InvalidSubscription,
    ResourceExhausted,
    Revoked,
    StaleMemberEpoch,
    UnknownGroup,
    UnknownMemberId,
    UnreleasedInstanceId,
)

JOIN_EPOCH = 0
LEAVE_EPOCH = -1
STATIC_LEAVE_EPOCH = -2

STABLE = "stable"
UNREVOKED = "unrevoked"
UNRELEASED = "unreleased"
_MEMBER_STATES = (STABLE, UNREVOKED, UNRELEASED)

# Bounds on what one request may carry (a hostile client cannot make the state unbounded).
SUBSCRIBED_TOPICS_MAX = 1000
REGEX_CHARS_MAX = 1024
METADATA_CHARS_MAX = 4096
OFFSETS_PER_COMMIT_MAX = 10_000


@dataclass(frozen=True, slots=True)
class GroupConfig:
    heartbeat_interval_ms: int = 500
    session_timeout_ms: int = 10_000
    session_timeout_min_ms: int = 1_000
    session_timeout_max_ms: int = 60_000
    rebalance_timeout_ms: int = 30_000
    rebalance_timeout_max_ms: int = 300_000
    #: A group above this many members refuses joins (a bound on the assignor's work: the
    #: uniform assignor is O(members x partitions) per rebalance, 1000 x 1000 = 1e6 steps).
    members_per_group_max: int = 1000

    def __post_init__(self) -> None:
        assert 0 < self.heartbeat_interval_ms < self.session_timeout_min_ms
        assert self.session_timeout_min_ms <= self.session_timeout_ms
        assert self.session_timeout_ms <= self.session_timeout_max_ms
        assert 0 < self.rebalance_timeout_ms <= self.rebalance_timeout_max_ms
        assert self.members_per_group_max > 0


@dataclass(frozen=True, slots=True)
class MemberMeta:
    instance_id: str | None
    rack: str | None
    client_host: str
    topic_names: tuple[str, ...]
    regex: str | None
    assignor: str | None
    session_timeout_ms: int
    rebalance_timeout_ms: int


@dataclass(frozen=True, slots=True)
class MemberAssignment:
    #: The member epoch; STATIC_LEAVE_EPOCH while a static member is away.
    epoch: int
    previous_epoch: int
    state: str
    assigned: frozenset[TP]
    pending: frozenset[TP]

    @property
    def holds(self) -> frozenset[TP]:
        """What the member may own now (assigned, or still to revoke)."""
        return self.assigned | self.pending


@dataclass(slots=True)
class GroupState:
    group_id: str
    has_meta: bool = False
    epoch: int = 0
    subscribed: dict[str, int] = field(default_factory=dict)
    has_target_epoch: bool = False
    assignment_epoch: int = 0
    assignor: str = DEFAULT_ASSIGNOR
    members: dict[str, MemberMeta] = field(default_factory=dict)
    current: dict[str, MemberAssignment] = field(default_factory=dict)
    target: dict[str, frozenset[TP]] = field(default_factory=dict)
    #: Partitions with a committed offset (the offsets themselves are read from the table).
    offsets: set[TP] = field(default_factory=set)

    def copy(self) -> GroupState:
        return replace(
            self,
            subscribed=dict(self.subscribed),
            members=dict(self.members),
            current=dict(self.current),
            target=dict(self.target),
            offsets=set(self.offsets),
        )

    def is_empty(self) -> bool:
        return not (
            self.has_meta
            or self.has_target_epoch
            or self.members
            or self.current
            or self.target
            or self.offsets
        )

    @property
    def state_name(self) -> str:
        """ "empty", "stable" (every member at the assignment epoch holding its target) or
        "reconciling"."""
        if not self.members:
            return "empty"
        for member_id, cur in self.current.items():
            target = self.target.get(member_id, frozenset())
            if cur.epoch == STATIC_LEAVE_EPOCH:
                if cur.holds != target:
                    return "reconciling"
            elif (
                cur.epoch != self.assignment_epoch or cur.state != STABLE or cur.assigned != target
            ):
                return "reconciling"
        return "stable"

    def owner_of(self) -> dict[TP, str]:
        owners: dict[TP, str] = {}
        for member_id, cur in self.current.items():
            for tp in cur.holds:
                owners[tp] = member_id
        return owners


@dataclass(frozen=True, slots=True)
class HeartbeatInput:
    group_id: str
    member_id: str
    member_epoch: int
    instance_id: str | None = None
    rack: str | None = None
    rebalance_timeout_ms: int | None = None
    #: None: unchanged since the last heartbeat.
    topic_names: tuple[str, ...] | None = None
    regex: str | None = None
    server_assignor: str | None = None
    #: None: unchanged since the last heartbeat.
    owned: frozenset[TP] | None = None
    session_timeout_ms: int | None = None
    client_host: str = ""


@dataclass(frozen=True, slots=True)
class HeartbeatAnswer:
    member_id: str
    member_epoch: int
    heartbeat_interval_ms: int
    #: None: no change; an empty set is the explicit answer "you own nothing".
    assignment: frozenset[TP] | None


@dataclass(frozen=True, slots=True)
class HeartbeatOutcome:
    records: list[Record]
    answer: HeartbeatAnswer


@dataclass(frozen=True, slots=True)
class CommitEntry:
    topic: str
    partition: int
    offset: int
    metadata: str = ""


@dataclass(frozen=True, slots=True)
class OffsetValue:
    offset: int
    metadata: str
    commit_ms: int


def encode_offset(value: OffsetValue) -> bytes:
    return encode_value({"offset": value.offset, "metadata": value.metadata, "ts": value.commit_ms})


def decode_offset(raw: bytes) -> OffsetValue:
    obj = decode_value(raw)
    return OffsetValue(int(obj["offset"]), str(obj["metadata"]), int(obj["ts"]))


def resolve_topics(meta: MemberMeta, topics: Mapping[str, int]) -> frozenset[str]:
    """The existing topics a member's subscription covers. A regex matches whole names and
    never internal topics (names starting with "__")."""
    if meta.regex is not None:
        pattern = re.compile(meta.regex)
        return frozenset(
            name for name in topics if not name.startswith("__") and pattern.fullmatch(name)
        )
    return frozenset(name for name in meta.topic_names if name in topics)


def _check_subscription(req: HeartbeatInput) -> None:
    if req.regex is not None:
        if req.topic_names:
            raise InvalidSubscription(
                f"group {req.group_id!r}: subscribe by topic names or by a regex, not both"
            )
        if len(req.regex) > REGEX_CHARS_MAX:
            raise InvalidSubscription(f"regex longer than {REGEX_CHARS_MAX} characters")
        try:
            re.compile(req.regex)
        except re.error as exc:
            raise InvalidSubscription(
                f"group {req.group_id!r}: invalid subscription regex {req.regex!r}: {exc}"
            ) from None
    if req.topic_names is not None and len(req.topic_names) > SUBSCRIBED_TOPICS_MAX:
        raise InvalidSubscription(f"more than {SUBSCRIBED_TOPICS_MAX} subscribed topics")


def _clamp(value: int | None, default: int, low: int, high: int) -> int:
    if value is None or value <= 0:
        return default
    return max(low, min(high, value))


class GroupCoordinator:
    """Every group of one ``__consumer_offsets`` partition (see the module's comment)."""

    def __init__(self, config: GroupConfig | None = None) -> None:
        self.config = config or GroupConfig()
        self.groups: dict[str, GroupState] = {}
        # Transient, never persisted: (group, member) -> deadline.
        self._session_deadline_ms: dict[tuple[str, str], int] = {}
        self._revocation_deadline_ms: dict[tuple[str, str], int] = {}
        # What each member last reported it owns (for Describe).
        self._reported: dict[tuple[str, str], frozenset[TP]] = {}
        self._now_ms = 0
        #: Rebalances (assignment recomputations) since this coordinator started.
        self.rebalances = 0

    # ----- persisted state: apply -----

    def apply(self, records: Iterable[Record], now_ms: int | None = None) -> None:
        """Apply records that are durable (live) or read back (rebuild)."""
        if now_ms is not None:
            self._now_ms = max(self._now_ms, now_ms)
        for record in records:
            self._apply_one(record)

    def _apply_one(self, record: Record) -> None:
        parsed = parse_key(record.key)
        g = self.groups.get(parsed.group_id)
        if g is None:
            if record.value is None:
                return
            g = self.groups[parsed.group_id] = GroupState(parsed.group_id)
        value = None if record.value is None else decode_value(record.value)
        kind, mid = parsed.kind, parsed.member_id
        if kind == KIND_GROUP:
            g.has_meta = value is not None
            g.epoch = int(value["epoch"]) if value else 0
            g.subscribed = dict(value["subscribed"]) if value else {}
        elif kind == KIND_TARGET_EPOCH:
            g.has_target_epoch = value is not None
            g.assignment_epoch = int(value["epoch"]) if value else 0
            g.assignor = str(value["assignor"]) if value else DEFAULT_ASSIGNOR
        elif kind == KIND_MEMBER:
            if value is None:
                g.members.pop(mid, None)
                self._forget(g.group_id, mid)
            else:
                meta = MemberMeta(
                    instance_id=value["instance_id"],
                    rack=value["rack"],
                    client_host=str(value["client_host"]),
                    topic_names=tuple(value["topic_names"]),
                    regex=value["regex"],
                    assignor=value["assignor"],
                    session_timeout_ms=int(value["session_timeout_ms"]),
                    rebalance_timeout_ms=int(value["rebalance_timeout_ms"]),
                )
                g.members[mid] = meta
                self._session_deadline_ms.setdefault(
                    (g.group_id, mid), self._now_ms + meta.session_timeout_ms
                )
        elif kind == KIND_TARGET:
            if value is None:
                g.target.pop(mid, None)
            else:
                g.target[mid] = decode_tps(value["partitions"])
        elif kind == KIND_CURRENT:
            if value is None:
                g.current.pop(mid, None)
            else:
                state = str(value["state"])
                if state not in _MEMBER_STATES:
                    raise ValueError(f"unknown member state {state!r}")
                cur = MemberAssignment(
                    epoch=int(value["epoch"]),
                    previous_epoch=int(value["previous_epoch"]),
                    state=state,
                    assigned=decode_tps(value["assigned"]),
                    pending=decode_tps(value["pending"]),
                )
                old = g.current.get(mid)
                g.current[mid] = cur
                key = (g.group_id, mid)
                if cur.state == UNREVOKED:
                    if old is None or old.state != UNREVOKED:
                        meta_now = g.members.get(mid)
                        timeout = (
                            meta_now.rebalance_timeout_ms
                            if meta_now
                            else self.config.rebalance_timeout_ms
                        )
                        self._revocation_deadline_ms[key] = self._now_ms + timeout
                else:
                    self._revocation_deadline_ms.pop(key, None)
        elif kind == KIND_OFFSET:
            assert parsed.tp is not None
            if value is None:
                g.offsets.discard(parsed.tp)
            else:
                g.offsets.add(parsed.tp)
        if g.is_empty():
            del self.groups[g.group_id]

    def _forget(self, group_id: str, member_id: str) -> None:
        key = (group_id, member_id)
        self._session_deadline_ms.pop(key, None)
        self._revocation_deadline_ms.pop(key, None)
        self._reported.pop(key, None)

    def start_timers(self, now_ms: int) -> None:
        """After a rebuild: every member's session (and pending revocation) starts now."""
        self._now_ms = max(self._now_ms, now_ms)
        self._session_deadline_ms.clear()
        self._revocation_deadline_ms.clear()
        for g in self.groups.values():
            for member_id, meta in g.members.items():
                self._session_deadline_ms[(g.group_id, member_id)] = (
                    now_ms + meta.session_timeout_ms
                )
                cur = g.current.get(member_id)
                if cur is not None and cur.state == UNREVOKED:
                    self._revocation_deadline_ms[(g.group_id, member_id)] = (
                        now_ms + meta.rebalance_timeout_ms
                    )

    # ----- records of a change -----

    @staticmethod
    def _diff(old: GroupState | None, new: GroupState) -> list[Record]:
        gid = new.group_id
        out: list[Record] = []
        empty = GroupState(gid)
        before = old or empty
        for mid in sorted(
            mid
            for mid in before.members.keys() | new.members.keys()
            if before.members.get(mid) is not new.members.get(mid)
        ):
            if before.members.get(mid) != new.members.get(mid):
                meta = new.members.get(mid)
                out.append(
                    Record(
                        member_key(gid, KIND_MEMBER, mid),
                        None
                        if meta is None
                        else encode_value(
                            {
                                "instance_id": meta.instance_id,
                                "rack": meta.rack,
                                "client_host": meta.client_host,
                                "topic_names": list(meta.topic_names),
                                "regex": meta.regex,
                                "assignor": meta.assignor,
                                "session_timeout_ms": meta.session_timeout_ms,
                                "rebalance_timeout_ms": meta.rebalance_timeout_ms,
                            }
                        ),
                    )
                )
        for mid in sorted(
            mid
            for mid in before.target.keys() | new.target.keys()
            if before.target.get(mid) is not new.target.get(mid)
        ):
            was_t, now_t = before.target.get(mid), new.target.get(mid)
            if was_t != now_t:
                target = new.target.get(mid)
                out.append(
                    Record(
                        member_key(gid, KIND_TARGET, mid),
                        None
                        if target is None
                        else encode_value({"partitions": encode_tps(target)}),
                    )
                )
        for mid in sorted(
            mid
            for mid in before.current.keys() | new.current.keys()
            if before.current.get(mid) is not new.current.get(mid)
        ):
            was_c, now_c = before.current.get(mid), new.current.get(mid)
            if was_c != now_c:
                cur = new.current.get(mid)
                out.append(
                    Record(
                        member_key(gid, KIND_CURRENT, mid),
                        None
                        if cur is None
                        else encode_value(
                            {
                                "epoch": cur.epoch,
                                "previous_epoch": cur.previous_epoch,
                                "state": cur.state,
                                "assigned": encode_tps(cur.assigned),
                                "pending": encode_tps(cur.pending),
                            }
                        ),
                    )
                )
        if (before.has_target_epoch, before.assignment_epoch, before.assignor) != (
            new.has_target_epoch,
            new.assignment_epoch,
            new.assignor,
        ):
            out.append(
                Record(
                    target_epoch_key(gid),
                    encode_value({"epoch": new.assignment_epoch, "assignor": new.assignor})
                    if new.has_target_epoch
                    else None,
                )
            )
        if (before.has_meta, before.epoch, before.subscribed) != (
            new.has_meta,
            new.epoch,
            new.subscribed,
        ):
            out.append(
                Record(
                    group_key(gid),
                    encode_value(
                        {"epoch": new.epoch, "subscribed": dict(sorted(new.subscribed.items()))}
                    )
                    if new.has_meta
                    else None,
                )
            )
        return out

    # ----- epochs and the target -----

    def _refresh(self, g: GroupState, topics: Mapping[str, int], *, force: bool) -> None:
        """Bump the group epoch if ``force`` or what the assignor sees changed, and compute a
        new target when the group epoch passed the assignment epoch."""
        resolved = {mid: resolve_topics(meta, topics) for mid, meta in g.members.items()}
        subscribed = {t: topics[t] for t in sorted(set().union(*resolved.values()))}
        votes: dict[str, int] = {}
        for meta in g.members.values():
            if meta.assignor is not None:
                votes[meta.assignor] = votes.get(meta.assignor, 0) + 1
        assignor = min(votes, key=lambda name: (-votes[name], name)) if votes else DEFAULT_ASSIGNOR
        if force or subscribed != g.subscribed or assignor != g.assignor or not g.has_meta:
            g.has_meta = True
            g.epoch += 1
            g.subscribed = subscribed
            g.assignor = assignor
        if g.epoch > g.assignment_epoch or not g.has_target_epoch:
            spec = AssignmentSpec(
                members={
                    mid: MemberSpec(resolved[mid], meta.instance_id, meta.rack)
                    for mid, meta in g.members.items()
                },
                partitions=subscribed,
                current=g.target,
            )
            target = ASSIGNORS[assignor].assign(spec)
            g.target = {mid: target.get(mid, frozenset()) for mid in g.members}
            g.assignment_epoch = g.epoch
            g.has_target_epoch = True
            self.rebalances += 1

    def _reconcile(self, g: GroupState, member_id: str, owned: frozenset[TP] | None) -> None:
        """One safe step of a member toward its target (see the module's comment)."""
        cur = g.current[member_id]
        target = g.target.get(member_id, frozenset())
        if cur.state == UNREVOKED:
            if owned is None or owned & cur.pending:
                return  # still waiting for the member to report the revocation
            cur = replace(cur, state=STABLE, pending=frozenset())
        if cur.epoch == g.assignment_epoch and cur.state == STABLE and cur.assigned == target:
            g.current[member_id] = cur
            return
        to_revoke = cur.assigned - target
        if to_revoke:
            g.current[member_id] = replace(
                cur, state=UNREVOKED, assigned=cur.assigned & target, pending=to_revoke
            )
            return
        taken: set[TP] = set()
        for other, assignment in g.current.items():
            if other != member_id:
                taken.update(assignment.assigned)
                taken.update(assignment.pending)
        assigned = cur.assigned | frozenset(tp for tp in target if tp not in taken)
        epoch = g.assignment_epoch
        g.current[member_id] = MemberAssignment(
            epoch=epoch,
            previous_epoch=cur.epoch if epoch != cur.epoch else cur.previous_epoch,
            state=STABLE if assigned == target else UNRELEASED,
            assigned=assigned,
            pending=frozenset(),
        )

    def _remove_member(self, g: GroupState, member_id: str) -> None:
        g.members.pop(member_id, None)
        g.current.pop(member_id, None)
        g.target.pop(member_id, None)

    # ----- heartbeats -----

    def heartbeat(
        self,
        req: HeartbeatInput,
        *,
        now_ms: int,
        topics: Mapping[str, int],
        new_member_id: str,
    ) -> HeartbeatOutcome:
        """The records to write and the answer to send once they are durable. Raises a
        TidelogError (nothing changed) for a request the coordinator refuses."""
        self._now_ms = max(self._now_ms, now_ms)
        try:
            group_prefix(req.group_id)
        except ValueError as exc:
            raise InvalidRequest(f"bad group id: {exc}") from None
        if len(req.member_id.encode()) > MEMBER_ID_BYTES_MAX:
            raise InvalidRequest(f"member id longer than {MEMBER_ID_BYTES_MAX} bytes")
        if req.server_assignor is not None and req.server_assignor not in ASSIGNORS:
            raise InvalidRequest(
                f"unknown server assignor {req.server_assignor!r} "
                f"(known: {', '.join(sorted(ASSIGNORS))})"
            )
        _check_subscription(req)
        old = self.groups.get(req.group_id)
        g = old.copy() if old is not None else GroupState(req.group_id)
        cfg = self.config
        epoch = req.member_epoch

        if epoch in (LEAVE_EPOCH, STATIC_LEAVE_EPOCH):
            if req.member_id not in g.members:
                raise UnknownMemberId(
                    f"member {req.member_id!r} is not in group {req.group_id!r}",
                    group_id=req.group_id,
                )
            if epoch == STATIC_LEAVE_EPOCH and g.members[req.member_id].instance_id is not None:
                cur = g.current[req.member_id]
                if cur.epoch != STATIC_LEAVE_EPOCH:
                    g.current[req.member_id] = replace(
                        cur, epoch=STATIC_LEAVE_EPOCH, previous_epoch=cur.epoch
                    )
                self._touch(g, req.member_id, now_ms)
            else:
                self._remove_member(g, req.member_id)
                self._refresh(g, topics, force=True)
                epoch = LEAVE_EPOCH
            records = self._diff(old, g)
            answer = HeartbeatAnswer(req.member_id, epoch, cfg.heartbeat_interval_ms, None)
            return HeartbeatOutcome(records, answer)

        if epoch == JOIN_EPOCH:
            member_id = self._join(g, req, topics, new_member_id)
        elif epoch > 0:
            member_id = req.member_id
            known = g.current.get(member_id)
            if known is None:
                raise UnknownMemberId(
                    f"member {member_id!r} is not in group {req.group_id!r} (it left, its "
                    "session expired or the group was deleted): join again",
                    group_id=req.group_id,
                )
            accepted = epoch == known.epoch or (
                epoch == known.previous_epoch
                and known.epoch != STATIC_LEAVE_EPOCH
                and req.owned is not None
                and req.owned <= known.assigned
            )
            if not accepted:
                raise FencedMemberEpoch(
                    f"member {member_id!r} of group {req.group_id!r} sent epoch {epoch}, "
                    f"its epoch is {known.epoch}: drop every partition and join again",
                    member_epoch=str(epoch),
                    current_epoch=str(known.epoch),
                )
            if self._update_meta(g, member_id, req, g.members[member_id]):
                self._refresh(g, topics, force=True)
        else:
            raise InvalidRequest(f"bad member epoch {epoch}")

        before = g.current[member_id]
        if old is not None and member_id in old.current:
            before = old.current[member_id]
        owned = req.owned
        if epoch == JOIN_EPOCH and owned is None:
            owned = frozenset()
        self._reconcile(g, member_id, owned)
        after = g.current[member_id]
        send = (
            epoch == JOIN_EPOCH
            or after.assigned != before.assigned
            or after.epoch != epoch
            or (owned is not None and owned != after.assigned)
        )
        records = self._diff(old, g)
        self._touch(g, member_id, now_ms)
        if owned is not None:
            self._reported[(g.group_id, member_id)] = owned
        answer = HeartbeatAnswer(
            member_id,
            after.epoch,
            cfg.heartbeat_interval_ms,
            after.assigned if send else None,
        )
        return HeartbeatOutcome(records, answer)

    def _touch(self, g: GroupState, member_id: str, now_ms: int) -> None:
        meta = g.members.get(member_id)
        if meta is not None:
            self._session_deadline_ms[(g.group_id, member_id)] = now_ms + meta.session_timeout_ms

    def _new_meta(self, req: HeartbeatInput, base: MemberMeta | None) -> MemberMeta:
        cfg = self.config
        if req.regex is not None:
            names: tuple[str, ...] = ()
            regex: str | None = req.regex
        elif req.topic_names is not None:
            names, regex = tuple(sorted(set(req.topic_names))), None
        elif base is not None:
            names, regex = base.topic_names, base.regex
        else:
            raise InvalidSubscription(
                f"group {req.group_id!r}: a joining member must send its subscription "
                "(topic names, possibly none, or a regex)"
            )
        return MemberMeta(
            instance_id=req.instance_id
            if req.instance_id is not None
            else (base.instance_id if base else None),
            rack=req.rack if req.rack is not None else (base.rack if base else None),
            client_host=req.client_host or (base.client_host if base else ""),
            topic_names=names,
            regex=regex,
            assignor=req.server_assignor
            if req.server_assignor is not None
            else (base.assignor if base else None),
            session_timeout_ms=_clamp(
                req.session_timeout_ms,
                base.session_timeout_ms if base else cfg.session_timeout_ms,
                cfg.session_timeout_min_ms,
                cfg.session_timeout_max_ms,
            ),
            rebalance_timeout_ms=_clamp(
                req.rebalance_timeout_ms,
                base.rebalance_timeout_ms if base else cfg.rebalance_timeout_ms,
                1,
                cfg.rebalance_timeout_max_ms,
            ),
        )

    def _update_meta(
        self, g: GroupState, member_id: str, req: HeartbeatInput, base: MemberMeta | None
    ) -> bool:
        """Store the member's metadata; True when the assignor must see the change."""
        meta = self._new_meta(req, base)
        g.members[member_id] = meta
        if base is None:
            return True
        return (base.topic_names, base.regex, base.assignor, base.rack) != (
            meta.topic_names,
            meta.regex,
            meta.assignor,
            meta.rack,
        )

    def _join(
        self, g: GroupState, req: HeartbeatInput, topics: Mapping[str, int], new_member_id: str
    ) -> str:
        if req.instance_id is not None:
            holder = next(
                (mid for mid, meta in g.members.items() if meta.instance_id == req.instance_id),
                None,
            )
            if holder is not None and holder != req.member_id:
                held = g.current[holder]
                if held.epoch != STATIC_LEAVE_EPOCH:
                    raise UnreleasedInstanceId(
                        f"instance id {req.instance_id!r} of group {req.group_id!r} is held "
                        f"by active member {holder!r}: retry after its session timeout",
                        group_id=req.group_id,
                    )
                # The replacement takes the static member's place, epoch and partitions.
                member_id = req.member_id or new_member_id
                base = g.members[holder]
                target = g.target.get(holder, frozenset())
                self._remove_member(g, holder)
                force = self._update_meta(g, member_id, req, base)
                g.current[member_id] = replace(
                    held, epoch=held.previous_epoch, previous_epoch=held.previous_epoch
                )
                g.target[member_id] = target
                self._refresh(g, topics, force=force)
                return member_id
        if req.member_id and req.member_id in g.members:
            member_id = req.member_id
            force = self._update_meta(g, member_id, req, g.members[member_id])
            self._refresh(g, topics, force=force)
            return member_id
        if len(g.members) >= self.config.members_per_group_max:
            raise ResourceExhausted(
                f"group {req.group_id!r} has {len(g.members)} members, the most a group may have"
            )
        member_id = req.member_id or new_member_id
        self._update_meta(g, member_id, req, None)
        g.current[member_id] = MemberAssignment(0, -1, STABLE, frozenset(), frozenset())
        self._refresh(g, topics, force=True)
        return member_id

    # ----- timers and metadata -----

    def next_deadline_ms(self) -> int | None:
        deadlines = [*self._session_deadline_ms.values(), *self._revocation_deadline_ms.values()]
        return min(deadlines) if deadlines else None

    def expire(
        self, now_ms: int, topics: Mapping[str, int]
    ) -> tuple[list[Record], list[tuple[str, str]]]:
        """Remove members whose session expired or who did not revoke in time: the records
        and the (group, member) pairs removed."""
        self._now_ms = max(self._now_ms, now_ms)
        expired = sorted(
            key
            for key, deadline in [
                *self._session_deadline_ms.items(),
                *self._revocation_deadline_ms.items(),
            ]
            if deadline <= now_ms
        )
        removed: list[tuple[str, str]] = []
        records: list[Record] = []
        by_group: dict[str, list[str]] = {}
        for group_id, member_id in dict.fromkeys(expired):
            by_group.setdefault(group_id, []).append(member_id)
        for group_id, member_ids in sorted(by_group.items()):
            old = self.groups.get(group_id)
            if old is None:
                continue
            g = old.copy()
            for member_id in member_ids:
                if member_id in g.members:
                    self._remove_member(g, member_id)
                    removed.append((group_id, member_id))
            if g.members != old.members:
                self._refresh(g, topics, force=True)
                records.extend(self._diff(old, g))
        return records, removed

    def metadata_changed(self, topics: Mapping[str, int]) -> list[Record]:
        """Topics were created, deleted or grew: groups whose subscriptions now cover other
        partitions get a new group epoch and target."""
        records: list[Record] = []
        for group_id in sorted(self.groups):
            old = self.groups[group_id]
            if not old.members:
                continue
            g = old.copy()
            self._refresh(g, topics, force=False)
            records.extend(self._diff(old, g))
        return records

    # ----- offsets, admin -----

    def commit(
        self,
        group_id: str,
        member_id: str,
        member_epoch: int,
        entries: Sequence[CommitEntry],
        *,
        now_ms: int,
    ) -> list[Record]:
        """The records of an offset commit; raises for a commit the group refuses."""
        try:
            group_prefix(group_id)
        except ValueError as exc:
            raise InvalidRequest(f"bad group id: {exc}") from None
        if len(entries) > OFFSETS_PER_COMMIT_MAX:
            raise InvalidRequest(f"more than {OFFSETS_PER_COMMIT_MAX} offsets in one commit")
        for entry in entries:
            if entry.partition < 0 or entry.offset < 0 or not entry.topic:
                raise InvalidRequest(
                    f"bad offset commit {entry.topic!r}/{entry.partition} at {entry.offset}"
                )
            if len(entry.metadata) > METADATA_CHARS_MAX:
                raise InvalidRequest(f"commit metadata longer than {METADATA_CHARS_MAX}")
        g = self.groups.get(group_id)
        if not member_id and member_epoch == LEAVE_EPOCH:
            if g is not None and g.members:
                raise GroupNotEmpty(
                    f"group {group_id!r} has {len(g.members)} members: an admin offset commit "
                    "needs a group without members",
                    group_id=group_id,
                )
        else:
            cur = g.current.get(member_id) if g is not None else None
            if cur is None or cur.epoch == STATIC_LEAVE_EPOCH:
                raise UnknownMemberId(
                    f"member {member_id!r} is not in group {group_id!r}", group_id=group_id
                )
            if member_epoch != cur.epoch:
                raise StaleMemberEpoch(
                    f"member {member_id!r} of group {group_id!r} committed with epoch "
                    f"{member_epoch}, its epoch is {cur.epoch}",
                    member_epoch=str(member_epoch),
                    current_epoch=str(cur.epoch),
                )
            holds = cur.holds
            for entry in entries:
                if (entry.topic, entry.partition) not in holds:
                    raise Revoked(
                        f"member {member_id!r} of group {group_id!r} does not own "
                        f"{entry.topic}/{entry.partition}: not committed",
                        topic=entry.topic,
                        partition=str(entry.partition),
                    )
        return [
            Record(
                offset_key(group_id, e.topic, e.partition),
                encode_offset(OffsetValue(e.offset, e.metadata, now_ms)),
            )
            for e in entries
        ]

    def delete(self, group_id: str) -> list[Record]:
        """Tombstones for every record of a group without members."""
        g = self.groups.get(group_id)
        if g is None:
            raise UnknownGroup(f"group {group_id!r} does not exist", group_id=group_id)
        if g.members:
            raise GroupNotEmpty(
                f"group {group_id!r} has {len(g.members)} members: it can be deleted once "
                "they have left",
                group_id=group_id,
            )
        records = [Record(offset_key(group_id, t, p), None) for t, p in sorted(g.offsets)]
        if g.has_target_epoch:
            records.append(Record(target_epoch_key(group_id), None))
        if g.has_meta:
            records.append(Record(group_key(group_id), None))
        return records

    def reported_owned(self, group_id: str, member_id: str) -> frozenset[TP]:
        """What the member last reported it owns; the coordinator's view after a rebuild."""
        reported = self._reported.get((group_id, member_id))
        if reported is not None:
            return reported
        g = self.groups.get(group_id)
        cur = g.current.get(member_id) if g is not None else None
        return cur.holds if cur is not None else frozenset()

    def member_count(self) -> int:
        return sum(len(g.members) for g in self.groups.values())
