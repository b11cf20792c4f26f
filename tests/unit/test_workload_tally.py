"""``bench workload``'s bookkeeping (tidelog/ops/workload.py): the rate achieved counts only
the acknowledgements inside the measured window, and a tick's records sent with one
``send_many`` are each timed from their own scheduled time."""

from __future__ import annotations

import time

import pytest

from tidelog.ops.workload import LatencySummary, WorkloadResult, WorkloadSpec, _Tally


def _result(tally: _Tally, spec: WorkloadSpec) -> WorkloadResult:
    return WorkloadResult(
        spec=spec,
        measured=tally.measured,
        measured_s=spec.duration_s,
        sent_total=tally.sent,
        acked_total=tally.acked,
        errors=tally.errors,
        first_error=tally.first_error,
        publish=LatencySummary.of(tally.hist),
        schedule_lag=LatencySummary.of(tally.lag),
        e2e=None,
        consumed_total=None,
        acked_in_window=tally.acked_in_window,
    )


def test_acknowledgements_after_the_window_do_not_count_towards_the_rate() -> None:
    spec = WorkloadSpec(rate=1000, warmup_s=1, duration_s=2)
    tally = _Tally()
    now = time.monotonic_ns()
    # The window ended a moment ago: records scheduled inside it and acknowledged only
    # now (a backlog the flush drained) count for latency, not for the rate.
    tally.window = (now - 2_000_000_000, now - 1_000_000)
    tally.done_many(now - 1_500_000_000, 1e6, 1000, warm=now - 2_000_000_000)
    result = _result(tally, spec)
    assert result.measured == 1000 and tally.hist.get_total_count() == 1000
    assert result.achieved_rate == 0.0
    assert result.to_json()["acked_in_window"] == 0

    inside = _Tally()
    inside.window = (now - 1_000_000_000, now + 1_000_000_000)
    inside.done_many(now - 500_000_000, 1e6, 400, warm=now - 1_000_000_000)
    assert _result(inside, spec).achieved_rate == pytest.approx(400 / 2)


def test_a_tick_of_records_is_timed_from_each_records_schedule() -> None:
    tally = _Tally()
    now = time.monotonic_ns()
    tally.window = (now - 10**9, now + 10**9)
    # 1,000 records 10 us apart, the first scheduled 20 ms ago: latencies 10..20 ms.
    first = now - 20_000_000
    tally.done_many(first, 10_000.0, 1000, warm=first)
    h = tally.hist
    assert h.get_total_count() == 1000
    assert 10_000 * 0.95 <= h.get_min_value() and h.get_max_value() <= 20_000 * 1.05
    assert h.get_value_at_percentile(50) / 1000 == pytest.approx(15, rel=0.1)


def test_records_of_the_warm_up_are_acknowledged_but_not_measured() -> None:
    tally = _Tally()
    now = time.monotonic_ns()
    tally.window = (now - 10**9, now + 10**9)
    warm = now - 5_000_000
    # 100 records 100 us apart from 10 ms ago: the first 50 belong to the warm-up.
    tally.done_many(now - 10_000_000, 100_000.0, 100, warm=warm)
    assert tally.acked == 100 and tally.acked_in_window == 100
    assert tally.measured == 50 and tally.hist.get_total_count() == 50
