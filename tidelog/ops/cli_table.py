"""``tidelog table``: read the table of a compacted topic (the Table API, client/table.py).

    tidelog table get TOPIC KEY            # the value, or exit 1 "not found"
    tidelog table dump TOPIC [--prefix P] [--json]
    tidelog table watch TOPIC [--json]     # snapshot rows, then every change

Errors are one ``error:`` line and exit 1, as for every verb (tidelog/ops/cli.py's main).
"""

from __future__ import annotations

import asyncio
import base64
import json
import sys
from collections.abc import Callable
from typing import Any

import click

from tidelog.client.table import Row, Table, TableChange

__all__ = ["register"]

#: How long the table verbs wait for a topic to show up in metadata.
METADATA_WAIT_MS = 1_000


def _bytes_fields(obj: dict[str, Any], name: str, data: bytes | None) -> None:
    """A UTF-8 field as a string, else null plus a ``..._base64`` twin (as consume --json)."""
    if data is None:
        obj[name] = None
        return
    try:
        obj[name] = data.decode("utf-8")
    except UnicodeDecodeError:
        obj[name] = None
        obj[f"{name}_base64"] = base64.b64encode(data).decode()


def row_json(r: Row) -> str:
    obj: dict[str, Any] = {
        "partition": r.partition,
        "offset": r.offset,
        "timestamp": r.timestamp_ms,
    }
    _bytes_fields(obj, "key", r.key)
    _bytes_fields(obj, "value", r.value)
    return json.dumps(obj, ensure_ascii=False)


def change_json(c: TableChange) -> str:
    kind = "snapshot" if c.snapshot else ("delete" if c.deleted else "put")
    obj: dict[str, Any] = {
        "kind": kind,
        "partition": c.partition,
        "offset": c.offset,
        "timestamp": c.timestamp_ms,
    }
    _bytes_fields(obj, "key", c.key)
    _bytes_fields(obj, "value", c.value)
    return json.dumps(obj, ensure_ascii=False)


def _key_arg(text: str, base64_key: bool) -> bytes:
    if not base64_key:
        return text.encode()
    try:
        return base64.b64decode(text, validate=True)
    except ValueError:
        raise click.BadParameter(f"{text!r} is not base64", param_hint="KEY") from None


def _write(line: bytes) -> None:
    out = sys.stdout.buffer
    out.write(line + b"\n")


def register(
    cli: click.Group,
    bootstrap_option: Callable[[Callable[..., Any]], Callable[..., Any]],
    client_options: Callable[[], dict[str, Any]],
) -> None:
    """Add the ``table`` group to ``cli``; ``bootstrap_option`` adds --bootstrap and the
    connection options as every client verb has them."""

    @cli.group()
    def table() -> None:
        """Read the table of a compacted topic: the latest value of each key."""

    def open_table(bootstrap: str, topic: str) -> Table:
        return Table(bootstrap, topic, metadata_wait_ms=METADATA_WAIT_MS, **client_options())

    @table.command("get")
    @click.argument("topic_name", metavar="TOPIC")
    @click.argument("key", metavar="KEY")
    @click.option("--base64-key", is_flag=True, help="KEY is base64 (for binary keys).")
    @click.option("--json", "as_json", is_flag=True, help="Print the row as one JSON object.")
    @click.option(
        "--min-offset",
        type=click.IntRange(min=0),
        default=None,
        help="Wait until the table holds the record at this offset of the key's partition.",
    )
    @bootstrap_option
    def table_get(
        topic_name: str,
        key: str,
        base64_key: bool,
        as_json: bool,
        min_offset: int | None,
        bootstrap: str,
    ) -> None:
        """Print the current value of KEY in TOPIC's table; exit 1 when there is none."""
        k = _key_arg(key, base64_key)

        async def go() -> Row | None:
            async with open_table(bootstrap, topic_name) as t:
                return await t.get(k, min_offset=min_offset)

        row = asyncio.run(go())
        if row is None:
            raise click.ClickException(f"key {key!r} is not in the table of {topic_name!r}")
        _write(row_json(row).encode() if as_json else row.value)

    @table.command("dump")
    @click.argument("topic_name", metavar="TOPIC")
    @click.option("--prefix", default=None, help="Only keys starting with this (UTF-8).")
    @click.option("--partition", type=click.IntRange(min=0), default=None, help="One partition.")
    @click.option("--json", "as_json", is_flag=True, help="One JSON object per row.")
    @click.option("--key-separator", default="\t", help="Between key and value (default: tab).")
    @bootstrap_option
    def table_dump(
        topic_name: str,
        prefix: str | None,
        partition: int | None,
        as_json: bool,
        key_separator: str,
        bootstrap: str,
    ) -> None:
        """Print every row of TOPIC's table (KEY SEP VALUE, or --json), partition by
        partition, each in key order and from one consistent snapshot."""
        sep = key_separator.encode()

        async def go() -> None:
            async with open_table(bootstrap, topic_name) as t:
                async for page in t.scan(prefix=prefix, partition=partition):
                    lines = [
                        row_json(r).encode() if as_json else r.key + sep + r.value
                        for r in page.rows
                    ]
                    if lines:
                        sys.stdout.buffer.write(b"\n".join(lines) + b"\n")
                sys.stdout.buffer.flush()

        asyncio.run(go())

    @table.command("watch")
    @click.argument("topic_name", metavar="TOPIC")
    @click.option("--json", "as_json", is_flag=True, help="One JSON object per change.")
    @click.option(
        "--max", "max_changes", type=click.IntRange(min=1), default=None, help="Stop after N."
    )
    @click.option(
        "--timeout-ms",
        type=click.IntRange(min=1),
        default=None,
        help="Stop after this long without a change (default: follow until Ctrl-C).",
    )
    @bootstrap_option
    def table_watch(
        topic_name: str,
        as_json: bool,
        max_changes: int | None,
        timeout_ms: int | None,
        bootstrap: str,
    ) -> None:
        """Print TOPIC's table (its rows as ``snapshot KEY VALUE`` lines), then each change
        as it is committed: ``put KEY VALUE`` or ``delete KEY`` (tab-separated), or --json.
        Ctrl-C stops (exit status 130)."""

        async def go() -> None:
            out = sys.stdout.buffer
            seen = 0
            async with open_table(bootstrap, topic_name) as t:
                async with t.watch() as w:
                    while max_changes is None or seen < max_changes:
                        try:
                            async with asyncio.timeout(
                                None if timeout_ms is None else timeout_ms / 1000
                            ):
                                c = await anext(w)
                        except TimeoutError:
                            return
                        seen += 1
                        if as_json:
                            out.write(change_json(c).encode() + b"\n")
                        elif c.deleted:
                            out.write(b"delete\t" + c.key + b"\n")
                        else:
                            kind = b"snapshot" if c.snapshot else b"put"
                            out.write(kind + b"\t" + c.key + b"\t" + (c.value or b"") + b"\n")
                        out.flush()

        asyncio.run(go())
