"""The local cluster without real nodes: port allocation, cluster.json, /proc states,
readiness, status building and rendering, and process management on stand-in processes
(a sleeping Python whose command line names the node's data directory, as a node's does)."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from rich.console import Console

from tests.support import free_port
from tidelog.ops import localcluster
from tidelog.ops.cli_cluster import register
from tidelog.ops.localcluster import (
    ClusterError,
    ClusterFile,
    NodeSpec,
    ProcState,
    allocate_ports,
    build_status,
    controller_voters,
    discover_bootstrap,
    load_cluster,
    parse_proc_stat,
    process_state,
    readiness_problem,
    render_status,
    save_cluster,
    status_to_json,
)
from tidelog.ops.processes import launch
from tidelog.v1 import broker_pb2

# -- ports ------------------------------------------------------------------------------------


def test_ports_are_contiguous_when_free() -> None:
    assert allocate_ports(3, 9092, in_use=lambda p: False) == [
        (9092, 9192),
        (9093, 9193),
        (9094, 9194),
    ]


def test_ports_in_use_are_skipped() -> None:
    busy = {9092, 9094, 9192, 9193}
    got = allocate_ports(3, 9092, in_use=busy.__contains__)
    assert got == [(9093, 9194), (9095, 9195), (9096, 9196)]


def test_metrics_range_never_reuses_a_grpc_port() -> None:
    got = allocate_ports(4, 10_000, metrics_base_port=10_002, in_use=lambda p: False)
    grpc_ports = [g for g, _ in got]
    metrics = [m for _, m in got]
    assert grpc_ports == [10_000, 10_001, 10_002, 10_003]
    assert metrics == [10_004, 10_005, 10_006, 10_007]


def test_internal_ports_start_above_the_metrics_range_and_skip_given_ones() -> None:
    from tidelog.ops.processes import allocate_internal_ports

    assert allocate_internal_ports(3, 9092, in_use=lambda p: False) == [9292, 9293, 9294]
    busy = {9292}
    got = allocate_internal_ports(3, 9092, avoid=[9293], in_use=busy.__contains__)
    assert got == [9294, 9295, 9296]


def test_running_out_of_ports_is_a_readable_error() -> None:
    with pytest.raises(
        ClusterError, match="not enough free gRPC ports from 65534 to 65535 for 3 nodes"
    ):
        allocate_ports(3, 65534, in_use=lambda p: False)


def test_port_in_use_sees_a_listener() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert localcluster.port_in_use(port)


def test_free_ports_are_distinct_and_below_the_ephemeral_range() -> None:
    """A port the kernel may also hand out as a connection's source port is one a node can
    fail to bind ("address in use"): free_port keeps below that range and never repeats."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports = [free_port() for _ in range(200)]
    assert len(set(ports)) == len(ports)
    if low - 20000 >= 2000:
        assert all(20000 <= p < low for p in ports)
    with socket.socket() as s:
        s.bind(("127.0.0.1", ports[-1] + 1))
        s.listen()
        taken = s.getsockname()[1]
        assert taken not in {free_port() for _ in range(5)}


def test_controller_voters_are_the_first_three_ids() -> None:
    addrs = {i: f"127.0.0.1:{9091 + i}" for i in (4, 1, 3, 2, 5)}
    assert controller_voters(addrs) == "1@127.0.0.1:9092,2@127.0.0.1:9093,3@127.0.0.1:9094"
    assert controller_voters({1: "h:1"}) == "1@h:1"


def test_node_argv_carries_every_flag() -> None:
    argv = localcluster.node_argv(2, "127.0.0.1:9093", Path("/d/node-2/data"), 9193, "1@a:1")
    assert argv[1:3] == ("-m", "tidelog.node")
    flags = dict(zip(argv[3::2], argv[4::2], strict=True))
    assert flags == {
        "--id": "2",
        "--listen": "127.0.0.1:9093",
        "--data-dir": "/d/node-2/data",
        "--metrics-port": "9193",
        "--controller-voters": "1@a:1",
    }


# -- cluster.json -----------------------------------------------------------------------------


