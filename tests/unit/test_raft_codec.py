"""Raft messages <-> RaftBatch: exact round trips of every message kind, heartbeat coalescing
into packed columns, the per-peer heartbeat cache, and malformed batches refused.

Round trips go through the serialized bytes (``SerializeToString`` / ``FromString``), as on
the wire, not just through the protobuf objects.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tidelog.node.raft.types import (
    ConfChange,
    ConfChangeKind,
    ConfState,
    Entry,
    EntryKind,
    Message,
    MessageKind,
    Snapshot,
    SnapshotMeta,
)
from tidelog.node.raft_codec import (
    CodecError,
    HeartbeatCache,
    conf_change_batch,
    decode_batch,
    encode_batch,
    heartbeat_cache_groups_max,
    wire_size_estimate,
)
from tidelog.records import encode_batch as encode_record_batch
from tidelog.v1 import raft_pb2

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

FROM, TO, CLUSTER = 1, 2, "c-1"
Items = list[tuple[int, Message]]

# Group ids, terms and indexes travel as uint64 but must fit int64 (UINT63_MAX).
group_id = st.integers(min_value=0, max_value=2**63 - 1)
index = st.integers(min_value=0, max_value=2**63 - 1)
small_bytes = st.binary(max_size=64)


@st.composite
def conf_states(draw: st.DrawFn) -> ConfState:
    ids = st.integers(min_value=1, max_value=50)
    voters = draw(st.frozensets(ids, max_size=5))
    learners = draw(st.frozensets(ids, max_size=3)) - voters
    outgoing = draw(st.frozensets(ids, max_size=5)) - learners
    return ConfState(voters, learners, outgoing)


snapshots = st.builds(
    Snapshot,
    meta=st.builds(SnapshotMeta, index=index, term=index, conf=conf_states()),
    data=st.binary(max_size=256),
)


@st.composite
def conf_batches(draw: st.DrawFn) -> bytes:
    """A CONFIG entry's payload: the wire refuses any other (strict decoding)."""
    ids = st.integers(min_value=1, max_value=50)
    voters = draw(st.frozensets(ids, min_size=1, max_size=5))
    learners = draw(st.frozensets(ids, max_size=3)) - voters
    kind = draw(st.sampled_from(ConfChangeKind))
    return conf_change_batch(ConfChange(kind, draw(ids), voters, learners))


entries = st.one_of(
    st.builds(
        Entry,
        term=index,
        index=index,
        data=small_bytes,
        kind=st.sampled_from([k for k in EntryKind if k != EntryKind.CONFIG]),
    ),
    st.builds(Entry, term=index, index=index, data=conf_batches(), kind=st.just(EntryKind.CONFIG)),
)


ANY_KIND = st.sampled_from(MessageKind)
CONF_BATCH = conf_change_batch(
    ConfChange(ConfChangeKind.ADD_LEARNER, 4, frozenset({1, 2, 3}), frozenset({4}))
)


def messages(kind: st.SearchStrategy[MessageKind] = ANY_KIND) -> st.SearchStrategy[Message]:
    """Any message: every field drawn, including the ones a kind does not use, since the
    codec must not lose what a future core might put there."""
    return st.builds(
        Message,
        kind=kind,
        # A message names the batch's sender and addressee (anything else is refused).
        frm=st.just(FROM),
        to=st.just(TO),
        term=index,
        log_term=index,
        index=index,
        entries=st.lists(entries, max_size=4).map(tuple),
        commit=index,
        reject=st.booleans(),
        reject_hint=index,
        reject_hint_term=index,
        context=small_bytes,
        snapshot=st.none() | snapshots,
    )


@st.composite
def plain_heartbeats(draw: st.DrawFn) -> Message:
    """What the core sends an idle group's peer: only term, commit (requests) and context."""
    kind = draw(st.sampled_from([MessageKind.HEARTBEAT, MessageKind.HEARTBEAT_RESP]))
    commit = draw(index) if kind is MessageKind.HEARTBEAT else 0
    context = draw(st.just(b"") | small_bytes)
    return Message(kind, FROM, TO, draw(index), commit=commit, context=context)


