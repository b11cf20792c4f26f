"""Fixtures of the unit tests that run a node in-process: ``node`` (a one-node cluster over
the instrumented real log, on free ports) and ``client`` (its Broker and Admin stubs)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.support import free_port
from tests.unit.node_fakes import Client, InstrumentedLog
from tidelog.node.server import Node


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[Node]:
    n = Node(1, "127.0.0.1:0", tmp_path, free_port(), open_log=InstrumentedLog)
    await n.start()
    yield n
    await n.stop(1)


@pytest.fixture
async def client(node: Node) -> AsyncIterator[Client]:
    c = Client(node)
    yield c
    await c.channel.close(None)
