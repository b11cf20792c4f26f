"""Topic configuration: the keys a topic accepts, their defaults, and their validation.

Names and meanings follow Kafka's topic configs where one exists, so a Kafka user finds what
they expect. docs/configuration.md is the reference a user reads; keep it in step.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from tidelog.errors import InvalidConfig, InvalidPartitions, InvalidTopic, excerpt

TOPIC_NAME_LENGTH_MAX = 249
PARTITIONS_MAX = 10_000
_TOPIC_NAME_RE = re.compile(r"^[a-zA-Z0-9._-]+$")
#: Plain ASCII decimal, an optional minus sign and nothing else: Python's int() would also take
#: "1_000_000", " 42 ", "+8192" and digits of other scripts, which no config file means.
_DECIMAL_RE = re.compile(r"-?[0-9]+")
#: Digits of the largest int64, so a longer value is out of range without parsing it (int()
#: refuses more than 4300 digits with an error that echoes them).
_INT_DIGITS_MAX = 19


def validate_topic_name(name: str) -> None:
    """Kafka's rules: 1-249 characters from [a-zA-Z0-9._-], and not "." or ".."."""
    if not name:
        raise InvalidTopic("topic name is empty")
    if len(name) > TOPIC_NAME_LENGTH_MAX:
        raise InvalidTopic(
            f"topic name is {len(name)} characters long; at most {TOPIC_NAME_LENGTH_MAX} allowed"
        )
    if name in (".", ".."):
        raise InvalidTopic(f"topic name {name!r} is not allowed")
    if not _TOPIC_NAME_RE.match(name):
        bad = sorted({c for c in name if not re.match(r"[a-zA-Z0-9._-]", c)})
        raise InvalidTopic(
            f"topic name {excerpt(name)} contains {excerpt(''.join(bad))}; "
            "only ASCII letters, digits, '.', '_' and '-' are allowed"
        )


def validate_partitions(count: int) -> None:
    if count < 1:
        raise InvalidPartitions(f"partitions must be at least 1, got {count}")
    if count > PARTITIONS_MAX:
        raise InvalidPartitions(f"partitions must be at most {PARTITIONS_MAX}, got {count}")


def _int_in(lo: int, hi: int) -> Callable[[str, str], int]:
    def parse(key: str, raw: str) -> int:
        if not _DECIMAL_RE.fullmatch(raw):
            raise InvalidConfig(
                f"{key}={excerpt(raw)} is not an integer (plain ASCII decimal digits with an "
                "optional leading '-', no spaces, '+' or '_')"
            )
        digits = len(raw) - raw.startswith("-")
        value = int(raw) if digits <= _INT_DIGITS_MAX else None
        if value is None or not lo <= value <= hi:
            raise InvalidConfig(f"{key}={excerpt(raw)} is out of range [{lo}, {hi}]")
        return value

    return parse


_RATIO_RE = re.compile(r"(0(\.[0-9]{1,6})?|1(\.0{1,6})?)")


def _ratio(key: str, raw: str) -> float:
    """A share from 0 to 1, written in plain decimal (``0.5``, ``1``, ``0.01``)."""
    if not _RATIO_RE.fullmatch(raw):
        raise InvalidConfig(
            f"{key}={excerpt(raw)} is not a ratio from 0 to 1 in plain decimal (such as 0.5)"
        )
    return float(raw)


def _one_of(*choices: str) -> Callable[[str, str], str]:
    def parse(key: str, raw: str) -> str:
        if raw not in choices:
            raise InvalidConfig(f"{key}={excerpt(raw)} must be one of {', '.join(choices)}")
        return raw

    return parse


@dataclass(frozen=True, slots=True)
class ConfigKey:
    name: str
    default: str
    parse: Callable[[str, str], object]
    doc: str


