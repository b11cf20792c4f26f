"""Table tests of the pure quorum arithmetic."""

from __future__ import annotations

import pytest

from tidelog.node.raft.quorum import (
    INDEX_INFINITY,
    VoteResult,
    committed_index,
    joint_committed_index,
    joint_vote_result,
    majority,
    vote_result,
)


@pytest.mark.parametrize(("n", "q"), [(1, 1), (2, 2), (3, 2), (4, 3), (5, 3), (7, 4)])
def test_majority(n: int, q: int) -> None:
    assert majority(n) == q


@pytest.mark.parametrize(
    ("voters", "acked", "expected"),
    [
        ((), {}, INDEX_INFINITY),
        ((1,), {1: 7}, 7),
        ((1,), {}, 0),
        ((1, 2), {1: 5, 2: 3}, 3),
        ((1, 2, 3), {1: 5, 2: 3, 3: 1}, 3),
        ((1, 2, 3), {1: 5, 2: 5, 3: 1}, 5),
        ((1, 2, 3), {1: 5}, 0),
        ((1, 2, 3), {1: 5, 2: 4}, 4),
        ((1, 2, 3, 4), {1: 9, 2: 8, 3: 7, 4: 1}, 7),
        ((1, 2, 3, 4, 5), {1: 9, 2: 1, 3: 8, 4: 2, 5: 7}, 7),
        # Acks from non-voters (learners) are ignored.
        ((1, 2, 3), {1: 5, 4: 9, 5: 9}, 0),
    ],
)
def test_committed_index(voters: tuple[int, ...], acked: dict[int, int], expected: int) -> None:
    assert committed_index(voters, acked) == expected


@pytest.mark.parametrize(
    ("incoming", "outgoing", "acked", "expected"),
    [
        ((1, 2, 3), (), {1: 5, 2: 5, 3: 1}, 5),
        ((1, 2, 3), (1, 2, 3), {1: 5, 2: 5, 3: 1}, 5),
        # The new half {3, 4, 5} only has 3 and 4 at 2.
        ((3, 4, 5), (1, 2, 3), {1: 9, 2: 9, 3: 2, 4: 2, 5: 0}, 2),
        ((3, 4, 5), (1, 2, 3), {1: 1, 2: 0, 3: 9, 4: 9, 5: 9}, 1),
    ],
)
def test_joint_committed_index(
    incoming: tuple[int, ...], outgoing: tuple[int, ...], acked: dict[int, int], expected: int
) -> None:
    assert joint_committed_index(incoming, outgoing, acked) == expected


W, L, P = VoteResult.WON, VoteResult.LOST, VoteResult.PENDING


@pytest.mark.parametrize(
    ("voters", "votes", "expected"),
    [
        ((), {}, W),
        ((1,), {}, P),
        ((1,), {1: True}, W),
        ((1,), {1: False}, L),
        ((1, 2), {1: True}, P),
        ((1, 2), {1: True, 2: False}, L),
        ((1, 2, 3), {1: True}, P),
        ((1, 2, 3), {1: True, 2: True}, W),
        ((1, 2, 3), {1: True, 2: False}, P),
        ((1, 2, 3), {1: True, 2: False, 3: False}, L),
        ((1, 2, 3, 4), {1: True, 2: True}, P),
        ((1, 2, 3, 4), {1: True, 2: False, 3: False}, L),
        ((1, 2, 3, 4, 5), {1: True, 2: True, 3: True}, W),
        # Votes from non-voters count for nothing.
        ((1, 2, 3), {1: True, 7: True, 8: True}, P),
    ],
)
def test_vote_result(voters: tuple[int, ...], votes: dict[int, bool], expected: VoteResult) -> None:
    assert vote_result(voters, votes) == expected


@pytest.mark.parametrize(
    ("incoming", "outgoing", "votes", "expected"),
    [
        ((1, 2, 3), (), {1: True, 2: True}, W),
        ((1, 2, 3), (3, 4, 5), {1: True, 2: True}, P),
        ((1, 2, 3), (3, 4, 5), {1: True, 2: True, 3: True}, P),
        ((1, 2, 3), (3, 4, 5), {1: True, 3: True, 4: True}, W),
        ((1, 2, 3), (3, 4, 5), {1: True, 2: True, 4: False, 5: False}, L),
        ((1, 2, 3), (3, 4, 5), {2: False, 3: False}, L),
    ],
)
def test_joint_vote_result(
    incoming: tuple[int, ...],
    outgoing: tuple[int, ...],
    votes: dict[int, bool],
    expected: VoteResult,
) -> None:
    assert joint_vote_result(incoming, outgoing, votes) == expected
