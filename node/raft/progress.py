"""What a leader knows about each follower's log, and the flow control of sending to it.

Each follower is in one of three states:

- PROBE: the leader does not know where the follower's log ends. It sends one APPEND and
  waits for the answer (or a heartbeat answer) before the next, walking ``next`` back on
  rejections (by whole terms, thanks to the reject hint).
- REPLICATE: the follower's log matched at ``match``. The leader streams APPENDs without
  waiting, advancing ``next`` optimistically (pipelining), bounded by an in-flight window
  counted in messages AND bytes.
- SNAPSHOT: the follower needs entries the leader has compacted; a snapshot is on its way
  and nothing else is sent until the follower acknowledges it (or the transfer fails).

``ProgressTracker`` holds the membership and every progress, and answers quorum questions
(commit index, vote tally, whether a majority is recently active) through ``quorum``.
"""

from __future__ import annotations

import enum
from collections import deque

from . import quorum
from .types import ConfState, Message


class ProgressState(enum.IntEnum):
    PROBE = 0
    REPLICATE = 1
    SNAPSHOT = 2


class Inflights:
    """APPEND messages sent in replicate state and not yet acknowledged, as (last index,
    bytes), oldest first. Full when either bound is reached."""

    __slots__ = ("_queue", "bytes", "max_bytes", "max_count")

    def __init__(self, max_count: int, max_bytes: int) -> None:
        assert max_count >= 1 and max_bytes >= 1
        self._queue: deque[tuple[int, int]] = deque()
        self.bytes = 0
        self.max_count = max_count
        self.max_bytes = max_bytes

    @property
    def count(self) -> int:
        return len(self._queue)

    def full(self) -> bool:
        return len(self._queue) >= self.max_count or self.bytes >= self.max_bytes

    def add(self, last_index: int, nbytes: int) -> None:
        assert not self.full(), "inflights: add while full"
        assert not self._queue or self._queue[-1][0] < last_index, "inflights: out of order"
        self._queue.append((last_index, nbytes))
        self.bytes += nbytes

    def free_le(self, index: int) -> None:
        """Acknowledgement up to ``index``: every message ending at or before it is done."""
        q = self._queue
        while q and q[0][0] <= index:
            self.bytes -= q.popleft()[1]
        assert self.bytes >= 0

    def free_first_one(self) -> None:
        """Makes room for one message (used when a heartbeat answer proves the follower alive
        while the window is full of possibly lost messages)."""
        if self._queue:
            self.bytes -= self._queue.popleft()[1]

    def reset(self) -> None:
        self._queue.clear()
        self.bytes = 0


