"""The chaos run's values and its checker, pure and unit-tested: each record names the run,
the partition and its sequence number; :func:`verdict` compares what was acknowledged with
what was read back; :func:`choose_victim` picks the node to kill.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

__all__ = [
    "Acked",
    "Consumed",
    "Verdict",
    "choose_victim",
    "decode_value",
    "encode_value",
    "verdict",
]


#: Examples of each kind of violation kept in the verdict.
EXAMPLES_MAX: Final = 10
VALUE_PREFIX: Final = b"tidelog-chaos"


# ---------------------------------------------------------------------------------------------
# Values


def encode_value(run_id: str, partition: int, seq: int) -> bytes:
    return b"%s %s %d %d" % (VALUE_PREFIX, run_id.encode(), partition, seq)


def decode_value(value: bytes | None) -> tuple[str, int, int] | None:
    """(run id, partition, seq) of a chaos record, or None for anything else."""
    if value is None:
        return None
    parts = value.split(b" ")
    if len(parts) != 4 or parts[0] != VALUE_PREFIX:
        return None
    try:
        return parts[1].decode(), int(parts[2]), int(parts[3])
    except (UnicodeDecodeError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------
# The checker (pure)


@dataclass(frozen=True, slots=True)
class Acked:
    """An acknowledged record: the producer was told it is at ``offset``."""

    partition: int
    seq: int
    offset: int


@dataclass(frozen=True, slots=True)
class Consumed:
    """A record read back from ``partition`` at ``offset``."""

    partition: int
    offset: int
    seq: int


@dataclass(frozen=True, slots=True)
class Verdict:
    acked: int
    consumed: int
    #: Acknowledged records with no copy in the log.
    lost: int
    #: Distinct (partition, seq) read more than once, and the extra copies in all.
    duplicated: int
    duplicate_copies: int
    #: First occurrences out of sequence order within their partition: the fewest records
    #: that would have to move to restore the order (length minus the longest increasing run).
    reordered: int
    #: Acknowledged records present in the log, but not at the offset the ack named: the
    #: acknowledged write was overwritten and the record survives only as another copy.
    misplaced: int
    lost_examples: tuple[tuple[int, int], ...] = ()
    duplicated_examples: tuple[tuple[int, int], ...] = ()
    #: (partition, seq, offset) of records read after a higher seq of the same partition.
    reordered_examples: tuple[tuple[int, int, int], ...] = ()
    #: (partition, seq, acknowledged offset).
    misplaced_examples: tuple[tuple[int, int, int], ...] = ()
    #: Whether duplicates are expected (a producer without idempotence: a retry of a batch
    #: whose first attempt was committed after all stores it twice) rather than failures.
    duplicates_allowed: bool = False

    @property
    def ok(self) -> bool:
        """Nothing lost, reordered or misplaced, and no duplicate unless allowed."""
        return (
            self.lost == 0
            and self.reordered == 0
            and self.misplaced == 0
            and (self.duplicates_allowed or self.duplicated == 0)
        )


def _longest_increasing(seqs: Sequence[int]) -> int:
    """Length of the longest strictly increasing subsequence (patience sorting)."""
    tails: list[int] = []
    for s in seqs:
        i = bisect.bisect_left(tails, s)
        if i == len(tails):
            tails.append(s)
        else:
            tails[i] = s
    return len(tails)


def verdict(
    acked: Iterable[Acked], consumed: Iterable[Consumed], *, duplicates_allowed: bool = False
) -> Verdict:
    """Compare the acknowledged records with the records read back (in any order; they are
    ordered by offset per partition here). Duplicates fail the verdict unless
    ``duplicates_allowed`` (the producer was not idempotent)."""
    by_partition: dict[int, list[Consumed]] = {}
    n_consumed = 0
    for c in consumed:
        by_partition.setdefault(c.partition, []).append(c)
        n_consumed += 1
    seen: dict[tuple[int, int], int] = {}  # (partition, seq) -> copies
    at_offset: dict[tuple[int, int], int] = {}  # (partition, offset) -> seq
    reordered = 0
    reordered_examples: list[tuple[int, int, int]] = []
    for partition in sorted(by_partition):
        records = sorted(by_partition[partition], key=lambda c: c.offset)
        firsts: list[int] = []
        highest = -1
        for c in records:
            at_offset[(partition, c.offset)] = c.seq
            key = (partition, c.seq)
            copies = seen.get(key, 0)
            seen[key] = copies + 1
            if copies:
                continue
            firsts.append(c.seq)
            if c.seq < highest and len(reordered_examples) < EXAMPLES_MAX:
                reordered_examples.append((partition, c.seq, c.offset))
            highest = max(highest, c.seq)
        reordered += len(firsts) - _longest_increasing(firsts)
    duplicated = [key for key, copies in sorted(seen.items()) if copies > 1]
    n_acked = 0
    lost: list[tuple[int, int]] = []
    misplaced: list[tuple[int, int, int]] = []
    for a in acked:
        n_acked += 1
        if (a.partition, a.seq) not in seen:
            lost.append((a.partition, a.seq))
        elif at_offset.get((a.partition, a.offset)) != a.seq:
            misplaced.append((a.partition, a.seq, a.offset))
    return Verdict(
        acked=n_acked,
        consumed=n_consumed,
        lost=len(lost),
        duplicated=len(duplicated),
        duplicate_copies=sum(seen[key] - 1 for key in duplicated),
        reordered=reordered,
        misplaced=len(misplaced),
        lost_examples=tuple(sorted(lost)[:EXAMPLES_MAX]),
        duplicated_examples=tuple(duplicated[:EXAMPLES_MAX]),
        reordered_examples=tuple(reordered_examples),
        misplaced_examples=tuple(sorted(misplaced)[:EXAMPLES_MAX]),
        duplicates_allowed=duplicates_allowed,
    )


def choose_victim(
    rng: random.Random, leaders: Mapping[int, int], running: Sequence[int]
) -> tuple[int, int | None]:
    """(node to kill, partition whose leader it is): the leader of a random partition led by
    a running node, else a random running node (partition None)."""
    if not running:
        raise ValueError("no running node to choose from")
    led = sorted(p for p, leader in leaders.items() if leader in running)
    if led:
        partition = rng.choice(led)
        return leaders[partition], partition
    return rng.choice(sorted(running)), None
