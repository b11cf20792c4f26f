"""Errors of the Raft core and its storage.

These stay inside the node: the replica layer turns ``NotRaftLeader`` into the client-facing
``tidelog.errors.NotLeader`` status with the leader's address (two names, so that a reader
always knows which layer an error belongs to).
"""

from __future__ import annotations

from .types import NONE


class RaftError(Exception):
    """Base of every error the Raft core or its storage raises on purpose."""


class ProposalDropped(RaftError):
    """The core refused a proposal; nothing was appended. ``leader_id`` is the leader this
    node knows of (``NONE`` if unknown), so the caller can redirect or retry."""

    def __init__(self, reason: str, leader_id: int = NONE) -> None:
        super().__init__(f"proposal dropped: {reason} (known leader: {leader_id or 'none'})")
        self.reason = reason
        self.leader_id = leader_id


class NotRaftLeader(ProposalDropped):
    """This node is not the Raft leader of the group (or has stepped down after losing its
    quorum). Not to be confused with the client-facing ``tidelog.errors.NotLeader``."""


class CompactedError(RaftError):
    """The requested index lies before the first index the storage still holds
    (compacted away by retention); the leader must send a snapshot instead."""

    def __init__(self, index: int, first_index: int) -> None:
        super().__init__(f"index {index} is compacted (first index {first_index})")
        self.index = index
        self.first_index = first_index


class UnavailableError(RaftError):
    """The requested index lies after the last index the storage holds."""

    def __init__(self, index: int, last_index: int) -> None:
        super().__init__(f"index {index} is unavailable (last index {last_index})")
        self.index = index
        self.last_index = last_index


class SnapshotTemporarilyUnavailable(RaftError):
    """The application has no snapshot ready yet; the leader retries on a later heartbeat."""


class SnapshotOutOfDate(RaftError):
    """The snapshot to install is older than what the storage already holds."""
