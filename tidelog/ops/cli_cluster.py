"""``tidelog cluster up/status/kill/start/down`` and ``tidelog chaos``.

The logic lives in :mod:`tidelog.ops.localcluster` and :mod:`tidelog.ops.chaos`; this module only
parses options and prints. :func:`register` adds the commands to the ``tidelog`` group.
Every expected failure becomes one ``error: ...`` line and exit status 1, whether the
commands run under ``tidelog.ops.cli.main`` or under plain click.
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from tidelog.errors import TidelogError
from tidelog.ops import chaos as chaos_mod
from tidelog.ops import localcluster
from tidelog.ops.cli_connection import client_options, connection_options

__all__ = ["certs", "chaos", "cluster", "register"]

F = TypeVar("F", bound=Callable[..., Any])

CLUSTER_DIR_ENV = "TIDELOG_CLUSTER_DIR"
#: Where tidelog.ops.cli keeps a --bootstrap given before the verb.
GLOBAL_BOOTSTRAP_META = "tidelog.bootstrap"
EXIT_FAILED = 1
OUTPUT_WIDTH_NOT_TERMINAL = 200


def register(cli: click.Group) -> None:
    """Add the ``cluster`` and ``certs`` groups and the ``chaos`` command to ``cli``."""
    cli.add_command(cluster)
    cli.add_command(certs)
    cli.add_command(chaos)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _errors(fn: F) -> F:
    """TidelogError and OS errors become one readable line (click prints ``Error: ...``
    standalone; tidelog.ops.cli.main prints ``error: ...``), exit status 1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except TidelogError as exc:
            raise click.ClickException(_one_line(str(exc))) from None
        except OSError as exc:
            where = f" ({exc.filename})" if exc.filename else ""
            raise click.ClickException(_one_line(f"{exc.strerror or exc}{where}")) from None

    return wrapper  # type: ignore[return-value]


def _dir_option(fn: F) -> F:
    return click.option(
        "--dir",
        "directory",
        type=click.Path(file_okay=False, path_type=Path),
        default=localcluster.CLUSTER_DIR_DEFAULT,
        envvar=CLUSTER_DIR_ENV,
        show_default=True,
        show_envvar=True,
        help="Directory of the local cluster (cluster.json, node logs and data).",
    )(fn)


def _print(renderables: list[Any]) -> None:
    from rich.console import Console

    console = Console()
    if not console.is_terminal:  # piped or captured: never cut a table at 80 columns
        console = Console(width=OUTPUT_WIDTH_NOT_TERMINAL)
    for r in renderables:
        console.print(r)


def _note(message: str) -> None:
    click.echo(message, err=True)


@click.group()
def cluster() -> None:
    """Run a local cluster: N nodes on this machine, managed from one directory.

    Commands run in the directory that holds .tidelog/cluster (topic, produce, consume,
    bench, chaos) find the cluster without --bootstrap."""


@cluster.command("up")
@click.option(
    "--nodes",
    "-n",
    type=click.IntRange(1, localcluster.NODES_MAX),
    default=3,
    show_default=True,
    help="Number of nodes (the first three are the controller's voters).",
)
@_dir_option
@click.option(
    "--base-port",
    type=click.IntRange(1, localcluster.PORT_MAX),
    default=localcluster.BASE_PORT_DEFAULT,
    show_default=True,
    help=f"First gRPC port; metrics ports start {localcluster.METRICS_PORT_OFFSET} higher, "
    f"internal (node-to-node) ports {localcluster.INTERNAL_PORT_OFFSET} higher. "
    "Ports in use are skipped.",
)
@click.option(
    "--timeout",
    "timeout_s",
    type=click.FloatRange(min=1),
    default=localcluster.READY_TIMEOUT_S,
    show_default=True,
    help="Seconds to wait for a controller leader and every node registered.",
)
@click.option(
    "--no-tls",
    is_flag=True,
    help="Nodes authenticate each other with a generated cluster secret (DIR/cluster.secret) "
    "instead of mutual TLS with certificates in DIR/certs/.",
)
@_errors
def cluster_up(nodes: int, directory: Path, base_port: int, timeout_s: float, no_tls: bool) -> None:
    """Start NODES nodes in the background and wait until the cluster is ready.

    The nodes talk to each other over mutual TLS: the first `up` makes a cluster CA and one
    certificate per node in DIR/certs/. A stopped cluster in --dir (after `cluster down`) is
    resumed with its data (and its certificates or secret)."""
    result = localcluster.up(
        directory, nodes, base_port, timeout_s=timeout_s, note=_note, tls=not no_tls
    )
    _print(localcluster.render_nodes(result))


@click.group()
def certs() -> None:
    """Make the cluster CA and node certificates for node-to-node mutual TLS.

    A node runs with --internal-ca DIR/ca.crt --internal-cert DIR/node-N.crt --internal-key
    DIR/node-N.key. Keep ca.key off the nodes."""


