"""What a node's registry carries besides its own series: the process, platform and GC
collectors, tidelog_build_info, the role as a label, and one convention for "no leader"
(0, never a node id); and the JSON log lines of ``--log-format json``."""

from __future__ import annotations

import importlib.metadata
import json
import logging
import platform
from pathlib import Path

from tidelog.node.main import JsonFormatter
from tidelog.node.metrics import NodeMetrics, PartitionStats


def stats(role: int, leader: int) -> PartitionStats:
    return PartitionStats("t", 0, 10, 0, 5, 5, 1, raft_role=role, leader_id=leader)


def test_process_runtime_and_build_series() -> None:
    reg = NodeMetrics().registry
    NodeMetrics()  # a second node in the same process registers them too
    assert (reg.get_sample_value("process_cpu_seconds_total") or 0) > 0
    assert (reg.get_sample_value("process_resident_memory_bytes") or 0) > 0
    assert (reg.get_sample_value("process_open_fds") or 0) > 0
    assert reg.get_sample_value("python_gc_collections_total", {"generation": "0"}) is not None
    version = importlib.metadata.version("tidelog")
    labels = {"version": version, "python": platform.python_version()}
    assert reg.get_sample_value("tidelog_build_info", labels) == 1


def test_no_leader_is_zero_everywhere_and_role_is_a_label() -> None:
    m = NodeMetrics()
    m.watch_partitions(lambda: [stats(0, 0)])
    m.watch_controller(lambda: -1)  # whatever the source says for none
    reg = m.registry
    assert reg.get_sample_value("tidelog_controller_leader") == 0
    p = {"topic": "t", "partition": "0"}
    assert reg.get_sample_value("tidelog_raft_leader", p) == 0
    assert reg.get_sample_value("tidelog_leaderless_partitions") == 1
    roles = {
        r: reg.get_sample_value("tidelog_raft_replica_role", {**p, "role": r})
        for r in ("follower", "pre_candidate", "candidate", "leader")
    }
    assert roles == {"follower": 1, "pre_candidate": 0, "candidate": 0, "leader": 0}
    led = NodeMetrics()
    led.watch_partitions(lambda: [stats(3, 2)])
    led.watch_controller(lambda: 2)
    assert led.registry.get_sample_value("tidelog_raft_replica_role", {**p, "role": "leader"}) == 1
    assert led.registry.get_sample_value("tidelog_controller_leader") == 2
    assert led.registry.get_sample_value("tidelog_leaderless_partitions") == 0


def test_json_log_lines() -> None:
    record = logging.LogRecord("tidelog.node", logging.WARNING, "f.py", 1, "a %s", ("b",), None)
    line = json.loads(JsonFormatter().format(record))
    assert line["level"] == "warning" and line["logger"] == "tidelog.node"
    assert line["message"] == "a b" and line["time"].endswith("Z")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        import sys

        record.exc_info = sys.exc_info()
    assert "RuntimeError: boom" in json.loads(JsonFormatter().format(record))["exception"]


def test_disk_of_the_data_directory(tmp_path: Path) -> None:
    m = NodeMetrics()
    m.watch_disk(tmp_path)
    free = m.registry.get_sample_value("tidelog_disk_free_bytes")
    total = m.registry.get_sample_value("tidelog_disk_total_bytes")
    assert free is not None and total is not None and 0 < free <= total
    gone = NodeMetrics()
    gone.watch_disk(tmp_path / "absent")  # no series rather than a failed scrape
    assert gone.registry.get_sample_value("tidelog_disk_free_bytes") is None
