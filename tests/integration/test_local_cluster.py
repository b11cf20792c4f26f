"""``tidelog cluster up/status/kill/start/down`` against real node processes: a 3-node
cluster in a temporary directory on free ports, an RF=3 topic, a killed leader whose
partitions move, a paused node resumed, a restart, and ``up`` resuming a stopped cluster with
its data."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner, Result

from tests.support import free_port
from tidelog.client import SyncAdmin, SyncConsumer, SyncProducer, TopicPartition
from tidelog.ops import localcluster
from tidelog.ops.cli_cluster import register

pytestmark = [pytest.mark.integration]

TOPIC = "orders"
PARTITIONS = 6
RECORDS_PER_STEP = 300
#: Time for leadership to leave a killed node (election timeout 1 s, plus a loaded machine).
FAILOVER_WAIT_S = 30.0


def _cli() -> click.Group:
    group = click.Group("tidelog")
    register(group)
    return group


def run(*args: str) -> Result:
    result = CliRunner().invoke(_cli(), list(args))
    assert result.exit_code == 0, f"tidelog {' '.join(args)}:\n{result.output}"
    return result


@pytest.fixture
def cluster_dir(tmp_path: Path) -> Iterator[Path]:
    directory = tmp_path / ".tidelog" / "cluster"
    yield directory
    if (directory / "cluster.json").exists():
        localcluster.down(directory)


def status(directory: Path) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(
        run("cluster", "status", "--json", "--dir", str(directory)).output
    )
    return out


def wait_status(
    directory: Path, check: Any, what: str, timeout_s: float = FAILOVER_WAIT_S
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        st = status(directory)
        if check(st):
            return st
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached in {timeout_s} s; last status {st}")
        time.sleep(0.3)


def produce(bootstrap: str, first: int) -> None:
    with SyncProducer(bootstrap, acks="all") as producer:
        for i in range(first, first + RECORDS_PER_STEP):
            producer.send(TOPIC, b"%d" % i, partition=i % PARTITIONS)
        producer.flush()


def read_all(bootstrap: str) -> list[int]:
    tps = [TopicPartition(TOPIC, p) for p in range(PARTITIONS)]
    with SyncConsumer(bootstrap) as consumer:
        end = consumer.end_offsets(tps)
        consumer.assign(tps)
        consumer.seek_to_beginning()
        values: list[int] = []
        deadline = time.monotonic() + 60
        while any(consumer.position(tp) < end[tp] for tp in tps):
            assert time.monotonic() < deadline, "could not read the topic back"
            values += [int(r.value or b"") for r in consumer.poll(timeout_ms=500)]
    return sorted(values)


@pytest.mark.timeout(420)
def test_local_cluster_lifecycle(cluster_dir: Path) -> None:
    d = str(cluster_dir)
    out = run("cluster", "up", "--nodes", "3", "--dir", d, "--base-port", str(free_port()))
    assert "controller leader: node" in out.output

    st = status(cluster_dir)
    assert [n["id"] for n in st["nodes"]] == [1, 2, 3]
    assert all(n["process"] == "running" and n["alive"] for n in st["nodes"])
    assert st["controller_id"] in (1, 2, 3)
    # The nodes talk mutual TLS on their own internal ports, with the certificates up made.
    cluster = localcluster.load_cluster(cluster_dir)
    for spec in cluster.nodes:
        assert spec.internal_address and spec.internal_address != spec.address
        assert "--internal-ca" in spec.argv and "--cluster-secret-file" not in spec.argv
        assert (cluster_dir / "certs" / f"node-{spec.node_id}.crt").is_file()
    assert (cluster_dir / "certs" / "ca.crt").is_file()

    # Commands run from the directory above .tidelog/cluster find the cluster by themselves.
    bootstrap = localcluster.discover_bootstrap(cluster_dir.parent.parent)
    assert bootstrap is not None and len(bootstrap.split(",")) == 3
    with SyncAdmin(bootstrap) as admin:
        admin.create_topics(TOPIC, PARTITIONS, 3)
    produce(bootstrap, 0)
    st = wait_status(
        cluster_dir,
        lambda s: s["partitions"] >= PARTITIONS and not s["leaderless"],
        "every partition led",
    )
    leaders = {n["id"]: n["leaders"] for n in st["nodes"]}
    victim = max(leaders, key=lambda i: leaders[i])
    assert leaders[victim] > 0

    # kill -9 a leader: the status shows it dead and its partitions move to the others.
    run("cluster", "kill", str(victim), "--dir", d)
    st = wait_status(
        cluster_dir,
        lambda s: (
            not s["leaderless"]
            and {n["id"]: n["leaders"] for n in s["nodes"]}[victim] == 0
            and s["under_replicated"]
        ),
        "leadership away from the killed node, its replicas out of sync",
    )
    node = {n["id"]: n for n in st["nodes"]}[victim]
    assert node["process"] == "dead"
    produce(bootstrap, RECORDS_PER_STEP)

    # SIGSTOP another node and resume it with `cluster start`.
    paused = next(i for i in (1, 2, 3) if i != victim)
    run("cluster", "kill", str(paused), "--signal", "STOP", "--dir", d)
    st = status(cluster_dir)
    assert {n["id"]: n["process"] for n in st["nodes"]}[paused] == "stopped"
    assert "resumed and ready" in run("cluster", "start", str(paused), "--dir", d).output

    # Restart the killed node with its recorded command line; it rejoins.
    assert "restarted and ready" in run("cluster", "start", str(victim), "--dir", d).output
    wait_status(
        cluster_dir,
        lambda s: (
            all(n["process"] == "running" and n["alive"] for n in s["nodes"])
            and not s["under_replicated"]
            and not s["leaderless"]
        ),
        "every node back and every partition fully replicated",
        timeout_s=60,
    )
    produce(bootstrap, 2 * RECORDS_PER_STEP)
    assert read_all(bootstrap) == list(range(3 * RECORDS_PER_STEP))

    # down keeps the data; up in the same directory resumes the cluster with it.
    out = run("cluster", "down", "--dir", d)
    assert out.output.count(": stopped") + out.output.count(": killed") == 3
    assert localcluster.discover_bootstrap(cluster_dir.parent.parent) is None
    out = run("cluster", "up", "--nodes", "3", "--dir", d)
    assert "resumed" in out.output
    bootstrap = localcluster.discover_bootstrap(cluster_dir.parent.parent)
    assert bootstrap is not None
    assert read_all(bootstrap) == list(range(3 * RECORDS_PER_STEP))

    run("cluster", "down", "--purge", "--dir", d)
    assert not cluster_dir.exists()


@pytest.mark.timeout(120)
def test_up_no_tls_authenticates_nodes_with_a_generated_secret(cluster_dir: Path) -> None:
    d = str(cluster_dir)
    base = str(free_port())
    run("cluster", "up", "--nodes", "2", "--dir", d, "--base-port", base, "--no-tls")
    secret = cluster_dir / "cluster.secret"
    assert secret.stat().st_mode & 0o077 == 0
    assert len(secret.read_text().strip()) >= 32
    for spec in localcluster.load_cluster(cluster_dir).nodes:
        assert "--cluster-secret-file" in spec.argv and "--internal-ca" not in spec.argv
    st = status(cluster_dir)
    assert all(n["alive"] for n in st["nodes"]) and len(st["nodes"]) == 2
    assert not (cluster_dir / "certs").exists()


@pytest.mark.timeout(120)
def test_up_refuses_a_second_cluster_in_the_same_directory(cluster_dir: Path) -> None:
    d = str(cluster_dir)
    run("cluster", "up", "--nodes", "1", "--dir", d, "--base-port", str(free_port()))
    result = CliRunner().invoke(_cli(), ["cluster", "up", "--nodes", "1", "--dir", d])
    assert result.exit_code == 1
    assert "already running" in result.output
    assert len(result.output.strip().splitlines()) == 1
