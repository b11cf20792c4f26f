"""``DIR/cluster.json``: the record of a local cluster's nodes (ids, pids, addresses, data and
log paths, and the command line that restarts each), written atomically, and the directory
lock that serializes commands which rewrite it or start processes.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tidelog.errors import TidelogError
from tidelog.ops.limits import (
    CLUSTER_FILE,
    CLUSTER_FILE_VERSION,
    LOCK_FILE,
    LOCK_WAIT_S,
    POLL_INTERVAL_S,
)

__all__ = [
    "ClusterError",
    "ClusterFile",
    "NodeSpec",
    "load_cluster",
    "locked",
    "save_cluster",
]


class ClusterError(TidelogError):
    """Something about the local cluster the user can fix (named in the message)."""

    reason = "LOCAL_CLUSTER"


# ---------------------------------------------------------------------------------------------
# cluster.json


@dataclass(frozen=True, slots=True)
class NodeSpec:
    """One node of the local cluster as cluster.json records it; ``argv`` restarts it."""

    node_id: int
    pid: int
    address: str
    metrics_address: str
    data_dir: Path
    log_path: Path
    argv: tuple[str, ...]
    #: The node's internal (node-to-node) listener; "" in a cluster.json of before the split.
    internal_address: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "internal_address": self.internal_address,
            "id": self.node_id,
            "pid": self.pid,
            "address": self.address,
            "metrics_address": self.metrics_address,
            "data_dir": str(self.data_dir),
            "log": str(self.log_path),
            "argv": list(self.argv),
        }

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> NodeSpec:
        if not isinstance(obj, Mapping):
            raise ValueError("a node is not a JSON object")
        argv = obj["argv"]
        if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv) or not argv:
            raise ValueError("argv must be a non-empty list of strings")
        for key in ("id", "pid"):
            if not isinstance(obj[key], int) or isinstance(obj[key], bool):
                raise ValueError(f"{key} must be an integer")
        for key in ("address", "metrics_address", "data_dir", "log"):
            if not isinstance(obj[key], str):
                raise ValueError(f"{key} must be a string")
        internal = obj.get("internal_address", "")
        if not isinstance(internal, str):
            raise ValueError("internal_address must be a string")
        return cls(
            node_id=obj["id"],
            pid=obj["pid"],
            address=obj["address"],
            metrics_address=obj["metrics_address"],
            data_dir=Path(obj["data_dir"]),
            log_path=Path(obj["log"]),
            argv=tuple(argv),
            internal_address=internal,
        )


@dataclass(frozen=True, slots=True)
class ClusterFile:
    """The contents of DIR/cluster.json."""

    directory: Path
    nodes: tuple[NodeSpec, ...]
    controller_voters: str
    created_ms: int
    #: The CA that verifies the nodes' client listeners when they serve TLS (optional; the
    #: CLI then connects with TLS and this CA unless given --tls-ca).
    tls_ca: Path | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "version": CLUSTER_FILE_VERSION,
            "created_ms": self.created_ms,
            "controller_voters": self.controller_voters,
            "nodes": [n.to_json() for n in self.nodes],
        }
        if self.tls_ca is not None:
            out["tls_ca"] = str(self.tls_ca)
        return out

    @classmethod
    def from_json(cls, obj: Mapping[str, Any], directory: Path) -> ClusterFile:
        if not isinstance(obj, Mapping):
            raise ValueError("the top level is not a JSON object")
        if obj.get("version") != CLUSTER_FILE_VERSION:
            raise ValueError(f"version {obj.get('version')!r} is not {CLUSTER_FILE_VERSION}")
        nodes = tuple(NodeSpec.from_json(n) for n in obj["nodes"])
        ids = [n.node_id for n in nodes]
        if len(set(ids)) != len(ids):
            raise ValueError(f"node ids repeat: {ids}")
        tls_ca = obj.get("tls_ca")
        if tls_ca is not None and not isinstance(tls_ca, str):
            raise ValueError("tls_ca must be a string (a path)")
        return cls(
            directory=directory,
            nodes=nodes,
            controller_voters=str(obj["controller_voters"]),
            created_ms=int(obj["created_ms"]),
            tls_ca=None if tls_ca is None else directory / tls_ca,
        )

    @property
    def path(self) -> Path:
        return self.directory / CLUSTER_FILE

    def node(self, node_id: int) -> NodeSpec:
        for n in self.nodes:
            if n.node_id == node_id:
                return n
        known = ", ".join(str(n.node_id) for n in self.nodes)
        raise ClusterError(
            f"the local cluster in {self.directory} has no node {node_id} (nodes: {known})"
        )

    def with_pid(self, node_id: int, pid: int) -> ClusterFile:
        nodes = tuple(replace(n, pid=pid) if n.node_id == node_id else n for n in self.nodes)
        return replace(self, nodes=nodes)


def load_cluster(directory: Path) -> ClusterFile:
    """Read DIR/cluster.json; a missing or damaged file is a ClusterError saying what to do."""
    path = directory / CLUSTER_FILE
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ClusterError(
            f"no local cluster in {directory} ({CLUSTER_FILE} not found); start one with "
            "`tidelog cluster up --nodes 3` or pass --dir"
        ) from None
    except OSError as exc:
        raise ClusterError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        return ClusterFile.from_json(json.loads(text), directory)
    except (ValueError, KeyError, TypeError) as exc:
        raise ClusterError(
            f"{path} is not a tidelog cluster file ({exc}); remove {directory} "
            "(`tidelog cluster down --purge` if its nodes are stopped) or pass another --dir"
        ) from None


def save_cluster(cluster: ClusterFile) -> None:
    """Write cluster.json atomically: a reader never sees half a file."""
    cluster.directory.mkdir(parents=True, exist_ok=True)
    tmp = cluster.path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(cluster.to_json(), indent=2) + "\n")
    os.replace(tmp, cluster.path)


@contextlib.contextmanager
def locked(directory: Path, wait_s: float = LOCK_WAIT_S) -> Iterator[None]:
    """Serialize commands that rewrite cluster.json or start processes in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise ClusterError(
                        f"another tidelog cluster command has held {directory / LOCK_FILE} "
                        f"for {wait_s:.0f} s; wait for it to finish"
                    ) from None
                time.sleep(POLL_INTERVAL_S)
        yield
    finally:
        os.close(fd)  # closing releases the lock
