"""Consumer groups on a real 3-node cluster, driven through the raw Group RPCs (the group
consumer is built separately): members here follow the protocol by hand (revoke what an
answer drops, take what it adds, report ownership when it changed), and after every answer
the test checks that no partition is owned by two members at once."""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import grpc
import pytest
from grpc import aio

from tests.support.nodeproc import Cluster, Node, running_cluster, until
from tidelog.errors import TidelogError, from_rpc_error
from tidelog.records import encode_batch
from tidelog.v1 import admin_pb2, admin_pb2_grpc, broker_pb2, group_pb2, group_pb2_grpc

pytestmark = pytest.mark.integration

TOPIC = "orders"
PARTITIONS = 6
NODES = (1, 2, 3)
STARTUP_TIMEOUT_S = 60.0
RETRIABLE = {"NOT_COORDINATOR", "COORDINATOR_LOADING", "LEADER_NOT_AVAILABLE", "NOT_LEADER"}

TP = tuple[str, int]


@pytest.fixture(scope="module")
def procs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[int, Node]]:
    with running_cluster(tmp_path_factory.mktemp("groups"), NODES) as nodes:
        yield nodes


@pytest.fixture
async def cluster(procs: dict[int, Node]) -> AsyncIterator[Cluster]:
    c = Cluster(procs, TOPIC)
    await c.with_topic(PARTITIONS, STARTUP_TIMEOUT_S)
    yield c
    await c.close()


@dataclass
class Member:
    group: str
    name: str
    member_id: str = ""
    epoch: int = 0
    owned: set[TP] = field(default_factory=set)
    report: bool = True
    joined: bool = False
    regex: str | None = None


class Groups:
    """A raw Group-service client: finds coordinators, follows the protocol for members."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.coordinator: dict[str, tuple[int, str]] = {}
        self.channels: dict[str, aio.Channel] = {}

    def stub(self, address: str) -> group_pb2_grpc.GroupAsyncStub:
        ch = self.channels.get(address)
        if ch is None:
            ch = self.channels[address] = aio.insecure_channel(address)
        return group_pb2_grpc.GroupStub(ch)  # type: ignore[return-value]

    async def find(self, group: str) -> tuple[int, str]:
        last: Exception | None = None
        for _ in range(200):
            for n in self.cluster.nodes.values():
                if n.proc is None or n.proc.poll() is not None:
                    continue
                try:
                    resp = await self.stub(n.address).FindCoordinator(
                        group_pb2.FindCoordinatorRequest(group_id=group), timeout=5
                    )
                    self.coordinator[group] = (resp.node_id, resp.address)
                    return resp.node_id, resp.address
                except grpc.RpcError as exc:
                    last = exc
            await asyncio.sleep(0.1)
        raise AssertionError(f"no coordinator for {group}: {last}")

    async def call(self, group: str, method: str, request: object) -> object:
        """Call the group's coordinator, finding it again on retriable errors."""
        for _ in range(300):
            if group not in self.coordinator:
                await self.find(group)
            _, address = self.coordinator[group]
            try:
                return await getattr(self.stub(address), method)(request, timeout=10)
            except grpc.RpcError as exc:
                err = from_rpc_error(exc)
                if err.reason in RETRIABLE or exc.code() in (
                    grpc.StatusCode.UNAVAILABLE,
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                ):
                    self.coordinator.pop(group, None)
                    await asyncio.sleep(0.1)
                    continue
                raise err from None
        raise AssertionError(f"{method} on {group} never reached a coordinator")

    async def heartbeat(self, m: Member) -> group_pb2.GroupHeartbeatResponse:
        req = group_pb2.GroupHeartbeatRequest(
            group_id=m.group, member_id=m.member_id, member_epoch=m.epoch
        )
        if not m.joined:
            if m.regex is not None:
                req.subscribed_topic_regex = m.regex
            else:
                req.subscribed_topic_names.append(TOPIC)
                req.subscription_set = True
            req.session_timeout_ms = 30_000
        if m.report or not m.joined:
            req.owned_set = True
            by_topic: dict[str, list[int]] = {}
            for topic, p in sorted(m.owned):
                by_topic.setdefault(topic, []).append(p)
            req.owned.extend(
                group_pb2.TopicPartitions(topic=t, partitions=ps) for t, ps in by_topic.items()
            )
        resp = await self.call(m.group, "Heartbeat", req)
        assert isinstance(resp, group_pb2.GroupHeartbeatResponse)
        m.joined = True
        m.report = False
        m.member_id = resp.member_id
        m.epoch = resp.member_epoch
        if resp.HasField("assignment"):
            allowed = {(tp.topic, p) for tp in resp.assignment.partitions for p in tp.partitions}
            before = set(m.owned)
            m.owned &= allowed
            m.owned |= allowed
            m.report = m.owned != before
        return resp

    async def close(self) -> None:
        for ch in self.channels.values():
            await ch.close(None)