_I64 = 2**63 - 1
#: The values of ``cleanup.policy``, exactly (Kafka's spellings, one order).
CLEANUP_POLICIES = ("delete", "compact", "compact,delete")
TOPIC_CONFIG_KEYS: dict[str, ConfigKey] = {
    k.name: k
    for k in (
        ConfigKey(
            "segment.bytes",
            str(128 * 1024 * 1024),
            _int_in(4096, 2**31 - 1),
            "Roll to a new segment file when the active one reaches this size.",
        ),
        ConfigKey(
            "segment.ms",
            str(7 * 24 * 3600 * 1000),
            _int_in(1, _I64),
            "Roll to a new segment when the active one is older than this.",
        ),
        ConfigKey(
            "retention.ms",
            str(7 * 24 * 3600 * 1000),
            _int_in(-1, _I64),
            "Delete closed segments whose newest record is older than this; -1 keeps forever.",
        ),
        ConfigKey(
            "retention.bytes",
            "-1",
            _int_in(-1, _I64),
            "Delete the oldest closed segments while the partition is larger; -1: no limit.",
        ),
        ConfigKey(
            "max.message.bytes",
            str(8 * 1024 * 1024),
            _int_in(128, 64 * 1024 * 1024),
            "Largest record batch (after compression) the partition accepts.",
        ),
        ConfigKey(
            "flush",
            "durable",
            _one_of("durable", "os"),
            "durable: fsync (grouped) before acknowledging; os: leave it to the page cache.",
        ),
        ConfigKey(
            "cleanup.policy",
            "delete",
            _one_of(*CLEANUP_POLICIES),
            "delete: retention removes whole old segments; compact: the latest record per key "
            "is kept (a table of the topic's keys, every record needs a key, a null value "
            "deletes the key) and the log cleaner removes superseded records, no retention; "
            "compact,delete: both.",
        ),
        ConfigKey(
            "delete.retention.ms",
            str(24 * 3600 * 1000),
            _int_in(0, _I64),
            "Compacted topics: the cleaner removes a tombstone once its timestamp is this old.",
        ),
        ConfigKey(
            "min.cleanable.dirty.ratio",
            "0.5",
            _ratio,
            "Compacted topics: clean when the uncleaned share of the cleanable log reaches this.",
        ),
        ConfigKey(
            "min.compaction.lag.ms",
            "0",
            _int_in(0, _I64),
            "Compacted topics: records younger than this (by segment) are not cleaned.",
        ),
        ConfigKey(
            "message.timestamp.before.max.ms",
            str(_I64),
            _int_in(0, _I64),
            "Refuse a batch with a record timestamp more than this before the node's clock.",
        ),
        ConfigKey(
            "message.timestamp.after.max.ms",
            str(3600 * 1000),
            _int_in(0, _I64),
            "Refuse a batch with a record timestamp more than this after the node's clock.",
        ),
        ConfigKey(
            "index.interval.bytes",
            "4096",
            _int_in(0, 2**31 - 1),
            "Bytes of batches between two entries of the sparse offset and time indexes.",
        ),
        ConfigKey(
            "producer.id.expiration.ms",
            str(24 * 3600 * 1000),
            _int_in(1000, _I64),
            "Forget an idempotent producer's sequence state after this long without a batch.",
        ),
        ConfigKey(
            "message.dedup.window.ms",
            "0",
            _int_in(0, 7 * 24 * 3600 * 1000),
            "Store a record whose msg-id header was stored within this window only once; 0: off.",
        ),
        ConfigKey(
            "message.dedup.max.ids",
            "100000",
            _int_in(1, 10_000_000),
            "At most this many msg-ids per partition are remembered (oldest forgotten first).",
        ),
    )
}


def validate_topic_configs(configs: Mapping[str, str]) -> dict[str, str]:
    """Check every key and value; return the overrides unchanged (as strings)."""
    for key, raw in configs.items():
        spec = TOPIC_CONFIG_KEYS.get(key)
        if spec is None:
            raise InvalidConfig(
                f"unknown topic config {excerpt(key)}; known keys: "
                f"{', '.join(sorted(TOPIC_CONFIG_KEYS))}"
            )
        spec.parse(key, raw)
    return dict(configs)


@dataclass(frozen=True, slots=True)
class TopicConfig:
    """The effective, parsed configuration of one topic."""

    segment_bytes: int
    segment_ms: int
    retention_ms: int
    retention_bytes: int
    max_message_bytes: int
    flush: str
    cleanup_policy: str
    index_interval_bytes: int
    producer_id_expiration_ms: int = 24 * 3600 * 1000
    message_dedup_window_ms: int = 0
    message_dedup_max_ids: int = 100_000
    timestamp_before_max_ms: int = _I64
    timestamp_after_max_ms: int = 3600 * 1000
    delete_retention_ms: int = 24 * 3600 * 1000
    min_cleanable_dirty_ratio: float = 0.5
    min_compaction_lag_ms: int = 0

    @property
    def compacted(self) -> bool:
        """``cleanup.policy`` has ``compact``: records need keys and every replica keeps a
        table of the latest value per key (node/table.py)."""
        return "compact" in self.cleanup_policy.split(",")

    @property
    def retention_deletes(self) -> bool:
        """``cleanup.policy`` has ``delete``: retention.ms / retention.bytes apply."""
        return "delete" in self.cleanup_policy.split(",")

    @classmethod
    def from_overrides(cls, overrides: Mapping[str, str]) -> TopicConfig:
        merged = effective_configs(overrides)

        def geti(key: str) -> int:
            value = TOPIC_CONFIG_KEYS[key].parse(key, merged[key])
            assert isinstance(value, int)
            return value

        return cls(
            segment_bytes=geti("segment.bytes"),
            segment_ms=geti("segment.ms"),
            retention_ms=geti("retention.ms"),
            retention_bytes=geti("retention.bytes"),
            max_message_bytes=geti("max.message.bytes"),
            flush=merged["flush"],
            cleanup_policy=merged["cleanup.policy"],
            index_interval_bytes=geti("index.interval.bytes"),
            producer_id_expiration_ms=geti("producer.id.expiration.ms"),
            message_dedup_window_ms=geti("message.dedup.window.ms"),
            message_dedup_max_ids=geti("message.dedup.max.ids"),
            timestamp_before_max_ms=geti("message.timestamp.before.max.ms"),
            timestamp_after_max_ms=geti("message.timestamp.after.max.ms"),
            delete_retention_ms=geti("delete.retention.ms"),
            min_cleanable_dirty_ratio=float(merged["min.cleanable.dirty.ratio"]),
            min_compaction_lag_ms=geti("min.compaction.lag.ms"),
        )


def effective_configs(overrides: Mapping[str, str]) -> dict[str, str]:
    merged = {k: spec.default for k, spec in TOPIC_CONFIG_KEYS.items()}
    merged.update(overrides)
    return merged
