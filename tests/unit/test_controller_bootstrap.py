"""The controller bootstrap (node/controller_bootstrap.py, issue 8: a majority of controller
voters wiped): a voter on an empty data directory forms a new cluster only when every other
listed voter answered that it is fresh, joins when one holds state, and waits otherwise."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.support import free_port
from tidelog.node.controller_bootstrap import WAITING, Outcome, PeerAnswer, decide
from tidelog.node.multiraft import RaftTiming
from tidelog.node.server import Node

FRESH = PeerAnswer(fresh=True, cluster_id="derived")


def test_a_lone_voter_forms_its_cluster_at_once() -> None:
    assert decide(1, [1], {}).outcome is Outcome.NEW


def test_every_voter_fresh_forms_a_new_cluster() -> None:
    assert decide(1, [1, 2, 3], {2: FRESH, 3: FRESH}).outcome is Outcome.NEW


def test_a_silent_voter_makes_a_fresh_voter_wait() -> None:
    d = decide(2, [1, 2, 3], {1: FRESH, 3: None})
    assert d.outcome is Outcome.WAIT
    assert WAITING in d.reason and "node 3" in d.reason
    d = decide(2, [1, 2, 3], {})
    assert d.outcome is Outcome.WAIT and "nodes 1,3" in d.reason


def test_a_voter_holding_state_is_joined_with_its_cluster_id() -> None:
    holder = PeerAnswer(fresh=False, cluster_id="the-cluster")
    # Even when another voter is silent (the wiped-majority case: the survivor answers).
    for answers in ({1: None, 3: holder}, {1: FRESH, 3: holder}):
        d = decide(2, [1, 2, 3], answers)
        assert d.outcome is Outcome.JOIN
        assert d.cluster_id == "the-cluster"


def test_answers_of_nodes_that_are_not_listed_voters_do_not_count() -> None:
    holder = PeerAnswer(fresh=False, cluster_id="x")
    assert decide(1, [1, 2], {2: FRESH, 7: holder}).outcome is Outcome.NEW
    assert decide(1, [1, 2], {7: holder}).outcome is Outcome.WAIT


TIMING = RaftTiming(tick_ms=10, heartbeat_interval_ms=30, election_timeout_ms=300)


def _node(base: Path, node_id: int, ports: dict[int, tuple[int, int]]) -> Node:
    voters = ",".join(f"{i}@127.0.0.1:{ip}" for i, (_p, ip) in sorted(ports.items()))
    port, internal_port = ports[node_id]
    return Node(
        node_id,
        f"127.0.0.1:{port}",
        base / f"n{node_id}",
        0,
        controller_voters=voters,
        internal_listen=f"127.0.0.1:{internal_port}",
        timing=TIMING,
    )


@pytest.mark.timeout(60)
async def test_a_voter_alone_serves_but_forms_no_cluster_until_the_others_answer(
    tmp_path: Path,
) -> None:
    ports = {i: (free_port(), free_port()) for i in (1, 2)}
    first = _node(tmp_path, 1, ports)
    second = _node(tmp_path, 2, ports)
    await first.start()  # it serves: start-up does not wait for the other voter
    try:
        ctl = first.controller
        assert ctl.forming and ctl.fresh
        await asyncio.sleep(1.5)  # five election timeouts
        assert ctl.forming and WAITING in ctl.waiting and "node 2" in ctl.waiting
        assert ctl.leader_id == 0 and ctl.state.applied_index == 0
        await second.start()
        async with asyncio.timeout(20):
            while ctl.forming or not (ctl.leader_id and ctl.registered.is_set()):
                await asyncio.sleep(0.02)
        assert not ctl.forming and not ctl.fresh and ctl.waiting == ""
        assert not second.controller.forming
        assert first.identity is not None and second.identity is not None
        assert first.identity.cluster_id == second.identity.cluster_id
    finally:
        await second.stop(1)
        await first.stop(1)
