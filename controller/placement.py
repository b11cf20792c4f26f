"""Replica placement: which nodes hold the replicas of a new topic's partitions, and which
replica leads first.

A pure, deterministic function of its arguments. The active controller runs it when it
proposes a CreateTopic and writes the result into the command, so applying the command on
every node needs no choice of its own.

No racks, or racks of equal size: the nodes sit on a circle (rack-interleaved when racks are
given, so consecutive positions lie in consecutive racks) and replica slots are dealt round
the circle, RF consecutive slots per partition. Dealing round-robin keeps replica counts
within one of each other however many partitions there are; consecutive positions make a
partition's replicas distinct nodes in distinct racks. Each lap round the circle starts one
step (one rack-group) further on, so follower sets vary and a dead node's partitions fall back
on many peers rather than the same two. Leaders: a round of n partitions fills RF laps and
holds each node RF times, an RF-regular bipartite graph between partitions and nodes, which
has a perfect matching (Konig's theorem): each node leads exactly one partition of every full
round, and the partitions of a last, partial round lead on distinct nodes. So leader counts
also stay within one of each other.

Racks of unequal sizes: balance and rack spread conflict (for RF=2, a one-node rack beside a
four-node rack must hold a replica of every partition). Rack spread wins, as in Kafka: a
greedy pass puts each leader on the node leading least, then each follower in a rack the
partition does not use yet, least loaded first.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from tidelog.errors import InvalidPartitions, InvalidReplicationFactor

#: Groups nodes by failure domain; a rackless node among racked ones is its own domain.
_RackKey = tuple[int, str]


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """What placement needs to know of a node: its id and, when known, its rack."""

    id: int
    rack: str | None = None


def assign_replicas(
    partitions: int,
    replication_factor: int,
    nodes: Sequence[NodeInfo],
    existing_load: Mapping[int, int] | None = None,
    seed_offset: int = 0,
    existing_leaders: Mapping[int, int] | None = None,
) -> list[tuple[int, ...]]:
    """The replicas of partitions ``0..partitions-1``, preferred leader first.

    ``existing_load`` (replicas per node) and ``existing_leaders`` (preferred leaderships per
    node) of the topics already placed steer the uneven remainder of this topic onto the
    least loaded nodes, so many small topics spread over the cluster too. ``seed_offset``
    turns the starting point of the circle (ties in load are otherwise broken by node id).
    The order of ``nodes`` does not matter.
    """
    if partitions < 0:
        raise InvalidPartitions(f"partitions must be at least 0, got {partitions}")
    if replication_factor < 1:
        raise InvalidReplicationFactor(
            f"replication factor must be at least 1, got {replication_factor}"
        )
    ids = [n.id for n in nodes]
    if len(set(ids)) != len(ids):
        dupes = sorted(i for i, c in Counter(ids).items() if c > 1)
        raise ValueError(f"node ids must be unique; repeated: {dupes}")
    if replication_factor > len(nodes):
        raise InvalidReplicationFactor(
            f"replication factor {replication_factor} is larger than the {len(nodes)} "
            f"available nodes; lower it or add nodes"
        )
    if partitions == 0:
        return []
    load = existing_load or {}
    leads = existing_leaders or {}
    racks = _group_by_rack(nodes, load)
    if racks is None:
        order = sorted(ids, key=lambda i: (load.get(i, 0), i))
        step = 1
    elif len({len(members) for members in racks}) == 1:
        # Interleave: position i lies in rack i mod R, as long as the circle turns by whole
        # multiples of R (n is a multiple of R here, so every rotation does).
        order = [members[i] for i in range(len(racks[0])) for members in racks]
        step = len(racks)
    else:
        return _greedy_rack_first(partitions, replication_factor, nodes, load, leads, seed_offset)
    n = len(order)
    shift = seed_offset % n
    order = order[shift:] + order[:shift]
    # Two consecutive laps turned by `step` keep a window that spans their boundary distinct
    # only while step + RF <= n; otherwise every lap starts at the same place.
    if step + replication_factor > n:
        step = 0
    return _deal(partitions, replication_factor, order, step, leads)


def _group_by_rack(nodes: Sequence[NodeInfo], load: Mapping[int, int]) -> list[list[int]] | None:
    """Node ids per rack, racks by (total load, name), members by (load, id); None: no racks."""
    if all(n.rack is None for n in nodes):
        return None
    groups: dict[_RackKey, list[int]] = {}
    for n in nodes:
        key: _RackKey = (0, n.rack) if n.rack is not None else (1, str(n.id))
        groups.setdefault(key, []).append(n.id)
    for members in groups.values():
        members.sort(key=lambda i: (load.get(i, 0), i))
    keys = sorted(groups, key=lambda k: (sum(load.get(i, 0) for i in groups[k]), k))
    return [groups[k] for k in keys]


def _deal(
    partitions: int,
    rf: int,
    order: list[int],
    step: int,
    leads: Mapping[int, int],
) -> list[tuple[int, ...]]:
    n = len(order)
    last_lap = (partitions * rf - 1) // n

    # Lap j turns by step * (j - last_lap): the last (possibly partial) lap starts at
    # position 0, where the least loaded nodes are.
    def position(slot: int) -> int:
        return (slot % n + step * (slot // n - last_lap)) % n

    windows = [[position(p * rf + i) for i in range(rf)] for p in range(partitions)]
    full_rounds, rest = divmod(partitions, n)
    leader_positions: list[int] = []
    if full_rounds:
        # Every full round is the first one turned by step * rf per round.
        first = _distinct_representatives(windows[:n], lambda w, v: (w.index(v),))
        turn = step * rf
        for r in range(full_rounds):
            leader_positions.extend((v + turn * r) % n for v in first)
    if rest:

        def prefer(window: list[int], v: int) -> tuple[int, int]:
            return (leads.get(order[v], 0), window.index(v))

        leader_positions.extend(_distinct_representatives(windows[full_rounds * n :], prefer))
    out: list[tuple[int, ...]] = []
    for window, lead in zip(windows, leader_positions, strict=True):
        # Followers in circle order after the leader.
        at = window.index(lead)
        out.append(tuple(order[v] for v in window[at:] + window[:at]))
    return out


def _distinct_representatives(
    windows: Sequence[list[int]],
    prefer: Callable[[list[int], int], tuple[int, ...]],
) -> list[int]:
    """One member per window, all distinct (a bipartite matching by augmenting paths).

    Windows are taken in order, each trying its members in ``prefer`` order; a member
    already taken is freed by moving its owner along an alternating path (breadth first, so
    the shortest reshuffle wins). The caller guarantees a matching saturating every window.
    """
    candidates = [_ranked(w, prefer) for w in windows]
    chosen = [-1] * len(windows)
    owner: dict[int, int] = {}
    for start in range(len(windows)):
        reached_from: dict[int, int] = {}
        queue = deque([start])
        free = -1
        while queue and free < 0:
            u = queue.popleft()
            for v in candidates[u]:
                if v in reached_from:
                    continue
                reached_from[v] = u
                if v not in owner:
                    free = v
                    break
                queue.append(owner[v])
        if free < 0:
            raise AssertionError(f"windows {windows} have no distinct representatives")
        v = free
        while True:
            u = reached_from[v]
            previous = chosen[u]
            chosen[u] = v
            owner[v] = u
            if u == start:
                break
            v = previous
    return chosen


def _ranked(window: list[int], prefer: Callable[[list[int], int], tuple[int, ...]]) -> list[int]:
    return sorted(window, key=lambda v: prefer(window, v))


def _greedy_rack_first(
    partitions: int,
    rf: int,
    nodes: Sequence[NodeInfo],
    load: Mapping[int, int],
    leads: Mapping[int, int],
    seed_offset: int,
) -> list[tuple[int, ...]]:
    ids = sorted((n.id for n in nodes), key=lambda i: (load.get(i, 0), i))
    n = len(ids)
    shift = seed_offset % n
    ids = ids[shift:] + ids[:shift]
    rank = {node: r for r, node in enumerate(ids)}
    rack = {m.id: (0, m.rack) if m.rack is not None else (1, str(m.id)) for m in nodes}
    replicas = {i: load.get(i, 0) for i in ids}
    led = {i: leads.get(i, 0) for i in ids}
    out: list[tuple[int, ...]] = []
    for p in range(partitions):
        leader = min(ids, key=lambda i: (led[i], replicas[i], (rank[i] - p) % n))
        chosen = [leader]
        used: Counter[_RackKey] = Counter({rack[leader]: 1})
        while len(chosen) < rf:
            # Fewest replicas of this partition in the rack first, then least loaded, then
            # the next one round the circle from the leader.
            _, nxt = min(
                ((used[rack[i]], replicas[i], (rank[i] - rank[leader]) % n), i)
                for i in ids
                if i not in chosen
            )
            chosen.append(nxt)
            used[rack[nxt]] += 1
        led[leader] += 1
        for i in chosen:
            replicas[i] += 1
        out.append(tuple(chosen))
    return out


def pick_replacement(
    keep: Sequence[int],
    exclude: Iterable[int],
    nodes: Sequence[NodeInfo],
    load: Mapping[int, int],
) -> int | None:
    """The node that should take one more replica of a partition whose other replicas are
    ``keep``: never one in ``exclude`` (the partition's current hosts, dead or draining
    nodes), a rack none of ``keep`` uses when there is one (racks respected), then the
    least loaded, then the lowest id. None when no node qualifies (no room)."""
    banned = set(exclude) | set(keep)
    rack = {n.id: n.rack for n in nodes}
    used = {rack.get(i) for i in keep if rack.get(i) is not None}
    best: tuple[int, int, int] | None = None
    for n in nodes:
        if n.id in banned:
            continue
        # A rackless node among racked ones is its own failure domain.
        shared = 1 if n.rack is not None and n.rack in used else 0
        key = (shared, load.get(n.id, 0), n.id)
        if best is None or key < best:
            best = key
    return None if best is None else best[2]
