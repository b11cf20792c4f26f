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
from typing import Final, Protocol

#: Key of the directory id in the node's metadata column.
DIRECTORY_ID_KEY: Final = b"directory_id"
#: Key of the boot id of the machine that last used the data directory.
BOOT_ID_KEY: Final = b"boot_id"
#: Linux's id of the current boot (a new random UUID at every boot).
BOOT_ID_PATH: Final = "/proc/sys/kernel/random/boot_id"


class _Store(Protocol):
    def get(self, column: str, key: bytes) -> bytes | None: ...
    def put(self, column: str, key: bytes, value: bytes, *, sync: bool = True) -> None: ...


def read_boot_id(path: str = BOOT_ID_PATH) -> str | None:
    """The machine's boot id, or None where the system does not tell (not Linux)."""
    try:
        with open(path, encoding="ascii") as f:
            return f.read().strip() or None
    except OSError:
        return None


def machine_restarted(store: _Store, column: str, boot_id: str | None) -> bool:
    """Whether the machine may have restarted (lost its page cache) since the data directory
    was last used, and record the current boot (synced). A process restart keeps the boot id,
    and what it wrote without fsync is still in the page cache; a new boot id, no stored one
    (a directory of an older version) or no boot id at all (another system) counts as a
    restart: losses of unsynced writes (flush=os) are then possible, and assumed."""
    if boot_id is None:
        return True
    current = boot_id.encode()
    if store.get(column, BOOT_ID_KEY) == current:
        return False
    store.put(column, BOOT_ID_KEY, current, sync=True)
    return True


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
