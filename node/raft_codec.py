"""Raft messages <-> the ``RaftBatch`` protobuf of proto/tidelog/v1/raft.proto.

Pure functions, no I/O, so the wire format is tested without sockets (and the transport only
moves bytes). A batch holds the messages of many groups for one peer; plain heartbeats (only
term, commit and context set) are pulled out into packed columns, so the thousands of idle
groups a node shares with a peer cost a few bytes each per tick instead of one protobuf
message each (Redpanda's heartbeat_manager). Everything else, and any heartbeat carrying
more, travels as a ``GroupMessage``: decoding gives back exactly the messages encoded.

Decoding an idle group's heartbeat every tick would build the same immutable ``Message``
again and again; a :class:`HeartbeatCache` per peer hands back the previous object when
nothing changed, the way the Raft core reuses its own outgoing heartbeats.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

from tidelog.node.raft.types import (
    ConfChange,
    ConfState,
    Entry,
    EntryKind,
    Message,
    MessageKind,
    Snapshot,
    SnapshotMeta,
)
from tidelog.records import decode_records as _decode_records
from tidelog.records import encode_batch as _encode_record_batch
from tidelog.records import read_header
from tidelog.v1 import raft_pb2

#: Bytes a message costs on the wire beyond its payloads (group, kind, ids, term, indexes,
#: framing), an upper estimate used to bound outboxes and batch sizes without encoding.
MESSAGE_OVERHEAD_BYTES: Final = 48
#: Heartbeat columns are kept per peer up to this many groups; beyond it the cache is
#: cleared (a node with more groups than this only loses the reuse, not correctness).
heartbeat_cache_groups_max: Final = 200_000
#: Bounds every decoded value is checked against (a foreign or hostile sender must not plant
#: a value the node cannot store or report). Node ids are int32 on the wire and start at 1.
#: Group ids, terms and indexes are uint64 on the wire but int64 everywhere else (Metadata's
#: leader_term, the stamps of stored batches, RocksDB keys): at most 2^63 - 1.
NODE_ID_MAX: Final = 2**31 - 1
UINT63_MAX: Final = 2**63 - 1

_HEARTBEAT: Final = MessageKind.HEARTBEAT
_HEARTBEAT_RESP: Final = MessageKind.HEARTBEAT_RESP
# Wire value -> kind. Dicts rather than tuples: an unknown (even negative) value must fail.
_MESSAGE_KIND_BY_WIRE: Final = {k.value + 1: k for k in MessageKind}
_ENTRY_KIND_BY_WIRE: Final = {k.value: k for k in EntryKind}

# The wire enums mirror the Python ones (messages shifted by one so 0 means "unset").
for _k in MessageKind:
    assert raft_pb2.RaftMessageKind.Value(f"RAFT_MESSAGE_KIND_{_k.name}") == _k.value + 1
for _e in EntryKind:
    assert raft_pb2.RaftEntryKind.Value(f"RAFT_ENTRY_KIND_{_e.name}") == _e.value
assert len(raft_pb2.RaftMessageKind.keys()) == len(MessageKind) + 1
assert len(raft_pb2.RaftEntryKind.keys()) == len(EntryKind)


class CodecError(ValueError):
    """A batch that does not decode into valid Raft messages (a bug or a foreign sender)."""


#: The key of the one record of a membership-change control batch (a partition's CONFIG
#: entry); its value is the ``ConfChange`` (``raft.types.ConfChange.encode``).
CONF_CHANGE_KEY: Final = b"tidelog-conf-change"


def conf_change_batch(cc: ConfChange) -> bytes:
    """The stored form of a partition's CONFIG entry (before stamping): a control batch of
    one record, timestamp 0, no producer, so every replica holds the same bytes; consumers
    never see it (control batches are skipped) and it takes one offset."""
    return _encode_record_batch(
        [cc.encode()], keys=[CONF_CHANGE_KEY], timestamps_ms=0, control=True
    )


def is_conf_change_batch(data: bytes) -> bool:
    """Whether a stored control batch is a membership change (cheap for everything else)."""
    try:
        h = read_header(data)
    except Exception:
        return False
    if not h.is_control or h.producer_id >= 0 or h.record_count != 1:
        return False
    try:
        recs = _decode_records(data, verify_crc=False)
    except Exception:
        return False
    return len(recs) == 1 and recs[0].key == CONF_CHANGE_KEY


def decode_conf_change_batch(data: bytes) -> ConfChange:
    """Strict: the change of a membership-change control batch, CodecError for anything
    else (a wrong CRC, another control batch, more records, a change that does not decode).
    The partitions' ``conf_decoder`` and the wire's check of CONFIG entries."""
    try:
        h = read_header(data)
        if not h.is_control or h.producer_id >= 0 or h.record_count != 1:
            raise CodecError("a CONFIG entry that is not a membership-change control batch")
        if h.size != len(data):
            raise CodecError(f"a CONFIG entry of {len(data)} bytes holds a batch of {h.size}")
        recs = _decode_records(data, verify_crc=True)
        if len(recs) != 1 or recs[0].key != CONF_CHANGE_KEY or recs[0].value is None:
            raise CodecError("a CONFIG entry whose batch is not one membership change")
        return ConfChange.decode(recs[0].value)
    except CodecError:
        raise
    except Exception as exc:
        raise CodecError(f"a CONFIG entry that does not decode: {exc}") from None


def wire_size_estimate(msg: Message) -> int:
    """About how many bytes ``msg`` adds to a batch: payloads plus a fixed overhead.

    Cheap on purpose (no encoding): it bounds outboxes and splits batches, so it only needs
    to be proportional to the real size and never far below it."""
    size = MESSAGE_OVERHEAD_BYTES + len(msg.context)
    if msg.entries:
        size += msg.size_bytes
    snap = msg.snapshot
    if snap is not None:
        size += len(snap.data) + MESSAGE_OVERHEAD_BYTES + 8 * len(snap.meta.conf.members)
    return size


def _is_plain_heartbeat(m: Message, from_node: int, to_node: int) -> bool:
    """Whether the columns can carry ``m`` without losing a field."""
    return (
        m.log_term == 0
        and m.index == 0
        and not m.entries
        and not m.reject
        and m.reject_hint == 0
        and m.reject_hint_term == 0
        and m.snapshot is None
        and m.frm == from_node
        and m.to == to_node
        and (m.kind is _HEARTBEAT or m.commit == 0)
    )


def _encode_conf(conf: ConfState, out: raft_pb2.RaftConfState) -> None:
    # Sorted so equal configurations encode to equal bytes.
    out.voters.extend(sorted(conf.voters))
    out.learners.extend(sorted(conf.learners))
    out.voters_outgoing.extend(sorted(conf.voters_outgoing))


def _encode_message(group: int, m: Message, out: raft_pb2.GroupMessage) -> None:
    out.group = group
    out.kind = m.kind + 1  # type: ignore[assignment]
    out.from_node = m.frm
    out.to_node = m.to
    out.term = m.term
    if m.log_term:
        out.log_term = m.log_term
    if m.index:
        out.index = m.index
    if m.entries:
        add = out.entries.add
        for e in m.entries:
            # One copy of the payload into the protobuf; serialization makes the next.
            add(term=e.term, index=e.index, kind=e.kind, data=e.data)  # type: ignore[arg-type]
    if m.commit:
        out.commit = m.commit
    if m.reject:
        out.reject = True
    if m.reject_hint:
        out.reject_hint = m.reject_hint
    if m.reject_hint_term:
        out.reject_hint_term = m.reject_hint_term
    if m.context:
        out.context = m.context
    snap = m.snapshot
    if snap is not None:
        s = out.snapshot
        s.SetInParent()  # present even when every field is a default
        s.meta.index = snap.meta.index
        s.meta.term = snap.meta.term
        _encode_conf(snap.meta.conf, s.meta.conf)
        s.data = snap.data


def _fill_columns(
    out: raft_pb2.HeartbeatColumns,
    groups: list[int],
    terms: list[int],
    commits: list[int],
    contexts: list[bytes],
) -> None:
    out.groups.extend(groups)
    out.terms.extend(terms)
    if any(commits):
        out.commits.extend(commits)
    if any(contexts):
        out.contexts.extend(contexts)


def encode_batch(
    from_node: int, to_node: int, cluster_id: str, items: Iterable[tuple[int, Message]]
) -> raft_pb2.RaftBatch:
    """One ``RaftBatch`` for every ``(group, message)`` in ``items``, in their order (plain
    heartbeats go to the columns, keeping their relative order there)."""
    batch = raft_pb2.RaftBatch(from_node=from_node, to_node=to_node, cluster_id=cluster_id)
    rq_groups: list[int] = []
    rq_terms: list[int] = []
    rq_commits: list[int] = []
    rq_contexts: list[bytes] = []
    rs_groups: list[int] = []
    rs_terms: list[int] = []
    rs_contexts: list[bytes] = []
    add = batch.messages.add
    for group, m in items:
        kind = m.kind
        if kind is _HEARTBEAT and _is_plain_heartbeat(m, from_node, to_node):
            rq_groups.append(group)
            rq_terms.append(m.term)
            rq_commits.append(m.commit)
            rq_contexts.append(m.context)
        elif kind is _HEARTBEAT_RESP and _is_plain_heartbeat(m, from_node, to_node):
            rs_groups.append(group)
            rs_terms.append(m.term)
            rs_contexts.append(m.context)
        else:
            _encode_message(group, m, add())
    if rq_groups:
        _fill_columns(batch.heartbeats.requests, rq_groups, rq_terms, rq_commits, rq_contexts)
    if rs_groups:
        _fill_columns(batch.heartbeats.responses, rs_groups, rs_terms, [], rs_contexts)
    return batch


def _check_nodes(what: str, ids: Iterable[int]) -> None:
    for node in ids:
        if not 1 <= node <= NODE_ID_MAX:
            raise CodecError(f"{what}: node id {node} is out of range [1, {NODE_ID_MAX}]")


def _check_u63(group: int, what: str, value: int) -> None:
    if value > UINT63_MAX:
        raise CodecError(f"group {group}: {what} {value} exceeds {UINT63_MAX}")


def _decode_conf(c: raft_pb2.RaftConfState) -> ConfState:
    _check_nodes("snapshot membership", c.voters)
    _check_nodes("snapshot membership", c.learners)
    _check_nodes("snapshot membership", c.voters_outgoing)
    try:
        return ConfState(frozenset(c.voters), frozenset(c.learners), frozenset(c.voters_outgoing))
    except AssertionError as exc:
        raise CodecError(f"invalid membership in a snapshot: {exc}") from None


def _decode_message(gm: raft_pb2.GroupMessage, frm: int, to: int) -> Message:
    group = gm.group
    if group > UINT63_MAX:
        raise CodecError(f"group id {group} exceeds {UINT63_MAX}")
    kind = _MESSAGE_KIND_BY_WIRE.get(gm.kind)
    if kind is None:
        raise CodecError(f"group {group}: unknown message kind {int(gm.kind)}")
    if gm.from_node != frm or gm.to_node != to:
        raise CodecError(
            f"group {group}: a {kind.name} from node {gm.from_node} to node {gm.to_node} in a "
            f"batch from node {frm} to node {to}"
        )
    if (
        gm.term > UINT63_MAX
        or gm.log_term > UINT63_MAX
        or gm.index > UINT63_MAX
        or gm.commit > UINT63_MAX
        or gm.reject_hint > UINT63_MAX
        or gm.reject_hint_term > UINT63_MAX
    ):
        for what in ("term", "log_term", "index", "commit", "reject_hint", "reject_hint_term"):
            _check_u63(group, what, getattr(gm, what))
    entries: tuple[Entry, ...] = ()
    if gm.entries:
        kinds = _ENTRY_KIND_BY_WIRE
        try:
            entries = tuple(Entry(e.term, e.index, e.data, kinds[e.kind]) for e in gm.entries)
        except KeyError as exc:
            raise CodecError(f"group {group}: unknown entry kind {exc.args[0]}") from None
        for e in entries:
            _check_u63(group, "entry term", e.term)
            _check_u63(group, "entry index", e.index)
            if e.kind is EntryKind.CONFIG:
                try:
                    decode_conf_change_batch(e.data)
                except CodecError as exc:
                    raise CodecError(f"group {group}, entry {e.index}: {exc}") from None
    snapshot: Snapshot | None = None
    if gm.HasField("snapshot"):
        s = gm.snapshot
        _check_u63(group, "snapshot index", s.meta.index)
        _check_u63(group, "snapshot term", s.meta.term)
        meta = SnapshotMeta(s.meta.index, s.meta.term, _decode_conf(s.meta.conf))
        snapshot = Snapshot(meta, s.data)
    return Message(
        kind,
        gm.from_node,
        gm.to_node,
        gm.term,
        gm.log_term,
        gm.index,
        entries,
        gm.commit,
        gm.reject,
        gm.reject_hint,
        gm.reject_hint_term,
        gm.context,
        snapshot,
    )


class HeartbeatCache:
    """The last plain heartbeat (and response) decoded per group from one peer, so an idle
    group's unchanged heartbeat decodes to the same object without building it again."""

    __slots__ = ("requests", "responses")

    def __init__(self) -> None:
        self.requests: dict[int, Message] = {}
        self.responses: dict[int, Message] = {}

    def __len__(self) -> int:
        return len(self.requests) + len(self.responses)


