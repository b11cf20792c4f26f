"""Topic registry: validation of whole requests, persistence across restarts, delete, alter."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.unit.node_fakes import InstrumentedLog
from tidelog.config import TopicConfig
from tidelog.errors import (
    InvalidConfig,
    InvalidPartitions,
    InvalidReplicationFactor,
    InvalidRequest,
    InvalidTopic,
    StorageError,
    TopicExists,
    UnknownPartition,
    UnknownTopic,
)
from tidelog.node.metastore import MetaStore
from tidelog.node.metrics import NodeMetrics
from tidelog.node.multiraft import MultiRaft
from tidelog.node.partition import LogLike
from tidelog.node.raft_storage import HardStateStore
from tidelog.node.topics import NewTopic, TopicMeta, TopicRegistry


class Env:
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.logs: dict[Path, InstrumentedLog] = {}
        self.store: MetaStore | None = None
        self.registry: TopicRegistry | None = None
        self.raft: MultiRaft | None = None

    def open_log(self, directory: Path, config: TopicConfig) -> LogLike:
        lg = InstrumentedLog(directory, config)
        self.logs[directory] = lg
        return lg

    async def start(self) -> TopicRegistry:
        self.store = MetaStore(self.data_dir / "meta")
        metrics = NodeMetrics()
        self.raft = MultiRaft(1, HardStateStore(self.store), metrics)
        self.registry = TopicRegistry(
            self.store, self.data_dir, metrics, self.raft, self.open_log, lambda: 1234
        )
        await self.registry.load()
        self.raft.start()
        return self.registry

    async def stop(self) -> None:
        assert self.registry and self.raft and self.store
        await self.raft.stop()
        await self.registry.close()
        self.store.close()

    async def restart(self) -> TopicRegistry:
        await self.stop()
        return await self.start()


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    e = Env(tmp_path)
    await e.start()
    yield e
    await e.stop()


def reg(env: Env) -> TopicRegistry:
    assert env.registry is not None
    return env.registry


@pytest.mark.timeout(10)
async def test_create_persists_across_restart(env: Env) -> None:
    r = reg(env)
    assert await r.create([NewTopic("a", 3, 0, {"retention.ms": "1000"}), NewTopic("b", 1)]) == [
        "a",
        "b",
    ]
    assert (env.data_dir / "topics" / "a" / "2").is_dir()
    r = await env.restart()
    assert [t.name for t in r.topics()] == ["a", "b"]
    a = r.topic("a")
    assert a.meta.partitions == 3 and a.meta.replication_factor == 1
    assert a.meta.overrides == {"retention.ms": "1000"}
    assert a.config.retention_ms == 1000
    assert a.effective_configs()["retention.ms"] == "1000"
    assert a.effective_configs()["flush"] == "durable"


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    ("spec", "error", "match"),
    [
        (NewTopic("bad name", 1), InvalidTopic, "contains ' '"),
        (NewTopic("x" * 250, 1), InvalidTopic, "at most 249"),
        (NewTopic("", 1), InvalidTopic, "empty"),
        (NewTopic("..", 1), InvalidTopic, "not allowed"),
        (NewTopic("p", 0), InvalidPartitions, "topic 'p': partitions must be at least 1"),
        (NewTopic("r", 1, 3), InvalidReplicationFactor, "only 1 node in the cluster"),
        (NewTopic("r", 1, -1), InvalidReplicationFactor, "at least 1"),
        (NewTopic("c", 1, 0, {"nope": "1"}), InvalidConfig, "unknown topic config 'nope'"),
        (NewTopic("c", 1, 0, {"retention.ms": "soon"}), InvalidConfig, "not an integer"),
        (NewTopic("c", 1, 0, {"flush": "never"}), InvalidConfig, "must be one of"),
    ],
)
async def test_any_invalid_topic_rejects_the_whole_request(
    env: Env, spec: NewTopic, error: type[Exception], match: str
) -> None:
    r = reg(env)
    with pytest.raises(error, match=match):
        await r.create([NewTopic("ok", 1), spec])
    assert r.topics() == []
    assert not (env.data_dir / "topics" / "ok").exists()


@pytest.mark.timeout(10)
async def test_duplicates_and_existing_topics(env: Env) -> None:
    r = reg(env)
    with pytest.raises(InvalidRequest, match="appears twice"):
        await r.create([NewTopic("d", 1), NewTopic("d", 2)])
    await r.create([NewTopic("d", 1)])
    with pytest.raises(TopicExists, match="'d' already exists"):
        await r.create([NewTopic("e", 1), NewTopic("d", 1)])
    assert [t.name for t in r.topics()] == ["d"]
    with pytest.raises(InvalidRequest, match="names no topic"):
        await r.create([])


@pytest.mark.timeout(10)
async def test_validate_only_creates_nothing(env: Env) -> None:
    r = reg(env)
    assert await r.create([NewTopic("v", 2)], validate_only=True) == ["v"]
    assert r.topics() == []
    r = await env.restart()
    assert r.topics() == []


@pytest.mark.timeout(10)
async def test_partition_lookup_errors_name_the_valid_range(env: Env) -> None:
    r = reg(env)
    await r.create([NewTopic("l", 3)])
    topic, p = r.partition("l", 2)
    assert topic.name == "l" and p.index == 2
    for bad in (3, -1):
        with pytest.raises(UnknownPartition, match=r"partitions are 0\.\.2"):
            r.partition("l", bad)
    with pytest.raises(UnknownTopic, match="unknown topic 'm'"):
        r.partition("m", 0)


@pytest.mark.timeout(10)
async def test_delete_removes_metadata_and_files(env: Env) -> None:
    r = reg(env)
    await r.create([NewTopic("x", 2), NewTopic("y", 1)])
    logs = [env.logs[env.data_dir / "topics" / "x" / str(i)] for i in range(2)]
    _, p = r.partition("x", 0)
    with pytest.raises(UnknownTopic):
        await r.delete(["x", "nope"])
    assert [t.name for t in r.topics()] == ["x", "y"]
    assert await r.delete(["x", "x"]) == ["x"]
    assert all(lg.deleted for lg in logs)
    assert p.closed
    assert not (env.data_dir / "topics" / "x").exists()
    r = await env.restart()
    assert [t.name for t in r.topics()] == ["y"]
    # The name is free again, with fresh partitions.
    await r.create([NewTopic("x", 1)])
    assert r.partition("x", 0)[1].high_watermark == 0


@pytest.mark.timeout(10)
async def test_orphan_directories_are_removed_at_load(env: Env) -> None:
    orphan = env.data_dir / "topics" / "gone" / "0"
    orphan.mkdir(parents=True)
    (orphan / "00000000000000000000.log").write_bytes(b"x")
    await env.restart()
    assert not orphan.parent.exists()


@pytest.mark.timeout(10)
async def test_alter_validates_persists_and_applies(env: Env) -> None:
    r = reg(env)
    await r.create([NewTopic("a", 2, 0, {"retention.ms": "1000", "flush": "os"})])
    with pytest.raises(InvalidConfig, match="topic 'a': unknown topic config 'bogus'"):
        await r.alter("a", {"bogus": "1"}, [])
    with pytest.raises(InvalidConfig, match="unknown topic config 'bogus'"):
        await r.alter("a", {}, ["bogus"])
    with pytest.raises(InvalidConfig, match="out of range"):
        await r.alter("a", {"segment.bytes": "1"}, [])
    with pytest.raises(InvalidRequest, match="both set and deleted"):
        await r.alter("a", {"flush": "os"}, ["flush"])
    with pytest.raises(UnknownTopic):
        await r.alter("b", {}, [])
    topic = await r.alter("a", {"retention.bytes": "5000"}, ["flush"])
    assert topic.meta.overrides == {"retention.ms": "1000", "retention.bytes": "5000"}
    assert topic.config.flush == "durable"
    for i in range(2):
        lg = env.logs[env.data_dir / "topics" / "a" / str(i)]
        assert lg.config is not None and lg.config.retention_bytes == 5000
    r = await env.restart()
    assert r.topic("a").meta.overrides == {"retention.ms": "1000", "retention.bytes": "5000"}


@pytest.mark.timeout(10)
async def test_topic_meta_json_round_trip() -> None:
    meta = TopicMeta("n", 4, 1, {"flush": "os"}, "id", 99)
    assert TopicMeta.from_json(meta.to_json()) == meta


@pytest.mark.timeout(10)
async def test_partition_stats_cover_every_partition(env: Env) -> None:
    r = reg(env)
    await r.create([NewTopic("s", 2)])
    stats = r.partition_stats()
    assert [(s.topic, s.partition) for s in stats] == [("s", 0), ("s", 1)]


@pytest.mark.timeout(10)
async def test_failed_create_leaves_nothing_behind(env: Env) -> None:
    r = reg(env)
    opened: list[InstrumentedLog] = []

    def flaky(directory: Path, config: TopicConfig) -> LogLike:
        if directory.name == "2":
            raise OSError(28, "No space left on device")
        lg = InstrumentedLog(directory, config)
        opened.append(lg)
        return lg

    r._open_log = flaky
    with pytest.raises(StorageError, match="No space left"):
        await r.create([NewTopic("full", 4)])
    assert all(lg.closed for lg in opened) and len(opened) == 2
    assert r.topics() == []
    assert not (env.data_dir / "topics" / "full").exists()
    r = await env.restart()
    assert r.topics() == []
