"""CI entry point of the deterministic simulation: 200 seeds plus every regression seed, 100
seeds and the regression seeds again with lazy commits (``--lazy-commit``: the node's
partitions' setting), and 100 seeds of the membership profile plus its regression seeds
(``python -m tests.sim`` runs thousands).

Seeds run in chunks so a failure names its chunk, and each failure carries the one-line
command that reproduces it (with ``-v`` for the event trace).
"""

from __future__ import annotations

import pytest

from .runner import MEMBERSHIP_REGRESSIONS_PATH, load_regressions, run_many

CI_SEEDS = 200
CHUNK_SEEDS = 50
#: Membership-profile seeds: about a quarter of a second each, so about 25 s in all.
MEMBERSHIP_CI_SEEDS = 100
#: Seeds run again with lazy commits (``Config.lazy_commit``, what the node's partitions use).
LAZY_COMMIT_CI_SEEDS = 100


def _check(seeds: list[int], *, membership: bool = False, lazy_commit: bool = False) -> None:
    summary = run_many(seeds, membership=membership, lazy_commit=lazy_commit)
    assert summary.seeds == len(seeds)
    if summary.failures:
        lines = "\n".join(r.line() for r in summary.failures)
        pytest.fail(f"{len(summary.failures)} failing seed(s):\n{lines}", pytrace=False)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("first", range(0, CI_SEEDS, CHUNK_SEEDS))
def test_seeds(first: int) -> None:
    _check(list(range(first, first + CHUNK_SEEDS)))


@pytest.mark.timeout(240)
def test_regression_seeds() -> None:
    _check(load_regressions())


@pytest.mark.timeout(240)
@pytest.mark.parametrize("first", range(0, LAZY_COMMIT_CI_SEEDS, CHUNK_SEEDS))
def test_lazy_commit_seeds(first: int) -> None:
    _check(list(range(first, first + CHUNK_SEEDS)), lazy_commit=True)


@pytest.mark.timeout(240)
def test_lazy_commit_regression_seeds() -> None:
    _check(load_regressions(), lazy_commit=True)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("first", range(0, MEMBERSHIP_CI_SEEDS, CHUNK_SEEDS))
def test_membership_seeds(first: int) -> None:
    _check(list(range(first, first + CHUNK_SEEDS)), membership=True)


@pytest.mark.timeout(240)
def test_membership_regression_seeds() -> None:
    _check(load_regressions(MEMBERSHIP_REGRESSIONS_PATH), membership=True)
