"""Topics on a lone node, through the controller: validation of whole requests, persistence
across restarts (the metadata log is replayed), replica directories, delete, alter, orphans."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.support import free_port
from tests.unit.node_fakes import InstrumentedLog
from tidelog.config import TopicConfig
from tidelog.errors import (
    InvalidConfig,
    InvalidPartitions,
    InvalidReplicationFactor,
    InvalidRequest,
    InvalidTopic,
    LeaderNotAvailable,
    TopicExists,
    UnknownPartition,
    UnknownTopic,
)
from tidelog.node.controller_node import TopicSpec
from tidelog.node.partition import LogLike
from tidelog.node.server import Node
from tidelog.node.topics import TopicRegistry, topic_dir_name


class Env:
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.logs: dict[Path, InstrumentedLog] = {}
        self.node: Node | None = None
        self.fail_dir: str | None = None

    def open_log(self, directory: Path, config: TopicConfig) -> LogLike:
        if self.fail_dir is not None and directory.name == self.fail_dir:
            raise OSError(28, "No space left on device")
        lg = InstrumentedLog(directory, config)
        self.logs[directory] = lg
        return lg

    async def start(self) -> TopicRegistry:
        self.node = Node(1, "127.0.0.1:0", self.data_dir, free_port(), open_log=self.open_log)
        await self.node.start()
        return self.node.registry

    async def stop(self) -> None:
        assert self.node is not None
        await self.node.stop(1)

    async def restart(self) -> TopicRegistry:
        await self.stop()
        return await self.start()

    async def create(self, *specs: TopicSpec, validate_only: bool = False) -> list[str]:
        assert self.node is not None
        names, index = await self.node.controller.create_topics(
            list(specs), validate_only=validate_only
        )
        if not validate_only:
            await self.node.registry.wait_reconciled(index, 5)
        return names

    async def delete(self, *names: str) -> list[str]:
        assert self.node is not None
        deleted, index = await self.node.controller.delete_topics(list(names))
        await self.node.registry.wait_reconciled(index, 5)
        return deleted

    async def alter(self, name: str, set_: dict[str, str], delete: list[str]) -> None:
        assert self.node is not None
        index = await self.node.controller.alter_topic_config(name, set_, delete)
        await self.node.registry.wait_reconciled(index, 5)

    def topic_dir(self, name: str) -> Path:
        assert self.node is not None
        record = self.node.controller.state.topics[name]
        return self.data_dir / "topics" / topic_dir_name(name, record.topic_id)


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    e = Env(tmp_path)
    await e.start()
    yield e
    await e.stop()


def reg(env: Env) -> TopicRegistry:
    assert env.node is not None
    return env.node.registry


@pytest.mark.timeout(20)
async def test_create_persists_across_restart(env: Env) -> None:
    created = await env.create(TopicSpec("a", 3, 0, {"retention.ms": "1000"}), TopicSpec("b", 1))
    assert created == ["a", "b"]
    assert (env.topic_dir("a") / "2").is_dir()
    r = await env.restart()
    assert [t.name for t in r.topics()] == ["a", "b"]
    a = r.topic("a")
    assert a.partition_count == 3 and a.replication_factor == 1
    assert a.overrides == {"retention.ms": "1000"}
    assert a.config.retention_ms == 1000
    assert a.effective_configs()["retention.ms"] == "1000"
    assert a.effective_configs()["flush"] == "durable"
    assert sorted(a.local) == [0, 1, 2]
    assert all(p.serving for p in a.local.values())


@pytest.mark.timeout(20)
@pytest.mark.parametrize(
    ("spec", "error", "match"),
    [
        (TopicSpec("bad name", 1), InvalidTopic, "contains ' '"),
        (TopicSpec("x" * 250, 1), InvalidTopic, "at most 249"),
        (TopicSpec("", 1), InvalidTopic, "empty"),
        (TopicSpec("..", 1), InvalidTopic, "not allowed"),
        (TopicSpec("p", 0), InvalidPartitions, "topic 'p': partitions must be at least 1"),
        (TopicSpec("r", 1, 3), InvalidReplicationFactor, "only 1 node in the cluster"),
        (TopicSpec("r", 1, -1), InvalidReplicationFactor, "at least 1"),
        (TopicSpec("c", 1, 0, {"nope": "1"}), InvalidConfig, "unknown topic config 'nope'"),
        (TopicSpec("c", 1, 0, {"retention.ms": "soon"}), InvalidConfig, "not an integer"),
        (TopicSpec("c", 1, 0, {"flush": "never"}), InvalidConfig, "must be one of"),
    ],
)
async def test_any_invalid_topic_rejects_the_whole_request(
    env: Env, spec: TopicSpec, error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        await env.create(TopicSpec("ok", 1), spec)
    assert reg(env).topics() == []
    assert not (env.data_dir / "topics" / "ok-1").exists()


@pytest.mark.timeout(20)
async def test_duplicates_and_existing_topics(env: Env) -> None:
    with pytest.raises(InvalidRequest, match="appears twice"):
        await env.create(TopicSpec("d", 1), TopicSpec("d", 2))
    await env.create(TopicSpec("d", 1))
    with pytest.raises(TopicExists, match="'d' already exists"):
        await env.create(TopicSpec("e", 1), TopicSpec("d", 1))
    assert [t.name for t in reg(env).topics()] == ["d"]
    with pytest.raises(InvalidRequest, match="names no topic"):
        await env.create()


@pytest.mark.timeout(20)
async def test_validate_only_creates_nothing(env: Env) -> None:
    assert await env.create(TopicSpec("v", 2), validate_only=True) == ["v"]
    assert reg(env).topics() == []
    r = await env.restart()
    assert r.topics() == []


@pytest.mark.timeout(20)
async def test_partition_lookup_errors_name_the_valid_range(env: Env) -> None:
    await env.create(TopicSpec("l", 3))
    topic, p = reg(env).partition("l", 2)
    assert topic.name == "l" and p.index == 2
    for bad in (3, -1):
        with pytest.raises(UnknownPartition, match=r"partitions are 0\.\.2"):
            reg(env).partition("l", bad)
    with pytest.raises(UnknownTopic, match="unknown topic 'm'"):
        reg(env).partition("m", 0)


@pytest.mark.timeout(20)
async def test_delete_removes_metadata_and_files(env: Env) -> None:
    await env.create(TopicSpec("x", 2), TopicSpec("y", 1))
    x_dir = env.topic_dir("x")
    logs = [env.logs[x_dir / str(i)] for i in range(2)]
    _, p = reg(env).partition("x", 0)
    with pytest.raises(UnknownTopic):
        await env.delete("x", "nope")
    assert [t.name for t in reg(env).topics()] == ["x", "y"]
    assert await env.delete("x", "x") == ["x"]
    assert all(lg.deleted for lg in logs)
    assert p.closed
    assert not x_dir.exists()
    r = await env.restart()
    assert [t.name for t in r.topics()] == ["y"]
    # The name is free again, with fresh partitions in a new directory.
    await env.create(TopicSpec("x", 1))
    assert env.topic_dir("x") != x_dir
    assert r.partition("x", 0)[1].high_watermark == 0


@pytest.mark.timeout(20)
async def test_orphan_directories_are_removed_at_start(env: Env) -> None:
    await env.create(TopicSpec("kept", 1))
    gone = env.data_dir / "topics" / "gone-1" / "0"
    gone.mkdir(parents=True)
    (gone / "00000000000000000000.log").write_bytes(b"x")
    future = env.data_dir / "topics" / "later-999999" / "0"
    future.mkdir(parents=True)
    stray = env.data_dir / "topics" / "no-id-here"
    stray.mkdir()
    await env.restart()
    assert not gone.parent.exists()
    assert future.exists()  # newer than the metadata this node applied: not touched
    assert stray.exists()
    assert (env.topic_dir("kept") / "0").exists()


@pytest.mark.timeout(20)
async def test_alter_validates_persists_and_applies(env: Env) -> None:
    await env.create(TopicSpec("a", 2, 0, {"retention.ms": "1000", "flush": "os"}))
    with pytest.raises(InvalidConfig, match="topic 'a': unknown topic config 'bogus'"):
        await env.alter("a", {"bogus": "1"}, [])
    with pytest.raises(InvalidConfig, match="unknown configs"):
        await env.alter("a", {}, ["bogus"])
    with pytest.raises(InvalidConfig, match="out of range"):
        await env.alter("a", {"segment.bytes": "1"}, [])
    with pytest.raises(InvalidRequest, match="both set and deleted"):
        await env.alter("a", {"flush": "os"}, ["flush"])
    with pytest.raises(UnknownTopic):
        await env.alter("b", {}, [])
    await env.alter("a", {"retention.bytes": "5000"}, ["flush"])
    topic = reg(env).topic("a")
    assert topic.overrides == {"retention.ms": "1000", "retention.bytes": "5000"}
    assert topic.config.flush == "durable"
    for i in range(2):
        lg = env.logs[env.topic_dir("a") / str(i)]
        assert lg.config.retention_bytes == 5000
    r = await env.restart()
    assert r.topic("a").overrides == {"retention.ms": "1000", "retention.bytes": "5000"}


@pytest.mark.timeout(20)
async def test_partition_stats_cover_every_partition(env: Env) -> None:
    await env.create(TopicSpec("s", 2))
    stats = sorted(reg(env).partition_stats(), key=lambda s: s.partition)
    assert [(s.topic, s.partition) for s in stats] == [("s", 0), ("s", 1)]
    assert all(s.raft_role == 3 and s.leader_id == 1 and s.raft_term >= 1 for s in stats)
    assert reg(env).leading() and all(term >= 1 for _, term in reg(env).leading())


@pytest.mark.timeout(20)
async def test_a_replica_whose_log_fails_to_open_is_not_served(env: Env) -> None:
    env.fail_dir = "2"
    await env.create(TopicSpec("full", 4))
    r = reg(env)
    assert sorted(r.topic("full").local) == [0, 1, 3]
    with pytest.raises(LeaderNotAvailable):
        r.partition("full", 2)


@pytest.mark.timeout(20)
async def test_a_replica_whose_log_failed_to_open_is_opened_again(env: Env) -> None:
    # An I/O error opening a log (an fsync failing during recovery or creation) does not
    # leave the replica closed until the controller's state changes: the node retries.
    env.fail_dir = "1"
    await env.create(TopicSpec("eio", 2))
    r = reg(env)
    assert sorted(r.topic("eio").local) == [0]
    await asyncio.sleep(1.5)  # the controller's state stays as it is meanwhile
    assert sorted(r.topic("eio").local) == [0]
    env.fail_dir = None
    async with asyncio.timeout(10):
        while sorted(r.topic("eio").local) != [0, 1] or not r.topic("eio").local[1].serving:
            await asyncio.sleep(0.05)
    assert r.partition("eio", 1)[1].serving
