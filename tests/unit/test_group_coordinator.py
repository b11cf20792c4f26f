"""The group coordinator's state machine through scripted joins, leaves, timeouts and
revocations, with a model check after every step: no partition is ever owned by two members
at once (per the members' own ownership and the coordinator's grants), and replaying the
records (in log order, and as a compacted table in key order) rebuilds the same state."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest

from tidelog.controller.groups.assignors import TP
from tidelog.controller.groups.records import Record, group_prefix, parse_key
from tidelog.controller.groups.state import (
    CommitEntry,
    GroupConfig,
    GroupCoordinator,
    HeartbeatInput,
)
from tidelog.errors import (
    FencedMemberEpoch,
    GroupNotEmpty,
    InvalidRequest,
    InvalidSubscription,
    Revoked,
    StaleMemberEpoch,
    UnknownGroup,
    UnknownMemberId,
    UnreleasedInstanceId,
)

G = "g"
CONFIG = GroupConfig(
    heartbeat_interval_ms=100,
    session_timeout_ms=1000,
    session_timeout_min_ms=500,
    rebalance_timeout_ms=2000,
)


@dataclass
class Member:
    """A well-behaved consumer as the protocol asks: it revokes what the answer drops (at
    once, or on its next heartbeat when ``lazy``), takes what it adds, and reports ownership
    whenever it changed."""

    name: str
    topics: tuple[str, ...] | None = ("t",)
    regex: str | None = None
    instance_id: str | None = None
    lazy: bool = False
    assignor: str | None = None
    member_id: str = ""
    epoch: int = 0
    owned: set[TP] = field(default_factory=set)
    allowed: frozenset[TP] | None = None
    report: bool = True
    alive: bool = True
    joined: bool = False
    answers: list[frozenset[TP] | None] = field(default_factory=list)


class Harness:
    def __init__(self, topics: dict[str, int] | None = None) -> None:
        self.coord = GroupCoordinator(CONFIG)
        self.topics = topics if topics is not None else {"t": 6}
        self.now_ms = 0
        self.log: list[Record] = []
        self.members: dict[str, Member] = {}
        self._ids = 0

    # -- driving --

    def write(self, records: list[Record]) -> None:
        self.log.extend(records)
        self.coord.apply(records, self.now_ms)
        self.check()

    def add(self, member: Member) -> Member:
        self.members[member.name] = member
        return member

    def heartbeat(self, m: Member) -> None:
        assert m.alive
        if m.lazy and m.allowed is not None:
            self._take(m)
        first = not m.joined
        self._ids += 1
        req = HeartbeatInput(
            group_id=G,
            member_id=m.member_id,
            member_epoch=m.epoch,
            instance_id=m.instance_id,
            topic_names=m.topics if first and m.regex is None else None,
            regex=m.regex if first else None,
            server_assignor=m.assignor if first else None,
            owned=frozenset(m.owned) if m.report or first else None,
        )
        out = self.coord.heartbeat(
            req, now_ms=self.now_ms, topics=self.topics, new_member_id=f"id{self._ids}-{m.name}"
        )
        self.write(out.records)
        m.joined = True
        m.member_id = out.answer.member_id
        m.epoch = out.answer.member_epoch
        m.answers.append(out.answer.assignment)
        m.report = False
        if out.answer.assignment is not None:
            m.allowed = out.answer.assignment
            if not m.lazy:
                self._take(m)

    def _take(self, m: Member) -> None:
        assert m.allowed is not None
        before = set(m.owned)
        m.owned &= m.allowed  # revoke first (stop fetching, commit)
        m.owned |= m.allowed  # then take what is granted
        if m.owned != before:
            m.report = True
        m.allowed = None
        self.check()

    def leave(self, m: Member, *, static: bool = False) -> None:
        req = HeartbeatInput(G, m.member_id, -2 if static else -1)
        out = self.coord.heartbeat(req, now_ms=self.now_ms, topics=self.topics, new_member_id="x")
        m.owned.clear()
        m.alive = False
        self.write(out.records)

    def kill(self, m: Member) -> None:
        m.alive = False
        m.owned.clear()

    def advance(self, ms: int) -> list[tuple[str, str]]:
        self.now_ms += ms
        records, removed = self.coord.expire(self.now_ms, self.topics)
        # The session timeout is the failure detector: a member it removes is presumed dead
        # (a live one learns it from UNKNOWN_MEMBER_ID and drops everything).
        for _, member_id in removed:
            for m in self.members.values():
                if m.member_id == member_id:
                    self.kill(m)
        self.write(records)
        return removed

    def round(self) -> None:
        for m in list(self.members.values()):
            if m.alive:
                self.heartbeat(m)
        self.advance(CONFIG.heartbeat_interval_ms)

    def settle(self, rounds_max: int = 20) -> int:
        for n in range(rounds_max):
            self.round()
            g = self.coord.groups.get(G)
            if (
                g is not None
                and g.state_name in ("stable", "empty")
                and all(
                    m.owned == g.target.get(m.member_id, frozenset())
                    for m in self.members.values()
                    if m.alive
                )
            ):
                return n + 1
        raise AssertionError(f"group did not settle in {rounds_max} rounds")

    def owners(self) -> dict[TP, str]:
        return {tp: m.name for m in self.members.values() if m.alive for tp in m.owned}

    def update_topics(self, topics: dict[str, int]) -> None:
        self.topics = topics
        self.write(self.coord.metadata_changed(topics))

    # -- the model check --

    def check(self) -> None:
        g = self.coord.groups.get(G)
        grants: dict[TP, str] = {}
        if g is not None:
            for member_id, cur in g.current.items():
                for tp in (*cur.assigned, *cur.pending):
                    assert tp not in grants, f"{tp} granted to {grants[tp]} and {member_id}"
                    grants[tp] = member_id
        owners: dict[TP, str] = {}
        for m in self.members.values():
            if not m.alive:
                continue
            for tp in m.owned:
                assert tp not in owners, f"{tp} owned by {owners[tp]} and {m.name}"
                owners[tp] = m.name
                # A member owns only what the coordinator lets it hold.
                assert grants.get(tp) == m.member_id, f"{m.name} owns {tp} without a grant"

    def rebuild_check(self) -> None:
        """Replaying the log, and the compacted table in key order, gives the same state."""
        replayed = GroupCoordinator(CONFIG)
        replayed.apply(self.log)
        assert replayed.groups == self.coord.groups
        table: dict[bytes, bytes] = {}
        for record in self.log:
            if record.value is None:
                table.pop(record.key, None)
            else:
                table[record.key] = record.value
        from_table = GroupCoordinator(CONFIG)
        from_table.apply(Record(k, v) for k, v in sorted(table.items()))
        assert from_table.groups == self.coord.groups


def test_three_members_on_six_partitions_own_each_partition_once() -> None:
    h = Harness()
    for name in ("a", "b", "c"):
        h.add(Member(name))
    h.settle()
    owners = h.owners()
    assert sorted(owners) == [("t", p) for p in range(6)]
    assert sorted(len(m.owned) for m in h.members.values()) == [2, 2, 2]
    g = h.coord.groups[G]
    assert g.state_name == "stable"
    assert {cur.epoch for cur in g.current.values()} == {g.assignment_epoch}
    h.rebuild_check()


def test_a_fourth_member_moves_only_its_share_and_only_after_revocation() -> None:
    h = Harness()
    for name in ("a", "b", "c"):
        h.add(Member(name, lazy=True))
    h.settle()
    before = h.owners()
    d = h.add(Member("d", lazy=True))
    # d joins first: it gets nothing yet (the partitions are still owned), an explicit answer.
    h.heartbeat(d)
    assert d.answers[-1] is not None
    assert d.owned == set()
    h.settle()
    after = h.owners()
    moved = [tp for tp in after if before[tp] != after[tp]]
    assert len(moved) == 1 or len(moved) == 2
    assert {after[tp] for tp in moved} == {"d"}
    # Members that kept partitions never lost them on the way (checked at every step by the
    # model check; here: what they hold now they held before).
    for m in h.members.values():
        if m.name != "d":
            assert m.owned <= {tp for tp, name in before.items() if name == m.name}
    h.rebuild_check()


def test_untouched_members_keep_their_partitions_with_no_pause() -> None:
    h = Harness({"t": 4})
    a, b = h.add(Member("a")), h.add(Member("b"))
    h.settle()
    held = {name: set(m.owned) for name, m in h.members.items()}
    h.add(Member("c", topics=("other",)))  # subscribes to a topic that does not exist
    for _ in range(5):
        h.round()
        assert a.owned == held["a"] and b.owned == held["b"]
    assert h.members["c"].answers[0] == frozenset()  # an explicit empty assignment


def test_a_leave_frees_the_partitions_at_once() -> None:
    h = Harness()
    members = [h.add(Member(n)) for n in ("a", "b", "c")]
    h.settle()
    g_epoch = h.coord.groups[G].epoch
    h.leave(members[0])
    g = h.coord.groups[G]
    assert members[0].member_id not in g.members
    assert g.epoch == g_epoch + 1
    h.settle()
    assert sorted(len(m.owned) for m in members[1:]) == [3, 3]
    h.rebuild_check()


def test_a_silent_member_is_removed_after_its_session_timeout() -> None:
    h = Harness()
    a, b, c = (h.add(Member(n)) for n in ("a", "b", "c"))
    h.settle()
    h.heartbeat(c)
    h.kill(c)
    last_heartbeat_ms = h.now_ms
    removed: list[tuple[str, str]] = []
    while not removed:
        for m in (a, b):
            h.heartbeat(m)
        removed = h.advance(100)
    assert removed == [(G, c.member_id)]
    assert h.now_ms - last_heartbeat_ms == CONFIG.session_timeout_ms
    h.settle()
    assert sorted(len(m.owned) for m in (a, b)) == [3, 3]


def test_a_member_that_does_not_revoke_is_removed_after_its_rebalance_timeout() -> None:
    h = Harness()
    a = h.add(Member("a"))
    h.settle()
    assert len(a.owned) == 6
    stuck = True

    # a keeps heartbeating but never reports its revocation.
    def heartbeat_without_revoking() -> None:
        req = HeartbeatInput(G, a.member_id, a.epoch)
        out = h.coord.heartbeat(req, now_ms=h.now_ms, topics=h.topics, new_member_id="x")
        h.write(out.records)

    b = h.add(Member("b"))
    h.heartbeat(b)
    assert b.owned == set()
    heartbeat_without_revoking()
    assert h.coord.groups[G].current[a.member_id].state == "unrevoked"
    # A member that ignores revocations is outside the model check (it is what the rebalance
    # timeout is for): track only b's ownership from here.
    h.kill(a)
    removed: list[tuple[str, str]] = []
    while stuck:
        heartbeat_without_revoking()
        h.heartbeat(b)
        removed = h.advance(100)
        stuck = not removed
    assert removed == [(G, a.member_id)]
    h.settle()
    assert len(b.owned) == 6


def test_static_member_restart_moves_nothing() -> None:
    h = Harness()
    a = h.add(Member("a", instance_id="host-a"))
    b = h.add(Member("b", instance_id="host-b"))
    h.settle()
    held = set(a.owned)
    g = h.coord.groups[G]
    epoch, rebalances = g.epoch, h.coord.rebalances
    h.leave(a, static=True)
    g = h.coord.groups[G]
    assert a.member_id in g.members and g.epoch == epoch
    # While it is away, b gets nothing of a's.
    for _ in range(3):
        h.heartbeat(b)
    assert b.owned.isdisjoint(held)
    a2 = h.add(Member("a2", instance_id="host-a"))
    h.heartbeat(a2)
    assert a2.owned == held
    g = h.coord.groups[G]
    assert g.epoch == epoch and h.coord.rebalances == rebalances
    assert a.member_id not in g.members
    h.settle()
    h.rebuild_check()


def test_a_static_member_that_stays_away_is_removed_after_its_session() -> None:
    h = Harness()
    a = h.add(Member("a", instance_id="host-a"))
    b = h.add(Member("b"))
    h.settle()
    h.leave(a, static=True)
    removed: list[tuple[str, str]] = []
    for _ in range(15):
        h.heartbeat(b)
        removed += h.advance(100)
    assert removed == [(G, a.member_id)]
    h.settle()
    assert len(b.owned) == 6


def test_an_instance_id_held_by_an_active_member_is_refused() -> None:
    h = Harness()
    h.add(Member("a", instance_id="host-a"))
    h.settle()
    with pytest.raises(UnreleasedInstanceId):
        h.heartbeat(h.add(Member("dup", instance_id="host-a")))


def test_regex_subscriptions_and_topics_created_or_grown_later() -> None:
    h = Harness({"orders-eu": 2, "payments": 2, "__consumer_offsets": 4})
    a = h.add(Member("a", topics=None, regex="orders-.*"))
    h.settle()
    assert a.owned == {("orders-eu", 0), ("orders-eu", 1)}
    h.update_topics({"orders-eu": 2, "orders-us": 1, "payments": 2, "__consumer_offsets": 4})
    h.settle()
    assert ("orders-us", 0) in a.owned
    h.update_topics({"orders-eu": 4, "orders-us": 1, "payments": 2, "__consumer_offsets": 4})
    h.settle()
    assert len(a.owned) == 5
    # Topics a name subscription names become owned once they exist.
    b = h.add(Member("b", topics=("later",)))
    h.settle()
    assert b.owned == set()
    h.update_topics({**h.topics, "later": 2})
    h.settle()
    assert b.owned == {("later", 0), ("later", 1)}
    h.rebuild_check()


def test_a_regex_matches_whole_names_only() -> None:
    h = Harness({"orders": 1, "orders-old": 1})
    a = h.add(Member("a", topics=None, regex="orders"))
    h.settle()
    assert a.owned == {("orders", 0)}


@pytest.mark.parametrize(
    "req",
    [
        HeartbeatInput(G, "", 0, regex="orders-(", topic_names=None),
        HeartbeatInput(G, "", 0, regex="x", topic_names=("t",)),
        HeartbeatInput(G, "", 0),
    ],
)
def test_bad_subscriptions_are_refused(req: HeartbeatInput) -> None:
    coord = GroupCoordinator(CONFIG)
    with pytest.raises(InvalidSubscription):
        coord.heartbeat(req, now_ms=0, topics={"t": 1}, new_member_id="m")
    assert coord.groups == {}


def test_unknown_assignor_and_bad_epoch_are_refused() -> None:
    coord = GroupCoordinator(CONFIG)
    with pytest.raises(InvalidRequest):
        coord.heartbeat(
            HeartbeatInput(G, "", 0, topic_names=("t",), server_assignor="magic"),
            now_ms=0,
            topics={"t": 1},
            new_member_id="m",
        )
    with pytest.raises(UnknownMemberId):
        coord.heartbeat(HeartbeatInput(G, "ghost", 3), now_ms=0, topics={}, new_member_id="m")


def test_a_heartbeat_with_a_wrong_epoch_is_fenced_and_a_lost_answer_is_tolerated() -> None:
    h = Harness()
    a = h.add(Member("a"))
    h.settle()
    epoch = a.epoch
    with pytest.raises(FencedMemberEpoch):
        h.coord.heartbeat(
            HeartbeatInput(G, a.member_id, epoch + 5), now_ms=0, topics=h.topics, new_member_id="x"
        )
    b = h.add(Member("b"))
    h.settle()
    assert a.epoch > epoch
    # a lost the answer that bumped its epoch: its previous epoch with its ownership is fine.
    g = h.coord.groups[G]
    prev = g.current[a.member_id].previous_epoch
    out = h.coord.heartbeat(
        HeartbeatInput(G, a.member_id, prev, owned=frozenset(a.owned)),
        now_ms=h.now_ms,
        topics=h.topics,
        new_member_id="x",
    )
    assert out.answer.member_epoch == a.epoch
    assert out.answer.assignment == frozenset(a.owned)
    assert b.owned


def test_a_heartbeat_that_changes_nothing_writes_nothing() -> None:
    h = Harness()
    a = h.add(Member("a"))
    h.settle()
    out = h.coord.heartbeat(
        HeartbeatInput(G, a.member_id, a.epoch), now_ms=h.now_ms, topics=h.topics, new_member_id="x"
    )
    assert out.records == []
    assert out.answer.assignment is None
    assert out.answer.member_epoch == a.epoch


def test_commits_check_member_epoch_and_ownership() -> None:
    h = Harness()
    a, b = h.add(Member("a")), h.add(Member("b"))
    h.settle()
    mine = sorted(a.owned)[0]
    theirs = sorted(b.owned)[0]
    ok = h.coord.commit(G, a.member_id, a.epoch, [CommitEntry(*mine, 10)], now_ms=1)
    h.write(ok)
    assert h.coord.groups[G].offsets == {mine}
    with pytest.raises(Revoked):
        h.coord.commit(G, a.member_id, a.epoch, [CommitEntry(*theirs, 10)], now_ms=1)
    with pytest.raises(StaleMemberEpoch):
        h.coord.commit(G, a.member_id, a.epoch - 1, [CommitEntry(*mine, 10)], now_ms=1)
    with pytest.raises(UnknownMemberId):
        h.coord.commit(G, "ghost", 1, [CommitEntry(*mine, 10)], now_ms=1)
    with pytest.raises(GroupNotEmpty):
        h.coord.commit(G, "", -1, [CommitEntry(*mine, 0)], now_ms=1)
    with pytest.raises(InvalidRequest):
        h.coord.commit(G, a.member_id, a.epoch, [CommitEntry(mine[0], mine[1], -4)], now_ms=1)


def test_a_revoking_member_may_commit_what_it_still_owns() -> None:
    h = Harness()
    a = h.add(Member("a", lazy=True))
    h.settle()
    b = h.add(Member("b", lazy=True))
    h.heartbeat(b)
    h.heartbeat(a)  # a is told to revoke three partitions
    cur = h.coord.groups[G].current[a.member_id]
    assert cur.state == "unrevoked" and len(cur.pending) == 3
    # It commits its progress on them before it reports the revocation.
    pending = sorted(cur.pending)
    h.write(
        h.coord.commit(G, a.member_id, a.epoch, [CommitEntry(*tp, 5) for tp in pending], now_ms=1)
    )
    h.settle()
    with pytest.raises(Revoked):
        h.coord.commit(G, a.member_id, a.epoch, [CommitEntry(*pending[0], 6)], now_ms=2)


def test_delete_is_refused_while_members_exist_then_removes_everything() -> None:
    h = Harness()
    a = h.add(Member("a"))
    h.settle()
    h.write(h.coord.commit(G, a.member_id, a.epoch, [CommitEntry("t", 0, 3)], now_ms=1))
    with pytest.raises(GroupNotEmpty):
        h.coord.delete(G)
    h.leave(a)
    # An empty group takes admin commits.
    h.write(h.coord.commit(G, "", -1, [CommitEntry("t", 1, 7)], now_ms=2))
    h.write(h.coord.delete(G))
    assert G not in h.coord.groups
    with pytest.raises(UnknownGroup):
        h.coord.delete(G)
    h.rebuild_check()
    table: dict[bytes, bytes] = {}
    for record in h.log:
        if record.value is None:
            table.pop(record.key, None)
        else:
            table[record.key] = record.value
    assert not [k for k in table if k.startswith(group_prefix(G))]


def test_range_assignor_through_the_coordinator() -> None:
    h = Harness({"t": 5})
    a = h.add(Member("a", assignor="range"))
    b = h.add(Member("b", assignor="range"))
    h.settle()
    assert h.coord.groups[G].assignor == "range"
    first, second = sorted((a, b), key=lambda m: m.member_id)
    assert first.owned == {("t", 0), ("t", 1), ("t", 2)}
    assert second.owned == {("t", 3), ("t", 4)}


def test_every_record_key_parses_and_belongs_to_its_group() -> None:
    h = Harness()
    for name in ("a", "b"):
        h.add(Member(name))
    h.settle()
    for record in h.log:
        assert parse_key(record.key).group_id == G


def test_two_groups_in_one_coordinator_are_independent() -> None:
    coord = GroupCoordinator(CONFIG)
    answers: dict[str, frozenset[TP] | None] = {}
    for group in ("g1", "g2"):
        out = coord.heartbeat(
            HeartbeatInput(group, "", 0, topic_names=("t",)),
            now_ms=0,
            topics={"t": 3},
            new_member_id=f"m-{group}",
        )
        coord.apply(out.records)
        answers[group] = out.answer.assignment
    assert answers["g1"] == answers["g2"] == frozenset({("t", 0), ("t", 1), ("t", 2)})


@pytest.mark.parametrize(("seed", "members"), [(0, 200), (1, 120)])
def test_hundreds_of_members_with_random_churn_keep_every_invariant(
    seed: int, members: int
) -> None:
    rng = random.Random(seed)
    h = Harness({"t": 400, "u": 200, "w": 50})
    subs = [("t",), ("t", "u"), ("u", "w"), ("t", "u", "w")]
    count = 0

    def new_member() -> Member:
        nonlocal count
        count += 1
        static = rng.random() < 0.3
        return h.add(
            Member(
                f"m{count}",
                topics=rng.choice(subs),
                lazy=rng.random() < 0.5,
                instance_id=f"i{count}" if static else None,
            )
        )

    for _ in range(members):
        new_member()
    h.settle(rounds_max=40)
    assert len(h.coord.groups[G].members) == members
    for step in range(20):
        action = rng.random()
        alive = [m for m in h.members.values() if m.alive]
        if action < 0.3:
            for _ in range(rng.randint(1, 10)):
                new_member()
        elif action < 0.5:
            for m in rng.sample(alive, min(len(alive), rng.randint(1, 10))):
                h.leave(m, static=m.instance_id is not None and rng.random() < 0.5)
        elif action < 0.6:
            for m in rng.sample(alive, min(len(alive), rng.randint(1, 5))):
                h.kill(m)
        elif action < 0.7:
            grown = dict(h.topics)
            grown[rng.choice(sorted(grown))] += rng.randint(1, 5)
            h.update_topics(grown)
        for _ in range(rng.randint(1, 3)):
            for m in list(h.members.values()):
                if m.alive and rng.random() < 0.8:
                    h.heartbeat(m)
            h.advance(rng.choice([50, 100, 400]))
        if step % 10 == 9:
            h.rebuild_check()
    # Liveness: with everyone heartbeating the group converges and every subscribed
    # partition is owned by a live member.
    h.advance(CONFIG.session_timeout_ms * 3)  # the killed and the away expire
    for m in h.members.values():
        if m.alive and m.member_id not in h.coord.groups[G].members:
            m.alive = False
            m.owned.clear()
    h.settle(rounds_max=40)
    subscribed = {t for m in h.members.values() if m.alive for t in (m.topics or ())}
    expected = {(t, p) for t in subscribed for p in range(h.topics[t])}
    assert set(h.owners()) == expected
    h.rebuild_check()


def test_rebuild_restarts_session_timers() -> None:
    h = Harness()
    a = h.add(Member("a"))
    h.settle()
    h.now_ms += 50_000
    fresh = GroupCoordinator(CONFIG)
    fresh.apply(h.log)
    fresh.start_timers(h.now_ms)
    records, removed = fresh.expire(h.now_ms + CONFIG.session_timeout_ms - 1, h.topics)
    assert removed == [] and records == []
    _, removed = fresh.expire(h.now_ms + CONFIG.session_timeout_ms, h.topics)
    assert removed == [(G, a.member_id)]