async def scrape(cluster: Cluster, node_id: int) -> str:
    url = f"http://127.0.0.1:{cluster.nodes[node_id].metrics_port}/metrics"

    def get() -> str:
        with urllib.request.urlopen(url, timeout=5) as resp:
            body: bytes = resp.read()
        return body.decode()

    return await asyncio.to_thread(get)


def check_single_owner(members: list[Member]) -> None:
    seen: dict[TP, str] = {}
    for m in members:
        for tp in m.owned:
            assert tp not in seen, f"{tp} owned by {seen[tp]} and {m.name}"
            seen[tp] = m.name


async def settle(groups: Groups, members: list[Member], rounds_max: int = 60) -> None:
    everything = {(TOPIC, p) for p in range(PARTITIONS)}
    for _ in range(rounds_max):
        for m in members:
            await groups.heartbeat(m)
            check_single_owner(members)
        owned = [tp for m in members for tp in m.owned]
        if (
            set(owned) == everything
            and len(owned) == PARTITIONS
            and not any(m.report for m in members)
        ):
            counts = sorted(len(m.owned) for m in members)
            if counts[-1] - counts[0] <= 1:
                return
        await asyncio.sleep(0.05)
    raise AssertionError(f"group did not settle: {[(m.name, m.owned) for m in members]}")


@pytest.fixture
async def groups(cluster: Cluster) -> AsyncIterator[Groups]:
    g = Groups(cluster)
    yield g
    await g.close()


@pytest.mark.timeout(180)
async def test_members_share_the_partitions_and_a_fourth_moves_only_its_share(
    groups: Groups,
) -> None:
    members = [Member("g-share", f"m{i}") for i in range(3)]
    await settle(groups, members)
    assert sorted(len(m.owned) for m in members) == [2, 2, 2]
    before = {m.name: set(m.owned) for m in members}
    fourth = Member("g-share", "m3")
    members.append(fourth)
    await settle(groups, members)
    for m in members[:3]:
        assert m.owned <= before[m.name]  # kept partitions never moved between old members
    moved = sum(len(before[m.name] - m.owned) for m in members[:3])
    assert moved == len(fourth.owned) == 1

    desc = await groups.call(
        "g-share", "DescribeGroup", group_pb2.DescribeGroupRequest(group_id="g-share")
    )
    assert isinstance(desc, group_pb2.DescribeGroupResponse)
    assert desc.state == "stable" and len(desc.members) == 4
    # The coordinator exports the group (members, epoch) and the rebalances it computed.
    node_id, _ = await groups.find("g-share")

    async def exported() -> bool:
        text = await scrape(groups.cluster, node_id)
        return (
            'tidelog_group_members{group="g-share"} 4.0' in text
            and f'tidelog_group_epoch{{group="g-share"}} {float(desc.group_epoch)}' in text
            and "tidelog_group_rebalances_total" in text
        )

    await until("the coordinator exports the group", exported, 10)
    # ListGroups: each node lists the groups it coordinates; merged, the group is there once.
    listed = []
    for n in groups.cluster.nodes.values():
        resp = await groups.stub(n.address).ListGroups(group_pb2.ListGroupsRequest(), timeout=5)
        listed += [(x.group_id, x.state, x.members) for x in resp.groups if x.group_id == "g-share"]
    assert listed == [("g-share", "stable", 4)]
    for m in members:
        await groups.call(
            "g-share",
            "Heartbeat",
            group_pb2.GroupHeartbeatRequest(
                group_id="g-share", member_id=m.member_id, member_epoch=-1
            ),
        )


