"""Who this node is, as the Metadata API reports it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class NodeIdentity:
    node_id: int
    #: host:port clients should dial (the advertised address).
    address: str
    #: host:port of the Prometheus endpoint.
    metrics_address: str
    cluster_id: str
    rack: str = ""
    #: This node's data directory (a UUID made when it was first used; a wiped directory
    #: has a new one).
    directory_id: str = ""
