"""How a client reaches a node: plaintext or TLS, with a client certificate and/or a bearer
token. Producer, Consumer and Admin take the same options and build one :class:`Connection`,
and every gRPC channel of the client is opened by :meth:`Connection.channel`.

- ``tls=True`` verifies the node's certificate against ``ca`` (a path, or PEM bytes), or the
  system's trusted roots when no ``ca`` is given. ``ca=`` or a client certificate imply TLS.
- ``client_cert=`` / ``client_key=`` (paths or PEM bytes) present a certificate, for nodes
  started with ``--tls-client-ca`` (mutual TLS): its CN names the client.
- ``token=`` sends ``authorization: Bearer <token>`` with every call, for nodes started with
  ``--auth-tokens-file``. Without TLS the token travels in clear: use it so only on loopback
  or a trusted network.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio

__all__ = ["Connection", "PemSource"]

#: The metadata key of the bearer token (node/auth.py reads it).
AUTHORIZATION = "authorization"
#: A path to a PEM file, or the PEM bytes themselves.
PemSource = str | os.PathLike[str] | bytes


def _pem(what: str, source: PemSource | None) -> bytes | None:
    if source is None:
        return None
    if isinstance(source, bytes):
        data = source
    else:
        try:
            with open(source, "rb") as f:
                data = f.read()
        except OSError as exc:
            raise ValueError(f"{what}: cannot read {os.fspath(source)}: {exc.strerror}") from None
    if b"-----BEGIN " not in data:
        raise ValueError(f"{what} is not PEM (no -----BEGIN line)")
    return data


if TYPE_CHECKING:  # generic in grpc-stubs only
    _UnaryUnary = grpc.aio.UnaryUnaryClientInterceptor[Any, Any]
    _UnaryStream = grpc.aio.UnaryStreamClientInterceptor[Any, Any]
    _StreamUnary = grpc.aio.StreamUnaryClientInterceptor[Any, Any]
    _StreamStream = grpc.aio.StreamStreamClientInterceptor[Any, Any]
else:
    _UnaryUnary = grpc.aio.UnaryUnaryClientInterceptor
    _UnaryStream = grpc.aio.UnaryStreamClientInterceptor
    _StreamUnary = grpc.aio.StreamUnaryClientInterceptor
    _StreamStream = grpc.aio.StreamStreamClientInterceptor


class _AddMetadata:
    """Adds fixed metadata (the bearer token) to a call's details."""

    def __init__(self, items: tuple[tuple[str, str], ...]) -> None:
        self._items = items

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*(details.metadata or ()), *self._items)
        return grpc.aio.ClientCallDetails(
            details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
        )


# One class per kind of call: a channel files each interceptor under the first kind it is.
class _UnaryUnaryMetadata(_AddMetadata, _UnaryUnary):
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)


class _UnaryStreamMetadata(_AddMetadata, _UnaryStream):
    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)


class _StreamUnaryMetadata(_AddMetadata, _StreamUnary):
    async def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(self._details(details), requests)


class _StreamStreamMetadata(_AddMetadata, _StreamStream):
    async def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(self._details(details), requests)


def _metadata_interceptors(items: tuple[tuple[str, str], ...]) -> list[_AddMetadata]:
    kinds = (_UnaryUnaryMetadata, _UnaryStreamMetadata, _StreamUnaryMetadata, _StreamStreamMetadata)
    return [kind(items) for kind in kinds]


@dataclass(frozen=True, slots=True)
class Connection:
    """The checked connection options of one client (:meth:`create` reads the files)."""

    tls: bool = False
    ca: bytes | None = None
    client_cert: bytes | None = None
    client_key: bytes | None = None
    token: str | None = field(default=None, repr=False)

    @classmethod
    def create(
        cls,
        *,
        tls: bool = False,
        ca: PemSource | None = None,
        client_cert: PemSource | None = None,
        client_key: PemSource | None = None,
        token: str | None = None,
    ) -> Connection:
        """Options as Producer, Consumer and Admin take them; ValueError says what is wrong."""
        if (client_cert is None) != (client_key is None):
            raise ValueError("give client_cert and client_key together (or neither)")
        if token is not None:
            token = token.strip()
            if not token or any(c.isspace() for c in token) or not token.isprintable():
                raise ValueError("the token is empty or holds spaces or control characters")
        return cls(
            tls=tls or ca is not None or client_cert is not None,
            ca=_pem("ca", ca),
            client_cert=_pem("client_cert", client_cert),
            client_key=_pem("client_key", client_key),
            token=token,
        )

    def channel(self, address: str, options: Sequence[tuple[str, Any]] = ()) -> grpc.aio.Channel:
        interceptors: Any = None  # grpc-stubs' type for interceptors cannot be met
        if self.token:
            interceptors = _metadata_interceptors(((AUTHORIZATION, f"Bearer {self.token}"),))
        if not self.tls:
            return grpc.aio.insecure_channel(address, options=options, interceptors=interceptors)
        credentials = grpc.ssl_channel_credentials(self.ca, self.client_key, self.client_cert)
        return grpc.aio.secure_channel(
            address, credentials, options=options, interceptors=interceptors
        )
