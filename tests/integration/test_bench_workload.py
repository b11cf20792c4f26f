"""``tidelog bench workload`` against a real node: the open-loop latency benchmark runs, its
JSON holds publish and end-to-end percentiles and the rate achieved, a sweep writes a PNG,
and bad options are one readable line."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.test_client_cli import ok, one_error_line, tidelog, unique
from tests.support.nodeproc import Node

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    base = tmp_path_factory.mktemp("workload-node")
    n = Node(base / "data", base / "node.log", via_cli=True, extra_args=("--trace-sample", "1"))
    n.start()
    try:
        yield n
    finally:
        n.kill()


def test_sweep_reports_latency_and_plots(node: Node, tmp_path: Path) -> None:
    topic = unique("workload")
    result_path, plot_path = tmp_path / "result.json", tmp_path / "curve.png"
    args = ["bench", "workload", "--topic", topic, "--replication-factor", "1"]
    args += ["--sweep", "0,200", "--duration", "1.5", "--warmup", "0.3"]
    out = ok(tidelog(node, *args, "--json", str(result_path), "--plot", str(plot_path)))
    assert "closed loop" in out and "achieved/s" in out and "e2e p99" in out
    closed, fixed = json.loads(result_path.read_text())
    assert closed["asked_rate"] == 0 and fixed["asked_rate"] == 200
    for run in (closed, fixed):
        pub, e2e = run["publish_latency_ms"], run["end_to_end_latency_ms"]
        assert run["errors"] == 0 and run["measured_records"] > 0
        assert pub["count"] == run["measured_records"]
        assert 0 < pub["p50_ms"] <= pub["p99_ms"] <= pub["p999_ms"] <= pub["max_ms"]
        # The consumer saw every record the producer sent, and timed the measured ones.
        assert run["consumed_total"] == run["sent_total"] == run["acked_total"]
        assert e2e["count"] == run["measured_records"]
        assert run["cpu_s_per_million"]["producer"] > 0
        assert run["cpu_s_per_million"]["nodes"] > 0
    # Open loop: the schedule fixes how many records are sent, whatever the latency.
    assert fixed["measured_records"] == 300
    # Within 5%: the acknowledgements of warm-up records still in flight when the window
    # opens count in it, as those of its last records answered after it closes do not.
    assert fixed["achieved_rate"] == pytest.approx(200, rel=0.05)
    assert plot_path.read_bytes().startswith(b"\x89PNG")

    # --trace-sample 1: every request's steps are in the node's trace histograms.
    url = f"http://127.0.0.1:{node.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as resp:
        text = resp.read().decode()
    counts = {
        line.split('stage="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("tidelog_trace_produce_seconds_count{")
    }
    # The closed loop alone sent one request per record.
    for stage in ("admit", "leader_store", "quorum", "apply", "answer", "total"):
        assert counts[stage] >= closed["acked_total"], (stage, counts)


def test_a_high_rate_is_generated_and_the_rate_counts_the_window_only(
    node: Node, tmp_path: Path
) -> None:
    """The generator sends each tick's due records with one send_many, so 20,000 records/s
    need no send per record; the rate achieved is the acknowledgements inside the window."""
    topic = unique("workload-fast")
    result_path = tmp_path / "fast.json"
    args = ["bench", "workload", "--topic", topic, "--replication-factor", "1", "--no-consumer"]
    args += ["--rate", "20000", "--duration", "1", "--warmup", "0.3"]
    out = ok(tidelog(node, *args, "--json", str(result_path)))
    assert "generator lag" in out
    (run,) = json.loads(result_path.read_text())
    assert run["errors"] == 0
    # Every record scheduled inside the window was sent, acknowledged and timed.
    assert run["measured_records"] == 20000 == run["publish_latency_ms"]["count"]
    assert run["acked_total"] == run["sent_total"] == 26000
    assert 0 < run["acked_in_window"] <= run["sent_total"]
    assert run["achieved_rate"] == pytest.approx(run["acked_in_window"] / run["measured_s"], abs=1)
    assert run["schedule_lag_ms"]["count"] > 0


def test_bad_options_are_one_line(node: Node) -> None:
    line = one_error_line(tidelog(node, "bench", "workload", "--sweep", "1000,fast"), 2)
    assert "give rates as numbers" in line
    line = one_error_line(tidelog(node, "bench", "workload", "--record-bytes", "8"), 2)
    assert "16" in line
