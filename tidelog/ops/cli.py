"""The ``tidelog`` command: run a node, manage topics, produce, consume and benchmark.

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
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click
from rich.console import Console
from rich.table import Table

from tidelog.client import Admin, BatchesFuture, Consumer, Producer, TopicPartition
from tidelog.client.metadata import parse_bootstrap
from tidelog.client.structs import ConsumerRecord
from tidelog.errors import TidelogError
from tidelog.ops.cli_cluster import cluster as cluster_group
from tidelog.ops.cli_cluster import register as register_cluster_commands
from tidelog.ops.cli_connection import client_options, connection_options, note_discovered_cluster
from tidelog.records import Codec

__all__ = ["cli", "main"]

T = TypeVar("T")

BOOTSTRAP_ENV = "TIDELOG_BOOTSTRAP"
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


def _bootstrap_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--bootstrap and the connection options (TLS, credentials: cli_connection.py)."""
    fn = connection_options(fn)
    return click.option(
        "--bootstrap",
        "-b",
        envvar=BOOTSTRAP_ENV,
        default=None,
        show_envvar=True,
        callback=_check_bootstrap,
        help="host:port of one or more nodes, comma-separated. Default: the local cluster "
        f"started in this directory (tidelog cluster up), else {BOOTSTRAP_DEFAULT}.",
    )(fn)


def _check_bootstrap(ctx: click.Context, param: click.Parameter, value: str | None) -> str:
    if value is None:
        from tidelog.ops.localcluster import CLUSTER_DIR_DEFAULT, discover_bootstrap

        value = discover_bootstrap(Path.cwd())
        if value is not None:
            note_discovered_cluster(ctx, Path.cwd() / CLUSTER_DIR_DEFAULT)
        else:
            value = BOOTSTRAP_DEFAULT
    try:
        parse_bootstrap(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
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


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="tidelog")
def cli() -> None:
    """tidelog: a replicated log broker in the Kafka family, over gRPC."""


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
@click.option("--replication-factor", "-r", type=int, default=1, show_default=True)
@click.option(
    "--config",
    "-c",
    "configs",
    multiple=True,
    callback=_parse_kv,
    metavar="KEY=VALUE",
    help="Topic config override (repeatable), e.g. retention.ms=3600000.",
)
@_bootstrap_option
def topic_create(
    name: str, partitions: int, replication_factor: int, configs: dict[str, str], bootstrap: str
) -> None:
    """Create topic NAME."""

    connection = client_options()

    async def go() -> list[str]:
        async with Admin(bootstrap, **connection) as admin:
            return await admin.create_topics(name, partitions, replication_factor, configs)

    _run(go())
    click.echo(f"created topic {name} with {partitions} partition(s)")


@topic.command("list")
@click.option("--internal", is_flag=True, help="Include internal topics.")
@_bootstrap_option
def topic_list(internal: bool, bootstrap: str) -> None:
    """Print every topic name, one per line."""

    connection = client_options()

    async def go() -> list[str]:
        async with Admin(bootstrap, **connection) as admin:
            return await admin.list_topics(internal=internal)

    for name in _run(go()):
        click.echo(name)


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
        out = [
            {
                "name": d.name,
                "replication_factor": d.replication_factor,
                "configs": d.configs,
                "overrides": list(d.overrides),
                "partitions": [
                    {
                        "partition": p.partition,
                        "leader": p.leader,
                        "replicas": list(p.replicas),
                        "in_sync": list(p.in_sync),
                        "log_start_offset": p.log_start_offset,
                        "high_watermark": p.high_watermark,
                        "size_bytes": p.size_bytes,
                    }
                    for p in d.partitions
                ],
            }
            for d in descs
        ]
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
        if d.overrides:
            console.print(
                "overrides: " + ", ".join(f"{k}={d.configs.get(k, '')}" for k in d.overrides)
            )


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
@click.option("--partition", type=click.IntRange(min=0), default=None, help="Send all here.")
@click.option("--acks", type=ACKS_CHOICE, default="all", show_default=True)
@click.option("--compression", default="none", show_default=True, callback=_check_codec)
@click.option("--linger-ms", type=click.FloatRange(min=0), default=5, show_default=True)
@_bootstrap_option
def produce(
    topic_name: str,
    key_separator: str | None,
    partition: int | None,
    acks: str,
    compression: str,
    linger_ms: float,
    bootstrap: str,
) -> None:
    """Send each line of stdin as one record to TOPIC."""
    if key_separator == "":
        raise click.BadParameter("must not be empty", param_hint="--key-separator")
    sep = None if key_separator is None else key_separator.encode()
    count = _run(
        _produce_stdin(bootstrap, topic_name, sep, partition, acks, compression, linger_ms)
    )
    if sys.stderr.isatty():
        click.echo(f"produced {count} records to {topic_name}", err=True)


