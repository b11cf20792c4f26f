"""Pure quorum arithmetic: which index a majority has, whether an election is decided.

A configuration is a set of voter ids; a joint configuration (during a membership change) is
two sets and needs a majority of each. An empty set has no say: it agrees to every index and
wins every vote, so a joint configuration with an empty outgoing half behaves as a simple one.
"""

from __future__ import annotations

import enum
from collections.abc import Collection, Mapping

#: The commit index an empty configuration reports: larger than any real index, so ``min``
#: over a joint configuration picks the other half.
INDEX_INFINITY = 1 << 63


class VoteResult(enum.IntEnum):
    PENDING = 0
    LOST = 1
    WON = 2


def majority(n: int) -> int:
    """Smallest number of members that forms a majority of ``n``."""
    return n // 2 + 1


def committed_index(voters: Collection[int], acked: Mapping[int, int]) -> int:
    """The largest index that a majority of ``voters`` has acknowledged (``acked[id]`` is the
    highest index durable on ``id``; a missing id counts as 0)."""
    n = len(voters)
    if n == 0:
        return INDEX_INFINITY
    if n == 1:
        (only,) = voters
        return acked.get(only, 0)
    indexes = sorted((acked.get(v, 0) for v in voters), reverse=True)
    # The majority(n)-th highest index is held by at least majority(n) voters.
    return indexes[majority(n) - 1]


def joint_committed_index(
    incoming: Collection[int], outgoing: Collection[int], acked: Mapping[int, int]
) -> int:
    return min(committed_index(incoming, acked), committed_index(outgoing, acked))


def vote_result(voters: Collection[int], votes: Mapping[int, bool]) -> VoteResult:
    """WON once a majority granted, LOST once a majority can no longer be reached."""
    n = len(voters)
    if n == 0:
        return VoteResult.WON
    granted = rejected = 0
    for v in voters:
        answer = votes.get(v)
        if answer is None:
            continue
        if answer:
            granted += 1
        else:
            rejected += 1
    q = majority(n)
    if granted >= q:
        return VoteResult.WON
    if n - rejected < q:
        return VoteResult.LOST
    return VoteResult.PENDING


def joint_vote_result(
    incoming: Collection[int], outgoing: Collection[int], votes: Mapping[int, bool]
) -> VoteResult:
    r1 = vote_result(incoming, votes)
    r2 = vote_result(outgoing, votes)
    if r1 == r2:
        return r1
    if VoteResult.LOST in (r1, r2):
        return VoteResult.LOST
    return VoteResult.PENDING
