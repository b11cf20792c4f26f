"""Force-recovering the controller group after it lost a majority of its voters for good
(UNSAFE; ``tidelog cluster force-recover-controller --from-survivors``, docs/operations.md).

There is no active controller to do the work in that case (that is the problem), so the node
the Admin call reaches coordinates (:func:`force_recover_controller`):

1. it asks every node it knows of (registered nodes and ``--controller-voters``) for its
   controller log end and configuration (``Cluster.RecoverController``); the nodes that
   answer are the survivors;
2. it refuses while any node leads the controller or a majority of the voters answers: such
   a group elects a leader by itself, and forcing it could make two majorities;
3. the surviving voters become the voters (the most up-to-date answering node when no voter
   survives); the one with the highest (last term, last index) is chosen; every answering
   node forces that configuration (``RawNode.force_configuration``, through the chosen
   one's last index, so CONFIG entries of the lost group never take effect) and the chosen
   one campaigns;
4. it reports what may have been lost: controller entries above the chosen survivor's last
   index up to the highest commit index any answering node had seen were committed and are
   gone (metadata changes: topics created, settings set, registrations), and entries the
   lost voters alone held are not known at all;
5. once a leader is elected it sets ``controller.voters`` to the count the group had (if
   unset), so reprovisioning (controller/planning.py ``plan_controller_voters``) promotes
   live nodes until the voter count is back.

Every node logs a WARNING when its configuration is forced.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from tidelog.controller.planning import voter_target
from tidelog.controller.settings import CONTROLLER_VOTERS
from tidelog.errors import InvalidRequest, NodeUnavailable, TidelogError
from tidelog.node.raft.types import NONE, Role
from tidelog.v1 import admin_pb2, cluster_pb2

if TYPE_CHECKING:
    from tidelog.node.controller_node import Controller

log = logging.getLogger(__name__)

#: How long the coordinator waits for each node's answer.
recover_rpc_timeout_s: Final = 3.0
#: How long it waits for the chosen survivor's election before setting the voter count.
leader_wait_s: Final = 15.0


def recover_controller_method() -> str:
    from tidelog.node.controller_node import _CLUSTER_SERVICE

    return f"/{_CLUSTER_SERVICE}/RecoverController"


@dataclass(frozen=True, slots=True)
class ControllerLogEnd:
    """One answering node's controller log."""

    node_id: int
    last_term: int
    last_index: int
    commit_index: int
    voters: frozenset[int]
    leader: bool = False


@dataclass(frozen=True, slots=True)
class ControllerRecoveryPlan:
    #: The voters before (of the most up-to-date answer's configuration), and after.
    old_voters: frozenset[int]
    voters: frozenset[int]
    survivors: tuple[int, ...]
    chosen: ControllerLogEnd
    lost_voters: tuple[int, ...]
    known_committed: int


def plan_controller_recovery(logs: list[ControllerLogEnd]) -> ControllerRecoveryPlan:
    """What force-recover does with the answers ``logs`` (pure; InvalidRequest when it must
    refuse). The voters are those of the most up-to-date answer's configuration."""
    if not logs:
        raise InvalidRequest("no node answered: there is nothing to recover from")
    leading = [x.node_id for x in logs if x.leader]
    if leading:
        raise InvalidRequest(
            f"node {leading[0]} leads the controller: a majority of its voters is alive; "
            "force-recover is only for a majority lost for good"
        )
    newest = max(logs, key=lambda x: (x.last_term, x.last_index, -x.node_id))
    voters = newest.voters
    by_id = {x.node_id: x for x in logs}
    alive = sorted(v for v in voters if v in by_id)
    if len(alive) * 2 > len(voters):
        raise InvalidRequest(
            f"a majority of the controller voters {sorted(voters)} is alive (nodes "
            f"{alive} answer): it elects a leader by itself; force-recover is only for a "
            "majority lost for good"
        )
    candidates = [by_id[v] for v in alive] or [newest]
    chosen = max(candidates, key=lambda x: (x.last_term, x.last_index, -x.node_id))
    survivors = tuple([chosen.node_id, *(c.node_id for c in candidates if c is not chosen)])
    return ControllerRecoveryPlan(
        old_voters=voters,
        voters=frozenset(survivors),
        survivors=survivors,
        chosen=chosen,
        lost_voters=tuple(sorted(voters - set(survivors))),
        known_committed=max(x.commit_index for x in logs),
    )


def loss_summary(plan: ControllerRecoveryPlan, target: int) -> str:
    c = plan.chosen
    lines = [
        f"controller FORCE-RECOVERED (UNSAFE): voters now {sorted(plan.voters)}, node "
        f"{c.node_id} keeps its log (last index {c.last_index}, term {c.last_term}); lost "
        f"voters {list(plan.lost_voters)}",
    ]
    if plan.known_committed > c.last_index:
        lines.append(
            f"  LOST: controller entries {c.last_index + 1}..{plan.known_committed} were "
            "committed (some node had seen them committed) and are gone: metadata changes "
            "made then (topics, settings, registrations) must be checked and redone"
        )
    else:
        lines.append(
            f"  no committed controller entry above index {c.last_index} is known to any "
            "answering node; entries the lost voters alone held are not known"
        )
    lines.append(
        f"  reprovisioning refills the controller to {target} voter(s) from live nodes "
        "(controller.voters)"
    )
    return "\n".join(lines)


