"""Cluster-wide settings: replicated in the controller's state, changed at run time.

``tidelog cluster config set KEY=VALUE`` proposes a SetClusterConfig; every node applies it
at the same log position, so every node sees the same values. Two kinds of key:

- the cluster's own settings (``CLUSTER_SETTING_KEYS``): how long a dead node's replicas
  wait before they are rebuilt elsewhere, the copy rate of a catch-up, leader and replica
  balancing;
- any topic config key (``tidelog.config.TOPIC_CONFIG_KEYS``, e.g. ``retention.ms``): the
  cluster default of every topic that does not override it (a topic's own override wins).

A node's own settings (its id, addresses, data directory) stay in its start-up
configuration (node/settings.py). Values travel and are stored as strings, validated with
the same rules everywhere; ``cluster_setting`` parses one with its default applied.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from tidelog.config import TOPIC_CONFIG_KEYS, ConfigKey, _int_in, _one_of, validate_topic_configs
from tidelog.errors import InvalidConfig, excerpt
from tidelog.node.settings import RECOVERY_BYTES_PER_SECOND_DEFAULT

REPROVISION_MS = "replica.reprovision.ms"
RECOVERY_BYTES_PER_SECOND = "replica.recovery.bytes.per.second"
RECOVERY_LAG_BYTES = "replica.recovery.lag.bytes"
MOVES_CONCURRENT_MAX = "replica.moves.concurrent.max"
REPLICA_BALANCE_ENABLE = "replica.balance.enable"
LEADER_BALANCE_ENABLE = "leader.balance.enable"
LEADER_BALANCE_TRANSFERS_PER_SECOND = "leader.balance.transfers.per.second"
CONTROLLER_VOTERS = "controller.voters"

_I64 = 2**63 - 1

CLUSTER_SETTING_KEYS: dict[str, ConfigKey] = {
    k.name: k
    for k in (
        ConfigKey(
            REPROVISION_MS,
            "300000",
            _int_in(0, _I64),
            "A node dead this long has each of its replicas rebuilt on a live node "
            "(learner, catch up, promote, remove the dead one). A node back before it "
            "keeps its replicas.",
        ),
        ConfigKey(
            RECOVERY_BYTES_PER_SECOND,
            str(RECOVERY_BYTES_PER_SECOND_DEFAULT),
            _int_in(0, _I64),
            "Most bytes per second each node sends to the replicas catching up from it, "
            "streamed copies and APPENDs to replicas far behind together (0: no limit), so "
            "catch-up does not starve live traffic. Set, it applies to every node at once, "
            "copies in progress included; unset, each node uses its "
            f"--replica-recovery-bytes-per-second (default {RECOVERY_BYTES_PER_SECOND_DEFAULT}).",
        ),
        ConfigKey(
            RECOVERY_LAG_BYTES,
            str(64 * 1024 * 1024),
            _int_in(1024 * 1024, _I64),
            "A follower whose log lacks more than this many bytes of its leader's (a new "
            "replica, one back after a long absence) catches up at "
            "replica.recovery.bytes.per.second, and a learner is promoted only within it; "
            "one less behind replicates at full speed. At least 1 MiB (a learner under "
            "load is always a little behind).",
        ),
        ConfigKey(
            MOVES_CONCURRENT_MAX,
            "8",
            _int_in(1, 100_000),
            "Most replica moves (reassignments, drains, balancing) in progress at once; "
            "reprovisioning of dead nodes' replicas is not held back by it.",
        ),
        ConfigKey(
            REPLICA_BALANCE_ENABLE,
            "true",
            _one_of("true", "false"),
            "Move replicas onto nodes that hold fewer than their share (a new node) until "
            "replica counts are within one of each other.",
        ),
        ConfigKey(
            LEADER_BALANCE_ENABLE,
            "true",
            _one_of("true", "false"),
            "Move partition leadership so each live node leads about its share "
            "(at most its share plus one).",
        ),
        ConfigKey(
            LEADER_BALANCE_TRANSFERS_PER_SECOND,
            "10",
            _int_in(1, 100_000),
            "Most leadership transfers per second the leader balancer asks for.",
        ),
        ConfigKey(
            CONTROLLER_VOTERS,
            "0",
            _one_of("0", "1", "3", "5", "7"),
            "How many voters the controller group keeps (0: as many as it has, the odd "
            "count it was started with). A voter dead past replica.reprovision.ms or "
            "draining is replaced by a live node; force-recover sets it to refill the "
            "voters it gave up.",
        ),
    )
}

#: Every key a SetClusterConfig may name (which bounds what a state holds).
ALL_KEYS: frozenset[str] = frozenset(CLUSTER_SETTING_KEYS) | frozenset(TOPIC_CONFIG_KEYS)


@dataclass(frozen=True, slots=True)
class SettingInfo:
    """One key as ``cluster config list`` shows it."""

    key: str
    value: str
    default: str
    is_default: bool
    doc: str
    #: "cluster" (a cluster setting) or "topic default".
    kind: str


def _spec(key: str) -> ConfigKey:
    spec = CLUSTER_SETTING_KEYS.get(key) or TOPIC_CONFIG_KEYS.get(key)
    if spec is None:
        raise InvalidConfig(
            f"unknown cluster setting {excerpt(key)}; cluster settings: "
            f"{', '.join(sorted(CLUSTER_SETTING_KEYS))}, or any topic config key "
            f"({', '.join(sorted(TOPIC_CONFIG_KEYS))}) as the cluster default"
        )
    return spec


def validate_cluster_settings(values: Mapping[str, str]) -> dict[str, str]:
    """Check every key and value (InvalidConfig naming the first bad one); unchanged copy."""
    topic_keys = {}
    for key, raw in values.items():
        spec = _spec(key)
        if key in TOPIC_CONFIG_KEYS:
            topic_keys[key] = raw
        else:
            spec.parse(key, raw)
    validate_topic_configs(topic_keys)
    return dict(values)


def check_known(keys: list[str] | tuple[str, ...]) -> None:
    for key in keys:
        _spec(key)


def cluster_setting(values: Mapping[str, str], key: str) -> object:
    """The parsed value of ``key`` (the default when unset)."""
    spec = _spec(key)
    return spec.parse(key, values.get(key, spec.default))


def int_setting(values: Mapping[str, str], key: str) -> int:
    value = cluster_setting(values, key)
    assert isinstance(value, int)
    return value


def bool_setting(values: Mapping[str, str], key: str) -> bool:
    return cluster_setting(values, key) == "true"


def topic_defaults(values: Mapping[str, str]) -> dict[str, str]:
    """The topic config keys set at cluster level (defaults of every topic)."""
    return {k: v for k, v in sorted(values.items()) if k in TOPIC_CONFIG_KEYS}


def describe_settings(values: Mapping[str, str]) -> list[SettingInfo]:
    """Every key, cluster settings first, each with its value and whether it is the default."""
    out = []
    for kind, specs in (("cluster", CLUSTER_SETTING_KEYS), ("topic default", TOPIC_CONFIG_KEYS)):
        for key in sorted(specs):
            spec = specs[key]
            value = values.get(key, spec.default)
            out.append(SettingInfo(key, value, spec.default, key not in values, spec.doc, kind))
    return out
