"""The CLI's connection options: TLS and credentials of every command that talks to a
cluster, the same as the client's ``tls=``, ``ca=``, ``client_cert=``, ``client_key=`` and
``token=`` (client/connection.py).

``--tls``, ``--tls-ca``, ``--tls-cert``, ``--tls-key`` and ``--token-file`` each have an
environment variable (TIDELOG_TLS, TIDELOG_TLS_CA, ...); the token itself may also come from
TIDELOG_TOKEN, but never from the command line (it would show in ``ps`` and shell history).
Without ``--tls-ca``, a local cluster whose cluster.json records a CA (``tls_ca``) is reached
over TLS with it when the bootstrap comes from that cluster.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

__all__ = [
    "TOKEN_ENV",
    "client_options",
    "connection_options",
    "note_discovered_cluster",
]

TOKEN_ENV = "TIDELOG_TOKEN"
_META = "tidelog.connection"
_DISCOVERED = "tidelog.discovered_cluster"


def _store(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    """Keep an option's value where every command of the run finds it. The options exist
    both before the verb (``tidelog --tls-ca ca.crt topic list``) and after it; a default
    after the verb does not undo a value given before it."""
    assert param.name is not None
    values = ctx.meta.setdefault(_META, {})
    if param.name in values and ctx.get_parameter_source(param.name) in (
        click.core.ParameterSource.DEFAULT,
        None,
    ):
        return value
    values[param.name] = value
    return value


def connection_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Add the connection options to a command; :func:`client_options` reads them."""
    file_path = click.Path(dir_okay=False, exists=True, path_type=Path)
    options = [
        click.option(
            "--tls",
            "tls",
            is_flag=True,
            default=False,
            envvar="TIDELOG_TLS",
            show_envvar=True,
            expose_value=False,
            callback=_store,
            help="Connect with TLS (implied by --tls-ca and --tls-cert); without --tls-ca the "
            "system's trusted CAs verify the node.",
        ),
        click.option(
            "--tls-ca",
            "tls_ca",
            type=file_path,
            envvar="TIDELOG_TLS_CA",
            show_envvar=True,
            expose_value=False,
            callback=_store,
            help="PEM CA that verifies the nodes' certificates.",
        ),
        click.option(
            "--tls-cert",
            "tls_cert",
            type=file_path,
            envvar="TIDELOG_TLS_CERT",
            show_envvar=True,
            expose_value=False,
            callback=_store,
            help="PEM client certificate, for nodes that require one (mutual TLS).",
        ),
        click.option(
            "--tls-key",
            "tls_key",
            type=file_path,
            envvar="TIDELOG_TLS_KEY",
            show_envvar=True,
            expose_value=False,
            callback=_store,
            help="PEM private key of --tls-cert.",
        ),
        click.option(
            "--token-file",
            "token_file",
            type=file_path,
            envvar="TIDELOG_TOKEN_FILE",
            show_envvar=True,
            expose_value=False,
            callback=_store,
            help=f"File holding the bearer token (or set {TOKEN_ENV} to the token itself).",
        ),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def note_discovered_cluster(ctx: click.Context, directory: Path) -> None:
    """The bootstrap came from the local cluster in ``directory`` (its CA may be used)."""
    ctx.meta[_DISCOVERED] = directory


def _read_token(path: Path) -> str:
    try:
        token = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise click.BadParameter(f"cannot read the token file {path}: {exc}") from None
    if not token:
        raise click.BadParameter(f"the token file {path} is empty")
    return token


def client_options(ctx: click.Context | None = None) -> dict[str, Any]:
    """The keyword arguments for Producer, Consumer and Admin from the connection options of
    the running command (empty: plaintext, no credentials)."""
    ctx = ctx or click.get_current_context()
    values: dict[str, Any] = ctx.meta.get(_META, {})  # click shares meta with subcontexts
    ca: Path | None = values.get("tls_ca")
    if ca is None and (directory := ctx.meta.get(_DISCOVERED)) is not None:
        from tidelog.ops.localcluster import discover_tls_ca

        ca = discover_tls_ca(directory)
    cert, key = values.get("tls_cert"), values.get("tls_key")
    if (cert is None) != (key is None):
        raise click.UsageError("--tls-cert and --tls-key go together")
    out: dict[str, Any] = {}
    if values.get("tls") or ca is not None or cert is not None:
        out["tls"] = True
    if ca is not None:
        out["ca"] = ca
    if cert is not None:
        out["client_cert"], out["client_key"] = cert, key
    token_file: Path | None = values.get("token_file")
    if token_file is not None:
        out["token"] = _read_token(token_file)
    elif os.environ.get(TOKEN_ENV, "").strip():
        out["token"] = os.environ[TOKEN_ENV].strip()
    from tidelog.client.connection import Connection

    try:
        Connection.create(**out)  # reads and checks the files now: one error line, no traceback
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    return out