def _spec(directory: Path, node_id: int, pid: int = 0, argv: tuple[str, ...] = ()) -> NodeSpec:
    data = directory / f"node-{node_id}" / "data"
    return NodeSpec(
        node_id=node_id,
        pid=pid,
        address=f"127.0.0.1:{19000 + node_id}",
        metrics_address=f"127.0.0.1:{19100 + node_id}",
        data_dir=data,
        log_path=directory / f"node-{node_id}" / "node.log",
        argv=argv or ("python", "-m", "tidelog.node", "--data-dir", str(data)),
    )


def test_cluster_file_round_trip(tmp_path: Path) -> None:
    cluster = ClusterFile(
        tmp_path, tuple(_spec(tmp_path, i, 100 + i) for i in (1, 2, 3)), "1@a:1,2@a:2,3@a:3", 1234
    )
    save_cluster(cluster)
    assert load_cluster(tmp_path) == cluster
    raw = json.loads((tmp_path / "cluster.json").read_text())
    assert raw["version"] == 1
    assert [n["id"] for n in raw["nodes"]] == [1, 2, 3]
    assert set(raw["nodes"][0]) == {
        "id",
        "pid",
        "address",
        "internal_address",
        "metrics_address",
        "data_dir",
        "log",
        "argv",
    }
    updated = cluster.with_pid(2, 999)
    assert [n.pid for n in updated.nodes] == [101, 999, 103]
    assert not list(tmp_path.glob("*.tmp"))


def test_missing_cluster_file_says_how_to_start_one(tmp_path: Path) -> None:
    with pytest.raises(ClusterError, match=r"no local cluster in .*tidelog cluster up"):
        load_cluster(tmp_path)


@pytest.mark.parametrize(
    "text",
    [
        "{",
        "[]",
        '{"version": 7, "nodes": []}',
        '{"version": 1, "created_ms": 1, "controller_voters": "", "nodes": [{"id": 1}]}',
    ],
)
def test_damaged_cluster_file_is_a_readable_error(tmp_path: Path, text: str) -> None:
    (tmp_path / "cluster.json").write_text(text)
    with pytest.raises(ClusterError, match="is not a tidelog cluster file"):
        load_cluster(tmp_path)


def test_unknown_node_id_lists_the_known_ones(tmp_path: Path) -> None:
    cluster = ClusterFile(tmp_path, (_spec(tmp_path, 1), _spec(tmp_path, 2)), "", 0)
    with pytest.raises(ClusterError, match=r"no node 7 \(nodes: 1, 2\)"):
        cluster.node(7)


# -- processes --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "state"),
    [
        ("123 (python3) S 1 2 3", ProcState.RUNNING),
        ("123 (python3) R 1 2 3", ProcState.RUNNING),
        ("123 (python3) D 1 2 3", ProcState.RUNNING),
        ("123 (python3) T 1 2 3", ProcState.STOPPED),
        ("123 (python3) t 1 2 3", ProcState.STOPPED),
        ("123 (python3) Z 1 2 3", ProcState.DEAD),
        ("123 (a) b) T 1 2 3", ProcState.STOPPED),  # ')' and spaces in the command name
    ],
)
def test_proc_stat_states(text: str, state: ProcState) -> None:
    assert parse_proc_stat(text) is state


def test_proc_stat_garbage() -> None:
    with pytest.raises(ValueError):
        parse_proc_stat("nothing here")


def _sleeper(data_dir: Path) -> list[str]:
    """A stand-in node: its command line names the data directory, as a node's does."""
    return [sys.executable, "-c", "import time; time.sleep(60)", "--data-dir", str(data_dir)]


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for p in started:
        if p.poll() is None:
            p.kill()
            p.wait()