async def _produce_stdin(
    bootstrap: str,
    topic_name: str,
    sep: bytes | None,
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
        partitions = await producer.partitions_for(topic_name)
        if partition is not None and partition >= partitions:
            _fail(
                f"topic {topic_name!r} has partitions 0..{partitions - 1}; "
                f"there is no partition {partition}"
            )
        #: send_many calls awaiting acknowledgement, with the input lines they hold.
        window: deque[tuple[BatchesFuture, int, int]] = deque()
        failures: list[tuple[int, int, TidelogError]] = []
        pending = b""
        line_no = 0
        count = 0
        eof = False
        while not eof:
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
            values: list[bytes] = []
            keys: list[bytes | None] | None = None
            if sep is None:
                values = [ln[:-1] if ln.endswith(b"\r") else ln for ln in lines]
            else:
                keys = []
                for i, ln in enumerate(lines):
                    if ln.endswith(b"\r"):
                        ln = ln[:-1]
                    key, found, value = ln.partition(sep)
                    if not found:
                        _fail(
                            f"line {first_line + i} has no key separator {sep.decode()!r}: "
                            f"{ln[:60].decode(errors='replace')!r}"
                        )
                    keys.append(key)
                    values.append(value)
            future = producer.send_many(topic_name, values, keys, partition=partition)
            window.append((future, first_line, line_no))
            count += len(values)
            while len(window) > PRODUCE_CALLS_IN_FLIGHT_MAX:
                await _settle(window.popleft(), failures)
        while window:
            await _settle(window.popleft(), failures)
        await producer.flush()
    if failures:
        _fail(_failures_line(failures))
    return count


async def _settle(
    sent: tuple[BatchesFuture, int, int], failures: list[tuple[int, int, TidelogError]]
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
@click.argument("topic_name", metavar="TOPIC")
@click.option("--from-beginning", is_flag=True, help="Start at the earliest offset.")
@click.option(
    "--partition",
    "partitions",
    type=click.IntRange(min=0),
    multiple=True,
    help="Read only this partition (repeatable; default: all).",
)
@click.option("--offset", type=click.IntRange(min=0), default=None, help="Start at this offset.")
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
@_bootstrap_option
def consume(
    topic_name: str,
    from_beginning: bool,
    partitions: tuple[int, ...],
    offset: int | None,
    max_records: int | None,
    fmt: str,
    key_separator: str,
    timeout_ms: int | None,
    bootstrap: str,
) -> None:
    """Print TOPIC's records, one per line, from the end (or --from-beginning / --offset)."""
    if from_beginning and offset is not None:
        raise click.UsageError("give --from-beginning or --offset, not both")
    try:
        _run(
            _consume(
                bootstrap,
                topic_name,
                from_beginning,
                partitions,
                offset,
                max_records,
                fmt,
                key_separator.encode(),
                timeout_ms,
            )
        )
    except KeyboardInterrupt:
        pass  # Ctrl-C is how one stops following


def _text(data: bytes | None) -> str | None:
    return None if data is None else data.decode("utf-8", errors="replace")


def _json_line(r: ConsumerRecord) -> bytes:
    obj: dict[str, Any] = {
        "partition": r.partition,
        "offset": r.offset,
        "timestamp": r.timestamp_ms,
        "key": _text(r.key),
        "value": _text(r.value),
    }
    if r.value is not None and not _is_utf8(r.value):
        obj["value_base64"] = base64.b64encode(r.value).decode()
    if r.headers:
        obj["headers"] = {k: _text(v) for k, v in r.headers}
    return json.dumps(obj, ensure_ascii=False).encode()


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


async def _consume(
    bootstrap: str,
    topic_name: str,
    from_beginning: bool,
    partitions: tuple[int, ...],
    offset: int | None,
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
        if partitions:
            count = len(every)
            missing = [p for p in partitions if p >= count]
            if missing:
                _fail(
                    f"topic {topic_name!r} has partitions 0..{count - 1}; "
                    f"there is no partition {missing[0]}"
                )
            tps = [TopicPartition(topic_name, p) for p in dict.fromkeys(partitions)]
        else:
            tps = every
        consumer.assign(tps)
        if offset is not None:
            for tp in tps:
                consumer.seek(tp, offset)
        elif from_beginning:
            await consumer.seek_to_beginning()
        else:
            await consumer.seek_to_end()
        seen = 0
        idle_ms = timeout_ms if timeout_ms is not None else 1000
        while max_records is None or seen < max_records:
            want = 10_000 if max_records is None else min(10_000, max_records - seen)
            records = await consumer.poll(timeout_ms=idle_ms, max_records=want)
            if not records:
                if timeout_ms is not None:
                    return
                continue
            seen += len(records)
            if fmt == "value":
                lines = [r.value or b"" for r in records]
            elif fmt == "kv":
                lines = [(r.key or b"") + key_sep + (r.value or b"") for r in records]
            else:
                lines = [_json_line(r) for r in records]
            out.write(b"\n".join(lines) + b"\n")
            out.flush()


# ---------------------------------------------------------------------------------------------
# bench


@cli.group()
def bench() -> None:
    """Measure throughput, latency and CPU cost against a running cluster."""


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
            "--replication-factor", type=click.IntRange(min=1), default=1, show_default=True
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
@click.option("--max-in-flight", type=click.IntRange(min=1), default=8, show_default=True)
def bench_produce(
    topic: str,
    records: int,
    record_bytes: int,
    acks: str,
    partitions: int,
    replication_factor: int,
    compression: str,
    as_json: bool,
    bootstrap: str,
    batch_bytes: int,
    linger_ms: float,
    max_in_flight: int,
) -> None:
    """Produce --records records of --record-bytes of random hex text, as fast as possible."""
    from tidelog.ops.bench import produce_bench

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
            progress=sys.stderr.isatty(),
            connection=client_options(),
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
    replication_factor: int,
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


register_cluster_commands(cli)


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
        click.echo(f"error: {_one_line(str(exc))}", err=True)
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
