"""CI entry point of the node-level simulation (issue 8): a sweep of seeds of each fault
profile, and the regression seeds.

A seed of the sweep fails the test unless its invariant is one of a defect listed as
``open`` in ``regressions.txt`` (a known defect whose fix is assigned: the sweep must not
turn red for it, and must for anything else); once the defect is marked ``fixed``, every
seed that finds it fails the sweep. Regression seeds marked ``open`` must still find their
defect (the simulator keeps its power to see it); ``fixed`` ones must pass.
"""

from __future__ import annotations

import pytest

from .runner import load_regressions, open_invariants
from .sim import RunResult, run_seed

#: (profile, first seed, seeds): 270 seeds, 1.5 to 3.5 minutes on one shared core.
SWEEPS = [
    ("default", 0, 50),
    ("default", 50, 50),
    ("default", 100, 40),
    ("wipe", 0, 30),
    ("flush-os", 0, 30),
    ("stall-one", 0, 20),
    ("backpressure", 0, 30),
    ("five", 0, 20),
]


def _report(results: list[RunResult]) -> str:
    return "\n".join(
        "\n".join(["    " + line for line in r.trace[-20:]] + [r.line()]) for r in results
    )


@pytest.mark.timeout(180)
@pytest.mark.parametrize(("profile", "first", "count"), SWEEPS)
def test_sweep(profile: str, first: int, count: int) -> None:
    known = open_invariants(profile)
    unexpected = []
    for seed in range(first, first + count):
        result = run_seed(seed, profile=profile)
        assert result.stats.virtual_s > 1.0, "the seed ran no simulated time"
        if not result.ok and not set(result.violations) <= known:
            unexpected.append(result)
    if unexpected:
        pytest.fail(f"{len(unexpected)} failing seed(s):\n{_report(unexpected)}", pytrace=False)


@pytest.mark.timeout(180)
def test_regression_seeds() -> None:
    regressions = load_regressions()
    assert regressions, "regressions.txt lists no seed"
    wrong = []
    for r in regressions:
        result = run_seed(r.seed, profile=r.profile)
        if r.status == "fixed" and not result.ok:
            wrong.append(f"seed {r.seed} ({r.profile}) fails again:\n{_report([result])}")
        elif r.status == "open" and result.invariant != r.invariant:
            wrong.append(
                f"seed {r.seed} ({r.profile}) no longer finds {r.invariant!r} "
                f"(got {result.invariant or 'a pass'}): if the defect is fixed, mark it "
                "'fixed'; if the simulation changed, find a new seed for it"
            )
    assert not wrong, "\n".join(wrong)


def test_same_seed_same_run() -> None:
    """Determinism: one seed gives one trace, event for event."""
    a = run_seed(3)
    b = run_seed(3)
    assert a.trace == b.trace
    assert a.stats == b.stats
