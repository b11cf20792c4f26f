"""The invariants the simulator checks after every step, each kept incremental so checking
costs O(1) per entry written or applied, not O(log) per step.

The key device is a hash chain: the hash at index ``i`` covers every (term, kind, payload) up
to ``i``, so two logs with the same chain hash at ``i`` have identical prefixes. Log matching
then becomes "the chain hash of (index, term) is the same on every node that ever wrote it",
one dictionary lookup per entry written.

Invariants (the name a violation reports):

- ``election-safety``: at most one leader per term; learners never campaign.
- ``log-matching``: two logs holding an entry with the same index and term agree on the
  whole prefix up to it.
- ``state-machine-safety``: an entry applied at index ``i`` is the same on every node, the
  applied state at ``i`` is the same on every node, and a node's log never changes at or
  below its commit index (also across crashes).
- ``leader-completeness``: every committed entry, and by name every entry acknowledged to a
  client, is in the log of every leader of a later term than the one it was committed in.
- ``linear-order``: a node applies 1, 2, 3, ... with no gap and no repeat (restarting from its
  snapshot after a crash); each proposal is applied at one index only.
- ``durability``: an append acknowledgement or a vote leaves a node only once what it
  promises is on its durable disk (the Ready contract, seen from the outside).
- ``read-linearizability``: a read index is never below an index acknowledged to a client
  before the read was requested.

Membership changes (the membership profile, ``sim.py``) add, with every configuration each
node believes in recorded at each step it changes (``Checker.conf_history``):

- ``election-safety`` and ``leader-completeness`` above hold across configurations: at most
  one leader per term whatever configuration each node believed it was elected in, and
  every committed entry is in every later leader. Two disjoint majorities of different
  configurations would break one or the other: two leaders of one term, or a leader elected
  by a majority that holds none of what the other majority committed.
- ``commit-quorum``: when a leader's commit index moves to ``i``, a majority of the voters
  of the configuration it believes in hold entry ``i`` (durably, the leader's own copy
  aside), so a commit is never counted on a configuration's say-so alone.
- ``conf-committed``: the configuration a node believes in is a committed one (it comes
  from a committed CONFIG entry, with exactly that entry's configuration, or from a
  snapshot of committed state, or is the initial one).
- ``one-change-in-flight``: in any log, every CONFIG entry but the last is committed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import struct
from collections.abc import Callable
from dataclasses import dataclass

from tidelog.node.raft.storage import StorageReader
from tidelog.node.raft.types import (
    ConfChange,
    ConfState,
    Entry,
    EntryKind,
    Message,
    MessageKind,
    Role,
)

#: The chain hash of the empty log (index 0).
GENESIS_HASH = 0

_PACK = struct.Struct(">QQB")


def chain_hash(prev: int, entry: Entry) -> int:
    """The hash of a log prefix ending with ``entry``, given the prefix hash before it."""
    h = hashlib.blake2b(_PACK.pack(prev, entry.term, int(entry.kind)), digest_size=8)
    h.update(entry.data)
    return int.from_bytes(h.digest(), "big")


class InvariantViolation(AssertionError):
    """A safety or liveness property failed; ``invariant`` names it for the one-line report."""

    def __init__(self, invariant: str, detail: str) -> None:
        super().__init__(f"{invariant}: {detail}")
        self.invariant = invariant
        self.detail = detail


class LogShadow:
    """The chain hashes and terms of one node's written log, mirroring its storage.

    ``base_*`` describe the compaction point (a snapshot's index and term); ``terms[k]`` and
    ``hashes[k]`` are those of index ``base_index + 1 + k``.
    """

    __slots__ = ("base_hash", "base_index", "base_term", "commit", "confs", "hashes", "terms")

    def __init__(
        self, base_index: int = 0, base_term: int = 0, base_hash: int = GENESIS_HASH
    ) -> None:
        self.base_index = base_index
        self.base_term = base_term
        self.base_hash = base_hash
        self.terms: list[int] = []
        self.hashes: list[int] = []
        #: The commit index of the last hard state written.
        self.commit = 0
        #: Indexes of the CONFIG entries in the log (above the compaction point).
        self.confs: list[int] = []

    @property
    def last_index(self) -> int:
        return self.base_index + len(self.terms)

    def term_at(self, index: int) -> int | None:
        if index == self.base_index:
            return self.base_term
        k = index - self.base_index - 1
        if 0 <= k < len(self.terms):
            return self.terms[k]
        return None

    def hash_at(self, index: int) -> int | None:
        if index == self.base_index:
            return self.base_hash
        k = index - self.base_index - 1
        if 0 <= k < len(self.hashes):
            return self.hashes[k]
        return None


@dataclass(frozen=True, slots=True)
class Ack:
    """An entry a client saw committed and applied by the node it proposed to."""

    index: int
    term: int
    chain: int
    payload: bytes
    time: int
    #: The term the entry was committed in (an upper bound), set by ``Checker.on_ack``.
    commit_term: int = 0


class Checker:
    """The cluster-wide records the invariants are checked against."""

    __slots__ = (
        "_applied",
        "_chains",
        "_commit_max_by_term",
        "_commit_term",
        "_committed",
        "_conf_entries",
        "_entry_term",
        "_leaders",
        "_payload_index",
        "_sm_digests",
        "acked_max_index",
        "acks",
        "conf_history",
        "confs",
    )

    def __init__(self) -> None:
        self._leaders: dict[int, int] = {}
        #: (index, term) -> chain hash, the first time any node wrote that entry.
        self._chains: dict[tuple[int, int], int] = {(0, 0): GENESIS_HASH}
        #: index -> chain hash, the first time any node committed that index.
        self._committed: dict[int, int] = {0: GENESIS_HASH}
        #: index -> the term of the entry committed there.
        self._entry_term: dict[int, int] = {0: 0}
        #: index -> the term of the node that first committed it (the leader that committed
        #: it, or a node of a later term: an upper bound either way).
        self._commit_term: dict[int, int] = {0: 0}
        #: term -> the highest index first committed in that term.
        self._commit_max_by_term: dict[int, int] = {}
        #: index -> the entry first applied there.
        self._applied: dict[int, Entry] = {}
        #: index -> state-machine digest after applying it.
        self._sm_digests: dict[int, int] = {0: GENESIS_HASH}
        self._payload_index: dict[bytes, int] = {}
        self.acks: list[Ack] = []
        self.acked_max_index = 0
        #: (index, term) -> the configuration of each CONFIG entry any node wrote.
        self._conf_entries: dict[tuple[int, int], ConfState] = {}
        #: node -> (index in force from, configuration) it believes in now.
        self.confs: dict[int, tuple[int, ConfState]] = {}
        #: Every change of belief: (time, node, index, configuration).
        self.conf_history: list[tuple[int, int, int, ConfState]] = []

    # ---- elections ---------------------------------------------------------------------

    def on_role(self, node: int, role: Role, term: int, learner: bool) -> None:
        if learner and role != Role.FOLLOWER:
            raise InvariantViolation(
                "election-safety", f"learner {node} became {role.name} in term {term}"
            )
        if role == Role.LEADER:
            first = self._leaders.setdefault(term, node)
            if first != node:
                raise InvariantViolation(
                    "election-safety", f"two leaders in term {term}: {first} and {node}"
                )

    def on_new_leader(
        self, node: int, term: int, term_at: Callable[[int], int | None], base_index: int
    ) -> None:
        """Leader completeness, checked the moment a node wins an election, against its whole
        log (``term_at``, persisted or not; entries up to ``base_index`` are compacted).

        "Later" means a later *term* than the one the entry was committed in, not a later
        time: a candidate whose messages were delayed can win an old term after a newer
        term's leader committed more (it can never commit anything itself, as a majority has
        moved on), and Raft rightly lets it lack those entries (seed 554 is such a run).
        Entries are compared by (index, term), which identifies them given log matching
        (checked separately on every write).
        """
        # The highest index first committed in an earlier term: holding it means holding
        # every committed entry before it.
        best = max((i for t, i in self._commit_max_by_term.items() if t < term), default=0)
        if not self._holds(term_at, base_index, best):
            raise InvariantViolation(
                "leader-completeness",
                f"leader {node} of term {term} lacks index {best} term {self._entry_term[best]} "
                f"committed in term {self._commit_term[best]} (its log: compacted to "
                f"{base_index}, term there {term_at(best)})",
            )
        for ack in self.acks:
            if ack.commit_term < term and not self._holds(term_at, base_index, ack.index):
                raise InvariantViolation(
                    "leader-completeness",
                    f"leader {node} of term {term} lacks acknowledged entry index {ack.index} "
                    f"term {ack.term} payload {ack.payload!r} committed in term "
                    f"{ack.commit_term} (its log: term there {term_at(ack.index)})",
                )

    def _holds(self, term_at: Callable[[int], int | None], base_index: int, index: int) -> bool:
        """Whether a log holds the committed entry at ``index``."""
        if index < base_index:
            # Compacted: the compaction point is committed, so it must be the committed one.
            index = base_index
        return term_at(index) == self._entry_term[index]

    # ---- log writes --------------------------------------------------------------------

    def on_append(self, node: int, log: LogShadow, entries: tuple[Entry, ...]) -> None:
        """Mirrors ``MemoryStorage.append`` on the shadow and checks log matching and that
        nothing at or below the node's commit index changes."""
        if not entries:
            return
        first = entries[0].index
        if first > log.last_index + 1:
            raise InvariantViolation(
                "log-matching",
                f"node {node} appends at {first} after a gap (last {log.last_index})",
            )
        skip = max(0, log.base_index + 1 - first)
        for e in entries[:skip]:
            # Covered by the snapshot: must agree with it where known.
            if e.index == log.base_index and e.term != log.base_term:
                raise InvariantViolation(
                    "log-matching",
                    f"node {node} appends term {e.term} at its snapshot index {e.index} "
                    f"(term {log.base_term})",
                )
        entries = entries[skip:]
        if not entries:
            return
        first = entries[0].index
        for e in entries:
            if e.index > log.commit:
                break
            have = log.term_at(e.index)
            if have is not None and have != e.term:
                raise InvariantViolation(
                    "state-machine-safety",
                    f"node {node} overwrites committed index {e.index} (commit {log.commit}): "
                    f"term {have} -> {e.term}",
                )
        cut = first - log.base_index - 1
        del log.terms[cut:]
        del log.hashes[cut:]
        while log.confs and log.confs[-1] >= first:
            log.confs.pop()
        prev = log.hash_at(first - 1)
        assert prev is not None
        chains = self._chains
        for e in entries:
            h = chain_hash(prev, e)
            seen = chains.setdefault((e.index, e.term), h)
            if seen != h:
                raise InvariantViolation(
                    "log-matching",
                    f"node {node} holds index {e.index} term {e.term} with a prefix or payload "
                    "that differs from another node's entry at the same index and term",
                )
            log.terms.append(e.term)
            log.hashes.append(h)
            prev = h
            if e.kind == EntryKind.CONFIG:
                log.confs.append(e.index)
                self._conf_entries.setdefault((e.index, e.term), ConfChange.decode(e.data).conf)

    def on_commit(self, node: int, log: LogShadow, commit: int, term: int) -> None:
        """Records the node's new commit index; the entries it newly covers must be the ones
        every other node committed there."""
        old = log.commit
        if commit < old:
            # A hard state may move the commit backwards only after a crash (handled by
            # on_restart); a running node never un-commits.
            raise InvariantViolation(
                "state-machine-safety", f"node {node} commit index went back {old} -> {commit}"
            )
        if commit > log.last_index:
            raise InvariantViolation(
                "state-machine-safety",
                f"node {node} commits {commit} beyond its last index {log.last_index}",
            )
        self._check_committed(node, log, max(old + 1, log.base_index), commit, term)
        log.commit = commit

    def _record_commit(self, index: int, h: int, entry_term: int, term: int) -> int:
        """Records the first commit of ``index``; returns the chain hash committed there."""
        first = self._committed.get(index)
        if first is not None:
            return first
        self._committed[index] = h
        self._entry_term[index] = entry_term
        self._commit_term[index] = term
        best = self._commit_max_by_term.get(term, 0)
        if index > best:
            self._commit_max_by_term[term] = index
        return h

    def _check_committed(self, node: int, log: LogShadow, lo: int, hi: int, term: int) -> None:
        for i in range(lo, hi + 1):
            h = log.hash_at(i)
            assert h is not None
            entry_term = log.term_at(i)
            assert entry_term is not None
            first = self._record_commit(i, h, entry_term, term)
            if first != h:
                raise InvariantViolation(
                    "state-machine-safety",
                    f"node {node} committed index {i} term {log.term_at(i)} that differs from "
                    "the entry another node committed there",
                )

    def on_install_snapshot(
        self, node: int, log: LogShadow, index: int, term: int, node_term: int
    ) -> None:
        """The log becomes the snapshot point; that point must be an entry some node wrote,
        and the committed one at that index."""
        h = self._chains.get((index, term))
        if h is None:
            raise InvariantViolation(
                "log-matching",
                f"node {node} installs a snapshot at unknown index {index} term {term}",
            )
        if index < log.commit:
            raise InvariantViolation(
                "state-machine-safety",
                f"node {node} installs a snapshot at {index} below its commit index {log.commit}",
            )
        first = self._record_commit(index, h, term, node_term)
        if first != h:
            raise InvariantViolation(
                "state-machine-safety",
                f"node {node} installs a snapshot at {index} term {term} that differs from "
                "the committed entry there",
            )
        log.base_index, log.base_term, log.base_hash = index, term, h
        log.terms.clear()
        log.hashes.clear()
        log.confs.clear()

    def on_compact(self, log: LogShadow, index: int) -> None:
        k = index - log.base_index
        if k <= 0:
            return
        log.base_term = log.terms[k - 1]
        log.base_hash = log.hashes[k - 1]
        log.base_index = index
        del log.terms[:k]
        del log.hashes[:k]
        log.confs = [c for c in log.confs if c > index]

    def on_restart(
        self,
        node: int,
        base_index: int,
        base_term: int,
        entries: list[Entry],
        commit: int,
        term: int,
    ) -> LogShadow:
        """Rebuilds a node's shadow from what survived on its disk and checks the surviving
        committed prefix is still the committed one."""
        h = self._chains.get((base_index, base_term))
        if h is None:
            raise InvariantViolation(
                "log-matching",
                f"node {node} restarted from a snapshot at unknown index {base_index} term {base_term}",
            )
        log = LogShadow(base_index, base_term, h)
        log.commit = base_index
        self.on_append(node, log, tuple(entries))
        if commit > log.last_index:
            raise InvariantViolation(
                "state-machine-safety",
                f"node {node} restarted with commit {commit} beyond its durable log "
                f"(last index {log.last_index}): committed entries were not durable",
            )
        self._check_committed(node, log, base_index, max(commit, base_index), term)
        log.commit = max(commit, base_index)
        return log

    # ---- the state machine -------------------------------------------------------------

    def on_apply(self, node: int, applied: int, digest: int, entry: Entry) -> int:
        """Checks one applied entry; returns the state machine's new digest."""
        if entry.index != applied + 1:
            raise InvariantViolation(
                "linear-order", f"node {node} applied index {entry.index} after {applied}"
            )
        first = self._applied.setdefault(entry.index, entry)
        if first is not entry and first != entry:
            raise InvariantViolation(
                "state-machine-safety",
                f"node {node} applied index {entry.index} term {entry.term} "
                f"payload {entry.data!r}; another node applied term {first.term} "
                f"payload {first.data!r} there",
            )
        new_digest = chain_hash(digest, entry)
        if self._sm_digests.setdefault(entry.index, new_digest) != new_digest:
            raise InvariantViolation(
                "state-machine-safety",
                f"node {node} state after applying index {entry.index} differs from another node's",
            )
        if entry.kind == EntryKind.NORMAL and entry.data:
            where = self._payload_index.setdefault(entry.data, entry.index)
            if where != entry.index:
                raise InvariantViolation(
                    "linear-order",
                    f"proposal {entry.data!r} applied at both index {where} and {entry.index}",
                )
        return new_digest

    def on_restore(self, node: int, applied: int, index: int, digest: int) -> None:
        """A state machine loads a snapshot taken at ``index`` with ``digest``."""
        if index < applied:
            raise InvariantViolation(
                "linear-order",
                f"node {node} restores a snapshot at {index} behind applied {applied}",
            )
        first = self._sm_digests.setdefault(index, digest)
        if first != digest:
            raise InvariantViolation(
                "state-machine-safety",
                f"node {node} restores a snapshot at {index} whose state differs from the "
                "state other nodes reached there",
            )

    def sm_digest_at(self, index: int) -> int | None:
        return self._sm_digests.get(index)

    def committed_chain(self, index: int) -> int | None:
        return self._committed.get(index)

    # ---- durability ------------------------------------------------------------------

    def on_send(self, node: int, msg: Message, durable: StorageReader) -> None:
        """A message that promises something about the sender's disk may leave only once
        that is durable: an append acknowledgement (the leader counts it toward commit) and
        a vote (the voter must not vote again in that term after a crash)."""
        if msg.reject:
            return
        if msg.kind == MessageKind.APPEND_RESP:
            last = durable.last_index()
            # Once the node durably moved to a later term, a leader of that term may have
            # replaced the acknowledged entries (even before they reached the disk, when
            # both messages were stepped before one Ready): that is Raft's own truncation of
            # an uncommitted suffix, and the acknowledgement was true when it was made.
            if msg.index > last and durable.hard_state().term <= msg.term:
                raise InvariantViolation(
                    "durability",
                    f"node {node} acknowledged index {msg.index} to {msg.to} in term "
                    f"{msg.term} but only {last} is durable",
                )
        elif msg.kind == MessageKind.VOTE_RESP:
            hs = durable.hard_state()
            if hs.term < msg.term or (hs.term == msg.term and hs.vote != msg.to):
                raise InvariantViolation(
                    "durability",
                    f"node {node} granted its term-{msg.term} vote to {msg.to} but its durable "
                    f"hard state is term {hs.term} vote {hs.vote}",
                )

    # ---- clients -----------------------------------------------------------------------

    def on_ack(self, ack: Ack) -> None:
        first = self._committed.get(ack.index)
        if first is not None and first != ack.chain:
            raise InvariantViolation(
                "state-machine-safety",
                f"acknowledged entry at {ack.index} differs from the committed one",
            )
        self.acks.append(dataclasses.replace(ack, commit_term=self._commit_term[ack.index]))
        self.acked_max_index = max(self.acked_max_index, ack.index)

    def on_read(self, node: int, read_index: int, acked_before: int) -> None:
        if read_index < acked_before:
            raise InvariantViolation(
                "read-linearizability",
                f"node {node} served read index {read_index} although index {acked_before} was "
                "acknowledged before the read began",
            )

    # ---- membership ----------------------------------------------------------------------

    def beliefs(self) -> str:
        """What each node believes its group is, for a violation's detail."""
        return " ".join(
            f"n{n}:{sorted(c.voters)}+{sorted(c.learners)}@{i}"
            for n, (i, c) in sorted(self.confs.items())
        )

    def on_conf(self, now: int, node: int, index: int, conf: ConfState, log: LogShadow) -> None:
        """The configuration ``node`` believes in (after a change, a snapshot or a restart)."""
        if self.confs.get(node) != (index, conf):
            self.confs[node] = (index, conf)
            self.conf_history.append((now, node, index, conf))
        if index == 0:
            return
        if index not in self._committed:
            raise InvariantViolation(
                "conf-committed",
                f"node {node} believes in the configuration of index {index}, which is not "
                f"committed ({self.beliefs()})",
            )
        expected = self._conf_entries.get((index, self._entry_term[index]))
        if expected is not None and index > log.base_index and expected != conf:
            raise InvariantViolation(
                "conf-committed",
                f"node {node} believes in {conf} at index {index}, whose entry says {expected}",
            )

    def check_in_flight(self, node: int, log: LogShadow) -> None:
        for c in log.confs[:-1]:
            if c > log.base_index and c not in self._committed:
                raise InvariantViolation(
                    "one-change-in-flight",
                    f"node {node} holds CONFIG entries at {log.confs} but {c} is not committed",
                )

    def on_leader_commit(
        self, node: int, term: int, conf: ConfState, index: int, holders: set[int]
    ) -> None:
        voters = conf.voters
        if len(holders & voters) * 2 <= len(voters):
            raise InvariantViolation(
                "commit-quorum",
                f"leader {node} of term {term} committed index {index} held by "
                f"{sorted(holders)} only, not a majority of its voters {sorted(voters)} "
                f"({self.beliefs()})",
            )
