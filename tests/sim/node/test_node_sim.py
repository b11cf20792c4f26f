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

from tidelog.node.controller_node import Controller
from tidelog.node.raft.types import Entry

from .runner import load_regressions, open_invariants
from .sim import RunResult, run_seed

#: (profile, first seed, seeds): 212 seeds, 1.5 to 4 minutes on one shared core (the
#: controller and wipe-majority sweeps: about 25 s of it, wipe-majority-controller about
#: 35 s). ``python -m tests.sim.node --profile all`` runs thousands.
SWEEPS = [
    ("default", 0, 30),
    ("default", 30, 30),
    ("wipe", 0, 20),
    ("flush-os", 0, 20),
    ("stall-one", 0, 20),
    ("backpressure", 0, 20),
    ("five", 0, 20),
    ("move", 0, 20),
    ("controller", 0, 20),
    ("wipe-majority", 0, 20),
    ("wipe-majority-controller", 0, 12),
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


@pytest.mark.parametrize("profile", ["default", "controller"])
def test_same_seed_same_run(profile: str) -> None:
    """Determinism: one seed gives one trace, event for event."""
    a = run_seed(3, profile=profile)
    b = run_seed(3, profile=profile)
    assert a.trace == b.trace
    assert a.stats == b.stats


def test_the_controller_checks_see_a_node_that_skips_an_entry(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The controller checks have the power to see issue 8 defect 4 (a node that skips a
    committed entry, as one that could not decode it used to): node 2 skips index 6."""
    real = Controller._apply

    def skipping(self: Controller, e: Entry) -> object:
        if self.node_id == 2 and e.index == 6:
            return None
        return real(self, e)

    monkeypatch.setattr(Controller, "_apply", skipping)
    result = run_seed(1, profile="controller")
    assert result.invariant == "controller states differ", result.line()
    assert result.detail.startswith("after index 6: node ") and "node 2 " in result.detail


def test_the_controller_runs_commands_and_converges() -> None:
    """A controller seed does what it claims: commands acknowledged (some rejected by apply,
    as they must be on every node alike), every node applying them. Seed 5: a seed whose
    faults leave the controller time to run commands (seed 1, used before, acknowledged
    only 7 once the voters' elections changed with the fixes of 2026-12-02)."""
    result = run_seed(5, profile="controller")
    assert result.ok, result.line()
    s = result.stats
    assert s.ctl_acked >= 10 and s.ctl_rejected >= 1, s
    assert s.ctl_applies >= 3 * s.ctl_acked, s
