"""The Raft transport's TCP listener and connections: frames, handshake, TLS.

proto/tidelog/v1/raft.proto ("The TCP listener") is the wire format; node/transport.py uses
this module on both ends. Why it exists: a gRPC stream message costs about four times the
CPU of a plain socket write here and adds about 0.7 ms to a round trip between two local
processes, and an acks=all produce waits for an APPEND and its answer (docs/latency.md).

Everything here is plain asyncio streams: a frame is a 4-byte big-endian length and one
protobuf message. What the listener accepts is bounded before it is read (a handshake frame
at ``handshake_bytes_max``, a batch at the gRPC message bound), and a caller that does not
finish its handshake within ``handshake_timeout_ms`` is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
import struct
import tempfile
from pathlib import Path
from typing import Any, Final

from tidelog.node import limits
from tidelog.node.internal_auth import InternalAuth, Mode, node_id_from_names
from tidelog.v1 import raft_pb2

#: The handshake's version (RaftChallenge.version, RaftHello.version).
VERSION: Final = 1
NONCE_BYTES: Final = 16
#: A handshake frame larger than this ends the connection before it is read.
handshake_bytes_max: Final = 4 * 1024
#: A batch frame larger than this ends the connection before it is read (as gRPC's bound).
frame_bytes_max: Final = limits.grpc_message_bytes_max
#: A caller (or a listener) that does not finish the handshake in this time is dropped.
handshake_timeout_ms: Final = 10_000
#: The listener's read buffer (asyncio pauses reading above twice this): a 1 MiB APPEND
#: arrives without pausing the socket several times.
reader_limit: Final = 8 * 1024 * 1024
#: A batch below this is copied behind its header and written at once; a larger one is
#: written as two buffers.
copy_bytes_max: Final = 256 * 1024
#: Bytes the sender lets its socket buffer hold before it waits for them to drain.
write_buffer_high: Final = 16 * 1024 * 1024
#: TCP keepalive on both ends: a dead peer's connection ends without waiting for TCP's hours.
keepalive_idle_s: Final = 10
keepalive_interval_s: Final = 5
keepalive_probes: Final = 2

_HEADER: Final = struct.Struct(">I")


class FrameError(Exception):
    """The other end sent something that is not a frame of this protocol."""


class PeerRefused(Exception):
    """The peer's TCP listener refused us; ``str()`` is "CODE: message", as a gRPC status."""


def frame_header(size: int) -> bytes:
    return _HEADER.pack(size)


def frame(payload: bytes) -> bytes:
    return _HEADER.pack(len(payload)) + payload


async def read_frame(reader: asyncio.StreamReader, limit: int) -> bytes:
    """One frame's payload; raises FrameError above ``limit`` bytes and
    asyncio.IncompleteReadError when the connection ends first."""
    header = await reader.readexactly(_HEADER.size)
    (size,) = _HEADER.unpack(header)
    if size > limit:
        raise FrameError(f"a frame of {size} bytes exceeds the {limit}-byte limit")
    return await reader.readexactly(size)


async def connect(
    host: str,
    port: int,
    auth: InternalAuth,
    tls: ssl.SSLContext | None,
    from_node: int,
    to_node: int,
    cluster_id: str,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect to node ``to_node``'s listener and pass its handshake as ``from_node``
    (RaftBatch frames may follow). Raises PeerRefused when it refuses us, or when under TLS
    its certificate names another node; OSError or TimeoutError when it cannot be reached."""
    timeout_s = handshake_timeout_ms / 1000
    async with asyncio.timeout(timeout_s):
        reader, writer = await asyncio.open_connection(
            host, port, ssl=tls, server_hostname=host if tls else None
        )
    try:
        tune_socket(writer)
        async with asyncio.timeout(timeout_s):
            challenge = raft_pb2.RaftChallenge.FromString(
                await read_frame(reader, handshake_bytes_max)
            )
            if tls is not None:
                named = peer_node(writer)
                if named != to_node:
                    raise PeerRefused(
                        f"UNAUTHENTICATED: the raft listener at {host}:{port} presents a "
                        f"certificate of {'no node' if named is None else f'node {named}'}, "
                        f"not of node {to_node}"
                    )
            hello = raft_pb2.RaftHello(
                version=VERSION,
                from_node=from_node,
                to_node=to_node,
                cluster_id=cluster_id,
                mac=auth.hello_mac(challenge.nonce, to_node, cluster_id),
            )
            writer.write(frame(hello.SerializeToString()))
            welcome = raft_pb2.RaftWelcome.FromString(await read_frame(reader, handshake_bytes_max))
        if welcome.reason:
            raise PeerRefused(f"{welcome.code}: {welcome.message}")
    except BaseException:
        writer.close()
        raise
    return reader, writer


def tune_socket(writer: asyncio.StreamWriter) -> None:
    """No Nagle delay (a Raft message goes at once) and TCP keepalive."""
    sock: Any = writer.get_extra_info("socket")
    if sock is None:
        return
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, keepalive_idle_s)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, keepalive_interval_s)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, keepalive_probes)


def _context(auth: InternalAuth, *, server: bool) -> ssl.SSLContext | None:
    """Mutual TLS with the node's certificate and the cluster CA (both ends verify the
    other's certificate); None unless the node uses mutual TLS."""
    if auth.mode is not Mode.TLS or auth.tls is None:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if not server:
        # The caller checks instead that the certificate names the node it dialled.
        ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata=auth.tls.ca.decode())
    # The ssl module loads a certificate chain from files only: a private temporary copy.
    with tempfile.TemporaryDirectory(prefix="tidelog-tls-") as tmp:
        cert, key = Path(tmp) / "cert.pem", Path(tmp) / "key.pem"
        for path, data in ((cert, auth.tls.cert), (key, auth.tls.key)):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        ctx.load_cert_chain(cert, key)
    return ctx


def server_context(auth: InternalAuth) -> ssl.SSLContext | None:
    """The listener's TLS: a caller's certificate of the cluster CA required."""
    return _context(auth, server=True)


def client_context(auth: InternalAuth) -> ssl.SSLContext | None:
    """A connection's TLS: the listener's certificate verified against the cluster CA; the
    host name is not checked, the certificate must name the node dialled (:func:`peer_node`)."""
    return _context(auth, server=False)


def peer_node(writer: asyncio.StreamWriter) -> int | None:
    """The node the other end's (verified) certificate names, None if it names none."""
    cert = writer.get_extra_info("peercert")
    if not cert:
        return None
    cns = [v for rdn in cert.get("subject", ()) for k, v in rdn if k == "commonName"]
    uris = [v for k, v in cert.get("subjectAltName", ()) if k == "URI"]
    return node_id_from_names(cns, uris)


__all__ = [
    "NONCE_BYTES",
    "VERSION",
    "FrameError",
    "PeerRefused",
    "client_context",
    "connect",
    "copy_bytes_max",
    "frame",
    "frame_bytes_max",
    "frame_header",
    "handshake_bytes_max",
    "handshake_timeout_ms",
    "peer_node",
    "read_frame",
    "reader_limit",
    "server_context",
    "tune_socket",
    "write_buffer_high",
]
