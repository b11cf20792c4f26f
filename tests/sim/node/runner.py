"""The node simulation's regression seeds in ``regressions.txt``.

One seed a line: ``SEED PROFILE STATUS  # invariant it found: the defect``. STATUS is
``open`` while the defect is not fixed (the seed must still find exactly that invariant:
the simulator keeps proving it can) and ``fixed`` once it is (the seed must pass). A fix
flips its seeds from ``open`` to ``fixed``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

REGRESSIONS_PATH = Path(__file__).with_name("regressions.txt")


@dataclass(frozen=True, slots=True)
class Regression:
    seed: int
    profile: str
    status: str
    invariant: str
    note: str


def load_regressions(path: Path = REGRESSIONS_PATH) -> list[Regression]:
    out: list[Regression] = []
    if not path.exists():
        return out
    for n, line in enumerate(path.read_text().splitlines(), 1):
        text, _, note = line.partition("#")
        words = text.split()
        if not words:
            continue
        if len(words) != 3 or words[2] not in ("open", "fixed"):
            raise ValueError(f"{path}:{n}: expected 'SEED PROFILE open|fixed  # ...'")
        invariant, _, rest = note.partition(":")
        out.append(Regression(int(words[0]), words[1], words[2], invariant.strip(), rest.strip()))
    return out


def open_invariants(profile: str, path: Path = REGRESSIONS_PATH) -> set[str]:
    """Invariants of known defects not fixed yet, found under ``profile`` or the default
    profile (every profile's faults include the default's workload)."""
    found = [r for r in load_regressions(path) if r.status == "open"]
    return {r.invariant for r in found if r.profile in (profile, "default")}


__all__ = ["REGRESSIONS_PATH", "Regression", "load_regressions", "open_invariants"]