def _decode_columns(
    cols: raft_pb2.HeartbeatColumns,
    kind: MessageKind,
    frm: int,
    to: int,
    cache: dict[int, Message] | None,
    out: list[tuple[int, Message]],
) -> None:
    groups = cols.groups
    n = len(groups)
    if len(cols.terms) != n:
        raise CodecError(f"heartbeat columns: {n} groups but {len(cols.terms)} terms")
    if n:
        for name, column in (("group id", groups), ("term", cols.terms), ("commit", cols.commits)):
            if column and max(column) > UINT63_MAX:
                raise CodecError(f"heartbeat columns: a {name} exceeds {UINT63_MAX}")
    if kind is _HEARTBEAT_RESP and cols.commits:
        raise CodecError("heartbeat responses carry no commit")
    commits: Iterable[int] = cols.commits if cols.commits else (0,) * n
    if len(cols.commits) not in (0, n):
        raise CodecError(f"heartbeat columns: {n} groups but {len(cols.commits)} commits")
    if len(cols.contexts) not in (0, n):
        raise CodecError(f"heartbeat columns: {n} groups but {len(cols.contexts)} contexts")
    if cols.contexts:
        for group, term, commit, ctx in zip(
            groups, cols.terms, commits, cols.contexts, strict=True
        ):
            out.append((group, Message(kind, frm, to, term, commit=commit, context=ctx)))
        return
    if cache is None:
        for group, term, commit in zip(groups, cols.terms, commits, strict=True):
            out.append((group, Message(kind, frm, to, term, commit=commit)))
        return
    if len(cache) > heartbeat_cache_groups_max:
        cache.clear()
    get = cache.get
    for group, term, commit in zip(groups, cols.terms, commits, strict=True):
        m = get(group)
        if m is None or m.term != term or m.commit != commit or m.frm != frm or m.to != to:
            m = cache[group] = Message(kind, frm, to, term, commit=commit)
        out.append((group, m))


