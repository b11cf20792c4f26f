"""The ``tidelog`` command: run a node, manage topics, produce, consume, read tables
(cli_table.py) and benchmark.

Every expected failure (a TidelogError from the cluster, a bad option) ends with one line on
stderr, ``error: ...``, and a non-zero exit: 2 for usage mistakes, 1 for everything else. A
traceback means a bug.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import sys
import threading
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NoReturn, TypeVar, cast

import click
import grpc
import grpc.aio
from rich.console import Console
from rich.table import Table

from tidelog.client import Admin, Consumer, Producer, TopicDescription, TopicPartition
from tidelog.client.metadata import parse_bootstrap
from tidelog.client.structs import ConsumerRecord
from tidelog.errors import NodeUnavailable, TidelogError, TopicExists
from tidelog.ops.cli_cluster import GLOBAL_BOOTSTRAP_META
from tidelog.ops.cli_cluster import cluster as cluster_group
from tidelog.ops.cli_cluster import register as register_cluster_commands
from tidelog.ops.cli_connection import client_options, connection_options, note_discovered_cluster
from tidelog.ops.cli_group import add_group_commands
from tidelog.ops.cli_heal import register as register_heal_commands
from tidelog.ops.cli_recover import register as register_recover_commands
from tidelog.ops.cli_table import register as register_table_commands
from tidelog.records import Codec

__all__ = ["cli", "main"]

T = TypeVar("T")

BOOTSTRAP_ENV = "TIDELOG_BOOTSTRAP"
CLUSTER_DIR_ENV = "TIDELOG_CLUSTER_DIR"
BOOTSTRAP_DEFAULT = "127.0.0.1:9092"
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
#: Bytes of stdin read per step of ``tidelog produce``; each step is one send_many call.
STDIN_CHUNK_BYTES = 1024 * 1024
#: send_many calls of ``tidelog produce`` awaiting acknowledgement before reading more.
PRODUCE_CALLS_IN_FLIGHT_MAX = 32
#: How long produce/consume wait for a topic to appear in metadata before "unknown topic".
CLI_METADATA_WAIT_MS = 1_000


class CliError(click.ClickException):
    """A failure the user can act on; printed as one line, exit 1."""

    exit_code = EXIT_ERROR


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _fail(message: str) -> NoReturn:
    raise CliError(message)


def _run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


_BOOTSTRAP_META = GLOBAL_BOOTSTRAP_META
#: Where the bootstrap of this run came from, for error lines ("--bootstrap", ...).
_bootstrap_source: list[str] = []


def _bootstrap_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--bootstrap and the connection options (TLS, credentials: cli_connection.py). Both
    may also come before the verb: ``tidelog -b HOST:PORT topic list``."""
    fn = connection_options(fn)
    return click.option(
        "--bootstrap",
        "-b",
        default=None,
        callback=_check_bootstrap,
        help=_BOOTSTRAP_HELP,
    )(fn)


_BOOTSTRAP_HELP = (
    "host:port of one or more nodes, comma-separated (also before the command). Default: "
    f"${BOOTSTRAP_ENV}, else the running local cluster in ${CLUSTER_DIR_ENV} or "
    f"./.tidelog/cluster (tidelog cluster up), else {BOOTSTRAP_DEFAULT}."
)


def _store_global_bootstrap(
    ctx: click.Context, param: click.Parameter, value: str | None
) -> str | None:
    if value is not None:
        ctx.meta[_BOOTSTRAP_META] = value
    return value


def cluster_dir() -> Path:
    """The local cluster's directory: $TIDELOG_CLUSTER_DIR, else ./.tidelog/cluster."""
    from tidelog.ops.localcluster import CLUSTER_DIR_DEFAULT

    return Path(os.environ.get(CLUSTER_DIR_ENV) or CLUSTER_DIR_DEFAULT)


def resolve_bootstrap(ctx: click.Context, value: str | None) -> tuple[str, str]:
    """The bootstrap of a command and where it came from: the flag after the verb, the flag
    before it, $TIDELOG_BOOTSTRAP, the running local cluster, or the default."""
    if value is not None:
        return value, "--bootstrap"
    if (before := ctx.meta.get(_BOOTSTRAP_META)) is not None:
        return before, "--bootstrap"
    if env := os.environ.get(BOOTSTRAP_ENV, "").strip():
        return env, f"${BOOTSTRAP_ENV}"
    from tidelog.ops.localcluster import discover_bootstrap_in

    directory = cluster_dir()
    found = discover_bootstrap_in(directory)
    if found is not None:
        note_discovered_cluster(ctx, directory)
        return found, f"the local cluster in {directory}"
    return BOOTSTRAP_DEFAULT, "the default (no --bootstrap, no local cluster running)"


def _check_bootstrap(ctx: click.Context, param: click.Parameter, value: str | None) -> str:
    value, source = resolve_bootstrap(ctx, value)
    try:
        parse_bootstrap(value)
    except ValueError as exc:
        raise click.UsageError(f"bootstrap {value!r} from {source} is not valid: {exc}") from None
    _bootstrap_source[:] = [f"{value} from {source}"]
    return value