@certs.command("ca")
@click.option(
    "--out",
    "out",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Directory for ca.crt and ca.key (ca.key is written with mode 0600).",
)
@click.option("--name", default="tidelog cluster CA", show_default=True, help="Subject CN.")
@click.option("--days", type=click.IntRange(min=1), default=3650, show_default=True)
@_errors
def certs_ca(out: Path, name: str, days: int) -> None:
    """Create a new cluster CA in --out (refuses to replace one)."""
    from tidelog.ops.certs import CertError, create_ca

    try:
        path = create_ca(out, name=name, days=days)
    except CertError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"wrote {path} and {out / 'ca.key'}")


@certs.command("node")
@click.option("--id", "node_id", type=click.IntRange(min=1), required=True, help="Node id.")
@click.option(
    "--ca",
    "ca_dir",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Directory holding ca.crt and ca.key.",
)
@click.option(
    "--host",
    "hosts",
    multiple=True,
    required=True,
    help="Host name or IP address the other nodes dial (repeat for several).",
)
@click.option(
    "--out",
    "out",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Directory for node-ID.crt and node-ID.key.",
)
@click.option("--days", type=click.IntRange(min=1), default=825, show_default=True)
@_errors
def certs_node(node_id: int, ca_dir: Path, hosts: tuple[str, ...], out: Path, days: int) -> None:
    """Create the certificate of node --id, signed by the CA in --ca (CN node-ID, SAN URI
    tidelog://node/ID and every --host)."""
    from tidelog.ops.certs import CertError, create_node_cert

    try:
        files = create_node_cert(ca_dir, node_id, hosts, out, days=days)
    except CertError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"wrote {files.cert} and {files.key}")


@cluster.command("status")
@_dir_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option(
    "--bootstrap",
    "-b",
    default=None,
    help="Ask this cluster (host:port, comma-separated; also before the command) instead "
    "of the local one in --dir: nodes, controller, leaders, under-replicated partitions.",
)
@connection_options
@_errors
def cluster_status(directory: Path, as_json: bool, bootstrap: str | None) -> None:
    """Nodes (process, registration), controller leader, leaders and replicas per node,
    under-replicated and leaderless partitions. With --bootstrap, of any cluster (no process
    states: those are only known for a local cluster)."""
    ctx = click.get_current_context()
    bootstrap = bootstrap or ctx.meta.get(GLOBAL_BOOTSTRAP_META)
    if bootstrap is not None:
        report = asyncio.run(_remote_status(bootstrap, client_options()))
        if as_json:
            click.echo(json.dumps(report, indent=2))
        else:
            _print(_render_remote(report))
        return
    status = localcluster.cluster_status(directory)
    shape = _local_shape(ctx, directory)
    if as_json:
        out = localcluster.status_to_json(status)
        if shape is not None:
            out["moves"] = shape["moves"]
            out["controller_voters"] = shape["controller_voters"]
            out["controller_voter_change"] = shape["controller_voter_change"]
            out["shape"] = [
                {k: n[k] for k in ("id", "state", "reprovision_deadline_ms", "stalled")}
                for n in shape["nodes"]
            ]
        click.echo(json.dumps(out, indent=2))
        return
    lines = localcluster.render_status(status)
    if shape is not None:
        for n in shape["nodes"]:
            if n["state"] != "active":
                lines.append(f"node {n['id']}: {n['state']}")
            if n.get("reprovision_deadline_ms"):
                lines.append(
                    f"node {n['id']}: dead; replicas rebuilt elsewhere at "
                    f"{_when(n['reprovision_deadline_ms'])}"
                )
            for why in n.get("stalled", []):
                lines.append(f"node {n['id']}: cannot move {why}")
        lines.extend(render_controller_voters(shape))
        lines.extend(render_moves(shape["moves"]))
    _print(lines)


def _local_shape(ctx: click.Context, directory: Path) -> dict[str, Any] | None:
    """Node states, deadlines and moves of the running local cluster (None: none answered)."""
    from tidelog.ops.cli_connection import note_discovered_cluster

    bootstrap = localcluster.discover_bootstrap_in(directory)
    if bootstrap is None:
        return None
    note_discovered_cluster(ctx, directory)
    try:
        return asyncio.run(_remote_status(bootstrap, client_options()))
    except (TidelogError, OSError):
        return None


