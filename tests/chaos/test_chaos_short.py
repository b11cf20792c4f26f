"""A 20-round ``tidelog chaos`` run on a 3-node local cluster: every round SIGKILLs a
partition leader under an acks=all load and restarts it; no acknowledged record may be lost,
reordered or overwritten. Run alone: ``pytest tests/chaos -m chaos``."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from tidelog.ops import localcluster
from tidelog.ops.cli_cluster import register

pytestmark = [pytest.mark.chaos, pytest.mark.integration, pytest.mark.slow]

ROUNDS = 20
#: A light load: the cluster, the tester and other work share 2 cores.
RATE = 600


@pytest.fixture
def cluster_dir(tmp_path: Path) -> Iterator[Path]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        base_port = s.getsockname()[1]
    directory = tmp_path / "cluster"
    localcluster.up(directory, 3, base_port)
    try:
        yield directory
    finally:
        localcluster.down(directory)


@pytest.mark.timeout(1200)
def test_chaos_20_rounds_lose_and_reorder_nothing(cluster_dir: Path) -> None:
    group = click.Group("tidelog")
    register(group)
    args = ["chaos", "--rounds", str(ROUNDS), "--rate", str(RATE), "--json"]
    result = CliRunner().invoke(group, [*args, "--dir", str(cluster_dir)])
    lines = [ln for ln in result.stdout.splitlines() if ln.startswith("{")]
    assert lines, f"no JSON verdict (exit {result.exit_code}):\n{result.output}"
    report = json.loads(lines[-1])
    print(json.dumps({k: v for k, v in report.items() if k != "round_details"}, indent=2))
    for r in report["round_details"]:
        print(r)
    assert report["rounds"] == ROUNDS, report["notes"]
    assert report["lost"] == 0, report["examples"]
    assert report["reordered"] == 0, report["examples"]
    assert report["misplaced"] == 0, report["examples"]
    assert report["acked"] > 0
    assert all(r["error"] is None for r in report["round_details"])
    assert result.exit_code == 0, result.output
