"""``tidelog topic add-partitions`` and ``Admin.create_partitions`` against a real node: the
new partitions take records at once, the old ones keep theirs, and what cannot be done is
one readable line."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import pytest

from tests.integration.test_client_cli import ok, one_error_line, tidelog, unique
from tests.support.nodeproc import Node
from tidelog.client import Admin, Consumer, Producer, TopicPartition
from tidelog.errors import InvalidPartitions, UnknownTopic

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    base = tmp_path_factory.mktemp("addparts-node")
    n = Node(base / "data", base / "node.log", via_cli=True)
    n.start()
    try:
        yield n
    finally:
        n.kill()


def test_cli_grows_a_topic_and_the_new_partitions_work(node: Node) -> None:
    name = unique("grow")
    ok(tidelog(node, "topic", "create", name, "--partitions", "2"))
    ok(tidelog(node, "produce", name, "--partition", "1", stdin=b"old\n"))
    out = ok(tidelog(node, "topic", "add-partitions", name, "--to", "3", "--dry-run"))
    assert out.strip() == f"would grow topic {name} from 2 to 3 partitions"
    (desc,) = json.loads(ok(tidelog(node, "topic", "describe", name, "--json")))
    assert len(desc["partitions"]) == 2
    out = ok(tidelog(node, "topic", "add-partitions", name, "--to", "3"))
    assert out.strip() == f"grew topic {name} from 2 to 3 partitions"
    out = ok(tidelog(node, "topic", "add-partitions", name, "--add", "2"))
    assert out.strip() == f"grew topic {name} from 3 to 5 partitions"
    (desc,) = json.loads(ok(tidelog(node, "topic", "describe", name, "--json")))
    assert [p["partition"] for p in desc["partitions"]] == [0, 1, 2, 3, 4]
    assert desc["partitions"][1]["high_watermark"] == 1  # the old record stayed

    async def use_new_partition() -> list[bytes | None]:
        async with Producer(node.address) as producer:
            md = await producer.send(name, b"new", partition=4)
            assert (md.partition, md.offset) == (4, 0)
        async with Consumer(node.address, auto_offset_reset="earliest") as consumer:
            assert len(await consumer.partitions_for(name)) == 5
            consumer.assign([TopicPartition(name, 4)])
            return [r.value for r in await consumer.poll(timeout_ms=10_000)]

    assert asyncio.run(asyncio.wait_for(use_new_partition(), 60)) == [b"new"]


def test_cli_refusals_are_one_line(node: Node) -> None:
    name = unique("nogrow")
    ok(tidelog(node, "topic", "create", name, "--partitions", "3"))
    line = one_error_line(tidelog(node, "topic", "add-partitions", name, "--to", "2"), 2)
    assert "has 3 partitions already" in line
    line = one_error_line(tidelog(node, "topic", "add-partitions", name), 2)
    assert "exactly one of --to N" in line
    both = ("topic", "add-partitions", name, "--to", "5", "--add", "1")
    assert "exactly one of" in one_error_line(tidelog(node, *both), 2)
    line = one_error_line(tidelog(node, "topic", "add-partitions", unique("nope"), "--add", "1"), 1)
    assert "unknown topic" in line


def test_admin_refuses_shrinking_and_unknown_topics(node: Node) -> None:
    name = unique("admin-grow")

    async def go() -> None:
        async with Admin(node.address) as admin:
            await admin.create_topics(name, 2, 1)
            desc = await admin.create_partitions(name, 4)
            assert len(desc.partitions) == 4
            with pytest.raises(InvalidPartitions, match="only grows"):
                await admin.create_partitions(name, 4)
            with pytest.raises(UnknownTopic, match="unknown topic"):
                await admin.create_partitions(unique("missing"), 4)

    asyncio.run(asyncio.wait_for(go(), 60))