async def _remote_status(bootstrap: str, connection: dict[str, Any]) -> dict[str, Any]:
    """The cluster's own view, from any node that answers."""
    from tidelog.client import Admin

    async with Admin(bootstrap, **connection) as admin:
        view = await admin.metadata()
        descs = await admin.describe_topics(None)
        shape = await admin.describe_cluster()
    states = {n.node_id: n for n in shape.nodes}
    leaders: dict[int, int] = {n.node_id: 0 for n in view.nodes}
    replicas: dict[int, int] = {n.node_id: 0 for n in view.nodes}
    under: list[str] = []
    leaderless: list[str] = []
    for d in descs:
        for p in d.partitions:
            name = f"{d.name}/{p.partition}"
            if p.leader < 0:
                leaderless.append(name)
            else:
                leaders[p.leader] = leaders.get(p.leader, 0) + 1
            for r in p.replicas:
                replicas[r] = replicas.get(r, 0) + 1
            if len(p.in_sync) < len(p.replicas):
                under.append(name)
    return {
        "bootstrap": bootstrap,
        "cluster_id": view.cluster_id,
        "controller_id": view.controller_id,
        "nodes": [
            {
                "id": n.node_id,
                "address": n.address,
                "alive": n.alive,
                "leaders": leaders.get(n.node_id, 0),
                "replicas": replicas.get(n.node_id, 0),
                **_node_shape(states.get(n.node_id)),
            }
            for n in view.nodes
        ],
        "moves": _moves(descs),
        "controller_voters": list(shape.controller_voters),
        "controller_voter_change": shape.controller_voter_change,
        "topics": len(descs),
        "partitions": sum(len(d.partitions) for d in descs),
        "under_replicated": under,
        "leaderless": leaderless,
    }


def _node_shape(n: Any) -> dict[str, Any]:
    """State, reprovisioning deadline and stuck replicas of a node (DescribeCluster)."""
    if n is None:
        return {"state": "unknown", "reprovision_deadline_ms": 0, "stalled": []}
    return {
        "state": n.state,
        "dead_since_ms": n.dead_since_ms,
        "reprovision_deadline_ms": n.reprovision_deadline_ms,
        "stalled": list(n.stalled),
        "controller_voter": n.controller_voter,
    }


def _moves(descs: Any) -> list[dict[str, Any]]:
    """Partitions being moved: from where to where, copy progress, why stalled."""
    out = []
    for d in descs:
        for p in d.partitions:
            if not p.target:
                continue
            out.append(
                {
                    "partition": f"{d.name}/{p.partition}",
                    "replicas": list(p.replicas),
                    "target": list(p.target),
                    "moving": {
                        str(node): {"copied": c, "left": left}
                        for node, (c, left) in sorted(p.moving.items())
                    },
                    "stalled": p.stalled,
                }
            )
    return out


def render_controller_voters(report: dict[str, Any]) -> list[str]:
    """The controller's voters and a voter change in progress."""
    voters = report.get("controller_voters") or []
    lines = []
    if voters:
        lines.append(f"controller voters: {', '.join(map(str, voters))}")
    if report.get("controller_voter_change"):
        lines.append(f"controller voter change: {report['controller_voter_change']}")
    return lines


def render_moves(moves: list[dict[str, Any]]) -> list[str]:
    lines = []
    for m in moves:
        line = (
            f"moving {m['partition']}: {','.join(map(str, m['replicas']))} -> "
            f"{','.join(map(str, m['target']))}"
        )
        for node, prog in m["moving"].items():
            line += f"; node {node}: {prog['copied']} bytes copied, {prog['left']} bytes left"
        if m["stalled"]:
            line += f"; stalled: {m['stalled']}"
        lines.append(line)
    return lines


def _when(ms: int) -> str:
    import datetime

    if not ms:
        return ""
    at = datetime.datetime.fromtimestamp(ms / 1000, tz=datetime.UTC)
    left = ms / 1000 - time.time()
    rel = f"in {left:.0f} s" if left > 0 else "passed"
    return f"{at:%H:%M:%S} UTC ({rel})"


def _render_remote(report: dict[str, Any]) -> list[Any]:
    from rich.table import Table

    table = Table(
        title=f"cluster {report['cluster_id']} via {report['bootstrap']}  "
        f"(controller: node {report['controller_id']})",
        title_justify="left",
    )
    for col in ("node", "address", "alive", "state", "leaders", "replicas", "reprovision at"):
        table.add_column(col)
    for n in report["nodes"]:
        table.add_row(
            str(n["id"]),
            n["address"],
            "yes" if n["alive"] else "NO",
            n.get("state", ""),
            str(n["leaders"]),
            str(n["replicas"]),
            _when(n.get("reprovision_deadline_ms", 0)),
        )
    lines: list[Any] = [table, f"{report['topics']} topic(s), {report['partitions']} partition(s)"]
    lines.extend(render_controller_voters(report))
    lines.extend(render_moves(report.get("moves", [])))
    for n in report["nodes"]:
        for why in n.get("stalled", []):
            lines.append(f"node {n['id']}: cannot move {why}")
    for key, label in (("under_replicated", "under-replicated"), ("leaderless", "leaderless")):
        items = report[key]
        lines.append(f"{label}: {', '.join(items) if items else 'none'}")
    return lines


