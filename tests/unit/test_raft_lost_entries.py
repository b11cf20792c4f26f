"""A replica that lost entries it acknowledged (a machine crash under flush=os, a recovery that
cut fsynced data): it must neither vote nor campaign until a leader has brought its log back
beyond what it lost, and the leader must probe it again below ``match``.

The driver-side half (the stored commit index beyond the recovered log becomes ``lost_to``)
is tested over a real partition log and RocksDB at the end."""

from __future__ import annotations

from pathlib import Path

from tests.unit.raft_interaction.harness import Cluster, seeded
from tidelog.config import TopicConfig
from tidelog.node.log import PartitionLog
from tidelog.node.metastore import MetaStore
from tidelog.node.metrics import NodeMetrics
from tidelog.node.multiraft import MultiRaft, RaftGroup
from tidelog.node.raft.core import NEW_REPLICA, RawNode
from tidelog.node.raft.limits import Config
from tidelog.node.raft.progress import ProgressState
from tidelog.node.raft.storage import MemoryStorage
from tidelog.node.raft.types import (
    ConfState,
    Entry,
    HardState,
    Message,
    MessageKind,
    Role,
    Snapshot,
    SoftState,
)
from tidelog.node.replica_storage import HardStateStore, ReplicaStorage
from tidelog.records import encode_batch, iter_headers, stamp

K = MessageKind
GROUP = 7


def lose_tail(c: Cluster, nid: int, keep: int, *, lost_to: int | None = None) -> None:
    """Restart ``nid`` with only its first ``keep`` entries, its stored term and vote, and a
    commit clamped to ``keep`` (what the node's storage does). ``lost_to``: tell the core
    what the stored commit was (the driver does), else it learns of the loss from a leader."""
    node = c.nodes[nid]
    old = node.storage
    hs = old.hard_state()
    storage = MemoryStorage(c.conf)
    storage.append(c.log_of(nid)[:keep])
    storage.set_hard_state(HardState(hs.term, hs.vote, min(hs.commit, keep)))
    node.storage = storage
    node.applied = [e for e in node.applied if e.index <= keep]
    c.outbox = [m for m in c.outbox if m.frm != nid and m.to != nid]
    if lost_to is None:
        node.raft = RawNode(nid, storage, c.rngs[nid], c.config, applied=keep)
    else:
        node.raft = RawNode(nid, storage, c.rngs[nid], c.config, applied=keep, lost_to=lost_to)


def elect_among_2_and_3(c: Cluster) -> int:
    """Tick nodes 2 and 3 (node 1 is down) until one of them leads; that one."""
    for _ in range(10 * c.config.election_timeout_ticks):
        c.tick(2)
        c.tick(3)
        c.stabilize()
        if Role.LEADER in (c[2].role, c[3].role):
            break
    leader = 2 if c[2].role == Role.LEADER else 3
    assert c[leader].role == Role.LEADER
    return leader


def test_leader_reprobes_a_follower_that_lost_acknowledged_entries() -> None:
    c = Cluster([1, 2, 3])
    c.elect(1)
    for i in range(5):
        c[1].propose(b"%d" % i)
    c.stabilize()
    assert c[1].commit_index == 6
    pr = c[1].progress(3)
    assert pr is not None and pr.match == 6
    # 3 comes back with entries 4..6 gone and no idea of it (its commit index was lost too).
    lose_tail(c, 3, keep=3)
    assert c[3].lost_to == 0
    # The leader's heartbeat carries commit 6 (what 3 acknowledged): 3 finds out, and the
    # leader, told that 3's log ends below match, probes it again and resends 4..6. (The
    # first periodic round skips 3, which was sent APPENDs since the last one.)
    c.tick(1, 2 * c.config.heartbeat_interval_ticks)
    c.stabilize()
    assert [e.data for e in c.log_of(3)] == [e.data for e in c.log_of(1)]
    assert c[3].commit_index == 6 and c[3].lost_to == 0
    pr = c[1].progress(3)
    assert pr is not None and pr.match == 6 and pr.state == ProgressState.REPLICATE
    # New proposals replicate to it again.
    c[1].propose(b"after")
    c.stabilize()
    assert c[3].log.last_index() == 7 and c[3].commit_index == 7


