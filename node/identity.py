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

import secrets
from dataclasses import dataclass
from typing import Final, Protocol

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


class _Store(Protocol):
    def get(self, column: str, key: bytes) -> bytes | None: ...

    def put(self, column: str, key: bytes, value: bytes) -> None: ...


def load_directory_id(store: _Store, column: str) -> str:
    """The data directory's id, created (128 random bits, hex) on its first start."""
    raw = store.get(column, DIRECTORY_ID_KEY)
    if raw is not None:
        return raw.decode("ascii")
    directory_id = secrets.token_hex(16)
    store.put(column, DIRECTORY_ID_KEY, directory_id.encode("ascii"))
    return directory_id
