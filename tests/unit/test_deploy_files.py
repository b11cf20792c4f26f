"""The files in deploy/ and the Dockerfile, checked offline: Prometheus configs and alert rules
with promtool, every dashboard expression parsed by promtool, the Dockerfile with hadolint,
the compose file against the compose specification's schema, the Kubernetes manifests against
the API schemas (kubernetes-validate, strict), and the settings that the StatefulSet and the
compose file give a node accepted by the node's own checks (node/settings.py)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from tidelog.node.main import node_flags
from tidelog.node.settings import ENV_PREFIX, NODE_FLAGS, resolve

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
BIN = Path(sys.executable).parent
K8S_VERSION = "1.30.0"

needs_promtool = pytest.mark.skipif(
    shutil.which("promtool") is None,
    reason="promtool missing (Debian's prometheus package; .ci/run installs it)",
)


def run(*argv: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=60)


def dashboard_exprs() -> list[str]:
    dash = json.loads((DEPLOY / "grafana" / "tidelog.json").read_text())
    return [t["expr"] for p in dash["panels"] for t in p["targets"]]


def alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    return [r for g in doc["groups"] for r in g["rules"]]


# ---- Prometheus ------------------------------------------------------------------------------


@needs_promtool
def test_promtool_accepts_the_configs_and_rules(tmp_path: Path) -> None:
    out = run("promtool", "check", "rules", DEPLOY / "prometheus" / "alerts.yml")
    assert out.returncode == 0, out.stdout + out.stderr
    out = run("promtool", "check", "config", DEPLOY / "prometheus" / "prometheus.yml")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "1 rule files found" in out.stdout
    # The compose config reads the same rules, mounted beside it.
    shutil.copy(DEPLOY / "compose" / "prometheus.yml", tmp_path / "prometheus.yml")
    shutil.copy(DEPLOY / "prometheus" / "alerts.yml", tmp_path / "alerts.yml")
    out = run("promtool", "check", "config", tmp_path / "prometheus.yml")
    assert out.returncode == 0, out.stdout + out.stderr


@needs_promtool
def test_every_dashboard_expression_is_valid_promql(tmp_path: Path) -> None:
    exprs = dashboard_exprs()
    recorded = [{"record": f"dashboard:panel{i}", "expr": e} for i, e in enumerate(exprs)]
    rules = {"groups": [{"name": "dashboard", "rules": recorded}]}
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump(rules))
    out = run("promtool", "check", "rules", path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"{len(exprs)} rules found" in out.stdout


def test_alerts_cover_the_documented_failures_with_runbooks() -> None:
    rules = {r["alert"]: r for r in alert_rules()}
    wanted = {
        "TidelogNodeDown",
        "TidelogUnderReplicatedPartitions",
        "TidelogLeaderlessPartitions",
        "TidelogNoActiveController",
        "TidelogFrequentElections",
        "TidelogDiskFilling",
    }
    assert wanted <= set(rules)
    operations = (ROOT / "docs" / "operations.md").read_text()
    # GitHub's anchor of a heading: lower case, punctuation dropped, spaces as dashes.
    anchors = {
        re.sub(r"[^a-z0-9 -]", "", h.lower()).strip().replace(" ", "-")
        for h in re.findall(r"^#+ (.+)$", operations, re.M)
    }
    for name, rule in rules.items():
        page, anchor = rule["annotations"]["runbook"].split("#")
        assert page == "docs/operations.md"
        assert anchor in anchors, f"no runbook section #{anchor} for {name}"


def test_dashboard_has_the_panels_and_a_provisioned_datasource() -> None:
    dash = json.loads((DEPLOY / "grafana" / "tidelog.json").read_text())
    titles = {p["title"] for p in dash["panels"]}
    for wanted in ("Records in per topic", "Produce latency", "Fetch latency", "Leaders per node"):
        assert wanted in titles
    provisioned = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )
    uid = provisioned["datasources"][0]["uid"]
    assert {t["datasource"]["uid"] for p in dash["panels"] for t in p["targets"]} == {uid}
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])


# ---- Dockerfile and compose -------------------------------------------------------------------


def test_hadolint_accepts_the_dockerfile() -> None:
    out = run(BIN / "hadolint", ROOT / "Dockerfile")
    assert out.returncode == 0, out.stdout + out.stderr
    text = (ROOT / "Dockerfile").read_text()
    assert text.count("FROM ") == 2 and "USER 10001" in text and "VOLUME" in text
    assert "tidelog.ops.grpc_health" in text


def test_compose_file_matches_the_compose_schema() -> None:
    out = run(
        BIN / "check-jsonschema",
        "--builtin-schema",
        "vendor.compose-spec",
        DEPLOY / "compose" / "docker-compose.yml",
    )
    assert out.returncode == 0, out.stdout + out.stderr


def compose_node_env(service: str) -> dict[str, str]:
    doc = yaml.safe_load((DEPLOY / "compose" / "docker-compose.yml").read_text())
    env: dict[str, str] = {}
    for key, value in doc["services"][service]["environment"].items():
        text = str(value)
        env[key] = re.sub(r"\$\{(\w+):-([^}]*)\}", lambda m: os.environ.get(m[1], m[2]), text)
    return env


def test_compose_node_settings_are_valid() -> None:
    for i in (1, 2, 3):
        env = compose_node_env(f"tidelog-{i}")
        unknown = {k for k in env if k.startswith(ENV_PREFIX)} - {f.env for f in NODE_FLAGS}
        assert not unknown
        flags, settings = node_flags(resolve({}, env).values)
        assert flags.node_id == i and flags.rack == f"rack-{i}"
        assert settings.internal_advertised == f"tidelog-{i}:9093"
        assert len(env["TIDELOG_CLUSTER_SECRET"]) >= 16


# ---- Kubernetes -----------------------------------------------------------------------------


def manifests() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for path in sorted((DEPLOY / "kubernetes").glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        out += [(path.name, d) for d in yaml.safe_load_all(path.read_text()) if d]
    return out


def test_manifests_match_the_kubernetes_schemas() -> None:
    checked = 0
    for _name, doc in manifests():
        if doc["apiVersion"].startswith("monitoring.coreos.com"):
            continue  # a CRD: no schema in kubernetes-validate
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        checked += 1
    assert checked >= 7


def test_kustomization_lists_every_manifest_but_the_operator_one() -> None:
    kust = yaml.safe_load((DEPLOY / "kubernetes" / "kustomization.yaml").read_text())
    files = {p.name for p in (DEPLOY / "kubernetes").glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kust["resources"]) == files - {"servicemonitor.yaml"}
    kinds = {doc["kind"] for _, doc in manifests()}
    assert {"StatefulSet", "Service", "PodDisruptionBudget", "ServiceMonitor"} <= kinds


def statefulset() -> dict[str, Any]:
    return next(d for _, d in manifests() if d["kind"] == "StatefulSet")


def test_statefulset_shape() -> None:
    sts = statefulset()
    spec = sts["spec"]
    pod = spec["template"]["spec"]
    node = next(c for c in pod["containers"] if c["name"] == "tidelog")
    assert spec["podManagementPolicy"] == "Parallel"
    assert spec["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert node[probe]["grpc"]["port"] == 9092
    assert node["resources"]["requests"]["cpu"] and pod["securityContext"]["runAsNonRoot"]
    anti = pod["affinity"]["podAntiAffinity"]
    assert anti["requiredDuringSchedulingIgnoredDuringExecution"][0]["topologyKey"] == (
        "kubernetes.io/hostname"
    )
    zone = anti["preferredDuringSchedulingIgnoredDuringExecution"][0]["podAffinityTerm"]
    assert zone["topologyKey"] == "topology.kubernetes.io/zone"
    pdb = next(d for _, d in manifests() if d["kind"] == "PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 1 and spec["replicas"] == 3


def test_statefulset_settings_are_valid_for_each_pod(tmp_path: Path) -> None:
    """The container's environment (with Kubernetes' $(VAR) expansion) and the flags its
    shell adds, resolved by the node's own code as pod tidelog-2 would."""
    node = next(c for c in statefulset()["spec"]["template"]["spec"]["containers"])
    pod = {"POD_NAME": "tidelog-2", "POD_NAMESPACE": "tidelog"}
    env: dict[str, str] = {}
    for item in node["env"]:
        if "value" in item:
            env[item["name"]] = re.sub(r"\$\((\w+)\)", lambda m: pod[m[1]], item["value"])
    unknown = {k for k in env if k.startswith(ENV_PREFIX)} - {f.env for f in NODE_FLAGS}
    assert not unknown
    script = node["args"][0]
    flags_used = set(re.findall(r"(--[a-z-]+)", script))
    assert flags_used <= {f.name for f in NODE_FLAGS}
    # What the shell passes for pod tidelog-2: node 3's certificate, the rack file's zone.
    certs = tmp_path
    given = {"id_from_hostname": True, "rack": "zone-a"}
    given["internal_cert"] = str(certs / "node-3.crt")
    given["internal_key"] = str(certs / "node-3.key")
    resolved = resolve(given, env, hostname="tidelog-2")
    flags, settings = node_flags(resolved.values)
    assert flags.node_id == 3 and resolved.sources["node_id"] == "hostname tidelog-2"
    assert flags.advertised == "tidelog-2.tidelog.tidelog.svc.cluster.local:9092"
    assert settings.controller_voters is not None
    assert settings.controller_voters.split(",")[2] == (
        "3@tidelog-2.tidelog.tidelog.svc.cluster.local:9093"
    )
    assert "node-${id}.crt" in script and "id=$(( ${HOSTNAME##*-} + 1 ))" in script
