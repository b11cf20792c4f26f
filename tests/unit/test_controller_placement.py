"""Replica placement: table cases, then properties over random clusters (hypothesis)."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tidelog.controller.placement import NodeInfo, assign_replicas
from tidelog.errors import InvalidPartitions, InvalidReplicationFactor


def plain(n: int) -> list[NodeInfo]:
    return [NodeInfo(i) for i in range(1, n + 1)]


def racked(*sizes: int) -> list[NodeInfo]:
    """Racks "a", "b", ... of the given sizes, node ids numbered across them."""
    out: list[NodeInfo] = []
    for r, size in enumerate(sizes):
        first = len(out) + 1
        out.extend(NodeInfo(first + i, chr(ord("a") + r)) for i in range(size))
    return out


def spread(counts: Counter[int], nodes: Sequence[NodeInfo]) -> int:
    values = [counts[n.id] for n in nodes]
    return max(values) - min(values)


def leader_counts(out: list[tuple[int, ...]]) -> Counter[int]:
    return Counter(r[0] for r in out)


def replica_counts(out: list[tuple[int, ...]]) -> Counter[int]:
    return Counter(x for r in out for x in r)


# -- tables --------------------------------------------------------------------------------


def test_golden_layouts() -> None:
    """Locks the layout: a change here moves replicas of topics created by older nodes only
    if someone re-places them, but proposals would differ between versions."""
    assert assign_replicas(6, 3, plain(6)) == [
        (5, 6, 1),
        (2, 3, 4),
        (6, 1, 2),
        (3, 4, 5),
        (1, 2, 3),
        (4, 5, 6),
    ]
    assert assign_replicas(3, 3, plain(3)) == [(1, 2, 3), (2, 3, 1), (3, 1, 2)]
    assert assign_replicas(2, 1, plain(3)) == [(1,), (2,)]


@pytest.mark.parametrize(
    ("nodes", "partitions", "rf", "leaders_each", "replicas_each"),
    [
        (plain(3), 6, 3, 2, 6),
        (plain(3), 3, 1, 1, 1),
        (plain(4), 8, 2, 2, 4),
        (plain(5), 10, 3, 2, 6),
        (plain(6), 12, 6, 2, 12),
        (racked(2, 2, 2), 6, 3, 1, 3),
        (racked(3, 3), 12, 2, 2, 4),
        (racked(1, 1, 1, 1), 8, 3, 2, 6),
    ],
)
def test_even_layouts_are_exactly_even(
    nodes: list[NodeInfo], partitions: int, rf: int, leaders_each: int, replicas_each: int
) -> None:
    out = assign_replicas(partitions, rf, nodes)
    assert len(out) == partitions
    assert all(len(set(r)) == rf for r in out)
    assert set(leader_counts(out).values()) == {leaders_each}
    assert set(replica_counts(out).values()) == {replicas_each}
    assert set(replica_counts(out)) == {n.id for n in nodes}


def test_racks_hold_one_replica_each() -> None:
    nodes = racked(3, 3, 3)
    rack = {n.id: n.rack for n in nodes}
    for rf in (1, 2, 3):
        for r in assign_replicas(30, rf, nodes):
            assert len({rack[x] for x in r}) == rf


def test_more_replicas_than_racks_cover_every_rack_evenly() -> None:
    nodes = racked(3, 3)
    rack = {n.id: n.rack for n in nodes}
    for r in assign_replicas(12, 4, nodes):
        assert Counter(rack[x] for x in r) == {"a": 2, "b": 2}


def test_uneven_racks_prefer_rack_spread_over_balance() -> None:
    nodes = racked(1, 4)  # node 1 alone in rack a
    out = assign_replicas(8, 2, nodes)
    assert all(1 in r for r in out)
    assert spread(leader_counts(out), nodes) <= 1
    # The four nodes of rack b share the other replica evenly.
    assert [replica_counts(out)[i] for i in (2, 3, 4, 5)] == [2, 2, 2, 2]


def test_rackless_node_among_racks_is_its_own_domain() -> None:
    nodes = [NodeInfo(1, "a"), NodeInfo(2, "a"), NodeInfo(3, None), NodeInfo(4, "b")]
    rack = {1: "a", 2: "a", 3: "node-3", 4: "b"}
    out = assign_replicas(12, 3, nodes)
    assert all(len({rack[x] for x in r}) == 3 for r in out)
    assert spread(leader_counts(out), nodes) <= 1


def test_follower_sets_vary() -> None:
    """A dead node's partitions should fall back on many peers, not always the same two."""
    out = assign_replicas(6, 3, plain(6))
    assert len({frozenset(r) for r in out}) == 6
    for node in range(1, 7):
        peers = {x for r in out if node in r for x in r} - {node}
        assert len(peers) >= 4


