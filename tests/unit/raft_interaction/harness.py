"""A small in-process cluster of Raft cores for unit and interaction tests.

Each node has a MemoryStorage and an outbox. ``process_ready`` follows the Ready contract
exactly (install snapshot, persist entries and hard state, queue messages, apply committed
entries, advance); ``deliver`` hands queued messages to their recipients unless a partition
cuts the link. Nothing is random: election timeouts are the minimum of their range unless a
test passes its own generator. (The full randomized simulator lives in tests/sim/.)
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass, field

from tidelog.node.raft.core import RawNode
from tidelog.node.raft.limits import Config, Rand
from tidelog.node.raft.storage import NO_LIMIT_BYTES, MemoryStorage
from tidelog.node.raft.types import (
    ConfState,
    Entry,
    EntryKind,
    HardState,
    Message,
    MessageKind,
    ReadState,
    Ready,
)


class MinRand:
    """Always the low end of the range: election timeouts are exactly T ticks."""

    def randint(self, a: int, b: int) -> int:
        return a


class MaxRand:
    """Always the high end: a node with it times out at 2T-1 ticks, so ticking it T times
    ends its leader lease without making it campaign."""

    def randint(self, a: int, b: int) -> int:
        return b


def fmt_entry(e: Entry) -> str:
    if e.kind == EntryKind.EMPTY:
        return f"{e.term}/{e.index} EMPTY"
    if e.kind == EntryKind.CONFIG:
        return f"{e.term}/{e.index} CONFIG {e.data!r}"
    return f"{e.term}/{e.index} {e.data.decode(errors='backslashreplace')!r}"


def fmt_msg(m: Message) -> str:
    parts = [f"{m.frm}->{m.to} {m.kind.name} term={m.term}"]
    if m.kind in (
        MessageKind.APPEND,
        MessageKind.VOTE,
        MessageKind.PRE_VOTE,
    ):
        parts.append(f"log_term={m.log_term} index={m.index}")
    elif m.index:
        parts.append(f"index={m.index}")
    if m.commit or m.kind in (MessageKind.APPEND, MessageKind.HEARTBEAT):
        parts.append(f"commit={m.commit}")
    if m.reject:
        parts.append(f"REJECT hint={m.reject_hint}/{m.reject_hint_term}")
    if m.entries:
        parts.append("entries=[" + ", ".join(fmt_entry(e) for e in m.entries) + "]")
    if m.context:
        parts.append(f"ctx={m.context.decode(errors='backslashreplace')}")
    if m.snapshot is not None:
        meta = m.snapshot.meta
        parts.append(f"snapshot={meta.term}/{meta.index} voters={sorted(meta.conf.voters)}")
    return " ".join(parts)


@dataclass
class Node:
    raft: RawNode
    storage: MemoryStorage
    applied: list[Entry] = field(default_factory=list)
    read_states: list[ReadState] = field(default_factory=list)


class Cluster:
    def __init__(
        self,
        voters: Iterable[int],
        learners: Iterable[int] = (),
        config: Config | None = None,
        rng: Rand | None = None,
        rngs: dict[int, Rand] | None = None,
    ) -> None:
        self.conf = ConfState(voters=frozenset(voters), learners=frozenset(learners))
        self.config = config or Config()
        default: Rand = rng if rng is not None else MinRand()
        self.rngs: dict[int, Rand] = {
            nid: (rngs or {}).get(nid, default) for nid in self.conf.members
        }
        self.nodes: dict[int, Node] = {}
        self.outbox: list[Message] = []
        self.cut: set[tuple[int, int]] = set()
        self.down: set[int] = set()
        self.delivered = 0
        for nid in sorted(self.conf.members):
            storage = MemoryStorage(self.conf)
            self.nodes[nid] = Node(RawNode(nid, storage, self.rngs[nid], self.config), storage)

    def __getitem__(self, nid: int) -> RawNode:
        return self.nodes[nid].raft

    # ---- faults -------------------------------------------------------------------------

    def partition(self, *groups: Iterable[int]) -> None:
        """Cuts every link between nodes of different groups (and heals the rest)."""
        sets = [set(g) for g in groups]
        self.cut = {
            (a, b)
            for i, ga in enumerate(sets)
            for j, gb in enumerate(sets)
            if i != j
            for a in ga
            for b in gb
        }

    def isolate(self, nid: int) -> None:
        others = [n for n in self.nodes if n != nid]
        self.partition([nid], others)

    def heal(self) -> None:
        self.cut = set()

    def restart(self, nid: int) -> None:
        """Crash and restart: unsent messages and volatile state are lost; storage survives
        (MemoryStorage keeps everything the driver persisted)."""
        node = self.nodes[nid]
        self.outbox = [m for m in self.outbox if m.frm != nid]
        applied = node.applied[-1].index if node.applied else 0
        node.raft = RawNode(nid, node.storage, self.rngs[nid], self.config, applied=applied)

    # ---- the Ready loop -----------------------------------------------------------------

    def process_ready(self, nid: int) -> Ready | None:
        node = self.nodes[nid]
        if not node.raft.has_ready():
            return None
        rd = node.raft.ready()
        if rd.snapshot is not None:
            node.storage.apply_snapshot(rd.snapshot)
        if rd.entries:
            node.storage.append(rd.entries)
        if rd.hard_state is not None:
            node.storage.set_hard_state(rd.hard_state)
        if rd.conf_state is not None:
            node.storage.set_conf_state(rd.conf_state, rd.conf_index)
        self.outbox.extend(rd.messages)
        node.applied.extend(rd.committed)
        node.read_states.extend(rd.read_states)
        node.raft.advance(rd)
        return rd

    def deliver(self, to: int | None = None) -> list[tuple[Message, bool]]:
        """Delivers the queued messages (for ``to`` only, if given); returns each with
        whether it arrived (False: dropped on a cut link)."""
        keep: list[Message] = []
        take: list[Message] = []
        for m in self.outbox:
            (take if to is None or m.to == to else keep).append(m)
        self.outbox = keep
        out = []
        for m in take:
            if (m.frm, m.to) in self.cut or m.to in self.down or m.to not in self.nodes:
                out.append((m, False))
                continue
            self.nodes[m.to].raft.step(m)
            self.delivered += 1
            out.append((m, True))
        return out

    def round(self) -> None:
        """Every live node processes one Ready, then every queued message is delivered once."""
        for nid in self.nodes:
            if nid not in self.down:
                self.process_ready(nid)
        self.deliver()

    def stabilize(self, max_rounds: int = 1000) -> list[str]:
        """Processes Readys and delivers messages until nothing moves; returns a trace."""
        trace: list[str] = []
        for _ in range(max_rounds):
            moved = False
            for nid in self.nodes:
                if nid in self.down:
                    continue
                rd = self.process_ready(nid)
                if rd is not None:
                    moved = True
            if self.outbox:
                moved = True
                for m, arrived in self.deliver():
                    trace.append(fmt_msg(m) if arrived else f"{fmt_msg(m)} (dropped)")
            if not moved:
                return trace
        raise AssertionError(f"cluster did not stabilize within {max_rounds} rounds")

    def tick(self, nid: int, n: int = 1) -> None:
        for _ in range(n):
            self.nodes[nid].raft.tick()

    def elect(self, nid: int) -> None:
        """Makes ``nid`` leader through a normal (pre-)election and settles the cluster."""
        self[nid].campaign()
        self.stabilize()
        assert self[nid].role.name == "LEADER", f"{nid} failed to become leader: {self[nid]}"

    # ---- inspection ---------------------------------------------------------------------

    def log_of(self, nid: int) -> list[Entry]:
        s = self.nodes[nid].storage
        return s.entries(s.first_index(), s.last_index() + 1, NO_LIMIT_BYTES)

    def set_log(self, nid: int, terms: list[int], term: int) -> None:
        """Replaces ``nid``'s durable log by entries of the given terms and restarts it."""
        node = self.nodes[nid]
        storage = MemoryStorage(self.conf)
        storage.append([Entry(t, i + 1, f"{t}.{i + 1}".encode()) for i, t in enumerate(terms)])
        storage.set_hard_state(HardState(term=term))
        node.storage = storage
        node.applied = []
        node.raft = RawNode(nid, storage, self.rngs[nid], self.config)

    def status(self, nid: int) -> list[str]:
        r = self[nid]
        lines = [
            f"{nid}: {r.role.name} term={r.term} vote={r.vote} leader={r.leader_id} "
            f"last={r.log.last_index()} commit={r.commit_index} applied={r.applied_index}"
            + (f" transferee={r.lead_transferee}" if r.lead_transferee else "")
        ]
        if r.role.name == "LEADER":
            for pid, pr in r.tracker.progress.items():
                lines.append(f"  {pid}: {pr!r}")
        return lines


def seeded(seed: int) -> Rand:
    return random.Random(seed)