def _parse_kv(ctx: click.Context, param: click.Parameter, values: Sequence[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r} is not key=value")
        out[key.strip()] = value.strip()
    return out


def _check_codec(ctx: click.Context, param: click.Parameter, value: str) -> str:
    try:
        Codec.parse(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    return value.lower()


ACKS_CHOICE = click.Choice(["all", "1", "0", "-1"])


@click.group(
    context_settings={"help_option_names": ["-h", "--help"]},
    invoke_without_command=True,
    no_args_is_help=True,
)
@click.option(
    "--version",
    "show_version",
    is_flag=True,
    help="Show the version of this tidelog and of the nodes it reaches (see --bootstrap), "
    "and exit.",
)
@click.option(
    "--bootstrap",
    "-b",
    default=None,
    expose_value=False,
    callback=_store_global_bootstrap,
    help=_BOOTSTRAP_HELP,
)
@connection_options
@click.pass_context
def cli(ctx: click.Context, show_version: bool) -> None:
    """tidelog: a replicated log broker in the Kafka family, over gRPC.

    The connection options (--bootstrap, --tls-*, --token-file) go before or after the
    command: ``tidelog -b HOST:PORT topic list``.
    """
    if show_version:
        _print_version(ctx)
    if ctx.invoked_subcommand is None:
        raise click.UsageError("Missing command.", ctx)


def _print_version(ctx: click.Context) -> None:
    """This command's version, then each node's that the bootstrap reaches (none: said so)."""
    import tidelog

    click.echo(
        f"tidelog {tidelog.__version__} (python {sys.version.split()[0]}, grpcio {_grpc_version()})"
    )
    try:
        bootstrap, source = resolve_bootstrap(ctx, None)
        parse_bootstrap(bootstrap)
        versions = _run(_node_versions(bootstrap, client_options(ctx)))
    except (TidelogError, ValueError, click.ClickException) as exc:
        click.echo(f"nodes: none reached at {bootstrap} from {source} ({_one_line(str(exc))})")
    else:
        for node_id, address, version in versions:
            click.echo(f"node {node_id} at {address}: tidelog {version}")
    ctx.exit(0)


#: How long --version waits for each node.
VERSION_PROBE_TIMEOUT_S = 3.0


async def _node_versions(bootstrap: str, connection: dict[str, Any]) -> list[tuple[int, str, str]]:
    """(node id, address, version) of every node the cluster knows, each asked itself."""
    from tidelog.client.connection import Connection
    from tidelog.client.metadata import ClusterMetadata
    from tidelog.v1 import broker_pb2

    meta = ClusterMetadata(bootstrap, connection=Connection.create(**connection))
    try:
        await meta.refresh()
        nodes = sorted(meta.nodes.values(), key=lambda n: n.node_id)

        async def ask(address: str) -> str:
            try:
                resp = await meta.broker(address).Metadata(
                    broker_pb2.MetadataRequest(), timeout=VERSION_PROBE_TIMEOUT_S
                )
            except grpc.aio.AioRpcError as exc:
                return f"unknown (no answer: {_one_line(exc.details() or str(exc.code()))[:80]})"
            return str(resp.server_version) or "unknown (older node)"

        found = await asyncio.gather(*(ask(n.address) for n in nodes))
        return [(n.node_id, n.address, v) for n, v in zip(nodes, found, strict=True)]
    finally:
        await meta.close()


def _grpc_version() -> str:
    import grpc

    return str(getattr(grpc, "__version__", "unknown"))


# ---------------------------------------------------------------------------------------------
# node


@cli.group()
def node() -> None:
    """Run a broker node."""


def _node_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The node's flags as click options, from the one table in node/settings.py. None is
    required and none has a default here: a flag left out is None, and the environment, the
    --config file or the default fills it (node/settings.py resolve)."""
    from tidelog.node.settings import NODE_FLAGS, help_text

    for flag in reversed(NODE_FLAGS):
        if flag.kind == "bool":
            fn = click.option(
                flag.name, flag.dest, is_flag=True, default=None, help=help_text(flag)
            )(fn)
            continue
        kind: Any = None  # a click.ParamType; None: text
        if flag.choices:
            kind = click.Choice(list(flag.choices))
        elif flag.kind == "int":
            kind = click.IntRange(min=flag.min, max=flag.max)
        elif flag.kind == "path":
            kind = click.Path(file_okay=False, path_type=Path)
        elif flag.kind == "file":
            kind = click.Path(dir_okay=False, path_type=Path)
        fn = click.option(
            flag.name,
            flag.dest,
            type=kind,
            default=None,
            metavar=flag.metavar,
            help=help_text(flag),
        )(fn)
    return fn


def _resolve_node(values: dict[str, Any]) -> Any:
    import os

    from tidelog.node.settings import resolve

    try:
        return resolve(values, os.environ)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None


@node.command("start")
@_node_options
def node_start(**values: Any) -> None:
    """Run one node in the foreground until SIGTERM or Ctrl-C.

    Settings come from flags, then TIDELOG_NODE_* variables, then --config FILE (TOML), then
    the defaults; `tidelog node config --print` shows the result."""
    from tidelog.node.main import node_flags, run_flags  # node dependencies load only here

    resolved = _resolve_node(values)
    try:
        flags, settings = node_flags(resolved.values)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    run_flags(flags, settings)


@node.command("config")
@click.option("--print", "print_", is_flag=True, help="Print the effective settings.")
@_node_options
def node_config(print_: bool, **values: Any) -> None:
    """Check the node's settings (the same flags, variables and file as `node start`) and,
    with --print, show each effective value and where it came from, as a TOML file."""
    from tidelog.node.main import node_flags

    resolved = _resolve_node(values)
    try:
        node_flags(resolved.values)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    if print_:
        click.echo(resolved.render(), nl=False)
    else:
        click.echo("settings are valid (--print shows them)")


# ---------------------------------------------------------------------------------------------
# topic


@cli.group()
def topic() -> None:
    """Create, list, describe, reconfigure and delete topics."""


@topic.command("create")
@click.argument("name")
@click.option("--partitions", "-p", type=int, default=1, show_default=True)
@click.option(
    "--replication-factor",
    "-r",
    type=int,
    default=None,
    help="Replicas per partition. Default: the cluster's, 3 (or every node alive when fewer).",
)
@click.option(
    "--config",
    "-c",
    "configs",
    multiple=True,
    callback=_parse_kv,
    metavar="KEY=VALUE",
    help="Topic config override (repeatable), e.g. retention.ms=3600000.",
)
@click.option("--if-not-exists", is_flag=True, help="An existing topic is not an error.")
@click.option(
    "--dry-run", is_flag=True, help="Have the cluster validate the request; create nothing."
)
@_bootstrap_option
def topic_create(
    name: str,
    partitions: int,
    replication_factor: int | None,
    configs: dict[str, str],
    if_not_exists: bool,
    dry_run: bool,
    bootstrap: str,
) -> None:
    """Create topic NAME."""
    # Counts are checked here, before any round trip.
    if partitions < 1:
        _fail(f"--partitions must be at least 1 (got {partitions})")
    if replication_factor is not None and replication_factor < 1:
        _fail(f"--replication-factor must be at least 1 (got {replication_factor})")

    connection = client_options()

    async def go() -> tuple[bool, int]:
        async with Admin(bootstrap, **connection) as admin:
            rf = replication_factor
            if rf is None:
                view = await admin.metadata()
                rf = max(1, min(3, sum(1 for n in view.nodes if n.alive)))
            try:
                await admin.create_topics(name, partitions, rf, configs, validate_only=dry_run)
            except TopicExists:
                if not if_not_exists:
                    raise
                return False, rf
            return True, rf

    created, rf = _run(go())
    if not created:
        click.echo(f"topic {name} already exists")
    elif dry_run:
        click.echo(
            f"dry run: topic {name} with {partitions} partition(s), replication factor {rf} "
            "would be created"
        )
    else:
        click.echo(f"created topic {name} with {partitions} partition(s), replication factor {rf}")


def _describe_json(d: TopicDescription) -> dict[str, Any]:
    return {
        "name": d.name,
        "replication_factor": d.replication_factor,
        "configs": d.configs,
        "overrides": list(d.overrides),
        "config_sources": {k: "set" if k in d.overrides else "default" for k in d.configs},
        "partitions": [
            {
                "partition": p.partition,
                "leader": p.leader,
                "leader_epoch": p.leader_term,
                "replicas": list(p.replicas),
                "in_sync": list(p.in_sync),
                "log_start_offset": p.log_start_offset,
                "high_watermark": p.high_watermark,
                "size_bytes": p.size_bytes,
                "target": list(p.target),
                "moving": {
                    str(n): {"copied": c, "left": left} for n, (c, left) in sorted(p.moving.items())
                },
                "stalled": p.stalled,
            }
            for p in d.partitions
        ],
    }


@topic.command("list")
@click.option("--internal", is_flag=True, help="Include internal topics.")
@click.option("--long", "-l", "long_", is_flag=True, help="A table even when piped.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON: as `topic describe --json`.")
@_bootstrap_option
def topic_list(internal: bool, long_: bool, as_json: bool, bootstrap: str) -> None:
    """Topics with partitions, replication factor and config overrides (a table on a
    terminal or with --long; one name per line when piped, for scripts)."""

    connection = client_options()
    table_out = long_ or sys.stdout.isatty()

    async def go() -> tuple[list[str], list[TopicDescription]]:
        async with Admin(bootstrap, **connection) as admin:
            names = await admin.list_topics(internal=internal)
            if not (as_json or table_out) or not names:
                return names, []
            return names, await admin.describe_topics(names)

    names, descs = _run(go())
    if as_json:
        click.echo(json.dumps([_describe_json(d) for d in descs], indent=2))
        return
    if not table_out:
        for name in names:
            click.echo(name)
        return
    table = Table()
    for col in ("name", "partitions", "replication", "overrides"):
        table.add_column(col)
    for d in descs:
        overrides = ", ".join(f"{k}={d.configs.get(k, '')}" for k in d.overrides)
        table.add_row(d.name, str(len(d.partitions)), str(d.replication_factor), overrides)
    Console().print(table)


@topic.command("describe")
@click.argument("names", nargs=-1)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
@_bootstrap_option
def topic_describe(names: tuple[str, ...], as_json: bool, bootstrap: str) -> None:
    """Partitions, leaders, offsets, sizes and configs of NAMES (default: every topic)."""

    connection = client_options()

    async def go() -> Any:
        async with Admin(bootstrap, **connection) as admin:
            return await admin.describe_topics(list(names) or None)

    descs = _run(go())
    if as_json:
        out = [_describe_json(d) for d in descs]
        click.echo(json.dumps(out, indent=2))
        return
    console = Console()
    for d in descs:
        table = Table(
            title=f"{d.name}  (replication factor {d.replication_factor})", title_justify="left"
        )
        for col in ("partition", "leader", "replicas", "in sync", "start", "high watermark"):
            table.add_column(col, justify="right")
        table.add_column("size", justify="right")
        for p in d.partitions:
            table.add_row(
                str(p.partition),
                str(p.leader),
                ",".join(map(str, p.replicas)),
                ",".join(map(str, p.in_sync)),
                str(p.log_start_offset),
                str(p.high_watermark),
                _human_bytes(p.size_bytes),
            )
        console.print(table)
        for p in d.partitions:
            if not p.target:
                continue
            line = f"moving {d.name}/{p.partition}: {_ids(p.replicas)} -> {_ids(p.target)}"
            for n, (copied, left) in sorted(p.moving.items()):
                line += f"; node {n}: {copied} bytes copied, {left} bytes left"
            if p.stalled:
                line += f"; stalled: {p.stalled}"
            console.print(line)
        if d.overrides:
            console.print(
                "overrides: " + ", ".join(f"{k}={d.configs.get(k, '')}" for k in d.overrides)
            )
        configs = Table(title="configs", title_justify="left")
        for col in ("config", "value", "source"):
            configs.add_column(col)
        for key in sorted(d.configs):
            configs.add_row(key, d.configs[key], "set" if key in d.overrides else "default")
        console.print(configs)


def _ids(ids: Sequence[int]) -> str:
    return ",".join(map(str, ids))


def _human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


@topic.command("delete")
@click.argument("names", nargs=-1, required=True)
@_bootstrap_option
def topic_delete(names: tuple[str, ...], bootstrap: str) -> None:
    """Delete topics NAMES and all their records."""

    connection = client_options()

    async def go() -> list[str]:
        async with Admin(bootstrap, **connection) as admin:
            return await admin.delete_topics(list(names))

    for name in _run(go()):
        click.echo(f"deleted topic {name}")


@topic.command("add-partitions")
@click.argument("name")
@click.option(
    "--to",
    "to",
    type=click.IntRange(min=1),
    default=None,
    help="The partition count wanted (Kafka's --partitions).",
)
@click.option(
    "--add",
    "-n",
    "add",
    type=click.IntRange(min=1),
    default=None,
    help="How many partitions to add (rpk's -n).",
)
@click.option("--dry-run", is_flag=True, help="Check and print the plan, change nothing.")
@_bootstrap_option
def topic_add_partitions(
    name: str, to: int | None, add: int | None, dry_run: bool, bootstrap: str
) -> None:
    """Grow topic NAME: --to N partitions in all, or --add N more. Records already stored
    stay in their partitions, so a key may map to another partition from now on."""
    if (to is None) == (add is None):
        raise click.UsageError("give exactly one of --to N (the count in the end) or --add N")
    connection = client_options()

    async def go() -> tuple[int, int]:
        async with Admin(bootstrap, **connection) as admin:
            (desc,) = await admin.describe_topics(name)
            have = len(desc.partitions)
            total = to if to is not None else have + (add or 0)
            if total <= have:
                raise click.UsageError(
                    f"topic {name} has {have} partitions already; --to must be above {have}"
                )
            after = await admin.create_partitions(name, total, validate_only=dry_run)
            return have, len(after.partitions) if not dry_run else total

    have, total = _run(go())
    verb = "would grow" if dry_run else "grew"
    click.echo(f"{verb} topic {name} from {have} to {total} partitions")


@topic.command("alter")
@click.argument("name")
@click.option(
    "--set",
    "set_",
    multiple=True,
    callback=_parse_kv,
    metavar="KEY=VALUE",
    help="Config override to set (repeatable).",
)
@click.option("--delete", multiple=True, metavar="KEY", help="Override to remove (repeatable).")
@_bootstrap_option
def topic_alter(name: str, set_: dict[str, str], delete: tuple[str, ...], bootstrap: str) -> None:
    """Change topic NAME's config overrides."""
    if not set_ and not delete:
        raise click.UsageError("nothing to change: give --set KEY=VALUE and/or --delete KEY")

    connection = client_options()

    async def go() -> Any:
        async with Admin(bootstrap, **connection) as admin:
            return await admin.alter_topic_config(name, set=set_, delete=list(delete))

    desc = _run(go())
    overrides = ", ".join(f"{k}={desc.configs.get(k, '')}" for k in desc.overrides) or "none"
    click.echo(f"altered topic {name}; overrides now: {overrides}")


# ---------------------------------------------------------------------------------------------
# produce


@cli.command()
@click.argument("topic_name", metavar="TOPIC")
@click.option(
    "--key-separator",
    default=None,
    help="Split each line at the first SEP into key and value (lines without it fail).",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["line", "json"]),
    default="line",
    show_default=True,
    help="line: each line is a value (or KEY SEP VALUE); json: each line is an object as "
    "`consume --format json` prints: key, value (null: a tombstone), key_base64, value_base64, "
    "headers [{key, value}], partition.",
)
@click.option(
    "--header",
    "-H",
    "headers",
    multiple=True,
    metavar="KEY=VALUE",
    help="A header on every record (repeatable; a key may repeat).",
)
@click.option(
    "--empty-as-null",
    "-Z",
    is_flag=True,
    help="Send an empty value as null (a tombstone, for compacted topics), as kcat -Z.",
)
@click.option("--partition", type=click.IntRange(min=0), default=None, help="Send all here.")
@click.option("--acks", type=ACKS_CHOICE, default="all", show_default=True)
@click.option("--compression", default="none", show_default=True, callback=_check_codec)
@click.option("--linger-ms", type=click.FloatRange(min=0), default=5, show_default=True)
@_bootstrap_option
def produce(
    topic_name: str,
    key_separator: str | None,
    fmt: str,
    headers: tuple[str, ...],
    empty_as_null: bool,
    partition: int | None,
    acks: str,
    compression: str,
    linger_ms: float,
    bootstrap: str,
) -> None:
    """Send each line of stdin as one record to TOPIC."""
    if key_separator == "":
        raise click.BadParameter("must not be empty", param_hint="--key-separator")
    if fmt == "json" and key_separator is not None:
        raise click.UsageError("--key-separator is for --format line; json lines carry a key")
    parsed_headers: list[tuple[str, bytes | None]] = []
    for item in headers:
        k, found, v = item.partition("=")
        if not found or not k:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="--header")
        parsed_headers.append((k, v.encode()))
    sep = None if key_separator is None else key_separator.encode()
    options = _ProduceInput(sep, fmt == "json", parsed_headers, empty_as_null, partition)
    count = _run(
        _produce_stdin(bootstrap, topic_name, options, partition, acks, compression, linger_ms)
    )
    if sys.stderr.isatty():
        click.echo(f"produced {count} records to {topic_name}", err=True)