def round_trip(items: Items, cache: HeartbeatCache | None = None) -> Items:
    wire = encode_batch(FROM, TO, CLUSTER, items).SerializeToString()
    batch = raft_pb2.RaftBatch.FromString(wire)
    assert (batch.from_node, batch.to_node, batch.cluster_id) == (FROM, TO, CLUSTER)
    return decode_batch(batch, cache)


def expected_order(items: Items) -> Items:
    """The documented order: full messages, then heartbeats, then heartbeat responses,
    each in the order sent. The test decides "plain" on its own, field by field."""

    def plain(m: Message, kind: MessageKind) -> bool:
        bare = Message(kind, FROM, TO, m.term, commit=m.commit, context=m.context)
        return m == bare and (kind is MessageKind.HEARTBEAT or m.commit == 0)

    hb = [(g, m) for g, m in items if m.kind is MessageKind.HEARTBEAT and plain(m, m.kind)]
    rs = [(g, m) for g, m in items if m.kind is MessageKind.HEARTBEAT_RESP and plain(m, m.kind)]
    coalesced = {id(m) for _, m in hb + rs}
    full = [(g, m) for g, m in items if id(m) not in coalesced]
    return full + hb + rs


@SETTINGS
@given(st.lists(st.tuples(group_id, messages() | plain_heartbeats()), max_size=20))
def test_round_trip_any_mix(items: Items) -> None:
    assert round_trip(items) == expected_order(items)


@pytest.mark.parametrize("kind", list(MessageKind), ids=lambda k: k.name)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_round_trip_every_kind(kind: MessageKind, data: st.DataObject) -> None:
    group = data.draw(group_id)
    msg = data.draw(messages(st.just(kind)))
    assert round_trip([(group, msg)]) == expected_order([(group, msg)])


@pytest.mark.parametrize("kind", list(MessageKind), ids=lambda k: k.name)
def test_each_kind_as_the_core_sends_it(kind: MessageKind) -> None:
    """A realistic message of each kind, including the empty-looking ones whose fields are
    all defaults (the presence of an empty snapshot must survive)."""
    conf = ConfState(frozenset({1, 2, 3}), frozenset({4}))
    ents = (
        Entry(3, 11, b"batch"),
        Entry(3, 12, b"", EntryKind.EMPTY),
        Entry(3, 13, CONF_BATCH, EntryKind.CONFIG),
    )
    by_kind = {
        MessageKind.PRE_VOTE: Message(kind, FROM, TO, 4, log_term=3, index=12),
        MessageKind.PRE_VOTE_RESP: Message(kind, FROM, TO, 4, reject=True),
        MessageKind.VOTE: Message(kind, FROM, TO, 4, log_term=3, index=12),
        MessageKind.VOTE_RESP: Message(kind, FROM, TO, 4),
        MessageKind.APPEND: Message(
            kind, FROM, TO, 3, log_term=3, index=10, entries=ents, commit=9
        ),
        MessageKind.APPEND_RESP: Message(
            kind, FROM, TO, 3, index=7, reject=True, reject_hint=7, reject_hint_term=2
        ),
        MessageKind.HEARTBEAT: Message(kind, FROM, TO, 3, commit=9, context=b"read-1"),
        MessageKind.HEARTBEAT_RESP: Message(kind, FROM, TO, 3),
        MessageKind.TIMEOUT_NOW: Message(kind, FROM, TO, 3),
        MessageKind.SNAPSHOT: Message(
            kind, FROM, TO, 3, snapshot=Snapshot(SnapshotMeta(40, 3, conf), b"image")
        ),
        MessageKind.SNAPSHOT_RESP: Message(kind, FROM, TO, 3, reject=True),
        MessageKind.READ_INDEX: Message(kind, FROM, TO, 3, context=b"r"),
        MessageKind.READ_INDEX_RESP: Message(kind, FROM, TO, 3, index=12, context=b"r"),
        MessageKind.TRANSFER_LEADER: Message(kind, FROM, TO, 3, index=3),
    }
    assert set(by_kind) == set(MessageKind)
    msg = by_kind[kind]
    assert round_trip([(7, msg)]) == [(7, msg)]
    empty_snapshot = Message(MessageKind.SNAPSHOT, FROM, TO, 0, snapshot=Snapshot())
    assert round_trip([(0, empty_snapshot)]) == [(0, empty_snapshot)]


