"""Mutation testing of the simulator: break the Raft core on purpose, show a seed catches it.

Each mutation is a monkeypatch applied in this process only (``unittest.mock.patch``), so no
broken code is ever written to ``node/raft/``. For each, seeds run from 0 until the first
failure (or ``--seeds`` without one); the table shows the first failing seed and the
invariant it violated. A mutation the simulator cannot catch is a hole in the simulator (or a
mutation that is not a bug): the table says so rather than hiding it.

    .venv/bin/python -m tests.sim.mutations [--seeds 2000] [--only NAME]

A printed seed reproduces under the same mutation with ``--only NAME --start SEED --seeds 1``.

``follower-commit-unverified`` is kept although no seed catches it: in this core it is an
equivalent mutant. Its danger needs a follower holding a stale suffix past the end of an
APPEND that matched, and the core's reject hints always land the leader's next APPEND on the
first conflicting index, which truncates the suffix in the same step (a probe over 300 seeds
found the follower's log longer than an APPEND's end, with the commit beyond it, 44 times in
184,487 appends, never with a stale suffix). The ``min(commit, last_new)`` stays as a
defence in depth.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any
from unittest import mock

from tidelog.node.raft import core as core_mod
from tidelog.node.raft import quorum as quorum_mod
from tidelog.node.raft import raft_log as log_mod
from tidelog.node.raft.core import RawNode
from tidelog.node.raft.raft_log import RaftLog
from tidelog.node.raft.types import NONE, Entry, Message, MessageKind, Ready, Role

from .checkers import Checker
from .sim import RunResult, Simulation, run_seed

#: Seeds tried per mutation before declaring it uncaught.
SEEDS_DEFAULT = 2000


@dataclass(frozen=True, slots=True)
class Mutation:
    name: str
    what: str
    patch: Callable[[], contextlib.AbstractContextManager[Any]]


# ---- the mutations, each a deliberate bug in the core (or the driver) -------------------


def _vote_ignores_log() -> contextlib.AbstractContextManager[Any]:
    """§5.4.1 removed: any candidate's log counts as up to date."""

    def is_up_to_date(self: RaftLog, last_index: int, term: int) -> bool:
        return True

    return mock.patch.object(RaftLog, "is_up_to_date", is_up_to_date)


def _stale_term_votes() -> contextlib.AbstractContextManager[Any]:
    """A candidate counts vote grants that answer an election of an earlier term."""
    original = RawNode.step

    def step(self: RawNode, m: Message) -> None:
        if (
            m.kind == MessageKind.VOTE_RESP
            and m.term < self.term
            and self.role == Role.CANDIDATE
            and m.to == self.id
        ):
            self._step(m)
            return
        original(self, m)

    return mock.patch.object(RawNode, "step", step)


def _commit_old_term() -> contextlib.AbstractContextManager[Any]:
    """§5.4.2 removed: a leader commits an entry of an earlier term by counting replicas."""

    def maybe_commit(self: RaftLog, index: int, term: int) -> bool:
        if index > self.committed and self.term_or_none(index) is not None:
            self.commit_to(index)
            return True
        return False

    return mock.patch.object(RaftLog, "maybe_commit", maybe_commit)


def _keep_conflicting_suffix() -> contextlib.AbstractContextManager[Any]:
    """A follower keeps entries that conflict with the leader's (only appends new ones)."""

    def find_conflict(self: RaftLog, entries: tuple[Entry, ...]) -> int:
        last = self.last_index()
        for e in entries:
            if e.index > last:
                return e.index
        return 0

    return mock.patch.object(RaftLog, "find_conflict", find_conflict)


def _no_sync_before_send() -> contextlib.AbstractContextManager[Any]:
    """The core never asks for an fsync: appends and votes are acknowledged before they are
    durable, and a crash forgets them."""
    original = RawNode.ready

    def ready(self: RawNode) -> Ready:
        return dataclasses.replace(original(self), must_sync=False)

    return mock.patch.object(RawNode, "ready", ready)