@dataclass(frozen=True, slots=True)
class _ProduceInput:
    sep: bytes | None
    json: bool
    headers: list[tuple[str, bytes | None]]
    empty_as_null: bool
    partition: int | None

    @property
    def simple(self) -> bool:
        """Plain values (and keys): the send_many fast path."""
        return not (self.json or self.headers or self.empty_as_null)


class _BadLine(Exception):
    def __init__(self, index: int, message: str) -> None:
        super().__init__(message)
        self.index = index


#: One parsed input line: value, key, headers, partition.
_Rec = tuple[bytes | None, bytes | None, list[tuple[str, bytes | None]], int | None]


def _field_bytes(obj: dict[str, Any], name: str) -> bytes | None:
    b64 = obj.get(f"{name}_base64")
    if b64 is not None:
        if not isinstance(b64, str):
            raise ValueError(f"{name}_base64 is not a string")
        return base64.b64decode(b64, validate=True)
    text = obj.get(name)
    if text is None:
        return None
    if not isinstance(text, str):
        return json.dumps(text, ensure_ascii=False).encode()  # a JSON value sent as its text
    return text.encode()


def _parse_json_line(line: bytes, inp: _ProduceInput) -> _Rec:
    obj = json.loads(line)
    if not isinstance(obj, dict):
        raise ValueError("not a JSON object")
    headers = list(inp.headers)
    raw = obj.get("headers") or []
    if isinstance(raw, dict):
        raw = [{"key": k, "value": v} for k, v in raw.items()]
    if not isinstance(raw, list):
        raise ValueError("headers is neither a list nor an object")
    for h in raw:
        if not isinstance(h, dict) or not isinstance(h.get("key"), str):
            raise ValueError("a header is not {key, value}")
        headers.append((h["key"], _field_bytes(h, "value")))
    part = obj.get("partition", inp.partition)
    if part is not None and (not isinstance(part, int) or part < 0):
        raise ValueError(f"partition {part!r} is not a partition number")
    if inp.partition is not None:
        part = inp.partition
    value = _field_bytes(obj, "value")
    if inp.empty_as_null and value == b"":
        value = None
    return value, _field_bytes(obj, "key"), headers, part


