"""The idempotent-producer state of one partition: a pure, deterministic state machine.

For each producer id it keeps the epoch and the last :data:`BATCHES_KEPT` batches stored for it
(first and last sequence, base and last offset, timestamp). Every replica derives the same
state from the committed log (:meth:`ProducerState.apply` on each committed batch, in offset
order), so a new leader knows every producer as of the committed log. The leader additionally
keeps the batches it proposed and that are not committed yet (:class:`LeaderView`), so a
pipelined retry of a batch proposed a moment ago is recognized as a duplicate too.

:meth:`check` decides what to do with a batch before it is proposed (Kafka's rules):

* unknown producer: ACCEPT when the batch starts a session (sequence 0), else UNKNOWN_PRODUCER;
* epoch older than the stored one: FENCED;
* epoch newer: ACCEPT at sequence 0 (a new session), else OUT_OF_ORDER;
* same epoch, same sequence range as a kept batch: DUPLICATE with that batch's offsets;
* same epoch, first sequence = last stored + 1 (modulo 2**31): ACCEPT; anything else
  (a gap, or an old batch no longer kept): OUT_OF_ORDER.

Expiry (:meth:`ProducerState.expire`) takes the clock as an argument: the node calls it with
its wall clock against the later of the producer's last batch timestamp (the producer's clock,
as in Kafka) and the time this replica applied that batch (so old record timestamps do not
expire a producer that is writing). It is the one step in which replicas may briefly differ;
it only ever forgets a producer idle for ``producer.id.expiration.ms``, whose next batch then
starts a new session.
"""

from __future__ import annotations

import enum
import json
import struct
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import crc32c

#: Sequence numbers are int32 and wrap from 2**31 - 1 to 0 (as in Kafka).
SEQUENCE_MOD = 2**31
#: Batches remembered per producer: the producer keeps at most this many requests in flight.
BATCHES_KEPT = 5
#: ``producer_id`` of a batch from a producer that is not idempotent.
NO_PRODUCER_ID = -1
EPOCH_MAX = 2**15 - 1

_SNAPSHOT_MAGIC = b"TLPS"
_SNAPSHOT_FORMAT = 1
_SNAPSHOT_HEADER = struct.Struct("<4sHI")


class CorruptProducerSnapshot(ValueError):
    """Snapshot bytes that fail their checksum or do not parse."""


def last_sequence(base_sequence: int, record_count: int) -> int:
    return (base_sequence + record_count - 1) % SEQUENCE_MOD


def next_sequence(sequence: int) -> int:
    return (sequence + 1) % SEQUENCE_MOD


class Verdict(enum.Enum):
    ACCEPT = "accept"
    DUPLICATE = "duplicate"
    OUT_OF_ORDER = "out_of_order"
    FENCED = "fenced"
    UNKNOWN_PRODUCER = "unknown_producer"


@dataclass(frozen=True, slots=True)
class BatchMeta:
    """One stored (or, on the leader, proposed) batch of a producer."""

    first_seq: int
    last_seq: int
    base_offset: int
    last_offset: int
    timestamp_ms: int


@dataclass(frozen=True, slots=True)
class Check:
    verdict: Verdict
    #: DUPLICATE: the batch as first stored (or proposed).
    original: BatchMeta | None = None
    #: OUT_OF_ORDER: the sequence the partition expects next (-1: a new session, 0).
    expected_sequence: int = -1
    #: FENCED: the epoch the partition holds.
    current_epoch: int = -1


class ProducerEntry:
    """A producer's epoch and its last batches, oldest first."""

    __slots__ = ("batches", "epoch")

    def __init__(
        self, epoch: int, batches: Iterator[BatchMeta] | tuple[BatchMeta, ...] = ()
    ) -> None:
        self.epoch = epoch
        self.batches: deque[BatchMeta] = deque(batches, maxlen=BATCHES_KEPT)

    @property
    def last_timestamp_ms(self) -> int:
        return self.batches[-1].timestamp_ms if self.batches else -1

    def copy(self) -> ProducerEntry:
        return ProducerEntry(self.epoch, tuple(self.batches))

    def add(self, epoch: int, meta: BatchMeta) -> None:
        """Record a stored batch (the log decides: a newer epoch restarts the batches; a
        stale one, which a leader never proposes, changes nothing)."""
        if epoch > self.epoch:
            self.epoch = epoch
            self.batches.clear()
        elif epoch < self.epoch:
            return
        self.batches.append(meta)

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, ProducerEntry)
            and self.epoch == other.epoch
            and list(self.batches) == list(other.batches)
        )

    def __repr__(self) -> str:
        return f"ProducerEntry(epoch={self.epoch}, batches={list(self.batches)})"


