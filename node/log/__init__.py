"""The partition log: segment files with sparse offset and time indexes, which is also the
partition's Raft log (one record batch per Raft entry)."""

from .partition_log import ContinuityError, PartitionLog

__all__ = ["ContinuityError", "PartitionLog"]