class Progress:
    """The leader's view of one follower (or of itself)."""

    __slots__ = (
        "appended_since_heartbeat",
        "inflights",
        "is_learner",
        "last_heartbeat",
        "match",
        "match_at_heartbeat",
        "next",
        "pending_snapshot",
        "probe_sent",
        "recent_active",
        "sent_commit",
        "snapshot_checks",
        "state",
        "throttled",
    )

    def __init__(
        self, next_index: int, max_inflight_msgs: int, max_inflight_bytes: int, is_learner: bool
    ) -> None:
        self.match = 0
        self.next = next_index
        self.state = ProgressState.PROBE
        #: PROBE: an APPEND is out; wait for its answer (or a heartbeat answer).
        self.probe_sent = False
        #: SNAPSHOT: index of the snapshot being sent.
        self.pending_snapshot = 0
        #: SNAPSHOT: check-quorum periods spent waiting; after two the leader retries.
        self.snapshot_checks = 0
        #: Heard from since the last check-quorum period.
        self.recent_active = False
        #: Highest commit index sent to it (whether an empty APPEND is worth sending).
        self.sent_commit = 0
        #: An APPEND went out since the last heartbeat: it resets the follower's election
        #: timer just as well, so the periodic heartbeat to it is skipped.
        self.appended_since_heartbeat = False
        #: ``match`` when the last heartbeat went out: unchanged when its answer comes back
        #: while entries are missing means APPENDs were lost, not merely in flight.
        self.match_at_heartbeat = 0
        #: The last periodic heartbeat sent to it, reused while term and commit stay put.
        self.last_heartbeat: Message | None = None
        self.is_learner = is_learner
        self.inflights = Inflights(max_inflight_msgs, max_inflight_bytes)
        #: An APPEND to it was held back by the catch-up throttle (``RawNode.catchup``):
        #: the next tick tries again.
        self.throttled = False

    def __repr__(self) -> str:
        return (
            f"Progress({self.state.name} match={self.match} next={self.next}"
            f" inflight={self.inflights.count}/{self.inflights.bytes}B"
            f"{' learner' if self.is_learner else ''}"
            f"{' paused' if self.is_paused() else ''})"
        )

    def _reset_state(self, state: ProgressState) -> None:
        self.probe_sent = False
        self.pending_snapshot = 0
        self.snapshot_checks = 0
        self.state = state
        self.inflights.reset()

    def become_probe(self) -> None:
        if self.state == ProgressState.SNAPSHOT:
            # The snapshot may have landed; resume after it in any case.
            pending = self.pending_snapshot
            self._reset_state(ProgressState.PROBE)
            self.next = max(self.match + 1, pending + 1)
        else:
            self._reset_state(ProgressState.PROBE)
            self.next = self.match + 1

    def reset_to_probe(self, next_index: int) -> None:
        """The follower lost entries it acknowledged: nothing is known to match any more
        (``match`` only ever counted toward commits already made), probe from ``next_index``."""
        self._reset_state(ProgressState.PROBE)
        self.match = 0
        self.match_at_heartbeat = 0
        self.next = max(1, next_index)

    def become_replicate(self) -> None:
        self._reset_state(ProgressState.REPLICATE)
        self.next = self.match + 1

    def become_snapshot(self, snapshot_index: int) -> None:
        self._reset_state(ProgressState.SNAPSHOT)
        self.pending_snapshot = snapshot_index

    def maybe_update(self, n: int) -> bool:
        """The follower acknowledged its log up to ``n``; False if that is old news."""
        updated = False
        if self.match < n:
            self.match = n
            updated = True
            self.probe_sent = False
        self.next = max(self.next, n + 1)
        return updated

    def sent_entries(self, last_index: int, nbytes: int, count: int) -> None:
        """An APPEND ending at ``last_index`` went out."""
        if self.state == ProgressState.REPLICATE:
            if count:
                self.next = last_index + 1
                self.inflights.add(last_index, nbytes)
        elif self.state == ProgressState.PROBE:
            self.probe_sent = True
        else:
            raise AssertionError(f"sending entries in state {self.state.name}")

    def is_stale_rejection(self, rejected: int) -> bool:
        """Whether a rejection of the APPEND after index ``rejected`` answers a message older
        than the ones that count now (etcd's test, in its ``MaybeDecrTo``).

        In REPLICATE, an APPEND after an index at or below ``match`` cannot fail on a log that
        holds ``match``: its rejection left the follower before the acknowledgement of
        ``match`` did (the network reorders), or the follower lost entries since, which the
        next APPEND (always after an index beyond ``match`` here) reveals as well. In PROBE
        (and SNAPSHOT), only the answer to the APPEND after ``next - 1`` counts; the others
        answer APPENDs sent before ``next`` moved. Acting on such a rejection resets the
        progress again and resends the whole window; pipelined APPENDs that arrived out of
        order leave dozens of rejections in flight, and each reset brought more (the sim's
        seed 7928 never caught a follower up)."""
        if self.state == ProgressState.REPLICATE:
            return rejected <= self.match
        return rejected != self.next - 1

    def maybe_decr_to(self, rejected: int, match_hint: int) -> bool:
        """The follower rejected an APPEND after index ``rejected``; its log can match at most
        at ``match_hint``. False if the rejection is stale (answers an older message)."""
        if self.is_stale_rejection(rejected):
            return False
        if self.state == ProgressState.REPLICATE:
            self.next = self.match + 1
            return True
        self.next = max(min(rejected, match_hint + 1), self.match + 1)
        self.probe_sent = False
        return True

    def is_paused(self) -> bool:
        if self.state == ProgressState.PROBE:
            return self.probe_sent
        if self.state == ProgressState.REPLICATE:
            return self.inflights.full()
        return True