def test_thousand_idle_groups_make_one_batch_of_packed_columns() -> None:
    requests = [
        (g, Message(MessageKind.HEARTBEAT, FROM, TO, 5 + g % 3, commit=100 + g))
        for g in range(1000)
    ]
    responses = [(g, Message(MessageKind.HEARTBEAT_RESP, FROM, TO, 5)) for g in range(1000, 2000)]
    batch = encode_batch(FROM, TO, CLUSTER, requests + responses)
    assert len(batch.messages) == 0
    req, resp = batch.heartbeats.requests, batch.heartbeats.responses
    assert list(req.groups) == list(range(1000))
    assert list(req.terms) == [5 + g % 3 for g in range(1000)]
    assert list(req.commits) == [100 + g for g in range(1000)]
    assert len(req.contexts) == 0, "no context column when every context is empty"
    assert len(resp.groups) == len(resp.terms) == 1000
    assert len(resp.commits) == 0 and len(resp.contexts) == 0
    wire = batch.SerializeToString()
    # Packed varints: group (2 bytes) + term (1) + commit (2) per request, 3 per response,
    # against ~10 bytes of framing per message for a repeated GroupMessage.
    assert len(wire) < 2000 * 6, len(wire)
    decoded = decode_batch(raft_pb2.RaftBatch.FromString(wire))
    assert decoded == requests + responses
    assert len(decoded) == 2000


def test_context_column_only_when_a_context_is_set() -> None:
    items = [
        (1, Message(MessageKind.HEARTBEAT, FROM, TO, 2, commit=3)),
        (2, Message(MessageKind.HEARTBEAT, FROM, TO, 2, commit=3, context=b"read")),
    ]
    batch = encode_batch(FROM, TO, CLUSTER, items)
    assert list(batch.heartbeats.requests.contexts) == [b"", b"read"]
    assert decode_batch(batch) == items


def test_heartbeats_that_carry_more_travel_as_messages() -> None:
    """A heartbeat with a field the columns cannot hold, or not between the batch's two
    nodes, is sent whole rather than losing that field; the receiver refuses a batch with a
    message that is not between the batch's two nodes (a message names its batch's nodes)."""
    odd = [
        (1, Message(MessageKind.HEARTBEAT, FROM, TO, 2, index=5)),
        (2, Message(MessageKind.HEARTBEAT_RESP, FROM, TO, 2, commit=4)),
    ]
    foreign = [
        (3, Message(MessageKind.HEARTBEAT, 9, TO, 2)),
        (4, Message(MessageKind.HEARTBEAT_RESP, FROM, 9, 2, reject=True)),
    ]
    batch = encode_batch(FROM, TO, CLUSTER, odd + foreign)
    assert len(batch.messages) == 4 and not batch.HasField("heartbeats")
    with pytest.raises(CodecError, match="in a batch from node"):
        decode_batch(batch)
    batch = encode_batch(FROM, TO, CLUSTER, odd)
    assert len(batch.messages) == 2 and not batch.HasField("heartbeats")
    assert decode_batch(batch) == odd


def test_large_entries_keep_their_bytes() -> None:
    payload = bytes(range(256)) * 4096  # 1 MiB
    ents = tuple(Entry(2, 100 + i, payload) for i in range(3))
    msg = Message(MessageKind.APPEND, FROM, TO, 2, log_term=2, index=99, entries=ents, commit=99)
    assert wire_size_estimate(msg) >= 3 * len(payload)
    [(group, back)] = round_trip([(5, msg)])
    assert group == 5 and back == msg


def test_cache_reuses_unchanged_heartbeats() -> None:
    cache = HeartbeatCache()
    items: Items = [(g, Message(MessageKind.HEARTBEAT, FROM, TO, 3, commit=7)) for g in range(50)]
    items += [(g, Message(MessageKind.HEARTBEAT_RESP, FROM, TO, 3)) for g in range(50)]
    first = round_trip(items, cache)
    second = round_trip(items, cache)
    assert first == second == items
    assert all(a is b for (_, a), (_, b) in zip(first, second, strict=True))
    moved = [(0, Message(MessageKind.HEARTBEAT, FROM, TO, 3, commit=8))]
    [(_, m)] = round_trip(moved, cache)
    assert m.commit == 8 and m is not first[0][1]
    assert len(cache) == 100


