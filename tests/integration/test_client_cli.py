"""The ``tidelog`` command line against a real node it started itself (``tidelog node start``).

Every command runs as a subprocess (``python -m tidelog``), so exit codes and the exact
stdout/stderr split are what a user sees. Error paths must print one ``error: ...`` line on
stderr and exit 1 (2 for usage mistakes), without a traceback.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import tidelog as pkg
from tests.support import free_port
from tests.support.nodeproc import Node

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

COMMAND_TIMEOUT_S = 120


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    base = tmp_path_factory.mktemp("cli-node")
    n = Node(base / "data", base / "node.log", via_cli=True)
    n.start()
    try:
        yield n
    finally:
        n.kill()


def tidelog(
    node: Node | None,
    *args: str,
    stdin: bytes | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[bytes]:
    full_env = dict(os.environ)
    full_env.pop("TIDELOG_BOOTSTRAP", None)
    if node is not None:
        full_env["TIDELOG_BOOTSTRAP"] = node.address
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "tidelog", *args],
        input=stdin,
        capture_output=True,
        env=full_env,
        timeout=COMMAND_TIMEOUT_S,
        check=False,
    )


def ok(result: subprocess.CompletedProcess[bytes]) -> str:
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout.decode()


def one_error_line(result: subprocess.CompletedProcess[bytes], code: int) -> str:
    """The failure printed exactly one line, 'error: ...', and no traceback."""
    err = result.stderr.decode()
    assert result.returncode == code, (result.returncode, err)
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


def unique(prefix: str) -> str:
    return f"{prefix}-{int(time.time() * 1000) % 10_000_000}"


def test_topic_create_list_describe_alter_delete(node: Node) -> None:
    name = unique("cli-topic")
    out = ok(
        tidelog(node, "topic", "create", name, "--partitions", "3", "-c", "retention.ms=60000")
    )
    assert name in out
    assert name in ok(tidelog(node, "topic", "list")).splitlines()
    (desc,) = json.loads(ok(tidelog(node, "topic", "describe", name, "--json")))
    assert desc["name"] == name and len(desc["partitions"]) == 3
    assert desc["configs"]["retention.ms"] == "60000" and desc["overrides"] == ["retention.ms"]
    table = ok(tidelog(node, "topic", "describe", name))
    assert "high watermark" in table and "retention.ms=60000" in table
    out = ok(
        tidelog(
            node,
            "topic",
            "alter",
            name,
            "--set",
            "retention.bytes=5000000",
            "--delete",
            "retention.ms",
        )
    )
    assert "retention.bytes=5000000" in out and "retention.ms" not in out
    assert f"deleted topic {name}" in ok(tidelog(node, "topic", "delete", name))
    assert name not in ok(tidelog(node, "topic", "list")).splitlines()


def test_produce_then_consume_values_keys_and_json(node: Node) -> None:
    name = unique("cli-pc")
    ok(tidelog(node, "topic", "create", name, "--partitions", "2"))
    lines = [f"k{i % 5}:value {i}" for i in range(200)]
    ok(
        tidelog(
            node, "produce", name, "--key-separator", ":", stdin="\n".join(lines).encode() + b"\n"
        )
    )
    out = ok(tidelog(node, "consume", name, "--from-beginning", "--max", "200", "--format", "json"))
    objs = [json.loads(line) for line in out.splitlines()]
    assert len(objs) == 200
    assert {o["key"] for o in objs} == {f"k{i}" for i in range(5)}
    for key in {o["key"] for o in objs}:
        mine = [o for o in objs if o["key"] == key]
        assert len({o["partition"] for o in mine}) == 1  # one key, one partition
        assert [o["value"] for o in mine] == [
            ln.split(":", 1)[1] for ln in lines if ln.startswith(key + ":")
        ]
        assert all({"partition", "offset", "timestamp", "key", "value"} <= o.keys() for o in mine)
    kv = ok(
        tidelog(
            node,
            "consume",
            name,
            "--from-beginning",
            "--max",
            "200",
            "--format",
            "kv",
            "--key-separator",
            "=",
        )
    )
    assert sorted(kv.splitlines()) == sorted(ln.replace(":", "=", 1) for ln in lines)


def test_consume_one_value_per_line_partition_offset_and_idle_timeout(node: Node) -> None:
    name = unique("cli-vals")
    ok(tidelog(node, "topic", "create", name))
    ok(tidelog(node, "produce", name, "--acks", "1", "--compression", "lz4", stdin=b"a\nb\r\nc\nd"))
    assert ok(tidelog(node, "consume", name, "--from-beginning", "--max", "4")) == "a\nb\nc\nd\n"
    out = ok(
        tidelog(node, "consume", name, "--partition", "0", "--offset", "2", "--timeout-ms", "1000")
    )
    assert out == "c\nd\n"
    # From the end (the default) with nothing new: stops when idle, prints nothing.
    assert ok(tidelog(node, "consume", name, "--timeout-ms", "500")) == ""


def test_bench_produce_and_consume_json(node: Node) -> None:
    name = unique("cli-bench")
    result = ok(
        tidelog(
            node,
            "bench",
            "produce",
            "--topic",
            name,
            "--records",
            "50000",
            "--record-bytes",
            "100",
            "--acks",
            "1",
            "--partitions",
            "2",
            "--json",
        )
    )
    report = json.loads(result)  # exactly one JSON object on stdout
    for key in ("records_per_s", "mb_per_s", "p50_ms", "p99_ms", "p999_ms", "cpu_s_per_million"):
        assert isinstance(report[key], (int, float)) and report[key] > 0, key
    assert report["records"] == 50000 and report["topic_created"] is True
    # acks=1: the client turns idempotence off, and the report says so.
    assert (report["idempotence"], report["max_in_flight"]) == (False, 5)
    assert report["p50_ms"] <= report["p99_ms"] <= report["p999_ms"]
    (desc,) = json.loads(ok(tidelog(node, "topic", "describe", name, "--json")))
    assert sum(p["high_watermark"] for p in desc["partitions"]) == 50000

    # Asking for more than the topic holds produces the difference first.
    report = json.loads(
        ok(tidelog(node, "bench", "consume", "--topic", name, "--records", "60000", "--json"))
    )
    assert report["records"] >= 60000 and report["records_per_s"] > 0
    assert report["cpu_s_per_million"] > 0
    # The human summary names the figures.
    text = ok(tidelog(node, "bench", "consume", "--topic", name, "--records", "1000"))
    assert "records/s" in text and "p99" in text and "CPU s per million" in text

    # The default producer is idempotent, 5 in flight; --no-idempotence turns it off.
    text = ok(tidelog(node, "bench", "produce", "--topic", name, "--records", "2000"))
    assert "idempotence on, 5 in flight per partition, acks=all" in text
    args = ["bench", "produce", "--topic", name, "--records", "2000", "--no-idempotence"]
    off = json.loads(ok(tidelog(node, *args, "--json")))
    assert (off["idempotence"], off["max_in_flight"], off["records"]) == (False, 5, 2000)
    line = one_error_line(
        tidelog(node, "bench", "produce", "--topic", name, "--idempotence", "--acks", "1"), 2
    )
    assert "--idempotence needs --acks all" in line


def test_error_paths_print_one_line(node: Node) -> None:
    missing = unique("cli-missing")
    line = one_error_line(tidelog(node, "consume", missing, "--max", "1"), 1)
    assert "does not exist" in line
    line = one_error_line(tidelog(node, "produce", missing, stdin=b"x\n"), 1)
    assert missing in line
    line = one_error_line(tidelog(node, "topic", "create", "bad name!"), 1)
    assert "only ASCII letters" in line
    line = one_error_line(tidelog(node, "topic", "create", "x" * 300), 1)
    assert "249" in line
    line = one_error_line(tidelog(node, "topic", "create", unique("cli-bad"), "-c", "foo.bar=1"), 1)
    assert "unknown topic config 'foo.bar'" in line
    line = one_error_line(
        tidelog(node, "topic", "create", unique("cli-bad"), "-c", "retention.ms=soon"), 1
    )
    assert "not an integer" in line
    line = one_error_line(
        tidelog(node, "topic", "create", unique("cli-bad"), "--partitions", "0"), 1
    )
    assert "partitions" in line
    name = unique("cli-exists")
    ok(tidelog(node, "topic", "create", name))
    assert "exists" in one_error_line(tidelog(node, "topic", "create", name), 1)
    line = one_error_line(tidelog(node, "consume", name, "--offset", "99", "--max", "1"), 1)
    assert "99" in line
    line = one_error_line(tidelog(node, "consume", name, "--partition", "3", "--max", "1"), 1)
    assert "no partition 3" in line
    line = one_error_line(
        tidelog(node, "produce", name, "--key-separator", ":", stdin=b"nokey\n"), 1
    )
    assert "no key separator" in line
    assert "unknown" in one_error_line(tidelog(node, "topic", "delete", missing), 1).lower()


def test_produce_exits_1_when_a_record_is_not_written(node: Node) -> None:
    """A record the node refuses (over the topic's max.message.bytes) fails the command with
    one line naming the input lines, whether or not the input ends with a newline."""
    name = unique("cli-big")
    ok(tidelog(node, "topic", "create", name, "-c", "max.message.bytes=2048"))
    big = b"x" * 8192
    for stdin in (b"a\n" + big + b"\n", b"a\n" + big):
        line = one_error_line(tidelog(node, "produce", name, stdin=stdin), 1)
        assert "max.message.bytes" in line, line
        # One send for both lines, or one per line (the last line arrives at the end of input).
        assert "lines 1-2" in line or ("line 1 " in line and "up to line 2" in line), line
    ok(tidelog(node, "produce", name, stdin=b"small\n"))
    assert ok(tidelog(node, "consume", name, "--from-beginning", "--max", "1")) == "small\n"


def test_usage_errors_exit_2(node: Node) -> None:
    assert "Missing argument" in one_error_line(tidelog(node, "topic", "create"), 2)
    assert "--compression" in one_error_line(
        tidelog(node, "produce", "t", "--compression", "gzip"), 2
    )
    assert "not both" in one_error_line(
        tidelog(node, "consume", "t", "--from-beginning", "--offset", "1"), 2
    )
    assert "host:port" in one_error_line(tidelog(None, "topic", "list", "--bootstrap", "nohost"), 2)
    assert "No such command" in one_error_line(tidelog(node, "frobnicate"), 2)


def test_unreachable_cluster_is_one_line(node: Node) -> None:
    line = one_error_line(
        tidelog(None, "topic", "list", env={"TIDELOG_BOOTSTRAP": f"127.0.0.1:{free_port()}"}), 1
    )
    assert "no node answered" in line


def test_python_dash_m_tidelog_help() -> None:
    result = tidelog(None, "--help")
    out = ok(result)
    for command in ("node", "topic", "produce", "consume", "bench"):
        assert command in out


def test_global_options_topics_and_remote_status(node: Node, tmp_path: Path) -> None:
    """Issue 16 items 7, 8, 9, 11: -b before the verb, the bootstrap's source in errors,
    topic create's checks and flags, topic list/describe JSON, cluster status --bootstrap,
    --version, TIDELOG_CLUSTER_DIR for discovery."""
    name = unique("cli-global")
    out = ok(tidelog(None, "-b", node.address, "topic", "create", name, "-p", "2"))
    assert "replication factor 1" in out  # min(3, one live node)
    assert "already exists" in ok(
        tidelog(None, "-b", node.address, "topic", "create", name, "--if-not-exists")
    )
    dry = unique("cli-dry")
    assert "dry run" in ok(tidelog(node, "topic", "create", dry, "--dry-run"))
    assert dry not in ok(tidelog(node, "topic", "list")).splitlines()
    # Counts are refused before any round trip: no node listens at this bootstrap.
    nowhere = f"127.0.0.1:{free_port()}"
    line = one_error_line(tidelog(None, "-b", nowhere, "topic", "create", "x", "-p", "0"), 1)
    assert "--partitions must be at least 1" in line
    line = one_error_line(tidelog(None, "-b", nowhere, "topic", "list"), 1)
    assert f"bootstrap {nowhere} from --bootstrap" in line
    line = one_error_line(tidelog(None, "topic", "list", env={"TIDELOG_BOOTSTRAP": "nohost"}), 2)
    assert "from $TIDELOG_BOOTSTRAP" in line
    # A cluster directory without a running cluster: the default bootstrap, said so.
    line = one_error_line(
        tidelog(None, "topic", "list", env={"TIDELOG_CLUSTER_DIR": str(tmp_path / "none")}),
        1,
    )
    assert "from the default" in line
    listed = json.loads(ok(tidelog(node, "topic", "list", "--json")))
    mine = next(t for t in listed if t["name"] == name)
    assert mine["replication_factor"] == 1 and len(mine["partitions"]) == 2
    assert name in ok(tidelog(node, "topic", "list", "--long"))
    (desc,) = json.loads(ok(tidelog(node, "topic", "describe", name, "--json")))
    p0 = desc["partitions"][0]
    assert {"leader", "replicas", "in_sync", "high_watermark", "leader_epoch"} <= p0.keys()
    assert desc["config_sources"]["retention.ms"] == "default"
    status = json.loads(ok(tidelog(None, "-b", node.address, "cluster", "status", "--json")))
    assert [n["alive"] for n in status["nodes"]] == [True]
    assert status["leaderless"] == [] and status["partitions"] >= 2
    version = ok(tidelog(None, "-b", node.address, "--version"))
    assert version.startswith(f"tidelog {pkg.__version__} ")
    assert f"at {node.address}: tidelog {pkg.__version__}" in version


def test_consume_offsets_until_end_json_and_produce_inputs(node: Node) -> None:
    """Issue 16 items 10, 11: --offset forms, --until-end, JSON with topic and repeated
    headers and base64, produce headers / tombstones / JSON input, a bad line's report, and
    Ctrl-C exiting 130."""
    name = unique("cli-offsets")
    ok(tidelog(node, "topic", "create", name, "-p", "2"))
    ok(tidelog(node, "produce", name, "--partition", "0", stdin=b"a\nb\nc\nd\n"))
    assert ok(tidelog(node, "consume", name, "--offset", "-2", "--until-end")) == "c\nd\n"
    # -10 on a partition of 4 and an empty partition 1: not errors.
    assert ok(tidelog(node, "consume", name, "--offset", "-10", "--until-end")) == "a\nb\nc\nd\n"
    assert ok(tidelog(node, "consume", name, "--offset", "0:3", "--until-end")) == "d\n"
    assert ok(tidelog(node, "consume", name, "--offset", "@0", "--until-end")).count("\n") == 4
    assert ok(tidelog(node, "consume", name, "--offset", "end", "--until-end")) == ""
    ok(
        tidelog(
            node,
            "produce",
            name,
            "--partition",
            "1",
            "-H",
            "h=1",
            "-H",
            "h=2",
            "-Z",
            "--key-separator",
            ":",
            stdin=b"k:v\nk:\n",
        )
    )
    rows = [
        json.loads(ln)
        for ln in ok(
            tidelog(node, "consume", name, "--offset", "1:0", "--until-end", "--format", "json")
        ).splitlines()
    ]
    assert [(r["topic"], r["key"], r["value"]) for r in rows] == [
        (name, "k", "v"),
        (name, "k", None),
    ]
    assert rows[0]["headers"] == [{"key": "h", "value": "1"}, {"key": "h", "value": "2"}]
    json_in = (
        b'{"key_base64": "/w==", "value": "x", "partition": 1, '
        b'"headers": [{"key": "b", "value_base64": "/w=="}]}\n'
        b"{oops\n"
        b'{"value": "never"}\n'
    )
    line = one_error_line(tidelog(node, "produce", name, "--format", "json", stdin=json_in), 1)
    assert (
        "line 2 is not a record in JSON" in line and "the 1 record(s) before it were sent" in line
    )
    (last,) = [
        json.loads(ln)
        for ln in ok(
            tidelog(node, "consume", name, "--offset", "1:2", "--until-end", "--format", "json")
        ).splitlines()
    ]
    assert last["key"] is None and last["key_base64"] == "/w==" and last["value"] == "x"
    assert last["headers"] == [{"key": "b", "value": None, "value_base64": "/w=="}]
    # Ctrl-C while following: exit status 130.
    env = dict(os.environ, TIDELOG_BOOTSTRAP=node.address)
    proc = subprocess.Popen(
        [sys.executable, "-m", "tidelog", "consume", name],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        time.sleep(3)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