@pytest.mark.parametrize(
    ("partitions", "rf", "nodes", "error"),
    [
        (3, 4, plain(3), InvalidReplicationFactor),
        (3, 0, plain(3), InvalidReplicationFactor),
        (3, 1, [], InvalidReplicationFactor),
        (-1, 1, plain(3), InvalidPartitions),
        (3, 1, [NodeInfo(1), NodeInfo(1)], ValueError),
    ],
)
def test_rejects(partitions: int, rf: int, nodes: list[NodeInfo], error: type[Exception]) -> None:
    with pytest.raises(error):
        assign_replicas(partitions, rf, nodes)


def test_zero_partitions() -> None:
    assert assign_replicas(0, 3, plain(3)) == []


def test_existing_load_fills_least_loaded_nodes_first() -> None:
    out = assign_replicas(1, 2, plain(4), existing_load={1: 5, 2: 5, 3: 0, 4: 0})
    assert set(out[0]) == {3, 4}


def test_topics_created_one_by_one_spread_replicas_and_leaders() -> None:
    """What the controller does: each new topic placed against the load of earlier ones."""
    nodes = plain(5)
    loads: Counter[int] = Counter()
    leads: Counter[int] = Counter()
    for _ in range(20):
        for r in assign_replicas(1, 3, nodes, existing_load=loads, existing_leaders=leads):
            leads[r[0]] += 1
            loads.update(r)
    assert spread(loads, nodes) <= 1
    assert spread(leads, nodes) <= 1


def test_seed_offset_turns_the_start() -> None:
    firsts = {assign_replicas(1, 1, plain(4), seed_offset=s)[0] for s in range(4)}
    assert firsts == {(1,), (2,), (3,), (4,)}


def test_ten_thousand_partitions() -> None:
    out = assign_replicas(10_000, 3, plain(100))
    assert spread(leader_counts(out), plain(100)) == 0
    assert spread(replica_counts(out), plain(100)) == 0


# -- properties ----------------------------------------------------------------------------


@st.composite
def clusters(draw: st.DrawFn) -> list[NodeInfo]:
    """Nodes in random order, without racks, in racks of equal size, or in any racks."""
    kind = draw(st.sampled_from(["plain", "even", "uneven"]))
    if kind == "plain":
        nodes = plain(draw(st.integers(1, 12)))
    elif kind == "even":
        racks, size = draw(st.integers(1, 4)), draw(st.integers(1, 4))
        nodes = racked(*([size] * racks))
    else:
        n = draw(st.integers(1, 12))
        rack_names = draw(st.lists(st.sampled_from(["x", "y", "z", None]), min_size=n, max_size=n))
        nodes = [NodeInfo(i + 1, r) for i, r in enumerate(rack_names)]
    ids = draw(st.permutations(list(range(1, len(nodes) + 1))))
    # Sparse, shuffled ids: placement must not depend on ids being 1..n or on input order.
    relabel = {old: 7 * new + 3 for old, new in zip(range(1, len(nodes) + 1), ids, strict=True)}
    nodes = [NodeInfo(relabel[n.id], n.rack) for n in nodes]
    random.Random(draw(st.integers(0, 1000))).shuffle(nodes)
    return nodes


def rack_key(n: NodeInfo) -> str:
    return n.rack if n.rack is not None else f"node-{n.id}"


@settings(max_examples=400, deadline=None)
@given(clusters(), st.data())
def test_properties(nodes: list[NodeInfo], data: st.DataObject) -> None:
    rf = data.draw(st.integers(1, len(nodes)), label="rf")
    partitions = data.draw(st.integers(0, 60), label="partitions")
    seed = data.draw(st.integers(0, 50), label="seed")
    out = assign_replicas(partitions, rf, nodes, seed_offset=seed)

    ids = {n.id for n in nodes}
    assert len(out) == partitions
    for r in out:
        assert len(r) == rf and len(set(r)) == rf and set(r) <= ids
    if partitions:
        assert spread(leader_counts(out), nodes) <= 1
        # Balance is promised wherever racks allow it: no racks, or racks of equal size.
        rack_sizes = Counter(rack_key(n) for n in nodes).values()
        if all(n.rack is None for n in nodes) or len(set(rack_sizes)) == 1:
            assert spread(replica_counts(out), nodes) <= 1
    racks = {n.id: rack_key(n) for n in nodes}
    if any(n.rack is not None for n in nodes):
        rack_total = len(set(racks.values()))
        for r in out:
            assert len({racks[x] for x in r}) == min(rf, rack_total)

    # Deterministic, and blind to the order the nodes are listed in.
    assert assign_replicas(partitions, rf, list(reversed(nodes)), seed_offset=seed) == out


@settings(max_examples=200, deadline=None)
@given(
    st.integers(1, 10),
    st.data(),
)
def test_balanced_existing_load_stays_balanced(n: int, data: st.DataObject) -> None:
    nodes = plain(n)
    base = data.draw(st.integers(0, 5), label="base")
    load = {i: base + data.draw(st.integers(0, 1), label=f"extra{i}") for i in range(1, n + 1)}
    rf = data.draw(st.integers(1, n), label="rf")
    partitions = data.draw(st.integers(1, 30), label="partitions")
    out = assign_replicas(partitions, rf, nodes, existing_load=load)
    total = Counter(load) + replica_counts(out)
    assert spread(total, nodes) <= 1
