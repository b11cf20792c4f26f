"""Idempotence of one partition replica: the producer state and the msg-id window, derived from
the committed log, and the leader's admission of a produce request against them.

The pure parts live in ``producer_state.py`` and ``msgid_window.py``; this module connects
them to a partition:

* :meth:`PartitionIdempotence.admit` (leader, before proposing) decides for each batch of a
  request: propose it, answer it as a duplicate (with the original offsets), or refuse the
  whole request (OUT_OF_ORDER_SEQUENCE, PRODUCER_FENCED, UNKNOWN_PRODUCER_ID, or a batch that
  mixes new and already-stored msg-ids). It is synchronous and the caller proposes right after
  it without awaiting, so on the node's one event loop check and propose are atomic: two
  requests of one producer cannot interleave between them.
* :meth:`proposed` records each proposed batch as in flight (leader only), so a pipelined
  retry of a batch proposed a moment ago is a duplicate too; the caller waits for the
  original's commit before answering it.
* :meth:`apply_committed` runs on every replica for every committed entry, in log order.
* :meth:`recover` replays the committed log after the snapshot's applied offset at start.

A batch whose every record's msg-id is already stored is not appended. If it carries a
producer id whose sequence the partition would accept, its sequence range must still be
consumed on every replica (the producer's next batch follows it), so the leader proposes in
its place a *control* batch with the same producer id, epoch, base sequence and record count
and no data: consumers never see control batches, it takes as many offsets as records (gaps,
as Kafka's control records), and its records carry a ``tidelog-dup-of`` header naming the
original offset.
"""

from __future__ import annotations

import logging
import struct
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from tidelog.config import TopicConfig
from tidelog.errors import InvalidRequest, OutOfOrderSequence, ProducerFenced, UnknownProducerId
from tidelog.node.msgid_window import MSG_ID_HEADER, MessageIdWindow, digest
from tidelog.node.producer_state import (
    BatchMeta,
    Check,
    CorruptProducerSnapshot,
    LeaderView,
    Pending,
    ProducerEntry,
    ProducerState,
    Verdict,
    check_entry,
    last_sequence,
)
from tidelog.records import BatchHeader, decode_records, encode_batch, iter_headers, unpack_header

#: Header of the records of a control batch that stands for a msg-id duplicate.
DUP_OF_HEADER = "tidelog-dup-of"
#: How much of the log one replay read takes.
_REPLAY_READ_BYTES = 4 * 1024 * 1024
_SNAP = struct.Struct("<II")
#: The snapshot of an empty msg-id window (header and "[]").
_EMPTY_IDS_BYTES = len(MessageIdWindow(1).snapshot())

log = logging.getLogger(__name__)


class ReadableLog(Protocol):
    @property
    def log_start_offset(self) -> int: ...
    @property
    def log_end_offset(self) -> int: ...
    def read(self, offset: int, max_bytes: int, *, upto: int | None = None) -> bytes: ...


@dataclass(slots=True)
class BatchPlan:
    """What the leader does with one batch of a request."""

    pos: int
    header: BatchHeader
    #: Set: answer with these original offsets, append nothing (unless ``replacement``).
    duplicate_of: tuple[int, int] | None = None
    #: A duplicate of a batch in flight: wait for that entry (raft index, term) to commit.
    wait_for: tuple[int, int] | None = None
    #: Propose these bytes instead of the batch (a control batch for a msg-id duplicate).
    replacement: bytes | None = None
    #: Digests of the records' msg-ids (None for records without one), when the window is on.
    msg_keys: list[bytes | None] | None = None

    @property
    def proposes(self) -> bool:
        return self.duplicate_of is None or self.replacement is not None


@dataclass(frozen=True, slots=True)
class Trimmed:
    """A bounded snapshot and what did not fit in it."""

    data: bytes
    producers_left_out: int
    msg_ids_left_out: int


@dataclass(slots=True)
class Counters:
    """Totals since start, read by the metrics."""

    duplicates: int = 0
    msg_id_duplicates: int = 0
    out_of_order: int = 0
    fenced: int = 0
    unknown_producer: int = 0
    expired: int = 0


