"""The node's settings from a TOML file, TIDELOG_NODE_* variables and flags (one table,
node/settings.py): a flag beats the environment beats the file beats the default, each value's
source is reported (``tidelog node config --print``), ``--id-from-hostname`` reads a
StatefulSet ordinal, and every bad setting is refused naming the setting as written, its value
and what is allowed."""

from __future__ import annotations

import tomllib
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner

from tidelog.node.__main__ import main as node_main
from tidelog.node.__main__ import parser
from tidelog.node.main import node_flags
from tidelog.node.settings import NODE_FLAGS, id_from_hostname, resolve
from tidelog.ops.cli import cli

BASE = ["--data-dir", "/d/n", "--metrics-port", "9194"]


def given(args: list[str]) -> dict[str, object]:
    return dict(vars(parser().parse_args(args)))


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_every_setting_has_one_key_and_one_variable() -> None:
    keys = [f.key for f in NODE_FLAGS]
    envs = [f.env for f in NODE_FLAGS]
    assert len(set(keys)) == len(keys) and len(set(envs)) == len(envs)
    assert next(f for f in NODE_FLAGS if f.name == "--data-dir").key == "data_dir"
    assert next(f for f in NODE_FLAGS if f.name == "--tls-cert").env == "TIDELOG_NODE_TLS_CERT"
    # The CLI's own client-side variables and the cluster secret are not node settings.
    taken = {"TIDELOG_TLS_CERT", "TIDELOG_TLS_KEY", "TIDELOG_TLS_CA", "TIDELOG_TLS"}
    taken |= {"TIDELOG_TOKEN", "TIDELOG_TOKEN_FILE", "TIDELOG_BOOTSTRAP", "TIDELOG_CLUSTER_SECRET"}
    assert not taken & set(envs)


def test_flag_beats_env_beats_file_beats_default(tmp_path: Path) -> None:
    conf = write(
        tmp_path / "node.toml",
        'id = 1\nlisten = "0.0.0.0:1"\ndata_dir = "/file/d"\nmetrics_port = 9001\n'
        'rack = "file-rack"\nelection_timeout_ms = 3000\n',
    )
    env = {"TIDELOG_NODE_LISTEN": "0.0.0.0:2", "TIDELOG_NODE_RACK": "env-rack"}
    env["TIDELOG_NODE_ID"] = "2"
    r = resolve(given(["--config", str(conf), "--rack", "flag-rack"]), env)
    flags, settings = node_flags(r.values)
    assert flags.rack == "flag-rack" and r.sources["rack"] == "flag --rack"
    assert flags.listen == "0.0.0.0:2" and r.sources["listen"] == "env TIDELOG_NODE_LISTEN"
    assert flags.node_id == 2 and r.sources["node_id"] == "env TIDELOG_NODE_ID"
    assert flags.data_dir == Path("/file/d") and r.sources["data_dir"] == f"file {conf}"
    assert settings.election_timeout_ms == 3000
    assert flags.heartbeat_interval_ms == 100 and r.sources["heartbeat_interval_ms"] == "default"
    assert r.sources["config"] == "flag --config"
    # The file may be named by the environment too.
    r = resolve(given([]), {"TIDELOG_NODE_CONFIG": str(conf)})
    assert r.flags().node_id == 1 and r.sources["config"] == "env TIDELOG_NODE_CONFIG"