def check_entry(
    entry: ProducerEntry | None, epoch: int, base_sequence: int, record_count: int
) -> Check:
    """The verdict for a batch against one producer's entry (None: unknown producer)."""
    if entry is None:
        if base_sequence == 0:
            return Check(Verdict.ACCEPT)
        return Check(Verdict.UNKNOWN_PRODUCER, expected_sequence=0)
    if epoch < entry.epoch:
        return Check(Verdict.FENCED, current_epoch=entry.epoch)
    if epoch > entry.epoch or not entry.batches:
        if base_sequence == 0:
            return Check(Verdict.ACCEPT)
        return Check(Verdict.OUT_OF_ORDER, expected_sequence=0)
    last = last_sequence(base_sequence, record_count)
    for b in entry.batches:
        if b.first_seq == base_sequence and b.last_seq == last:
            return Check(Verdict.DUPLICATE, original=b)
    expected = next_sequence(entry.batches[-1].last_seq)
    if base_sequence == expected:
        return Check(Verdict.ACCEPT)
    return Check(Verdict.OUT_OF_ORDER, expected_sequence=expected)


class ProducerState:
    """Every producer of one partition as of ``applied_offset`` (one past the last batch
    applied). Mutated only by ``apply``, ``skip_to``, ``expire`` and ``restore``."""

    __slots__ = ("_applied_offset", "_last_seen", "_producers")

    def __init__(self, applied_offset: int = 0) -> None:
        self._producers: dict[int, ProducerEntry] = {}
        # When this replica last applied a batch of the producer (its own clock): expiry
        # counts from the later of this and the batch's timestamp, so a producer writing
        # records with old timestamps (a backfill, a mirror) does not expire while it writes.
        self._last_seen: dict[int, int] = {}
        self._applied_offset = applied_offset

    @property
    def applied_offset(self) -> int:
        return self._applied_offset

    def __len__(self) -> int:
        return len(self._producers)

    def entry(self, producer_id: int) -> ProducerEntry | None:
        return self._producers.get(producer_id)

    def producer_ids(self) -> list[int]:
        return sorted(self._producers)

    def check(self, producer_id: int, epoch: int, base_sequence: int, record_count: int) -> Check:
        return check_entry(self._producers.get(producer_id), epoch, base_sequence, record_count)

    def apply(
        self,
        *,
        producer_id: int,
        epoch: int,
        base_sequence: int,
        record_count: int,
        base_offset: int,
        timestamp_ms: int,
        applied_at_ms: int = -1,
    ) -> None:
        """A committed batch, in offset order. Batches below ``applied_offset`` (already in a
        restored snapshot) are ignored, so replaying a tail twice is harmless.
        ``applied_at_ms``: this replica's clock now (only expiry reads it)."""
        if base_offset < self._applied_offset:
            return
        last_offset = base_offset + record_count - 1
        self._applied_offset = last_offset + 1
        if producer_id < 0:
            return
        meta = BatchMeta(
            base_sequence,
            last_sequence(base_sequence, record_count),
            base_offset,
            last_offset,
            timestamp_ms,
        )
        entry = self._producers.get(producer_id)
        if entry is None:
            self._producers[producer_id] = ProducerEntry(epoch, (meta,))
        else:
            entry.add(epoch, meta)
        if applied_at_ms >= 0:
            self._last_seen[producer_id] = applied_at_ms

    def skip_to(self, offset: int) -> None:
        """Move ``applied_offset`` over records that carry no producer state (or that a
        snapshot install made unreadable)."""
        self._applied_offset = max(self._applied_offset, offset)

    def expire(self, now_ms: int, expiration_ms: int) -> int:
        """Forget producers whose last batch is older than ``expiration_ms``; how many."""
        cutoff = now_ms - expiration_ms
        seen = self._last_seen
        gone = [
            pid
            for pid, e in self._producers.items()
            if max(e.last_timestamp_ms, seen.get(pid, -1)) < cutoff
        ]
        for pid in gone:
            del self._producers[pid]
            seen.pop(pid, None)
        return len(gone)

    def most_recent(self, keep: int) -> ProducerState:
        """A copy with only the ``keep`` most recently active producers (by the later of
        their last batch's timestamp and when this replica applied it), same applied
        offset: what fits a bounded snapshot."""
        seen = self._last_seen
        ranked = sorted(
            self._producers.items(),
            key=lambda kv: (max(kv[1].last_timestamp_ms, seen.get(kv[0], -1)), kv[0]),
            reverse=True,
        )
        out = ProducerState(self._applied_offset)
        for pid, entry in ranked[: max(0, keep)]:
            out._producers[pid] = entry.copy()
            if pid in seen:
                out._last_seen[pid] = seen[pid]
        return out

    def clear(self, applied_offset: int) -> None:
        self._producers.clear()
        self._last_seen.clear()
        self._applied_offset = applied_offset

    # -- snapshots -----------------------------------------------------------------------

    def snapshot(self) -> bytes:
        """Canonical, checksummed bytes (equal states, equal bytes)."""
        body = {
            "applied_offset": self._applied_offset,
            "producers": [
                [
                    pid,
                    e.epoch,
                    [
                        [b.first_seq, b.last_seq, b.base_offset, b.last_offset, b.timestamp_ms]
                        for b in e.batches
                    ],
                    self._last_seen.get(pid, -1),
                ]
                for pid, e in sorted(self._producers.items())
            ],
        }
        raw = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
        return _SNAPSHOT_HEADER.pack(_SNAPSHOT_MAGIC, _SNAPSHOT_FORMAT, crc32c.crc32c(raw)) + raw

    @classmethod
    def restore(cls, data: bytes) -> ProducerState:
        """The state a snapshot holds; CorruptProducerSnapshot if the bytes are not one."""
        raw = _checked_body(data, _SNAPSHOT_MAGIC, _SNAPSHOT_FORMAT, "producer state")
        try:
            body = json.loads(raw)
            state = cls(_int(body["applied_offset"]))
            for pid, epoch, batches, last_seen in body["producers"]:
                metas = tuple(BatchMeta(*(_int(x) for x in b)) for b in batches)
                if len(metas) > BATCHES_KEPT or _int(pid) < 0:
                    raise ValueError(f"producer {pid}: {len(metas)} batches")
                state._producers[pid] = ProducerEntry(_int(epoch), metas)
                if _int(last_seen) >= 0:
                    state._last_seen[pid] = last_seen
        except (ValueError, TypeError, KeyError) as exc:
            raise CorruptProducerSnapshot(
                f"producer state snapshot is inconsistent: {exc}"
            ) from None
        return state

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, ProducerState)
            and self._applied_offset == other._applied_offset
            and self._producers == other._producers
        )


