"""Every knob and bound of the Raft core in one place, with their relations asserted.

Time is counted in ticks; the driver decides what a tick is. The core's defaults below are
in ticks only; tidelog's node does not use them as they are: ``node/multiraft.RaftTiming``
turns its wall-clock settings (a 50 ms tick, a heartbeat every 100 ms, an election timeout
of 1 s randomized over ``[1 s, 1.5 s)``) into these fields.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

KIB = 1024
MIB = 1024 * KIB


class Rand(Protocol):
    """The seeded random source the caller passes in (e.g. ``random.Random(seed)``); the core
    draws election timeouts from it and from nothing else."""

    def randint(self, a: int, b: int) -> int:
        """A uniform integer in ``[a, b]``, both ends included."""
        ...


class CatchupThrottle(Protocol):
    """The driver's rate limit on catching up by APPEND (``RawNode.catchup``): a follower far
    behind its leader is sent entries only as fast as the driver's budget allows, so a
    replica rebuilt from the log does not starve live traffic; one a little behind is not
    held back. The core asks, it never waits: a refused APPEND is retried at the next tick.
    The driver's answers may depend on its clock; the core's behaviour stays a function of
    them (the simulators pass none; the unit tests a deterministic one)."""

    def behind(self, match: int, last: int) -> bool:
        """Whether a follower whose log ends at index ``match`` (as far as the leader knows)
        is far enough behind ``last`` (the leader's last index) that its catch-up is
        limited."""
        ...

    def take(self, nbytes: int) -> bool:
        """Whether an APPEND of ``nbytes`` entry bytes to a follower far behind may go now
        (then it is counted against the budget)."""
        ...


@dataclass(frozen=True, slots=True)
class Config:
    """Limits and features of one Raft group. Immutable; shared by every group of a node."""

    #: A follower that hears nothing from a leader for a randomized timeout in
    #: ``[election_timeout_ticks, 2 * election_timeout_ticks)`` starts an election. It is also
    #: the check-quorum period and the bound on a leadership transfer.
    election_timeout_ticks: int = 10
    #: Width of the randomized part of the election timeout: a follower times out after
    #: ``[election_timeout_ticks, election_timeout_ticks + span)`` ticks. 0 (the default)
    #: means a span of ``election_timeout_ticks``, the paper's ``[T, 2T)``; a narrower span
    #: shortens the expected failover (the cluster uses ``[T, 1.5T)``) at a slightly higher
    #: risk of split votes.
    election_timeout_span_ticks: int = 0
    #: A leader sends heartbeats this often.
    heartbeat_interval_ticks: int = 1
    #: Entry bytes (``Entry.size_bytes``) per APPEND message; one entry may exceed it alone.
    max_msg_bytes: int = 1 * MIB
    #: APPEND messages in flight (sent, not acknowledged) per follower in replicate state.
    max_inflight_msgs: int = 256
    #: Entry bytes in flight per follower; together with the count it bounds the memory a
    #: slow follower can pin on the leader.
    max_inflight_bytes: int = 32 * MIB
    #: Bytes proposed but not yet committed; beyond it a leader drops proposals (backpressure
    #: instead of unbounded growth when followers lag).
    max_uncommitted_bytes: int = 64 * MIB
    #: Bytes of committed entries handed to the application in one Ready.
    max_committed_bytes_per_ready: int = 16 * MIB
    #: ReadIndex requests waiting for their heartbeat round (or for the leader's first commit).
    max_pending_reads: int = 4096
    #: Pre-vote (thesis §9.6): a node asks whether it could win before bumping its term, so a
    #: partitioned node that returns does not depose a healthy leader.
    pre_vote: bool = True
    #: Check-quorum (thesis §6.2): a leader steps down after an election timeout without
    #: hearing from a majority; followers ignore votes while they hear from a leader.
    check_quorum: bool = True
    #: A new leader appends an EMPTY entry so that entries of earlier terms commit (§5.4.2).
    #: With False it appends one only when its log holds entries beyond its commit index:
    #: when the log is entirely committed there is nothing to commit indirectly, and a log
    #: whose every entry takes a consumer offset (a partition) keeps its offsets dense
    #: across restarts. Then ``read_index`` waits for the term's first proposal to commit.
    always_append_empty: bool = True
    #: A commit index that advanced with no entries to send waits for the next APPEND or
    #: heartbeat (within a heartbeat interval) instead of going out in an APPEND of its own
    #: (the Raft paper's rule, §5.3: the leader includes it in future AppendEntries,
    #: heartbeats included, so followers eventually find out). Followers apply later, but a
    #: write costs two messages and a follower round fewer: its commit no longer needs an
    #: APPEND to each follower, their rounds and their answers. The leader's commit, its
    #: answers to writers and every safety property are unchanged; only what followers
    #: know of the commit lags (it is never required of them: Raft only needs it eventually).
    lazy_commit: bool = False

    def __post_init__(self) -> None:
        assert self.heartbeat_interval_ticks >= 1, "heartbeat_interval_ticks must be >= 1"
        assert self.election_timeout_ticks > self.heartbeat_interval_ticks, (
            "an election timeout must span more than one heartbeat interval, or followers "
            "campaign against a healthy leader"
        )
        assert self.election_timeout_span_ticks >= 0, "election_timeout_span_ticks must be >= 0"
        assert self.max_msg_bytes >= 1
        assert self.max_inflight_msgs >= 1
        assert self.max_inflight_bytes >= self.max_msg_bytes, (
            "max_inflight_bytes below max_msg_bytes would stall replication after one message"
        )
        assert self.max_uncommitted_bytes >= self.max_msg_bytes
        assert self.max_committed_bytes_per_ready >= self.max_msg_bytes
        assert self.max_pending_reads >= 1


DEFAULT_CONFIG = Config()
