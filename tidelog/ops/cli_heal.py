"""The cluster's shape from the command line: ``tidelog cluster drain|remove|add``,
``tidelog cluster config get|set|unset|list`` and ``tidelog partition reassign|cancel``.

Each verb is one Admin call (``tidelog.client.Admin``) to any node of the cluster named by
``--bootstrap`` (or the local cluster), so all of it works against a remote cluster; the
node forwards the change to the active controller. A refused change (an unknown node, a
live node that still holds replicas, a bad setting) is one ``error: ...`` line and exit
status 1, as every other verb. :func:`register` adds them to the ``tidelog`` group.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import click

from tidelog.client import Admin
from tidelog.client.admin import ClusterConfigEntry, PartitionMove
from tidelog.ops.cli_connection import client_options

__all__ = ["parse_partition", "parse_replicas", "register"]

BootstrapOption = Callable[[Callable[..., Any]], Callable[..., Any]]


def parse_partition(text: str) -> tuple[str, int]:
    """``TOPIC/P`` -> (topic, p)."""
    topic, sep, raw = text.rpartition("/")
    if not sep or not topic or not raw.isdigit():
        raise click.BadParameter(f"{text!r} is not TOPIC/PARTITION (for example orders/3)")
    return topic, int(raw)


def parse_replicas(text: str) -> list[int]:
    """``1,2,4`` -> [1, 2, 4]."""
    out = []
    for item in text.split(","):
        item = item.strip()
        if not item.isdigit() or int(item) < 1:
            raise click.BadParameter(f"{text!r} is not a comma-separated list of node ids")
        out.append(int(item))
    return out


def _move_line(m: PartitionMove) -> str:
    line = f"{m.topic}/{m.partition}: replicas {_ids(m.replicas)}"
    if m.target:
        line += f" -> {_ids(m.target)}"
        if m.stalled:
            line += f" (stalled: {m.stalled})"
    else:
        line += " (no move in progress)"
    return line


def _ids(ids: Sequence[int]) -> str:
    return ",".join(map(str, ids))


def _config_rows(entries: list[ClusterConfigEntry], as_json: bool) -> None:
    if as_json:
        click.echo(
            json.dumps(
                [
                    {
                        "key": e.key,
                        "value": e.value,
                        "default": e.default,
                        "source": "default" if e.is_default else "set",
                        "kind": e.kind,
                        "doc": e.doc,
                    }
                    for e in entries
                ],
                indent=2,
            )
        )
        return
    for e in entries:
        source = "default" if e.is_default else "set"
        click.echo(f"{e.key}={e.value}  ({source}; {e.kind})")


def register(cli: click.Group, cluster: click.Group, bootstrap_option: BootstrapOption) -> None:
    """Add the verbs to ``cli`` and its ``cluster`` group; ``bootstrap_option`` is the CLI's
    --bootstrap and connection options."""

    def run(fn: Callable[[Admin], Any], bootstrap: str) -> Any:
        connection = client_options()

        async def go() -> Any:
            async with Admin(bootstrap, **connection) as admin:
                return await fn(admin)

        return asyncio.run(go())

    @cluster.command("drain")
    @click.argument("node_id", metavar="ID", type=click.IntRange(min=1))
    @click.option("--cancel", is_flag=True, help="Stop draining: the node takes replicas again.")
    @click.option(
        "--wait", is_flag=True, help="Wait until the node holds no replica (prints progress)."
    )
    @click.option("--timeout", "timeout_s", type=float, default=600.0, show_default=True)
    @bootstrap_option
    def cluster_drain(
        node_id: int, cancel: bool, wait: bool, timeout_s: float, bootstrap: str
    ) -> None:
        """Move every replica off node ID (each new replica catches up and joins before the
        old one leaves, so no partition loses redundancy); it then can be stopped and
        removed (tidelog cluster remove ID)."""

        async def go(admin: Admin) -> int:
            count = await admin.drain_node(node_id, cancel=cancel)
            if cancel:
                click.echo(f"node {node_id} is active again ({count} replica(s) on it)")
                return count
            click.echo(f"draining node {node_id}: {count} replica(s) to move off")
            desc = await admin.describe_cluster()
            node = next((n for n in desc.nodes if n.node_id == node_id), None)
            if node is not None and node.controller_voter:
                click.echo(
                    f"node {node_id} is a controller voter: its vote moves to another node "
                    "first (cluster status shows the controller voter change)"
                )
            deadline = time.monotonic() + timeout_s
            while wait and count:
                if time.monotonic() > deadline:
                    raise click.ClickException(
                        f"node {node_id} still holds {count} replica(s) after {timeout_s:.0f} s"
                    )
                await asyncio.sleep(1.0)
                desc = await admin.describe_cluster()
                node = next((n for n in desc.nodes if n.node_id == node_id), None)
                if node is None:
                    break
                if node.replicas != count:
                    count = node.replicas
                    click.echo(f"node {node_id}: {count} replica(s) left")
                for why in node.stalled:
                    click.echo(f"stalled: {why}")
            if wait:
                click.echo(f"node {node_id} holds no replica: stop it, then remove it")
            return count

        run(go, bootstrap)

    @cluster.command("remove")
    @click.argument("node_id", metavar="ID", type=click.IntRange(min=1))
    @bootstrap_option
    def cluster_remove(node_id: int, bootstrap: str) -> None:
        """Forget node ID: it must hold no replica and be dead or drained."""

        async def go(admin: Admin) -> None:
            await admin.remove_node(node_id)

        run(go, bootstrap)
        click.echo(f"removed node {node_id}")

    @cluster.group("config")
    def cluster_config() -> None:
        """Cluster-wide settings, replicated by the controller and changed at run time."""

    @cluster_config.command("list")
    @click.option("--json", "as_json", is_flag=True, help="Print JSON.")
    @bootstrap_option
    def config_list(as_json: bool, bootstrap: str) -> None:
        """Every cluster setting and topic default, with its value and source."""

        async def go(admin: Admin) -> list[ClusterConfigEntry]:
            return await admin.cluster_config()

        _config_rows(run(go, bootstrap), as_json)

    @cluster_config.command("get")
    @click.argument("keys", nargs=-1, required=True)
    @click.option("--json", "as_json", is_flag=True, help="Print JSON.")
    @bootstrap_option
    def config_get(keys: tuple[str, ...], as_json: bool, bootstrap: str) -> None:
        """The value of each KEY."""

        async def go(admin: Admin) -> list[ClusterConfigEntry]:
            return await admin.cluster_config(list(keys))

        entries = run(go, bootstrap)
        if as_json or len(keys) > 1:
            _config_rows(entries, as_json)
        else:
            click.echo(entries[0].value)

    @cluster_config.command("set")
    @click.argument("pairs", nargs=-1, required=True, metavar="KEY=VALUE...")
    @bootstrap_option
    def config_set(pairs: tuple[str, ...], bootstrap: str) -> None:
        """Set cluster settings (e.g. replica.reprovision.ms=5000), or the cluster default
        of a topic config (e.g. retention.ms=86400000)."""
        values: dict[str, str] = {}
        for pair in pairs:
            key, sep, value = pair.partition("=")
            if not sep or not key.strip():
                raise click.BadParameter(f"{pair!r} is not KEY=VALUE")
            values[key.strip()] = value.strip()

        async def go(admin: Admin) -> list[ClusterConfigEntry]:
            return await admin.set_cluster_config(values)

        _config_rows(run(go, bootstrap), False)

    @cluster_config.command("unset")
    @click.argument("keys", nargs=-1, required=True)
    @bootstrap_option
    def config_unset(keys: tuple[str, ...], bootstrap: str) -> None:
        """Unset cluster settings: their defaults apply again."""

        async def go(admin: Admin) -> list[ClusterConfigEntry]:
            return await admin.set_cluster_config(delete=list(keys))

        _config_rows(run(go, bootstrap), False)

    @cluster.command("add")
    @click.option(
        "--dir",
        "directory",
        type=click.Path(file_okay=False, path_type=Path),
        default=None,
        help="The local cluster's directory (default: $TIDELOG_CLUSTER_DIR or ./.tidelog/cluster).",
    )
    @click.option("--timeout", "timeout_s", type=float, default=60.0, show_default=True)
    def cluster_add(directory: Path | None, timeout_s: float) -> None:
        """Start one more node in the local cluster; it joins through a running node and the
        controller moves replicas onto it until replicas are balanced."""
        from tidelog.ops import localcluster
        from tidelog.ops.cli import cluster_dir

        try:
            spec = localcluster.add_node(directory or cluster_dir(), timeout_s=timeout_s)
        except localcluster.ClusterError as exc:
            raise click.ClickException(str(exc)) from None
        click.echo(f"node {spec.node_id} joined at {spec.address} (log: {spec.log_path})")

    @cli.group("partition")
    def partition() -> None:
        """Move one partition's replicas."""

    @partition.command("reassign")
    @click.argument("spec", metavar="TOPIC/P")
    @click.option(
        "--replicas",
        default=None,
        help="The nodes the partition should end with, comma-separated, preferred leader "
        "first (for example 1,2,4).",
    )
    @click.option("--cancel", is_flag=True, help="Cancel the move in progress instead.")
    @bootstrap_option
    def partition_reassign(spec: str, replicas: str | None, cancel: bool, bootstrap: str) -> None:
        """Move partition TOPIC/P to the nodes of --replicas (a new replica is added as a
        learner, catches up and is promoted before a leaving one is removed)."""
        topic, p = parse_partition(spec)
        if cancel == (replicas is not None):
            raise click.UsageError("give either --replicas 1,2,4 or --cancel")
        ids = parse_replicas(replicas) if replicas is not None else []

        async def go(admin: Admin) -> PartitionMove:
            return await admin.reassign_partition(topic, p, ids, cancel=cancel)

        click.echo(_move_line(run(go, bootstrap)))

    @partition.command("cancel")
    @click.argument("spec", metavar="TOPIC/P")
    @bootstrap_option
    def partition_cancel(spec: str, bootstrap: str) -> None:
        """Cancel the move of TOPIC/P in progress (as reassign --cancel)."""
        topic, p = parse_partition(spec)

        async def go(admin: Admin) -> PartitionMove:
            return await admin.reassign_partition(topic, p, cancel=True)

        click.echo(_move_line(run(go, bootstrap)))