def _parse_lines(lines: list[bytes], inp: _ProduceInput) -> list[_Rec]:
    out: list[_Rec] = []
    for i, ln in enumerate(lines):
        if ln.endswith(b"\r"):
            ln = ln[:-1]
        if inp.json:
            if not ln.strip():
                continue
            try:
                out.append(_parse_json_line(ln, inp))
            except (ValueError, TypeError) as exc:
                raise _BadLine(i, f"is not a record in JSON ({exc})") from None
            continue
        key: bytes | None = None
        value: bytes | None = ln
        if inp.sep is not None:
            k, found, v = ln.partition(inp.sep)
            if not found:
                raise _BadLine(
                    i,
                    f"has no key separator {inp.sep.decode()!r}: "
                    f"{ln[:60].decode(errors='replace')!r}",
                )
            key, value = k, v
        if inp.empty_as_null and value == b"":
            value = None
        out.append((value, key, inp.headers, inp.partition))
    return out


async def _produce_stdin(
    bootstrap: str,
    topic_name: str,
    inp: _ProduceInput,
    partition: int | None,
    acks: str,
    compression: str,
    linger_ms: float,
) -> int:
    chunks = _StdinChunks(sys.stdin.fileno(), asyncio.get_running_loop())
    async with Producer(
        bootstrap,
        acks=acks,
        compression=compression,
        linger_ms=linger_ms,
        metadata_wait_ms=CLI_METADATA_WAIT_MS,
        **client_options(),
    ) as producer:
        partitions = len(await producer.partitions_for(topic_name))
        if partition is not None and partition >= partitions:
            _fail(
                f"topic {topic_name!r} has partitions 0..{partitions - 1}; "
                f"there is no partition {partition}"
            )
        #: sends awaiting acknowledgement, with the input lines they hold.
        window: deque[tuple[Awaitable[Any], int, int]] = deque()
        failures: list[tuple[int, int, TidelogError]] = []
        pending = b""
        line_no = 0
        count = 0
        eof = False
        bad: tuple[int, str] | None = None
        while not eof and bad is None:
            data = await chunks.next()
            if not data:
                eof = True
                lines = [pending] if pending else []
            else:
                lines = (pending + data).split(b"\n")
                pending = lines.pop()
            if not lines:
                continue
            first_line = line_no + 1
            line_no += len(lines)
            try:
                recs = _parse_lines(lines, inp)
            except _BadLine as exc:
                bad = (first_line + exc.index, str(exc))
                recs = _parse_lines(lines[: exc.index], inp)  # the lines before it still go
                line_no = first_line + exc.index - 1
            if not recs:
                continue
            if inp.simple:
                values = cast("list[bytes]", [r[0] for r in recs])
                keys = None if inp.sep is None else [r[1] for r in recs]
                window.append(
                    (
                        producer.send_many(topic_name, values, keys, partition=partition),
                        first_line,
                        line_no,
                    )
                )
            else:
                try:
                    futures = [
                        producer.send(topic_name, v, k, partition=p, headers=h or None)
                        for v, k, h, p in recs
                    ]
                except TidelogError as exc:
                    failures.append((first_line, line_no, exc))
                    break
                window.append((asyncio.gather(*futures), first_line, line_no))
            count += len(recs)
            while len(window) > PRODUCE_CALLS_IN_FLIGHT_MAX:
                await _settle(window.popleft(), failures)
        while window:
            await _settle(window.popleft(), failures)
        await producer.flush()
    if bad is not None:
        text = f"line {bad[0]} {bad[1]}; the {count} record(s) before it were sent"
        if failures:
            text += f", but {_failures_line(failures)}"
        _fail(text + ", nothing from it on")
    if failures:
        _fail(_failures_line(failures))
    return count


