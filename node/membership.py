"""Moving a partition's replicas: the leader drives its Raft configuration to a target set.

The controller says where a partition's replicas should end (``PartitionAssignment.target``,
see docs/architecture.md, "Moving replicas"); every node that holds a replica hands the
target to it (:meth:`Partition.set_target_replicas`). Followers only remember it. The
group's leader drives the configuration there one membership change at a time
(``node/raft/core.py`` explains why one at a time), in an order that never lowers the
redundancy the group has:

1. every target node that is not a member is added as a *learner* (it gets the log, by
   appends or a snapshot, but never votes nor counts);
2. a learner of the target whose log is within ``catchup_entries_max`` entries of the
   leader's, and within ``replica.recovery.lag.bytes`` of its bytes (``LogThrottle.caught_up``,
   node/catchup.py: one further behind is still being caught up at the recovery rate), and
   replicating, not probing, is *promoted* to voter;
3. once every target node is a voter, each member outside the target is *removed*
   (learners first, then voters). When the leader itself must go, it first hands
   leadership to the most up-to-date voter of the target, which continues the move.

Each step is proposed only when the previous one is committed and the leader committed an
entry of its term (the core refuses otherwise; the driver retries at its next pass), so a
step that fails (lost leadership, a crash) is simply redone by whichever replica leads next,
from the configuration then in force. A pass runs every ``drive_interval_s`` while a move is
in progress on the leader, and at once when the configuration or the target changes.

Every replica reports each committed configuration (``Partition.on_conf_changed``, set by
the node): the controller records it as the partition's replicas, and clears the target
once they match it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

from tidelog.node.catchup import LogThrottle
from tidelog.node.raft.errors import NotRaftLeader, ProposalDropped
from tidelog.node.raft.progress import ProgressState
from tidelog.node.raft.types import ConfChangeKind, ConfState, EntryKind, Role
from tidelog.node.raft_codec import conf_change_batch
from tidelog.node.replica_storage import next_offset
from tidelog.records import stamped_copy

if TYPE_CHECKING:
    from tidelog.node.multiraft import MultiRaft, RaftGroup

log = logging.getLogger(__name__)

#: A learner whose log is at most this many entries behind the leader's is promoted.
catchup_entries_max: Final = 64
#: How often the leader re-checks a move in progress (learners catching up).
drive_interval_s: Final = 0.1

#: ``(topic, partition, voters, learners)``: a committed configuration, set by the node.
ConfChanged = Callable[[str, int, frozenset[int], frozenset[int]], None]


def next_step(
    conf: ConfState, target: frozenset[int], self_id: int, caught_up: Callable[[int], bool]
) -> tuple[ConfChangeKind, int] | tuple[None, int] | None:
    """The next change toward ``target`` from ``conf`` on leader ``self_id``: (kind, node),
    ``(None, node)`` to transfer leadership to ``node`` first, or None when there is nothing
    to do now (done, or learners still catching up). Pure, for tests."""
    members = conf.members
    for node in sorted(target - members):
        return ConfChangeKind.ADD_LEARNER, node
    for node in sorted(conf.learners & target):
        if caught_up(node):
            return ConfChangeKind.PROMOTE, node
    for node in sorted(conf.learners - target):
        return ConfChangeKind.REMOVE, node
    if not target <= conf.voters:
        return None  # learners of the target still catching up: keep the old voters
    for node in sorted(conf.voters - target - {self_id}):
        return ConfChangeKind.REMOVE, node
    if self_id in conf.voters and self_id not in target:
        # Last of all the leader itself: hand over to a voter of the target first.
        for node in sorted(target):
            if node in conf.voters and caught_up(node):
                return None, node
    return None


class MembershipDriver:
    """The move state of one partition replica (owned by its ``Partition``)."""

    __slots__ = ("_task", "_wake", "label", "target")

    def __init__(self, label: str) -> None:
        self.label = label
        #: The replica set the partition should end with; None when no move is asked.
        self.target: frozenset[int] | None = None
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()

    def set_target(self, target: frozenset[int] | None) -> None:
        if target is not None and not target:
            raise ValueError(f"{self.label}: a target needs at least one replica")
        self.target = target
        self.wake()

    def wake(self) -> None:
        self._wake.set()

    def pending(self, conf: ConfState) -> bool:
        t = self.target
        return t is not None and (conf.voters != t or bool(conf.learners))

    def ensure_running(self, group: RaftGroup, raft: MultiRaft) -> None:
        """Start the driving task on the leader while a move is pending."""
        if self._task is not None and not self._task.done():
            self.wake()
            return
        if group.raw.role != Role.LEADER or not self.pending(group.raw.conf_state):
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._task = loop.create_task(self._run(group, raft), name=f"move {self.label}")

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def _run(self, group: RaftGroup, raft: MultiRaft) -> None:
        wake = self._wake
        while not group.removed and not group.failed:
            raw = group.raw
            if raw.role != Role.LEADER or not self.pending(raw.conf_state):
                return
            wake.clear()
            try:
                self.step(group, raft)
            except Exception:
                log.exception("%s: moving replicas failed (retried)", self.label)
            try:
                async with asyncio.timeout(drive_interval_s):
                    await wake.wait()
            except TimeoutError:
                pass

    def step(self, group: RaftGroup, raft: MultiRaft) -> bool:
        """One pass on the leader: propose the next change if one can go now. True if
        something was proposed or a transfer was started."""
        raw = group.raw
        target = self.target
        if target is None or raw.role != Role.LEADER or raw.conf_change_pending:
            return False
        last = raw.last_index()

        throttle = raw.catchup

        def caught_up(node: int) -> bool:
            pr = raw.progress(node)
            return (
                pr is not None
                and pr.state == ProgressState.REPLICATE
                and pr.match + catchup_entries_max >= last
                and (not isinstance(throttle, LogThrottle) or throttle.caught_up(pr.match))
            )

        step = next_step(raw.conf_state, target, raw.id, caught_up)
        if step is None:
            return False
        kind, node = step
        if kind is None:
            if raw.lead_transferee == 0:
                log.info("%s: leaving the group: leadership to node %d first", self.label, node)
                raw.transfer_leadership(node)
                raft.touch(group)
            return True
        try:
            cc = raw.check_conf_change(kind, node)
        except (ProposalDropped, NotRaftLeader):
            raft.touch(group)  # the core may have appended an entry of its term
            return False
        batch = conf_change_batch(cc)
        index = raw.last_index() + 1
        data = stamped_copy(batch, 0, len(batch), next_offset(raw, group.log), raw.term, index)
        try:
            raw.propose(data, EntryKind.CONFIG)
        except (ProposalDropped, NotRaftLeader):
            return False
        log.info(
            "%s: membership change %s node %d proposed at index %d (voters %s, learners %s)",
            self.label, kind.name, node, index, sorted(cc.voters), sorted(cc.learners),
        )  # fmt: skip
        raft.touch(group)
        return True


__all__ = [
    "ConfChanged",
    "MembershipDriver",
    "catchup_entries_max",
    "drive_interval_s",
    "next_step",
]
