"""A real Prometheus scrapes a real 3-node cluster: the compose file's node services run as
local processes (same command and environment, ports remapped: a typo in a command or a
variable fails here without a container engine), Prometheus runs with a temporary copy of
deploy/prometheus (targets remapped, 1 s intervals, every alert's ``for`` cut to 2 s).

Every target is up; every dashboard expression returns data; every metric an alert rule
reads exists; a killed node fires TidelogNodeDown and TidelogUnderReplicatedPartitions, and
both resolve once it is back. Skipped only when the ``prometheus`` binary is missing (.ci/run
installs Debian's package)."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from tests.support.promproc import (
    DEPLOY,
    ComposeNode,
    Prometheus,
    compose_nodes,
    create_topic,
    prometheus_binary,
)
from tidelog.client import SyncConsumer, SyncProducer, TopicPartition

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(150),
    pytest.mark.skipif(prometheus_binary() is None, reason="prometheus binary missing"),
]

TOPIC = "metrics"


def wait(what: str, ok: Callable[[], bool], timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not ok():
        assert time.monotonic() < deadline, f"not within {timeout_s} s: {what}"
        time.sleep(0.25)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[dict[int, ComposeNode]]:
    nodes = compose_nodes(tmp_path)
    assert sorted(nodes) == [1, 2, 3]
    try:
        for n in nodes.values():
            n.start()
        for n in nodes.values():
            n.wait_serving()
        yield nodes
    finally:
        for n in nodes.values():
            n.kill()


@pytest.fixture
def prometheus(tmp_path: Path, cluster: dict[int, ComposeNode]) -> Iterator[Prometheus]:
    targets = [f"127.0.0.1:{n.metrics_port}" for n in cluster.values()]
    prom = Prometheus(tmp_path, targets)
    try:
        prom.start()
        yield prom
    finally:
        prom.stop()


def traffic(bootstrap: str) -> None:
    create_topic(bootstrap, TOPIC, 3)
    with SyncProducer(bootstrap) as producer:
        for i in range(60):
            producer.send(TOPIC, f"v{i}".encode(), partition=i % 3)
        producer.flush()
    with SyncConsumer(bootstrap) as consumer:
        consumer.assign([TopicPartition(TOPIC, p) for p in range(3)])
        consumer.seek_to_beginning()
        got = 0
        deadline = time.monotonic() + 20
        while got < 60 and time.monotonic() < deadline:
            got += len(consumer.poll(timeout_ms=500))
    assert got == 60


def metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\b((?:tidelog|process)_[a-z_]+|up)\b(?!\s*\()", expr)) - {"up_"}


def test_prometheus_scrapes_the_cluster_and_the_alerts_work(
    cluster: dict[int, ComposeNode], prometheus: Prometheus
) -> None:
    bootstrap = ",".join(n.address for n in cluster.values())
    targets = {f"127.0.0.1:{n.metrics_port}": n for n in cluster.values()}
    wait("every target up", lambda: set(prometheus.targets_health().values()) == {"up"})
    assert set(prometheus.targets_health()) == set(targets)
    traffic(bootstrap)

    dashboard = json.loads((DEPLOY / "grafana" / "tidelog.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    empty: list[str] = []

    def all_have_data() -> bool:
        empty[:] = [e for e in exprs if not prometheus.query(e)]
        return not empty

    wait(f"data for every dashboard expression (still empty: {empty})", all_have_data, 40)
    leaders = prometheus.query('sum(tidelog_raft_replica_role{role="leader"})')
    assert float(leaders[0]["value"][1]) >= 3  # a leader for each partition
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    for rule in (r for g in rules["groups"] for r in g["rules"]):
        prometheus.query(rule["expr"])  # evaluates (an error would fail the API call)
        for name in metric_names(rule["expr"]):
            assert prometheus.query(f'count({{__name__="{name}"}})'), (rule["alert"], name)
    assert not prometheus.firing(), prometheus.firing()

    victim = cluster[3]
    instance = f"127.0.0.1:{victim.metrics_port}"
    victim.kill()

    def fired() -> bool:
        now = prometheus.firing()
        return instance in now.get("TidelogNodeDown", set()) and (
            "TidelogUnderReplicatedPartitions" in now
        )

    wait("TidelogNodeDown and TidelogUnderReplicatedPartitions firing", fired, 40)
    victim.start()
    victim.wait_serving()

    def resolved() -> bool:
        now = prometheus.firing()
        return "TidelogNodeDown" not in now and "TidelogUnderReplicatedPartitions" not in now

    wait("both alerts resolved after the restart", resolved, 40)
    assert prometheus.targets_health()[instance] == "up"
