"""``tidelog partition force-recover TOPIC/P --from-survivors``: UNSAFE recovery of a
partition that lost a majority of its replicas for good (controller/recovery.py,
docs/operations.md "Recovering from a lost majority"). One Admin call to any node of the
cluster named by ``--bootstrap`` (or the local cluster); the active controller does the work
and the report of what may have been lost is printed. :func:`register` adds the verb to the
``partition`` group (cli_heal.py defines it).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import click

from tidelog.client import Admin
from tidelog.client.admin import ControllerRecoveryReport, ForceRecoverReport
from tidelog.ops.cli_connection import client_options
from tidelog.ops.cli_heal import parse_partition

__all__ = ["register"]


def register(cli: click.Group, bootstrap_option: Callable[[Callable[..., Any]], Any]) -> None:
    partition = cli.commands.get("partition")
    if not isinstance(partition, click.Group):
        raise RuntimeError("the partition group must be registered first (cli_heal)")

    @partition.command("force-recover")
    @click.argument("spec", metavar="TOPIC/P")
    @click.option(
        "--from-survivors",
        is_flag=True,
        help="Required: shrink the replicas to the live ones and keep the most up-to-date "
        "survivor's log. UNSAFE: acknowledged records only the lost replicas held are lost.",
    )
    @bootstrap_option
    def partition_force_recover(spec: str, from_survivors: bool, bootstrap: str) -> None:
        """UNSAFE: recover TOPIC/P after a majority of its replicas is lost for good.

        The replicas shrink to the survivors (live nodes holding one); the one with the
        highest last log term and index keeps its log and leads; offsets from its log end
        on that the lost replicas acknowledged are lost (printed). Reprovisioning then
        restores the replication factor where there are nodes for it. Refused while a
        majority of the replicas is alive."""
        topic, p = parse_partition(spec)
        if not from_survivors:
            raise click.UsageError(
                "force-recover gives up what only the lost replicas held: pass "
                "--from-survivors to confirm (see docs/operations.md)"
            )
        connection = client_options()

        async def go() -> ForceRecoverReport:
            async with Admin(bootstrap, **connection) as admin:
                return await admin.force_recover_partition(topic, p, from_survivors=True)

        report = asyncio.run(go())
        click.echo(report.summary)

    cluster = cli.commands.get("cluster")
    if not isinstance(cluster, click.Group):
        raise RuntimeError("the cluster group must be registered first")

    @cluster.command("force-recover-controller")
    @click.option(
        "--from-survivors",
        is_flag=True,
        help="Required: shrink the controller's voters to the nodes that answer and keep the "
        "most up-to-date one's log. UNSAFE: metadata changes only the lost voters held are "
        "lost.",
    )
    @bootstrap_option
    def cluster_force_recover_controller(from_survivors: bool, bootstrap: str) -> None:
        """UNSAFE: recover the controller after a majority of its voters is lost for good.

        Run against a surviving node (--bootstrap): it asks every node it knows for its
        controller log; the voters that answer become the voters, the one with the highest
        last log term and index keeps its log and is elected; committed controller entries
        above its log end are lost (printed). Reprovisioning then promotes live nodes until
        the voter count is back. Refused while a controller leader exists or a majority of
        the voters answers."""
        if not from_survivors:
            raise click.UsageError(
                "force-recover-controller gives up what only the lost voters held: pass "
                "--from-survivors to confirm (see docs/operations.md)"
            )
        connection = client_options()

        async def go() -> ControllerRecoveryReport:
            async with Admin(bootstrap, request_timeout_ms=60_000, **connection) as admin:
                return await admin.force_recover_controller(from_survivors=True)

        report = asyncio.run(go())
        click.echo(report.summary)