@pytest.mark.timeout(180)
async def test_commits_check_the_member_epoch_and_a_second_group_is_independent(
    groups: Groups,
) -> None:
    a, b = Member("g-commit", "a"), Member("g-commit", "b")
    await settle(groups, [a, b])
    mine = sorted(a.owned)[0]
    theirs = sorted(b.owned)[0]

    def commit(
        m: Member, tp: TP, offset: int, epoch: int | None = None
    ) -> group_pb2.OffsetCommitRequest:
        return group_pb2.OffsetCommitRequest(
            group_id=m.group,
            member_id=m.member_id,
            member_epoch=m.epoch if epoch is None else epoch,
            offsets=[group_pb2.OffsetEntry(topic=tp[0], partition=tp[1], offset=offset)],
        )

    await groups.call("g-commit", "OffsetCommit", commit(a, mine, 42))
    with pytest.raises(TidelogError) as stale:
        await groups.call("g-commit", "OffsetCommit", commit(a, mine, 43, a.epoch - 1))
    assert stale.value.reason == "STALE_MEMBER_EPOCH"
    with pytest.raises(TidelogError) as revoked:
        await groups.call("g-commit", "OffsetCommit", commit(a, theirs, 43))
    assert revoked.value.reason == "REVOKED"
    fetched = await groups.call(
        "g-commit", "OffsetFetch", group_pb2.OffsetFetchRequest(group_id="g-commit")
    )
    assert isinstance(fetched, group_pb2.OffsetFetchResponse)
    assert [(o.topic, o.partition, o.offset) for o in fetched.offsets] == [(*mine, 42)]
    desc = await groups.call(
        "g-commit", "DescribeGroup", group_pb2.DescribeGroupRequest(group_id="g-commit")
    )
    assert isinstance(desc, group_pb2.DescribeGroupResponse)
    lags = {(p.topic, p.partition): p for p in desc.partitions}
    assert set(lags) == {(TOPIC, p) for p in range(PARTITIONS)}
    assert lags[mine].committed_offset == 42 and lags[mine].member_id == a.member_id
    assert lags[theirs].committed_offset == -1 and lags[theirs].member_id == b.member_id
    # Nothing was produced: the end offset is 0, the lag of the committed partition 0.
    assert lags[mine].end_offset == 0 and lags[mine].lag == 0
    node_id, _ = await groups.find("g-commit")

    async def lag_exported() -> bool:
        text = await scrape(groups.cluster, node_id)
        return (
            f'tidelog_group_lag_records{{group="g-commit",partition="{mine[1]}",topic="{TOPIC}"}}'
            in text
        )

    await until("the coordinator exports the lag", lag_exported, 10)

    # A second group on the same topic: its one member gets everything, nothing committed.
    solo = Member("g-other", "solo")
    await settle(groups, [solo])
    assert len(solo.owned) == PARTITIONS
    other = await groups.call(
        "g-other", "OffsetFetch", group_pb2.OffsetFetchRequest(group_id="g-other")
    )
    assert isinstance(other, group_pb2.OffsetFetchResponse)
    assert list(other.offsets) == []

    # Nobody but the coordinators writes __consumer_offsets.
    with pytest.raises(grpc.RpcError) as internal:
        await groups.cluster.broker(1).Produce(
            broker_pb2.ProduceRequest(
                topic="__consumer_offsets", partition=0, batches=encode_batch([b"x"], [b"k"])
            ),
            timeout=5,
        )
    assert from_rpc_error(internal.value).reason == "INVALID_REQUEST"

    # Bad input: each a clear error.
    with pytest.raises(TidelogError) as bad_regex:
        await groups.call(
            "g-regex",
            "Heartbeat",
            group_pb2.GroupHeartbeatRequest(
                group_id="g-regex", member_epoch=0, subscribed_topic_regex="orders-("
            ),
        )
    assert bad_regex.value.reason == "INVALID_SUBSCRIPTION"
    with pytest.raises(TidelogError) as not_empty:
        await groups.call(
            "g-commit", "DeleteGroup", group_pb2.DeleteGroupRequest(group_id="g-commit")
        )
    assert not_empty.value.reason == "GROUP_NOT_EMPTY"
    with pytest.raises(TidelogError) as unknown:
        await groups.call(
            "g-nobody", "DescribeGroup", group_pb2.DescribeGroupRequest(group_id="g-nobody")
        )
    assert unknown.value.reason == "UNKNOWN_GROUP"


