"""node/trace.py: sampling and the stages a traced produce request reports."""

from __future__ import annotations

import logging

import pytest
from prometheus_client import CollectorRegistry

from tidelog.node.trace import FOLLOWER_STAGES, PRODUCE_STAGES, Tracer


def count(registry: CollectorRegistry, name: str, stage: str) -> float:
    value = registry.get_sample_value(f"{name}_count", {"stage": stage})
    assert value is not None
    return value


def test_off_by_default_costs_nothing_and_samples_nothing() -> None:
    tracer = Tracer(CollectorRegistry())
    assert tracer.produce("t", 0) is None
    assert not tracer.append_sampled()


def test_every_nth_request_is_sampled() -> None:
    tracer = Tracer(CollectorRegistry(), every=3)
    sampled = [tracer.produce("t", 0) is not None for _ in range(9)]
    assert sampled == [False, False, True] * 3
    assert [tracer.append_sampled() for _ in range(6)] == [False, False, True] * 2


def test_a_finished_span_observes_each_stage_it_reached(caplog: pytest.LogCaptureFixture) -> None:
    registry = CollectorRegistry()
    tracer = Tracer(registry, every=1, log_spans=True)
    span = tracer.produce("t", 2)
    assert span is not None
    span.proposed = span.received + 100_000
    span.index = 7
    span.stored = span.proposed + 400_000
    span.committed = span.proposed + 900_000
    span.applied = span.committed + 50_000
    with caplog.at_level(logging.INFO, logger="tidelog.trace"):
        tracer.finish(span)
    for stage in PRODUCE_STAGES:
        assert count(registry, "tidelog_trace_produce_seconds", stage) == 1
    total = registry.get_sample_value("tidelog_trace_produce_seconds_sum", {"stage": "quorum"})
    assert total == pytest.approx(0.0009)
    (line,) = caplog.messages
    assert "t/2 index 7" in line and "leader_store=0.400ms" in line and "quorum=0.900ms" in line

    # A request answered before its entry was stored (acks=0/1 paths) skips what it missed.
    partial = tracer.produce("t", 2)
    assert partial is not None
    partial.proposed = partial.received + 1
    tracer.finish(partial)
    assert count(registry, "tidelog_trace_produce_seconds", "admit") == 2
    assert count(registry, "tidelog_trace_produce_seconds", "quorum") == 1


def test_follower_stages() -> None:
    registry = CollectorRegistry()
    tracer = Tracer(registry, every=1)
    tracer.follower(1_000_000, 1_200_000, 2_000_000)
    for stage in FOLLOWER_STAGES:
        assert count(registry, "tidelog_trace_follower_seconds", stage) == 1
    answered = registry.get_sample_value(
        "tidelog_trace_follower_seconds_sum", {"stage": "answered"}
    )
    assert answered == pytest.approx(0.001)


def test_a_negative_interval_is_refused() -> None:
    with pytest.raises(ValueError, match=">= 0"):
        Tracer(CollectorRegistry(), every=-1)