async def _settle(
    sent: tuple[Awaitable[Any], int, int], failures: list[tuple[int, int, TidelogError]]
) -> None:
    """Await one send_many call; a failure is kept (the lines still go on) and reported
    once the input is done."""
    future, first_line, last_line = sent
    try:
        await future
    except TidelogError as exc:
        failures.append((first_line, last_line, exc))


def _lines(first: int, last: int) -> str:
    return f"line {first}" if first == last else f"lines {first}-{last}"


def _failures_line(failures: list[tuple[int, int, TidelogError]]) -> str:
    """One line for every record that was not written: the first failure and how many more."""
    first, last, exc = failures[0]
    text = f"not every record of {_lines(first, last)} was written: {exc}"
    if len(failures) > 1:
        end = failures[-1][1]
        text += f" (and {len(failures) - 1} more failed send(s), up to line {end})"
    return text


class _StdinChunks:
    """Stdin read by a daemon thread, handed to the event loop chunk by chunk.

    ``os.read`` returns what is available, so typed lines go out as typed and piped input in
    large chunks, while the sender keeps running. A daemon thread rather than an executor:
    on Ctrl-C nothing waits for a read blocked on the terminal.
    """

    def __init__(self, fd: int, loop: asyncio.AbstractEventLoop) -> None:
        self._queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=2)
        self._loop = loop
        self._fd = fd
        threading.Thread(target=self._read, name="stdin", daemon=True).start()

    def _read(self) -> None:
        while True:
            try:
                data = os.read(self._fd, STDIN_CHUNK_BYTES)
            except OSError:
                data = b""
            try:
                asyncio.run_coroutine_threadsafe(self._queue.put(data), self._loop).result()
            except RuntimeError:  # the loop is gone
                return
            if not data:
                return

    async def next(self) -> bytes:
        """The next chunk; b"" at the end of input."""
        return await self._queue.get()


# ---------------------------------------------------------------------------------------------
# consume


@cli.command()
@click.argument("topic_name", metavar="TOPIC", required=False)
@click.option("--from-beginning", is_flag=True, help="Start at the earliest offset.")
@click.option(
    "--partition",
    "partitions",
    type=click.IntRange(min=0),
    multiple=True,
    help="Read only this partition (repeatable; default: all).",
)
@click.option(
    "--offset",
    default=None,
    metavar="SPEC",
    help="Where to start: start, end, N (an offset), -N (the last N records), "
    "@TIMESTAMP_MS (the first record at or after it), or P:SPEC[,P:SPEC...] per partition "
    "(reads just those partitions unless --partition is given). Default: end.",
)
@click.option(
    "--until-end",
    is_flag=True,
    help="Exit once every partition read is at its end (kcat -e); a short or empty "
    "partition is not an error.",
)
@click.option("--max", "max_records", type=click.IntRange(min=1), default=None)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["value", "kv", "json"]),
    default="value",
    show_default=True,
    help="value: one value per line; kv: key SEP value; json: one object per line.",
)
@click.option("--key-separator", default="\t", help="Separator of --format kv (default: tab).")
@click.option(
    "--timeout-ms",
    type=click.IntRange(min=1),
    default=None,
    help="Stop after this long without a record (default: follow until Ctrl-C).",
)
@click.option(
    "--group",
    "group_id",
    default=None,
    metavar="GROUP",
    help="Read as a member of GROUP: its coordinator assigns the partitions, reading starts "
    "at the group's committed offsets (--from-beginning / --offset start|end where there is "
    "none) and the offsets are committed as records are printed and on exit.",
)
@click.option(
    "--pattern",
    default=None,
    metavar="REGEX",
    help="With --group: subscribe to every topic whose name matches REGEX (instead of TOPIC).",
)
@click.option(
    "--instance-id",
    default=None,
    metavar="ID",
    help="With --group: a static member id (a restart within the session keeps the partitions).",
)
@_bootstrap_option
def consume(
    topic_name: str | None,
    from_beginning: bool,
    partitions: tuple[int, ...],
    offset: str | None,
    until_end: bool,
    max_records: int | None,
    fmt: str,
    key_separator: str,
    timeout_ms: int | None,
    group_id: str | None,
    pattern: str | None,
    instance_id: str | None,
    bootstrap: str,
) -> None:
    """Print TOPIC's records, one per line, from the end (or --from-beginning / --offset),
    or as a member of --group. Ctrl-C stops following (exit status 130, as every command)."""
    if from_beginning and offset is not None:
        raise click.UsageError("give --from-beginning or --offset, not both")
    try:
        spec = parse_offset_spec("start" if from_beginning else (offset or "end"))
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--offset") from None
    if group_id is None:
        if pattern is not None or instance_id is not None:
            raise click.UsageError("--pattern and --instance-id need --group")
        if topic_name is None:
            raise click.UsageError("give a TOPIC to read (or --group GROUP with --pattern)")
    else:
        if (topic_name is None) == (pattern is None):
            raise click.UsageError("with --group give a TOPIC or --pattern REGEX, not both")
        if partitions:
            raise click.UsageError("--partition does not go with --group: the group assigns")
        if spec not in (("start", 0), ("end", 0)):
            raise click.UsageError(
                "with --group, --offset may only be start or end (where nothing is committed); "
                "move a group's offsets with `tidelog group reset-offsets`"
            )
        _run(
            _consume_group(
                bootstrap,
                group_id,
                topic_name,
                pattern,
                instance_id,
                "earliest" if spec == ("start", 0) else "latest",
                until_end,
                max_records,
                fmt,
                key_separator.encode(),
                timeout_ms,
            )
        )
        return
    assert topic_name is not None
    _run(
        _consume(
            bootstrap,
            topic_name,
            spec,
            partitions,
            until_end,
            max_records,
            fmt,
            key_separator.encode(),
            timeout_ms,
        )
    )


#: One start position: ("start", 0), ("end", 0), ("offset", N), ("last", N), ("time", ms).
StartAt = tuple[str, int]


def _parse_one_offset(text: str) -> StartAt:
    t = text.strip().lower()
    if t in ("start", "beginning", "earliest"):
        return ("start", 0)
    if t in ("end", "latest"):
        return ("end", 0)
    try:
        if t.startswith("@"):
            return ("time", int(t[1:]))
        if t.startswith("-"):
            n = int(t[1:])
            if n < 0:
                raise ValueError
            return ("last", n)
        n = int(t)
    except ValueError:
        raise ValueError(f"{text!r} is not start, end, an offset N, -N or @TIMESTAMP_MS") from None
    if n < 0:
        raise ValueError(f"offset {n} is negative")
    return ("offset", n)


def parse_offset_spec(text: str) -> StartAt | dict[int, StartAt]:
    """--offset: one position for every partition, or ``P:SPEC,...`` per partition."""
    if ":" not in text:
        return _parse_one_offset(text)
    out: dict[int, StartAt] = {}
    for part in text.split(","):
        p, sep, rest = part.partition(":")
        if not sep:
            raise ValueError(f"{part!r} is not P:SPEC (give every partition its own P:)")
        try:
            pnum = int(p)
        except ValueError:
            raise ValueError(f"{p!r} in {part!r} is not a partition number") from None
        if pnum < 0:
            raise ValueError(f"partition {pnum} is negative")
        out[pnum] = _parse_one_offset(rest)
    return out


