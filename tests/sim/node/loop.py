"""A deterministic asyncio event loop on a virtual clock, and the executor seam over it.

:class:`SimLoop` is an ``asyncio.BaseEventLoop`` whose ``time()`` is a number the loop
owns. It has no sockets and no selector: when nothing is ready it jumps the clock to the
next timer instead of waiting, so a simulated minute takes the CPU time of its callbacks.
Callbacks run in the order asyncio defines (FIFO ready queue, timers by deadline, ties in
scheduling order), so one seed gives one interleaving.

:class:`SimExecutor` replaces the fsync thread pool: a submitted call runs ON the loop
thread after a delay the simulation draws (an fsync's latency, or a stall), so "the fsync
is running" is a real window in which the node keeps receiving messages and may crash.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


class Deadlock(RuntimeError):
    """Nothing is ready and no timer is pending: the loop would wait forever."""


class _NoSelector:
    def __init__(self, loop: SimLoop) -> None:
        self._loop = loop

    def select(self, timeout: float | None) -> list[Any]:
        if timeout is None:
            raise Deadlock("the simulated event loop has nothing left to run")
        if timeout > 0:
            self._loop.now += timeout
        return []

    def close(self) -> None:
        pass


class SimLoop(asyncio.BaseEventLoop):
    """See the module docstring."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self._selector = _NoSelector(self)  # type: ignore[assignment]
        self._clock_resolution = 1e-9

    def time(self) -> float:
        return self.now

    def _process_events(self, event_list: list[Any]) -> None:
        pass

    def _write_to_self(self) -> None:
        pass


class SimExecutor(concurrent.futures.Executor):
    """Runs each call on ``loop`` after ``delay(fn, args)`` seconds of virtual time.
    ``cancel_all`` (a crash) drops the calls not run yet: their fsyncs never happened."""

    def __init__(
        self, loop: SimLoop, delay: Callable[[Callable[..., Any], tuple[Any, ...]], float]
    ) -> None:
        self._loop = loop
        self._delay = delay
        self._pending: dict[int, tuple[asyncio.TimerHandle, concurrent.futures.Future[Any]]] = {}
        self._seq = 0

    def submit(  # type: ignore[override]
        self, fn: Callable[..., T], /, *args: Any, **kwargs: Any
    ) -> concurrent.futures.Future[T]:
        fut: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._seq += 1
        key = self._seq

        def run() -> None:
            self._pending.pop(key, None)
            if not fut.set_running_or_notify_cancel():
                return
            try:
                result = fn(*args, **kwargs)
            except BaseException as exc:
                fut.set_exception(exc)
            else:
                fut.set_result(result)

        handle = self._loop.call_later(self._delay(fn, args), run)
        self._pending[key] = (handle, fut)
        return fut

    def cancel_all(self) -> None:
        for handle, fut in self._pending.values():
            handle.cancel()
            fut.cancel()
        self._pending.clear()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        pass


__all__ = ["Deadlock", "SimExecutor", "SimLoop"]
