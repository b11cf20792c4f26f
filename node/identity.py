"""Who this node is: what the Metadata API reports (:class:`NodeIdentity`), and the identity
of its data directory, which no API reports.

The directory id is a random token created with the data directory and kept in it. A node
presents it when it registers with the controller (``RegisterNode.directory_id``): a node id
that is already registered is taken over from another address only by the data directory it
was registered with (``controller/state.py``). It is a proof against a second node started
with the same id by mistake and against a forger that knows only what Metadata hands out; it
travels unencrypted between nodes until node authentication (issue 9, A2) protects it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

#: Key of the directory id in the node's metadata column.
DIRECTORY_ID_KEY: Final = b"directory_id"


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
