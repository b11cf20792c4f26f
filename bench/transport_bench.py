"""Throughput of the Raft transport between two RaftTransports on loopback.

Node 1 pumps messages to node 2 over the real transport (the TCP listener by default,
``--carrier grpc-stream`` for the gRPC stream); node 2 answers each batch it
receives with one APPEND_RESP carrying the highest index seen, and node 1 keeps a bounded
window of unacknowledged messages (as Raft's in-flight limits do), so nothing is dropped and
the figures are delivered messages, not queued ones. Cases:

- ping-pong: one small message at a time, each answered before the next: the round trip
  (the part of an acks=all produce the transport adds twice);
- small: APPEND_RESP-sized messages (no payload), bursts of ``--burst`` per loop iteration;
- heartbeats: one tick of heartbeats for ``--groups`` idle groups, repeated;
- large: APPENDs carrying one ``--entry-kib`` entry each (1 MiB by default): MB/s.

Plus the codec alone on a 1 MiB entry (encode + serialize + parse + decode) against a
bare copy of 1 MiB, to show what the protobuf copies cost.

By default node 2 runs in a child process (``--same-process`` keeps both on one loop, so
one core does all the work). Usage:

    python bench/transport_bench.py [--seconds 3] [--same-process] [--uvloop]
                                    [--carrier tcp|grpc-stream]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from grpc import aio

from tidelog.node.raft.types import Entry, Message, MessageKind
from tidelog.node.raft_codec import decode_batch, encode_batch
from tidelog.node.transport import GRPC_SERVER_OPTIONS, RaftTransport
from tidelog.ops.processes import free_port
from tidelog.v1 import raft_pb2

SENDER, RECEIVER = 1, 2
ACK_GROUP = 0
CLUSTER = "bench"


async def start_server(transport: RaftTransport, port: int, carrier: str) -> aio.Server:
    server = aio.server(options=GRPC_SERVER_OPTIONS)
    transport.add_servicer(server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    if carrier == "tcp":
        await transport.listen("127.0.0.1")
    return server


def make_echo(
    transport_ref: list[RaftTransport],
) -> Callable[[int, list[tuple[int, Message]]], None]:
    """Node 2's deliver: acknowledge each batch with the highest index it carried."""
    highest = [0]

    def deliver(frm: int, items: list[tuple[int, Message]]) -> None:
        top = highest[0]
        for _, m in items:
            if m.index > top:
                top = m.index
        highest[0] = top
        transport_ref[0].send(
            frm, ACK_GROUP, Message(MessageKind.APPEND_RESP, RECEIVER, frm, 1, index=top)
        )

    return deliver


async def serve_receiver(port: int, sender_address: str, carrier: str) -> None:
    """The child process: node 2 until stdin closes."""
    ref: list[RaftTransport] = []
    transport = RaftTransport(RECEIVER, CLUSTER, deliver=make_echo(ref))
    ref.append(transport)
    server = await start_server(transport, port, carrier)
    transport.set_peer(SENDER, sender_address)
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await transport.close()
    await server.stop(None)


@dataclass
class Result:
    name: str
    messages: int
    payload_bytes: int
    wire_bytes: float
    seconds: float

    def line(self) -> str:
        rate = self.messages / self.seconds
        mbs = self.payload_bytes / self.seconds / 1e6
        wire = self.wire_bytes / self.seconds / 1e6
        return (
            f"{self.name:<34} {rate:>12,.0f} msg/s {mbs:>9.1f} MB/s payload "
            f"{wire:>9.1f} MB/s wire  ({self.messages:,} msgs in {self.seconds:.2f}s)"
        )


