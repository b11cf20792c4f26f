"""Clients following a leader change, against a fake three-node cluster: retries go to the
new leader as soon as the metadata (or a NOT_LEADER answer) names it, not when a doubled
backoff runs out; a dead node is neither hammered nor allowed to stall a metadata refresh.

The backoffs in these tests are long on purpose (seconds): a client that waited them out
would miss the bounds, which still leave a second or more of slack for a loaded machine.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.unit.client_fakes import FakeReplicatedCluster, Hints
from tidelog.client import Consumer, Producer, TopicPartition
from tidelog.client.metadata import (
    ClusterMetadata,
    NodeInfo,
    PartitionInfo,
    TopicInfo,
)
from tidelog.errors import LeaderNotAvailable, NotLeader, UnknownTopic

pytestmark = pytest.mark.timeout(60)

TP = TopicPartition("t", 0)
#: A backoff no test may wait out: retries must come from following the leader.
LONG_BACKOFF_MS = 3_000
#: Bound on "at once" after a leader change (the metadata poll is every 50 ms).
PROMPT_S = 1.0


async def test_producer_retry_goes_to_the_new_leader_without_waiting_the_backoff() -> None:
    async with FakeReplicatedCluster({"t": 1}) as fc:
        async with Producer(fc.bootstrap, linger_ms=0, retry_backoff_ms=LONG_BACKOFF_MS) as p:
            assert (await p.send("t", b"a")).offset == 0
            fc.nodes[1].down = True  # the leader dies
            fut = asyncio.ensure_future(p.send_and_wait("t", b"b"))
            await asyncio.sleep(0.3)
            assert not fut.done()
            tried_dead = fc.produce_requests[1]
            fc.move_leader("t", 0, 2)  # the cluster elects node 2
            moved = time.monotonic()
            md = await asyncio.wait_for(fut, 5)
            assert time.monotonic() - moved < PROMPT_S
        assert md.offset == 1
        assert [r.value for r in fc.log("t", 0)] == [b"a", b"b"]
        assert fc.produce_requests[2] == 1
        # One attempt at the dead node before the move, not a retry loop against it.
        assert tried_dead == 2


async def test_producer_follows_a_partition_through_no_leader_to_a_new_one() -> None:
    async with FakeReplicatedCluster({"t": 1}) as fc:
        async with Producer(fc.bootstrap, linger_ms=0, retry_backoff_ms=LONG_BACKOFF_MS) as p:
            await p.send("t", b"a")
            fc.nodes[1].down = True
            fc.move_leader("t", 0, -1)  # an election is running
            fut = asyncio.ensure_future(p.send_and_wait("t", b"b"))
            await asyncio.sleep(0.3)
            assert not fut.done()
            fc.move_leader("t", 0, 3)
            moved = time.monotonic()
            md = await asyncio.wait_for(fut, 5)
            assert time.monotonic() - moved < PROMPT_S
        assert md.offset == 1 and fc.produce_requests[3] == 1


async def test_a_dead_leader_is_retried_a_few_times_a_second_not_in_a_loop() -> None:
    async with FakeReplicatedCluster({"t": 1}) as fc:
        async with Producer(fc.bootstrap, linger_ms=0, retry_backoff_ms=10) as p:
            await p.send("t", b"a")
            fc.nodes[1].down = True
            before = fc.produce_requests[1]
            metadata_before = sum(fc.metadata_requests.values())
            dead_metadata_before = fc.metadata_requests[1]
            fut = asyncio.ensure_future(p.send_and_wait("t", b"b"))
            await asyncio.sleep(1.0)
            attempts = fc.produce_requests[1] - before
            metadata = sum(fc.metadata_requests.values()) - metadata_before
            fc.move_leader("t", 0, 2)
            assert (await asyncio.wait_for(fut, 5)).offset == 1
        # Backoff 10, 20, 40, 80, 160, then 250 ms: about 8 attempts in a second (a busy
        # loop would make thousands; the old 1 s cap 6, but then the next was 1 s late).
        assert 3 <= attempts <= 15, attempts
        # Metadata is polled about every 50 ms meanwhile, from the live nodes.
        assert 3 <= metadata <= 40, metadata
        assert fc.metadata_requests[1] - dead_metadata_before <= 1


@pytest.mark.parametrize(
    "settings",
    [
        pytest.param({}, id="idempotent-5-in-flight"),
        pytest.param(
            {"enable_idempotence": False, "max_in_flight_per_partition": 1},
            id="not-idempotent-1-in-flight",
        ),
    ],
)
async def test_writes_keep_their_order_across_a_leader_move(settings: dict[str, object]) -> None:
    """The order the producer promises (the Producer docstring): the default, idempotent
    producer with 5 requests in flight, and a producer without idempotence with its one
    request in flight. A non-idempotent producer with several in flight promises no order:
    gRPC does not order concurrent calls, and this test once saw such a pair swapped on a
    loaded machine."""
    async with FakeReplicatedCluster({"t": 1}) as fc:
        async with Producer(
            fc.bootstrap,
            batch_bytes_max=1000,
            retry_backoff_ms=LONG_BACKOFF_MS,
            **settings,  # type: ignore[arg-type]
        ) as p:
            values = [b"%06d" % i for i in range(3000)]
            handle = p.send_many("t", values[:1500])
            await asyncio.sleep(0.01)
            fc.nodes[1].down = True
            handle2 = p.send_many("t", values[1500:])
            await asyncio.sleep(0.2)
            fc.move_leader("t", 0, 2)
            res = await asyncio.wait_for(handle, 10) + await asyncio.wait_for(handle2, 10)
        assert [r.value for r in fc.log("t", 0)] == values
        offsets = [(md.base_offset, md.record_count) for md in res]
        assert offsets == sorted(offsets)
        assert fc.produce_requests[2] > 0


async def test_newer_batches_wait_for_the_requests_pending_at_the_old_leader() -> None:
    """Batches in flight at node 1 when the metadata moves the leader to node 2 are refused
    there later (NOT_LEADER) and retried; a newer batch sent to node 2 meanwhile would be
    acknowledged ahead of them, so the partition waits until node 1 has answered."""
    async with FakeReplicatedCluster({"t": 1}) as fc:
        async with Producer(
            fc.bootstrap, linger_ms=0, batch_bytes_max=200, max_in_flight_per_partition=8
        ) as p:
            await p.send("t", b"first")
            fc.nodes[1].produce_delay_s = 0.3
            older = p.send_many("t", [b"a%05d" % i for i in range(40)])
            await asyncio.sleep(0.05)  # several batches are waiting at node 1
            fc.move_leader("t", 0, 2)
            await p.metadata.refresh()
            newer = p.send_many("t", [b"b%05d" % i for i in range(40)])
            await asyncio.wait_for(newer, 5)
            await asyncio.wait_for(older, 5)
        values = [r.value or b"" for r in fc.log("t", 0)]
        assert values == [b"first"] + [b"a%05d" % i for i in range(40)] + [
            b"b%05d" % i for i in range(40)
        ]


async def test_writes_leave_a_paused_leader_once_another_node_leads() -> None:
    """A SIGSTOP'd leader holds requests without answering or failing them (until the 30 s
    request timeout); once the metadata names another leader the producer gives up on
    them and resends there, in order."""
    async with FakeReplicatedCluster({"t": 1}) as fc:
        async with Producer(fc.bootstrap, linger_ms=0, batch_bytes_max=200) as p:
            await p.send("t", b"first")
            fc.nodes[1].running.clear()
            older = p.send_many("t", [b"a%05d" % i for i in range(40)])
            await asyncio.sleep(0.3)
            fc.move_leader("t", 0, 2)
            moved = time.monotonic()
            newer = p.send_many("t", [b"b%05d" % i for i in range(10)])
            await asyncio.wait_for(older, 5)
            await asyncio.wait_for(newer, 5)
            took_s = time.monotonic() - moved
            fc.nodes[1].running.set()  # resumed: what it held is refused (not the leader)
            await asyncio.sleep(0.1)
        # Within the stall check (1 s) plus a metadata poll, not the request timeout.
        assert took_s < 2.5, took_s
        values = [r.value or b"" for r in fc.log("t", 0)]
        assert values == [b"first"] + [b"a%05d" % i for i in range(40)] + [
            b"b%05d" % i for i in range(10)
        ]


@pytest.mark.parametrize("hints", ["id_and_address", "address"])
async def test_not_leader_naming_the_leader_is_followed_at_once(hints: Hints) -> None:
    async with FakeReplicatedCluster({"t": 1}, hints=hints) as fc:
        async with Producer(fc.bootstrap, linger_ms=0, retry_backoff_ms=LONG_BACKOFF_MS) as p:
            await p.send("t", b"a")
            # Node 3 leads now, but Metadata keeps naming node 1: only the hint tells.
            fc.move_leader("t", 0, 3, announce=False)
            began = time.monotonic()
            md = await asyncio.wait_for(p.send("t", b"b"), 5)
            assert time.monotonic() - began < PROMPT_S
            assert p.metadata.leader_address("t", 0) == fc.address(3)
        assert md.offset == 1 and fc.produce_requests[3] == 1


async def test_nodes_naming_each_other_fall_back_to_the_backoff() -> None:
    """Stale hints that bounce between two nodes are followed a few times, then paced."""
    async with FakeReplicatedCluster({"t": 1}) as fc:
        async with Producer(fc.bootstrap, linger_ms=0, retry_backoff_ms=10) as p:
            await p.send("t", b"a")
            fc.move_leader("t", 0, 2, announce=False)
            node1, node2 = fc.nodes[1], fc.nodes[2]
            # Node 2 points back at node 1 (it has not heard of its own election yet).
            check = fc.check

            def bouncing(node: object, topic: str, partition: int) -> NotLeader | None:
                if node is node2:
                    return NotLeader("not me", leader_id="1", leader_address=node1.address)
                return check(node, topic, partition)  # type: ignore[arg-type, return-value]

            fc.check = bouncing  # type: ignore[method-assign, assignment]
            before = sum(fc.produce_requests.values())
            fut = asyncio.ensure_future(p.send_and_wait("t", b"b"))
            await asyncio.sleep(1.0)
            bounced = sum(fc.produce_requests.values()) - before
            fc.check = check  # type: ignore[method-assign]
            assert (await asyncio.wait_for(fut, 5)).offset == 1
        assert 4 <= bounced <= 20, bounced


async def test_metadata_refresh_does_not_stall_on_a_node_that_never_answers() -> None:
    async with FakeReplicatedCluster({"t": 1}) as fc:
        fc.nodes[1].metadata_delay_s = 30  # accepts the connection, never answers
        began = time.monotonic()
        async with Producer(fc.bootstrap) as p:  # node 1 is first in the bootstrap list
            started_s = time.monotonic() - began
            assert started_s < 3, started_s
            assert p.metadata.topic("t") is not None
            began = time.monotonic()
            await p.metadata.refresh()
            assert time.monotonic() - began < 0.4  # asks the node that answered, first
        assert fc.metadata_requests[1] == 1


async def test_metadata_asks_a_live_node_first_after_one_was_unreachable() -> None:
    async with FakeReplicatedCluster({"t": 1}) as fc:
        meta = ClusterMetadata(fc.bootstrap)
        try:
            await meta.refresh()
            assert fc.metadata_requests[1] == 1
            fc.nodes[1].down = True
            await meta.refresh()  # node 1 refuses, node 2 answers
            await meta.refresh()
            await meta.refresh()
            assert fc.metadata_requests[1] == 2
            assert meta.addresses()[0] == fc.address(2)
            assert meta.addresses()[-1] == fc.address(1)
        finally:
            await meta.close()


async def test_consumer_stream_reconnects_to_the_new_leader_promptly() -> None:
    async with FakeReplicatedCluster({"t": 1}) as fc:
        async with Producer(fc.bootstrap) as p:
            await p.send_many("t", [b"%d" % i for i in range(10)])
        async with Consumer(fc.bootstrap, retry_backoff_ms=LONG_BACKOFF_MS) as c:
            c.assign([TP])
            await c.seek_to_beginning()
            got = await _read(c, 10)
            fc.nodes[1].down = True  # the stream breaks
            await asyncio.sleep(0.3)
            fc.move_leader("t", 0, 2)
            moved = time.monotonic()
            async with Producer(fc.bootstrap) as p:
                await asyncio.wait_for(p.send_many("t", [b"%d" % i for i in range(10, 20)]), 5)
            got += await _read(c, 10)
            assert time.monotonic() - moved < PROMPT_S + 0.5
        assert got == list(range(20))
        assert fc.fetch_streams[2] >= 1


@pytest.mark.parametrize("hints", ["id_and_address", "address"])
async def test_consumer_follows_a_not_leader_hint(hints: Hints) -> None:
    async with FakeReplicatedCluster({"t": 1}, hints=hints) as fc:
        async with Producer(fc.bootstrap) as p:
            await p.send_many("t", [b"%d" % i for i in range(10)])
        async with Consumer(fc.bootstrap, retry_backoff_ms=LONG_BACKOFF_MS) as c:
            c.assign([TP])
            await c.seek_to_beginning()
            got = await _read(c, 10)
            fc.move_leader("t", 0, 3, announce=False)  # only NOT_LEADER tells
            async with Producer(fc.bootstrap) as p:  # follows the hint as well
                await asyncio.wait_for(p.send_many("t", [b"%d" % i for i in range(10, 20)]), 5)
            began = time.monotonic()
            got += await _read(c, 10)
            assert time.monotonic() - began < PROMPT_S
        assert got == list(range(20))


async def test_a_partition_down_for_long_is_polled_slower() -> None:
    async with FakeReplicatedCluster({"t": 1}) as fc:
        fc.move_leader("t", 0, -1)
        meta = ClusterMetadata(fc.bootstrap)
        try:
            await meta.refresh()
            counts = []
            for since_s in (None, time.monotonic() - 60):
                before = sum(fc.metadata_requests.values())
                got = await meta.wait_for_leader("t", 0, timeout_s=1.0, since_s=since_s)
                assert got is None
                counts.append(sum(fc.metadata_requests.values()) - before)
                await asyncio.sleep(0.3)  # the poller of the first wait ends
        finally:
            await meta.close()
        fresh, old = counts
        # Every 50 ms for a fresh wait, every 250 ms for one that began a minute ago.
        assert fresh >= 8 and old <= 6 and old < fresh, counts


async def test_a_topic_deleted_while_waiting_for_a_leader_fails_its_records() -> None:
    async with FakeReplicatedCluster({"t": 1, "u": 1}) as fc:
        async with Producer(fc.bootstrap, linger_ms=0) as p:
            fc.move_leader("t", 0, -1)
            await p.metadata.refresh()
            fut = p.send("t", b"a")
            await asyncio.sleep(0.2)
            del fc.topics["t"]
            with pytest.raises(UnknownTopic, match="no longer exists"):
                await asyncio.wait_for(fut, 5)
            assert (await p.send("u", b"b")).offset == 0


def _meta_with_two_nodes() -> ClusterMetadata:
    meta = ClusterMetadata("127.0.0.1:1")
    meta.nodes = {
        1: NodeInfo(1, "127.0.0.1:1", "", True),
        2: NodeInfo(2, "127.0.0.1:2", "", True),
    }
    meta.topics = {"t": TopicInfo("t", (PartitionInfo(0, 1, (1, 2), (1, 2)),), False)}
    return meta


def test_leader_hints_that_are_taken_and_refused() -> None:
    meta = _meta_with_two_nodes()
    # Not a NOT_LEADER, or one naming the same leader, or one with nothing usable.
    assert not meta.apply_leader_hint("t", 0, LeaderNotAvailable("election"))
    assert not meta.apply_leader_hint("t", 0, NotLeader("x", leader_id="1"))
    assert not meta.apply_leader_hint("t", 0, NotLeader("x", leader_address="x"))
    assert not meta.apply_leader_hint("t", 0, NotLeader("x"))
    assert not meta.apply_leader_hint("nope", 0, NotLeader("x", leader_id="2"))
    assert meta.leader_address("t", 0) == "127.0.0.1:1"
    # The id of a known node wins over the address in the hint.
    version = meta.version
    assert meta.apply_leader_hint("t", 0, NotLeader("x", leader_id="2", leader_address="bad"))
    assert meta.leader_address("t", 0) == "127.0.0.1:2" and meta.version > version
    # An unknown node with an address is added; a node found unreachable lately is not
    # trusted (the hint comes from a node that has not noticed the leader's death).
    assert meta.apply_leader_hint("t", 0, NotLeader("x", leader_id="7", leader_address="h:7"))
    assert meta.leader_address("t", 0) == "h:7"
    meta.note_unreachable("127.0.0.1:1")
    assert not meta.apply_leader_hint("t", 0, NotLeader("x", leader_id="1"))
    assert meta.leader_address("t", 0) == "h:7"


async def _read(c: Consumer, n: int) -> list[int]:
    got: list[int] = []
    async with asyncio.timeout(10):
        while len(got) < n:
            got += [int(r.value or b"-1") for r in await c.poll(timeout_ms=200)]
    return got
