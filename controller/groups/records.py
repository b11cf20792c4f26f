"""The records of ``__consumer_offsets``: group state and committed offsets as keys and values.

Every state change of a group is one or more records of the group's partition; the table
(the compacted view) keeps the last value per key, and a tombstone (value None) deletes the
key. Each key holds one whole fact, so applying the surviving records in any order (a table
scan is in key order) gives the same state as replaying the log in order.

Key layout (byte strings, so all of one group's keys share a prefix and a table scan with
``group_prefix(g)`` finds them):

    b"G" + u16 len(group) + group + kind [+ rest]

    kind b"M"                       group metadata: group epoch, subscribed partition counts
    kind b"A"                       target assignment metadata: assignment epoch, assignor
    kind b"m" + member id           member metadata: instance id, subscription, timeouts
    kind b"t" + member id           the member's target partitions
    kind b"c" + member id           the member's current assignment: epoch, state, partitions
                                    it may own, partitions pending revocation
    kind b"o" + u16 len(topic) + topic + u32 partition
                                    a committed offset

Values are JSON objects with a version field ``v`` (1); partitions as ``{topic: [p, ...]}``.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from tidelog.controller.groups.assignors import TP

VERSION = 1

KIND_GROUP = b"M"
KIND_TARGET_EPOCH = b"A"
KIND_MEMBER = b"m"
KIND_TARGET = b"t"
KIND_CURRENT = b"c"
KIND_OFFSET = b"o"
_KINDS = {KIND_GROUP, KIND_TARGET_EPOCH, KIND_MEMBER, KIND_TARGET, KIND_CURRENT, KIND_OFFSET}

GROUP_ID_BYTES_MAX = 255
MEMBER_ID_BYTES_MAX = 255


@dataclass(frozen=True, slots=True)
class Record:
    """One record to write to the group's partition; ``value`` None is a tombstone."""

    key: bytes
    value: bytes | None


@dataclass(frozen=True, slots=True)
class ParsedKey:
    group_id: str
    kind: bytes
    #: The member id (kinds m, t, c), empty otherwise.
    member_id: str = ""
    #: The partition (kind o), None otherwise.
    tp: TP | None = None


def group_prefix(group_id: str) -> bytes:
    raw = group_id.encode()
    if not 0 < len(raw) <= GROUP_ID_BYTES_MAX:
        raise ValueError(f"group id of {len(raw)} bytes (1..{GROUP_ID_BYTES_MAX})")
    return b"G" + struct.pack(">H", len(raw)) + raw


def group_key(group_id: str) -> bytes:
    return group_prefix(group_id) + KIND_GROUP


def target_epoch_key(group_id: str) -> bytes:
    return group_prefix(group_id) + KIND_TARGET_EPOCH


def member_key(group_id: str, kind: bytes, member_id: str) -> bytes:
    assert kind in (KIND_MEMBER, KIND_TARGET, KIND_CURRENT)
    return group_prefix(group_id) + kind + member_id.encode()


def offset_key(group_id: str, topic: str, partition: int) -> bytes:
    raw = topic.encode()
    return (
        group_prefix(group_id)
        + KIND_OFFSET
        + struct.pack(">H", len(raw))
        + raw
        + struct.pack(">I", partition)
    )


def offsets_prefix(group_id: str) -> bytes:
    return group_prefix(group_id) + KIND_OFFSET


def parse_key(key: bytes) -> ParsedKey:
    """The parts of a record key; ValueError for a key this module did not write."""
    if len(key) < 4 or key[:1] != b"G":
        raise ValueError(f"not a group key: {key!r}")
    (length,) = struct.unpack_from(">H", key, 1)
    end = 3 + length
    if length == 0 or len(key) < end + 1:
        raise ValueError(f"truncated group key: {key!r}")
    group_id = key[3:end].decode()
    kind = key[end : end + 1]
    rest = key[end + 1 :]
    if kind not in _KINDS:
        raise ValueError(f"unknown kind {kind!r} in group key {key!r}")
    if kind in (KIND_GROUP, KIND_TARGET_EPOCH):
        if rest:
            raise ValueError(f"trailing bytes in group key {key!r}")
        return ParsedKey(group_id, kind)
    if kind == KIND_OFFSET:
        if len(rest) < 2:
            raise ValueError(f"truncated offset key {key!r}")
        (tlen,) = struct.unpack_from(">H", rest, 0)
        if len(rest) != 2 + tlen + 4:
            raise ValueError(f"malformed offset key {key!r}")
        topic = rest[2 : 2 + tlen].decode()
        (partition,) = struct.unpack_from(">I", rest, 2 + tlen)
        return ParsedKey(group_id, kind, tp=(topic, partition))
    if not rest:
        raise ValueError(f"member key without a member id: {key!r}")
    return ParsedKey(group_id, kind, member_id=rest.decode())


def encode_value(fields: Mapping[str, Any]) -> bytes:
    return json.dumps({"v": VERSION, **fields}, sort_keys=True, separators=(",", ":")).encode()


def decode_value(value: bytes) -> dict[str, Any]:
    obj = json.loads(value)
    if not isinstance(obj, dict) or obj.get("v") != VERSION:
        raise ValueError(f"unsupported group record value: {value[:80]!r}")
    return obj


def encode_tps(tps: Iterable[TP]) -> dict[str, list[int]]:
    by_topic: dict[str, list[int]] = {}
    for topic, partition in sorted(tps):
        by_topic.setdefault(topic, []).append(partition)
    return by_topic


def decode_tps(obj: Any) -> frozenset[TP]:
    if not isinstance(obj, dict):
        raise ValueError("partitions must be an object")
    out: set[TP] = set()
    for topic, partitions in obj.items():
        if not isinstance(topic, str) or not isinstance(partitions, list):
            raise ValueError("partitions must map topics to lists")
        for partition in partitions:
            if not isinstance(partition, int) or partition < 0:
                raise ValueError(f"bad partition {partition!r}")
            out.add((topic, partition))
    return frozenset(out)
