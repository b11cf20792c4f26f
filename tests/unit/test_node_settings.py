"""The node's flags come from one table (node/settings.py): ``python -m tidelog.node``
(argparse) and ``tidelog node start`` (click) accept the same flags with the same defaults,
read a command line to the same values, and refuse the same bad values."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
import pytest

from tidelog.node.__main__ import main as node_main
from tidelog.node.__main__ import parser
from tidelog.node.main import ClusterSettings, node_argv, node_flags
from tidelog.node.settings import NODE_FLAGS, NodeFlags, parse_flags, to_argv
from tidelog.ops.cli import node_start

REQUIRED = [
    *("--id", "3", "--listen", "127.0.0.1:9094"),
    *("--data-dir", "/d/n3", "--metrics-port", "9194"),
]


def via_argparse(args: list[str]) -> NodeFlags:
    return parse_flags(vars(parser().parse_args(args)))


def via_click(args: list[str]) -> NodeFlags:
    ctx = node_start.make_context("start", list(args))
    return parse_flags(ctx.params)


def test_flag_names_and_defaults_are_the_documented_ones() -> None:
    assert {f.name: f.default for f in NODE_FLAGS} == {
        "--config": None,
        "--id-from-hostname": None,
        "--join": None,
        "--log-format": "text",
        "--id": None,
        "--listen": None,
        "--data-dir": None,
        "--metrics-port": None,
        "--advertised": None,
        "--internal-listen": None,
        "--internal-advertised": None,
        "--raft-port": 0,
        "--raft-stream-only": None,
        "--internal-ca": None,
        "--internal-cert": None,
        "--internal-key": None,
        "--cluster-secret-file": None,
        "--log-level": "info",
        "--controller-voters": None,
        "--election-timeout-ms": 1000,
        "--heartbeat-interval-ms": 100,
        "--node-dead-ms": 3000,
        "--cluster-id": None,
        "--rack": None,
        "--trace-sample": 0,
        "--trace-log": None,
        "--tls-cert": None,
        "--tls-key": None,
        "--tls-client-ca": None,
        "--auth-tokens-file": None,
        "--cleaner-io-bytes-per-second": 64 * 1024 * 1024,
        "--cleaner-map-bytes": 64 * 1024 * 1024,
        "--cleaner-interval-ms": 15_000,
        "--replica-recovery-bytes-per-second": 40 * 1024 * 1024,
        "--controller-snapshot-entries": 10_000,
    }
    assert {f.name for f in NODE_FLAGS if f.required} == {
        "--id",
        "--listen",
        "--data-dir",
        "--metrics-port",
    }
    click_names = {opt for p in node_start.params for opt in p.opts}
    argparse_names = {opt for a in parser()._actions for opt in a.option_strings}
    assert click_names == {f.name for f in NODE_FLAGS}
    assert argparse_names - {"-h", "--help"} == {f.name for f in NODE_FLAGS}


def test_both_parsers_read_the_same_values() -> None:
    assert via_argparse(REQUIRED) == via_click(REQUIRED)
    defaults = via_click(REQUIRED)
    assert defaults == NodeFlags(
        node_id=3,
        listen="127.0.0.1:9094",
        data_dir=Path("/d/n3"),
        metrics_port=9194,
        advertised=None,
        log_level="info",
        controller_voters=None,
        election_timeout_ms=1000,
        heartbeat_interval_ms=100,
        node_dead_ms=3000,
        cluster_id=None,
        rack=None,
    )
    every = [*REQUIRED, "--advertised", "h:1", "--log-level", "debug"]
    every += ["--controller-voters", "1@h:1,2@h:2,3@h:3", "--election-timeout-ms", "2000"]
    every += ["--heartbeat-interval-ms", "200", "--node-dead-ms", "5000"]
    every += ["--cluster-id", "c1", "--rack", "r2"]
    flags = via_argparse(every)
    assert flags == via_click(every)
    assert (flags.advertised, flags.log_level, flags.rack) == ("h:1", "debug", "r2")
    assert (flags.election_timeout_ms, flags.heartbeat_interval_ms) == (2000, 200)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (["--id", "0"], "--id must be >= 1, got 0"),
        (["--metrics-port", "70000"], "--metrics-port must be in 0..65535, got 70000"),
        (["--election-timeout-ms", "0"], "--election-timeout-ms must be >= 1, got 0"),
        (["--log-level", "loud"], "--log-level must be one of"),
    ],
)
def test_both_parsers_refuse_the_same_bad_values(
    bad: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    args = [*REQUIRED, *bad]
    with pytest.raises(click.BadParameter):
        node_start.make_context("start", list(args))
    with pytest.raises(SystemExit) as info:
        node_main(args)  # exits with a usage error before the node would start
    assert info.value.code == 2
    assert bad[0] in capsys.readouterr().err
    values: dict[str, Any] = dict(vars(parser().parse_args(REQUIRED)))
    flag = next(f for f in NODE_FLAGS if f.name == bad[0])
    values[flag.dest] = int(bad[1]) if flag.kind == "int" else bad[1]
    with pytest.raises(ValueError, match=message):
        parse_flags(values)


def test_cluster_checks_are_shared() -> None:
    values = vars(parser().parse_args([*REQUIRED, "--node-dead-ms", "100"]))
    with pytest.raises(ValueError, match="--node-dead-ms 100 is too short"):
        node_flags(values)
    flags, settings = node_flags(vars(parser().parse_args([*REQUIRED, "--rack", "a"])))
    assert settings == ClusterSettings(rack="a")
    assert flags.rack == "a"


def test_internal_listener_and_auth_flags_parse_alike_and_round_trip() -> None:
    extra = ["--internal-listen", "127.0.0.1:9292", "--internal-advertised", "n3:9292"]
    extra += ["--internal-ca", "/c/ca.crt", "--internal-cert", "/c/node-3.crt"]
    extra += ["--internal-key", "/c/node-3.key", "--cluster-secret-file", "/c/s"]
    flags = via_argparse([*REQUIRED, *extra])
    assert flags == via_click([*REQUIRED, *extra])
    assert (flags.internal_listen, flags.internal_advertised) == ("127.0.0.1:9292", "n3:9292")
    assert (flags.internal_ca, flags.internal_cert, flags.internal_key) == (
        Path("/c/ca.crt"),
        Path("/c/node-3.crt"),
        Path("/c/node-3.key"),
    )
    assert flags.cluster_secret_file == Path("/c/s")
    _, settings = node_flags(vars(parser().parse_args([*REQUIRED, *extra])))
    argv = node_argv(3, "h:3", Path("/d/3"), 9000, None, "info", settings)
    _, again = node_flags(vars(parser().parse_args(argv[3:])))
    assert again == settings


def test_argv_renders_the_table_and_parses_back() -> None:
    settings = ClusterSettings(controller_voters="1@h:1", cluster_id="c", rack="r")
    argv = node_argv(2, "h:2", Path("/d/2"), 9000, "adv:2", "warning", settings)
    assert argv[1:3] == ["-m", "tidelog.node"]
    flags, again = node_flags(vars(parser().parse_args(argv[3:])))
    assert again == settings
    assert (flags.node_id, flags.listen, flags.data_dir, flags.metrics_port) == (
        2,
        "h:2",
        Path("/d/2"),
        9000,
    )
    assert (flags.advertised, flags.log_level) == ("adv:2", "warning")
    assert to_argv({"node_id": 1, "rack": None}) == ["--id", "1"]
    with pytest.raises(ValueError, match="unknown node setting"):
        to_argv({"speed": 1})
