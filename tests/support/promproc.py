"""A real Prometheus (Debian's ``prometheus`` binary) and the compose file's node services as
local processes, for tests/integration/test_prometheus.py and bench/dashboard_figure.py.

:func:`compose_nodes` starts each ``tidelog-N`` service of deploy/compose/docker-compose.yml
with the same command and environment, remapped to this machine: every ``HOST:PORT`` of the
compose network becomes ``127.0.0.1:<free port>``, the data directory a temporary one.
:class:`Prometheus` runs with a temporary copy of deploy/prometheus (its targets replaced by
the nodes' metrics ports; ``interval_s`` and the rules' ``for`` shortened for a test)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tidelog.node.settings import ENV_PREFIX
from tidelog.ops.grpc_health import check
from tidelog.ops.processes import free_port

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
STARTUP_TIMEOUT_S = 60.0


def prometheus_binary() -> str | None:
    return shutil.which("prometheus")


# ---- the compose file's node services --------------------------------------------------------


@dataclass
class ComposeNode:
    service: str
    node_id: int
    argv: list[str]
    env: dict[str, str]
    address: str
    metrics_port: int
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
        env.update(self.env)
        env["PYTHONUNBUFFERED"] = "1"
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )

    def wait_serving(self, timeout_s: float = STARTUP_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while not check(self.address, timeout_s=1):
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.service} exited:\n{self.log_path.read_text()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.service} not serving after {timeout_s} s")
            time.sleep(0.1)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=20)
        self.proc = None


def _interpolate(text: str) -> str:
    """Compose's ``${VAR:-default}`` (from this environment, as compose reads it)."""
    return re.sub(r"\$\{(\w+):-([^}]*)\}", lambda m: os.environ.get(m[1], m[2]), text)


def compose_nodes(base: Path) -> dict[int, ComposeNode]:
    """The compose file's ``tidelog-N`` services, remapped (not started)."""
    doc = yaml.safe_load((DEPLOY / "compose" / "docker-compose.yml").read_text())
    services = {n: s for n, s in doc["services"].items() if n.startswith("tidelog-")}
    ports: dict[str, dict[int, int]] = {}
    for name, svc in services.items():
        env = {k: _interpolate(str(v)) for k, v in svc["environment"].items()}
        mapped = {9092: free_port(), 9093: free_port()}
        # The host's published port (127.0.0.1:19091 -> 9092) is the advertised address.
        for published in svc.get("ports", []):
            host_port, container_port = str(published).rsplit(":", 2)[-2:]
            mapped[int(host_port)] = mapped[int(container_port)]
        ports[name] = mapped
        services[name] = {**svc, "environment": env}
    nodes: dict[int, ComposeNode] = {}
    for name, svc in services.items():
        env = dict(svc["environment"])
        metrics_port = free_port()
        mine = ports[name]

        def remap(value: str, mine: dict[int, int] = mine) -> str:
            def one(m: re.Match[str]) -> str:
                host, port = m[1], int(m[2])
                if host in ports:  # another service's name on the compose network
                    return f"127.0.0.1:{ports[host][port]}"
                if host in ("0.0.0.0", "127.0.0.1") and port in mine:
                    return f"127.0.0.1:{mine[port]}"
                return m[0]

            return re.sub(r"([A-Za-z0-9.-]+):(\d+)", one, value)

        env = {k: remap(v) for k, v in env.items()}
        env["TIDELOG_NODE_METRICS_PORT"] = str(metrics_port)
        if "TIDELOG_NODE_RAFT_PORT" in env:
            # A container's own port (9094 in each); three local processes need three.
            env["TIDELOG_NODE_RAFT_PORT"] = str(free_port())
        env["TIDELOG_NODE_DATA_DIR"] = str(base / name)
        node_id = int(env["TIDELOG_NODE_ID"])
        nodes[node_id] = ComposeNode(
            service=name,
            node_id=node_id,
            argv=[sys.executable, "-m", "tidelog", *svc["command"]],
            env=env,
            address=f"127.0.0.1:{mine[9092]}",
            metrics_port=metrics_port,
            log_path=base / f"{name}.log",
        )
    return nodes


def create_topic(bootstrap: str, name: str, partitions: int, timeout_s: float = 30) -> None:
    """Create an RF=3 topic once the controller counts three nodes alive (just after the
    nodes serve, it may know fewer)."""
    from tidelog.client import SyncAdmin

    deadline = time.monotonic() + timeout_s
    with SyncAdmin(bootstrap) as admin:
        while sum(n.alive for n in admin.metadata().nodes) < 3:
            if time.monotonic() > deadline:
                raise RuntimeError(f"fewer than 3 nodes alive after {timeout_s} s")
            time.sleep(0.2)
        admin.create_topics(name, partitions=partitions, replication_factor=3)


# ---- Prometheus ------------------------------------------------------------------------------


@dataclass
class Prometheus:
    """A Prometheus process on a free port with deploy/prometheus's config and rules."""

    base: Path
    targets: list[str]
    interval_s: int = 1
    #: Replaces every alert's ``for`` (the shipped rules wait minutes).
    alert_for: str = "2s"
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def write_config(self) -> Path:
        conf_dir = self.base / "prometheus-config"
        conf_dir.mkdir(parents=True, exist_ok=True)
        config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
        config["global"]["scrape_interval"] = f"{self.interval_s}s"
        config["global"]["evaluation_interval"] = f"{self.interval_s}s"
        (job,) = config["scrape_configs"]
        job["static_configs"][0]["targets"] = list(self.targets)
        (conf_dir / "prometheus.yml").write_text(yaml.safe_dump(config))
        rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
        for group in rules["groups"]:
            for rule in group["rules"]:
                rule["for"] = self.alert_for
        (conf_dir / "alerts.yml").write_text(yaml.safe_dump(rules))
        return conf_dir / "prometheus.yml"

    def start(self) -> None:
        binary = prometheus_binary()
        assert binary is not None
        config = self.write_config()
        log = (self.base / "prometheus.log").open("ab")
        self.proc = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={self.base / 'prometheus-data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--storage.tsdb.retention.time=1h",
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"prometheus not ready:\n{self.log()}")
            time.sleep(0.1)

    def log(self) -> str:
        path = self.base / "prometheus.log"
        return path.read_text() if path.exists() else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def api(self, path: str, params: Mapping[str, str] | None = None) -> Any:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}{query}", timeout=10) as r:
            body = json.load(r)
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.api("query", {"query": expr})
        result: list[dict[str, Any]] = data["result"]
        return result

    def query_range(self, expr: str, start: float, end: float, step_s: float) -> Any:
        params = {"query": expr, "start": str(start), "end": str(end), "step": str(step_s)}
        return self.api("query_range", params)["result"]

    def targets_health(self) -> dict[str, str]:
        active = self.api("targets")["activeTargets"]
        return {t["labels"]["instance"]: t["health"] for t in active}

    def firing(self) -> dict[str, set[str]]:
        """Alert name -> the instances (or "" for aggregates) it fires for."""
        out: dict[str, set[str]] = {}
        for a in self.api("alerts")["alerts"]:
            if a["state"] == "firing":
                out.setdefault(a["labels"]["alertname"], set()).add(a["labels"].get("instance", ""))
        return out