def _text(data: bytes | None) -> str | None:
    return None if data is None else data.decode("utf-8", errors="replace")


def _json_line(r: ConsumerRecord) -> bytes:
    """One record as JSON: text fields as strings, and a field that is not UTF-8 as null
    plus a ``..._base64`` twin; headers as a list, so a repeated key keeps every value."""
    obj: dict[str, Any] = {
        "topic": r.topic,
        "partition": r.partition,
        "offset": r.offset,
        "timestamp": r.timestamp_ms,
    }
    _put_bytes(obj, "key", r.key)
    _put_bytes(obj, "value", r.value)
    if r.headers:
        headers = []
        for k, v in r.headers:
            h: dict[str, Any] = {"key": k}
            _put_bytes(h, "value", v)
            headers.append(h)
        obj["headers"] = headers
    return json.dumps(obj, ensure_ascii=False).encode()


def _put_bytes(obj: dict[str, Any], name: str, data: bytes | None) -> None:
    if data is None or _is_utf8(data):
        obj[name] = _text(data)
    else:
        obj[name] = None
        obj[f"{name}_base64"] = base64.b64encode(data).decode()


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


async def _consume(
    bootstrap: str,
    topic_name: str,
    spec: StartAt | dict[int, StartAt],
    partitions: tuple[int, ...],
    until_end: bool,
    max_records: int | None,
    fmt: str,
    key_sep: bytes,
    timeout_ms: int | None,
) -> None:
    out = sys.stdout.buffer
    async with Consumer(
        bootstrap, metadata_wait_ms=CLI_METADATA_WAIT_MS, **client_options()
    ) as consumer:
        every = await consumer.partitions_for(topic_name)
        count = len(every)
        wanted = partitions or (tuple(spec) if isinstance(spec, dict) else ())
        if wanted:
            missing = [p for p in wanted if p >= count]
            if missing:
                _fail(
                    f"topic {topic_name!r} has partitions 0..{count - 1}; "
                    f"there is no partition {missing[0]}"
                )
            tps = [TopicPartition(topic_name, p) for p in dict.fromkeys(wanted)]
        else:
            tps = every
        consumer.assign(tps)
        await _seek_all(consumer, tps, spec)
        seen = 0
        idle_ms = timeout_ms if timeout_ms is not None else 1000
        while max_records is None or seen < max_records:
            want = 10_000 if max_records is None else min(10_000, max_records - seen)
            records = await consumer.poll(timeout_ms=idle_ms, max_records=want, until_end=until_end)
            if not records:
                if timeout_ms is not None or (until_end and consumer.at_end()):
                    return
                continue
            seen += len(records)
            _write_records(out, records, fmt, key_sep)


def _write_records(out: Any, records: list[ConsumerRecord], fmt: str, key_sep: bytes) -> None:
    if fmt == "value":
        lines = [r.value or b"" for r in records]
    elif fmt == "kv":
        lines = [(r.key or b"") + key_sep + (r.value or b"") for r in records]
    else:
        lines = [_json_line(r) for r in records]
    out.write(b"\n".join(lines) + b"\n")
    out.flush()


async def _consume_group(
    bootstrap: str,
    group_id: str,
    topic_name: str | None,
    pattern: str | None,
    instance_id: str | None,
    reset: Literal["earliest", "latest"],
    until_end: bool,
    max_records: int | None,
    fmt: str,
    key_sep: bytes,
    timeout_ms: int | None,
) -> None:
    """``consume --group``: the group assigns; positions are committed every few seconds
    (auto-commit, at the next poll: after the records were printed) and on exit."""
    out = sys.stdout.buffer
    async with Consumer(
        bootstrap,
        group_id=group_id,
        group_instance_id=instance_id,
        auto_offset_reset=reset,
        metadata_wait_ms=CLI_METADATA_WAIT_MS,
        **client_options(),
    ) as consumer:
        if pattern is not None:
            consumer.subscribe(pattern=pattern)
        else:
            assert topic_name is not None
            await consumer.partitions_for(topic_name)  # an unknown topic: one line
            consumer.subscribe([topic_name])
        seen = 0
        idle_ms = timeout_ms if timeout_ms is not None else 1000
        while max_records is None or seen < max_records:
            want = 10_000 if max_records is None else min(10_000, max_records - seen)
            records = await consumer.poll(
                timeout_ms=idle_ms,
                max_records=want,
                until_end=until_end and consumer.has_assignment,
            )
            if not records:
                if timeout_ms is not None:
                    return
                if until_end and consumer.has_assignment and consumer.at_end():
                    return
                continue
            seen += len(records)
            _write_records(out, records, fmt, key_sep)


async def _seek_all(
    consumer: Consumer, tps: list[TopicPartition], spec: StartAt | dict[int, StartAt]
) -> None:
    """Position every partition by --offset; ``-N`` on a partition shorter than N starts at
    its beginning."""
    by_tp = {
        tp: spec.get(tp.partition, ("end", 0)) if isinstance(spec, dict) else spec for tp in tps
    }
    kinds = {kind for kind, _ in by_tp.values()}
    starts = await consumer.beginning_offsets(tps) if kinds & {"start", "last"} else {}
    ends = await consumer.end_offsets(tps) if kinds & {"end", "last"} else {}
    for tp, (kind, n) in by_tp.items():
        if kind == "start":
            consumer.seek(tp, starts[tp])
        elif kind == "end":
            consumer.seek(tp, ends[tp])
        elif kind == "last":
            consumer.seek(tp, max(starts[tp], ends[tp] - n))
        elif kind == "offset":
            consumer.seek(tp, n)
        else:
            await consumer.seek_to_time(n, tp)


# ---------------------------------------------------------------------------------------------
# bench


@cli.group()
def bench() -> None:
    """Measure throughput, latency and CPU cost against a running cluster."""


#: The benches' --replication-factor when they create the topic.
RF_HELP = (
    "Replicas per partition when the bench creates the topic. Default: the cluster's "
    "(3, or every node alive when fewer), as topic create."
)


