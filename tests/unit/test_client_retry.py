"""The client's one retry policy (tidelog.client.retry), used by the producer's sender and
the consumer's fetchers: the doubling backoff and its caps, leader errors that follow the
leader at once a bounded number of times, and failures that count as one step."""

from __future__ import annotations

import pytest

import tidelog.client.consumer
import tidelog.client.producer
import tidelog.client.sender
from tidelog.client import limits
from tidelog.client.limits import (
    LEADER_HOPS_IMMEDIATE_MAX,
    LEADER_RETRY_BACKOFF_MAX_MS,
    RETRY_BACKOFF_MAX_MS,
)
from tidelog.client.metadata import ClusterMetadata, NodeInfo, PartitionInfo, TopicInfo
from tidelog.client.retry import Retry, is_leader_error
from tidelog.client.structs import TopicPartition
from tidelog.errors import (
    LeaderNotAvailable,
    NodeUnavailable,
    NotEnoughReplicas,
    NotLeader,
    RequestTimedOut,
    UnknownTopic,
)

TP = TopicPartition("t", 0)
A1, A2 = "127.0.0.1:1", "127.0.0.1:2"


def _meta() -> ClusterMetadata:
    meta = ClusterMetadata(A1)
    meta.nodes = {1: NodeInfo(1, A1, "", True), 2: NodeInfo(2, A2, "", True)}
    meta.topics = {"t": TopicInfo("t", (PartitionInfo(0, 1, (1, 2), (1, 2)),), False)}
    return meta


def _steps(retry: Retry, address: str, err: Exception, n: int) -> list[float]:
    out = []
    for _ in range(n):
        retry.failed(address, err)  # type: ignore[arg-type]
        out.append(retry.schedule())
    return out


def test_errors_that_leave_the_leader_in_place_double_up_to_one_second() -> None:
    retry = Retry(_meta(), TP, 100)
    steps = _steps(retry, A1, NotEnoughReplicas("2 of 3 in sync"), 7)
    assert steps == [100, 200, 400, 800, RETRY_BACKOFF_MAX_MS, RETRY_BACKOFF_MAX_MS, 1000]
    assert not retry.leader_error
    retry.succeeded()
    assert _steps(retry, A1, NotEnoughReplicas("x"), 1) == [100]


def test_leader_errors_cap_lower_and_watch_for_a_new_leader() -> None:
    retry = Retry(_meta(), TP, 100)
    steps = _steps(retry, A1, NodeUnavailable("down"), 4)
    assert steps == [100, 200, LEADER_RETRY_BACKOFF_MAX_MS, LEADER_RETRY_BACKOFF_MAX_MS]
    assert retry.leader_error and retry.watch_worthwhile()


@pytest.mark.parametrize(
    "err",
    [
        NotLeader("x"),
        LeaderNotAvailable("x"),
        NodeUnavailable("x"),
        RequestTimedOut("x"),
        UnknownTopic("x"),
    ],
)
def test_the_leader_errors_are_one_list(err: Exception) -> None:
    assert is_leader_error(err)  # type: ignore[arg-type]


def test_a_hint_naming_a_new_leader_is_followed_at_once_a_bounded_number_of_times() -> None:
    meta = _meta()
    retry = Retry(meta, TP, 100)
    delays = []
    for i in range(LEADER_HOPS_IMMEDIATE_MAX + 1):
        # The nodes name each other: 1 -> 2 -> 1 -> ...
        here, there = (A1, "2") if i % 2 == 0 else (A2, "1")
        applied = retry.failed(here, NotLeader("moved", leader_id=there))
        assert applied
        delays.append(retry.schedule())
    assert delays[:LEADER_HOPS_IMMEDIATE_MAX] == [0.0] * LEADER_HOPS_IMMEDIATE_MAX
    assert delays[-1] == 100  # beyond the hops, the backoff applies
    retry.succeeded()
    assert retry.hops == 0


def test_failures_before_the_next_attempt_are_one_step_a_leader_error_if_any_was() -> None:
    meta = _meta()
    retry = Retry(meta, TP, 100)
    retry.failed(A1, NotEnoughReplicas("x"))
    retry.failed(A1, NodeUnavailable("down"))
    retry.failed(A1, NotEnoughReplicas("x"))
    assert retry.schedule() == 100
    assert retry.leader_error


def test_a_zero_backoff_still_waits_a_millisecond() -> None:
    retry = Retry(_meta(), TP, 0)
    assert _steps(retry, A1, NotEnoughReplicas("x"), 3) == [1, 2, 4]


def test_no_client_object_keeps_its_own_copy_of_the_policy() -> None:
    for module in (tidelog.client.consumer, tidelog.client.producer, tidelog.client.sender):
        for name in ("RETRY_BACKOFF_MAX_MS", "LEADER_RETRY_BACKOFF_MAX_MS"):
            # Either not there, or the one from tidelog.client.limits.
            assert getattr(module, name, None) in (None, getattr(limits, name)), module
        assert not hasattr(module, "_LEADER_ERRORS") and not hasattr(module, "_Retry")
