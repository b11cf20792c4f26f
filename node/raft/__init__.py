"""A pure, deterministic Raft core in the manner of etcd raft: no I/O, clock or randomness.

Start with ``core.RawNode`` (the driver interface and the protocol choices), ``types.Ready``
(the persist-before-send contract) and ``storage`` (what the driver persists and the core
reads). ``limits.Config`` holds every knob and bound.

Four layers are "the log"; from the core down:

- ``raft/raft_log.py`` ``RaftLog``: the core's view, the stored part plus the unstable tail
  (private to the core; the driver uses ``RawNode``'s accessors);
- ``raft/storage.py`` ``StorageReader``: what the core reads from storage (``MemoryStorage``
  implements it for tests and the simulator);
- ``node/replica_storage.py`` ``ReplicaStorage``: that interface over one partition's files,
  with the hard states in RocksDB;
- ``node/log/`` ``PartitionLog``: the segment files themselves.
"""

from .core import RawNode
from .errors import NotRaftLeader, ProposalDropped, RaftError
from .limits import DEFAULT_CONFIG, Config, Rand
from .storage import MemoryStorage, Storage, StorageReader
from .types import (
    NONE,
    ConfState,
    Entry,
    EntryKind,
    HardState,
    Message,
    MessageKind,
    ReadState,
    Ready,
    Role,
    Snapshot,
    SnapshotMeta,
    SoftState,
)

__all__ = [
    "DEFAULT_CONFIG",
    "NONE",
    "ConfState",
    "Config",
    "Entry",
    "EntryKind",
    "HardState",
    "MemoryStorage",
    "Message",
    "MessageKind",
    "NotRaftLeader",
    "ProposalDropped",
    "RaftError",
    "Rand",
    "RawNode",
    "ReadState",
    "Ready",
    "Role",
    "Snapshot",
    "SnapshotMeta",
    "SoftState",
    "Storage",
    "StorageReader",
]
