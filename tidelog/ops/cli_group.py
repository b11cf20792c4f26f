"""``tidelog group``: list, describe and delete consumer groups, and reset their committed
offsets (a dry run by default, ``--execute`` applies: as Kafka's kafka-consumer-groups tool).

Every failure is one ``error: ...`` line and a non-zero exit (cli.py's main): an unknown group,
a reset or delete of a group that still has members, an unknown topic or partition.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from tidelog.client import Admin
from tidelog.client.admin import GroupDescription, OffsetResetPlan, ResetTo
from tidelog.ops.cli_connection import client_options

__all__ = ["add_group_commands", "parse_datetime_ms", "parse_topic_partitions"]


def parse_datetime_ms(text: str) -> int:
    """``--to-datetime``: milliseconds since the epoch, or an ISO 8601 time
    (``2026-12-01T10:00:00``, with ``Z`` or an offset; without one it is UTC, as Kafka's
    ``YYYY-MM-DDTHH:mm:SS.sss`` is read in the tool's zone, which is UTC in a container)."""
    t = text.strip()
    if re.fullmatch(r"\d+", t):
        return int(t)
    try:
        when = datetime.fromisoformat(t.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(
            f"{text!r} is neither milliseconds since the epoch nor an ISO 8601 time such as "
            "2026-12-01T10:00:00Z"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return int(when.timestamp() * 1000)


def parse_topic_partitions(text: str) -> tuple[str, list[int]]:
    """``--topic T`` or ``--topic T:0,2`` (Kafka's form)."""
    topic, sep, rest = text.partition(":")
    if not topic:
        raise ValueError(f"{text!r} names no topic")
    if not sep:
        return topic, []
    try:
        parts = [int(p) for p in rest.split(",") if p.strip()]
    except ValueError:
        raise ValueError(f"{rest!r} in {text!r} is not a list of partition numbers") from None
    if not parts or any(p < 0 for p in parts):
        raise ValueError(f"{text!r}: give partition numbers >= 0 after the colon")
    return topic, parts


def _tps_text(tps: Any) -> str:
    by_topic: dict[str, list[int]] = {}
    for tp in tps:
        by_topic.setdefault(tp.topic, []).append(tp.partition)
    return " ".join(f"{t}:{','.join(map(str, sorted(ps)))}" for t, ps in sorted(by_topic.items()))


def describe_json(d: GroupDescription) -> dict[str, Any]:
    return {
        "group_id": d.group_id,
        "state": d.state,
        "group_epoch": d.group_epoch,
        "assignment_epoch": d.assignment_epoch,
        "assignor": d.assignor,
        "coordinator": d.coordinator_node_id,
        "members": [
            {
                "member_id": m.member_id,
                "group_instance_id": m.group_instance_id,
                "member_epoch": m.member_epoch,
                "client_host": m.client_host,
                "subscription": m.subscription
                if isinstance(m.subscription, str)
                else list(m.subscription),
                "owned": [[tp.topic, tp.partition] for tp in m.owned],
                "target": [[tp.topic, tp.partition] for tp in m.target],
            }
            for m in d.members
        ],
        "partitions": [
            {
                "topic": p.topic,
                "partition": p.partition,
                "committed_offset": p.committed_offset,
                "end_offset": p.end_offset,
                "lag": p.lag,
                "member_id": p.member_id or None,
            }
            for p in d.partitions
        ],
    }


def add_group_commands(cli: click.Group, bootstrap_option: Callable[..., Any]) -> None:
    """Add ``tidelog group ...`` to the CLI (``bootstrap_option``: cli.py's --bootstrap)."""

    @cli.group("group")
    def group() -> None:
        """Consumer groups: list, describe, reset offsets, delete."""

    @group.command("list")
    @click.option("--json", "as_json", is_flag=True, help="Print JSON.")
    @bootstrap_option
    def group_list(as_json: bool, bootstrap: str) -> None:
        """Every group of the cluster with its state and member count (every node is asked:
        each lists the groups it coordinates)."""
        connection = client_options()

        async def go() -> Any:
            async with Admin(bootstrap, **connection) as admin:
                return await admin.list_groups()

        groups = asyncio.run(go())
        if as_json:
            click.echo(
                json.dumps(
                    [
                        {
                            "group_id": g.group_id,
                            "state": g.state,
                            "members": g.members,
                            "coordinator": g.coordinator_node_id,
                        }
                        for g in groups
                    ],
                    indent=2,
                )
            )
            return
        if not groups:
            click.echo("no groups", err=True)
            return
        table = Table()
        for col in ("group", "state", "members", "coordinator"):
            table.add_column(col)
        for g in groups:
            table.add_row(g.group_id, g.state, str(g.members), str(g.coordinator_node_id))
        Console().print(table)

    @group.command("describe")
    @click.argument("group_id", metavar="GROUP")
    @click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
    @bootstrap_option
    def group_describe(group_id: str, as_json: bool, bootstrap: str) -> None:
        """GROUP's members and assignments, and per partition the committed offset, end
        offset, lag and owner."""
        connection = client_options()

        async def go() -> GroupDescription:
            async with Admin(bootstrap, **connection) as admin:
                return await admin.describe_group(group_id)

        d = asyncio.run(go())
        if as_json:
            click.echo(json.dumps(describe_json(d), indent=2))
            return
        console = Console()
        console.print(
            f"group {d.group_id}: {d.state}, epoch {d.group_epoch} (assignment "
            f"{d.assignment_epoch}), assignor {d.assignor}, coordinator node "
            f"{d.coordinator_node_id}, {len(d.members)} member"
            + ("" if len(d.members) == 1 else "s")
        )
        if d.members:
            members = Table(title="members", title_justify="left")
            for col in ("member", "instance", "epoch", "host", "subscription", "owned"):
                members.add_column(col)
            for m in d.members:
                sub = (
                    m.subscription if isinstance(m.subscription, str) else ",".join(m.subscription)
                )
                owned = _tps_text(m.owned)
                if set(m.target) != set(m.owned):
                    owned += f" (target {_tps_text(m.target) or 'nothing'})"
                members.add_row(
                    m.member_id,
                    m.group_instance_id or "",
                    str(m.member_epoch),
                    m.client_host,
                    sub,
                    owned,
                )
            console.print(members)
        parts = Table(title="partitions", title_justify="left")
        for col in ("topic", "partition", "committed", "end", "lag"):
            parts.add_column(col, justify="right" if col != "topic" else "left")
        parts.add_column("member")
        for p in d.partitions:
            parts.add_row(
                p.topic,
                str(p.partition),
                "-" if p.committed_offset is None else str(p.committed_offset),
                str(p.end_offset),
                str(p.lag),
                p.member_id or "-",
            )
        console.print(parts)

    @group.command("reset-offsets")
    @click.argument("group_id", metavar="GROUP")
    @click.option("--topic", "topic_spec", required=True, metavar="T[:P,P...]")
    @click.option("--to-earliest", is_flag=True, help="The earliest offset still in the log.")
    @click.option("--to-latest", is_flag=True, help="The end: skip everything there is.")
    @click.option("--to-offset", type=click.IntRange(min=0), default=None, metavar="N")
    @click.option(
        "--to-datetime",
        default=None,
        metavar="TIME",
        help="The first record at or after TIME: ISO 8601 (UTC unless it says) or epoch ms.",
    )
    @click.option("--shift-by", type=int, default=None, metavar="N", help="Committed + N.")
    @click.option("--execute", is_flag=True, help="Apply the plan (default: only print it).")
    @click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
    @bootstrap_option
    def group_reset_offsets(
        group_id: str,
        topic_spec: str,
        to_earliest: bool,
        to_latest: bool,
        to_offset: int | None,
        to_datetime: str | None,
        shift_by: int | None,
        execute: bool,
        as_json: bool,
        bootstrap: str,
    ) -> None:
        """Move GROUP's committed offsets of a topic (refused while the group has members).
        Prints the plan; nothing changes without --execute."""
        chosen = [
            name
            for name, given in (
                ("--to-earliest", to_earliest),
                ("--to-latest", to_latest),
                ("--to-offset", to_offset is not None),
                ("--to-datetime", to_datetime is not None),
                ("--shift-by", shift_by is not None),
            )
            if given
        ]
        if len(chosen) != 1:
            raise click.UsageError(
                "give exactly one of --to-earliest, --to-latest, --to-offset, --to-datetime, "
                "--shift-by" + (f" (got {', '.join(chosen)})" if chosen else "")
            )
        try:
            topic, partitions = parse_topic_partitions(topic_spec)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--topic") from None
        to: ResetTo
        if to_earliest:
            to = ("earliest", 0)
        elif to_latest:
            to = ("latest", 0)
        elif to_offset is not None:
            to = ("offset", to_offset)
        elif shift_by is not None:
            to = ("shift", shift_by)
        else:
            assert to_datetime is not None
            try:
                to = ("datetime", parse_datetime_ms(to_datetime))
            except ValueError as exc:
                raise click.BadParameter(str(exc), param_hint="--to-datetime") from None
        connection = client_options()

        async def go() -> list[OffsetResetPlan]:
            async with Admin(bootstrap, **connection) as admin:
                return await admin.reset_group_offsets(
                    group_id, topic, to, partitions=partitions, execute=execute
                )

        plan = asyncio.run(go())
        if as_json:
            click.echo(
                json.dumps(
                    {
                        "group_id": group_id,
                        "executed": execute,
                        "partitions": [
                            {
                                "topic": p.topic,
                                "partition": p.partition,
                                "current": p.current,
                                "new": p.new,
                            }
                            for p in plan
                        ],
                    },
                    indent=2,
                )
            )
            return
        table = Table()
        for col in ("topic", "partition", "current", "new"):
            table.add_column(col, justify="left" if col == "topic" else "right")
        for p in plan:
            table.add_row(
                p.topic, str(p.partition), "-" if p.current is None else str(p.current), str(p.new)
            )
        Console().print(table)
        if execute:
            click.echo(f"committed the new offsets of group {group_id!r}", err=True)
        else:
            click.echo("dry run: nothing changed (add --execute to apply)", err=True)

    @group.command("delete")
    @click.argument("group_id", metavar="GROUP")
    @bootstrap_option
    def group_delete(group_id: str, bootstrap: str) -> None:
        """Delete GROUP and its committed offsets (refused while it has members)."""
        connection = client_options()

        async def go() -> None:
            async with Admin(bootstrap, **connection) as admin:
                await admin.delete_group(group_id)

        asyncio.run(go())
        click.echo(f"deleted group {group_id!r}", err=True)