def _int(value: Any) -> int:
    if type(value) is not int:
        raise TypeError(f"expected an integer, got {value!r}")
    return value


def _checked_body(data: bytes, magic: bytes, fmt: int, what: str) -> bytes:
    if len(data) < _SNAPSHOT_HEADER.size:
        raise CorruptProducerSnapshot(
            f"{what} snapshot is {len(data)} bytes, shorter than its header"
        )
    got_magic, got_fmt, crc = _SNAPSHOT_HEADER.unpack_from(data)
    if got_magic != magic or got_fmt != fmt:
        raise CorruptProducerSnapshot(f"not a {what} snapshot of format {fmt}")
    raw = data[_SNAPSHOT_HEADER.size :]
    if crc32c.crc32c(raw) != crc:
        raise CorruptProducerSnapshot(f"{what} snapshot fails its CRC-32C check")
    return raw


@dataclass(frozen=True, slots=True)
class Pending:
    """A batch the leader proposed and that is not committed yet."""

    raft_index: int
    term: int
    epoch: int
    meta: BatchMeta


class LeaderView:
    """The leader's view: the committed :class:`ProducerState` plus its own proposals not yet
    committed, per producer in proposal order. Cleared when leadership is lost (a later term
    starts from the committed state again)."""

    __slots__ = ("_pending", "state")

    def __init__(self, state: ProducerState) -> None:
        self.state = state
        self._pending: dict[int, deque[Pending]] = {}

    def effective(self, producer_id: int) -> ProducerEntry | None:
        entry = self.state.entry(producer_id)
        pending = self._pending.get(producer_id)
        if not pending:
            return entry
        out = entry.copy() if entry is not None else ProducerEntry(pending[0].epoch)
        for p in pending:
            out.add(p.epoch, p.meta)
        return out

    def check(
        self, producer_id: int, epoch: int, base_sequence: int, record_count: int
    ) -> tuple[Check, Pending | None]:
        """The verdict, and for a duplicate of a batch not committed yet, its proposal (the
        caller waits for that entry to commit before it answers)."""
        result = check_entry(self.effective(producer_id), epoch, base_sequence, record_count)
        if result.verdict is Verdict.DUPLICATE and result.original is not None:
            for p in self._pending.get(producer_id, ()):
                if p.meta == result.original:
                    return result, p
        return result, None

    def proposed(self, producer_id: int, pending: Pending) -> None:
        self._pending.setdefault(producer_id, deque()).append(pending)

    def committed(self, raft_index: int) -> None:
        """Entries up to ``raft_index`` are committed (and applied to ``state``)."""
        empty = []
        for pid, queue in self._pending.items():
            while queue and queue[0].raft_index <= raft_index:
                queue.popleft()
            if not queue:
                empty.append(pid)
        for pid in empty:
            del self._pending[pid]

    def truncated(self, from_index: int) -> None:
        """Entries from ``from_index`` on were removed from the log."""
        empty = []
        for pid, queue in self._pending.items():
            while queue and queue[-1].raft_index >= from_index:
                queue.pop()
            if not queue:
                empty.append(pid)
        for pid in empty:
            del self._pending[pid]

    def clear(self) -> None:
        self._pending.clear()

    @property
    def pending_count(self) -> int:
        return sum(len(q) for q in self._pending.values())
