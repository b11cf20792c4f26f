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
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from tidelog.errors import TidelogError
from tidelog.ops import chaos as chaos_mod
from tidelog.ops import localcluster

__all__ = ["chaos", "cluster", "register"]

F = TypeVar("F", bound=Callable[..., Any])

CLUSTER_DIR_ENV = "TIDELOG_CLUSTER_DIR"
EXIT_FAILED = 1
OUTPUT_WIDTH_NOT_TERMINAL = 200


def register(cli: click.Group) -> None:
    """Add the ``cluster`` group and the ``chaos`` command to ``cli``."""
    cli.add_command(cluster)
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
    help=f"First gRPC port; metrics ports start {localcluster.METRICS_PORT_OFFSET} higher. "
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
@_errors
def cluster_up(nodes: int, directory: Path, base_port: int, timeout_s: float) -> None:
    """Start NODES nodes in the background and wait until the cluster is ready.

    A stopped cluster in --dir (after `cluster down`) is resumed with its data."""
    result = localcluster.up(directory, nodes, base_port, timeout_s=timeout_s, note=_note)
    _print(localcluster.render_nodes(result))


@cluster.command("status")
@_dir_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@_errors
def cluster_status(directory: Path, as_json: bool) -> None:
    """Nodes (process, registration), controller leader, leaders and replicas per node,
    under-replicated and leaderless partitions."""
    status = localcluster.cluster_status(directory)
    if as_json:
        click.echo(json.dumps(localcluster.status_to_json(status), indent=2))
        return
    _print(localcluster.render_status(status))


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
