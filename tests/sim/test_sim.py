"""CI entry point of the deterministic simulation: 300 seeds plus every regression seed.

Seeds run in chunks so a failure names its chunk, and each failure carries the one-line
command that reproduces it (with ``-v`` for the event trace).
"""

from __future__ import annotations

import pytest

from .runner import load_regressions, run_many

CI_SEEDS = 300
CHUNK_SEEDS = 50


def _check(seeds: list[int]) -> None:
    summary = run_many(seeds)
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