def _vote_not_synced() -> contextlib.AbstractContextManager[Any]:
    """Only entries are synced: a term or vote change is sent before it is durable, so a
    crashed voter can vote twice in one term."""
    original = RawNode.ready

    def ready(self: RawNode) -> Ready:
        rd = original(self)
        return dataclasses.replace(rd, must_sync=bool(rd.entries or rd.snapshot))

    return mock.patch.object(RawNode, "ready", ready)


def _driver_sends_before_sync() -> contextlib.AbstractContextManager[Any]:
    """The driver (not the core) breaks the Ready contract: it sends the messages as soon as
    it has written, while the fsync is still in flight."""
    original = Simulation._persist

    def persist(self: Simulation, node: Any, rd: Ready) -> None:
        original(self, node, rd)
        if rd.must_sync and rd.messages:
            self._send(node, rd.messages)
            # The Ready still completes later, without sending again.
            object.__setattr__(rd, "messages", ())

    return mock.patch.object(Simulation, "_persist", persist)


def _leader_ignores_higher_term() -> contextlib.AbstractContextManager[Any]:
    """A leader drops messages of a higher term instead of stepping down."""
    original = RawNode.step

    def step(self: RawNode, m: Message) -> None:
        if self.role == Role.LEADER and m.term > self.term:
            return
        original(self, m)

    return mock.patch.object(RawNode, "step", step)


