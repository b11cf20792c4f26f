"""The floor under an acknowledged write on this machine: what one round trip between two
local Python processes costs, by carrier, before tidelog does any work.

An acks=all produce is a client -> leader request and a leader -> follower -> leader round
trip, so these figures bound its latency from below (with one fsync, ``--fsync``). Each case
runs a server in a child process and times ``--count`` sequential round trips of a
``--bytes`` message from this process, with the CPU both processes spent per round trip:

- grpc-unary: a grpc.aio unary call (what a Produce is);
- grpc-stream: one message each way on two grpc.aio client streams (what Raft.Stream is);
- tcp: one frame each way on plain asyncio TCP connections (what the Raft TCP listener is);
- fsync: ``os.write`` + ``os.fdatasync`` of ``--bytes`` to a file in ``--dir``.

    python bench/rpc_floor.py [--count 3000] [--bytes 200] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from typing import Any

import grpc
import uvloop
from grpc import aio

from tidelog.ops.processes import free_port

SERVICE = "floor.Echo"
_HEADER = struct.Struct(">I")


# ---- the child: echo servers -----------------------------------------------------------------


async def serve(case: str, port: int, peer_port: int) -> None:
    """Echo until stdin closes; print the CPU seconds used meanwhile."""
    loop = asyncio.get_running_loop()
    cpu0 = time.process_time()
    if case == "tcp":

        async def on_conn(reader: asyncio.StreamReader, _w: asyncio.StreamWriter) -> None:
            _r, writer = await asyncio.open_connection("127.0.0.1", peer_port)
            while True:
                try:
                    size = _HEADER.unpack(await reader.readexactly(4))[0]
                    data = await reader.readexactly(size)
                except asyncio.IncompleteReadError:
                    return
                writer.write(_HEADER.pack(len(data)) + data)

        server: Any = await asyncio.start_server(on_conn, "127.0.0.1", port)
    else:
        server = aio.server()
        handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
        if case == "grpc-unary":

            async def echo(request: bytes, _ctx: Any) -> bytes:
                return request

            handlers["Unary"] = grpc.unary_unary_rpc_method_handler(echo)
        else:
            back: list[Any] = []

            async def stream(requests: Any, _ctx: Any) -> bytes:
                channel = aio.insecure_channel(f"127.0.0.1:{peer_port}")
                call = channel.stream_unary(f"/{SERVICE}/Stream", None, None)(None)
                back.append(channel)
                async for message in requests:
                    await call.write(message)
                return b""

            handlers["Stream"] = grpc.stream_unary_rpc_method_handler(stream)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
    print("ready", flush=True)
    await loop.run_in_executor(None, sys.stdin.read)
    print(f"{time.process_time() - cpu0:.6f}", flush=True)
    os._exit(0)


# ---- this process: the caller -------------------------------------------------------------------


async def call_rounds(case: str, port: int, own_port: int, count: int, size: int) -> list[float]:
    payload = os.urandom(size)
    times: list[float] = []
    if case == "grpc-unary":
        async with aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            unary = channel.unary_unary(f"/{SERVICE}/Unary", None, None)
            await unary(payload)
            for _ in range(count):
                t0 = time.perf_counter()
                await unary(payload)
                times.append(time.perf_counter() - t0)
        return times
    inbox: asyncio.Queue[bytes] = asyncio.Queue()
    if case == "tcp":

        async def on_conn(reader: asyncio.StreamReader, _w: asyncio.StreamWriter) -> None:
            while True:
                try:
                    size_ = _HEADER.unpack(await reader.readexactly(4))[0]
                    inbox.put_nowait(await reader.readexactly(size_))
                except asyncio.IncompleteReadError:
                    return

        server = await asyncio.start_server(on_conn, "127.0.0.1", own_port)
        _r, writer = await asyncio.open_connection("127.0.0.1", port)

        async def send(data: bytes) -> None:
            writer.write(_HEADER.pack(len(data)) + data)

        closer: Any = server
    else:

        async def stream(requests: Any, _ctx: Any) -> bytes:
            async for message in requests:
                inbox.put_nowait(message)
            return b""

        grpc_server = aio.server()
        handler = grpc.stream_unary_rpc_method_handler(stream)
        grpc_server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE, {"Stream": handler}),)
        )
        grpc_server.add_insecure_port(f"127.0.0.1:{own_port}")
        await grpc_server.start()
        channel = aio.insecure_channel(f"127.0.0.1:{port}")
        call = channel.stream_unary(f"/{SERVICE}/Stream", None, None)(None)

        async def send(data: bytes) -> None:
            await call.write(data)

        closer = None
    await send(payload)
    await inbox.get()
    for _ in range(count):
        t0 = time.perf_counter()
        await send(payload)
        await inbox.get()
        times.append(time.perf_counter() - t0)
    if closer is not None:
        closer.close()
    return times


def run_case(case: str, count: int, size: int) -> str:
    port, own = free_port(), free_port()
    argv = [sys.executable, __file__, "--serve", case, "--port", str(port), "--peer", str(own)]
    child = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert child.stdin is not None and child.stdout is not None
    try:
        assert child.stdout.readline().strip() == "ready"
        cpu0 = time.process_time()
        times = uvloop.run(call_rounds(case, port, own, count, size))
        cpu = time.process_time() - cpu0
        child.stdin.close()
        child_cpu = float(child.stdout.readline())
    finally:
        child.kill()
        child.wait()
    return line(case, times, cpu + child_cpu)


def run_fsync(count: int, size: int, directory: str | None) -> str:
    payload = os.urandom(size)
    times: list[float] = []
    cpu0 = time.process_time()
    with tempfile.NamedTemporaryFile(dir=directory) as f:
        fd = f.fileno()
        for _ in range(count):
            t0 = time.perf_counter()
            os.write(fd, payload)
            os.fdatasync(fd)
            times.append(time.perf_counter() - t0)
    return line("fsync", times, time.process_time() - cpu0)


def line(case: str, times: list[float], cpu_s: float) -> str:
    times.sort()
    n = len(times)
    p50 = statistics.median(times) * 1e6
    p99 = times[min(n - 1, n * 99 // 100)] * 1e6
    return (
        f"{case:<12} p50 {p50:>7,.0f} us  p99 {p99:>7,.0f} us  "
        f"CPU {cpu_s / n * 1e6:>6,.0f} us per round trip (both processes)"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--count", type=int, default=3000)
    p.add_argument("--bytes", type=int, default=200)
    p.add_argument("--dir", default=None, help="where the fsync case writes (default: /tmp)")
    p.add_argument("--serve", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--peer", type=int, help=argparse.SUPPRESS)
    ns = p.parse_args()
    if ns.serve:
        uvloop.run(serve(ns.serve, ns.port, ns.peer))
        return
    print(f"# {ns.count:,} sequential round trips of {ns.bytes} B, uvloop, 127.0.0.1")
    for case in ("grpc-unary", "grpc-stream", "tcp"):
        print(run_case(case, ns.count, ns.bytes), flush=True)
    print(run_fsync(ns.count, ns.bytes, ns.dir))


if __name__ == "__main__":
    main()
