"""Three MultiRaft drivers in one event loop over an in-memory network: replication of real
partition logs, failover with an overwritten suffix, messages for groups not created yet,
snapshot catch-up after retention, and the leader's view of its followers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.unit.node_fakes import InstrumentedLog
from tidelog.config import TopicConfig
from tidelog.errors import LeaderNotAvailable, NotLeader, RequestTimedOut
from tidelog.node.metastore import MetaStore
from tidelog.node.metrics import NodeMetrics
from tidelog.node.multiraft import MultiRaft, RaftTiming, early_bytes_max, early_messages_max
from tidelog.node.partition import Partition
from tidelog.node.raft.limits import Config
from tidelog.node.raft.types import (
    ConfState,
    Entry,
    HardState,
    Message,
    MessageKind,
    Role,
    Snapshot,
    SnapshotMeta,
)
from tidelog.node.replica_storage import HardStateStore
from tidelog.records import decode_batches, encode_batch, validate_batches

TIMING = RaftTiming(tick_ms=10, heartbeat_interval_ms=20, election_timeout_ms=200)
CONFIG = TIMING.config(Config(always_append_empty=False))
GROUP = 42
VOTERS = frozenset({1, 2, 3})


@dataclass
class Net:
    """Delivers every message on the next loop iteration, except to or from nodes down."""

    nodes: dict[int, MultiRaft] = field(default_factory=dict)
    down: set[int] = field(default_factory=set)

    def sender(self, frm: int) -> _Sender:
        return _Sender(self, frm)

    def deliver(self, frm: int, to: int, group: int, msg: Message) -> None:
        if frm in self.down or to in self.down or to not in self.nodes:
            return
        self.nodes[to].deliver(frm, [(group, msg)])


@dataclass
class _Sender:
    net: Net
    frm: int

    def send(self, to_node: int, group: int, msg: Message) -> None:
        asyncio.get_running_loop().call_soon(self.net.deliver, self.frm, to_node, group, msg)


@dataclass
class Cluster:
    dir: Path
    net: Net
    stores: dict[int, MetaStore]
    parts: dict[int, Partition] = field(default_factory=dict)

    def add(self, node: int, config: TopicConfig | None = None) -> Partition:
        config = config or TopicConfig.from_overrides({})
        lg = InstrumentedLog(self.dir / f"n{node}" / "log", config)
        p = Partition("t", 0, lg, config, group_id=GROUP, replicas=sorted(VOTERS))
        raft = self.net.nodes[node]
        group = raft.add_group(GROUP, lg, ConfState(voters=VOTERS), p, durable=True, config=CONFIG)
        p.attach(group, raft)
        self.parts[node] = p
        return p

    async def start(self) -> Partition:
        """All three replicas, node 1 campaigning: the leader once elected."""
        for n in (1, 2, 3):
            self.add(n)
        self.net.nodes[1].campaign(self.parts[1].group)  # type: ignore[arg-type]
        return await self.leader()

    async def leader(self, among: frozenset[int] | set[int] | None = None) -> Partition:
        among = among or set(self.parts)
        async with asyncio.timeout(10):
            while True:
                leaders = [n for n in among if self.parts[n].serving]
                if len(leaders) == 1:
                    return self.parts[leaders[0]]
                await asyncio.sleep(0.01)

    async def produce(self, p: Partition, value: bytes) -> tuple[int, int]:
        buf = encode_batch([value])
        base, _last, index, term = p.propose(buf, validate_batches(buf))
        await p.wait_committed(index, term, 5)
        return base, index


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    net = Net()
    stores = {}
    for n in (1, 2, 3):
        stores[n] = MetaStore(tmp_path / f"n{n}" / "meta")
        raft = MultiRaft(n, HardStateStore(stores[n]), NodeMetrics(), TIMING, sender=net.sender(n))
        net.nodes[n] = raft
        raft.start()
    yield Cluster(tmp_path, net, stores)
    for raft in net.nodes.values():
        await raft.stop()
    for s in stores.values():
        s.close()


def values_of(p: Partition) -> list[bytes | None]:
    return [r.value for r in decode_batches(p.log.read(0, 1 << 30, upto=p.high_watermark))]


def raw_log(p: Partition) -> bytes:
    """Every stored batch, in index order, as bytes (segment boundaries may differ)."""
    lg = p.log
    return b"".join(lg.entries_by_index(lg.first_index, lg.last_index + 1, 1 << 30))


@pytest.mark.timeout(30)
async def test_replicates_commits_and_logs_are_identical(cluster: Cluster) -> None:
    for n in (1, 2, 3):
        cluster.add(n)
    cluster.net.nodes[1].campaign(cluster.parts[1].group)  # type: ignore[arg-type]
    leader = await cluster.leader()
    for i in range(20):
        base, _ = await cluster.produce(leader, b"v%d" % i)
        assert base == i  # the first leader of an empty log appends no EMPTY entry
    async with asyncio.timeout(5):
        while any(p.high_watermark < 20 for p in cluster.parts.values()):
            await asyncio.sleep(0.01)
    logs = {raw_log(p) for p in cluster.parts.values()}
    assert len(logs) == 1
    assert values_of(cluster.parts[2]) == [b"v%d" % i for i in range(20)]
    assert sorted(leader.in_sync()) == [1, 2, 3]
    assert {f for f, _ in leader.follower_lags()} == VOTERS - {leader.group.raw.id}  # type: ignore[union-attr]


@pytest.mark.timeout(30)
async def test_failover_overwrites_the_deposed_leaders_suffix(cluster: Cluster) -> None:
    old = await cluster.start()
    await cluster.produce(old, b"kept")
    old_id = old.group.raw.id  # type: ignore[union-attr]
    cluster.net.down.add(old_id)
    # The cut-off leader still takes a proposal; it can never commit.
    buf = encode_batch([b"lost"])
    _, _, index, term = old.propose(buf, validate_batches(buf))
    lost = asyncio.create_task(old.wait_committed(index, term, 10))
    new = await cluster.leader(VOTERS - {old_id})
    await cluster.produce(new, b"after")
    # Check-quorum: the old leader stepped down on its own, without hearing anything.
    async with asyncio.timeout(5):
        while old.role == Role.LEADER:
            await asyncio.sleep(0.01)
    cluster.net.down.clear()
    with pytest.raises(NotLeader):
        await lost
    async with asyncio.timeout(5):
        while values_of(old) != [b"kept", b"after"] or old.high_watermark != new.high_watermark:
            await asyncio.sleep(0.01)
    assert raw_log(old) == raw_log(new)
    # The new leader had uncommitted-to-it entries? It appended an EMPTY entry only if its
    # log held entries beyond its commit; either way the offsets of records stay increasing.
    await cluster.produce(new, b"more")
    assert values_of(new) == [b"kept", b"after", b"more"]


@pytest.mark.timeout(30)
async def test_a_stored_commit_never_covers_a_replaced_entry_before_its_fsync(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A deposed leader's suffix is replaced by one APPEND whose commit covers the new
    entries. The hard state and the log are separate files: if that commit were stored
    before the new entries' fsync, a power loss in between would bring the old suffix back
    under a stored commit, and the restarted replica would serve it as committed."""
    old = await cluster.start()
    await cluster.produce(old, b"kept")
    old_id = old.group.raw.id  # type: ignore[union-attr]
    old_log = old.log
    assert isinstance(old_log, InstrumentedLog)
    old_store = cluster.net.nodes[old_id]._hard_states
    violations: list[tuple[int, int]] = []
    saved: list[int] = []
    real_save = HardStateStore.save

    def save(self: HardStateStore, states: dict[int, HardState], **kw: Any) -> None:
        hs = states.get(GROUP)
        if self is old_store and hs is not None:
            saved.append(hs.commit)
            replaced = old_log.replaced_unsynced_from
            if replaced is not None and hs.commit >= replaced:
                violations.append((hs.commit, replaced))
        real_save(self, states, **kw)

    monkeypatch.setattr(HardStateStore, "save", save)
    cluster.net.down.add(old_id)
    for i in range(3):  # a suffix of several entries that can never commit
        buf = encode_batch([b"lost%d" % i])
        old.propose(buf, validate_batches(buf))
    new = await cluster.leader(VOTERS - {old_id})
    for i in range(3):
        await cluster.produce(new, b"after%d" % i)
    async with asyncio.timeout(5):
        while old.role == Role.LEADER:
            await asyncio.sleep(0.01)
    old_log.flush_delay_s = 0.3  # the new suffix's fsync takes a while
    cluster.net.down.clear()
    async with asyncio.timeout(10):
        while old.high_watermark != new.high_watermark or values_of(old)[-1] != b"after2":
            await asyncio.sleep(0.01)
    assert raw_log(old) == raw_log(new)
    assert saved, "the replica stored no hard state"
    assert violations == []


