"""A committed controller command that a node cannot read stops group 0 on that node, loudly,
and a restart refuses to start: the controller never skips an entry (issue 8, defect 4).

Before the fix the entry was logged as "skipped" and the node applied the commands after it,
so its metadata could differ from every other node's (a newer command version during a
rolling upgrade)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from tests.support import free_port
from tidelog.node.multiraft import RaftTiming
from tidelog.node.server import Node, StartupError
from tidelog.node.stm import BatchSpan, UnappliableEntry
from tidelog.records import encode_batch

TIMING = RaftTiming(tick_ms=10, heartbeat_interval_ms=30, election_timeout_ms=300)


def _node(base: Path, port: int, internal_port: int) -> Node:
    address = f"127.0.0.1:{port}"
    internal = f"127.0.0.1:{internal_port}"
    return Node(
        1,
        address,
        base,
        0,
        controller_voters=f"1@{internal}",
        internal_listen=internal,
        timing=TIMING,
    )


@pytest.mark.timeout(60)
async def test_a_command_from_a_newer_version_stops_the_controller(tmp_path: Path) -> None:
    port, internal_port = free_port(), free_port()
    node = _node(tmp_path / "n1", port, internal_port)
    await node.start()
    controller = node.controller
    try:
        async with asyncio.timeout(10):
            while not controller.is_leader:
                await asyncio.sleep(0.01)
        applied = controller.state.applied_index
        newer = json.dumps({"type": "mark_node_alive", "node_id": 1, "v": 99}).encode()
        after = json.dumps({"type": "mark_node_dead", "node_id": 1, "v": 1}).encode()
        for command in (newer, after):
            buf = encode_batch([command], timestamps_ms=0, control=True)
            controller.propose_batches([BatchSpan(buf, 0, len(buf), 1)])
        async with asyncio.timeout(10):
            await controller.stopped.wait()
        assert isinstance(controller.halted, UnappliableEntry)
        assert "version 99" in str(controller.halted)
        await asyncio.sleep(0.2)
        # Neither the unreadable command nor the one after it was applied.
        assert controller.state.applied_index == applied
        assert controller.group is not None and controller.group.failed
    finally:
        await node.stop(1)

    restarted = _node(tmp_path / "n1", port, internal_port)
    with pytest.raises(StartupError, match="cannot follow the cluster's metadata"):
        await restarted.start()
    await restarted.stop(1)
