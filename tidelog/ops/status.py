"""What ``tidelog cluster status`` and ``up`` show: the status built from the process states
and one Metadata answer (pure), its JSON form, and the rich tables.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from tidelog.ops.cluster_file import ClusterFile
from tidelog.ops.limits import (
    CLUSTER_DIR_DEFAULT,
)
from tidelog.ops.processes import ProcState
from tidelog.v1 import broker_pb2

__all__ = [
    "ClusterStatus",
    "NodeStatus",
    "PartitionProblem",
    "UpResult",
    "build_status",
    "render_nodes",
    "render_status",
    "status_to_json",
]


@dataclass(frozen=True, slots=True)
class UpResult:
    """What ``up`` started: the cluster, its controller leader, whether it was resumed."""

    cluster: ClusterFile
    controller_id: int
    #: Whether ``up`` restarted a stopped cluster found in the directory.
    resumed: bool


# ---------------------------------------------------------------------------------------------
# status


@dataclass(frozen=True, slots=True)
class NodeStatus:
    node_id: int
    #: None for a node the cluster knows that cluster.json does not (started elsewhere).
    pid: int | None
    process: ProcState | None
    address: str
    metrics_address: str
    #: Whether the controller lists the node and whether it thinks it alive; None when no
    #: node answered Metadata.
    registered: bool | None
    alive: bool | None
    is_controller: bool
    leaders: int
    replicas: int


@dataclass(frozen=True, slots=True)
class PartitionProblem:
    topic: str
    partition: int
    leader: int
    replicas: tuple[int, ...]
    in_sync: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class ClusterStatus:
    directory: Path
    nodes: tuple[NodeStatus, ...]
    #: None: no node answered; -1: the answering node knows no controller leader.
    controller_id: int | None
    #: The address whose Metadata this status shows.
    metadata_from: str | None
    topics: int
    partitions: int
    under_replicated: tuple[PartitionProblem, ...]
    leaderless: tuple[PartitionProblem, ...]
    notes: tuple[str, ...] = field(default=())


def build_status(
    cluster: ClusterFile,
    states: Mapping[int, ProcState],
    metadata: broker_pb2.MetadataResponse | None,
    metadata_from: str | None = None,
) -> ClusterStatus:
    """The status from the process states and one Metadata answer (pure, for tests)."""
    leaders: dict[int, int] = {}
    replicas: dict[int, int] = {}
    under: list[PartitionProblem] = []
    leaderless: list[PartitionProblem] = []
    partitions = 0
    registered: dict[int, broker_pb2.NodeInfo] = {}
    topics = 0
    if metadata is not None:
        registered = {n.node_id: n for n in metadata.nodes}
        topics = len(metadata.topics)
        for t in sorted(metadata.topics, key=lambda t: t.name):
            for p in sorted(t.partitions, key=lambda p: p.partition):
                partitions += 1
                if p.leader >= 0:
                    leaders[p.leader] = leaders.get(p.leader, 0) + 1
                for r in p.replicas:
                    replicas[r] = replicas.get(r, 0) + 1
                problem = PartitionProblem(
                    t.name, p.partition, p.leader, tuple(p.replicas), tuple(p.in_sync)
                )
                if p.leader < 0:
                    leaderless.append(problem)
                if len(set(p.in_sync) & set(p.replicas)) < len(p.replicas):
                    under.append(problem)
    controller = None if metadata is None else metadata.controller_id
    rows: list[NodeStatus] = []
    for spec in cluster.nodes:
        info = registered.get(spec.node_id)
        rows.append(
            NodeStatus(
                node_id=spec.node_id,
                pid=spec.pid,
                process=states.get(spec.node_id, ProcState.DEAD),
                address=spec.address,
                metrics_address=spec.metrics_address,
                registered=None if metadata is None else info is not None,
                alive=None if metadata is None else (info is not None and info.alive),
                is_controller=controller == spec.node_id,
                leaders=leaders.get(spec.node_id, 0),
                replicas=replicas.get(spec.node_id, 0),
            )
        )
    ours = {n.node_id for n in cluster.nodes}
    for node_id, info in sorted(registered.items()):
        if node_id in ours:
            continue
        rows.append(
            NodeStatus(
                node_id=node_id,
                pid=None,
                process=None,
                address=info.address,
                metrics_address=info.metrics_address,
                registered=True,
                alive=info.alive,
                is_controller=controller == node_id,
                leaders=leaders.get(node_id, 0),
                replicas=replicas.get(node_id, 0),
            )
        )
    notes: list[str] = []
    if metadata is None:
        notes.append("no running node answered Metadata: registration and partitions unknown")
    return ClusterStatus(
        directory=cluster.directory,
        nodes=tuple(rows),
        controller_id=controller,
        metadata_from=metadata_from,
        topics=topics,
        partitions=partitions,
        under_replicated=tuple(under),
        leaderless=tuple(leaderless),
        notes=tuple(notes),
    )


def _registration(n: NodeStatus) -> str:
    """What the controller thinks of the node: alive, dead, no (unknown to it), ? (no answer)."""
    if n.registered is None:
        return "?"
    if not n.registered:
        return "no"
    return "alive" if n.alive else "dead"


def _problem_json(p: PartitionProblem) -> dict[str, Any]:
    return {
        "topic": p.topic,
        "partition": p.partition,
        "leader": p.leader,
        "replicas": list(p.replicas),
        "in_sync": list(p.in_sync),
    }


def status_to_json(status: ClusterStatus) -> dict[str, Any]:
    return {
        "directory": str(status.directory),
        "controller_id": status.controller_id,
        "metadata_from": status.metadata_from,
        "topics": status.topics,
        "partitions": status.partitions,
        "nodes": [
            {
                "id": n.node_id,
                "pid": n.pid,
                "process": None if n.process is None else n.process.value,
                "address": n.address,
                "metrics_address": n.metrics_address,
                "registered": n.registered,
                "alive": n.alive,
                "controller": n.is_controller,
                "leaders": n.leaders,
                "replicas": n.replicas,
            }
            for n in status.nodes
        ],
        "under_replicated": [_problem_json(p) for p in status.under_replicated],
        "leaderless": [_problem_json(p) for p in status.leaderless],
        "notes": list(status.notes),
    }


def render_status(status: ClusterStatus) -> list[Any]:
    """Rich renderables: the node table, a summary line, and the troubled partitions."""
    from rich.table import Table
    from rich.text import Text

    table = Table(title=f"local cluster {status.directory}", title_justify="left")
    table.add_column("node", justify="right")
    table.add_column("pid", justify="right")
    table.add_column("process")
    table.add_column("registered")
    table.add_column("gRPC", no_wrap=True)
    table.add_column("metrics", no_wrap=True)
    table.add_column("leaders", justify="right")
    table.add_column("replicas", justify="right")
    styles = {ProcState.RUNNING: "green", ProcState.STOPPED: "yellow", ProcState.DEAD: "red"}
    for n in status.nodes:
        node = f"{n.node_id}*" if n.is_controller else str(n.node_id)
        process = Text("-") if n.process is None else Text(n.process.value, style=styles[n.process])
        table.add_row(
            node,
            "-" if n.pid is None else str(n.pid),
            process,
            _registration(n),
            n.address,
            n.metrics_address,
            str(n.leaders),
            str(n.replicas),
        )
    out: list[Any] = [table]
    if status.controller_id is None:
        controller = "unknown (no node answered)"
    elif status.controller_id < 0:
        controller = "none (no controller leader)"
    else:
        controller = f"node {status.controller_id} (marked *)"
    out.append(
        Text(
            f"controller: {controller}; {status.topics} topic(s), {status.partitions} "
            f"partition(s), {len(status.under_replicated)} under-replicated, "
            f"{len(status.leaderless)} leaderless"
        )
    )
    troubled = {(p.topic, p.partition): p for p in status.leaderless + status.under_replicated}
    if troubled:
        parts = Table(title="partitions needing attention", title_justify="left")
        for col in ("topic", "partition", "leader", "replicas", "in sync", "problem"):
            parts.add_column(col)
        leaderless = {(p.topic, p.partition) for p in status.leaderless}
        under = {(p.topic, p.partition) for p in status.under_replicated}
        for key in sorted(troubled):
            p = troubled[key]
            kinds = (("leaderless", leaderless), ("under-replicated", under))
            problems = [what for what, keys in kinds if key in keys]
            parts.add_row(
                p.topic,
                str(p.partition),
                "-" if p.leader < 0 else str(p.leader),
                ",".join(map(str, p.replicas)),
                ",".join(map(str, p.in_sync)),
                ", ".join(problems),
            )
        out.append(parts)
    for note in status.notes:
        out.append(Text(f"note: {note}", style="yellow"))
    return out


def render_nodes(result: UpResult, cwd: Path | None = None) -> list[Any]:
    """Rich renderables for ``up``: the nodes, the controller, how other commands find it."""
    from rich.table import Table
    from rich.text import Text

    cluster = result.cluster
    verb = "resumed" if result.resumed else "started"
    table = Table(title=f"local cluster {verb} in {cluster.directory}", title_justify="left")
    for col in ("node", "pid", "gRPC", "internal", "metrics", "log"):
        justify: Literal["left", "right"] = "right" if col in ("node", "pid") else "left"
        table.add_column(col, justify=justify, no_wrap=True)
    for n in cluster.nodes:
        node = f"{n.node_id}*" if n.node_id == result.controller_id else str(n.node_id)
        log = (
            n.log_path.relative_to(cluster.directory)
            if n.log_path.is_relative_to(cluster.directory)
            else n.log_path
        )
        internal = n.internal_address or "-"
        table.add_row(node, str(n.pid), n.address, internal, n.metrics_address, str(log))
    bootstrap = ",".join(n.address for n in cluster.nodes)
    home = (cwd or Path.cwd()).absolute()
    if cluster.directory == home / CLUSTER_DIR_DEFAULT:
        found = f"commands run in {home} find it; elsewhere pass --bootstrap {bootstrap}"
    else:
        found = (
            f"pass --bootstrap {bootstrap} (or set TIDELOG_BOOTSTRAP) and --dir "
            f"{cluster.directory} to the cluster commands"
        )
    return [table, Text(f"controller leader: node {result.controller_id} (marked *)"), Text(found)]