def serve_recover_controller(
    controller: Controller, request: cluster_pb2.RecoverControllerRequest
) -> cluster_pb2.RecoverControllerResponse:
    """This node's side: its controller log end, and (``force``) its controller
    configuration forced to ``request.voters``."""
    group = controller.group
    if group is None:
        raise NodeUnavailable("the controller group is not open on this node")
    raw = group.raw
    if request.force:
        if raw.role == Role.LEADER:
            raise InvalidRequest(
                f"node {controller.node_id} leads the controller: its voters have a majority"
            )
        voters = frozenset(request.voters)
        log.warning(
            "controller: FORCING the configuration to voters %s through index %d "
            "(force-recover-controller of a lost majority, asked by node %d; was %s)",
            sorted(voters), request.through_index, request.from_node,
            sorted(raw.conf_state.voters),
        )  # fmt: skip
        raw.force_configuration(voters, request.through_index)
        if request.campaign:
            raw.campaign()
        controller._driver.touch(group)
    last = raw.last_index()
    return cluster_pb2.RecoverControllerResponse(
        node_id=controller.node_id,
        last_term=raw.term_at(last) or 0,
        last_index=last,
        commit_index=raw.commit_index,
        voters=sorted(raw.conf_state.voters),
        leader_id=raw.leader_id,
        leader=raw.role == Role.LEADER,
    )


async def _ask(
    controller: Controller, address: str, request: cluster_pb2.RecoverControllerRequest
) -> cluster_pb2.RecoverControllerResponse:
    resp: cluster_pb2.RecoverControllerResponse = await controller.ask_peer(
        address, "RecoverController", request, recover_rpc_timeout_s
    )
    return resp


def _log_end(resp: cluster_pb2.RecoverControllerResponse) -> ControllerLogEnd:
    return ControllerLogEnd(
        resp.node_id,
        resp.last_term,
        resp.last_index,
        resp.commit_index,
        frozenset(resp.voters),
        resp.leader,
    )


async def _ask_or_local(
    controller: Controller,
    node_id: int,
    address: str,
    request: cluster_pb2.RecoverControllerRequest,
) -> cluster_pb2.RecoverControllerResponse:
    if node_id == controller.node_id:
        request.from_node = controller.node_id
        return serve_recover_controller(controller, request)
    return await _ask(controller, address, request)


async def force_recover_controller(
    controller: Controller,
) -> admin_pb2.ForceRecoverControllerResponse:
    """The coordinating node's side of ``tidelog cluster force-recover-controller``."""
    contacts: dict[int, str] = dict(controller.voters)
    for node_id in controller.state.nodes:
        address = controller.internal_address_of(node_id)
        if address:
            contacts[node_id] = address
    contacts.setdefault(controller.node_id, "")
    ids = sorted(contacts)
    answers = await asyncio.gather(
        *(
            _ask_or_local(controller, i, contacts[i], cluster_pb2.RecoverControllerRequest())
            for i in ids
        ),
        return_exceptions=True,
    )
    logs: list[ControllerLogEnd] = []
    for node_id, ans in zip(ids, answers, strict=True):
        if isinstance(ans, BaseException):
            log.warning("force-recover-controller: node %d does not answer (%s)", node_id, ans)
            continue
        logs.append(_log_end(ans))
    plan = plan_controller_recovery(logs)
    chosen = plan.chosen
    target = voter_target(controller.state, len(plan.old_voters))
    summary = loss_summary(plan, target)
    log.warning("%s", summary)
    voters = sorted(plan.voters)
    forced: list[int] = []
    # The others first, the chosen survivor (which campaigns) last: its vote requests then
    # reach voters that already have the new configuration.
    for x in sorted(logs, key=lambda x: x.node_id == chosen.node_id):
        request = cluster_pb2.RecoverControllerRequest(
            force=True,
            voters=voters,
            through_index=chosen.last_index,
            campaign=x.node_id == chosen.node_id,
        )
        try:
            await _ask_or_local(controller, x.node_id, contacts[x.node_id], request)
        except TidelogError as err:
            log.warning("force-recover-controller: forcing node %d failed: %s", x.node_id, err)
        else:
            forced.append(x.node_id)
    if chosen.node_id not in forced:
        raise NodeUnavailable(
            f"node {chosen.node_id} could not be told to force its controller configuration; "
            "run force-recover-controller again"
        )
    summary += await _set_voter_target(controller, target)
    return admin_pb2.ForceRecoverControllerResponse(
        chosen=chosen.node_id,
        survivors=list(plan.survivors),
        lost_voters=list(plan.lost_voters),
        logs=[
            admin_pb2.ControllerLog(
                node_id=x.node_id,
                last_term=x.last_term,
                last_index=x.last_index,
                commit_index=x.commit_index,
                voter=x.node_id in plan.old_voters,
            )
            for x in logs
        ],
        kept_index=chosen.last_index,
        known_committed_index=plan.known_committed,
        voter_target=target,
        summary=summary,
    )


async def _set_voter_target(controller: Controller, target: int) -> str:
    """Once the chosen survivor leads, record the voter count to refill to."""
    deadline = time.monotonic() + leader_wait_s
    while controller.leader_id == NONE and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    if controller.state.settings.get(CONTROLLER_VOTERS, "0") not in ("", "0"):
        return ""
    try:
        await controller.set_cluster_config({CONTROLLER_VOTERS: str(target)}, [])
    except TidelogError as err:
        log.warning("force-recover-controller: could not set %s: %s", CONTROLLER_VOTERS, err)
        return (
            f"\n  {CONTROLLER_VOTERS} NOT set ({err}): set it to {target} once a controller "
            f"leads (tidelog cluster config set {CONTROLLER_VOTERS}={target})"
        )
    return ""


__all__ = [
    "ControllerLogEnd",
    "ControllerRecoveryPlan",
    "force_recover_controller",
    "loss_summary",
    "plan_controller_recovery",
    "recover_controller_method",
    "serve_recover_controller",
]