@pytest.mark.timeout(30)
async def test_messages_for_a_group_created_later_are_kept(cluster: Cluster) -> None:
    cluster.add(1)
    cluster.add(2)
    cluster.net.nodes[1].campaign(cluster.parts[1].group)  # type: ignore[arg-type]
    leader = await cluster.leader()
    await cluster.produce(leader, b"early")
    await asyncio.sleep(0.1)
    late = cluster.add(3)  # replays the heartbeats and appends it already got
    async with asyncio.timeout(5):
        while values_of(late) != [b"early"]:
            await asyncio.sleep(0.01)


@pytest.mark.timeout(30)
async def test_a_follower_behind_the_leaders_log_start_gets_a_snapshot(cluster: Cluster) -> None:
    small = TopicConfig.from_overrides({"segment.bytes": "4096", "retention.bytes": "8192"})
    for n in (1, 2, 3):
        cluster.add(n, small)
    cluster.net.nodes[1].campaign(cluster.parts[1].group)  # type: ignore[arg-type]
    leader = await cluster.leader()
    lid = leader.group.raw.id  # type: ignore[union-attr]
    behind = next(n for n in (1, 2, 3) if n != lid)
    cluster.net.down.add(behind)
    for i in range(100):
        await cluster.produce(leader, b"%03d" % i + b"x" * 300)
    assert leader.log.enforce_retention(below=leader.high_watermark) > 0
    start = leader.log.log_start_offset
    assert start > 0
    cluster.net.down.clear()
    p = cluster.parts[behind]
    async with asyncio.timeout(10):
        while p.log.log_end_offset != leader.log.log_end_offset:
            await asyncio.sleep(0.01)
    assert p.log.log_start_offset == start
    assert raw_log(p) == raw_log(leader)


