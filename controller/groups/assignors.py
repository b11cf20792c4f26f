"""Server-side assignors: pure functions from a group's subscriptions to a target assignment.

An assignor sees the members (their resolved topic subscriptions, instance ids and racks),
the partition count of every subscribed topic, and the current target assignment (for
stickiness), and returns the new target: a set of partitions per member. It never sees the
members' reported ownership; the coordinator turns the target into safe steps (revoke first,
grant once released). Assignors are deterministic: the same input gives the same output, so
a test can replay them; the coordinator persists the target anyway, so a rebuild never has to
recompute it.

Two assignors, pluggable through the ``Assignor`` protocol and the ``ASSIGNORS`` registry:

- ``uniform`` (the default): sticky and balanced. Every member keeps the partitions it holds
  that it still subscribes to, as long as balance allows; unassigned partitions go to the
  least loaded subscriber; then partitions move one at a time from a member to a less loaded
  subscriber of the same topic while the two differ by two or more. With one subscription for
  everyone the counts differ by at most one; when a 10th member joins 9 on 60 partitions only
  the 6 partitions the newcomer needs move (each of the 9 kept 6 or 7, the 6 with 7 give one).
- ``range``: Kafka's range assignor, per topic: the subscribers sorted (static members by
  instance id first, then the others by member id), each gets a contiguous range, the first
  ``count % members`` one extra partition. Not sticky; predictable.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

#: A topic partition.
TP = tuple[str, int]


@dataclass(frozen=True, slots=True)
class MemberSpec:
    """What an assignor knows of one member."""

    topics: frozenset[str]
    instance_id: str | None = None
    rack: str | None = None


@dataclass(frozen=True, slots=True)
class AssignmentSpec:
    members: Mapping[str, MemberSpec]
    #: Partition count of every topic some member subscribes to (topics that do not exist
    #: are absent).
    partitions: Mapping[str, int]
    #: The current target assignment (members absent from ``members`` are ignored).
    current: Mapping[str, frozenset[TP]]


class Assignor(Protocol):
    name: str

    def assign(self, spec: AssignmentSpec) -> dict[str, frozenset[TP]]:
        """The new target: every member of ``spec.members`` appears (possibly with nothing);
        every partition of a subscribed topic goes to exactly one of its subscribers."""
        ...


def _subscribers(spec: AssignmentSpec) -> dict[str, list[str]]:
    subs: dict[str, list[str]] = {topic: [] for topic in spec.partitions}
    for member_id in sorted(spec.members):
        for topic in spec.members[member_id].topics:
            if topic in subs:
                subs[topic].append(member_id)
    return subs


class UniformAssignor:
    """Sticky and balanced (see the module's opening comment)."""

    name = "uniform"

    def assign(self, spec: AssignmentSpec) -> dict[str, frozenset[TP]]:
        subs = _subscribers(spec)
        owned: dict[str, set[TP]] = {member_id: set() for member_id in spec.members}
        owner: dict[TP, str] = {}
        # 1. Stickiness: keep what is still valid, each partition once (members in id order).
        for member_id in sorted(spec.members):
            topics = spec.members[member_id].topics
            for tp in sorted(spec.current.get(member_id, frozenset())):
                topic, partition = tp
                if (
                    topic in topics
                    and 0 <= partition < spec.partitions.get(topic, 0)
                    and tp not in owner
                ):
                    owner[tp] = member_id
                    owned[member_id].add(tp)
        # 2. Unassigned partitions to the least loaded subscriber; topics with the fewest
        # subscribers first, so constrained partitions find room before the flexible ones.
        # A heap per topic with lazy entries: O(partitions x log members).
        for topic in sorted(subs, key=lambda t: (len(subs[t]), t)):
            candidates = subs[topic]
            if not candidates:
                continue
            heap = [(len(owned[m]), m) for m in candidates]
            heapq.heapify(heap)
            for partition in range(spec.partitions[topic]):
                tp = (topic, partition)
                if tp in owner:
                    continue
                while True:
                    count, best = heap[0]
                    if count == len(owned[best]):
                        break
                    heapq.heapreplace(heap, (len(owned[best]), best))
                owner[tp] = best
                owned[best].add(tp)
                heapq.heapreplace(heap, (count + 1, best))
        # 3. Balance: the least loaded member takes one partition of a topic it subscribes to
        # from the most loaded holder with at least two more, until none can. Each move lowers
        # the sum of squared counts, so this ends; only members above their share give up
        # partitions. A member that can take nothing is skipped for the rest of the pass (a
        # new pass starts if anything moved).
        held: dict[str, dict[str, set[TP]]] = {m: {} for m in owned}
        for tp, member_id in owner.items():
            held[member_id].setdefault(tp[0], set()).add(tp)
        while True:
            moved_any = False
            saturated: set[str] = set()
            while True:
                open_members = [m for m in owned if m not in saturated]
                if not open_members:
                    break
                receiver = min(open_members, key=lambda m: (len(owned[m]), m))
                need = len(owned[receiver]) + 2
                if max(len(tps) for tps in owned.values()) < need:
                    break  # nobody holds two more than the least loaded: balanced
                donor: str | None = None
                donor_topic = ""
                for topic in sorted(spec.members[receiver].topics):
                    for candidate in subs.get(topic, ()):
                        count = len(owned[candidate])
                        if (
                            count >= need
                            and held[candidate].get(topic)
                            and (donor is None or count > len(owned[donor]))
                        ):
                            donor, donor_topic = candidate, topic
                if donor is None:
                    saturated.add(receiver)
                    continue
                tp = max(held[donor][donor_topic])
                held[donor][donor_topic].discard(tp)
                owned[donor].discard(tp)
                held[receiver].setdefault(donor_topic, set()).add(tp)
                owned[receiver].add(tp)
                owner[tp] = receiver
                moved_any = True
            if not moved_any:
                break
        return {member_id: frozenset(tps) for member_id, tps in owned.items()}


class RangeAssignor:
    """Kafka's range assignor (see the module's opening comment)."""

    name = "range"

    def assign(self, spec: AssignmentSpec) -> dict[str, frozenset[TP]]:
        result: dict[str, set[TP]] = {member_id: set() for member_id in spec.members}

        def order(member_id: str) -> tuple[int, str, str]:
            instance_id = spec.members[member_id].instance_id
            if instance_id is not None:
                return (0, instance_id, member_id)
            return (1, "", member_id)

        for topic, candidates in _subscribers(spec).items():
            if not candidates:
                continue
            ordered = sorted(candidates, key=order)
            count = spec.partitions[topic]
            base, extra = divmod(count, len(ordered))
            start = 0
            for index, member_id in enumerate(ordered):
                size = base + (1 if index < extra else 0)
                result[member_id].update((topic, p) for p in range(start, start + size))
                start += size
        return {member_id: frozenset(tps) for member_id, tps in result.items()}


ASSIGNORS: Mapping[str, Assignor] = {
    UniformAssignor.name: UniformAssignor(),
    RangeAssignor.name: RangeAssignor(),
}
DEFAULT_ASSIGNOR = UniformAssignor.name