@pytest.mark.timeout(240)
async def test_the_group_survives_a_kill_of_its_coordinator_during_a_rebalance(
    groups: Groups, cluster: Cluster
) -> None:
    group = "g-failover"
    members = [Member(group, f"m{i}") for i in range(3)]
    await settle(groups, members)
    mine = sorted(members[0].owned)[0]
    await groups.call(
        group,
        "OffsetCommit",
        group_pb2.OffsetCommitRequest(
            group_id=group,
            member_id=members[0].member_id,
            member_epoch=members[0].epoch,
            offsets=[group_pb2.OffsetEntry(topic=mine[0], partition=mine[1], offset=7)],
        ),
    )
    node_id, _ = await groups.find(group)
    ids_before = {m.member_id for m in members}
    # A fourth member joins (a rebalance starts), then the coordinator's node dies.
    newcomer = Member(group, "m3")
    members.append(newcomer)
    await groups.heartbeat(newcomer)
    desc_before = await groups.call(
        group, "DescribeGroup", group_pb2.DescribeGroupRequest(group_id=group)
    )
    assert isinstance(desc_before, group_pb2.DescribeGroupResponse)
    epochs_before = {x.member_id: x.member_epoch for x in desc_before.members}
    cluster.nodes[node_id].kill()
    try:
        await settle(groups, members, rounds_max=200)
        new_node, _ = await groups.find(group)
        assert new_node != node_id
        desc = await groups.call(
            group, "DescribeGroup", group_pb2.DescribeGroupRequest(group_id=group)
        )
        assert isinstance(desc, group_pb2.DescribeGroupResponse)
        assert {x.member_id for x in desc.members} == ids_before | {newcomer.member_id}
        assert desc.group_epoch == desc_before.group_epoch
        for x in desc.members:
            assert x.member_epoch >= epochs_before[x.member_id]
        fetched = await groups.call(
            group, "OffsetFetch", group_pb2.OffsetFetchRequest(group_id=group)
        )
        assert isinstance(fetched, group_pb2.OffsetFetchResponse)
        assert [(o.topic, o.partition, o.offset) for o in fetched.offsets] == [(*mine, 7)]
    finally:
        cluster.nodes[node_id].start()


@pytest.mark.timeout(120)
async def test_a_regex_subscription_picks_up_topics_created_and_grown_later(
    groups: Groups, cluster: Cluster
) -> None:
    m = Member("g-regex-later", "m", regex="later-.*")
    await groups.heartbeat(m)
    assert m.owned == set()  # nothing matches yet: an explicit empty assignment
    admin = admin_pb2_grpc.AdminStub(cluster.channel(1))
    await admin.CreateTopics(
        admin_pb2.CreateTopicsRequest(
            topics=[admin_pb2.TopicSpec(name="later-1", partitions=2, replication_factor=3)]
        )
    )

    async def owns(count: int) -> bool:
        await groups.heartbeat(m)
        return m.owned == {("later-1", p) for p in range(count)}

    await until("the new topic's partitions are assigned", lambda: owns(2), 30)
    await admin.CreatePartitions(
        admin_pb2.CreatePartitionsRequest(topic="later-1", total_count=3), timeout=10
    )
    await until("the grown topic's new partition is assigned", lambda: owns(3), 30)
