"""``tidelog cluster health``'s verdict from one Metadata view (tidelog/ops/health.py)."""

from __future__ import annotations

from tidelog.client.admin import ClusterView
from tidelog.client.metadata import NodeInfo, PartitionInfo, TopicInfo
from tidelog.ops.health import assess, health_to_json, render_health


def view(controller: int, alive: dict[int, bool], parts: list[PartitionInfo]) -> ClusterView:
    nodes = tuple(NodeInfo(i, f"h:{i}", f"h:9{i}", a) for i, a in alive.items())
    return ClusterView("c1", controller, nodes, (TopicInfo("t", tuple(parts), False),))


def test_healthy_cluster() -> None:
    h = assess(view(1, {1: True, 2: True}, [PartitionInfo(0, 1, (1, 2), (2, 1))]))
    assert h.healthy and h.problems == []
    assert render_health(h).splitlines()[0] == "Healthy:                      true"
    assert health_to_json(h)["nodes"] == [1, 2]


def test_each_problem_is_named() -> None:
    parts = [
        PartitionInfo(0, -1, (1, 2), (1, 2)),
        PartitionInfo(1, 1, (1, 2), (1,)),
    ]
    h = assess(view(-1, {1: True, 2: False}, parts))
    assert not h.healthy
    assert h.controller_id == 0
    assert h.problems == [
        "no active controller",
        "nodes down: 2",
        "1 leaderless partition(s)",
        "1 under-replicated partition(s)",
    ]
    assert (h.leaderless, h.under_replicated, h.down) == (("t/0",), ("t/1",), (2,))
    text = render_health(h)
    assert (
        "Controller id:                none" in text and "Nodes down:                   [2]" in text
    )
    assert not assess(ClusterView("c", 1, (), ())).healthy  # nothing registered


def test_a_voter_waiting_for_the_others_says_so() -> None:
    waiting = "waiting for the controller voters to form the cluster: no answer from node 3"
    h = assess(ClusterView("c", -1, (), (), controller_waiting=waiting))
    assert f"no active controller ({waiting})" in h.problems
    assert waiting in render_health(h)
    # Once a controller is known, a stale reason is not shown.
    h = assess(
        ClusterView("c", 1, (NodeInfo(1, "h:1", "h:91", True),), (), controller_waiting=waiting)
    )
    assert not any(waiting in p for p in h.problems)
