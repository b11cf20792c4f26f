"""Which messages a group member refuses before they reach the core (defence in depth).

Node authentication (issue 9, A2) decides who may talk to a node at all; these checks decide
what a message may do to one group, whoever sent it. Each is cheap (a few attribute reads),
since every heartbeat of every group passes through it. A refused message is dropped: Raft
tolerates loss, and a legitimate sender that was refused retries by itself.

- ``NOT_MEMBER``: the sender is not in the group's configuration (voters, outgoing voters,
  learners). Only members exchange messages; a new learner is added to the configuration of
  every member when its registration is applied, before any member talks to it. Where
  membership changes through the log (partitions), a replica's configuration may lag the
  group's (a new replica knows only the replicas it was created with; a replica that was
  down missed the changes that added the current leader), and refusing the leader would
  keep it from ever catching up: the owner then also admits ``also``, every node the
  controller named for the partition (its replicas and the targets of its moves) and every
  member of a configuration the replica was in. A node the controller never named for the
  partition is still refused.
- ``TERM_TOO_FAR``: the message's term lies more than ``max_term_gap`` beyond the group's
  own. Terms grow by one per election, and elections are at least an election timeout apart
  (pre-vote keeps a partitioned node from inflating its term), so a live group takes more
  than a day of back-to-back elections to move a million terms; a replica that far behind
  is not a replica that fell behind but a forgery (a term near 2^63 would break every API
  that reports it). The gap is checked on every message, so a series of forged messages
  would need about 9 * 10^12 of them to approach 2^63.
- ``NOT_LEADER``: an APPEND, HEARTBEAT or SNAPSHOT in our term from another node than the
  leader we know for that term (Raft elects at most one per term, so it cannot be genuine),
  and a SNAPSHOT from any node that is not the known leader of our term: a snapshot replaces
  the whole log, so it is taken only from the leader this member already follows (a new
  leader's first snapshot waits for its first heartbeat, which makes it known here; the
  leader retries the snapshot by itself).
"""

from __future__ import annotations

import enum
from typing import Final

from .core import RawNode
from .types import NONE, Message, MessageKind

#: See the module docstring: how far beyond the group's term a message may lie.
MAX_TERM_GAP: Final = 1_000_000

_APPEND: Final = MessageKind.APPEND
_HEARTBEAT: Final = MessageKind.HEARTBEAT
_SNAPSHOT: Final = MessageKind.SNAPSHOT


class Refusal(enum.Enum):
    """Why a message was refused; the value is the metric label."""

    NOT_MEMBER = "not_member"
    TERM_TOO_FAR = "term_too_far"
    NOT_LEADER = "not_leader"


def refusal(
    raw: RawNode,
    m: Message,
    max_term_gap: int = MAX_TERM_GAP,
    *,
    also: frozenset[int] = frozenset(),
    members_only: bool = True,
) -> Refusal | None:
    """Why ``raw`` must not step ``m`` (None: step it). ``also``: senders admitted besides
    the members (see above); ``members_only=False`` skips the membership check (the
    simulation of the core alone, which has no controller to name replicas)."""
    conf = raw.tracker.conf
    frm = m.frm
    if (
        members_only
        and frm not in conf.voters
        and frm not in conf.learners
        and frm not in conf.voters_outgoing
        and frm not in also
    ):
        return Refusal.NOT_MEMBER
    term = raw.term
    if m.term > term + max_term_gap:
        return Refusal.TERM_TOO_FAR
    kind = m.kind
    if kind is _HEARTBEAT or kind is _APPEND:
        if m.term == term and raw.leader_id not in (NONE, frm):
            return Refusal.NOT_LEADER
    elif kind is _SNAPSHOT and (m.term > term or (m.term == term and raw.leader_id != frm)):
        return Refusal.NOT_LEADER
    return None


__all__ = ["MAX_TERM_GAP", "Refusal", "refusal"]
