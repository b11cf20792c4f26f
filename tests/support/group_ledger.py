"""Group members under observation, for the live group tests and the group benchmark.

Every member, in this process (:class:`InProcessMember`) or its own
(:class:`ProcessMember`, tests/support/group_member.py, which can be killed with SIGKILL),
writes what happens to it into one :class:`Ledger`: when it was given and when it gave up each
partition (its callbacks), and which records it processed (what poll returned), with
wall-clock times. :meth:`Ledger.check_exclusive` then checks that no partition was ever owned
by two members at once (a killed member's ownership ends at its kill), and
:meth:`Ledger.processed` what was read by anyone.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tidelog.client import Consumer, TopicPartition

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True, slots=True)
class Event:
    t: float
    member: str
    kind: str  # assigned, revoked, lost, killed
    tps: tuple[TopicPartition, ...]


@dataclass
class Ledger:
    events: list[Event] = field(default_factory=list)
    #: (time, member, partition, first offset, last offset) per polled batch.
    batches: list[tuple[float, str, TopicPartition, int, int]] = field(default_factory=list)
    #: Called on every event (a benchmark's clock).
    watchers: list[Callable[[Event], None]] = field(default_factory=list)

    def add(self, event: Event) -> None:
        self.events.append(event)
        for w in self.watchers:
            w(event)

    def owned(self, member: str) -> set[TopicPartition]:
        out: set[TopicPartition] = set()
        for e in self.events:
            if e.member != member:
                continue
            if e.kind == "assigned":
                out.update(e.tps)
            else:
                out.difference_update(e.tps)
        return out

    def intervals(self) -> dict[TopicPartition, list[tuple[float, float, str]]]:
        """Per partition, every (start, end, member) of ownership; an open one ends now."""
        opened: dict[tuple[str, TopicPartition], float] = {}
        out: dict[TopicPartition, list[tuple[float, float, str]]] = {}
        for e in sorted(self.events, key=lambda e: e.t):
            if e.kind == "killed":
                for (member, tp), start in list(opened.items()):
                    if member == e.member:
                        out.setdefault(tp, []).append((start, e.t, member))
                        del opened[(member, tp)]
                continue
            for tp in e.tps:
                key = (e.member, tp)
                if e.kind == "assigned":
                    assert key not in opened, f"{e.member} was given {tp} twice"
                    opened[key] = e.t
                elif key in opened:
                    out.setdefault(tp, []).append((opened.pop(key), e.t, e.member))
        now = time.time()
        for (member, tp), start in opened.items():
            out.setdefault(tp, []).append((start, now, member))
        return out

    def check_exclusive(self) -> None:
        for tp, spans in self.intervals().items():
            spans.sort()
            for (_, e1, m1), (s2, _, m2) in itertools.pairwise(spans):
                assert e1 <= s2, (
                    f"{tp} owned by {m1} until {e1:.3f} and by {m2} from {s2:.3f}: overlap"
                )

    def check_reads_within_ownership(self) -> None:
        spans = self.intervals()
        for t, member, tp, first, _ in self.batches:
            mine = [(s, e) for s, e, m in spans.get(tp, []) if m == member]
            assert any(s <= t <= e for s, e in mine), (
                f"{member} read {tp} at offset {first} at {t:.3f} outside its ownership {mine}"
            )

    def processed(self) -> set[tuple[TopicPartition, int]]:
        return {(tp, o) for _, _, tp, first, last in self.batches for o in range(first, last + 1)}


class InProcessMember:
    """A Consumer in this process polling in its own task."""

    def __init__(self, ledger: Ledger, name: str, bootstrap: str, **options: Any) -> None:
        self.ledger = ledger
        self.name = name
        self.consumer = Consumer(bootstrap, auto_offset_reset="earliest", **options)
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()

    def _cb(self, kind: str) -> Callable[[list[TopicPartition]], None]:
        def record(tps: list[TopicPartition]) -> None:
            self.ledger.add(Event(time.time(), self.name, kind, tuple(tps)))

        return record

    async def start(self, topics: list[str]) -> None:
        await self.consumer.start()
        self.consumer.subscribe(
            topics,
            on_assigned=self._cb("assigned"),
            on_revoked=self._cb("revoked"),
            on_lost=self._cb("lost"),
        )
        self._task = asyncio.get_running_loop().create_task(self._run(), name=self.name)

    async def _run(self) -> None:
        while not self._stop.is_set():
            for b in await self.consumer.poll_batches(timeout_ms=100):
                self.ledger.batches.append(
                    (
                        time.time(),
                        self.name,
                        TopicPartition(b.topic, b.partition),
                        b.records[0].offset,
                        b.records[-1].offset,
                    )
                )

    async def stop(self) -> None:
        """Graceful: stop polling, then close (revoke, commit, leave)."""
        self._stop.set()
        if self._task is not None:
            await self._task
        await self.consumer.stop()


class ProcessMember:
    """tests/support/group_member.py in a child process; SIGKILL-able."""

    def __init__(self, ledger: Ledger, name: str, bootstrap: str, **options: Any) -> None:
        self.ledger = ledger
        self.name = name
        self.bootstrap = bootstrap
        self.options = options
        self.proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self.ready = asyncio.Event()

    async def start(self, topics: list[str]) -> None:
        argv = [
            sys.executable,
            "-m",
            "tests.support.group_member",
            "--bootstrap",
            self.bootstrap,
            "--topic",
            ",".join(topics),
        ]
        for k, v in self.options.items():
            if v is not None:
                argv += [f"--{k.replace('_', '-')}", str(v)]
        self.proc = await asyncio.create_subprocess_exec(
            *argv,
            cwd=REPO,
            stdout=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        self._reader = asyncio.get_running_loop().create_task(self._read())
        async with asyncio.timeout(30):
            await self.ready.wait()

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        async for line in self.proc.stdout:
            obj = json.loads(line)
            ev = obj["ev"]
            if ev == "ready":
                self.ready.set()
            elif ev in ("assigned", "revoked", "lost"):
                tps = tuple(TopicPartition(t, p) for t, p in obj["tps"])
                self.ledger.add(Event(obj["t"], self.name, ev, tps))
            elif ev == "records":
                for t, p, first, last, _ in obj["batches"]:
                    self.ledger.batches.append(
                        (obj["t"], self.name, TopicPartition(t, p), first, last)
                    )

    async def kill(self) -> float:
        """SIGKILL; the time of the kill (its ownership ends there)."""
        assert self.proc is not None
        at = time.time()
        self.proc.send_signal(signal.SIGKILL)
        await self.proc.wait()
        self.ledger.add(Event(at, self.name, "killed", ()))
        if self._reader is not None:
            await self._reader
        return at

    async def stop(self) -> None:
        """SIGTERM: the member closes gracefully."""
        if self.proc is None or self.proc.returncode is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(30):
                await self.proc.wait()
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
        if self._reader is not None:
            await self._reader


async def until(what: str, check: Callable[[], bool | Awaitable[bool]], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = check()
        if not isinstance(got, bool):
            got = await got
        if got:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"not within {timeout_s} s: {what}")