def test_cache_is_bounded() -> None:
    cache = HeartbeatCache()
    for g in range(heartbeat_cache_groups_max + 1):
        cache.requests[g] = Message(MessageKind.HEARTBEAT, FROM, TO, 1)
    round_trip([(1, Message(MessageKind.HEARTBEAT, FROM, TO, 1))], cache)
    assert len(cache.requests) == 1


def _batch_with(gm: raft_pb2.GroupMessage | None = None) -> raft_pb2.RaftBatch:
    batch = raft_pb2.RaftBatch(from_node=FROM, to_node=TO, cluster_id=CLUSTER)
    if gm is not None:
        batch.messages.append(gm)
    return batch


@pytest.mark.parametrize(
    "gm",
    [
        raft_pb2.GroupMessage(group=1, from_node=FROM, to_node=TO, term=1),  # kind unset
        raft_pb2.GroupMessage(group=1, kind=99, term=1),  # type: ignore[arg-type]
        raft_pb2.GroupMessage(
            group=1, kind=raft_pb2.RAFT_MESSAGE_KIND_APPEND,
            entries=[raft_pb2.RaftEntry(term=1, index=1, kind=7)],  # type: ignore[arg-type]
        ),
        raft_pb2.GroupMessage(
            group=1, kind=raft_pb2.RAFT_MESSAGE_KIND_APPEND,
            entries=[raft_pb2.RaftEntry(term=1, index=1, kind=-1)],  # type: ignore[arg-type]
        ),
        raft_pb2.GroupMessage(
            group=1,
            kind=raft_pb2.RAFT_MESSAGE_KIND_SNAPSHOT,
            snapshot=raft_pb2.RaftSnapshot(
                meta=raft_pb2.RaftSnapshotMeta(conf=raft_pb2.RaftConfState(voters=[1], learners=[1]))
            ),
        ),
    ],
    ids=["kind-unset", "kind-unknown", "entry-kind-unknown", "entry-kind-negative", "bad-conf"],
)  # fmt: skip
def test_malformed_messages_are_refused(gm: raft_pb2.GroupMessage) -> None:
    with pytest.raises(CodecError):
        decode_batch(_batch_with(gm))


@pytest.mark.parametrize(
    ("groups", "terms", "commits", "contexts", "responses"),
    [
        ([1, 2], [1], [], [], False),
        ([1, 2], [1, 1], [5], [], False),
        ([1, 2], [1, 1], [], [b"x"], False),
        ([1], [1], [3], [], True),
    ],
    ids=["terms-short", "commits-short", "contexts-short", "response-with-commit"],
)
def test_malformed_columns_are_refused(
    groups: Sequence[int],
    terms: Sequence[int],
    commits: Sequence[int],
    contexts: Sequence[bytes],
    responses: bool,
) -> None:
    batch = _batch_with()
    cols = batch.heartbeats.responses if responses else batch.heartbeats.requests
    cols.groups.extend(groups)
    cols.terms.extend(terms)
    cols.commits.extend(commits)
    cols.contexts.extend(contexts)
    with pytest.raises(CodecError):
        decode_batch(batch)


# ---- values a hostile sender may put on the wire (issue 9) ---------------------------------

U63 = 2**63 - 1