def _minority_quorum() -> contextlib.AbstractContextManager[Any]:
    """Off by one in the quorum size: half the voters count as a majority."""

    def majority(n: int) -> int:
        return max(1, n // 2)

    return mock.patch.object(quorum_mod, "majority", majority)


def _follower_commits_unverified() -> contextlib.AbstractContextManager[Any]:
    """A follower takes the leader's commit index even beyond the entries the APPEND proved
    matching (drops the ``min(commit, last_new)``)."""
    original = RaftLog.maybe_append

    def maybe_append(
        self: RaftLog, index: int, log_term: int, committed: int, entries: tuple[Entry, ...]
    ) -> int | None:
        last = original(self, index, log_term, committed, entries)
        if last is not None and committed > self.committed:
            self.committed = min(committed, self.last_index())
        return last

    return mock.patch.object(RaftLog, "maybe_append", maybe_append)


def _heartbeat_commit_unbounded() -> contextlib.AbstractContextManager[Any]:
    """Heartbeats carry the leader's commit index even to followers not known to match it."""

    def bcast(self: RawNode, ctx: bytes) -> None:
        committed = self.log.committed
        for nid in self.tracker.progress:
            if nid != self.id:
                self._send(
                    Message(
                        MessageKind.HEARTBEAT,
                        self.id,
                        nid,
                        self.term,
                        commit=committed,
                        context=ctx,
                    )
                )

    def commit_to(self: RaftLog, index: int) -> None:
        # Without the bound a follower may be told to commit past its log; clamp so the
        # mutation shows its real danger (committing entries that do not match the leader's).
        if index > self.committed:
            self.committed = min(index, self.last_index())

    return _both(
        mock.patch.object(RawNode, "_bcast_heartbeat", bcast),
        mock.patch.object(RaftLog, "commit_to", commit_to),
    )


def _old_snapshot_accepted() -> contextlib.AbstractContextManager[Any]:
    """A follower installs a snapshot even when it is older than its commit index."""

    def restore(self: RawNode, snap: Any) -> bool:
        if self.id not in snap.meta.conf.members:
            return False
        self.log.restore(snap)
        self.tracker.reset(snap.meta.conf, self.log.last_index() + 1)
        return True

    return mock.patch.object(RawNode, "_restore", restore)


def _vote_twice() -> contextlib.AbstractContextManager[Any]:
    """A voter grants every candidate whose log is up to date, even after voting in the term."""
    original = RawNode._handle_vote_request

    def handle(self: RawNode, m: Message) -> None:
        if m.kind == MessageKind.VOTE and self.log.is_up_to_date(m.index, m.log_term):
            self.vote = NONE
            self.leader_id = NONE
        original(self, m)

    return mock.patch.object(RawNode, "_handle_vote_request", handle)


def _read_without_quorum() -> contextlib.AbstractContextManager[Any]:
    """ReadIndex answered at once, without confirming leadership with a quorum."""

    def leader_read(self: RawNode, frm: int, ctx: bytes) -> None:
        self._answer_read(frm, self.log.committed, ctx)

    return mock.patch.object(RawNode, "_leader_read", leader_read)


@contextlib.contextmanager
def _both(
    a: contextlib.AbstractContextManager[Any], b: contextlib.AbstractContextManager[Any]
) -> Iterator[None]:
    with a, b:
        yield


MUTATIONS: tuple[Mutation, ...] = (
    Mutation("vote-ignores-log", "grant votes without the log up-to-date check", _vote_ignores_log),
    Mutation("stale-term-votes", "count vote grants from an earlier term", _stale_term_votes),
    Mutation("commit-old-term", "commit an earlier term's entry by counting", _commit_old_term),
    Mutation("keep-conflicts", "skip truncating a conflicting suffix", _keep_conflicting_suffix),
    Mutation("no-sync", "ack appends and votes before they are durable", _no_sync_before_send),
    Mutation("vote-not-synced", "send a vote before it is durable", _vote_not_synced),
    Mutation("send-before-sync", "driver sends messages before fsync", _driver_sends_before_sync),
    Mutation("leader-no-step-down", "leader ignores a higher term", _leader_ignores_higher_term),
    Mutation("minority-quorum", "quorum of n//2 instead of n//2+1", _minority_quorum),
    Mutation(
        "follower-commit-unverified",
        "follower commits past the matched prefix",
        _follower_commits_unverified,
    ),
    Mutation(
        "heartbeat-commit",
        "heartbeat commit not bounded by the follower's match",
        _heartbeat_commit_unbounded,
    ),
    Mutation("old-snapshot", "install a snapshot older than the commit", _old_snapshot_accepted),
    Mutation("vote-twice", "vote for two candidates in one term", _vote_twice),
    Mutation("read-no-quorum", "serve ReadIndex without a quorum round", _read_without_quorum),
)

# The core modules are imported so a reader sees what the mutations reach into.
assert core_mod.RawNode is RawNode and log_mod.RaftLog is RaftLog


def _no_check(self: Checker, node: int, msg: Message, durable: object) -> None:
    return None


@dataclass(frozen=True, slots=True)
class MutationResult:
    mutation: Mutation
    seeds_run: int
    failure: RunResult | None
    wall_s: float


def hunt(mutation: Mutation, start: int, seeds: int) -> MutationResult:
    """Runs seeds under ``mutation`` until one fails."""
    t0 = time.perf_counter()
    with mutation.patch():
        for k, seed in enumerate(range(start, start + seeds)):
            result = run_seed(seed)
            if not result.ok:
                return MutationResult(mutation, k + 1, result, time.perf_counter() - t0)
    return MutationResult(mutation, seeds, None, time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.sim.mutations")
    parser.add_argument("--seeds", type=int, default=SEEDS_DEFAULT)
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--only", help="run this mutation only")
    parser.add_argument("-v", "--verbose", action="store_true", help="print the full detail")
    parser.add_argument(
        "--without-durability-check",
        action="store_true",
        help="turn the direct durability check off, to see what a durability bug breaks next",
    )
    args = parser.parse_args(argv)
    chosen = [m for m in MUTATIONS if args.only in (None, m.name)]
    if not chosen:
        parser.error(f"no mutation named {args.only!r}: {[m.name for m in MUTATIONS]}")
    header = f"{'mutation':<27} {'caught':<7} {'seed':>6} {'tried':>6} {'time':>6}  invariant"
    print(header)
    print("-" * len(header))
    missed = 0
    for m in chosen:
        with contextlib.ExitStack() as stack:
            if args.without_durability_check:
                stack.enter_context(mock.patch.object(Checker, "on_send", _no_check))
            r = hunt(m, args.start, args.seeds)
        if r.failure is None:
            missed += 1
            caught, seed, inv = "NO", "-", f"(none in {r.seeds_run} seeds)"
        else:
            caught, seed = "yes", str(r.failure.seed)
            inv = r.failure.invariant
            if args.verbose:
                inv += f": {r.failure.detail}"
        print(f"{m.name:<27} {caught:<7} {seed:>6} {r.seeds_run:>6} {r.wall_s:>5.1f}s  {inv}")
        sys.stdout.flush()
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