def _bench_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    opts: list[Callable[[Callable[..., Any]], Callable[..., Any]]] = [
        click.option("--topic", default="bench", show_default=True),
        click.option("--records", type=click.IntRange(min=1), default=1_000_000, show_default=True),
        click.option("--record-bytes", type=click.IntRange(min=0), default=100, show_default=True),
        click.option("--acks", type=ACKS_CHOICE, default="all", show_default=True),
        click.option(
            "--partitions",
            type=click.IntRange(min=1),
            default=1,
            show_default=True,
            help="Partitions of the topic when the bench creates it.",
        ),
        click.option(
            "--replication-factor",
            type=click.IntRange(min=1),
            default=None,
            help=RF_HELP,
        ),
        click.option("--compression", default="none", show_default=True, callback=_check_codec),
        click.option("--json", "as_json", is_flag=True, help="Print one JSON object."),
        _bootstrap_option,
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


@bench.command("produce")
@_bench_options
@click.option(
    "--batch-bytes", type=click.IntRange(min=1024), default=1024 * 1024, show_default=True
)
@click.option("--linger-ms", type=click.FloatRange(min=0), default=5, show_default=True)
@click.option(
    "--idempotence/--no-idempotence",
    default=None,
    help="The idempotent producer (the client's default: on unless --acks is not all) or "
    "one without idempotence. The summary and the JSON say which ran.",
)
@click.option(
    "--max-in-flight",
    type=click.IntRange(min=1),
    default=None,
    help="Produce requests in flight per partition. Default 5 (the idempotent producer's "
    "limit), with or without idempotence, so the two modes compare like for like.",
)
@click.option(
    "--keys",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Key the records key-0 .. key-N-1 in turn (0: no keys). A compacted topic needs keys.",
)
@click.option(
    "--topic-config",
    "-c",
    "topic_configs",
    multiple=True,
    metavar="KEY=VALUE",
    help="A config of the topic when the bench creates it (repeatable), for example "
    "cleanup.policy=compact.",
)
def bench_produce(
    topic: str,
    records: int,
    record_bytes: int,
    acks: str,
    partitions: int,
    replication_factor: int | None,
    compression: str,
    as_json: bool,
    bootstrap: str,
    batch_bytes: int,
    linger_ms: float,
    idempotence: bool | None,
    max_in_flight: int | None,
    keys: int,
    topic_configs: tuple[str, ...],
) -> None:
    """Produce --records records of --record-bytes of random hex text, as fast as possible."""
    from tidelog.ops.bench import BENCH_IN_FLIGHT_DEFAULT, produce_bench

    configs: dict[str, str] = {}
    for item in topic_configs:
        k, found, v = item.partition("=")
        if not found or not k:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="--topic-config")
        configs[k] = v

    if max_in_flight is None:
        max_in_flight = BENCH_IN_FLIGHT_DEFAULT
    if idempotence and acks not in ("all", "-1"):
        raise click.UsageError(f"--idempotence needs --acks all (got --acks {acks})")
    if idempotence and max_in_flight > BENCH_IN_FLIGHT_DEFAULT:
        raise click.UsageError(
            f"--idempotence allows at most {BENCH_IN_FLIGHT_DEFAULT} requests in flight per "
            f"partition (got --max-in-flight {max_in_flight}); or give --no-idempotence"
        )
    result = _run(
        produce_bench(
            bootstrap,
            topic,
            records,
            record_bytes,
            acks=acks,
            compression=compression,
            partitions=partitions,
            replication_factor=replication_factor,
            batch_bytes_max=batch_bytes,
            linger_ms=linger_ms,
            max_in_flight=max_in_flight,
            idempotence=idempotence,
            progress=sys.stderr.isatty(),
            connection=client_options(),
            keys=keys,
            topic_configs=configs,
        )
    )
    click.echo(json.dumps(result.to_json()) if as_json else result.summary())


@bench.command("consume")
@_bench_options
def bench_consume(
    topic: str,
    records: int,
    record_bytes: int,
    acks: str,
    partitions: int,
    replication_factor: int | None,
    compression: str,
    as_json: bool,
    bootstrap: str,
) -> None:
    """Read --records records from the beginning of --topic (producing them if missing)."""
    from tidelog.ops.bench import consume_bench

    result = _run(
        consume_bench(
            bootstrap,
            topic,
            records,
            record_bytes,
            partitions=partitions,
            replication_factor=replication_factor,
            acks=acks,
            compression=compression,
            progress=sys.stderr.isatty(),
            note=lambda msg: click.echo(msg, err=True),
            connection=client_options(),
        )
    )
    click.echo(json.dumps(result.to_json()) if as_json else result.summary())


