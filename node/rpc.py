"""What every servicer method shares: TidelogError -> gRPC status with ErrorInfo, request
counting and latency by API and status code.

A decorator rather than a server interceptor: grpc.aio interceptors add a layer of calls to
every RPC, while this costs two clock reads and two pre-bound metric updates. Errors are
raised as :class:`TidelogError` in the node's logic and turned into a status only here;
anything else is a bug, reported as INTERNAL with a log line, and the node keeps serving.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any, NoReturn, Protocol, TypeVar

import grpc
from grpc import aio

from tidelog.errors import (
    MESSAGE_CHARS_MAX,
    STATUS_DETAILS_KEY,
    TidelogError,
    excerpt,
    to_status_details,
)
from tidelog.node.metrics import ApiMetrics, NodeMetrics

log = logging.getLogger(__name__)

Req = TypeVar("Req")
Resp = TypeVar("Resp")
S = TypeVar("S", bound="HasMetrics")

Context = aio.ServicerContext[Any, Any]


class HasMetrics(Protocol):
    metrics: NodeMetrics


async def _abort(api: ApiMetrics, context: Context, exc: BaseException) -> NoReturn:
    if isinstance(exc, TidelogError):
        api.count(exc.code)
        code, message, details = to_status_details(exc)
        await context.abort(code, message, trailing_metadata=((STATUS_DETAILS_KEY, details),))
    log.error("%s failed with an unexpected error", api.api, exc_info=exc)
    api.count(grpc.StatusCode.INTERNAL)
    text = excerpt(f"{type(exc).__name__}: {exc}", MESSAGE_CHARS_MAX // 2)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {api.api}: {text}")
    raise AssertionError("unreachable: abort raises")  # pragma: no cover


def unary(
    name: str,
) -> Callable[
    [Callable[[S, Req, Context], Awaitable[Resp]]], Callable[[S, Req, Context], Awaitable[Resp]]
]:
    def decorate(
        fn: Callable[[S, Req, Context], Awaitable[Resp]],
    ) -> Callable[[S, Req, Context], Awaitable[Resp]]:
        @functools.wraps(fn)
        async def handler(self: S, request: Req, context: Context) -> Resp:
            api = self.metrics.api(name)
            t0 = time.perf_counter()
            self.metrics.in_flight += 1
            try:
                response = await fn(self, request, context)
            except asyncio.CancelledError:
                api.count(grpc.StatusCode.CANCELLED)
                raise
            except aio.AbortError:
                raise
            except Exception as exc:
                api.latency.observe(time.perf_counter() - t0)
                await _abort(api, context, exc)
            finally:
                self.metrics.in_flight -= 1
            api.latency.observe(time.perf_counter() - t0)
            api.ok.inc()
            return response

        return handler

    return decorate


def stream(
    name: str,
) -> Callable[
    [Callable[[S, Req, Context], AsyncGenerator[Resp, None]]],
    Callable[[S, Req, Context], Awaitable[None]],
]:
    """For server streams, written from an async generator of responses. The handler writes
    each response itself (``await context.write``), which returns once gRPC's flow control
    took it, and only then asks the generator for the next: a client that stops reading
    stops the stream. A client that goes away mid-write is a cancellation, logged without a
    traceback. The latency recorded is the time to the first response."""

    def decorate(
        fn: Callable[[S, Req, Context], AsyncGenerator[Resp, None]],
    ) -> Callable[[S, Req, Context], Awaitable[None]]:
        @functools.wraps(fn)
        async def handler(self: S, request: Req, context: Context) -> None:
            api = self.metrics.api(name)
            t0 = time.perf_counter()
            first = True
            self.metrics.in_flight += 1
            responses = fn(self, request, context)
            try:
                async for response in responses:
                    if first:
                        api.latency.observe(time.perf_counter() - t0)
                        first = False
                    try:
                        await context.write(response)
                    except Exception as exc:
                        # gRPC fails a write only when the call is over: the client
                        # cancelled it or its connection closed. Nobody is left to tell.
                        api.count(grpc.StatusCode.CANCELLED)
                        log.info("%s: the stream ended mid-write (%s)", api.api, type(exc).__name__)
                        return
            except asyncio.CancelledError:
                api.count(grpc.StatusCode.CANCELLED)
                raise
            except aio.AbortError:
                raise
            except Exception as exc:
                await _abort(api, context, exc)
            finally:
                self.metrics.in_flight -= 1
                await responses.aclose()
            api.ok.inc()

        return handler

    return decorate