def _append(**fields: object) -> raft_pb2.GroupMessage:
    base: dict[str, object] = {
        "group": 7,
        "kind": raft_pb2.RAFT_MESSAGE_KIND_APPEND,
        "from_node": FROM,
        "to_node": TO,
        "term": 3,
    }
    base.update(fields)
    return raft_pb2.GroupMessage(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "gm",
    [
        _append(from_node=-1),
        _append(from_node=99),
        _append(to_node=3),
        _append(group=U63 + 1),
        _append(term=2**64 - 1),
        _append(term=U63 + 1),
        _append(log_term=U63 + 1),
        _append(index=U63 + 1),
        _append(commit=U63 + 1),
        _append(reject_hint=U63 + 1),
        _append(reject_hint_term=U63 + 1),
        _append(entries=[raft_pb2.RaftEntry(term=U63 + 1, index=1)]),
        _append(entries=[raft_pb2.RaftEntry(term=1, index=U63 + 1)]),
        _append(
            kind=raft_pb2.RAFT_MESSAGE_KIND_SNAPSHOT,
            snapshot=raft_pb2.RaftSnapshot(meta=raft_pb2.RaftSnapshotMeta(term=U63 + 1)),
        ),
        _append(
            kind=raft_pb2.RAFT_MESSAGE_KIND_SNAPSHOT,
            snapshot=raft_pb2.RaftSnapshot(meta=raft_pb2.RaftSnapshotMeta(index=U63 + 1)),
        ),
        _append(
            kind=raft_pb2.RAFT_MESSAGE_KIND_SNAPSHOT,
            snapshot=raft_pb2.RaftSnapshot(
                meta=raft_pb2.RaftSnapshotMeta(conf=raft_pb2.RaftConfState(voters=[1, -4]))
            ),
        ),
    ],
    ids=[
        "negative-sender", "other-sender", "other-addressee", "group-2^63", "term-2^64-1",
        "term-2^63", "log-term", "index", "commit", "reject-hint", "reject-hint-term",
        "entry-term", "entry-index", "snapshot-term", "snapshot-index", "snapshot-negative-voter",
    ],
)  # fmt: skip
def test_out_of_range_values_refuse_the_whole_batch(gm: raft_pb2.GroupMessage) -> None:
    batch = _batch_with(_append())  # a valid message first: nothing of the batch survives
    batch.messages.append(gm)
    with pytest.raises(CodecError):
        decode_batch(batch)


def test_the_largest_valid_values_decode() -> None:
    gm = _append(group=U63, term=U63, log_term=U63, index=U63, commit=U63)
    [(group, msg)] = decode_batch(_batch_with(gm))
    assert group == U63 and msg.term == U63 and msg.commit == U63
    assert (msg.frm, msg.to) == (FROM, TO)


@pytest.mark.parametrize(("frm", "to"), [(-7, TO), (0, TO), (FROM, -1), (FROM, 0)])
def test_batch_node_ids_must_be_positive(frm: int, to: int) -> None:
    batch = raft_pb2.RaftBatch(from_node=frm, to_node=to, cluster_id=CLUSTER)
    batch.heartbeats.requests.groups.append(1)
    batch.heartbeats.requests.terms.append(1)
    with pytest.raises(CodecError, match="node id"):
        decode_batch(batch)


@pytest.mark.parametrize("column", ["groups", "terms", "commits"])
def test_heartbeat_columns_out_of_range_are_refused(column: str) -> None:
    batch = _batch_with()
    cols = batch.heartbeats.requests
    cols.groups.extend([1, 2])
    cols.terms.extend([1, 1])
    cols.commits.extend([0, 0])
    getattr(cols, column)[1] = 2**64 - 1
    with pytest.raises(CodecError, match="exceeds"):
        decode_batch(batch)


def test_a_config_entry_that_is_not_one_membership_change_is_refused() -> None:
    good = conf_change_batch(ConfChange(ConfChangeKind.PROMOTE, 4, frozenset({1, 4}), frozenset()))
    corrupt = bytearray(good)
    corrupt[-3] ^= 0xFF  # inside the CRC-covered records
    other = encode_record_batch([b"x"], keys=[b"k"], timestamps_ms=0, control=True)
    for data in (b"", b"garbage", bytes(corrupt), other, good + b"\0"):
        msg = Message(
            MessageKind.APPEND, FROM, TO, 1, entries=(Entry(1, 1, data, EntryKind.CONFIG),)
        )
        raw = encode_batch(FROM, TO, CLUSTER, [(7, msg)]).SerializeToString()
        with pytest.raises(CodecError, match="CONFIG entry"):
            decode_batch(raft_pb2.RaftBatch.FromString(raw))
    ok = Message(MessageKind.APPEND, FROM, TO, 1, entries=(Entry(1, 1, good, EntryKind.CONFIG),))
    raw = encode_batch(FROM, TO, CLUSTER, [(7, ok)]).SerializeToString()
    assert decode_batch(raft_pb2.RaftBatch.FromString(raw)) == [(7, ok)]