@pytest.mark.timeout(30)
async def test_no_quorum_means_no_acknowledgement(cluster: Cluster) -> None:
    for n in (1, 2, 3):
        cluster.add(n)
    cluster.net.nodes[1].campaign(cluster.parts[1].group)  # type: ignore[arg-type]
    leader = await cluster.leader()
    lid = leader.group.raw.id  # type: ignore[union-attr]
    cluster.net.down.update(VOTERS - {lid})
    buf = encode_batch([b"alone"])
    _, _, index, term = leader.propose(buf, validate_batches(buf))
    with pytest.raises((RequestTimedOut, NotLeader)):
        await leader.wait_committed(index, term, 0.5)
    assert leader.high_watermark == 0


@pytest.mark.timeout(30)
async def test_read_barrier_confirms_leadership_and_refuses_a_cut_off_leader(
    cluster: Cluster,
) -> None:
    """Issue 8 defect 7c: a leader cut off from the others still believes it leads (and
    answers ListOffsets LATEST from its view) until check-quorum deposes it. A linearizable
    read (ReadIndex) is answered only once a majority confirmed the leadership."""
    old = await cluster.start()
    await cluster.produce(old, b"a")
    await old.read_barrier(5)
    assert old.high_watermark == 1
    old_id = old.group.raw.id  # type: ignore[union-attr]
    cluster.net.down.add(old_id)
    assert old.serving  # it does not know yet
    with pytest.raises((NotLeader, LeaderNotAvailable, RequestTimedOut)):
        await old.read_barrier(5)
    assert not old.group.reads  # type: ignore[union-attr]
    new = await cluster.leader(VOTERS - {old_id})
    await cluster.produce(new, b"b")
    await new.read_barrier(5)
    assert new.high_watermark > 1 and old.high_watermark == 1


