"""Admin's metadata users need (issue 16 item 4): the leader epoch on every partition, and
describe_topics figures from each partition's leader whichever node answers first."""

from __future__ import annotations

import pytest

from tests.unit.client_fakes import FakeReplicatedCluster
from tidelog.client import Admin, Producer

pytestmark = pytest.mark.timeout(60)


async def test_metadata_carries_the_leader_epoch() -> None:
    async with FakeReplicatedCluster({"t": 2}, nodes=3) as fc, Admin(fc.bootstrap) as admin:
        view = await admin.metadata()
        (topic,) = view.topics
        assert [p.leader_epoch for p in topic.partitions] == [1, 1]
        fc.move_leader("t", 1, 2)
        fc.move_leader("t", 1, 3)
        (topic,) = (await admin.metadata()).topics
        assert [(p.leader, p.leader_epoch) for p in topic.partitions] == [(1, 1), (3, 3)]
        (desc,) = await admin.describe_topics("t")
        assert [p.leader_epoch for p in desc.partitions] == [1, 3]


async def test_describe_topics_takes_offsets_from_each_leader() -> None:
    async with FakeReplicatedCluster({"t": 2}, nodes=3) as fc:
        async with Producer(fc.bootstrap) as p:
            for i in range(5):
                await p.send("t", b"a%d" % i, partition=0)
            fc.move_leader("t", 1, 3)
            for i in range(7):
                await p.send("t", b"b%d" % i, partition=1)
        # Bootstrap at node 2, which leads nothing: alone it would answer 0 for both.
        async with Admin(fc.address(2)) as admin:
            (desc,) = await admin.describe_topics("t")
        assert [(q.leader, q.high_watermark, q.size_bytes) for q in desc.partitions] == [
            (1, 5, 50),
            (3, 7, 70),
        ]
