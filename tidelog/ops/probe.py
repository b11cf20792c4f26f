"""Sync Metadata calls to the nodes of a local cluster, and what keeps it from being ready."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Final

import grpc

from tidelog.ops.limits import (
    METADATA_TIMEOUT_S,
)
from tidelog.v1 import broker_pb2, broker_pb2_grpc

__all__ = [
    "Probe",
    "readiness_problem",
]


_CHANNEL_OPTIONS: Final = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 500),
]


# ---------------------------------------------------------------------------------------------
# Metadata over sync gRPC


class Probe:
    """Sync Metadata calls to the nodes, one channel per address, closed at the end."""

    def __init__(self) -> None:
        self._channels: dict[str, grpc.Channel] = {}

    def __enter__(self) -> Probe:
        return self

    def __exit__(self, *exc: object) -> None:
        for ch in self._channels.values():
            ch.close()
        self._channels.clear()

    def metadata(
        self, address: str, timeout_s: float = METADATA_TIMEOUT_S
    ) -> broker_pb2.MetadataResponse | None:
        ch = self._channels.get(address)
        if ch is None:
            ch = self._channels[address] = grpc.insecure_channel(address, options=_CHANNEL_OPTIONS)
        stub = broker_pb2_grpc.BrokerStub(ch)
        try:
            resp: broker_pb2.MetadataResponse = stub.Metadata(
                broker_pb2.MetadataRequest(), timeout=timeout_s
            )
        except grpc.RpcError:
            return None
        return resp


def readiness_problem(
    node_ids: Sequence[int], answers: Mapping[int, broker_pb2.MetadataResponse | None]
) -> tuple[int | None, str] | None:
    """What keeps the cluster from being ready, as (node to blame or None, reason), or None
    when every node answers Metadata with a controller leader and every node registered
    alive. Every answer must be complete so that any node can serve as a bootstrap."""
    for node_id in node_ids:
        resp = answers.get(node_id)
        if resp is None:
            return node_id, f"node {node_id} does not answer Metadata yet"
    for node_id in node_ids:
        resp = answers[node_id]
        assert resp is not None
        if resp.controller_id < 0:
            return None, f"node {node_id} sees no controller leader"
        alive = {n.node_id for n in resp.nodes if n.alive}
        missing = [i for i in node_ids if i not in alive]
        if missing:
            names = ",".join(map(str, missing))
            return missing[0], f"node {node_id} does not list node(s) {names} as registered alive"
    return None
