"""The server-side assignors, by property tests: balance, stickiness, each partition once."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from tidelog.controller.groups.assignors import (
    ASSIGNORS,
    TP,
    AssignmentSpec,
    MemberSpec,
    RangeAssignor,
    UniformAssignor,
)

UNIFORM = UniformAssignor()
RANGE = RangeAssignor()


def spec_of(
    members: dict[str, frozenset[str]],
    partitions: dict[str, int],
    current: dict[str, frozenset[TP]] | None = None,
) -> AssignmentSpec:
    return AssignmentSpec(
        members={m: MemberSpec(topics) for m, topics in members.items()},
        partitions=partitions,
        current=current or {},
    )


def check_valid(spec: AssignmentSpec, result: dict[str, frozenset[TP]]) -> None:
    assert set(result) == set(spec.members)
    seen: dict[TP, str] = {}
    for member_id, tps in result.items():
        for tp in tps:
            assert tp not in seen, f"{tp} given to {seen[tp]} and {member_id}"
            seen[tp] = member_id
            assert tp[0] in spec.members[member_id].topics
            assert 0 <= tp[1] < spec.partitions[tp[0]]
    # Every partition of a subscribed topic is assigned when it has a subscriber.
    for topic, count in spec.partitions.items():
        if any(topic in m.topics for m in spec.members.values()):
            for p in range(count):
                assert (topic, p) in seen, f"{topic}/{p} unassigned"


def moved(before: dict[str, frozenset[TP]], after: dict[str, frozenset[TP]]) -> int:
    owner_before = {tp: m for m, tps in before.items() for tp in tps}
    return sum(1 for m, tps in after.items() for tp in tps if owner_before.get(tp) != m)


topic_names = st.sampled_from(["a", "b", "c", "d"])
topic_counts = st.dictionaries(topic_names, st.integers(0, 24), min_size=1)
member_ids = st.text("mnopqrstuvwxyz", min_size=1, max_size=4)


@st.composite
def heterogeneous(draw: st.DrawFn) -> AssignmentSpec:
    partitions = draw(topic_counts)
    names = [*sorted(partitions), "missing"]
    members = draw(
        st.dictionaries(
            member_ids, st.frozensets(st.sampled_from(names), max_size=len(names)), max_size=12
        )
    )
    return spec_of(members, partitions)


@settings(max_examples=100, deadline=None)
@given(heterogeneous())
def test_every_assignor_gives_each_partition_once_to_a_subscriber(spec: AssignmentSpec) -> None:
    for assignor in ASSIGNORS.values():
        result = assignor.assign(spec)
        check_valid(spec, result)
        assert assignor.assign(spec) == result  # deterministic


@settings(max_examples=100, deadline=None)
@given(heterogeneous(), heterogeneous())
def test_uniform_is_locally_balanced_from_any_current_assignment(
    spec: AssignmentSpec, previous: AssignmentSpec
) -> None:
    # Start from an arbitrary (possibly invalid, overlapping) current assignment.
    current = UNIFORM.assign(previous)
    spec = AssignmentSpec(spec.members, spec.partitions, current)
    result = UNIFORM.assign(spec)
    check_valid(spec, result)
    # No partition could move to another subscriber with two fewer partitions.
    for tps in result.values():
        for topic, _ in tps:
            for other, other_spec in spec.members.items():
                if topic in other_spec.topics:
                    assert len(result[other]) >= len(tps) - 1


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 30), st.integers(0, 200), st.sampled_from(["uniform", "range"]))
def test_one_subscription_is_balanced_within_one(members: int, partitions: int, name: str) -> None:
    spec = spec_of({f"m{i:02}": frozenset({"t"}) for i in range(members)}, {"t": partitions})
    result = ASSIGNORS[name].assign(spec)
    check_valid(spec, result)
    counts = [len(tps) for tps in result.values()]
    assert max(counts) - min(counts) <= 1


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 20), st.integers(1, 120), st.data())
def test_uniform_moves_only_what_a_join_or_leave_needs(
    members: int, partitions: int, data: st.DataObject
) -> None:
    ids = [f"m{i:02}" for i in range(members)]
    spec = spec_of(dict.fromkeys(ids, frozenset({"t"})), {"t": partitions})
    before = UNIFORM.assign(spec)
    # A member joins: it takes its share, nothing else moves.
    joined = spec_of(dict.fromkeys([*ids, "zz"], frozenset({"t"})), {"t": partitions}, before)
    after = UNIFORM.assign(joined)
    check_valid(joined, after)
    assert moved(before, after) == len(after["zz"]) == partitions // (members + 1)
    # A member leaves: only its partitions move.
    if members > 1:
        gone = data.draw(st.sampled_from(ids))
        rest = [m for m in ids if m != gone]
        left = spec_of(dict.fromkeys(rest, frozenset({"t"})), {"t": partitions}, before)
        after_leave = UNIFORM.assign(left)
        check_valid(left, after_leave)
        assert moved(before, after_leave) == len(before[gone])


def test_a_tenth_member_on_sixty_partitions_moves_six() -> None:
    nine = [f"m{i}" for i in range(9)]
    spec = spec_of(dict.fromkeys(nine, frozenset({"t"})), {"t": 60})
    before = UNIFORM.assign(spec)
    ten = spec_of(dict.fromkeys([*nine, "m9"], frozenset({"t"})), {"t": 60}, before)
    after = UNIFORM.assign(ten)
    assert moved(before, after) == 6
    assert sorted(len(tps) for tps in after.values()) == [6] * 10


def test_range_gives_contiguous_ranges_per_topic_as_kafka() -> None:
    spec = spec_of({"c1": frozenset({"a", "b"}), "c0": frozenset({"a", "b"})}, {"a": 3, "b": 3})
    result = RANGE.assign(spec)
    assert result["c0"] == {("a", 0), ("a", 1), ("b", 0), ("b", 1)}
    assert result["c1"] == {("a", 2), ("b", 2)}


def test_range_orders_static_members_by_instance_id() -> None:
    spec = AssignmentSpec(
        members={
            "zzz": MemberSpec(frozenset({"a"}), instance_id="i0"),
            "aaa": MemberSpec(frozenset({"a"}), instance_id="i1"),
        },
        partitions={"a": 2},
        current={},
    )
    assert RANGE.assign(spec) == {"zzz": {("a", 0)}, "aaa": {("a", 1)}}


def test_no_members_or_no_topics_is_an_empty_answer() -> None:
    assert UNIFORM.assign(spec_of({}, {"t": 4})) == {}
    assert UNIFORM.assign(spec_of({"m": frozenset({"x"})}, {})) == {"m": frozenset()}