async def test_an_entry_a_replica_cannot_apply_stops_its_group_not_skipped(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 8, defect 4: the driver used to log the failure and advance anyway, so the rest
    of that Ready counted as applied on this node only. Now the group stops there, loudly."""
    from tidelog.node.stm import UnappliableEntry

    for n in (1, 2, 3):
        cluster.add(n)
    cluster.net.nodes[1].campaign(cluster.parts[1].group)  # type: ignore[arg-type]
    leader = await cluster.leader()
    await cluster.produce(leader, b"a")
    victim_node, victim = next((n, p) for n, p in cluster.parts.items() if p is not leader)
    stuck_at = victim.applied_index
    real_apply = Partition.apply
    failing = True

    def apply(self: Partition, entries: tuple[Entry, ...]) -> None:
        if self is victim and failing:
            raise UnappliableEntry("entry from a newer version")
        real_apply(self, entries)

    monkeypatch.setattr(Partition, "apply", apply)
    for value in (b"b", b"c", b"d"):
        await cluster.produce(leader, value)
    group = victim.group
    assert group is not None
    async with asyncio.timeout(5):
        while not group.failed:
            await asyncio.sleep(0.01)
    failing = False
    await asyncio.sleep(0.2)
    assert victim.applied_index == stuck_at
    assert group.raw.applied_index == stuck_at  # never advanced past what it could not apply
    metrics = cluster.net.nodes[victim_node]._metrics
    assert metrics.apply_failures._value.get() == 1
    assert metrics.groups_offline._value.get() == 1
    # The other two replicas go on committing.
    await cluster.produce(leader, b"e")
    assert values_of(leader)[-1] == b"e"


# ---- forged messages (issue 9, A3): refused by raft/guard.py, counted, nothing changes ----


def refused(raft: MultiRaft, reason: str) -> float:
    value = raft._metrics.registry.get_sample_value(
        "tidelog_raft_messages_refused_total", {"reason": reason}
    )
    return value or 0.0


@pytest.mark.timeout(30)
async def test_forged_messages_are_refused_and_change_nothing(cluster: Cluster) -> None:
    for n in (1, 2, 3):
        cluster.add(n)
    cluster.net.nodes[1].campaign(cluster.parts[1].group)  # type: ignore[arg-type]
    leader = await cluster.leader()
    for i in range(5):
        await cluster.produce(leader, b"v%d" % i)
    lid = leader.group.raw.id  # type: ignore[union-attr]
    fid, other = sorted(VOTERS - {lid})
    follower = cluster.parts[fid]
    async with asyncio.timeout(5):
        while follower.high_watermark < 5:
            await asyncio.sleep(0.01)
    raft = cluster.net.nodes[fid]
    raw = follower.group.raw  # type: ignore[union-attr]
    term, last = raw.term, raw.log.last_index()
    before = (values_of(follower), follower.log.log_start_offset, raw_log(follower))

    batch = encode_batch([b"injected"])
    forged_entry = Entry(term + 1, last + 1, batch)
    snap = Snapshot(SnapshotMeta(5000, term, ConfState(voters=VOTERS)), b"")
    forgeries: list[tuple[str, Message]] = [
        # A non-member (99) with a higher term appends a record.
        ("not_member", Message(MessageKind.APPEND, 99, fid, term + 1, log_term=term,
                               index=last, entries=(forged_entry,), commit=last + 1)),
        # A member that does not lead this term sends a snapshot (would wipe the log).
        ("not_leader", Message(MessageKind.SNAPSHOT, other, fid, term, snapshot=snap)),
        # A member that does not lead this term appends.
        ("not_leader", Message(MessageKind.APPEND, other, fid, term, log_term=term,
                               index=last, entries=(Entry(term, last + 1, batch),),
                               commit=last + 1)),
        # A term far beyond the group's (2^63 - 1 would break Metadata's int64 leader_term).
        ("term_too_far", Message(MessageKind.HEARTBEAT, other, fid, 2**63 - 1)),
        ("term_too_far", Message(MessageKind.VOTE, other, fid, term + 2_000_000,
                                 log_term=2**62, index=2**62)),
    ]  # fmt: skip
    for reason, msg in forgeries:
        count = refused(raft, reason)
        raft.deliver(msg.frm, [(GROUP, msg)])
        assert refused(raft, reason) == count + 1, reason
    await asyncio.sleep(0.2)  # several rounds and heartbeats
    assert raw.term == term and raw.leader_id == lid
    assert (values_of(follower), follower.log.log_start_offset, raw_log(follower)) == before
    # The group is healthy: the next record still commits everywhere.
    await cluster.produce(leader, b"after")
    async with asyncio.timeout(5):
        while values_of(follower)[-1:] != [b"after"]:
            await asyncio.sleep(0.01)


@pytest.mark.timeout(30)
async def test_early_messages_of_invented_groups_stay_bounded(cluster: Cluster) -> None:
    raft = cluster.net.nodes[1]
    payload = Entry(1, 1, b"x" * 64 * 1024)
    for group in range(100_000, 100_000 + 2 * early_messages_max):
        raft.deliver(2, [(group, Message(MessageKind.HEARTBEAT, 2, 1, 1))])
    assert raft._early_count <= early_messages_max
    assert len(raft._early) <= early_messages_max
    for group in range(1_000, 1_000 + 1_000):  # 64 MiB of appends
        raft.deliver(2, [(group, Message(MessageKind.APPEND, 2, 1, 1, entries=(payload,)))])
    assert raft._early_bytes <= early_bytes_max
    assert raft._early_count <= early_messages_max
    assert raft._early_bytes == sum(
        raft._early_size(m) for msgs in raft._early.values() for _at, _frm, m in msgs
    )


@pytest.mark.timeout(30)
async def test_a_hard_state_that_cannot_be_stored_fails_only_its_group(
    cluster: Cluster, tmp_path: Path
) -> None:
    """Every group's hard state is written in one batch per round: a value the store cannot
    encode (a negative vote once did) must not fail the write of every other group."""
    for n in (1, 2, 3):
        cluster.add(n)
    raft = cluster.net.nodes[1]
    other_log = InstrumentedLog(tmp_path / "solo" / "log")
    solo = Partition("solo", 0, other_log, TopicConfig.from_overrides({}), group_id=7,
                     replicas=[1])  # fmt: skip
    solo_group = raft.add_group(7, other_log, ConfState(voters=frozenset({1})), solo,
                                durable=True, config=CONFIG)  # fmt: skip
    solo.attach(solo_group, raft)
    raft.campaign(solo_group)
    async with asyncio.timeout(5):
        while not solo.serving:
            await asyncio.sleep(0.01)
    bad = cluster.parts[1].group
    assert bad is not None
    bad.raw.vote = -5  # what a forged VOTE from node -5 made of it before the codec check
    bad.raw.term += 1
    raft.touch(bad)
    await cluster.produce(solo, b"still")
    async with asyncio.timeout(5):
        while not bad.failed:
            await asyncio.sleep(0.01)
    assert not solo_group.failed
    assert values_of(solo) == [b"still"]


@pytest.mark.timeout(60)
async def test_a_stalled_fsync_of_one_group_does_not_silence_the_others(
    cluster: Cluster,
) -> None:
    """Issue 8, defect 5: every group's messages used to wait for the whole round's fsyncs,
    so one partition's slow disk stopped the heartbeats (and commits) of every group its
    node leads, and their followers started elections. Now each group goes on as soon as
    its own writes are durable, and later rounds run beside a stalled one."""
    config = TopicConfig.from_overrides({})
    other: dict[int, Partition] = {}
    logs: dict[int, InstrumentedLog] = {}
    for n in (1, 2, 3):
        cluster.add(n)
        lg = logs[n] = InstrumentedLog(cluster.dir / f"n{n}" / "other", config)
        p = Partition("u", 0, lg, config, group_id=GROUP + 1, replicas=sorted(VOTERS))
        raft = cluster.net.nodes[n]
        g = raft.add_group(GROUP + 1, lg, ConfState(voters=VOTERS), p, durable=True, config=CONFIG)
        p.attach(g, raft)
        other[n] = p
    cluster.net.nodes[1].campaign(cluster.parts[1].group)  # type: ignore[arg-type]
    cluster.net.nodes[1].campaign(other[1].group)  # type: ignore[arg-type]
    async with asyncio.timeout(10):
        while not (cluster.parts[1].serving and other[1].serving):
            await asyncio.sleep(0.01)
    term = cluster.parts[1].term
    # Node 1's disk under group "u" stalls for 10 election timeouts.
    logs[1].flush_delay_s = 2.0
    stalled = asyncio.ensure_future(cluster.produce(other[1], b"slow"))
    await asyncio.sleep(0.05)
    t0 = asyncio.get_running_loop().time()
    for i in range(20):
        await cluster.produce(cluster.parts[1], b"%d" % i)
    took = asyncio.get_running_loop().time() - t0
    assert took < 1.5, f"the healthy group waited for the stalled fsync ({took:.2f} s)"
    assert cluster.parts[1].serving and cluster.parts[1].term == term  # no election
    await stalled
    logs[1].flush_delay_s = 0.0


@pytest.mark.timeout(60)
async def test_a_commit_does_not_wait_for_the_fsync_of_newer_entries(cluster: Cluster) -> None:
    """Issue 15: under load the leader's rounds run back to back, each fsyncing the newest
    proposals; the followers' answers for an entry arrive while the leader fsyncs the next
    ones. The entry's commit used to be applied (and its producer answered) only after that
    later fsync too; now it is applied at once, since earlier rounds already made it durable.
    It is still never acknowledged before the leader's own fsync of it."""
    # Elections far slower than the stalled fsyncs below (a leader's group sends nothing
    # while its round waits for its disk).
    patient = RaftTiming(tick_ms=10, heartbeat_interval_ms=20, election_timeout_ms=10_000)
    config = TopicConfig.from_overrides({})
    for n in (1, 2, 3):
        lg_n = InstrumentedLog(cluster.dir / f"n{n}" / "log", config)
        p = Partition("t", 0, lg_n, config, group_id=GROUP, replicas=sorted(VOTERS))
        raft = cluster.net.nodes[n]
        g = raft.add_group(
            GROUP, lg_n, ConfState(voters=VOTERS), p, durable=True,
            config=patient.config(Config(always_append_empty=False)),
        )  # fmt: skip
        p.attach(g, raft)
        cluster.parts[n] = p
    cluster.net.nodes[1].campaign(cluster.parts[1].group)  # type: ignore[arg-type]
    leader = await cluster.leader()
    assert leader is cluster.parts[1]
    await cluster.produce(leader, b"warm")
    lg = leader.log
    assert isinstance(lg, InstrumentedLog)
    delay = 0.6
    lg.flush_delay_s = delay  # the leader's disk is slow; the followers' are not
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    first = asyncio.ensure_future(cluster.produce(leader, b"first"))
    await asyncio.sleep(0.1)  # while the leader fsyncs "first"
    second = asyncio.ensure_future(cluster.produce(leader, b"second"))
    await first
    took = loop.time() - t0
    # Not before the leader's own copy is durable (one fsync) ...
    assert took >= delay * 0.95, f"acknowledged before the leader's fsync ({took:.2f} s)"
    # ... and not after the fsync of "second" (which ends about 2 * delay from t0).
    assert took < 1.6 * delay, f"the commit waited for the next round's fsync ({took:.2f} s)"
    assert not second.done()
    await second
    lg.flush_delay_s = 0.0
    assert values_of(leader) == [b"warm", b"first", b"second"]
    for n in (2, 3):
        async with asyncio.timeout(5):
            while values_of(cluster.parts[n]) != values_of(leader):
                await asyncio.sleep(0.01)


@pytest.mark.timeout(30)
async def test_commit_only_hard_states_are_stored_unsynced_and_seldom(cluster: Cluster) -> None:
    """A term or vote is synced before anything depends on it. A partition's commit-only
    change is stored unsynced, on a follower at most every COMMIT_STORE_INTERVAL_S, even from
    rounds that appended entries (their log's own fsync makes them durable; a lost commit index is
    relearned from the leader), and what waited is stored in the end."""
    saves: dict[int, list[tuple[dict[int, HardState], bool]]] = {1: [], 2: [], 3: []}
    for n, raft in cluster.net.nodes.items():
        store = raft._hard_states
        real = store.save

        def save(
            states: dict[int, HardState],
            *,
            sync: bool,
            confs: Any = None,
            real: Any = real,
            n: int = n,
        ) -> None:
            saves[n].append((dict(states), sync))
            real(states, sync=sync, confs=confs)

        store.save = save  # type: ignore[method-assign]
    leader = await cluster.start()
    # The election stored terms and votes, synced, on every node.
    for n in (1, 2, 3):
        assert any(sync and GROUP in states for states, sync in saves[n]), saves[n]
        saves[n].clear()
    rounds = {n: raft.rounds for n, raft in cluster.net.nodes.items()}
    for i in range(40):
        await cluster.produce(leader, b"v%d" % i)
    commit = leader.group.raw.commit_index  # type: ignore[union-attr]
    async with asyncio.timeout(5):
        while any(
            raft._hard_states.load(GROUP).commit < commit for raft in cluster.net.nodes.values()
        ):
            await asyncio.sleep(0.01)
    leader_id = leader.group.raw.id  # type: ignore[union-attr]
    for n, raft in cluster.net.nodes.items():
        writes = [sync for states, sync in saves[n] if GROUP in states]
        assert writes and not any(writes), saves[n]
        if n == leader_id:
            # The leader stores each commit (a restarted lone leader must not append an
            # EMPTY entry, which takes an offset, to recommit what it already had).
            assert len(writes) >= 40
            continue
        # A follower: far fewer writes than rounds (40 writes one at a time take tens).
        assert raft.rounds - rounds[n] >= 40
        assert len(writes) <= (raft.rounds - rounds[n]) // 4, (len(writes), raft.rounds)