def test_print_shows_each_value_and_its_source_as_toml(tmp_path: Path) -> None:
    conf = write(tmp_path / "node.toml", 'id = 4\nlisten = "0.0.0.0:9092"\nrack = "a"\n')
    env = {"TIDELOG_NODE_DATA_DIR": "/var/lib/tidelog", "TIDELOG_CLUSTER_SECRET": "s3cret"}
    result = CliRunner().invoke(
        cli,
        ["node", "config", "--print", "--config", str(conf), "--metrics-port", "9644"],
        env=env,
    )
    assert result.exit_code == 0, result.output
    out = result.output
    assert "s3cret" not in out
    assert "cluster secret: from TIDELOG_CLUSTER_SECRET (not shown)" in out
    lines = {ln.split("=")[0].strip(): ln for ln in out.splitlines() if not ln.startswith("#")}
    assert lines["id"].endswith(f"# file {conf}")
    assert lines["data_dir"].endswith("# env TIDELOG_NODE_DATA_DIR")
    assert lines["metrics_port"].endswith("# flag --metrics-port")
    assert lines["log_level"].endswith("# default")
    # What it prints is itself a configuration file giving the same settings.
    again = write(tmp_path / "again.toml", out)
    assert tomllib.loads(out)["data_dir"] == "/var/lib/tidelog"
    reread = resolve(given(["--config", str(again)])).flags()
    first = resolve(given(["--config", str(conf), "--metrics-port", "9644"]), env).flags()
    assert replace(reread, config=None) == replace(first, config=None)


def test_id_from_hostname() -> None:
    assert id_from_hostname("tidelog-2") == 3
    assert id_from_hostname("tidelog-0.tidelog.ns.svc.cluster.local") == 1
    assert id_from_hostname("my-broker-11") == 12
    r = resolve(given([*BASE, "--listen", "h:1", "--id-from-hostname"]), {}, hostname="tidelog-2")
    assert r.flags().node_id == 3 and r.sources["node_id"] == "hostname tidelog-2"
    r = resolve(given([*BASE, "--listen", "h:1"]), {"TIDELOG_NODE_ID_FROM_HOSTNAME": "true"}, "t-0")
    assert r.flags().node_id == 1
    with pytest.raises(ValueError, match="host name 'broker' does not end in -ORDINAL"):
        resolve(given([*BASE, "--listen", "h:1", "--id-from-hostname"]), {}, hostname="broker")
    with pytest.raises(ValueError, match="the node id is set twice"):
        resolve(given([*BASE, "--listen", "h:1", "--id", "2", "--id-from-hostname"]), {}, "t-1")


@pytest.mark.parametrize(
    ("args", "env", "file", "message"),
    [
        (["--id", "0"], {}, "", "--id must be >= 1, got 0"),
        ([], {"TIDELOG_NODE_ID": "zero"}, "", "TIDELOG_NODE_ID must be an integer, got 'zero'"),
        ([], {"TIDELOG_NODE_ID": "-3"}, "", "TIDELOG_NODE_ID must be >= 1, got -3"),
        ([], {}, "id = 0", "id in .*node.toml must be >= 1, got 0"),
        ([], {}, 'id = "one"', "id in .*node.toml must be an integer, got 'one'"),
        (["--id", "1"], {"TIDELOG_NODE_METRICS_PORT": "70000"}, "",
         "TIDELOG_NODE_METRICS_PORT must be in 0..65535, got 70000"),
        (["--id", "1"], {}, "metrics_port = 70000",
         "metrics_port in .*node.toml must be in 0..65535, got 70000"),
        (["--id", "1", "--listen", "nowhere"], {}, "",
         "--listen must be HOST:PORT with a port in 0..65535, got 'nowhere'"),
        (["--id", "1"], {"TIDELOG_NODE_ADVERTISED": "h:99999"}, "",
         "TIDELOG_NODE_ADVERTISED must be HOST:PORT with a port in 0..65535, got 'h:99999'"),
        (["--id", "1"], {}, 'internal_listen = ":1"',
         "internal_listen in .*node.toml must be HOST:PORT"),
        (["--id", "1"], {"TIDELOG_NODE_LOG_LEVEL": "loud"}, "",
         "TIDELOG_NODE_LOG_LEVEL must be one of debug, info, warning, error, got 'loud'"),
        (["--id", "1"], {}, 'log_format = "xml"',
         "log_format in .*node.toml must be one of text, json, got 'xml'"),
        (["--id", "1"], {}, "election_timeout_ms = 0",
         "election_timeout_ms in .*node.toml must be >= 1, got 0"),
        (["--id", "1"], {"TIDELOG_NODE_HEARTBEAT_INTERVAL_MS": "0"}, "",
         "TIDELOG_NODE_HEARTBEAT_INTERVAL_MS must be >= 1, got 0"),
        (["--id", "1"], {}, "node_dead_ms = -1", "node_dead_ms in .*node.toml must be >= 1, got -1"),
        (["--id", "1"], {}, "rack = 3", "rack in .*node.toml must be a non-empty string, got 3"),
        (["--id", "1"], {}, "id_from_hostname = 1",
         "id_from_hostname in .*node.toml must be true or false, got 1"),
        (["--id", "1"], {"TIDELOG_NODE_ID_FROM_HOSTNAME": "maybe"}, "",
         "TIDELOG_NODE_ID_FROM_HOSTNAME must be one of 1/true/yes/on/0/false/no/off, got 'maybe'"),
        (["--id", "1"], {}, 'speed = "fast"', r"unknown setting\(s\) speed \(allowed: "),
        (["--id", "1"], {}, "config = 'x.toml'", r"unknown setting\(s\) config"),
        (["--id", "1"], {}, "id = [", "not valid TOML"),
        ([], {}, "", "--id is required or --id-from-hostname \\(or TIDELOG_NODE_ID, or id in"),
    ],
)  # fmt: skip
def test_each_bad_setting_is_refused_naming_it(
    tmp_path: Path, args: list[str], env: dict[str, str], file: str, message: str
) -> None:
    base = {"listen": '"127.0.0.1:1"', "metrics_port": "0"}
    lines = [f"{k} = {v}" for k, v in base.items() if not file.startswith(k)]
    conf = write(tmp_path / "node.toml", "\n".join([*lines, file, ""]))
    with pytest.raises(ValueError, match=message):
        resolve(given(["--data-dir", "/d/n", "--config", str(conf), *args]), env)


