"""``tidelog cluster health --bootstrap`` against a real 3-node cluster: healthy (exit 0),
a killed node makes it unhealthy (exit 1, the node down, its partitions under-replicated),
and ``--exit-when-healthy`` returns 0 once the node is back."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.nodeproc import Node, spawn_cluster
from tidelog.client import SyncAdmin

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def health(*args: str, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tidelog", "cluster", "health", *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        stdin=subprocess.DEVNULL,
    )


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[dict[int, Node]]:
    nodes = spawn_cluster(tmp_path, (1, 2, 3), security="none")
    try:
        for n in nodes.values():
            n.wait_serving()
        yield nodes
    finally:
        for n in nodes.values():
            n.kill()


def test_health_follows_a_node_down_and_back(nodes: dict[int, Node]) -> None:
    boot = ",".join(n.address for n in nodes.values())
    ok = health("-b", boot, "--exit-when-healthy", "--interval", "0.3", "--timeout", "30")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "Healthy:                      true" in ok.stdout
    with SyncAdmin(boot) as admin:
        # No replication factor: the cluster's default, 3 here with every node alive.
        admin.create_topics("h", partitions=3)
        assert admin.describe_topics("h")[0].replication_factor == 3
    ok = health("-b", boot, "--exit-when-healthy", "--interval", "0.3", "--timeout", "30")
    assert ok.returncode == 0, ok.stdout + ok.stderr

    nodes[3].kill()
    survivors = f"{nodes[1].address},{nodes[2].address}"
    deadline = time.monotonic() + 30
    while True:
        bad = health("-b", survivors, "--json")
        report = json.loads(bad.stdout.splitlines()[-1]) if bad.stdout else {}
        if report.get("nodes_down") == [3]:
            break
        assert time.monotonic() < deadline, bad.stdout + bad.stderr
        time.sleep(0.5)
    assert bad.returncode == 1
    assert report["healthy"] is False and "nodes down: 3" in report["problems"]
    assert sorted(report["under_replicated"]) == ["h/0", "h/1", "h/2"]
    assert report["controller_id"] in (1, 2)
    text = health("-b", survivors)
    assert text.returncode == 1 and "Nodes down:                   [3]" in text.stdout

    nodes[3].start()
    back = health("-b", boot, "--exit-when-healthy", "--interval", "0.5", "--timeout", "40")
    assert back.returncode == 0, back.stdout + back.stderr
    last = back.stdout.strip().split("\n\n")[-1]
    assert (
        "Healthy:                      true" in last and "Nodes down:                   []" in last
    )


def test_watch_gives_up_after_timeout_when_no_node_answers() -> None:
    started = time.monotonic()
    out = health("-b", "127.0.0.1:1", "--exit-when-healthy", "--interval", "0.2", "--timeout", "1")
    assert out.returncode == 1
    assert "no answer" in out.stderr
    assert time.monotonic() - started < 30
