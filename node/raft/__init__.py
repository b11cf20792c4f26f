"""A pure, deterministic Raft core in the manner of etcd raft: no I/O, clock or randomness.

Start with ``core.RawNode`` (the driver interface and the protocol choices), ``types.Ready``
(the persist-before-send contract) and ``storage`` (what the driver persists and the core
reads). ``limits.Config`` holds every knob and bound.
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