def test_append_rejected_below_match_resets_the_progress() -> None:
    c = Cluster([1, 2, 3])
    c.elect(1)
    for i in range(3):
        c[1].propose(b"%d" % i)
    c.stabilize()
    lose_tail(c, 3, keep=2)
    # A proposal reaches 3 first (no heartbeat yet): the APPEND after index 4 is rejected
    # with a hint (2) below match (4).
    c[1].propose(b"next")
    c.stabilize()
    assert [e.data for e in c.log_of(3)] == [e.data for e in c.log_of(1)]
    assert c[3].log.last_index() == 5 and c[3].commit_index == 5


def test_a_replica_that_lost_entries_does_not_vote_until_caught_up() -> None:
    # 2 and 3 draw different election timeouts (the last step needs one of them to win).
    c = Cluster([1, 2, 3], rngs={2: seeded(2), 3: seeded(3)})
    c.elect(1)
    c.isolate(2)
    for i in range(4):
        c[1].propose(b"%d" % i)
    c.stabilize()
    assert c[1].commit_index == 5 and c[2].log.last_index() == 1  # committed by 1 and 3
    # 3 loses entries 2..5, which it acknowledged; its storage knew it had committed 5.
    lose_tail(c, 3, keep=1, lost_to=5)
    assert c[3].lost_to == 5
    # 1 goes down. 2 (lacking 2..5) campaigns: 3's log looks as good as 2's, but 3 must not
    # vote, or 2 would win and the committed entries 2..5 would be gone.
    c.down.add(1)
    c.heal()
    for _ in range(5):
        c[2].campaign()
        c.stabilize()
        assert c[2].role != Role.LEADER
    # 3 may stand, but its own vote does not count: 2's grant alone is no majority, and 1,
    # silent, keeps the election from being unanimous. It does not win.
    c.tick(3, 3 * c.config.election_timeout_ticks)
    c.stabilize()
    assert c[3].role != Role.LEADER and c[2].role != Role.LEADER
    # 1 returns and wins (2 votes for it: 1's log is more up to date); 3 catches up...
    c.down.discard(1)
    c.outbox.clear()
    c.elect(1)
    c.tick(1, 2 * c.config.heartbeat_interval_ticks)
    c.stabilize()
    assert [e.data for e in c.log_of(3)][:5] == [e.data for e in c.log_of(1)][:5]
    assert c[3].lost_to == 0
    # ... and votes again: with 1 down, 2 and 3 elect a leader (each needs the other's vote),
    # and it holds the committed entries.
    c.down.add(1)
    leader = elect_among_2_and_3(c)
    assert [e.data for e in c.log_of(leader)][:5] == [e.data for e in c.log_of(1)][:5]


def test_a_majority_that_lost_entries_elects_the_intact_replica_unanimously() -> None:
    """Node simulation, flush-os seed 20: a power loss of two of three machines under
    flush=os left both recovering, and as neither voted, the intact third could never be
    elected: the group stayed without a leader for good. Their rejections now say that the
    candidate's log is as up to date as theirs, and with every voter answering so (or
    granting) it wins; with one voter silent, the old rule holds."""
    c = Cluster([1, 2, 3], rngs={2: seeded(2), 3: seeded(3)})
    c.elect(1)
    for i in range(4):
        c[1].propose(b"%d" % i)
    c.stabilize()
    assert c[1].commit_index == 5
    # 1 loses power and comes back having lost 3..5; 2 too (2..5): both recovering.
    lose_tail(c, 1, keep=2, lost_to=5)
    lose_tail(c, 2, keep=1, lost_to=5)
    # 3, intact, campaigns with 1 unreachable: 2's answer alone does not elect it.
    c.down.add(1)
    for _ in range(3):
        c[3].campaign()
        c.stabilize()
        assert c[3].role != Role.LEADER
    # With every voter answering, 3 wins, and brings both back to its log.
    c.down.discard(1)
    c[3].campaign()
    c.stabilize()
    assert c[3].role == Role.LEADER
    c.tick(3, 2 * c.config.heartbeat_interval_ticks)
    c.stabilize()
    for nid in (1, 2):
        assert [e.data for e in c.log_of(nid)] == [e.data for e in c.log_of(3)]
        assert c[nid].lost_to == 0
    assert [e.data for e in c.log_of(3)][1:5] == [b"0", b"1", b"2", b"3"]


