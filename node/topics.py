"""The topic registry of one node: which topics exist, their configs, and their partitions.

Topic metadata lives in the node's RocksDB (column family ``topics``, key ``topic/<name>``,
value JSON) and survives restarts; partition logs live at
``<data-dir>/topics/<topic>/<partition>/``. The order of writes makes a crash at any point
harmless: a topic's metadata is synced before its directories are created (a restart
creates missing ones), and removed before its files are (a restart deletes directories no
topic owns).

Later the controller's replicated metadata log replaces this store as the source of truth;
the partition objects and the request paths that use them stay.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tidelog.config import (
    TOPIC_CONFIG_KEYS,
    TopicConfig,
    effective_configs,
    validate_partitions,
    validate_topic_configs,
    validate_topic_name,
)
from tidelog.errors import (
    InvalidConfig,
    InvalidPartitions,
    InvalidReplicationFactor,
    InvalidRequest,
    StorageError,
    TidelogError,
    TopicExists,
    UnknownPartition,
    UnknownTopic,
)
from tidelog.node import limits
from tidelog.node.metastore import MetaStore
from tidelog.node.metrics import NodeMetrics, PartitionStats, TopicMetrics
from tidelog.node.multiraft import MultiRaft
from tidelog.node.partition import LogLike, Partition
from tidelog.node.raft.limits import Config
from tidelog.node.raft.types import ConfState

log = logging.getLogger(__name__)

TOPICS_COLUMN = "topics"
_KEY_PREFIX = b"topic/"
_TOPICS_DIR = "topics"
# Until the controller exists there is one node, so one replica is all there can be.
DEFAULT_REPLICATION_FACTOR = 1

#: Opens (creating if needed) the log of one partition; injected so tests can use fakes.
LogOpener = Callable[[Path, TopicConfig], LogLike]


@dataclass(frozen=True, slots=True)
class NewTopic:
    """One topic of a CreateTopics request, independent of protobuf."""

    name: str
    partitions: int
    replication_factor: int = 0
    configs: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class TopicMeta:
    """What is persisted per topic."""

    name: str
    partitions: int
    replication_factor: int
    overrides: dict[str, str]
    topic_id: str
    created_ms: int

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "name": self.name,
                "partitions": self.partitions,
                "replication_factor": self.replication_factor,
                "overrides": self.overrides,
                "topic_id": self.topic_id,
                "created_ms": self.created_ms,
            },
            sort_keys=True,
        ).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> TopicMeta:
        d: dict[str, Any] = json.loads(raw)
        return cls(
            name=str(d["name"]),
            partitions=int(d["partitions"]),
            replication_factor=int(d["replication_factor"]),
            overrides={str(k): str(v) for k, v in d["overrides"].items()},
            topic_id=str(d["topic_id"]),
            created_ms=int(d["created_ms"]),
        )


class Topic:
    __slots__ = ("config", "meta", "metrics", "partitions")

    def __init__(self, meta: TopicMeta, partitions: list[Partition], metrics: TopicMetrics) -> None:
        self.meta = meta
        self.config = TopicConfig.from_overrides(meta.overrides)
        self.partitions = partitions
        self.metrics = metrics

    @property
    def name(self) -> str:
        return self.meta.name

    def effective_configs(self) -> dict[str, str]:
        return effective_configs(self.meta.overrides)


def _group_base(topic_id: str) -> int:
    """Stable Raft group ids for a topic's partitions, from its random id."""
    return (int(topic_id[:10], 16) + 1) << 20


def _key(name: str) -> bytes:
    return _KEY_PREFIX + name.encode()


def _in_topic(name: str, err: TidelogError) -> TidelogError:
    """The same error, its message prefixed with the topic it is about."""
    return type(err)(f"topic {name!r}: {err.message}", **err.metadata)


