"""The Raft state machine of one group: ``tick``, ``step``, ``ready``, ``advance``.

The core is pure: it never touches a clock, a socket, a disk or a random source of its own.
The driver feeds it ticks and messages, takes a ``Ready`` (state to persist, messages to send,
entries to apply; see ``types.Ready`` for the ordering contract) and calls ``advance``.

Each role swaps in its own tick and step functions (``_tick``, ``_step``), as in etcd raft:

- follower / pre-candidate / candidate: ``_tick_election`` (a counter and a compare, nothing
  else, so thousands of idle followers cost next to nothing);
- leader: ``_tick_heartbeat`` (heartbeats, check-quorum, transfer and snapshot timeouts,
  APPENDs the catch-up throttle held back).

Protocol choices (Raft paper = Ongaro & Ousterhout 2014; thesis = Ongaro 2014):

- Elections (§5.2) with timeouts drawn from ``[T, 2T)``; pre-vote (thesis §9.6): a node first
  asks "would you vote for me at term+1?" without bumping its own term, and a peer says no
  while it still hears from a leader, so a partitioned node that returns cannot disrupt.
- Check-quorum (thesis §6.2): a leader that has not heard from a majority for an election
  timeout steps down (and then refuses proposals); followers that hear from a leader ignore
  votes for the same period (the "lease" that also protects the leader from pre-votes).
- Log replication (§5.3) with batching (``max_msg_bytes``), per-follower flow control
  (``max_inflight_msgs`` / ``max_inflight_bytes``) and pipelining (optimistic ``next``).
  Proposals and commit notifications made between two ``ready()`` calls are sent together.
- Fast conflict resolution: a follower rejecting an APPEND answers with the last index of
  its log whose term is not newer than the leader's, and that term; the leader then skips
  back to its own last entry of a term no newer than that one, so each round trip skips at
  least a whole term on both sides (the paper's ConflictTerm/ConflictIndex, as in etcd).
- Commit only of entries of the current term by counting (§5.4.2); a new leader appends an
  EMPTY entry so earlier entries commit at once.
- Leadership transfer (thesis §3.10): the leader catches the transferee up, sends it
  TIMEOUT_NOW, refuses proposals meanwhile and gives up after an election timeout.
- Learners receive the log but never campaign and never count in a quorum; candidates never
  ask them. A learner that is asked anyway (its configuration is stale: it was promoted and
  does not know yet) answers like a voter, since only the candidate decides whose votes count.
- Linearizable reads use ReadIndex (thesis §6.4), not leases: the leader records its commit
  index, confirms it is still leader by a heartbeat round that a quorum acknowledges, then
  answers; no clock assumption is needed, at the cost of one round trip (shared by every
  read issued in the same Ready cycle).
- Snapshots: a follower that needs entries below the leader's first index gets the
  application's snapshot (``Storage.snapshot()``), which it installs through its Ready.
- Catch-up throttle (beyond the paper): with the driver's ``catchup`` (a ``CatchupThrottle``)
  an APPEND to a follower the driver calls far behind goes only when its budget allows,
  else at a later tick: a learner, or a voter while the voters known to keep up are a
  majority without it (so commits never wait for the budget), never a transfer's target.
  Delaying messages is all it does, which Raft tolerates anyway.
- Lost entries (beyond the paper, which assumes stable storage): a node whose log no longer
  holds entries it acknowledged (a machine crash under ``flush=os``, a recovery that cut
  fsynced data) is *recovering* up to ``lost_to``: the driver passes the stored commit index
  it can no longer reach, or a heartbeat reveals it (the leader never sends a commit beyond
  what the follower acknowledged). A recovering node neither votes (its vote could elect a
  leader lacking entries its acknowledgement helped commit) nor campaigns, until an APPEND of
  a leader made its log reach ``lost_to`` again. It still acknowledges what it now holds: an
  acknowledgement only ever claims a prefix the node holds, which is what commit counting
  needs. The leader, told by a rejection whose hint lies below ``match`` that the follower
  lost entries, forgets ``match`` and probes again from the hint. Only a rejection that is
  not stale counts (``Progress.is_stale_rejection``): reordered answers hint below it too.
- New replicas of a group that existed before (a wiped data directory: the node may have
  voted in the current term and acknowledged entries, and remembers neither): the driver
  passes ``lost_to=NEW_REPLICA``. Such a node grants (pre-)votes only to candidates whose
  log is empty, and stands for election only while its own log is empty: that bootstraps a
  brand-new group (every log empty) and never elects anyone in a group that has entries,
  since no node holding one votes for an empty log. The first APPEND of a leader turns it into
  an ordinary recovering node up to that APPEND's commit index (the group's commit when it
  joined), and it votes again once its log reaches it. A driver that knows the group existed
  before the data directory did (``bootstrap=False``) takes that exception away: such a new
  replica (a *stranger*) grants no vote at all, and its own vote does not count, until it
  caught up with a leader (reached by a leader's APPEND, it recovers up to that APPEND's
  commit like the others, but stays a stranger until then, and the driver stores it as one:
  ``stored_lost_to``; the APPEND may come from a leader wiped since). Otherwise a majority
  of replicas that lost their disks would elect one of themselves with an empty log and
  erase what the survivor holds; with it, the group stays without a leader (correct: what it
  committed may be on the survivor alone) until an operator recovers it. In the unanimous rule below a stranger answers like a
  recovering voter that lost its whole log (``NEW_REPLICA_CONTEXT``), but those answers win
  only while the voters that are not strangers are a majority (of each configuration): then
  every entry the group committed was acknowledged by one of them, and each of them vouched
  for the winner; strangers that are a majority keep the group without a leader.
- Unanimous elections: when a majority of a group lost entries (a power loss of several
  machines under ``flush=os``), withholding their votes would leave the group without a leader
  for good. So a recovering voter does not grant, but answers a candidate whose log is at
  least as up to date as its own with a rejection marked ``RECOVERING_CONTEXT``; a candidate
  wins with those only if every voter (of both configurations) granted or answered so. That
  is as safe as anything can be: the winner's log is at least as up to date as every
  replica's, so it holds every committed entry some replica still holds; what it lacks is
  gone from every replica. One voter that holds its log intact and does not grant (it is
  down, cut off, or more up to date) keeps the old rule: no leader. Recovering nodes still
  do not campaign, so a group whose replicas all lost entries stays without a leader.
  (Without the strangers' answers one wiped replica beside one recovering one, say a new
  replica that never heard from a leader, left a group of three without a leader for good
  although the third held every committed entry: node simulation, wipe seeds 443 664 693
  858 916.)
- Membership changes: one server at a time (thesis §4.1, 4.3), not joint consensus. Any
  two majorities of configurations that differ by one voter intersect, so no joint phase is
  needed; the three changes (``ConfChangeKind``: add a learner, promote a learner, remove a
  voter or learner) each move at most one voter. We chose it over etcd's ``ConfChangeV2``
  because moving a replica is a sequence of such steps anyway (learner, catch up, promote,
  remove) and one change per entry keeps a single code path, a single state (no joint
  configuration to enter and leave automatically, nor to recover after a crash halfway) and
  a simple checker. Safety conditions: a leader proposes a change only once an entry of its
  own term is committed (the fix of the thesis's bug, found by Ongaro in 2015: otherwise two
  leaders of consecutive terms may each commit a change of a different base configuration),
  and only while no other change is in the log uncommitted (``RaftLog.confs``: one in
  flight). A CONFIG entry carries the change and the configuration it leads to
  (``ConfChange``). It takes effect on a replica when that replica learns it is committed
  (as in etcd, which applies changes when they are applied), not when it is appended: so a
  truncated conf entry never was in force and there is nothing to undo, and the
  configuration in force is always a committed one, stored by the driver with the commit
  index that includes it (``Ready.conf_state`` / ``conf_index``; restored from
  ``StorageReader.conf_state`` / ``conf_index`` and from snapshots, which carry it). A leader
  that is no longer a voter steps down as soon as its removal commits (drivers transfer
  leadership first). ``force_configuration`` replaces the configuration without consensus,
  for an operator recovering a group whose majority is lost for good.
  Learners outside the log (``add_learner``): the controller group still adds its learners
  without entries (safe: a learner never counts); partitions use logged changes only.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from . import quorum
from .errors import (
    CompactedError,
    NotRaftLeader,
    ProposalDropped,
    SnapshotTemporarilyUnavailable,
    UnavailableError,
)
from .limits import DEFAULT_CONFIG, CatchupThrottle, Config, Rand
from .progress import Progress, ProgressState, ProgressTracker
from .raft_log import RaftLog
from .storage import StorageReader
from .types import (
    NONE,
    ConfChange,
    ConfChangeKind,
    ConfState,
    Entry,
    EntryKind,
    HardState,
    Message,
    MessageKind,
    ReadState,
    Ready,
    Role,
    Snapshot,
    SoftState,
    apply_change,
)

#: The context of a VOTE caused by TIMEOUT_NOW: it overrides the voters' leader lease, since
#: the current leader asked for the election.
TRANSFER_CONTEXT = b"transfer"
#: ``lost_to`` of a new replica that does not know what the group committed yet (see above).
NEW_REPLICA = 1 << 62
#: The context of a (pre-)vote rejection by a recovering voter whose own log the
#: candidate's is at least as up to date as: it counts in a unanimous election only.
RECOVERING_CONTEXT = b"recovering"
#: The same answer from a stranger (a new replica of a group older than its data directory,
#: ``bootstrap=False``): it counts in a unanimous election only while the voters that are not
#: strangers are a majority.
NEW_REPLICA_CONTEXT = b"new-replica"
#: The context of the rejection by which a follower tells the leader that a heartbeat's commit
#: lies beyond its log (it lost entries it acknowledged). It answers no APPEND, so the leader
#: does not judge it by the stale-rejection test (``Progress.is_stale_rejection``).
LOST_ENTRIES_CONTEXT = b"lost"
#: The context of the heartbeat round by which an idle leader tells its group to go quiet
#: (the driver's quiescence, node/multiraft.py): a follower that holds the whole log stops
#: its election timer until the next message of the group.
QUIESCE_CONTEXT = b"quiesce"


_K = MessageKind


@dataclass(slots=True)
class _PendingRead:
    index: int
    frm: int
    acks: set[int]


class RawNode:
    """One Raft group member. Not thread-safe; one driver owns it."""

    __slots__ = (
        "_applying_conf",
        "_bcast_pending",
        "_conf_decoder",
        "_conf_dirty",
        "_dirty",
        "_hb_resp",
        "_heartbeat_elapsed",
        "_joined_stranger",
        "_msgs",
        "_pending_reads",
        "_prev_hard_state",
        "_prev_lost_to",
        "_prev_soft_state",
        "_randomized_election_timeout",
        "_read_heartbeat_ctx",
        "_read_only",
        "_read_states",
        "_ready_outstanding",
        "_rng",
        "_step",
        "_throttled",
        "_tick",
        "_uncommitted_bytes",
        "bootstrap",
        "catchup",
        "cfg",
        "conf_index",
        "election_elapsed",
        "id",
        "lead_transferee",
        "leader_id",
        "log",
        "lost_to",
        "role",
        "term",
        "tracker",
        "vote",
    )

    def __init__(
        self,
        node_id: int,
        storage: StorageReader,
        rng: Rand,
        config: Config = DEFAULT_CONFIG,
        applied: int = 0,
        lost_to: int = 0,
        conf_decoder: Callable[[bytes], ConfChange] = ConfChange.decode,
        bootstrap: bool = True,
    ) -> None:
        """Builds the core from whatever ``storage`` holds: a fresh group (empty log) or a
        restart after a crash (term, vote, commit, membership and log come back from it).
        ``applied`` is the last index the state machine had applied durably; committed entries
        after it are delivered again. ``lost_to``: an index this node acknowledged (its stored
        commit index) that its log no longer reaches; it recovers up to it before voting.
        ``conf_decoder`` reads the ``ConfChange`` out of a CONFIG entry's payload (a driver
        that wraps it, as the partitions do in a control batch, passes its own).
        ``bootstrap``: with ``lost_to=NEW_REPLICA``, whether the group may be brand new (every
        log empty), so that new replicas may elect one of themselves; False when the group is
        known to have existed before this replica (see the module doc)."""
        assert node_id != NONE, "node id 0 is reserved"
        self.id = node_id
        self.cfg = config
        self._rng = rng
        self.log = RaftLog(storage, applied)
        #: Recovering: acknowledged entries up to here were lost (0: none). No votes until
        #: the log reaches it again through a leader's APPEND.
        self.lost_to = lost_to if lost_to > self.log.last_index() else 0
        #: A stranger (below) that a leader's APPEND reached, recovering up to that APPEND's
        #: commit: it still knows nothing of what it acknowledged before its directory was
        #: lost, so it stays a stranger (and is stored as one: ``stored_lost_to``) until then.
        self._joined_stranger = False
        #: Whether a new replica (``lost_to == NEW_REPLICA``) may help bootstrap the group.
        self.bootstrap = bootstrap
        hs = storage.hard_state()
        conf = storage.conf_state()
        self.term = hs.term
        self.vote = hs.vote
        self.tracker = ProgressTracker(conf, config.max_inflight_msgs, config.max_inflight_bytes)
        self.leader_id = NONE
        self.role = Role.FOLLOWER
        self.lead_transferee = NONE
        self.election_elapsed = 0
        self._heartbeat_elapsed = 0
        self._randomized_election_timeout = 0
        self._msgs: list[Message] = []
        self._read_states: list[ReadState] = []
        # ctx -> pending read, in arrival order (acknowledging one confirms all before it).
        self._read_only: OrderedDict[bytes, _PendingRead] = OrderedDict()
        # Reads that arrived before the leader committed an entry of its term.
        self._pending_reads: list[tuple[int, bytes]] = []
        self._read_heartbeat_ctx: bytes | None = None
        self._bcast_pending = False
        self._uncommitted_bytes = 0
        self._ready_outstanding = False
        # Set by every entry point that may create work, cleared when ready() or has_ready()
        # finds none: an untouched group answers has_ready() with one attribute test.
        self._dirty = True
        # The heartbeat answer of an idle follower never changes: built once, reused.
        self._hb_resp: Message | None = None
        self._prev_hard_state = hs
        #: ``lost_to`` as of the last hard state handed out: when it changes, the driver must
        #: store the hard state again (it keeps ``lost_to`` as the stored commit index, and a
        #: NEW_REPLICA marker left behind would make the replica new again at its restart).
        self._prev_lost_to = self.lost_to
        self._prev_soft_state = SoftState(NONE, Role.FOLLOWER)
        self._conf_decoder = conf_decoder
        #: The log index the configuration in force comes from (``Ready.conf_index``).
        self.conf_index = storage.conf_index()
        #: The configuration changed through the log since the last Ready: hand it out.
        self._conf_dirty = False
        self._applying_conf = False
        #: The driver's limit on catching up by APPEND (None: none); see ``CatchupThrottle``.
        self.catchup: CatchupThrottle | None = None
        #: Some progress is ``throttled``: the next tick retries it.
        self._throttled = False
        self._tick: Callable[[], None] = self._tick_election
        self._step: Callable[[Message], None] = self._step_follower
        self._become_follower(self.term, NONE)
        # CONFIG entries the stored configuration does not include yet, but committed.
        self._apply_confs()

    # ---- accessors ----------------------------------------------------------------------

    @property
    def commit_index(self) -> int:
        return self.log.committed

    @property
    def applied_index(self) -> int:
        return self.log.applied

    @property
    def conf_state(self) -> ConfState:
        return self.tracker.conf

    @property
    def hard_state(self) -> HardState:
        return HardState(self.term, self.vote, self.log.committed)

    @property
    def soft_state(self) -> SoftState:
        return SoftState(self.leader_id, self.role)

    def first_index(self) -> int:
        """The first index the log still holds (the compaction point + 1)."""
        return self.log.first_index()

    def last_index(self) -> int:
        """The last index of the whole log, stored or not: a leader's next proposal takes
        ``last_index() + 1``."""
        return self.log.last_index()

    def term_at(self, index: int) -> int | None:
        """The term of the entry at ``index`` (stored or not); None when the log does not
        hold it (compacted, or beyond the end)."""
        return self.log.term_or_none(index)

    def unstored_entries(self) -> tuple[int, Sequence[Entry]]:
        """``(first index, entries)`` of the tail not yet stored (the unstable log; possibly
        handed out in a ``Ready`` whose ``advance`` has not come yet). The first index is
        where the tail starts even when it is empty, so ``first index - 1`` is the last
        stored entry. The sequence is the core's own (no copy): read it at once, never keep
        or change it."""
        unstable = self.log.unstable
        return unstable.offset, unstable.entries

    @property
    def conf_change_pending(self) -> bool:
        """A CONFIG entry is in the log but not known committed yet (one change in flight)."""
        return bool(self.log.confs)

    def progress(self, node_id: int) -> Progress | None:
        """The leader's view of ``node_id`` (None on a non-leader or for a non-member)."""
        if self.role != Role.LEADER:
            return None
        return self.tracker.progress.get(node_id)

    @property
    def recovering(self) -> bool:
        """Whether this replica is recovering entries it lost (it neither votes nor may
        serve follower reads until it caught up)."""
        return self._recovering()

    def _recovering(self) -> bool:
        """Recovering lost entries (a new replica with an empty log is not: it bootstraps)."""
        return bool(self.lost_to) and not (
            self.lost_to == NEW_REPLICA and self.bootstrap and self.log.last_index() == 0
        )

    def _stranger(self) -> bool:
        """A new replica of a group older than its data directory that has not caught up
        with a leader yet: it knows nothing of what it acknowledged before (module doc)."""
        if not self.lost_to:
            return False
        return self._joined_stranger or (self.lost_to == NEW_REPLICA and not self.bootstrap)

    @property
    def stored_lost_to(self) -> int:
        """What the driver stores as the commit index while this replica recovers (it keeps
        the larger of it and the commit): ``lost_to``, but NEW_REPLICA for a stranger until it
        caught up, so that it restarts as one (it then relearns the group's commit from the
        next APPEND)."""
        return NEW_REPLICA if self._stranger() else self.lost_to

    def _promotable(self) -> bool:
        # A recovering node may stand, but its own vote does not count (its log may lack
        # what it acknowledged): it wins only on the grants of a majority of the others, or
        # when every voter answered (the unanimous rule above). Were it never to stand, a
        # group whose every replica lost entries (a power loss under flush=os) could never
        # elect anyone again.
        return self.id in self.tracker.conf.voters or self.id in self.tracker.conf.voters_outgoing

    # ---- driver interface ---------------------------------------------------------------

    def tick(self) -> None:
        """Advances logical time by one tick."""
        self._tick()

    def quiescable(self) -> bool:
        """A leader with nothing left to do: every member holds the whole log, all of it is
        committed and applied, and no read, transfer or stored change is pending. Its group
        may go quiet (no heartbeats) until something happens."""
        if self.role != Role.LEADER or self.lead_transferee != NONE or self._read_only:
            return False
        log = self.log
        last = log.last_index()
        if log.committed != last or log.applied != last or log.unstable.entries:
            return False
        if self._ready_outstanding or self._msgs or self._bcast_pending:
            return False
        # Every member heard from since the last quorum check (a dead one keeps the leader
        # awake, so check-quorum still steps it down when a majority is gone).
        return all(
            pr.match == last and pr.recent_active
            for nid, pr in self.tracker.progress.items()
            if nid != self.id
        )

    def mark_unreachable(self, node_id: int) -> None:
        """The driver learnt that ``node_id`` is gone (its node died, its stream broke): it
        counts as not heard from, so the group does not go quiet again while it is away and
        the next quorum check counts it out."""
        pr = self.tracker.progress.get(node_id)
        if pr is not None and node_id != self.id:
            pr.recent_active = False

    def quiesce(self) -> None:
        """Tell every member the group goes quiet: one heartbeat round carrying
        QUIESCE_CONTEXT (and the commit index, which every member then holds)."""
        assert self.role == Role.LEADER, "only a leader quiesces its group"
        self._bcast_heartbeat(QUIESCE_CONTEXT)
        self._dirty = True

    def campaign(self) -> None:
        """Starts an election now (as if the election timer had fired)."""
        if self.role != Role.LEADER and self._promotable():
            self._dirty = True
            self._hup(transfer=False)

    def step(self, m: Message) -> None:
        """Feeds one message from a peer. Stale or unexpected messages are ignored."""
        assert m.to == self.id, f"message for {m.to} delivered to {self.id}"
        if m.frm == self.id:
            return
        self._dirty = True
        if m.term > self.term:
            if m.kind == _K.VOTE or m.kind == _K.PRE_VOTE:
                if self._in_lease(m):
                    return  # a leader is alive: do not let this candidate disrupt it
            if m.kind == _K.PRE_VOTE or (
                m.kind == _K.PRE_VOTE_RESP
                and (not m.reject or m.context in (RECOVERING_CONTEXT, NEW_REPLICA_CONTEXT))
            ):
                # A pre-vote never changes terms; a granted answer (or a recovering voter's)
                # carries the term the pre-candidate will campaign in, which is not ours yet.
                pass
            elif m.kind in (_K.APPEND, _K.HEARTBEAT, _K.SNAPSHOT):
                self._become_follower(m.term, m.frm)
            elif m.kind == _K.VOTE and self.role == Role.FOLLOWER and not self.cfg.pre_vote:
                # Without pre-vote, Raft's rule (section 5.2): a follower's election timer
                # restarts on hearing from a leader or on granting a vote (below), not on
                # seeing a higher term. Restarting it here (as etcd's becomeFollower does)
                # lets a candidate whose log is too stale to win hold back, election after
                # election, every voter that could (core seed 2881): each of its requests
                # restarted their timers. With pre-vote a higher-term VOTE comes only from a
                # candidate a majority found up to date, and giving it a full timeout to
                # finish is right (the node runs pre-vote: its controller elected later and
                # acknowledged 3 commands instead of 18 in node seed 1 otherwise). A candidate
                # that sees a newer election backs off for a fresh timeout either way:
                # keeping its own timer kept the two candidates of a two-voter group
                # campaigning together (membership seed 1793).
                elapsed, timeout = self.election_elapsed, self._randomized_election_timeout
                self._become_follower(m.term, NONE)
                self.election_elapsed, self._randomized_election_timeout = elapsed, timeout
            else:
                self._become_follower(m.term, NONE)
        elif m.term < self.term:
            if (self.cfg.check_quorum or self.cfg.pre_vote) and m.kind in (
                _K.APPEND,
                _K.HEARTBEAT,
            ):
                # A stale leader: tell it our term so it steps down. Without this, with
                # pre-vote or check-quorum a removed leader could linger forever.
                self._send(Message(_K.APPEND_RESP, self.id, m.frm, self.term))
            elif m.kind == _K.PRE_VOTE:
                # Let the pre-candidate learn our term (it may be behind).
                self._send(Message(_K.PRE_VOTE_RESP, self.id, m.frm, self.term, reject=True))
            return

        if m.kind == _K.VOTE or m.kind == _K.PRE_VOTE:
            self._handle_vote_request(m)
        else:
            self._step(m)
        log = self.log
        if log.confs and log.confs[0].index <= log.committed:
            self._apply_confs()

    def propose(self, data: bytes, kind: EntryKind = EntryKind.NORMAL) -> int:
        """Appends ``data`` to the leader's log; returns its index (its term is ``self.term``).
        The entry is committed once it appears in ``Ready.committed``. Raises ``NotRaftLeader``
        on a non-leader, ``ProposalDropped`` during a leadership transfer or when too many
        bytes are uncommitted. A CONFIG entry must decode (``conf_decoder``) into the change
        :meth:`check_conf_change` accepts now (ValueError otherwise)."""
        if self.role != Role.LEADER:
            raise NotRaftLeader("this node is not the leader", self.leader_id)
        if self.lead_transferee != NONE:
            raise ProposalDropped(
                f"leadership transfer to {self.lead_transferee} in progress", self.id
            )
        if kind == EntryKind.CONFIG:
            cc = self._conf_decoder(data)
            expected = self.check_conf_change(cc.kind, cc.node_id)
            if expected != cc:
                raise ValueError(f"{cc} does not follow from the configuration {self.conf_state}")
        entry = Entry(self.term, self.log.last_index() + 1, data, kind)
        size = entry.size_bytes
        if (
            self._uncommitted_bytes
            and self._uncommitted_bytes + size > self.cfg.max_uncommitted_bytes
        ):
            raise ProposalDropped(
                f"{self._uncommitted_bytes} bytes uncommitted (max_uncommitted_bytes "
                f"{self.cfg.max_uncommitted_bytes}): followers are behind, retry later",
                self.id,
            )
        self._uncommitted_bytes += size
        self._dirty = True
        self._append_entries([entry])
        self._bcast_pending = True
        return entry.index

    def propose_all(self, datas: Sequence[bytes]) -> int:
        """Appends each of ``datas`` as one NORMAL entry, all of them or none (one client
        request must not be half refused: the client retries it whole); returns the index of
        the last (the first is that minus ``len(datas) - 1``; the term is ``self.term``).
        Raises like :meth:`propose`, before appending anything."""
        if not datas:
            raise ValueError("propose_all needs at least one entry")
        if self.role != Role.LEADER:
            raise NotRaftLeader("this node is not the leader", self.leader_id)
        if self.lead_transferee != NONE:
            raise ProposalDropped(
                f"leadership transfer to {self.lead_transferee} in progress", self.id
            )
        first = self.log.last_index() + 1
        entries = [Entry(self.term, first + i, d) for i, d in enumerate(datas)]
        size = sum(e.size_bytes for e in entries)
        if (
            self._uncommitted_bytes
            and self._uncommitted_bytes + size > self.cfg.max_uncommitted_bytes
        ):
            raise ProposalDropped(
                f"{self._uncommitted_bytes} bytes uncommitted, {size} more proposed "
                f"(max_uncommitted_bytes {self.cfg.max_uncommitted_bytes}): followers are "
                "behind, retry later",
                self.id,
            )
        self._uncommitted_bytes += size
        self._dirty = True
        self._append_entries(entries)
        self._bcast_pending = True
        return entries[-1].index

    # ---- membership changes ------------------------------------------------------------

    def check_conf_change(self, kind: ConfChangeKind, node_id: int) -> ConfChange:
        """The change the leader may propose now (see the module doc: one at a time, only
        once an entry of its term is committed, only on top of the configuration in force):
        NotRaftLeader off the leader, ProposalDropped while a change is in flight or the
        leader has not committed an entry of its term yet (retry later), ValueError for a
        change that makes no sense in the configuration in force."""
        if self.role != Role.LEADER:
            raise NotRaftLeader("this node is not the leader", self.leader_id)
        if self.log.confs:
            raise ProposalDropped(
                f"a membership change at index {self.log.confs[-1].index} is not committed yet",
                self.id,
            )
        if not self._committed_in_term():
            if self.log.last_term() != self.term and self.lead_transferee == NONE:
                # A leader whose log holds no entry of its term (partitions append none when
                # everything was committed): append one so the change can follow it.
                self._dirty = True
                self._append_entries(
                    [Entry(self.term, self.log.last_index() + 1, b"", EntryKind.EMPTY)]
                )
                self._bcast_pending = True
            raise ProposalDropped(
                f"no entry of term {self.term} is committed yet: no membership change before",
                self.id,
            )
        return apply_change(self.tracker.conf, kind, node_id)

    def propose_conf_change(self, kind: ConfChangeKind, node_id: int) -> int:
        """Proposes one membership change in the core's own encoding (``ConfChange.encode``;
        a driver with its own ``conf_decoder`` proposes its payload through :meth:`propose`).
        It takes effect on each replica when that replica learns it is committed."""
        cc = self.check_conf_change(kind, node_id)
        return self.propose(cc.encode(), EntryKind.CONFIG)

    def force_configuration(self, voters: frozenset[int], through_index: int | None = None) -> None:
        """UNSAFE, for recovering a group that lost a majority for good: makes ``voters`` the
        configuration in force on this replica at once, without consensus (learners that are
        not among them stay learners). The operator does it on each survivor (they must all
        end up agreeing, or two majorities may form), then the most up-to-date survivor can
        be elected by the others. Entries committed by the lost majority only may be lost:
        that is what makes it unsafe, and why nothing calls it on its own.

        CONFIG entries at or below ``through_index`` (default: this replica's last index)
        never take effect here, even when they commit later: they belong to the lost group.
        Give every survivor the same one, the last index of the most up-to-date survivor,
        so a survivor with a shorter log ignores them too when the new leader sends them."""
        if not voters or NONE in voters:
            raise ValueError(f"cannot force the voters {sorted(voters)}")
        floor = self.log.last_index() if through_index is None else through_index
        conf = self.tracker.conf
        self._dirty = True
        self._set_conf(
            ConfState(frozenset(voters), conf.learners - voters), max(self.conf_index, floor)
        )
        if self.role != Role.FOLLOWER:
            self._become_follower(self.term, NONE)

    def _apply_confs(self) -> None:
        """Takes into force every CONFIG entry known committed, in order."""
        if self._applying_conf:
            return
        self._applying_conf = True
        try:
            log = self.log
            while log.confs and log.confs[0].index <= log.committed:
                e = log.confs.pop(0)
                if e.index <= self.conf_index:
                    continue  # already in the configuration (a forced one covers it)
                cc = self._conf_decoder(e.data)
                self._set_conf(cc.conf, e.index)
        finally:
            self._applying_conf = False

    def _set_conf(self, conf: ConfState, index: int) -> None:
        tracker = self.tracker
        old = tracker.conf
        tracker.conf = conf
        self.conf_index = index
        self._conf_dirty = True
        self._dirty = True
        last = self.log.last_index()
        for nid in old.members - conf.members:
            tracker.progress.pop(nid, None)
        for nid in sorted(conf.members):
            pr = tracker.progress.get(nid)
            if pr is None:
                pr = tracker.progress[nid] = Progress(
                    last + 1,
                    self.cfg.max_inflight_msgs,
                    self.cfg.max_inflight_bytes,
                    is_learner=nid in conf.learners,
                )
                if nid == self.id:
                    pr.match = last
            else:
                pr.is_learner = nid in conf.learners
        if self.role == Role.LEADER:
            if self.lead_transferee != NONE and self.lead_transferee not in conf.voters:
                self.lead_transferee = NONE
            if self.id not in conf.voters:
                # Removed (or demoted): a leader outside the configuration steps down; the
                # voters elect one of theirs (the driver transfers leadership first). It
                # tells them first that the change is committed, so they take it into force
                # now rather than after the next leader commits an entry.
                for nid, pr in tracker.progress.items():
                    if nid != self.id:
                        pr.probe_sent = False if pr.state == ProgressState.PROBE else pr.probe_sent
                        self._send_append(nid, pr, send_if_empty=True)
                self._become_follower(self.term, NONE)
                return
            self._maybe_commit()  # fewer voters may have a majority already
            self._bcast_pending = True  # a new learner gets the log
        elif self.role != Role.FOLLOWER and self.id not in conf.voters:
            self._become_follower(self.term, NONE)
        elif self.leader_id != NONE and self.leader_id not in conf.voters:
            # Our leader was removed and steps down: its lease protects nobody any more.
            self.leader_id = NONE

    def transfer_leadership(self, to: int) -> None:
        """Asks the leader to hand leadership to voter ``to`` (forwarded if we are a follower)."""
        if to not in self.tracker.conf.voters:
            raise ValueError(f"cannot transfer leadership to {to}: not a voter")
        self._dirty = True
        if self.role == Role.LEADER:
            self._leader_transfer(to)
        elif self.leader_id != NONE:
            self._send(Message(_K.TRANSFER_LEADER, self.id, self.leader_id, self.term, index=to))
        else:
            raise NotRaftLeader("no leader known to transfer leadership from", NONE)

    def read_index(self, context: bytes) -> None:
        """Requests a linearizable read. A ``ReadState(index, context)`` appears in a later
        Ready once leadership at ``index`` is confirmed; the read is safe once the local
        applied index reaches it. ``context`` must be unique among pending reads. Reads are
        dropped if leadership changes first (the caller retries on timeout)."""
        assert context, "read_index needs a non-empty context"
        self._dirty = True
        if self.role == Role.LEADER:
            self._leader_read(self.id, context)
        elif self.leader_id != NONE:
            self._send(Message(_K.READ_INDEX, self.id, self.leader_id, self.term, context=context))
        else:
            raise NotRaftLeader("no leader known to serve a read index", NONE)

    def add_learner(self, node_id: int) -> None:
        """Makes ``node_id`` a learner of this group at once, without a log entry.

        Safe without consensus because a learner never votes, never campaigns and never
        counts toward a quorum: the membership that decides elections and commits does not
        change. Each member that should replicate to the learner calls this (the cluster
        does it when it applies the learner's registration, at the same log position on every
        node). A no-op for a node that is already a member."""
        assert node_id != NONE, "node id 0 is reserved"
        conf = self.tracker.conf
        if node_id in conf.members:
            return
        self.tracker.conf = ConfState(conf.voters, conf.learners | {node_id}, conf.voters_outgoing)
        self.tracker.progress[node_id] = Progress(
            self.log.last_index() + 1,
            self.cfg.max_inflight_msgs,
            self.cfg.max_inflight_bytes,
            is_learner=True,
        )
        self._dirty = True

    def remove_learner(self, node_id: int) -> None:
        """Stops replicating to learner ``node_id`` (a no-op for voters and non-members)."""
        conf = self.tracker.conf
        if node_id not in conf.learners:
            return
        self.tracker.conf = ConfState(conf.voters, conf.learners - {node_id}, conf.voters_outgoing)
        self.tracker.progress.pop(node_id, None)
        self._dirty = True

    def report_unreachable(self, to: int) -> None:
        """The transport failed to deliver to ``to``: stop pipelining into the void."""
        pr = self.progress(to)
        if pr is not None and pr.state == ProgressState.REPLICATE:
            self._dirty = True
            pr.become_probe()

    def report_snapshot(self, to: int, ok: bool) -> None:
        """The transport finished (``ok``) or failed sending a snapshot to ``to``."""
        pr = self.progress(to)
        if pr is None or pr.state != ProgressState.SNAPSHOT:
            return
        self._dirty = True
        if not ok:
            pr.pending_snapshot = 0
        pr.become_probe()
        # Wait for the next heartbeat answer before probing, as the follower may be down.
        pr.probe_sent = True

    def has_ready(self) -> bool:
        """Cheap: whether ``ready()`` would return work. Drivers skip idle groups with it."""
        if not self._dirty or self._ready_outstanding:
            return False
        if self._msgs or self._bcast_pending or self._read_states:
            return True
        if self._read_heartbeat_ctx is not None:
            return True
        log = self.log
        if log.unstable.entries or log.unstable.snapshot is not None:
            return True
        if log.committed > log.applied and log.has_next_committed():
            return True
        hs = self._prev_hard_state
        if hs.term != self.term or hs.vote != self.vote or hs.commit != log.committed:
            return True
        if self._prev_lost_to != self.lost_to:
            return True
        if self._conf_dirty:
            return True
        if log.confs and log.confs[0].index <= log.committed:
            return True
        ss = self._prev_soft_state
        if ss.leader_id != self.leader_id or ss.role != self.role:
            return True
        self._dirty = False
        return False

    def ready(self) -> Ready:
        """Takes the pending work. Call ``advance`` with it before the next ``ready``."""
        assert not self._ready_outstanding, "ready() called twice without advance()"
        log = self.log
        if log.confs and log.confs[0].index <= log.committed:
            self._apply_confs()
        if self._bcast_pending or self._read_heartbeat_ctx is not None:
            self._flush_lazy_sends()
        hs: HardState | None = None
        prev = self._prev_hard_state
        must_sync = False
        if (
            prev.term != self.term
            or prev.vote != self.vote
            or prev.commit != log.committed
            or self._prev_lost_to != self.lost_to
        ):
            # A commit-only change need not be synced: a lost commit index is relearned.
            must_sync = prev.term != self.term or prev.vote != self.vote
            hs = self._prev_hard_state = HardState(self.term, self.vote, log.committed)
            self._prev_lost_to = self.lost_to
        entries: tuple[Entry, ...] = ()
        if log.unstable.entries:
            entries = tuple(log.unstable.entries)
            must_sync = True
        snapshot = log.unstable.snapshot
        if snapshot is not None:
            must_sync = True
        committed: tuple[Entry, ...] = ()
        if log.committed > log.applied and log.has_next_committed():
            committed = tuple(log.next_committed(self.cfg.max_committed_bytes_per_ready))
            if self.role == Role.LEADER and committed:
                freed = sum(
                    e.size_bytes
                    for e in committed
                    if e.term == self.term and e.kind != EntryKind.EMPTY
                )
                self._uncommitted_bytes = max(0, self._uncommitted_bytes - freed)
        soft: SoftState | None = None
        ss = self._prev_soft_state
        if ss.leader_id != self.leader_id or ss.role != self.role:
            soft = SoftState(self.leader_id, self.role)
            self._prev_soft_state = soft
        msgs: tuple[Message, ...] = ()
        if self._msgs:
            msgs = tuple(self._msgs)
            self._msgs.clear()
        read_states: tuple[ReadState, ...] = ()
        if self._read_states:
            read_states = tuple(self._read_states)
            self._read_states.clear()
        conf: ConfState | None = None
        if self._conf_dirty:
            self._conf_dirty = False
            conf = self.tracker.conf
            if hs is None:
                # Stored together: the configuration and the commit index it goes with.
                hs = self._prev_hard_state = HardState(self.term, self.vote, log.committed)
                self._prev_lost_to = self.lost_to
            must_sync = True
        self._ready_outstanding = True
        self._dirty = False
        return Ready(
            hs,
            entries,
            must_sync,
            committed,
            msgs,
            snapshot,
            read_states,
            soft,
            conf,
            self.conf_index,
        )

    def advance(self, rd: Ready) -> None:
        """The driver persisted, sent and applied everything in ``rd``."""
        assert self._ready_outstanding, "advance() without a ready()"
        self._ready_outstanding = False
        self._dirty = True  # more committed entries may wait than one Ready carried
        log = self.log
        if rd.snapshot is not None:
            log.stable_snap_to(rd.snapshot.meta.index)
            log.applied_to(rd.snapshot.meta.index)
        if rd.entries:
            last = rd.entries[-1]
            log.stable_to(last.index, last.term)
        if rd.committed:
            log.applied_to(rd.committed[-1].index)

    # ---- role transitions ---------------------------------------------------------------

    def _reset(self, term: int) -> None:
        if term != self.term:
            self.term = term
            self.vote = NONE
        self.leader_id = NONE
        self.election_elapsed = 0
        self._heartbeat_elapsed = 0
        timeout = self.cfg.election_timeout_ticks
        span = self.cfg.election_timeout_span_ticks or timeout
        self._randomized_election_timeout = self._rng.randint(timeout, timeout + span - 1)
        self.lead_transferee = NONE
        self.tracker.reset(self.tracker.conf, self.log.last_index() + 1)
        own = self.tracker.progress.get(self.id)
        if own is not None:
            own.match = self.log.last_index()
        self._read_only.clear()
        self._pending_reads.clear()
        self._read_heartbeat_ctx = None
        self._bcast_pending = False
        self._uncommitted_bytes = 0

    def _become_follower(self, term: int, leader_id: int) -> None:
        self._reset(term)
        self._step = self._step_follower
        self._tick = self._tick_election
        self.leader_id = leader_id
        self.role = Role.FOLLOWER

    def _become_pre_candidate(self) -> None:
        assert self.role != Role.LEADER, "leader cannot become pre-candidate"
        # Term and vote stay: a pre-candidate has not started an election yet.
        self._step = self._step_candidate
        self._tick = self._tick_election
        self.tracker.votes = {}
        self.tracker.recovering_votes = set()
        self.tracker.stranger_votes = set()
        self.leader_id = NONE
        self.role = Role.PRE_CANDIDATE

    def _become_candidate(self) -> None:
        assert self.role != Role.LEADER, "leader cannot become candidate"
        self._reset(self.term + 1)
        self._step = self._step_candidate
        self._tick = self._tick_election
        self.vote = self.id
        self.role = Role.CANDIDATE

    def _become_leader(self) -> None:
        assert self.role == Role.CANDIDATE, f"{self.role.name} cannot become leader"
        self._reset(self.term)
        self._step = self._step_leader
        self._tick = self._tick_heartbeat
        self.leader_id = self.id
        self.lost_to = 0  # a new replica elected by new replicas: its log is the group's
        self._joined_stranger = False
        self.role = Role.LEADER
        own = self.tracker.progress.get(self.id)
        if own is not None:
            # The leader's own log is, by definition, replicating.
            own.become_replicate()
            own.recent_active = True
        if self.cfg.always_append_empty or self.log.last_index() > self.log.committed:
            # Commits every earlier entry once it commits (§5.4.2); also how followers learn
            # of us.
            self._append_entries(
                [Entry(self.term, self.log.last_index() + 1, b"", EntryKind.EMPTY)]
            )
            self._bcast_pending = True
        else:
            # Everything in our log is committed (so our commit index is the group's): no
            # entry is needed, only a heartbeat round that tells the followers who leads.
            self._bcast_heartbeat(b"")

    # ---- elections ----------------------------------------------------------------------

    def _in_lease(self, m: Message) -> bool:
        """Whether we heard from a live leader within the election timeout, so a (pre-)vote
        request from a would-be disruptor is ignored (unless the leader asked for it)."""
        if m.context == TRANSFER_CONTEXT:
            return False
        if self.leader_id == NONE or self.election_elapsed >= self.cfg.election_timeout_ticks:
            return False
        if m.kind == _K.PRE_VOTE:
            return self.cfg.pre_vote or self.cfg.check_quorum
        return self.cfg.check_quorum

    def _hup(self, transfer: bool) -> None:
        if self.cfg.pre_vote and not transfer:
            self._run_election(pre=True, transfer=False)
        else:
            self._run_election(pre=False, transfer=transfer)

    def _run_election(self, pre: bool, transfer: bool) -> None:
        if pre:
            self._become_pre_candidate()
            kind, term = _K.PRE_VOTE, self.term + 1
        else:
            self._become_candidate()
            kind, term = _K.VOTE, self.term
        if self._recovering():
            self.tracker.record_vote(self.id, False, recovering=True, stranger=self._stranger())
        else:
            self.tracker.record_vote(self.id, True)
        if self.tracker.tally_votes() == quorum.VoteResult.WON:
            # A single-voter group wins at once.
            if pre:
                self._run_election(pre=False, transfer=False)
            else:
                self._become_leader()
            return
        last_index = self.log.last_index()
        last_term = self.log.last_term()
        ctx = TRANSFER_CONTEXT if transfer else b""
        for nid in self.tracker.voter_ids():
            if nid != self.id:
                self._send(
                    Message(
                        kind, self.id, nid, term, log_term=last_term, index=last_index, context=ctx
                    )
                )

    def _handle_vote_request(self, m: Message) -> None:
        pre = m.kind == _K.PRE_VOTE
        resp = _K.PRE_VOTE_RESP if pre else _K.VOTE_RESP
        recovering = bool(self.lost_to) and not (
            self.lost_to == NEW_REPLICA
            and self.bootstrap
            and m.index == 0
            and self.log.last_index() == 0
        )
        can_vote = (
            self.vote == m.frm
            or (self.vote == NONE and self.leader_id == NONE)
            or (pre and m.term > self.term)
        )
        if can_vote and recovering and self.log.is_up_to_date(m.index, m.log_term):
            # No vote, but a rejection that says the candidate's log is at least as up to
            # date as ours: it counts only if every voter grants or says so (see the module
            # doc). A pre-vote's answers in the asked term, as a granted one would. A new
            # replica of a group that existed before it knows nothing of what the group
            # committed: its answer says so, and counts only beside a majority that knows.
            self._send(
                Message(
                    resp,
                    self.id,
                    m.frm,
                    m.term if pre else self.term,
                    reject=True,
                    context=NEW_REPLICA_CONTEXT if self._stranger() else RECOVERING_CONTEXT,
                )
            )
            # No vote is recorded: a unanimous winner of this term is its only candidate
            # (every other voter granted it, and so stays with it in this term).
        elif can_vote and not recovering and self.log.is_up_to_date(m.index, m.log_term):
            # A granted pre-vote answers in the asked term so the pre-candidate can count it.
            self._send(Message(resp, self.id, m.frm, m.term))
            if not pre:
                self.election_elapsed = 0
                self.vote = m.frm
        else:
            self._send(Message(resp, self.id, m.frm, self.term, reject=True))

    # ---- ticks --------------------------------------------------------------------------

    def _tick_election(self) -> None:
        self.election_elapsed += 1
        if self.election_elapsed >= self._randomized_election_timeout:
            self._election_timeout()

    def _election_timeout(self) -> None:
        if self._promotable():
            self._dirty = True
            self.election_elapsed = 0
            self._hup(transfer=False)
        # A node that may not campaign (a learner, or a voter that does not know it was
        # promoted yet) lets the count run on, so its lease of a silent leader ends and it
        # can grant the votes of an election that needs it (as etcd's tickElection does).

    def _tick_heartbeat(self) -> None:
        self._dirty = True
        self._heartbeat_elapsed += 1
        self.election_elapsed += 1
        if self.election_elapsed >= self.cfg.election_timeout_ticks:
            self.election_elapsed = 0
            if self.cfg.check_quorum and not self._check_quorum():
                return  # stepped down
            if self.lead_transferee != NONE:
                self.lead_transferee = NONE  # the transferee did not win in time: give up
            self._check_snapshot_transfers()
        if self.role != Role.LEADER:
            return
        if self._throttled:
            self._throttled = False
            for nid, pr in self.tracker.progress.items():
                if pr.throttled:
                    pr.throttled = False
                    self._send_append(nid, pr, send_if_empty=False)
        if self._heartbeat_elapsed >= self.cfg.heartbeat_interval_ticks:
            self._heartbeat_elapsed = 0
            self._bcast_heartbeat(b"")

    def _check_quorum(self) -> bool:
        """Steps down if a quorum was not heard from during the last election timeout."""
        if not self.tracker.quorum_active(self.id):
            self._become_follower(self.term, NONE)
            return False
        for nid, pr in self.tracker.progress.items():
            if nid != self.id:
                pr.recent_active = False
        return True

    def _check_snapshot_transfers(self) -> None:
        """A snapshot still unacknowledged after two check periods is presumed lost: retry."""
        for pr in self.tracker.progress.values():
            if pr.state == ProgressState.SNAPSHOT:
                pr.snapshot_checks += 1
                if pr.snapshot_checks >= 2:
                    pr.pending_snapshot = 0
                    pr.become_probe()

    # ---- follower and candidate steps ---------------------------------------------------

    def _step_follower(self, m: Message) -> None:
        k = m.kind
        if k == _K.APPEND:
            self.election_elapsed = 0
            self.leader_id = m.frm
            if self.lost_to == NEW_REPLICA:
                # What the group committed when we joined: catch up to it before voting.
                stranger = self._stranger()
                self.lost_to = m.commit if m.commit > self.log.last_index() else 0
                self._joined_stranger = stranger and self.lost_to != 0
            self._handle_append(m)
        elif k == _K.HEARTBEAT:
            self.election_elapsed = 0
            self.leader_id = m.frm
            last = self.log.last_index()
            if m.commit > last:
                # A leader sends no commit beyond what we acknowledged: we lost entries.
                self.lost_to = max(self.lost_to, m.commit)
                self._send(
                    Message(
                        _K.APPEND_RESP,
                        self.id,
                        m.frm,
                        self.term,
                        index=m.commit,
                        reject=True,
                        reject_hint=last,
                        reject_hint_term=self.log.last_term(),
                        context=LOST_ENTRIES_CONTEXT,
                    )
                )
            else:
                self.log.commit_to(m.commit)
            if m.context:
                resp = Message(_K.HEARTBEAT_RESP, self.id, m.frm, self.term, context=m.context)
            else:
                cached = self._hb_resp
                if cached is None or cached.to != m.frm or cached.term != self.term:
                    cached = self._hb_resp = Message(_K.HEARTBEAT_RESP, self.id, m.frm, self.term)
                resp = cached
            self._send(resp)
        elif k == _K.SNAPSHOT:
            self.election_elapsed = 0
            self.leader_id = m.frm
            self._handle_snapshot(m)
        elif k == _K.TIMEOUT_NOW:
            if self._promotable():
                # The leader asked: skip pre-vote and override the voters' lease.
                self._hup(transfer=True)
        elif k == _K.READ_INDEX_RESP:
            self._read_states.append(ReadState(m.index, m.context))
        elif k == _K.TRANSFER_LEADER and self.leader_id != NONE:
            self._send(
                Message(_K.TRANSFER_LEADER, self.id, self.leader_id, self.term, index=m.index)
            )

    def _step_candidate(self, m: Message) -> None:
        k = m.kind
        if k in (_K.APPEND, _K.HEARTBEAT, _K.SNAPSHOT):
            # Someone won this term (m.term == self.term here): follow it.
            self._become_follower(m.term, m.frm)
            self._step_follower(m)
            return
        expected = _K.PRE_VOTE_RESP if self.role == Role.PRE_CANDIDATE else _K.VOTE_RESP
        if k != expected:
            return
        stranger = m.reject and m.context == NEW_REPLICA_CONTEXT
        self.tracker.record_vote(
            m.frm,
            not m.reject,
            recovering=stranger or (m.reject and m.context == RECOVERING_CONTEXT),
            stranger=stranger,
        )
        result = self.tracker.tally_votes()
        if result == quorum.VoteResult.WON:
            if self.role == Role.PRE_CANDIDATE:
                self._run_election(pre=False, transfer=False)
            else:
                self._become_leader()
        elif result == quorum.VoteResult.LOST:
            # Stay in the same term; the election timer will try again.
            self._become_follower(self.term, NONE)

    def _handle_append(self, m: Message) -> None:
        log = self.log
        if m.index < log.committed:
            # Everything up to our commit already matches the leader's log.
            self._send(Message(_K.APPEND_RESP, self.id, m.frm, self.term, index=log.committed))
            return
        last = log.maybe_append(m.index, m.log_term, m.commit, m.entries)
        if last is not None:
            if self.lost_to and last >= self.lost_to:
                self.lost_to = 0  # the log matches the leader's beyond what it lost
                self._joined_stranger = False
            self._send(Message(_K.APPEND_RESP, self.id, m.frm, self.term, index=last))
            return
        # Mismatch at m.index: point the leader at the last entry that could still match.
        hint_index = min(m.index, log.last_index())
        hint_index, hint_term = log.find_conflict_by_term(hint_index, m.log_term)
        self._send(
            Message(
                _K.APPEND_RESP,
                self.id,
                m.frm,
                self.term,
                index=m.index,
                reject=True,
                reject_hint=hint_index,
                reject_hint_term=hint_term,
            )
        )

    def _handle_snapshot(self, m: Message) -> None:
        snap = m.snapshot
        assert snap is not None, "SNAPSHOT message without a snapshot"
        if self._restore(snap):
            index = self.log.last_index()
            if self.lost_to and index >= self.lost_to:
                self.lost_to = 0
                self._joined_stranger = False
        else:
            index = self.log.committed
        self._send(Message(_K.APPEND_RESP, self.id, m.frm, self.term, index=index))

    def _restore(self, snap: Snapshot) -> bool:
        meta = snap.meta
        log = self.log
        if meta.index <= log.committed:
            return False  # old news
        # The snapshot's configuration need not name us: a learner added (or a removed node
        # added again) after the snapshot's point is not in it, and the entries after it,
        # which the leader sends next, add it. Only our leader's snapshots get here.
        if log.match_term(meta.index, meta.term):
            # Our log already holds the snapshot's last entry: just fast-forward the commit.
            log.commit_to(meta.index)
            return False
        log.restore(snap)
        self.tracker.reset(meta.conf, log.last_index() + 1)
        self.conf_index = meta.index
        self._conf_dirty = True
        return True

    # ---- leader -------------------------------------------------------------------------

    def _append_entries(self, entries: list[Entry]) -> None:
        last = self.log.append(entries)
        own = self.tracker.progress.get(self.id)
        if own is not None:
            own.maybe_update(last)
        # A single-voter group commits at once (durability comes from the Ready contract:
        # entries are persisted before the committed ones are applied).
        self._maybe_commit()

    def _maybe_commit(self) -> bool:
        if self.log.maybe_commit(self.tracker.committed(), self.term):
            self._bcast_pending = True
            if self._pending_reads:
                self._release_pending_reads()
            log = self.log
            if log.confs and log.confs[0].index <= log.committed:
                self._apply_confs()
            return True
        return False

    def _step_leader(self, m: Message) -> None:
        k = m.kind
        if k == _K.READ_INDEX:
            self._leader_read(m.frm, m.context)
            return
        if k == _K.TRANSFER_LEADER:
            if m.index in self.tracker.conf.voters:
                self._leader_transfer(m.index)
            return
        pr = self.tracker.progress.get(m.frm)
        if pr is None:
            return  # not a member (any more)
        if k == _K.APPEND_RESP:
            pr.recent_active = True
            self._handle_append_resp(m, pr)
        elif k == _K.HEARTBEAT_RESP:
            pr.recent_active = True
            pr.probe_sent = False
            if pr.state == ProgressState.REPLICATE and pr.inflights.full():
                pr.inflights.free_first_one()
            last = self.log.last_index()
            if pr.match < last and (
                pr.state != ProgressState.REPLICATE
                or pr.next <= last
                or pr.match == pr.match_at_heartbeat
            ):
                # Probing, or entries wait for room in the window, or nothing was acknowledged
                # during the heartbeat's round trip although entries are missing (and were sent
                # at least a heartbeat interval ago, or the heartbeat would have been skipped):
                # the APPENDs were probably lost. An empty APPEND makes the follower reveal
                # where its log ends.
                self._send_append(m.frm, pr, send_if_empty=True)
            if m.context and self._read_only:
                self._read_ack(m.frm, m.context)
        elif k == _K.SNAPSHOT_RESP:
            pr.recent_active = True
            self.report_snapshot(m.frm, not m.reject)

    def _handle_append_resp(self, m: Message, pr: Progress) -> None:
        if m.reject:
            if m.context != LOST_ENTRIES_CONTEXT and pr.is_stale_rejection(m.index):
                # An answer to an APPEND older than the ones that count now: what it says
                # about the follower's log is out of date. This comes first, before the test
                # for lost entries below: a stale rejection hints below ``match`` too (it left
                # before the follower reached ``match``), and reading it as a loss forgot
                # ``match`` and probed again from the old hint, each time one arrived. (A
                # follower's report of lost entries answers a heartbeat, not an APPEND: its
                # ``index`` is the heartbeat's commit, at or below ``match``.)
                return
            next_probe = m.reject_hint
            if m.reject_hint_term > 0:
                next_probe, _ = self.log.find_conflict_by_term(m.reject_hint, m.reject_hint_term)
            if m.reject_hint < pr.match or (
                m.reject_hint == pr.match
                and m.reject_hint_term > 0
                and not self.log.match_term(m.reject_hint, m.reject_hint_term)
            ):
                # A follower whose log matches up to ``match`` never hints below it, nor at it
                # with another term than ours: it lost entries it acknowledged (or the answer
                # is stale all the same: in REPLICATE, one to an APPEND beyond ``match`` sent
                # before the last reset; probing costs a round trip). Forget what it
                # acknowledged and probe from its hint.
                pr.reset_to_probe(next_probe + 1)
                self._send_append(m.frm, pr, send_if_empty=True)
                return
            if pr.maybe_decr_to(m.index, next_probe):
                if pr.state == ProgressState.REPLICATE:
                    pr.become_probe()
                self._send_append(m.frm, pr, send_if_empty=True)
            return
        was_paused = pr.is_paused()
        if not pr.maybe_update(m.index):
            return
        if pr.state == ProgressState.PROBE:
            pr.become_replicate()
        elif pr.state == ProgressState.SNAPSHOT:
            if pr.match + 1 >= self.log.first_index():
                pr.become_probe()
                pr.become_replicate()
        else:
            pr.inflights.free_le(m.index)
        # What this answer made sendable (new entries in an opened window, a new commit index
        # for everyone) goes out in the next Ready, merged with proposals made meanwhile.
        self._maybe_commit()
        if was_paused or pr.next <= self.log.last_index():
            self._bcast_pending = True
        if m.frm == self.lead_transferee and pr.match == self.log.last_index():
            self._send(Message(_K.TIMEOUT_NOW, self.id, m.frm, self.term))

    def _send_append(self, to: int, pr: Progress, send_if_empty: bool) -> bool:
        """Sends ``to`` the entries it lacks (or a snapshot); False if nothing was sent."""
        if pr.is_paused():
            return False
        log = self.log
        prev_index = pr.next - 1
        try:
            prev_term = log.term(prev_index)
            entries = log.entries(pr.next, self.cfg.max_msg_bytes)
        except CompactedError:
            return self._send_snapshot(to, pr)
        except UnavailableError:
            # next is optimistic beyond our log (we were truncated by a snapshot?): re-probe.
            pr.become_probe()
            return False
        commit = log.committed
        if not entries and not send_if_empty and (pr.sent_commit >= commit or self.cfg.lazy_commit):
            # Nothing new to tell, or only a commit and that waits for the next APPEND or
            # heartbeat (Config.lazy_commit; the heartbeat round sends it, see there).
            return False
        nbytes = 0
        for e in entries:
            nbytes += e.size_bytes
        if entries and self.catchup is not None and self._limited(to, pr):
            if not self.catchup.take(nbytes):
                pr.throttled = self._throttled = True
                return False
        self._send(
            Message(
                _K.APPEND,
                self.id,
                to,
                self.term,
                log_term=prev_term,
                index=prev_index,
                entries=tuple(entries),
                commit=commit,
            )
        )
        pr.sent_commit = commit
        pr.appended_since_heartbeat = True
        pr.sent_entries(prev_index + len(entries), nbytes, len(entries))
        return True

    def _limited(self, to: int, pr: Progress) -> bool:
        """Whether entries to ``to`` go through the catch-up throttle: it is far behind, not
        the target of a leadership transfer, and a learner or the voters not far behind (this
        leader among them) are a majority without it, so the throttle never slows the
        commits of live traffic."""
        catchup = self.catchup
        assert catchup is not None
        last = self.log.last_index()
        # Where its log ends: ``match`` once replicating; while probing ``match`` is only a
        # lower bound (0 after a leader change) and ``next - 1`` the better guess.
        end = pr.match if pr.state == ProgressState.REPLICATE else max(pr.match, pr.next - 1)
        if to == self.id or to == self.lead_transferee or not catchup.behind(end, last):
            # A leadership transfer's target is never held back: proposals wait for the
            # transfer, so holding it back would hold live traffic back instead.
            return False
        if pr.is_learner:
            return True
        conf = self.tracker.conf
        if conf.voters_outgoing:
            return False  # a joint configuration: two majorities to keep; leave voters be
        voters = conf.voters
        ahead = 0
        for v in voters:
            if v == self.id:
                ahead += 1
            elif v != to:
                # Known to keep up: by what it acknowledged (a guess would not do here).
                other = self.tracker.progress.get(v)
                if other is not None and not catchup.behind(other.match, last):
                    ahead += 1
        return ahead > len(voters) // 2

    def _send_snapshot(self, to: int, pr: Progress) -> bool:
        if not pr.recent_active:
            return False  # do not ship a snapshot to a node that may be down
        try:
            snap = self.log.snapshot()
        except SnapshotTemporarilyUnavailable:
            return False
        assert not snap.is_empty, "a compacted log needs a snapshot covering it"
        self._send(Message(_K.SNAPSHOT, self.id, to, self.term, snapshot=snap))
        pr.become_snapshot(snap.meta.index)
        return True

    def _bcast_heartbeat(self, ctx: bytes) -> None:
        """Heartbeats carry only term, commit and ``ctx`` so a per-peer batcher can merge
        those of many groups. A periodic round (no ``ctx``) skips followers that got an
        APPEND since the last round: a busy group sends no heartbeats at all. A read round
        (``ctx``) goes to everyone, since its answers confirm leadership."""
        committed = self.log.committed
        for nid, pr in self.tracker.progress.items():
            if nid == self.id:
                continue
            # Never tell a follower to commit beyond what it is known to hold.
            commit = min(pr.match, committed)
            if pr.appended_since_heartbeat:
                pr.appended_since_heartbeat = False
                if not ctx and (not self.cfg.lazy_commit or pr.sent_commit >= commit):
                    # Its APPENDs carried everything a heartbeat would (with lazy commits,
                    # a commit that advanced since goes now: no follower waits more than a
                    # heartbeat interval to learn it).
                    continue
            pr.match_at_heartbeat = pr.match
            if self.cfg.lazy_commit:
                pr.sent_commit = max(pr.sent_commit, commit)
            if ctx:
                self._send(
                    Message(_K.HEARTBEAT, self.id, nid, self.term, commit=commit, context=ctx)
                )
                continue
            # An idle group sends the same heartbeat every time: reuse the immutable message.
            hb = pr.last_heartbeat
            if hb is None or hb.commit != commit or hb.term != self.term:
                hb = pr.last_heartbeat = Message(
                    _K.HEARTBEAT, self.id, nid, self.term, commit=commit
                )
            self._send(hb)

    def _flush_lazy_sends(self) -> None:
        """Sends what proposals, commits and reads since the last Ready made necessary, once
        per follower, so many small proposals share one APPEND."""
        if self.role != Role.LEADER:
            self._bcast_pending = False
            self._read_heartbeat_ctx = None
            return
        if self._bcast_pending:
            self._bcast_pending = False
            for nid, pr in self.tracker.progress.items():
                if nid != self.id:
                    while self._send_append(nid, pr, send_if_empty=False):
                        pass
        if self._read_heartbeat_ctx is not None:
            self._bcast_heartbeat(self._read_heartbeat_ctx)
            self._read_heartbeat_ctx = None

    def _leader_transfer(self, to: int) -> None:
        if self.lead_transferee == to:
            return
        self.lead_transferee = NONE  # abort any earlier transfer
        if to == self.id:
            return
        pr = self.tracker.progress.get(to)
        if pr is None or pr.is_learner:
            return
        # The transfer must finish within one election timeout.
        self.election_elapsed = 0
        self.lead_transferee = to
        if pr.match == self.log.last_index():
            self._send(Message(_K.TIMEOUT_NOW, self.id, to, self.term))
        else:
            self._send_append(to, pr, send_if_empty=True)

    # ---- read index ---------------------------------------------------------------------

    def _committed_in_term(self) -> bool:
        return self.log.term_or_none(self.log.committed) == self.term

    def _reads_ready(self) -> bool:
        """Whether the commit index is known to be the group's, so reads may be answered:
        an entry of this term is committed, or the log is empty (a leader holds every
        committed entry, so nothing was ever committed; without this a first leader that
        appends no empty entry would hold reads until the first write). Membership changes
        keep the stricter rule: an entry of the term committed first."""
        return self._committed_in_term() or self.log.last_index() == 0

    def _leader_read(self, frm: int, ctx: bytes) -> None:
        if self.tracker.is_singleton():
            self._answer_read(frm, self.log.committed, ctx)
            return
        if len(self._read_only) + len(self._pending_reads) >= self.cfg.max_pending_reads:
            if frm == self.id:
                raise ProposalDropped(
                    f"{self.cfg.max_pending_reads} reads pending (max_pending_reads)", self.id
                )
            return  # a remote requester times out and retries
        if not self._reads_ready():
            # Our commit index may lag the true one until an entry of our term commits.
            self._pending_reads.append((frm, ctx))
            return
        self._add_read(frm, ctx)

    def _add_read(self, frm: int, ctx: bytes) -> None:
        if ctx in self._read_only:
            return
        self._read_only[ctx] = _PendingRead(self.log.committed, frm, {self.id})
        self._read_heartbeat_ctx = ctx

    def _release_pending_reads(self) -> None:
        if not self._reads_ready():
            return
        pending, self._pending_reads = self._pending_reads, []
        for frm, ctx in pending:
            self._add_read(frm, ctx)

    def _read_ack(self, frm: int, ctx: bytes) -> None:
        req = self._read_only.get(ctx)
        if req is None:
            return
        req.acks.add(frm)
        votes = dict.fromkeys(req.acks, True)
        conf = self.tracker.conf
        if (
            quorum.joint_vote_result(conf.voters, conf.voters_outgoing, votes)
            != quorum.VoteResult.WON
        ):
            return
        # Leadership confirmed after every read registered up to ctx: answer them all.
        while self._read_only:
            c, r = self._read_only.popitem(last=False)
            self._answer_read(r.frm, r.index, c)
            if c == ctx:
                break

    def _answer_read(self, frm: int, index: int, ctx: bytes) -> None:
        if frm == self.id:
            self._read_states.append(ReadState(index, ctx))
        else:
            self._send(
                Message(_K.READ_INDEX_RESP, self.id, frm, self.term, index=index, context=ctx)
            )

    # ---- plumbing -----------------------------------------------------------------------

    def _send(self, m: Message) -> None:
        self._msgs.append(m)

    def __repr__(self) -> str:
        return (
            f"RawNode(id={self.id} {self.role.name} term={self.term} vote={self.vote} "
            f"leader={self.leader_id} last={self.log.last_index()} commit={self.log.committed} "
            f"applied={self.log.applied})"
        )