def decode_batch(
    batch: raft_pb2.RaftBatch, cache: HeartbeatCache | None = None
) -> list[tuple[int, Message]]:
    """Every ``(group, message)`` of ``batch``: the full messages in their order, then the
    heartbeats (expanded back into messages from ``from_node`` to ``to_node``), then the
    heartbeat responses. Raises :class:`CodecError` on a malformed batch: a node id out of
    ``[1, NODE_ID_MAX]``, a message naming another sender or addressee than the batch, a
    group id, term or index above ``UINT63_MAX``, an unknown kind. One bad message refuses
    the whole batch (nothing of it is delivered)."""
    frm, to = batch.from_node, batch.to_node
    _check_nodes("batch sender", (frm,))
    _check_nodes("batch addressee", (to,))
    out = [(gm.group, _decode_message(gm, frm, to)) for gm in batch.messages]
    if batch.HasField("heartbeats"):
        hb = batch.heartbeats
        if hb.HasField("requests"):
            requests = cache.requests if cache is not None else None
            _decode_columns(hb.requests, _HEARTBEAT, frm, to, requests, out)
        if hb.HasField("responses"):
            responses = cache.responses if cache is not None else None
            _decode_columns(hb.responses, _HEARTBEAT_RESP, frm, to, responses, out)
    return out


__all__ = [
    "CONF_CHANGE_KEY",
    "MESSAGE_OVERHEAD_BYTES",
    "NODE_ID_MAX",
    "UINT63_MAX",
    "CodecError",
    "HeartbeatCache",
    "conf_change_batch",
    "decode_batch",
    "decode_conf_change_batch",
    "encode_batch",
    "heartbeat_cache_groups_max",
    "is_conf_change_batch",
    "wire_size_estimate",
]