def test_a_recovering_voter_does_not_help_a_candidate_less_up_to_date_than_it() -> None:
    """The marked rejection is only for candidates whose log is at least as up to date as
    the voter's own. 1 missed entries 2..5 (cut off); 2 and 3 lost some of them in a power
    loss, but 2 still holds 2..3: 1 must not win, or 2..3 would be gone from the group."""
    c = Cluster([1, 2, 3], rngs={2: seeded(2), 3: seeded(3)})
    c.elect(3)
    c.isolate(1)
    for i in range(4):
        c[3].propose(b"%d" % i)
    c.stabilize()
    assert c[3].commit_index == 5 and c[1].log.last_index() == 1
    lose_tail(c, 2, keep=3, lost_to=5)
    lose_tail(c, 3, keep=1, lost_to=5)
    c.heal()
    for _ in range(3):
        c[1].campaign()
        c.stabilize()
        assert c[1].role != Role.LEADER
    assert [e.data for e in c.log_of(2)][1:3] == [b"0", b"1"]


def test_lost_to_within_the_log_is_no_loss() -> None:
    c = Cluster([1, 2, 3])
    c.elect(1)
    node = c.nodes[3]
    raw = RawNode(3, node.storage, c.rngs[3], c.config, lost_to=node.storage.last_index())
    assert raw.lost_to == 0


def test_storage_that_lost_acknowledged_entries_restarts_recovering(tmp_path: Path) -> None:
    """Over the real partition log and RocksDB: a log that lost its tail while the stored
    commit index is beyond it (a machine crash under flush=os) starts a group that does not
    vote, and whose stored commit index stays the evidence of the loss."""
    conf = ConfState(voters=frozenset({1, 2, 3}))
    cfg = TopicConfig.from_overrides({})
    lg = PartitionLog(tmp_path / "log", cfg)
    s = ReplicaStorage(lg, HardState(), conf)
    s.append([Entry(2, i, stamped([b"%d" % i], i - 1, 2, i)) for i in range(1, 6)])
    lg.flush()
    keep = lg.end_offset_at_index(2)
    assert keep is not None
    lg.close()
    store = MetaStore(tmp_path / "meta")
    hard_states = HardStateStore(store)
    hard_states.save({GROUP: HardState(term=2, vote=1, commit=5)}, sync=True)
    # The machine crash: the last three batches never reached the disk.
    (segment,) = sorted((tmp_path / "log").glob("*.log"))
    with segment.open("r+b") as f:
        f.truncate(sum(h.size for _pos, h in list(iter_headers(segment.read_bytes()))[:2]))
    lg = PartitionLog(tmp_path / "log", cfg)
    assert (lg.last_index, lg.log_end_offset) == (2, keep)

    storage = ReplicaStorage(lg, hard_states.load(GROUP), conf)
    assert storage.lost_to == 5 and storage.hard_state().commit == 2
    driver = MultiRaft(2, hard_states, NodeMetrics())
    group = driver.add_group(GROUP, lg, conf, _NullHandler(), durable=True, config=Config())
    raw = group.raw
    assert raw.lost_to == 5 and raw.commit_index == 2
    # Node 3's log ends at index 2 too: granting it a vote could elect a leader lacking 3..5.
    raw.step(Message(K.VOTE, 3, 2, 3, log_term=2, index=2))
    raw.step(Message(K.PRE_VOTE, 3, 2, 4, log_term=2, index=2))
    answers = [m for m in raw.ready().messages if m.kind in (K.VOTE_RESP, K.PRE_VOTE_RESP)]
    assert len(answers) == 2 and all(m.reject for m in answers)
    assert raw.vote == 0
    store.close()
    lg.close()


class _NullHandler:
    def on_soft_state(self, group: RaftGroup, soft: SoftState) -> None: ...
    def on_snapshot(self, group: RaftGroup, snapshot: Snapshot) -> None: ...
    def on_truncated(self, group: RaftGroup, from_index: int) -> None: ...
    def on_persisted(self, group: RaftGroup, last_index: int) -> None: ...
    def on_committed(self, group: RaftGroup, entries: tuple[Entry, ...]) -> None: ...
    def on_storage_failure(self, group: RaftGroup, exc: BaseException) -> None: ...