@pytest.mark.timeout(30)
def test_process_state_of_real_processes(
    tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    p = subprocess.Popen(_sleeper(tmp_path / "data"))
    procs.append(p)
    assert process_state(p.pid, tmp_path / "data") is ProcState.RUNNING
    # A live pid running something else counts as dead: never signal a reused pid.
    assert process_state(p.pid, tmp_path / "other") is ProcState.DEAD
    p.send_signal(signal.SIGSTOP)
    deadline = time.monotonic() + 5
    while process_state(p.pid) is not ProcState.STOPPED and time.monotonic() < deadline:
        time.sleep(0.01)
    assert process_state(p.pid, tmp_path / "data") is ProcState.STOPPED
    p.kill()
    p.wait()
    assert process_state(p.pid) is ProcState.DEAD
    assert process_state(0) is ProcState.DEAD


@pytest.mark.timeout(30)
def test_discover_bootstrap_lists_running_nodes(
    tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    assert discover_bootstrap(tmp_path) is None
    directory = tmp_path / ".tidelog" / "cluster"
    specs = []
    for i in (1, 2, 3):
        spec = _spec(directory, i)
        p = subprocess.Popen(_sleeper(spec.data_dir))
        procs.append(p)
        specs.append(dataclasses.replace(spec, pid=p.pid))
    save_cluster(ClusterFile(directory, tuple(specs), "", 0))
    assert discover_bootstrap(tmp_path) == "127.0.0.1:19001,127.0.0.1:19002,127.0.0.1:19003"
    procs[1].kill()
    procs[1].wait()
    assert discover_bootstrap(str(tmp_path)) == "127.0.0.1:19001,127.0.0.1:19003"
    for p in procs:
        p.kill()
        p.wait()
    assert discover_bootstrap(tmp_path) is None
    (directory / "cluster.json").write_text("{oops")
    assert discover_bootstrap(tmp_path) is None


def _stand_in_cluster(directory: Path, n: int) -> ClusterFile:
    """cluster.json of ``n`` stand-in nodes that are not started yet (pid 0)."""
    specs = []
    for i in range(1, n + 1):
        data = directory / f"node-{i}" / "data"
        specs.append(
            NodeSpec(
                i,
                0,
                f"127.0.0.1:{free_port()}",
                f"127.0.0.1:{free_port()}",
                data,
                directory / f"node-{i}" / "node.log",
                tuple(_sleeper(data)),
            )
        )
    cluster = ClusterFile(directory, tuple(specs), "", 0)
    save_cluster(cluster)
    return cluster


@pytest.mark.timeout(60)
def test_kill_start_and_down_manage_the_recorded_processes(tmp_path: Path) -> None:
    cluster = _stand_in_cluster(tmp_path, 2)
    for spec in cluster.nodes:  # what `up` does before it waits for readiness
        assert localcluster.start_node(tmp_path, spec.node_id, wait=False) == "restarted"
    cluster = load_cluster(tmp_path)
    pids = [n.pid for n in cluster.nodes]
    assert all(p > 0 for p in pids)
    assert all(process_state(n.pid, n.data_dir) is ProcState.RUNNING for n in cluster.nodes)
    assert "starting node 1" in (tmp_path / "node-1" / "node.log").read_text()

    with pytest.raises(ClusterError, match="node 1 is already running"):
        localcluster.start_node(tmp_path, 1, wait=False)

    assert localcluster.kill_node(tmp_path, 1, "STOP") is ProcState.STOPPED
    with pytest.raises(ClusterError, match="already stopped"):
        localcluster.kill_node(tmp_path, 1, "stop")
    assert localcluster.start_node(tmp_path, 1, wait=False) == "resumed"
    assert load_cluster(tmp_path).node(1).pid == pids[0]  # the same process, continued
    assert process_state(pids[0]) is ProcState.RUNNING

    assert localcluster.kill_node(tmp_path, 1, "KILL") is ProcState.DEAD
    with pytest.raises(ClusterError, match="node 1 is not running"):
        localcluster.kill_node(tmp_path, 1, "KILL")
    assert localcluster.start_node(tmp_path, 1, wait=False) == "restarted"
    new_pid = load_cluster(tmp_path).node(1).pid
    assert new_pid != pids[0]
    assert process_state(new_pid) is ProcState.RUNNING

    localcluster.kill_node(tmp_path, 2, "STOP")  # down must end stopped nodes too
    outcome = localcluster.down(tmp_path)
    assert outcome == {1: "stopped", 2: "stopped"}
    assert all(process_state(n.pid) is ProcState.DEAD for n in load_cluster(tmp_path).nodes)
    assert (tmp_path / "cluster.json").exists()
    assert localcluster.down(tmp_path) == {1: "not running", 2: "not running"}
    localcluster.down(tmp_path, purge=True)
    assert not tmp_path.exists()


def test_bad_signal_name(tmp_path: Path) -> None:
    _stand_in_cluster(tmp_path, 1)
    with pytest.raises(ClusterError, match="--signal HUP is not one of KILL, STOP, TERM"):
        localcluster.kill_node(tmp_path, 1, "HUP")


@pytest.mark.timeout(60)
def test_up_names_the_log_of_a_node_that_exits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def crashing(
        node_id: int, address: str, data_dir: Path, *rest: object, **flags: object
    ) -> tuple[str, ...]:
        code = f"print('boom from node {node_id}'); raise SystemExit(3)"
        return (sys.executable, "-c", code, "--data-dir", str(data_dir))

    monkeypatch.setattr(localcluster, "node_argv", crashing)
    with pytest.raises(ClusterError) as info:
        localcluster.up(tmp_path, 2, free_port(), timeout_s=20)
    msg = str(info.value)
    assert "exited while the cluster started" in msg
    assert "node.log" in msg and "boom from node" in msg


@pytest.mark.timeout(60)
def test_up_times_out_naming_the_silent_node_and_stops_what_it_started(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def silent(
        node_id: int, address: str, data_dir: Path, *rest: object, **flags: object
    ) -> tuple[str, ...]:
        return tuple(_sleeper(data_dir))

    monkeypatch.setattr(localcluster, "node_argv", silent)
    with pytest.raises(ClusterError, match=r"not ready after 1 s: node 1 does not answer"):
        localcluster.up(tmp_path, 2, free_port(), timeout_s=1)
    cluster = load_cluster(tmp_path)
    assert all(n.pid > 0 for n in cluster.nodes)
    assert all(process_state(n.pid) is ProcState.DEAD for n in cluster.nodes)


def test_up_refuses_a_running_cluster_and_a_different_size(
    tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    cluster = _stand_in_cluster(tmp_path, 2)
    with pytest.raises(ClusterError, match="holds a stopped 2-node cluster, not 3"):
        localcluster.up(tmp_path, 3)
    p = subprocess.Popen(list(cluster.nodes[0].argv))
    procs.append(p)
    save_cluster(cluster.with_pid(1, p.pid))
    with pytest.raises(ClusterError, match=r"already running .* node 1"):
        localcluster.up(tmp_path, 2)
    assert process_state(p.pid) is ProcState.RUNNING  # left alone


# -- readiness and status ---------------------------------------------------------------------


def _md(
    controller: int, alive: dict[int, bool], topics: list[broker_pb2.TopicMetadata] | None = None
) -> broker_pb2.MetadataResponse:
    return broker_pb2.MetadataResponse(
        controller_id=controller,
        nodes=[
            broker_pb2.NodeInfo(
                node_id=i,
                address=f"127.0.0.1:{19000 + i}",
                metrics_address=f"127.0.0.1:{19100 + i}",
                alive=a,
            )
            for i, a in alive.items()
        ],
        topics=topics or [],
    )


def test_readiness_needs_every_answer_a_controller_and_every_node_alive() -> None:
    ids = [1, 2, 3]
    full = _md(1, {1: True, 2: True, 3: True})
    assert readiness_problem(ids, {1: full, 2: full, 3: full}) is None
    assert readiness_problem(ids, {1: full, 2: None, 3: full}) == (
        2,
        "node 2 does not answer Metadata yet",
    )
    no_leader = _md(-1, {1: True, 2: True, 3: True})
    assert readiness_problem(ids, {1: full, 2: no_leader, 3: full}) == (
        None,
        "node 2 sees no controller leader",
    )
    partial = _md(1, {1: True, 2: False})
    assert readiness_problem(ids, {1: partial, 2: full, 3: full}) == (
        2,
        "node 1 does not list node(s) 2,3 as registered alive",
    )


def _topic(name: str, parts: list[tuple[int, list[int], list[int]]]) -> broker_pb2.TopicMetadata:
    return broker_pb2.TopicMetadata(
        name=name,
        partitions=[
            broker_pb2.PartitionMetadata(partition=i, leader=leader, replicas=r, in_sync=s)
            for i, (leader, r, s) in enumerate(parts)
        ],
    )


def _status_fixture(tmp_path: Path) -> localcluster.ClusterStatus:
    cluster = ClusterFile(tmp_path, tuple(_spec(tmp_path, i, 100 + i) for i in (1, 2, 3)), "", 0)
    md = _md(
        2,
        {1: True, 2: True, 3: False, 4: True},
        [
            _topic(
                "orders", [(1, [1, 2, 3], [1, 2, 3]), (2, [2, 3, 1], [2, 1]), (-1, [3, 1, 2], [])]
            ),
            _topic("audit", [(1, [1, 2, 4], [1, 2, 4])]),
        ],
    )
    states = {1: ProcState.RUNNING, 2: ProcState.RUNNING, 3: ProcState.STOPPED}
    return build_status(cluster, states, md, "127.0.0.1:19001")


def test_status_from_metadata(tmp_path: Path) -> None:
    status = _status_fixture(tmp_path)
    assert status.controller_id == 2
    assert (status.topics, status.partitions) == (2, 4)
    by_id = {n.node_id: n for n in status.nodes}
    assert [n.node_id for n in status.nodes] == [1, 2, 3, 4]
    assert (by_id[1].leaders, by_id[1].replicas) == (2, 4)
    assert (by_id[2].leaders, by_id[2].replicas, by_id[2].is_controller) == (1, 4, True)
    assert (by_id[3].process, by_id[3].alive, by_id[3].leaders) == (ProcState.STOPPED, False, 0)
    assert (by_id[4].pid, by_id[4].process, by_id[4].registered) == (None, None, True)
    assert [(p.topic, p.partition) for p in status.under_replicated] == [
        ("orders", 1),
        ("orders", 2),
    ]
    assert [(p.topic, p.partition) for p in status.leaderless] == [("orders", 2)]


def test_status_without_any_answer(tmp_path: Path) -> None:
    cluster = ClusterFile(tmp_path, (_spec(tmp_path, 1, 5),), "", 0)
    status = build_status(cluster, {1: ProcState.DEAD}, None)
    assert status.controller_id is None
    assert status.nodes[0].registered is None
    assert status.notes


def test_status_rendering(tmp_path: Path) -> None:
    console = Console(file=io.StringIO(), width=200, color_system=None)
    for r in render_status(_status_fixture(tmp_path)):
        console.print(r)
    text = console.file.getvalue()  # type: ignore[attr-defined]
    assert "controller: node 2 (marked *)" in text
    assert "2 topic(s), 4 partition(s), 2 under-replicated, 1 leaderless" in text
    assert "stopped" in text and "running" in text
    assert "leaderless, under-replicated" in text
    lines = [ln for ln in text.splitlines() if "127.0.0.1:19002" in ln]
    assert lines and "2*" in lines[0]


def test_status_json(tmp_path: Path) -> None:
    out = status_to_json(_status_fixture(tmp_path))
    json.dumps(out)
    assert out["controller_id"] == 2
    assert out["nodes"][2]["process"] == "stopped"
    assert out["leaderless"] == [
        {"topic": "orders", "partition": 2, "leader": -1, "replicas": [3, 1, 2], "in_sync": []}
    ]


# -- CLI errors -------------------------------------------------------------------------------


def _cli() -> click.Group:
    group = click.Group("tidelog")
    register(group)
    return group


def test_cli_errors_are_one_line_and_exit_1(tmp_path: Path) -> None:
    runner = CliRunner()
    for args in (
        ["cluster", "status"],
        ["cluster", "kill", "1"],
        ["cluster", "down"],
        ["chaos", "--rounds", "1"],
    ):
        result = runner.invoke(_cli(), [*args, "--dir", str(tmp_path / "none")])
        assert result.exit_code == 1, result.output
        assert "no local cluster in" in result.output
        assert len(result.output.strip().splitlines()) == 1
        assert result.exception is None or isinstance(result.exception, SystemExit)


def test_cli_status_of_a_stopped_cluster(tmp_path: Path) -> None:
    _stand_in_cluster(tmp_path, 2)
    result = CliRunner().invoke(_cli(), ["cluster", "status", "--dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "dead" in result.output and "no running node answered" in result.output
    result = CliRunner().invoke(_cli(), ["cluster", "status", "--json", "--dir", str(tmp_path)])
    assert json.loads(result.output)["controller_id"] is None


def _text(renderables: list[object]) -> str:
    console = Console(file=io.StringIO(), width=240, color_system=None)
    for r in renderables:
        console.print(r)
    out = console.file.getvalue()  # type: ignore[attr-defined]
    assert isinstance(out, str)
    return out


def test_up_rendering_says_how_other_commands_find_the_cluster(tmp_path: Path) -> None:
    directory = tmp_path / ".tidelog" / "cluster"
    nodes = tuple(_spec(directory, i, 10 + i) for i in (1, 2, 3))
    result = localcluster.UpResult(ClusterFile(directory, nodes, "", 0), 2, resumed=False)
    text = _text(localcluster.render_nodes(result, cwd=tmp_path))
    assert "local cluster started in" in text
    assert "controller leader: node 2" in text
    assert "127.0.0.1:19002" in text and "127.0.0.1:19102" in text
    assert f"commands run in {tmp_path} find it" in text
    elsewhere = _text(localcluster.render_nodes(result, cwd=tmp_path / "sub"))
    assert "--bootstrap 127.0.0.1:19001,127.0.0.1:19002,127.0.0.1:19003" in elsewhere
    assert "--dir" in elsewhere


@pytest.mark.timeout(30)
def test_a_node_that_dies_after_starting_says_how(tmp_path: Path) -> None:
    """`cluster start` reports how a node that died at once ended (a signal, an exit status),
    not only that it is gone: a node killed by a signal leaves no line in its log."""
    data = tmp_path / "node-1" / "data"
    for code, how in (
        ("import os, signal; os.kill(os.getpid(), signal.SIGKILL)", "killed by SIGKILL"),
        ("raise SystemExit(3)", "exit status 3"),
    ):
        argv = (sys.executable, "-c", code, "--data-dir", str(data))
        spec = _spec(tmp_path, 1, argv=argv)
        node = dataclasses.replace(spec, pid=launch(spec))
        with pytest.raises(ClusterError, match=f"exited after starting \\({how}\\)"):
            localcluster.wait_node_ready(node, timeout_s=20)


@pytest.mark.timeout(30)
def test_a_child_in_the_middle_of_exec_is_still_the_node(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A node execs twice at start (it replaces itself to tune the allocator); while it does,
    its /proc command line reads empty, on a loaded machine for longer than any fixed wait.
    CI's chaos run once took such a node for dead ("exited after starting") and stopped.
    A child we started and have not reaped is that node; someone else's empty command line
    still counts as not the node."""
    data = tmp_path / "node-1" / "data"
    spec = _spec(tmp_path, 1, argv=tuple(_sleeper(data)))
    pid = launch(spec)
    real_read = Path.read_bytes

    def read_bytes(self: Path) -> bytes:
        return b"" if self.name == "cmdline" else real_read(self)

    try:
        monkeypatch.setattr(Path, "read_bytes", read_bytes)
        monkeypatch.setattr("tidelog.ops.processes.CMDLINE_RETRY_S", 0.0)
        assert process_state(pid, data) is ProcState.RUNNING
        other = subprocess.Popen(_sleeper(data))  # not started by launch: not known as ours
        try:
            assert process_state(other.pid, data) is ProcState.DEAD
        finally:
            other.kill()
            other.wait()
    finally:
        monkeypatch.undo()
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while process_state(pid) is not ProcState.DEAD and time.monotonic() < deadline:
            time.sleep(0.01)