class ProgressTracker:
    """Membership plus one Progress per member (the leader's own included)."""

    __slots__ = (
        "conf",
        "max_inflight_bytes",
        "max_inflight_msgs",
        "progress",
        "recovering_votes",
        "stranger_votes",
        "votes",
    )

    def __init__(self, conf: ConfState, max_inflight_msgs: int, max_inflight_bytes: int) -> None:
        self.max_inflight_msgs = max_inflight_msgs
        self.max_inflight_bytes = max_inflight_bytes
        self.conf = conf
        self.progress: dict[int, Progress] = {}
        self.votes: dict[int, bool] = {}
        #: Voters whose rejection said "recovering, your log is as up to date as mine".
        self.recovering_votes: set[int] = set()
        #: Those of them that are strangers (new replicas of an older group, core.py).
        self.stranger_votes: set[int] = set()
        self.reset(conf, next_index=1)

    def reset(self, conf: ConfState, next_index: int) -> None:
        """Fresh progress for every member (on becoming leader or on a new configuration)."""
        self.conf = conf
        self.progress = {
            nid: Progress(
                next_index,
                self.max_inflight_msgs,
                self.max_inflight_bytes,
                is_learner=nid in conf.learners,
            )
            for nid in sorted(conf.members)
        }
        self.votes = {}
        self.recovering_votes = set()
        self.stranger_votes = set()

    def is_singleton(self) -> bool:
        return len(self.conf.voters) == 1 and not self.conf.voters_outgoing

    def committed(self) -> int:
        """The highest index durable on a quorum of voters."""
        acked = {nid: pr.match for nid, pr in self.progress.items() if not pr.is_learner}
        return quorum.joint_committed_index(self.conf.voters, self.conf.voters_outgoing, acked)

    def record_vote(
        self, nid: int, granted: bool, *, recovering: bool = False, stranger: bool = False
    ) -> None:
        if nid not in self.votes:
            self.votes[nid] = granted
            if recovering:
                self.recovering_votes.add(nid)
                if stranger:
                    self.stranger_votes.add(nid)

    def tally_votes(self) -> quorum.VoteResult:
        """A majority of grants, or (raft/core.py: unanimous elections) every voter either
        granted or is recovering and found the candidate's log as up to date as its own, the
        voters that are not strangers being a majority."""
        result = quorum.joint_vote_result(self.conf.voters, self.conf.voters_outgoing, self.votes)
        rec = self.recovering_votes
        if result == quorum.VoteResult.WON or not rec:
            return result
        voters = set(self.conf.voters) | set(self.conf.voters_outgoing)
        if all(self.votes.get(v) or v in rec for v in voters):
            strangers = self.stranger_votes
            knowing = dict.fromkeys((v for v in voters if v not in strangers), True)
            if (
                not strangers
                or quorum.joint_vote_result(self.conf.voters, self.conf.voters_outgoing, knowing)
                == quorum.VoteResult.WON
            ):
                return quorum.VoteResult.WON
            return quorum.VoteResult.LOST  # every voter answered; strangers are a majority
        if result == quorum.VoteResult.LOST and any(
            self.votes.get(v) is False and v not in rec for v in voters
        ):
            return quorum.VoteResult.LOST
        return quorum.VoteResult.PENDING

    def quorum_active(self, self_id: int) -> bool:
        """Whether a quorum of voters was heard from recently (the leader counts itself)."""
        active = {
            nid: (pr.recent_active or nid == self_id)
            for nid, pr in self.progress.items()
            if not pr.is_learner
        }
        return (
            quorum.joint_vote_result(self.conf.voters, self.conf.voters_outgoing, active)
            == quorum.VoteResult.WON
        )

    def voter_ids(self) -> list[int]:
        return sorted(self.conf.voters | self.conf.voters_outgoing)