class Pump:
    """Node 1: sends with a window of unacknowledged messages."""

    def __init__(self, transport: RaftTransport) -> None:
        self.transport = transport
        self.acked = 0
        self.event = asyncio.Event()

    def deliver(self, frm: int, items: list[tuple[int, Message]]) -> None:
        for _, m in items:
            if m.index > self.acked:
                self.acked = m.index
        self.event.set()

    async def run(
        self,
        name: str,
        make: Callable[[int], list[tuple[int, Message]]],
        payload_per_unit: int,
        seconds: float,
        burst: int,
        window: int,
        start_index: int,
    ) -> tuple[Result, int]:
        """Send units (``make(index)`` -> messages, the last one carrying ``index``), at most
        ``burst`` per loop iteration and ``window`` unacknowledged, for ``seconds``; returns
        the result and the next free index."""
        sent_bytes = self.transport.registry.get_sample_value
        wire0 = sent_bytes("tidelog_raft_bytes_sent_total", {"peer": str(RECEIVER)}) or 0.0
        t0 = time.perf_counter()
        deadline = t0 + seconds
        nxt = start_index
        base = start_index - 1
        self.acked = max(self.acked, base)
        messages = 0
        while True:
            now = time.perf_counter()
            if now < deadline:
                room = min(burst, window - (nxt - 1 - self.acked))
                for _ in range(room):
                    for group, m in make(nxt):
                        self.transport.send(RECEIVER, group, m)
                        messages += 1
                    nxt += 1
            elif self.acked >= nxt - 1:
                break
            self.event.clear()
            await self.event.wait()
        elapsed = time.perf_counter() - t0
        wire = (sent_bytes("tidelog_raft_bytes_sent_total", {"peer": str(RECEIVER)}) or 0.0) - wire0
        units = nxt - start_index
        return Result(name, messages, units * payload_per_unit, wire, elapsed), nxt


def codec_copy_cost(entry_bytes: int, rounds: int = 50) -> str:
    payload = os.urandom(entry_bytes)
    msg = Message(MessageKind.APPEND, SENDER, RECEIVER, 1, index=1, entries=(Entry(1, 2, payload),))
    t0 = time.perf_counter()
    for _ in range(rounds):
        wire = encode_batch(SENDER, RECEIVER, CLUSTER, [(1, msg)]).SerializeToString()
    t_enc = (time.perf_counter() - t0) / rounds
    t0 = time.perf_counter()
    for _ in range(rounds):
        decode_batch(raft_pb2.RaftBatch.FromString(wire))
    t_dec = (time.perf_counter() - t0) / rounds
    t0 = time.perf_counter()
    for _ in range(rounds):
        bytearray(payload)
    t_copy = (time.perf_counter() - t0) / rounds
    kib = entry_bytes // 1024
    return (
        f"codec, one {kib} KiB entry: encode+serialize {t_enc * 1e6:.0f} us, "
        f"parse+decode {t_dec * 1e6:.0f} us, one bare copy {t_copy * 1e6:.0f} us "
        f"(~{t_enc / t_copy:.1f} and ~{t_dec / t_copy:.1f} copies)"
    )


