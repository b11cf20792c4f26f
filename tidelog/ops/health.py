"""``tidelog cluster health``: the health of a cluster as one node's Metadata shows it (any
cluster, reached with --bootstrap, as ``rpk cluster health``): the nodes the controller lists
and whether it thinks them alive, the active controller, under-replicated and leaderless
partitions. :func:`assess` is pure (for tests); the CLI command is in tidelog/ops/cli.py.

Healthy means: an active controller is known, every registered node is alive, and every
partition (internal ones included) has a leader and all its replicas in sync.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tidelog.client.admin import ClusterView

__all__ = ["Health", "assess", "health_to_json", "render_health"]


@dataclass(frozen=True, slots=True)
class Health:
    cluster_id: str
    #: 0 when no active controller is known.
    controller_id: int
    nodes: tuple[int, ...]
    down: tuple[int, ...]
    partitions: int
    #: "topic/partition"
    under_replicated: tuple[str, ...]
    leaderless: tuple[str, ...]
    #: Why the answering node has no controller yet (ClusterView.controller_waiting).
    controller_waiting: str = ""

    @property
    def problems(self) -> list[str]:
        out: list[str] = []
        if self.controller_id <= 0:
            waiting = f" ({self.controller_waiting})" if self.controller_waiting else ""
            out.append(f"no active controller{waiting}")
        if not self.nodes:
            out.append("no node is registered")
        if self.down:
            out.append(f"nodes down: {', '.join(map(str, self.down))}")
        if self.leaderless:
            out.append(f"{len(self.leaderless)} leaderless partition(s)")
        if self.under_replicated:
            out.append(f"{len(self.under_replicated)} under-replicated partition(s)")
        return out

    @property
    def healthy(self) -> bool:
        return not self.problems


def assess(view: ClusterView) -> Health:
    under: list[str] = []
    leaderless: list[str] = []
    partitions = 0
    for t in view.topics:
        for p in t.partitions:
            partitions += 1
            name = f"{t.name}/{p.partition}"
            if p.leader < 0:
                leaderless.append(name)
            if len(set(p.in_sync) & set(p.replicas)) < len(p.replicas):
                under.append(name)
    return Health(
        cluster_id=view.cluster_id,
        controller_id=max(0, view.controller_id),
        nodes=tuple(sorted(n.node_id for n in view.nodes)),
        down=tuple(sorted(n.node_id for n in view.nodes if not n.alive)),
        partitions=partitions,
        under_replicated=tuple(under),
        leaderless=tuple(leaderless),
        controller_waiting="" if view.controller_id > 0 else view.controller_waiting,
    )


def _list(items: tuple[Any, ...], limit: int = 20) -> str:
    shown = ", ".join(map(str, items[:limit]))
    more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
    return f"[{shown}]{more}"


def render_health(h: Health) -> str:
    """rpk-style lines: one fact per line, ``Healthy:`` first."""
    alive = tuple(n for n in h.nodes if n not in h.down)
    lines = [
        f"Healthy:                      {str(h.healthy).lower()}",
        f"Cluster id:                   {h.cluster_id}",
        f"Controller id:                {h.controller_id or 'none'}",
        f"All nodes:                    {_list(h.nodes)}",
        f"Nodes up:                     {_list(alive)}",
        f"Nodes down:                   {_list(h.down)}",
        f"Partitions:                   {h.partitions}",
        f"Leaderless partitions:        {_list(h.leaderless)}",
        f"Under-replicated partitions:  {_list(h.under_replicated)}",
    ]
    if h.problems:
        lines.append(f"Problems:                     {'; '.join(h.problems)}")
    return "\n".join(lines)


def health_to_json(h: Health) -> dict[str, Any]:
    return {
        "healthy": h.healthy,
        "cluster_id": h.cluster_id,
        "controller_id": h.controller_id,
        "nodes": list(h.nodes),
        "nodes_down": list(h.down),
        "partitions": h.partitions,
        "leaderless": list(h.leaderless),
        "under_replicated": list(h.under_replicated),
        "problems": h.problems,
    }
