"""How many Fetch streams a node keeps open, and how many bytes of responses they hold.

A Fetch stream reads the next response only once gRPC took the previous one (the servicer
writes with ``await context.write``, which waits for the transport's flow control), so a
stream whose client stops reading holds at most the one response being written. What is
left to bound is their number and the sum of those responses: per connection (gRPC's peer
string, address and port) and per node. Beyond the stream counts a new stream is refused
with RESOURCE_EXHAUSTED; the bytes are a budget a stream reserves before it reads and
returns once its response was written, so a stream over budget waits (its client, or
another, has to read first) instead of growing the node.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from tidelog.errors import ResourceExhausted


@dataclass(frozen=True, slots=True)
class FetchQuotaLimits:
    streams_per_peer_max: int
    streams_per_node_max: int
    buffered_bytes_per_peer_max: int
    buffered_bytes_per_node_max: int
    #: A reservation smaller than the request's max_bytes is granted once this much is free
    #: (the response is then cut to it; it still holds one whole batch).
    grant_bytes_min: int


class FetchQuota:
    def __init__(self, limits: FetchQuotaLimits) -> None:
        assert limits.grant_bytes_min <= limits.buffered_bytes_per_peer_max
        assert limits.buffered_bytes_per_peer_max <= limits.buffered_bytes_per_node_max
        assert limits.streams_per_peer_max <= limits.streams_per_node_max
        self.limits = limits
        self._streams: dict[str, int] = {}
        self._streams_total = 0
        self._bytes: dict[str, int] = {}
        self._bytes_total = 0
        self._freed = asyncio.Event()

    @property
    def open_streams(self) -> int:
        return self._streams_total

    @property
    def buffered_bytes(self) -> int:
        return self._bytes_total

    def open(self, peer: str) -> None:
        """Count a new stream of ``peer``; RESOURCE_EXHAUSTED beyond the limits."""
        lim = self.limits
        mine = self._streams.get(peer, 0)
        if mine >= lim.streams_per_peer_max:
            raise ResourceExhausted(
                f"this connection already has {mine} Fetch streams open, the most one "
                f"connection may hold ({lim.streams_per_peer_max}): close some, or open "
                "another connection"
            )
        if self._streams_total >= lim.streams_per_node_max:
            raise ResourceExhausted(
                f"this node already serves {self._streams_total} Fetch streams, its limit "
                f"({lim.streams_per_node_max}): retry later or fetch from another node"
            )
        self._streams[peer] = mine + 1
        self._streams_total += 1

    def close(self, peer: str) -> None:
        left = self._streams[peer] - 1
        if left:
            self._streams[peer] = left
        else:
            del self._streams[peer]
        self._streams_total -= 1

    def _room(self, peer: str) -> int:
        lim = self.limits
        return min(
            lim.buffered_bytes_per_peer_max - self._bytes.get(peer, 0),
            lim.buffered_bytes_per_node_max - self._bytes_total,
        )

    async def reserve(self, peer: str, want: int) -> int:
        """Wait until ``want`` bytes (or at least grant_bytes_min) are free; returns what
        was granted. The caller must ``release`` what it holds once its response was written."""
        need = min(want, self.limits.grant_bytes_min)
        while (room := self._room(peer)) < need:
            freed = self._freed
            await freed.wait()
        granted = min(want, room)
        self._add(peer, granted)
        return granted

    def adjust(self, peer: str, held: int, actual: int) -> None:
        """The response read under a grant of ``held`` is ``actual`` bytes (it may exceed
        the grant by one batch); the reservation becomes ``actual``."""
        self._add(peer, actual - held)
        if actual < held:
            self._wake()

    def release(self, peer: str, held: int) -> None:
        if held:
            self._add(peer, -held)
            self._wake()

    def _add(self, peer: str, n: int) -> None:
        total = self._bytes.get(peer, 0) + n
        if total:
            self._bytes[peer] = total
        else:
            self._bytes.pop(peer, None)
        self._bytes_total += n

    def _wake(self) -> None:
        event, self._freed = self._freed, asyncio.Event()
        event.set()


__all__ = ["FetchQuota", "FetchQuotaLimits"]