def stamped(values: list[bytes], offset: int, term: int, index: int) -> bytes:
    buf = bytearray(encode_batch(values, timestamps_ms=5))
    stamp(buf, 0, offset, term, index)
    return bytes(buf)


def wipe(c: Cluster, nid: int, *, bootstrap: bool = True) -> None:
    """``nid`` comes back with an empty data directory, as a new replica (what the node does
    when its directory is new and the group may have existed before). ``bootstrap=False``:
    the owner knows the group is older than the directory."""
    node = c.nodes[nid]
    node.storage = MemoryStorage(c.conf)
    node.applied = []
    c.outbox = [m for m in c.outbox if m.frm != nid and m.to != nid]
    node.raft = RawNode(
        nid, node.storage, c.rngs[nid], c.config, lost_to=NEW_REPLICA, bootstrap=bootstrap
    )


def test_a_wiped_replica_does_not_vote_for_a_candidate_with_entries_until_caught_up() -> None:
    """Issue 8 defect 3: a wiped node (empty term, vote and log) voted for anyone, so a
    candidate lacking committed entries could win with its vote."""
    c = Cluster([1, 2, 3], rngs={2: seeded(2), 3: seeded(3)})
    c.elect(1)
    c.isolate(2)
    for i in range(3):
        c[1].propose(b"%d" % i)
    c.stabilize()
    assert c[1].commit_index == 4 and c[2].log.last_index() == 1  # committed by 1 and 3
    wipe(c, 3)
    c.down.add(1)
    c.heal()
    for _ in range(5):
        c[2].campaign()
        c.stabilize()
        assert c[2].role != Role.LEADER  # 3 refuses: 2's log is not empty
    # 3 may stand (its log is empty) but nobody holding entries votes for it.
    c.tick(3, 3 * c.config.election_timeout_ticks)
    c.stabilize()
    assert c[3].role != Role.LEADER
    # 1 returns and leads; its first APPEND tells 3 what was committed; 3 catches up.
    c.down.discard(1)
    c.outbox.clear()
    c.elect(1)
    c.tick(1, 2 * c.config.heartbeat_interval_ticks)
    c.stabilize()
    assert c[3].lost_to == 0
    assert [e.data for e in c.log_of(3)] == [e.data for e in c.log_of(1)]
    # ... and votes again: with 1 down, 2 and 3 elect a leader holding the entries.
    c.down.add(1)
    leader = elect_among_2_and_3(c)
    assert [e.data for e in c.log_of(leader)][:4] == [e.data for e in c.log_of(1)][:4]


def test_new_replicas_of_a_new_group_still_elect_a_leader() -> None:
    c = Cluster([1, 2, 3])
    for nid in (1, 2, 3):
        wipe(c, nid)
    c.elect(1)
    c[1].propose(b"x")
    c.stabilize()
    assert all(c[n].lost_to == 0 for n in (1, 2, 3))
    assert c[3].commit_index == c[1].commit_index == c[1].log.last_index()


def _committed_then_majority_wiped(*, bootstrap: bool) -> Cluster:
    c = Cluster([1, 2, 3], rngs={2: seeded(2), 3: seeded(3)})
    c.elect(1)
    for i in range(3):
        c[1].propose(b"%d" % i)
    c.stabilize()
    assert all(c[n].commit_index == 4 for n in (1, 2, 3))
    wipe(c, 2, bootstrap=bootstrap)
    wipe(c, 3, bootstrap=bootstrap)
    return c


def test_a_wiped_majority_that_may_bootstrap_elects_an_empty_leader() -> None:
    """Why ``bootstrap=False`` exists (node simulation, profile wipe-majority): two new
    replicas that may bootstrap the group elect one of their own, whose log is empty."""
    c = _committed_then_majority_wiped(bootstrap=True)
    c.down.add(1)
    c[2].campaign()
    c.stabilize()
    assert c[2].role == Role.LEADER and c[2].log.last_index() <= 1