@cluster.command("kill")
@click.argument("node_id", metavar="ID", type=int)
@click.option(
    "--signal",
    "sig",
    type=click.Choice(sorted(localcluster.SIGNALS), case_sensitive=False),
    default="KILL",
    show_default=True,
    help="KILL: crash; STOP: pause (alive but silent, resume with `cluster start`); "
    "TERM: graceful stop.",
)
@_dir_option
@_errors
def cluster_kill(node_id: int, sig: str, directory: Path) -> None:
    """Send a signal to node ID."""
    state = localcluster.kill_node(directory, node_id, sig)
    click.echo(f"sent SIG{sig.upper()} to node {node_id}: now {state.value}")


@cluster.command("start")
@click.argument("node_id", metavar="ID", type=int)
@_dir_option
@click.option("--no-wait", is_flag=True, help="Return without waiting for the node to be ready.")
@click.option(
    "--timeout",
    "timeout_s",
    type=click.FloatRange(min=1),
    default=localcluster.NODE_READY_TIMEOUT_S,
    show_default=True,
    help="Seconds to wait for the node to serve and be registered alive.",
)
@_errors
def cluster_start(node_id: int, directory: Path, no_wait: bool, timeout_s: float) -> None:
    """Restart killed node ID with its original command line, or resume it if stopped."""
    action = localcluster.start_node(directory, node_id, wait=not no_wait, timeout_s=timeout_s)
    suffix = "" if no_wait else " and ready"
    click.echo(f"node {node_id} {action}{suffix}")


@cluster.command("down")
@_dir_option
@click.option("--purge", is_flag=True, help="Also delete the directory: data, logs, cluster.json.")
@_errors
def cluster_down(directory: Path, purge: bool) -> None:
    """Stop every node (SIGTERM, SIGKILL after a grace period). Data is kept, so `cluster up`
    resumes the cluster, unless --purge."""
    outcome = localcluster.down(directory, purge=purge)
    for node_id, what in sorted(outcome.items()):
        click.echo(f"node {node_id}: {what}")
    if purge:
        click.echo(f"removed {directory.absolute()}")


@click.command()
@click.option(
    "--rounds", type=click.IntRange(min=0), default=chaos_mod.ROUNDS_DEFAULT, show_default=True
)
@click.option("--topic", default=chaos_mod.TOPIC_DEFAULT, show_default=True)
@click.option(
    "--partitions",
    "-p",
    type=click.IntRange(min=1),
    default=chaos_mod.PARTITIONS_DEFAULT,
    show_default=True,
)
@click.option(
    "--replication-factor",
    "-r",
    type=click.IntRange(min=1),
    default=chaos_mod.REPLICATION_FACTOR_DEFAULT,
    show_default=True,
)
@click.option(
    "--rate",
    type=click.FloatRange(min=0, min_open=True),
    default=chaos_mod.RATE_DEFAULT,
    show_default=True,
    help="Records per second over all partitions.",
)
@click.option(
    "--downtime-ms",
    type=click.IntRange(min=0),
    default=chaos_mod.DOWNTIME_MS_DEFAULT,
    show_default=True,
    help="How long a killed node stays down before it is restarted.",
)
@click.option("--seed", type=int, default=None, help="Seed of the victim choices (printed).")
@click.option(
    "--idempotence/--no-idempotence",
    default=True,
    show_default=True,
    help="The idempotent producer with 5 requests in flight per partition (duplicates fail "
    "the verdict), or the producer without idempotence with 1 in flight (duplicates are "
    "reported, not failures).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the verdict as one JSON object.")
@_dir_option
@click.pass_context
@_errors
def chaos(
    ctx: click.Context,
    rounds: int,
    topic: str,
    partitions: int,
    replication_factor: int,
    rate: float,
    downtime_ms: int,
    seed: int | None,
    idempotence: bool,
    as_json: bool,
    directory: Path,
) -> None:
    """Kill (SIGKILL) and restart nodes of the local cluster, leaders first, under an acks=all
    load; then check that no acknowledged record was lost, duplicated or reordered and report
    failover times. Exits 1 if any acknowledged record was lost, reordered or overwritten,
    or (with idempotence, the default) any record was stored twice."""
    report = asyncio.run(
        chaos_mod.run_chaos(
            directory,
            rounds=rounds,
            topic=topic,
            partitions=partitions,
            replication_factor=replication_factor,
            rate=rate,
            downtime_ms=downtime_ms,
            seed=seed,
            idempotence=idempotence,
            note=_note,
        )
    )
    if as_json:
        click.echo(json.dumps(report.to_json()))
    else:
        _print(chaos_mod.render_report(report))
    if not report.ok:
        ctx.exit(EXIT_FAILED)
