"""Errors only the client raises: what the producer knows about a send it gave up on.

An application must know whether retrying a failed send could store its records twice.
Every send that fails with :class:`OutcomeUnknown` may have been stored; every other error
of a send means it surely was not (the node refused it, or it never left the client).
"""

from __future__ import annotations

from tidelog.errors import RequestTimedOut, Revoked

__all__ = ["OutcomeUnknown", "PartitionRevoked"]


class OutcomeUnknown(RequestTimedOut):
    """The records may or may not be stored: a request for them went unanswered (it timed
    out, its connection broke, or the producer stopped waiting for it) after the node may
    have appended it, and no later attempt settled the question before the producer gave
    up (``delivery_timeout_ms``, ``retries``, or ``stop``). Sending them again may store
    them twice unless the topic deduplicates them.

    With idempotence on (the default) the producer settles such outcomes itself: it resends
    the batch with the same sequence number and the node answers a stored one with its
    original offsets, so this error only means the producer gave up before any node could
    answer. A subclass of RequestTimedOut, as an unanswered request is what it reports."""

    reason = "OUTCOME_UNKNOWN"
    retriable = False


class PartitionRevoked(Revoked):
    """A group consumer was asked to commit an offset for a partition it does not own: the
    group took it away (a rebalance revoked it, or the member was fenced and lost it) or it
    was never assigned. Raised at once by :meth:`Consumer.commit` before anything is sent
    (or when the coordinator answers REVOKED); the new owner commits that partition now.
    The metadata carries ``partitions``, as ``topic/partition`` separated by commas."""

    retriable = False