class TopicRegistry:
    def __init__(
        self,
        store: MetaStore,
        data_dir: Path,
        metrics: NodeMetrics,
        raft: MultiRaft,
        open_log: LogOpener,
        clock_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000,
    ) -> None:
        self._store = store
        self._dir = data_dir / _TOPICS_DIR
        self._metrics = metrics
        self._raft = raft
        # Partitions keep their offsets dense: a leader of a committed log appends nothing.
        self._raft_config = raft.timing.config(Config(always_append_empty=False))
        self._open_log = open_log
        self._clock_ms = clock_ms
        self._topics: dict[str, Topic] = {}
        # Create, delete and alter run one at a time: each validates against the state it
        # then changes, across awaits.
        self._admin_lock = asyncio.Lock()
        self._partition_count = 0

    # -- lookups (hot path) --------------------------------------------------------------

    def topic(self, name: str) -> Topic:
        topic = self._topics.get(name)
        if topic is None:
            raise UnknownTopic(f"unknown topic {name!r}: create it first (tidelog topic create)")
        return topic

    def partition(self, name: str, index: int) -> tuple[Topic, Partition]:
        topic = self._topics.get(name)
        if topic is None:
            raise UnknownTopic(f"unknown topic {name!r}: create it first (tidelog topic create)")
        partitions = topic.partitions
        if not 0 <= index < len(partitions):
            raise UnknownPartition(
                f"topic {name!r} has no partition {index}; its partitions are "
                f"0..{len(partitions) - 1}"
            )
        return topic, partitions[index]

    def topics(self) -> list[Topic]:
        return sorted(self._topics.values(), key=lambda t: t.name)

    def partitions(self) -> list[Partition]:
        return [p for t in list(self._topics.values()) for p in t.partitions]

    def partition_stats(self) -> list[PartitionStats]:
        """Runs on the metrics HTTP thread: reads plain attributes only, and skips a
        partition that is being deleted under it rather than failing the whole scrape."""
        out = []
        for topic in list(self._topics.values()):
            for p in topic.partitions:
                lg = p.log
                try:
                    lags = p.follower_lags()
                    out.append(
                        PartitionStats(
                            p.topic,
                            p.index,
                            lg.size_bytes,
                            lg.log_start_offset,
                            lg.log_end_offset,
                            p.high_watermark,
                            lg.segment_count,
                            raft_term=p.term,
                            raft_role=int(p.role),
                            leader_id=p.leader_id,
                            follower_lags=tuple(lags),
                            under_replicated=bool(lags) and len(p.in_sync()) < len(p.replicas),
                            elections_started=p.elections_started,
                            elections_won=p.elections_won,
                        )
                    )
                except Exception:
                    continue
        return out

    # -- startup and shutdown ------------------------------------------------------------

    async def load(self) -> None:
        """Open every known topic's partitions (recovering their logs) and delete directories
        of topics that no longer exist (a delete interrupted by a crash)."""
        metas = [TopicMeta.from_json(v) for _, v in self._store.items(TOPICS_COLUMN, _KEY_PREFIX)]
        self._dir.mkdir(parents=True, exist_ok=True)
        known = {m.name for m in metas}
        for child in sorted(self._dir.iterdir()):
            if child.name not in known:
                log.warning("removing %s: no topic of that name exists (deleted)", child)
                await asyncio.to_thread(shutil.rmtree, child, True)
        for meta in metas:
            self._topics[meta.name] = await self._open_topic(meta)
            log.info("loaded topic %s (%d partitions)", meta.name, meta.partitions)

    async def _open_topic(self, meta: TopicMeta) -> Topic:
        config = TopicConfig.from_overrides(meta.overrides)
        topic_dir = self._dir / meta.name

        def open_all() -> list[LogLike]:
            logs: list[LogLike] = []
            try:
                for i in range(meta.partitions):
                    logs.append(self._open_log(topic_dir / str(i), config))
            except BaseException:
                for lg in logs:
                    lg.close()
                raise
            return logs

        logs = await asyncio.to_thread(open_all)
        node_id = self._raft.node_id
        group_base = _group_base(meta.topic_id)
        partitions = []
        for i, lg in enumerate(logs):
            p = Partition(meta.name, i, lg, config, group_id=group_base + i, replicas=[node_id])
            group = self._raft.add_group(
                p.group_id,
                lg,
                ConfState(voters=frozenset({node_id})),
                p,
                durable=config.flush != "os",
                config=self._raft_config,
            )
            p.attach(group, self._raft)
            # The only voter: it wins at once, so the partition takes writes right away.
            self._raft.campaign(group)
            partitions.append(p)
        self._partition_count += len(partitions)
        return Topic(meta, partitions, self._metrics.topic(meta.name))

    async def close(self) -> None:
        """Close every log (after the committer's last round: see Node.stop)."""
        for topic in list(self._topics.values()):
            for p in topic.partitions:
                p.close_for_shutdown()
                await self._raft.remove_group(p.group_id, forget=False)
        logs = [p.log for t in self._topics.values() for p in t.partitions]
        self._topics.clear()

        def close_all() -> None:
            for lg in logs:
                try:
                    lg.close()
                except Exception:
                    log.exception("closing a partition log failed")

        await asyncio.to_thread(close_all)

    # -- admin ---------------------------------------------------------------------------

    def check_create(self, specs: Sequence[NewTopic]) -> list[TopicMeta]:
        """Validate a whole CreateTopics request; nothing is created unless all of it is
        valid. Returns the metadata that would be stored."""
        if not specs:
            raise InvalidRequest("CreateTopics names no topic")
        if len(specs) > limits.topics_per_request_max:
            raise InvalidRequest(
                f"CreateTopics names {len(specs)} topics, at most "
                f"{limits.topics_per_request_max} per request"
            )
        seen: set[str] = set()
        metas = []
        new_partitions = 0
        now = self._clock_ms()
        for spec in specs:
            validate_topic_name(spec.name)
            if spec.name in seen:
                raise InvalidRequest(
                    f"topic {spec.name!r} appears twice in one CreateTopics request"
                )
            seen.add(spec.name)
            if spec.name in self._topics:
                raise TopicExists(f"topic {spec.name!r} already exists")
            try:
                validate_partitions(spec.partitions)
                rf = spec.replication_factor or DEFAULT_REPLICATION_FACTOR
                if rf < 1:
                    raise InvalidReplicationFactor(
                        f"replication factor must be at least 1, got {spec.replication_factor}"
                    )
                if rf > 1:
                    raise InvalidReplicationFactor(
                        f"replication factor {rf} is larger than the cluster: only 1 node in "
                        "the cluster"
                    )
                overrides = validate_topic_configs(spec.configs)
            except TidelogError as err:
                raise _in_topic(spec.name, err) from None
            new_partitions += spec.partitions
            metas.append(
                TopicMeta(spec.name, spec.partitions, rf, dict(overrides), uuid.uuid4().hex, now)
            )
        total = self._partition_count + new_partitions
        if total > limits.partitions_per_node_max:
            raise InvalidPartitions(
                f"creating {new_partitions} partitions would bring this node to {total}, more "
                f"than its limit of {limits.partitions_per_node_max}"
            )
        return metas

    async def create(self, specs: Sequence[NewTopic], *, validate_only: bool = False) -> list[str]:
        async with self._admin_lock:
            metas = self.check_create(specs)
            if validate_only:
                return [m.name for m in metas]
            for meta in metas:
                self._store.put(TOPICS_COLUMN, _key(meta.name), meta.to_json())
                try:
                    self._topics[meta.name] = await self._open_topic(meta)
                except Exception as exc:
                    # Leave no topic behind that exists on disk but not in memory.
                    self._store.delete(TOPICS_COLUMN, _key(meta.name))
                    await asyncio.to_thread(shutil.rmtree, self._dir / meta.name, True)
                    log.exception("creating topic %s failed", meta.name)
                    raise StorageError(f"cannot create topic {meta.name!r}: {exc}") from exc
                log.info(
                    "created topic %s: %d partitions, overrides %s",
                    meta.name, meta.partitions, meta.overrides or "none",
                )  # fmt: skip
            return [m.name for m in metas]

    async def delete(self, names: Sequence[str]) -> list[str]:
        if not names:
            raise InvalidRequest("DeleteTopics names no topic")
        async with self._admin_lock:
            unique = list(dict.fromkeys(names))
            for name in unique:
                self.topic(name)  # every name must exist before anything is deleted
            for name in unique:
                await self._delete_one(self._topics[name])
            return unique

    async def _delete_one(self, topic: Topic) -> None:
        name = topic.name
        self._store.delete(TOPICS_COLUMN, _key(name))
        del self._topics[name]
        self._partition_count -= len(topic.partitions)
        for p in topic.partitions:
            p.close_for_delete()
            await self._raft.remove_group(p.group_id, forget=True)
        logs = [p.log for p in topic.partitions]
        topic_dir = self._dir / name

        def remove() -> None:
            for lg in logs:
                try:
                    lg.delete()
                except Exception:
                    log.exception("deleting a partition log of %s failed", name)
            shutil.rmtree(topic_dir, ignore_errors=True)

        await asyncio.to_thread(remove)
        self._metrics.forget_topic(name)
        log.info("deleted topic %s", name)

    async def alter(self, name: str, set_: Mapping[str, str], delete: Iterable[str]) -> Topic:
        delete = list(delete)
        async with self._admin_lock:
            topic = self.topic(name)
            both = sorted(set(set_) & set(delete))
            if both:
                raise InvalidRequest(
                    f"topic {name!r}: {', '.join(both)} both set and deleted in one request"
                )
            try:
                validate_topic_configs(set_)
                for key in delete:
                    if key not in TOPIC_CONFIG_KEYS:
                        raise InvalidConfig(
                            f"unknown topic config {key!r}; known keys: "
                            f"{', '.join(sorted(TOPIC_CONFIG_KEYS))}"
                        )
            except TidelogError as err:
                raise _in_topic(name, err) from None
            overrides = {k: v for k, v in topic.meta.overrides.items() if k not in delete}
            overrides.update(set_)
            config = TopicConfig.from_overrides(overrides)
            meta = TopicMeta(
                topic.meta.name, topic.meta.partitions, topic.meta.replication_factor,
                overrides, topic.meta.topic_id, topic.meta.created_ms,
            )  # fmt: skip
            self._store.put(TOPICS_COLUMN, _key(name), meta.to_json())
            topic.meta = meta
            topic.config = config
            for p in topic.partitions:
                if not p.closed:
                    p.update_config(config)
            log.info("altered topic %s: overrides now %s", name, overrides or "none")
            return topic
