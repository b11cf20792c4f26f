"""A simulated network between the nodes of one run: latency, loss, duplication, reordering
and partitions, every choice drawn from the run's generator.

The network does not deliver anything itself: ``send`` returns the (delivery time, message)
pairs to schedule, and the simulator asks ``can_deliver`` when one comes due, so a partition
that starts while a message is in flight still cuts it (as a real one would). Reordering is
not a separate fault: independent random latencies reorder messages on their own, and the
slow tail makes messages arrive after whole elections.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass

from tidelog.node.raft.types import Message

from .options import SLOW_LATENCY_UNITS_MAX, SimOptions

#: A duplicate is delivered again at most this many extra copies.
DUPLICATES_MAX = 2


@dataclass(slots=True)
class NetworkStats:
    sent: int = 0
    delivered: int = 0
    dropped: int = 0
    duplicated: int = 0
    cut: int = 0


class Network:
    """Directed links between node ids; a link is down while a partition blocks it."""

    __slots__ = ("_blocked", "_faults", "_opts", "_rng", "stats")

    def __init__(self, opts: SimOptions, rng: random.Random) -> None:
        self._opts = opts
        self._rng = rng
        #: Directed (from, to) pairs that currently drop everything.
        self._blocked: set[tuple[int, int]] = set()
        #: Loss, duplication and the slow tail apply only while faults are on (safety phase).
        self._faults = True
        self.stats = NetworkStats()

    # ---- faults ------------------------------------------------------------------------

    def set_faults(self, on: bool) -> None:
        self._faults = on

    def heal(self) -> None:
        self._blocked.clear()

    @property
    def partitioned(self) -> bool:
        return bool(self._blocked)

    def split(self, side_a: Iterable[int], side_b: Iterable[int], symmetric: bool) -> None:
        """Cuts every link from ``side_a`` to ``side_b``, and back too when ``symmetric``."""
        a, b = list(side_a), list(side_b)
        for x in a:
            for y in b:
                self._blocked.add((x, y))
                if symmetric:
                    self._blocked.add((y, x))

    def isolate(self, node: int, nodes: Iterable[int]) -> None:
        others = [n for n in nodes if n != node]
        self.split([node], others, symmetric=True)

    def describe(self) -> str:
        return " ".join(f"{a}->{b}" for a, b in sorted(self._blocked)) or "none"

    # ---- traffic -----------------------------------------------------------------------

    def send(self, now: int, msg: Message) -> list[tuple[int, Message]]:
        """The deliveries ``msg`` turns into: none if lost, several if duplicated."""
        self.stats.sent += 1
        opts = self._opts
        rng = self._rng
        if self._faults and opts.drop_rate and rng.random() < opts.drop_rate:
            self.stats.dropped += 1
            return []
        copies = 1
        if self._faults and opts.duplicate_rate:
            while copies <= DUPLICATES_MAX and rng.random() < opts.duplicate_rate:
                copies += 1
                self.stats.duplicated += 1
        out: list[tuple[int, Message]] = []
        for _ in range(copies):
            if self._faults and opts.slow_rate and rng.random() < opts.slow_rate:
                latency = rng.randint(opts.latency_units_max, SLOW_LATENCY_UNITS_MAX)
            else:
                latency = rng.randint(opts.latency_units_min, opts.latency_units_max)
            out.append((now + latency, msg))
        return out

    def can_deliver(self, msg: Message) -> bool:
        if (msg.frm, msg.to) in self._blocked:
            self.stats.cut += 1
            return False
        self.stats.delivered += 1
        return True
