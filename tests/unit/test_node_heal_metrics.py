"""The cluster-shape metrics (issue 11): replicas, leaders, liveness, draining and the
reprovisioning deadline per node, moves in progress and stalled; a failing source skips the
scrape instead of failing it."""

from __future__ import annotations

from tidelog.node.metrics import NodeMetrics, ShapeStats


def test_shape_metrics_per_node_and_moves() -> None:
    m = NodeMetrics()
    m.watch_shape(
        lambda: ShapeStats(
            {1: (4, 2, True, False, 0.0), 2: (0, 0, False, False, 1_700_000_005.0)},
            moves_in_progress=3,
            moves_stalled=1,
            move_entries_left=120,
        )
    )
    reg = m.registry
    assert reg.get_sample_value("tidelog_cluster_node_replicas", {"node": "1"}) == 4
    assert reg.get_sample_value("tidelog_cluster_node_leaders", {"node": "1"}) == 2
    assert reg.get_sample_value("tidelog_cluster_node_alive", {"node": "2"}) == 0
    assert reg.get_sample_value("tidelog_cluster_node_draining", {"node": "1"}) == 0
    deadline = "tidelog_cluster_node_reprovision_deadline_seconds"
    assert reg.get_sample_value(deadline, {"node": "2"}) == 1_700_000_005.0
    assert reg.get_sample_value(deadline, {"node": "1"}) is None  # alive: no deadline
    assert reg.get_sample_value("tidelog_partition_moves_in_progress") == 3
    assert reg.get_sample_value("tidelog_partition_moves_stalled") == 1
    assert reg.get_sample_value("tidelog_replica_move_entries_left") == 120


def test_controller_voter_metrics() -> None:
    m = NodeMetrics()
    m.watch_shape(
        lambda: ShapeStats(
            {},
            moves_in_progress=0,
            moves_stalled=0,
            move_entries_left=0,
            controller_voters=frozenset({1, 2, 4}),
            controller_voter_change=True,
        )
    )
    reg = m.registry
    for node in ("1", "2", "4"):
        assert reg.get_sample_value("tidelog_controller_voter", {"node": node}) == 1
    assert reg.get_sample_value("tidelog_controller_voter", {"node": "3"}) is None
    assert reg.get_sample_value("tidelog_controller_voter_change_in_progress") == 1


def test_a_failing_shape_source_skips_only_its_series() -> None:
    m = NodeMetrics()

    def broken() -> ShapeStats:
        raise RuntimeError("dictionary changed size during iteration")

    m.watch_shape(broken)
    assert m.registry.get_sample_value("tidelog_partition_moves_in_progress") is None
    assert (
        m.registry.get_sample_value("tidelog_build_info", {"version": _version(m), "python": _py()})
        == 1
    )


def _version(m: NodeMetrics) -> str:
    for metric in m.registry.collect():
        if metric.name == "tidelog_build_info":
            return str(metric.samples[0].labels["version"])
    raise AssertionError("no build info")


def _py() -> str:
    import platform

    return platform.python_version()


def test_move_bytes_and_recovery_metrics() -> None:
    from tidelog.node.metrics import RecoveryStats

    m = NodeMetrics()
    m.watch_shape(
        lambda: ShapeStats(
            {}, 1, 0, move_entries_left=7, move_bytes_left=5_000_000, move_bytes_copied=2_000
        )
    )
    m.watch_recovery(lambda: RecoveryStats(streamed_bytes=10, append_bytes=20, rate=3_000))
    reg = m.registry
    assert reg.get_sample_value("tidelog_replica_move_bytes_left") == 5_000_000
    assert reg.get_sample_value("tidelog_replica_move_bytes_copied") == 2_000
    sent = "tidelog_replica_recovery_sent_bytes_total"
    assert reg.get_sample_value(sent, {"path": "stream"}) == 10
    assert reg.get_sample_value(sent, {"path": "append"}) == 20
    assert reg.get_sample_value("tidelog_replica_recovery_rate_bytes_per_second") == 3_000


def test_cluster_status_shows_a_move_in_bytes() -> None:
    from tidelog.ops.cli_cluster import render_moves

    [line] = render_moves(
        [
            {
                "partition": "t/0",
                "replicas": [1, 2, 3],
                "target": [2, 3, 4],
                "moving": {"4": {"copied": 1_000, "left": 9_000}},
                "stalled": "rate limit: copying at most 2097152 bytes/s",
            }
        ]
    )
    assert "node 4: 1000 bytes copied, 9000 bytes left" in line
    assert "stalled: rate limit" in line
