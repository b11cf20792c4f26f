"""Running many seeds: the regression list and the summary shared by the CLI and pytest."""

from __future__ import annotations

import functools
import multiprocessing
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from .sim import RunResult, run_seed

REGRESSIONS_PATH = Path(__file__).with_name("regressions.txt")
#: The seeds of the membership profile that once failed.
MEMBERSHIP_REGRESSIONS_PATH = Path(__file__).with_name("regressions_membership.txt")


def load_regressions(path: Path = REGRESSIONS_PATH) -> list[int]:
    """Seeds from the regression file: one per line, ``#`` starts a comment."""
    seeds: list[int] = []
    if not path.exists():
        return seeds
    for line in path.read_text().splitlines():
        text = line.split("#", 1)[0].strip()
        if text:
            seeds.append(int(text))
    return seeds


def record_regression(result: RunResult, path: Path | None = None) -> bool:
    """Appends a failing seed (with its invariant as a comment) unless already listed."""
    if path is None:
        path = MEMBERSHIP_REGRESSIONS_PATH if result.membership else REGRESSIONS_PATH
    if result.seed in load_regressions(path):
        return False
    with path.open("a") as f:
        f.write(f"{result.seed}  # {result.invariant}: {result.detail[:160]}\n")
    return True


@dataclass(slots=True)
class Summary:
    seeds: int = 0
    wall_s: float = 0.0
    failures: list[RunResult] = field(default_factory=list)
    events: int = 0
    ticks: int = 0
    elections: int = 0
    crashes: int = 0
    partitions: int = 0
    transfers: int = 0
    proposals: int = 0
    acks: int = 0
    snapshots_installed: int = 0
    conf_changes: int = 0
    liveness_ticks_max: int = 0

    def add(self, r: RunResult) -> None:
        self.seeds += 1
        s = r.stats
        self.events += s.events
        self.ticks += s.ticks
        self.elections += s.elections
        self.crashes += s.crashes
        self.partitions += s.partitions
        self.transfers += s.transfers
        self.proposals += s.proposals
        self.acks += s.acks
        self.snapshots_installed += s.snapshots_installed
        self.conf_changes += s.conf_changes
        if r.ok:
            self.liveness_ticks_max = max(self.liveness_ticks_max, s.liveness_ticks)
        else:
            self.failures.append(r)

    def lines(self) -> list[str]:
        per_seed_ms = 1000 * self.wall_s / max(1, self.seeds)
        rate = self.seeds / self.wall_s if self.wall_s else 0.0
        return [
            f"seeds run: {self.seeds}  wall time: {self.wall_s:.1f} s ({per_seed_ms:.0f} ms/seed, "
            f"{rate:.1f} seeds/s)  failures: {len(self.failures)}",
            f"events: {self.events}  node ticks: {self.ticks}  elections: {self.elections}"
            f"  crashes: {self.crashes}  partitions: {self.partitions}"
            f"  transfers: {self.transfers}  snapshots installed: {self.snapshots_installed}"
            f"  membership changes: {self.conf_changes}",
            f"proposals: {self.proposals}  acknowledged: {self.acks}"
            f"  slowest liveness recovery: {self.liveness_ticks_max} ticks",
        ]


def run_many(
    seeds: Iterable[int],
    on_result: Callable[[RunResult], None] | None = None,
    *,
    membership: bool = False,
    lazy_commit: bool = False,
    processes: int = 1,
) -> Summary:
    """Run ``seeds`` (in ``processes`` worker processes when above 1: each seed is
    deterministic on its own, so the results do not depend on it)."""
    summary = Summary()
    start = time.perf_counter()
    run = functools.partial(run_seed, membership=membership, lazy_commit=lazy_commit)
    results: Iterable[RunResult]
    pool = multiprocessing.Pool(processes) if processes > 1 else None
    results = map(run, seeds) if pool is None else pool.imap(run, seeds, chunksize=16)
    try:
        for result in results:
            summary.add(result)
            if on_result is not None:
                on_result(result)
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    summary.wall_s = time.perf_counter() - start
    return summary