@bench.command("table")
@click.option("--topic", default="bench-table", show_default=True)
@click.option("--keys", type=click.IntRange(min=1), default=100_000, show_default=True)
@click.option("--value-bytes", type=click.IntRange(min=0), default=100, show_default=True)
@click.option(
    "--partitions",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Partitions of the topic when the bench creates it.",
)
@click.option("--replication-factor", type=click.IntRange(min=1), default=None, help=RF_HELP)
@click.option("--gets", type=click.IntRange(min=1), default=20_000, show_default=True)
@click.option(
    "--get-many-keys",
    type=click.IntRange(min=1),
    default=1_000_000,
    show_default=True,
    help="Keys read by get_many in all.",
)
@click.option("--batch-keys", type=click.IntRange(min=1), default=1_000, show_default=True)
@click.option("--concurrency", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@_bootstrap_option
def bench_table(
    topic: str,
    keys: int,
    value_bytes: int,
    partitions: int,
    replication_factor: int | None,
    gets: int,
    get_many_keys: int,
    batch_keys: int,
    concurrency: int,
    as_json: bool,
    bootstrap: str,
) -> None:
    """The Table API from one client: get/s, get_many keys/s and a full scan, over a
    compacted topic of --keys keys (created and filled when missing)."""
    from tidelog.ops.bench_table import table_bench

    result = _run(
        table_bench(
            bootstrap,
            topic,
            keys=keys,
            value_bytes=value_bytes,
            partitions=partitions,
            replication_factor=replication_factor,
            gets=gets,
            get_many_keys=get_many_keys,
            batch_keys=batch_keys,
            concurrency=concurrency,
            connection=client_options(),
        )
    )
    click.echo(json.dumps(result.to_json()) if as_json else result.summary())


def _rates(ctx: click.Context, param: click.Parameter, value: str | None) -> list[float] | None:
    if value is None:
        return None
    try:
        rates = [float(x.replace("_", "")) for x in value.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"{value!r}: give rates as numbers, e.g. 1000,20000") from None
    if not rates or any(r < 0 for r in rates):
        raise click.BadParameter(f"{value!r}: give one or more rates >= 0 (0: closed loop)")
    return rates


@bench.command("workload")
@click.option("--topic", default="workload", show_default=True)
@click.option(
    "--rate",
    type=click.FloatRange(min=0),
    default=1000,
    show_default=True,
    help="Records per second on a fixed schedule (open loop); 0: one record at a time, "
    "each awaited (closed loop).",
)
@click.option(
    "--sweep",
    callback=_rates,
    default=None,
    help="Comma-separated rates to run in turn (e.g. 0,1000,20000,50000): prints the "
    "latency-throughput curve; with --plot also as a PNG.",
)
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), default=None)
@click.option("--duration", type=click.FloatRange(min=0.1), default=20, show_default=True)
@click.option("--warmup", type=click.FloatRange(min=0), default=5, show_default=True)
@click.option("--record-bytes", type=click.IntRange(min=16), default=100, show_default=True)
@click.option("--partitions", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--replication-factor", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--acks", type=ACKS_CHOICE, default="all", show_default=True)
@click.option("--linger-ms", type=click.FloatRange(min=0), default=1, show_default=True)
@click.option(
    "--adaptive-linger/--no-adaptive-linger",
    default=True,
    show_default=True,
    help="The producer's adaptive linger: a partition with nothing in flight sends at once.",
)
@click.option(
    "--batch-bytes", type=click.IntRange(min=1024), default=1024 * 1024, show_default=True
)
@click.option("--max-in-flight", type=click.IntRange(min=1), default=None)
@click.option("--idempotence/--no-idempotence", default=None)
@click.option(
    "--consumer/--no-consumer",
    default=True,
    show_default=True,
    help="Measure end-to-end latency with a consumer in its own process.",
)
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path))
@_bootstrap_option
def bench_workload(
    topic: str,
    rate: float,
    sweep: list[float] | None,
    plot: Path | None,
    duration: float,
    warmup: float,
    record_bytes: int,
    partitions: int,
    replication_factor: int,
    acks: str,
    linger_ms: float,
    adaptive_linger: bool,
    batch_bytes: int,
    max_in_flight: int | None,
    idempotence: bool | None,
    consumer: bool,
    json_path: Path | None,
    bootstrap: str,
) -> None:
    """Publish and end-to-end latency at a fixed rate (open loop), as the OpenMessaging
    Benchmark measures: latency counts from each record's scheduled send time, so a stall
    is not hidden by a sender that waits. p50/p99/p99.9/max from HDR histograms, the rate
    achieved against the rate asked, CPU seconds per million records per process."""
    try:
        from tidelog.ops.workload import (
            WorkloadSpec,
            plot_sweep,
            run_sweep,
            run_workload,
            sweep_table,
        )
    except ImportError as err:
        raise click.ClickException(
            f"bench workload needs the bench extra ({err.name} is missing): "
            "pip install 'tidelog[bench]'"
        ) from None

    try:
        spec = WorkloadSpec(
            topic=topic,
            partitions=partitions,
            replication_factor=replication_factor,
            record_bytes=record_bytes,
            rate=rate,
            warmup_s=warmup,
            duration_s=duration,
            linger_ms=linger_ms,
            adaptive_linger=adaptive_linger,
            acks=acks,
            batch_bytes=batch_bytes,
            idempotence=idempotence,
            max_in_flight=max_in_flight,
            consumer=consumer,
        )
    except ValueError as err:
        raise click.UsageError(str(err)) from None

    def note(msg: str) -> None:
        click.echo(msg, err=True)

    if sweep is None:
        results = [_run(run_workload(bootstrap, spec, connection=client_options(), note=note))]
        click.echo(results[0].summary())
    else:
        results = _run(run_sweep(bootstrap, spec, sweep, connection=client_options(), note=note))
        rows = sweep_table(results)
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        for row in rows:
            click.echo("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))
        if plot is not None:
            title = (
                f"tidelog: {record_bytes} B records, {partitions} partition(s), "
                f"RF {replication_factor}, acks={acks}"
            )
            plot_sweep(results, plot, title)
            click.echo(f"plot written to {plot}", err=True)
    if json_path is not None:
        json_path.write_text(json.dumps([r.to_json() for r in results], indent=2) + "\n")


register_cluster_commands(cli)
register_table_commands(cli, _bootstrap_option, client_options)
add_group_commands(cli, _bootstrap_option)
register_heal_commands(cli, cluster_group, _bootstrap_option)
register_recover_commands(cli, _bootstrap_option)


# ---------------------------------------------------------------------------------------------
# cluster health (any cluster, by --bootstrap; the local cluster's commands are in cli_cluster.py)

HEALTH_INTERVAL_S = 2.0


@cluster_group.command("health")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per check.")
@click.option("--watch", "-w", is_flag=True, help="Check again every --interval until Ctrl-C.")
@click.option(
    "--exit-when-healthy",
    "-e",
    is_flag=True,
    help="Keep checking (as --watch) and exit 0 as soon as the cluster is healthy.",
)
@click.option(
    "--interval",
    "interval_s",
    type=click.FloatRange(min=0.1),
    default=HEALTH_INTERVAL_S,
    show_default=True,
    help="Seconds between checks with --watch or --exit-when-healthy.",
)
@click.option(
    "--timeout",
    "timeout_s",
    type=click.FloatRange(min=0),
    default=None,
    help="With --watch or --exit-when-healthy: give up after this many seconds (exit 1).",
)
@_bootstrap_option
def cluster_health(
    as_json: bool,
    watch: bool,
    exit_when_healthy: bool,
    interval_s: float,
    timeout_s: float | None,
    bootstrap: str,
) -> None:
    """Nodes up and down, the active controller, leaderless and under-replicated partitions
    of the cluster at --bootstrap. Exit status 0 when healthy, 1 when not (or no node
    answers): usable in scripts, CI and readiness checks."""
    import time

    from tidelog.ops.health import assess, health_to_json, render_health

    connection = client_options()
    repeat = watch or exit_when_healthy

    async def go() -> bool:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        healthy = False
        async with Admin(bootstrap, **connection) as admin:
            while True:
                try:
                    health = assess(await admin.metadata())
                except TidelogError as exc:
                    if not repeat:
                        raise
                    healthy = False
                    click.echo(f"no answer: {_one_line(str(exc))}", err=True)
                else:
                    healthy = health.healthy
                    if as_json:
                        click.echo(json.dumps(health_to_json(health)))
                    else:
                        click.echo(render_health(health))
                if not repeat or (exit_when_healthy and healthy):
                    return healthy
                if deadline is not None and time.monotonic() >= deadline:
                    return healthy
                if not as_json:
                    click.echo("")
                await asyncio.sleep(interval_s)

    healthy = _run(go())
    if not healthy:
        # Not click.exceptions.Exit: outside standalone mode click returns its code instead.
        sys.stdout.flush()
        sys.exit(EXIT_ERROR)


# ---------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """Entry point of the ``tidelog`` console script: one line per expected error."""
    # The client logs failed batches as warnings; the commands report every failure
    # themselves as one ``error:`` line, so without this Python's last-resort handler
    # would print the same failure twice.
    logging.getLogger("tidelog.client").addHandler(logging.NullHandler())
    try:
        cli.main(
            args=list(argv) if argv is not None else None,
            prog_name="tidelog",
            standalone_mode=False,
        )
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        sys.exit(EXIT_INTERRUPTED)
    except click.UsageError as exc:
        hint = f" (see `{exc.ctx.command_path} --help`)" if exc.ctx is not None else ""
        click.echo(f"error: {_one_line(exc.format_message())}{hint}", err=True)
        sys.exit(EXIT_USAGE)
    except click.ClickException as exc:
        click.echo(f"error: {_one_line(exc.format_message())}", err=True)
        sys.exit(exc.exit_code)
    except TidelogError as exc:
        text = str(exc)
        if isinstance(exc, NodeUnavailable) and _bootstrap_source:
            text += f" (bootstrap {_bootstrap_source[0]})"
        click.echo(f"error: {_one_line(text)}", err=True)
        sys.exit(EXIT_ERROR)
    except KeyboardInterrupt:
        sys.exit(EXIT_INTERRUPTED)
    except BrokenPipeError:
        # The reader went away (`tidelog consume t | head`): not an error worth a line.
        _silence_stdout()
        sys.exit(EXIT_ERROR)
    _flush_stdout()
    sys.exit(0)


def _flush_stdout() -> None:
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        _silence_stdout()


def _silence_stdout() -> None:
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