async def main(ns: argparse.Namespace) -> None:
    port1, port2 = free_port(), free_port()
    pump_ref: list[Pump] = []
    sender = RaftTransport(SENDER, CLUSTER, deliver=lambda f, i: pump_ref[0].deliver(f, i))
    pump = Pump(sender)
    pump_ref.append(pump)
    server1 = await start_server(sender, port1, ns.carrier)
    child: subprocess.Popen[str] | None = None
    receiver: RaftTransport | None = None
    server2: aio.Server | None = None
    if ns.same_process:
        ref: list[RaftTransport] = []
        receiver = RaftTransport(RECEIVER, CLUSTER, deliver=make_echo(ref))
        ref.append(receiver)
        server2 = await start_server(receiver, port2, ns.carrier)
        receiver.set_peer(SENDER, f"127.0.0.1:{port1}")
    else:
        argv = [sys.executable, __file__, "--serve", str(port2), "--peer", f"127.0.0.1:{port1}"]
        argv += ["--carrier", ns.carrier]
        if ns.uvloop:
            argv.append("--uvloop")
        child = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert child.stdout is not None
        line = await asyncio.get_running_loop().run_in_executor(None, child.stdout.readline)
        assert line.strip() == "ready", line
    sender.set_peer(RECEIVER, f"127.0.0.1:{port2}")
    mode = "one process" if ns.same_process else "two processes"
    loop_name = type(asyncio.get_running_loop()).__module__
    print(f"# transport bench, {mode}, carrier {ns.carrier}, loop {loop_name}")
    try:

        def small(i: int) -> list[tuple[int, Message]]:
            return [(i % 1000, Message(MessageKind.APPEND_RESP, SENDER, RECEIVER, 1, index=i))]

        # Warm up the connection and the code paths.
        _, idx = await pump.run("warmup", small, 0, 0.3, ns.burst, ns.burst * 4, 1)
        res, idx = await pump.run("ping-pong", small, 0, ns.seconds, 1, 1, idx)
        print(res.line())
        print(f"{'':<34} = {res.seconds / res.messages * 1e6:,.0f} us per round trip")
        res, idx = await pump.run(
            f"small (burst {ns.burst})", small, 0, ns.seconds, ns.burst, ns.burst * 4, idx
        )
        print(res.line())

        groups = ns.groups
        hb_cache: dict[int, Message] = {}

        def tick(i: int) -> list[tuple[int, Message]]:
            # The core reuses its heartbeat objects while nothing changes; so do we.
            out: list[tuple[int, Message]] = []
            for g in range(1, groups):
                m = hb_cache.get(g)
                if m is None:
                    m = hb_cache[g] = Message(MessageKind.HEARTBEAT, SENDER, RECEIVER, 3, commit=g)
                out.append((g, m))
            out.append((groups, Message(MessageKind.HEARTBEAT, SENDER, RECEIVER, 3, index=i)))
            return out

        res, idx = await pump.run(
            f"heartbeats ({groups:,} groups/tick)", tick, 0, ns.seconds, 1, 2, idx
        )
        print(res.line())
        print(
            f"{'':<34} = {res.messages / groups / res.seconds:,.0f} ticks/s, "
            f"{res.wire_bytes / (res.messages / groups):,.0f} wire bytes per tick, "
            f"{res.seconds / (res.messages / groups) * 1e3:.2f} ms per tick"
        )

        entry = os.urandom(ns.entry_kib * 1024)

        def big(i: int) -> list[tuple[int, Message]]:
            e = (Entry(1, i, entry),)
            return [(i % 8, Message(MessageKind.APPEND, SENDER, RECEIVER, 1, index=i, entries=e))]

        window = max(2, (ns.window_mib * 1024) // ns.entry_kib)
        res, idx = await pump.run(
            f"large ({ns.entry_kib} KiB entries)", big, len(entry), ns.seconds, window, window, idx
        )
        print(res.line())
        print(codec_copy_cost(ns.entry_kib * 1024))
        dropped = sender.registry.get_sample_value(
            "tidelog_raft_messages_dropped_total", {"peer": str(RECEIVER)}
        )
        print(f"dropped by the sender: {dropped or 0:.0f}")
    finally:
        # Stop the child before our server, so it does not log our going away.
        await sender.close()
        if child is not None:
            assert child.stdin is not None
            child.stdin.close()
            try:
                await asyncio.get_running_loop().run_in_executor(None, child.wait, 10)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        if receiver is not None:
            await receiver.close()
        if server2 is not None:
            await server2.stop(None)
        await server1.stop(None)


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=3.0, help="per case")
    p.add_argument("--burst", type=int, default=1000, help="small messages per iteration")
    p.add_argument("--groups", type=int, default=10_000, help="heartbeat groups per tick")
    p.add_argument("--entry-kib", type=int, default=1024, help="entry size of the large case")
    p.add_argument("--window-mib", type=int, default=32, help="unacknowledged MiB (large)")
    p.add_argument("--same-process", action="store_true", help="both nodes on one loop")
    p.add_argument("--uvloop", action="store_true")
    p.add_argument("--carrier", choices=("tcp", "grpc-stream"), default="tcp")
    p.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    p.add_argument("--peer", help=argparse.SUPPRESS)
    return p.parse_args()


def run() -> None:
    ns = parse()
    coro = serve_receiver(ns.serve, ns.peer, ns.carrier) if ns.serve is not None else main(ns)
    if ns.uvloop:
        import uvloop

        uvloop.run(coro)
    else:
        asyncio.run(coro)


if __name__ == "__main__":
    run()