@dataclass(slots=True)
class _PendingIds:
    """The msg-ids a proposed entry carries (leader only)."""

    raft_index: int
    term: int
    keys: list[tuple[bytes, int]] = field(default_factory=list)


class PartitionIdempotence:
    __slots__ = (
        "_ids_by_index",
        "_pending_ids",
        "applied_index",
        "config",
        "counters",
        "msg_ids",
        "state",
        "view",
        "where",
    )

    def __init__(self, where: str, config: TopicConfig) -> None:
        self.where = where
        self.config = config
        self.state = ProducerState()
        self.view = LeaderView(self.state)
        self.msg_ids = MessageIdWindow(config.message_dedup_max_ids)
        self._pending_ids: dict[bytes, tuple[int, int, int]] = {}
        self._ids_by_index: deque[_PendingIds] = deque()
        self.counters = Counters()
        #: Raft index of the last committed entry applied (set by the partition).
        self.applied_index = 0

    @property
    def window_on(self) -> bool:
        return self.config.message_dedup_window_ms > 0

    def needs_ready_leader(self, headers: Sequence[tuple[int, BatchHeader]]) -> bool:
        """Whether admitting these batches needs the state as of the committed log."""
        return self.window_on or any(h.producer_id >= 0 for _, h in headers)

    def update_config(self, config: TopicConfig) -> None:
        self.config = config
        self.msg_ids.set_max_ids(config.message_dedup_max_ids)

    # -- the leader's admission ------------------------------------------------------------

    def admit(
        self, buf: bytes, headers: Sequence[tuple[int, BatchHeader]], now_ms: int
    ) -> list[BatchPlan]:
        """The plan for each batch, or the error refusing the request (nothing proposed).
        Batches earlier in the request count as in flight for the later ones."""
        plans: list[BatchPlan] = []
        # Within the request: what earlier batches will add (producer id -> entry overlay).
        local: dict[int, list[tuple[int, BatchMeta]]] = {}
        local_ids: dict[bytes, int] = {}
        for pos, h in headers:
            plan = BatchPlan(pos, h)
            pid = h.producer_id
            check: Check | None = None
            if pid >= 0:
                check, pending = self._check_producer(pid, h, local)
                if check.verdict is Verdict.DUPLICATE:
                    assert check.original is not None
                    self.counters.duplicates += 1
                    plan.duplicate_of = (check.original.base_offset, check.original.last_offset)
                    if self.window_on and h.has_headers and not h.is_control:
                        # The original may have been stored as a control batch standing for
                        # msg-id duplicates: answer with the records' first offsets.
                        plan.duplicate_of = self._stored_ids(buf, pos, now_ms) or plan.duplicate_of
                    if pending is not None:
                        plan.wait_for = (pending.raft_index, pending.term)
                    plans.append(plan)
                    continue
                self._raise_for(check, h)
            if self.window_on and h.has_headers and not h.is_control:
                self._admit_msg_ids(buf, plan, now_ms, local_ids)
            if pid >= 0 and plan.proposes:
                last = last_sequence(h.base_sequence, h.record_count)
                meta = BatchMeta(h.base_sequence, last, -1, -1, h.max_timestamp)
                local.setdefault(pid, []).append((h.producer_epoch, meta))
            plans.append(plan)
        return plans

    def _check_producer(
        self, pid: int, h: BatchHeader, local: dict[int, list[tuple[int, BatchMeta]]]
    ) -> tuple[Check, Pending | None]:
        earlier = local.get(pid)
        if not earlier:
            return self.view.check(pid, h.producer_epoch, h.base_sequence, h.record_count)
        base = self.view.effective(pid)
        entry = base.copy() if base is not None else ProducerEntry(earlier[0][0])
        for epoch, meta in earlier:
            entry.add(epoch, meta)
        result = check_entry(entry, h.producer_epoch, h.base_sequence, h.record_count)
        if result.verdict is Verdict.DUPLICATE:
            # A batch repeated within one request: refuse rather than guess its offsets.
            raise InvalidRequest(
                f"{self.where}: producer {pid} sends sequence {h.base_sequence} twice in one "
                "request"
            )
        return result, None

    def _raise_for(self, check: Check, h: BatchHeader) -> None:
        pid = h.producer_id
        if check.verdict is Verdict.ACCEPT:
            return
        if check.verdict is Verdict.FENCED:
            self.counters.fenced += 1
            raise ProducerFenced(
                f"{self.where}: producer {pid} epoch {h.producer_epoch} is fenced by epoch "
                f"{check.current_epoch}: a newer session of this producer took over",
                producer_id=str(pid),
                producer_epoch=str(h.producer_epoch),
                current_epoch=str(check.current_epoch),
            )
        if check.verdict is Verdict.UNKNOWN_PRODUCER:
            self.counters.unknown_producer += 1
            raise UnknownProducerId(
                f"{self.where}: no state for producer {pid} (never seen here or expired) and its "
                f"batch starts at sequence {h.base_sequence}, not 0: start a new session",
                producer_id=str(pid),
            )
        self.counters.out_of_order += 1
        raise OutOfOrderSequence(
            f"{self.where}: producer {pid} epoch {h.producer_epoch} sent sequence "
            f"{h.base_sequence}, expected {check.expected_sequence}",
            producer_id=str(pid),
            expected_sequence=str(check.expected_sequence),
            received_sequence=str(h.base_sequence),
        )

    def _stored_ids(self, buf: bytes, pos: int, now_ms: int) -> tuple[int, int] | None:
        """First and last offset of the batch's msg-ids when all are stored."""
        found = []
        for r in decode_records(buf, pos, verify_crc=False):
            value = next((v for k, v in r.headers if k == MSG_ID_HEADER and v is not None), None)
            if value is None:
                return None
            key = digest(value)
            stored = self.msg_ids.lookup(key, now_ms, self.config.message_dedup_window_ms)
            if stored is not None:
                found.append(stored.offset)
            elif key in self._pending_ids:
                found.append(self._pending_ids[key][0])
            else:
                return None
        return (found[0], found[-1]) if found else None

    def _admit_msg_ids(
        self, buf: bytes, plan: BatchPlan, now_ms: int, local_ids: dict[bytes, int]
    ) -> None:
        records = decode_records(buf, plan.pos, verify_crc=False)  # validated by the caller
        keys: list[bytes | None] = []
        found: list[int | None] = []
        window = self.config.message_dedup_window_ms
        for r in records:
            value = next((v for k, v in r.headers if k == MSG_ID_HEADER and v is not None), None)
            if value is None:
                keys.append(None)
                found.append(None)
                continue
            key = digest(value)
            keys.append(key)
            if key in local_ids:
                raise InvalidRequest(
                    f"{self.where}: msg-id {value[:64]!r} appears twice in one request"
                )
            local_ids[key] = 0
            stored = self.msg_ids.lookup(key, now_ms, window)
            if stored is not None:
                found.append(stored.offset)
            elif key in self._pending_ids:
                found.append(self._pending_ids[key][0])
            else:
                found.append(None)
        plan.msg_keys = keys
        dups = [f for f in found if f is not None]
        if not dups:
            return
        if len(dups) != len(records):
            raise InvalidRequest(
                f"{self.where}: a batch of {len(records)} records holds {len(dups)} whose msg-id "
                f"was stored within message.dedup.window.ms and {len(records) - len(dups)} new "
                "ones: send records with a msg-id one per batch, or resend the batch as it was"
            )
        self.counters.msg_id_duplicates += 1
        plan.duplicate_of = (dups[0], dups[-1])
        waits = [
            self._pending_ids[k][1:]
            for k in keys
            if k is not None and self.msg_ids.lookup(k, now_ms, window) is None
        ]
        if waits:
            plan.wait_for = max(waits)
        plan.msg_keys = None  # nothing new to remember
        h = plan.header
        if h.producer_id >= 0:
            plan.replacement = encode_batch(
                [None] * h.record_count,
                timestamps_ms=[r.timestamp_ms for r in records],
                headers=[[(DUP_OF_HEADER, str(o).encode())] for o in dups],
                producer_id=h.producer_id,
                producer_epoch=h.producer_epoch,
                base_sequence=h.base_sequence,
                control=True,
            )

    def proposed(self, plan: BatchPlan, base_offset: int, raft_index: int, term: int) -> None:
        """A batch of the plan was proposed at ``raft_index`` with ``base_offset``."""
        h = plan.header
        if h.producer_id >= 0:
            meta = BatchMeta(
                h.base_sequence,
                last_sequence(h.base_sequence, h.record_count),
                base_offset,
                base_offset + h.record_count - 1,
                h.max_timestamp,
            )
            self.view.proposed(h.producer_id, Pending(raft_index, term, h.producer_epoch, meta))
        if plan.msg_keys is not None and plan.replacement is None:
            entry = _PendingIds(raft_index, term)
            for i, key in enumerate(plan.msg_keys):
                if key is not None:
                    self._pending_ids[key] = (base_offset + i, raft_index, term)
                    entry.keys.append((key, base_offset + i))
            if entry.keys:
                self._ids_by_index.append(entry)

    # -- every replica ------------------------------------------------------------------------

    def apply_committed(self, data: bytes | bytearray | memoryview) -> None:
        """A committed entry's stamped batch (EMPTY entries may carry no bytes)."""
        if len(data) == 0:
            return
        h = unpack_header(data)
        if h.base_offset < self.state.applied_offset:
            return
        self.state.apply(
            producer_id=h.producer_id,
            epoch=h.producer_epoch,
            base_sequence=h.base_sequence,
            record_count=h.record_count,
            base_offset=h.base_offset,
            timestamp_ms=h.max_timestamp,
            applied_at_ms=time.time_ns() // 1_000_000 if h.producer_id >= 0 else -1,
        )
        if self.window_on and h.has_headers and not h.is_control:
            for r in decode_records(data, verify_crc=False):
                for k, v in r.headers:
                    if k == MSG_ID_HEADER and v is not None:
                        self.msg_ids.add(digest(v), r.offset, r.timestamp_ms)
                        break

    def committed(self, raft_index: int) -> None:
        """Entries up to ``raft_index`` are committed and applied: drop them from in flight."""
        self.view.committed(raft_index)
        self._drop_ids(lambda e: e.raft_index <= raft_index, front=True)

    def truncated(self, from_index: int) -> None:
        self.view.truncated(from_index)
        self._drop_ids(lambda e: e.raft_index >= from_index, front=False)

    def leadership_lost(self) -> None:
        self.view.clear()
        self._pending_ids.clear()
        self._ids_by_index.clear()

    def snapshot_installed(self, log_start_offset: int, state: bytes | None = None) -> None:
        """The log restarts at ``log_start_offset`` (a leader's snapshot). ``state``: the
        leader's state carried in the snapshot (as of its applied offset, at or after the
        log start; the entries that follow and that it already covers are skipped when
        they are applied). Without one (an older leader), or one that does not parse, the
        state of the records before the log start is gone with them."""
        self.leadership_lost()
        if state is not None:
            try:
                self.restore(state)
            except CorruptProducerSnapshot as exc:
                log.warning(
                    "%s: the idempotence state in the leader's snapshot is unusable (%s); "
                    "starting from an empty state",
                    self.where,
                    exc,
                )
            else:
                self.state.skip_to(log_start_offset)
                return
        self.state.clear(log_start_offset)
        self.msg_ids.clear()

    def _drop_ids(self, gone: Callable[[_PendingIds], bool], *, front: bool) -> None:
        q = self._ids_by_index
        while q and gone(q[0] if front else q[-1]):
            e = q.popleft() if front else q.pop()
            for key, _offset in e.keys:
                cur = self._pending_ids.get(key)
                if cur is not None and cur[1] == e.raft_index:
                    del self._pending_ids[key]

    def maintain(self, now_ms: int) -> None:
        """Expire idle producers and msg-ids older than the window (the node's clock)."""
        self.counters.expired += self.state.expire(now_ms, self.config.producer_id_expiration_ms)
        if self.window_on:
            self.msg_ids.prune(now_ms, self.config.message_dedup_window_ms)
        else:
            self.msg_ids.clear()

    # -- snapshots and recovery ---------------------------------------------------------------

    def snapshot(self) -> bytes:
        p = self.state.snapshot()
        m = self.msg_ids.snapshot()
        return _SNAP.pack(len(p), len(m)) + p + m

    def bounded_snapshot(self, max_bytes: int) -> Trimmed:
        """:meth:`snapshot` in at most ``max_bytes`` (a Raft snapshot for a follower that
        catches up: one message). When the whole state does not fit, the oldest msg-ids go
        first, then the least recently active producers: a producer left out is unknown to
        that follower (its retry there after a failover gets UNKNOWN_PRODUCER_ID and starts
        a new session, which may store a batch twice). Streaming the state in chunks, so
        nothing is left out, is the self-healing issue's work."""
        full = self.snapshot()
        if len(full) <= max_bytes:
            return Trimmed(full, 0, 0)
        state, ids = self.state, self.msg_ids
        p = state.snapshot()
        if len(p) + 2 * _SNAP.size + _EMPTY_IDS_BYTES < max_bytes:
            # Every producer fits: keep the newest msg-ids that fit beside them.
            budget = max_bytes - _SNAP.size - len(p)
            keep = len(ids)
            while True:
                m_bytes = ids.newest(keep).snapshot() if keep < len(ids) else ids.snapshot()
                if len(m_bytes) <= budget or keep == 0:
                    break
                keep = min(keep - 1, int(keep * budget / len(m_bytes) * 0.95))
            data = _SNAP.pack(len(p), len(m_bytes)) + p + m_bytes
            return Trimmed(data, 0, len(ids) - keep)
        m_bytes = MessageIdWindow(ids.max_ids).snapshot()
        budget = max_bytes - _SNAP.size - len(m_bytes)
        keep = len(state)
        while True:
            p = state.most_recent(keep).snapshot()
            if len(p) <= budget or keep == 0:
                break
            keep = min(keep - 1, int(keep * budget / len(p) * 0.95))
        data = _SNAP.pack(len(p), len(m_bytes)) + p + m_bytes
        return Trimmed(data, len(state) - keep, len(ids))

    def restore(self, data: bytes) -> None:
        """Replace the committed state with a snapshot's (CorruptProducerSnapshot if bad)."""
        if len(data) < _SNAP.size:
            raise CorruptProducerSnapshot("partition idempotence snapshot is truncated")
        lp, lm = _SNAP.unpack_from(data)
        if _SNAP.size + lp + lm != len(data):
            raise CorruptProducerSnapshot("partition idempotence snapshot has a bad length")
        p = data[_SNAP.size : _SNAP.size + lp]
        m = data[_SNAP.size + lp :]
        state = ProducerState.restore(p)
        window = MessageIdWindow.restore(m, self.config.message_dedup_max_ids)
        self.state = state
        self.view = LeaderView(state)
        self.msg_ids = window

    def recover(self, log: ReadableLog, upto: int) -> int:
        """Apply the committed batches in [applied offset, ``upto``) read from ``log``; how
        many batches were applied. A state ahead of ``upto`` is kept (it was applied from
        committed entries only)."""
        if self.state.applied_offset > log.log_end_offset and self.config.flush == "os":
            # A snapshot ahead of the log (records lost under flush=os, maybe on a majority:
            # what it covers may never be committed again): rebuild from the log. Under
            # flush=durable the state covers committed entries only, which the leader sends
            # again (a follower that restarted after installing a leader's snapshot, before
            # it caught up): it is kept, and those entries are skipped when applied.
            self.state.clear(log.log_start_offset)
            self.msg_ids.clear()
        offset = max(self.state.applied_offset, log.log_start_offset)
        self.state.skip_to(offset)
        n = 0
        while offset < upto:
            data = log.read(offset, _REPLAY_READ_BYTES, upto=upto)
            if not data:
                break
            last_end = offset
            for pos, h in iter_headers(data):
                if h.base_offset >= upto:
                    break
                self.apply_committed(memoryview(data)[pos : pos + h.size])
                last_end = h.last_offset + 1
                n += 1
            if last_end <= offset:
                break
            offset = last_end
        self.state.skip_to(min(offset, upto))
        return n