def test_checks_across_settings_name_them_whatever_their_source(tmp_path: Path) -> None:
    conf = write(tmp_path / "node.toml", "heartbeat_interval_ms = 400\nnode_dead_ms = 600\n")
    r = resolve(given([*BASE, "--id", "1", "--listen", "h:1", "--config", str(conf)]))
    with pytest.raises(ValueError, match="--node-dead-ms 600 is too short"):
        node_flags(r.values)
    r = resolve(given([*BASE, "--id", "1", "--listen", "h:1"]), {"TIDELOG_NODE_TLS_CERT": "/c"})
    with pytest.raises(ValueError, match="--tls-cert and --tls-key go together"):
        node_flags(r.values)


def test_missing_config_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"--config .*absent.toml: cannot read it"):
        resolve(given(["--config", str(tmp_path / "absent.toml")]))


def test_both_entry_points_refuse_bad_settings_before_starting(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    conf = write(tmp_path / "node.toml", 'id = 1\nlisten = "h:1"\nmetrics_port = 99999\n')
    monkeypatch.setenv("TIDELOG_NODE_DATA_DIR", str(tmp_path / "d"))
    with pytest.raises(SystemExit) as info:
        node_main(["--config", str(conf)])
    assert info.value.code == 2
    assert "metrics_port in" in capsys.readouterr().err
    result = CliRunner().invoke(cli, ["node", "start", "--config", str(conf)])
    assert result.exit_code == 2
    assert "metrics_port in" in result.output and "99999" in result.output
    result = CliRunner().invoke(cli, ["node", "config", "--config", str(conf)])
    assert result.exit_code == 2 and "must be in 0..65535, got 99999" in result.output


def test_cluster_secret_variable_keeps_its_meaning(monkeypatch: pytest.MonkeyPatch) -> None:
    """TIDELOG_CLUSTER_SECRET is the secret itself, read by node/internal_auth.py; it is not
    TIDELOG_NODE_CLUSTER_SECRET_FILE and no setting takes it as a value."""
    r = resolve(given([*BASE, "--id", "1", "--listen", "h:1"]), {"TIDELOG_CLUSTER_SECRET": "x"})
    assert r.values["cluster_secret_file"] is None and r.secret_env
    assert "x" not in [str(v) for v in r.values.values()]