def test_a_wiped_majority_of_an_older_group_elects_nobody() -> None:
    """A majority of the replicas lost their disks: the new replicas (``bootstrap=False``)
    grant no vote, and their answers in the unanimous rule do not count while they are a
    majority, so neither an empty replica nor the survivor (whose log may lack what the wiped
    ones committed) is elected; the group stays without a leader."""
    c = _committed_then_majority_wiped(bootstrap=False)
    survivor_log = [e.data for e in c.log_of(1)]
    for _ in range(3):
        for nid in (1, 2, 3):
            c[nid].campaign()
            c.stabilize()
        c.tick(1, 3 * c.config.election_timeout_ticks)
        c.tick(2, 3 * c.config.election_timeout_ticks)
        c.tick(3, 3 * c.config.election_timeout_ticks)
        c.stabilize()
        assert all(c[n].role != Role.LEADER for n in (1, 2, 3))
    assert [e.data for e in c.log_of(1)] == survivor_log  # nothing erased


def test_one_wiped_replica_beside_a_new_one_that_never_caught_up_elects_the_third() -> None:
    """Node simulation, wipe seeds 664 693 (443 858 916 alike): replica 3 is new (its first
    directory, NEW_REPLICA) and never heard from a leader; the leader, 1, loses its disk and
    comes back a stranger (``bootstrap=False``). Only 2 holds the committed entries. 3 must not
    grant (it cannot tell what it acknowledged), the stranger grants nothing: without the
    strangers' answers in the unanimous rule, 2 was never elected. The strangers are a
    minority, so every committed entry was acknowledged by 2 or 3, who both vouch for 2."""
    c = Cluster([1, 2, 3], rngs={2: seeded(2), 3: seeded(3)})
    c.elect(1)
    for i in range(3):
        c[1].propose(b"%d" % i)
    c.stabilize()
    log_of_2 = [e.data for e in c.log_of(2)]
    assert c[2].commit_index == 4
    wipe(c, 3)  # a new replica that never caught up: empty log, NEW_REPLICA, may bootstrap
    wipe(c, 1, bootstrap=False)
    for nid in (1, 3):
        c[nid].campaign()  # empty logs: nobody holding entries helps them
        c.stabilize()
        assert c[nid].role != Role.LEADER
    c[2].campaign()
    c.stabilize()
    assert c[2].role == Role.LEADER
    c.tick(2, 2 * c.config.heartbeat_interval_ticks)
    c.stabilize()
    assert c[1].lost_to == 0 and c[3].lost_to == 0
    for nid in (1, 3):
        assert [e.data for e in c.log_of(nid)][:4] == log_of_2


def test_a_wiped_majority_stays_without_a_leader_after_a_stale_append() -> None:
    """Node simulation, wipe-majority-controller seed 76 (with the strangers' answers): a
    wiped replica got an APPEND the old leader sent before it was wiped too, and recovers up
    to its commit with an empty log. It still knows nothing of what it acknowledged before,
    so it stays a stranger (and is stored as one) until it caught up: the strangers are
    still a majority and the survivor is not elected."""
    c = _committed_then_majority_wiped(bootstrap=False)
    c[2].step(Message(K.APPEND, 1, 2, c[1].term, log_term=c[1].term, index=4, commit=4))
    assert c[2].lost_to == 4 and c[2].stored_lost_to == NEW_REPLICA
    c.outbox.clear()
    c.isolate(1)  # the survivor loses its leadership (check-quorum)
    c.tick(1, 3 * c.config.election_timeout_ticks)
    c.stabilize()
    assert c[1].role != Role.LEADER
    c.heal()
    for _ in range(3):
        for nid in (2, 3):  # their leases of the old leader end
            c.tick(nid, 3 * c.config.election_timeout_ticks)
        c.outbox.clear()
        c[1].campaign()
        c.stabilize()
        assert all(c[n].role != Role.LEADER for n in (1, 2, 3))


def test_a_new_replica_of_an_older_group_votes_once_a_leader_reached_it() -> None:
    """One replica wiped (a minority): the other two elect a leader, whose first APPEND turns
    the new replica into an ordinary one that catches up and votes again."""
    c = Cluster([1, 2, 3], rngs={2: seeded(2), 3: seeded(3)})
    c.elect(1)
    c[1].propose(b"x")
    c.stabilize()
    wipe(c, 3, bootstrap=False)
    c.tick(1, 2 * c.config.heartbeat_interval_ticks)
    c.stabilize()
    assert c[3].lost_to == 0 and c[3].log.last_index() == c[1].log.last_index()
    c.down.add(1)
    leader = elect_among_2_and_3(c)
    assert [e.data for e in c.log_of(leader)][:2] == [e.data for e in c.log_of(1)]


