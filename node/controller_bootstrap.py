"""Whether a controller voter on an empty data directory may form a new cluster.

A node whose data directory is new cannot tell on its own a brand-new cluster from one whose
controller voters lost a majority of their disks: both look like an empty controller log.
Were it to bootstrap group 0 as brand new (vote for empty candidates), two wiped voters of
three would elect an empty controller and the survivor's committed metadata would be erased.
So such a voter opens group 0 as a new replica that grants no vote (``bootstrap=False``,
raft/core.py) and asks the other listed voters what they hold (``Cluster.ControllerVoters``,
whose ``fresh`` says "I hold no controller state and have not joined a cluster"):

- one of them holds state of a cluster: this node joins it as a new replica that grants no
  vote until a leader reached it, and takes that cluster's id;
- every other listed voter answered and every one is fresh: a brand-new cluster, this node
  may help elect its first controller (``bootstrap=True``); a first start of all the voters
  together (``tidelog cluster up``) passes at once;
- otherwise (a voter silent): wait, and ask again.

A one-voter cluster bootstraps at once. A node started with ``--join`` never bootstraps: it
joins the cluster the node it asked belongs to. KRaft asks the operator to format the storage
with a cluster id; this is the same rule made automatic: a cluster is formed only by all of its
first voters, never by some of them.

:func:`decide` is the pure rule; the node (``Controller``) and the node simulation both call it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import Enum

#: What ``cluster status`` and the log say while a voter waits.
WAITING = "waiting for the controller voters to form the cluster"


@dataclass(frozen=True, slots=True)
class PeerAnswer:
    """What a listed voter answered: whether it is fresh (no controller state, not joined)
    and the id of the cluster it belongs to (or would form)."""

    fresh: bool
    cluster_id: str


class Outcome(Enum):
    #: Every listed voter is fresh: form a new cluster (bootstrap group 0).
    NEW = "new"
    #: A voter holds the cluster's state: join it, no vote until a leader reached this node.
    JOIN = "join"
    #: Not every voter answered, none holds state: ask again.
    WAIT = "wait"


@dataclass(frozen=True, slots=True)
class Decision:
    outcome: Outcome
    #: JOIN: the cluster id the holder answered.
    cluster_id: str = ""
    #: WAIT: why (which voters did not answer).
    reason: str = ""


def decide(
    node_id: int, voters: Iterable[int], answers: Mapping[int, PeerAnswer | None]
) -> Decision:
    """The bootstrap decision of a fresh controller voter ``node_id`` of the listed
    ``voters``, given what each other voter answered (None or absent: no answer)."""
    others = sorted(frozenset(voters) - {node_id})
    if not others:
        return Decision(Outcome.NEW)
    holders = [n for n in others if (a := answers.get(n)) is not None and not a.fresh]
    if holders:
        answer = answers[holders[0]]
        assert answer is not None
        return Decision(Outcome.JOIN, cluster_id=answer.cluster_id)
    silent = [n for n in others if answers.get(n) is None]
    if silent:
        return Decision(
            Outcome.WAIT,
            reason=f"{WAITING}: no answer from node{'s' if len(silent) > 1 else ''} "
            f"{','.join(map(str, silent))} (a new cluster forms only when every listed voter "
            "is up and fresh; a voter that holds the cluster's state lets this node join)",
        )
    return Decision(Outcome.NEW)


__all__ = ["WAITING", "Decision", "Outcome", "PeerAnswer", "decide"]