def test_a_new_replica_that_leads_or_joins_has_its_hard_state_stored_again() -> None:
    """Node simulation, default seed 83 (after the simulator started fresh nodes with new
    data directories, as the server does): a new replica (the driver stores the NEW_REPLICA
    marker as its commit index) won the group's first election, appended entries and
    crashed before its commit index moved. No hard state had been written since the marker,
    so it restarted as a new replica holding entries: it neither voted nor stood, and the
    group had no leader for good. A change of ``lost_to`` now hands out the hard state."""
    conf = ConfState(voters=frozenset({1, 2, 3}))
    raw = RawNode(1, MemoryStorage(conf), seeded(1), Config(), lost_to=NEW_REPLICA)

    def drain() -> list[HardState]:
        out = []
        while raw.has_ready():
            rd = raw.ready()
            if rd.hard_state is not None:
                out.append(rd.hard_state)
            raw.advance(rd)
        return out

    raw.campaign()
    drain()
    raw.step(Message(K.PRE_VOTE_RESP, 2, 1, 1))
    assert raw.role == Role.CANDIDATE and raw.lost_to == NEW_REPLICA
    assert drain() == [HardState(1, 1, 0)]  # stored with the marker by the driver
    raw.step(Message(K.VOTE_RESP, 2, 1, 1))
    assert raw.role.name == "LEADER" and raw.lost_to == 0
    assert drain() == [HardState(1, 1, 0)]  # term, vote and commit unchanged, marker gone


def test_a_new_replica_restarted_with_entries_counts_none_committed(tmp_path: Path) -> None:
    """Node simulation, default seeds 1685, 3544, 3623: a new replica (the NEW_REPLICA marker
    stored as its commit index) won the first election and appended entries; the hard state
    that cleared the marker (a commit-only write, not synced) was lost in a power loss, the
    entries were not. It restarted with the marker and a log: the storage took the whole log
    as committed, so the node applied entries no majority held, and answered every APPEND
    below that bogus commit with "matches up to it", while its entries there conflicted with
    the leader's: the leader's progress for it flipped between probe and replicate forever
    and it never caught up. None of those entries counts as committed now."""
    conf = ConfState(voters=frozenset({1, 2, 3}))
    cfg = TopicConfig.from_overrides({})
    lg = PartitionLog(tmp_path / "log", cfg)
    s = ReplicaStorage(lg, HardState(), conf)
    # Its own entries as the leader of term 1; only 1..2 were committed (by the group).
    s.append([Entry(1, i, stamped([b"%d" % i], i - 1, 1, i)) for i in range(1, 6)])
    lg.flush()
    store = MetaStore(tmp_path / "meta")
    hard_states = HardStateStore(store)
    hard_states.save({GROUP: HardState(term=1, vote=1, commit=NEW_REPLICA)}, sync=True)

    storage = ReplicaStorage(lg, hard_states.load(GROUP), conf)
    assert storage.lost_to == NEW_REPLICA and storage.hard_state().commit == 0
    driver = MultiRaft(1, hard_states, NodeMetrics())
    group = driver.add_group(GROUP, lg, conf, _NullHandler(), durable=True, config=Config())
    raw = group.raw
    assert raw.commit_index == 0 and raw.last_index() == 5
    # The leader of term 2 holds 1..2 of term 1, then its own entries from 3: the replica
    # must not claim to match beyond 2; it takes the leader's entries in place of its own.
    entries = tuple(Entry(2, i, stamped([b"n%d" % i], i - 1, 2, i)) for i in (3, 4))
    raw.step(Message(K.APPEND, 2, 1, 2, log_term=1, index=2, entries=entries, commit=4))
    answers = [m for m in raw.ready().messages if m.kind == K.APPEND_RESP]
    assert len(answers) == 1 and not answers[0].reject and answers[0].index == 4
    assert raw.term_at(3) == 2 and raw.last_index() == 4 and raw.commit_index == 4
    assert raw.lost_to == 0
    store.close()
    lg.close()
