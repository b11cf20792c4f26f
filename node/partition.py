"""One replica of one partition on this node: its log, its Raft group, its high watermark and
who waits on them.

The partition is the Raft group's owner (``multiraft.GroupHandler``). On the leader, a produce
request becomes one proposal per record batch: :meth:`Partition.propose` stamps each batch
with its base offset, Raft term and Raft index (the offsets continue after every entry of
the Raft log, including those proposed and not yet stored) and hands it to the core. The
driver stores, replicates and commits it; this class only turns the driver's callbacks into
answers:

* committed entries move the high watermark (``log.end_offset_at_index(commit)``), which
  wakes acks=all producers and fetch streams; a producer's batch counts only if the entry
  committed at its index is the one it proposed (same term): a new leader may have
  overwritten it, and then the producer hears NOT_LEADER and retries;
* stored entries (fsynced under flush=durable) wake acks=1 and acks=0 producers;
* a truncated suffix fails the producers of the entries it removed.

Only the leader serves reads, and only once it knows the group's commit index (it has
committed the entries it holds from earlier terms): until then its high watermark may lag
the old leader's, and a consumer at the old high watermark would be told its offset is out
of range. Followers and nodes without a replica answer NOT_LEADER naming the leader.

Everything here runs on the event loop thread, except ``log.flush()``, which the driver runs
in a worker thread.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

from tidelog.config import TopicConfig
from tidelog.errors import (
    LeaderNotAvailable,
    NodeUnavailable,
    NotEnoughReplicas,
    NotLeader,
    OffsetOutOfRange,
    RequestTimedOut,
    StorageError,
    TidelogError,
    UnknownTopic,
)
from tidelog.node.idempotence import PartitionIdempotence
from tidelog.node.raft.errors import NotLeader as RaftNotLeader
from tidelog.node.raft.errors import ProposalDropped
from tidelog.node.raft.types import NONE, Entry, Role, Snapshot, SoftState
from tidelog.node.raft_storage import next_offset, stamped_copy
from tidelog.records import BatchHeader

if TYPE_CHECKING:
    from tidelog.node.multiraft import MultiRaft, RaftGroup

log = logging.getLogger(__name__)


class LogLike(Protocol):
    """The part of node/log's PartitionLog a partition replica uses."""

    @property
    def log_start_offset(self) -> int: ...
    @property
    def log_end_offset(self) -> int: ...
    @property
    def flushed_offset(self) -> int: ...
    @property
    def size_bytes(self) -> int: ...
    @property
    def segment_count(self) -> int: ...
    @property
    def first_index(self) -> int: ...
    @property
    def last_index(self) -> int: ...
    @property
    def last_term(self) -> int: ...

    def read(self, offset: int, max_bytes: int, *, upto: int | None = None) -> bytes: ...
    def offset_for_timestamp(self, timestamp_ms: int) -> tuple[int, int] | None: ...
    def term_at_index(self, raft_index: int) -> int | None: ...
    def end_offset_at_index(self, raft_index: int) -> int | None: ...
    def entries_by_index(self, lo: int, hi: int, max_bytes: int) -> list[bytes]: ...
    def append_stamped(self, batches: bytes | bytearray | memoryview) -> None: ...
    def truncate_suffix(self, offset: int) -> None: ...
    def reset(self, next_offset: int, last_index: int, last_term: int) -> None: ...
    def flush(self) -> int: ...
    def enforce_retention(self, now_ms: int | None = None, *, below: int | None = None) -> int: ...
    def maybe_roll(self, now_ms: int | None = None) -> bool: ...
    def update_config(self, config: TopicConfig) -> None: ...
    def close(self) -> None: ...
    def delete(self) -> None: ...


#: ``node_id -> advertised address`` of a node, or None when unknown.
AddressOf = Callable[[int], "str | None"]


class _Waiter:
    __slots__ = ("fut", "index", "term")

    def __init__(self, index: int, term: int, fut: asyncio.Future[None]) -> None:
        self.index = index
        self.term = term
        self.fut = fut


class Partition:
    __slots__ = (
        "_address_of",
        "_changed",
        "_closed_error",
        "_commit_waiters",
        "_hw",
        "_leader_ready_index",
        "_persist_waiters",
        "_raft",
        "_stream_error",
        "config",
        "elections_started",
        "elections_won",
        "group",
        "group_id",
        "idempotence",
        "index",
        "log",
        "replicas",
        "topic",
    )

    def __init__(
        self,
        topic: str,
        index: int,
        partition_log: LogLike,
        config: TopicConfig,
        *,
        group_id: int,
        replicas: Sequence[int],
        address_of: AddressOf = lambda _node: None,
    ) -> None:
        self.topic = topic
        self.index = index
        self.log = partition_log
        self.config = config
        self.group_id = group_id
        self.replicas = tuple(replicas)
        self._address_of = address_of
        self.group: RaftGroup | None = None
        self._raft: MultiRaft | None = None
        # What the stored commit index covers; the commits of the running group move it.
        self._hw = partition_log.log_start_offset
        # Produce waiters in index order (proposals happen in index order).
        self._commit_waiters: deque[_Waiter] = deque()
        self._persist_waiters: deque[_Waiter] = deque()
        # A leader serves reads once its commit index reaches this (None: not leader).
        self._leader_ready_index: int | None = None
        # Set (and replaced) whenever the high watermark moves, leadership changes or the
        # partition closes.
        self._changed = asyncio.Event()
        self._closed_error: TidelogError | None = None
        self._stream_error: TidelogError | None = None
        self.elections_started = 0
        self.elections_won = 0
        # Producer state and msg-id window, derived from the committed log (idempotence.py).
        self.idempotence = PartitionIdempotence(f"{topic}/{index}", config)

    def __repr__(self) -> str:
        return f"Partition({self.topic!r}, {self.index}, group={self.group_id}, hw={self._hw})"

    def attach(self, group: RaftGroup, raft: MultiRaft) -> None:
        """Bind to the running Raft group (right after ``MultiRaft.add_group``)."""
        self.group = group
        self._raft = raft
        end = self.log.end_offset_at_index(group.raw.commit_index)
        self._hw = max(self._hw, end if end is not None else self.log.log_start_offset)
        # The committed records after the restored snapshot (if any); later commits arrive
        # through on_committed.
        self.idempotence.recover(self.log, self._hw)

    # -- state ---------------------------------------------------------------------------

    @property
    def high_watermark(self) -> int:
        """Offset one past the last committed record: what Fetch serves and LATEST returns."""
        return self._hw

    @property
    def log_start_offset(self) -> int:
        return self.log.log_start_offset

    @property
    def role(self) -> Role:
        return self.group.raw.role if self.group is not None else Role.FOLLOWER

    @property
    def term(self) -> int:
        return self.group.raw.term if self.group is not None else 0

    @property
    def leader_id(self) -> int:
        """The leader this replica knows of (``NONE`` when none)."""
        return self.group.raw.leader_id if self.group is not None else NONE

    @property
    def is_leader(self) -> bool:
        return self.group is not None and self.group.raw.role == Role.LEADER

    @property
    def serving(self) -> bool:
        """Leader, and its high watermark is the group's: reads may be served."""
        ready = self._leader_ready_index
        return (
            ready is not None
            and self.group is not None
            and self.group.raw.role == Role.LEADER
            and self.group.raw.commit_index >= ready
        )

    def in_sync(self) -> list[int]:
        """Replicas whose log holds everything committed (leader view; [] elsewhere). The
        caller drops replicas it knows dead: a follower that died while the partition was
        idle still matches the commit index."""
        group = self.group
        if group is None or group.raw.role != Role.LEADER:
            return []
        raw = group.raw
        commit = raw.commit_index
        out = []
        for node in self.replicas:
            pr = raw.progress(node)
            if node == raw.id or (pr is not None and pr.match >= commit):
                out.append(node)
        return out

    def follower_lags(self) -> list[tuple[int, int]]:
        """(follower, entries it lacks) on the leader; [] elsewhere."""
        group = self.group
        if group is None or group.raw.role != Role.LEADER:
            return []
        raw = group.raw
        last = raw.log.last_index()
        out = []
        for node in self.replicas:
            if node == raw.id:
                continue
            pr = raw.progress(node)
            if pr is not None:
                out.append((node, max(0, last - pr.match)))
        return out

    def check_open(self) -> None:
        if self._closed_error is not None:
            raise self._closed_error

    def check_streaming(self) -> None:
        """For fetch streams: also fails once the node ends its streams (shutdown) and when
        this replica stops being the serving leader."""
        if self._closed_error is not None:
            raise self._closed_error
        if self._stream_error is not None:
            raise self._stream_error
        if not self.serving:
            raise self.not_leader()

    def check_serving(self) -> None:
        self.check_open()
        if not self.serving:
            raise self.not_leader()

    def changed(self) -> asyncio.Event:
        """An event set at the next high-watermark move, leadership change or close. Take it
        before checking the condition you wait for, then wait on it: no wake-up can fall in
        between."""
        return self._changed

    def not_leader(self) -> TidelogError:
        """NOT_LEADER naming the leader when one is known, else LEADER_NOT_AVAILABLE."""
        leader = self.leader_id
        where = f"{self.topic}/{self.index}"
        me = self.group.raw.id if self.group is not None else NONE
        if leader not in (NONE, me):
            address = self._address_of(leader)
            return NotLeader(
                f"{where}: this node is not the leader; node {leader} is"
                + (f" at {address}" if address else ""),
                leader_id=str(leader),
                leader_address=address or "",
            )
        return LeaderNotAvailable(
            f"{where}: no leader is available right now (an election is running); retry"
        )

    # -- producing -----------------------------------------------------------------------

    def propose(
        self,
        batches: bytes,
        headers: Sequence[tuple[int, BatchHeader]],
        on_proposed: Callable[[int, int, int, int], None] | None = None,
    ) -> tuple[int, int, int, int]:
        """Propose validated batches (their positions and headers in ``batches``) as one Raft
        entry each. Returns (base offset, last offset, last Raft index, term).
        ``on_proposed(i, base_offset, raft_index, term)`` is called for each batch proposed,
        also when a later one fails."""
        self.check_open()
        group, raft = self.group, self._raft
        if group is None or raft is None:
            raise self.not_leader()
        raw = group.raw
        if raw.role != Role.LEADER:
            raise self.not_leader()
        term = raw.term
        offset = first = next_offset(raw, self.log)
        index = first_index = raw.log.last_index() + 1
        view = memoryview(batches)
        proposed = False
        try:
            for pos, h in headers:
                got = raw.propose(stamped_copy(view, pos, h.size, offset, term, index))
                proposed = True
                assert got == index, f"proposed at index {got}, stamped {index}"
                if on_proposed is not None:
                    on_proposed(index - first_index, offset, index, term)
                offset += h.record_count
                index += 1
        except RaftNotLeader:
            raise self.not_leader() from None
        except ProposalDropped as exc:
            raise NotEnoughReplicas(
                f"{self.topic}/{self.index}: the leader refused the batch for now: {exc.reason}"
            ) from None
        finally:
            if proposed:
                raft.touch(group)
        return first, offset - 1, index - 1, term

    async def wait_committed(self, index: int, term: int, timeout_s: float) -> None:
        """Return once the entry proposed at ``index`` in ``term`` is committed; NOT_LEADER if
        another entry took its place; RequestTimedOut after ``timeout_s``."""
        await self._wait(self._commit_waiters, index, term, timeout_s, "committed")

    async def wait_persisted(self, index: int, term: int, timeout_s: float) -> None:
        """Return once the entry is stored here (fsynced unless flush=os)."""
        await self._wait(self._persist_waiters, index, term, timeout_s, "stored")

    async def _wait(
        self, waiters: deque[_Waiter], index: int, term: int, timeout_s: float, what: str
    ) -> None:
        self.check_open()
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        w = _Waiter(index, term, fut)
        waiters.append(w)
        try:
            async with asyncio.timeout(timeout_s):
                await fut
        except TimeoutError:
            # Drop our entry now: a stuck group must not let timed-out waiters pile up.
            try:
                waiters.remove(w)
            except ValueError:
                pass
            raise RequestTimedOut(
                f"{self.topic}/{self.index}: a batch at raft index {index} was appended but not "
                f"{what} within {timeout_s * 1000:.0f} ms; it may still become visible"
            ) from None

    # -- the driver's callbacks (multiraft.GroupHandler) ---------------------------------

    def on_soft_state(self, group: RaftGroup, soft: SoftState) -> None:
        raw = group.raw
        if soft.role == Role.LEADER:
            if self._leader_ready_index is None:
                self.idempotence.leadership_lost()  # proposals in flight are an old term's
                self.elections_won += 1
                # Every entry it holds is committed once its commit reaches its last index
                # as of now (the EMPTY entry it appended, if any).
                self._leader_ready_index = raw.log.last_index()
                log.info("%s/%d: this node leads, term %d", self.topic, self.index, raw.term)
        else:
            if soft.role in (Role.PRE_CANDIDATE, Role.CANDIDATE):
                self.elections_started += 1
            if self._leader_ready_index is not None:
                log.info(
                    "%s/%d: no longer the leader (term %d, leader %s)",
                    self.topic, self.index, raw.term, soft.leader_id or "unknown",
                )  # fmt: skip
            self._leader_ready_index = None
            self.idempotence.leadership_lost()
        self._fire()

    def on_snapshot(self, group: RaftGroup, snapshot: Snapshot) -> None:
        self.idempotence.snapshot_installed(self.log.log_start_offset)
        self._advance_hw(self.log.log_start_offset)

    def on_truncated(self, group: RaftGroup, from_index: int) -> None:
        err = NotLeader(
            f"{self.topic}/{self.index}: the batch was overwritten by a new leader's log; "
            "it was not committed, retry",
            leader_id=str(group.raw.leader_id or ""),
        )
        self.idempotence.truncated(from_index)
        for waiters in (self._commit_waiters, self._persist_waiters):
            while waiters and waiters[-1].index >= from_index:
                w = waiters.pop()
                if not w.fut.done():
                    w.fut.set_exception(err)

    def on_persisted(self, group: RaftGroup, last_index: int) -> None:
        waiters = self._persist_waiters
        while waiters and waiters[0].index <= last_index:
            w = waiters.popleft()
            if not w.fut.done():
                w.fut.set_result(None)

    def on_committed(self, group: RaftGroup, entries: tuple[Entry, ...]) -> None:
        last = entries[-1].index
        idem = self.idempotence
        for e in entries:
            idem.apply_committed(e.data)
        idem.committed(last)
        end = self.log.end_offset_at_index(last)
        if end is not None:
            self._advance_hw(end)
        waiters = self._commit_waiters
        first = entries[0].index
        while waiters and waiters[0].index <= last:
            w = waiters.popleft()
            if w.fut.done():
                continue
            if w.index >= first:
                term = entries[w.index - first].term
            else:
                term = self.log.term_at_index(w.index) or 0
            if term == w.term:
                w.fut.set_result(None)
            else:
                w.fut.set_exception(
                    NotLeader(
                        f"{self.topic}/{self.index}: the batch was replaced by a new leader's "
                        "entry and not committed; retry",
                        leader_id=str(group.raw.leader_id or ""),
                    )
                )
        if self._leader_ready_index is not None:
            self._fire()  # a leader may have become ready to serve

    def on_storage_failure(self, group: RaftGroup, exc: BaseException) -> None:
        self.fail_storage(exc)

    def _advance_hw(self, offset: int) -> None:
        if offset <= self._hw:
            return
        self._hw = offset
        self._fire()

    def _fire(self) -> None:
        event = self._changed
        self._changed = asyncio.Event()
        event.set()

    # -- reads ---------------------------------------------------------------------------

    def check_fetch_offset(self, offset: int) -> None:
        start, hw = self.log.log_start_offset, self._hw
        if not start <= offset <= hw:
            raise OffsetOutOfRange(
                f"{self.topic}/{self.index}: offset {offset} is outside the log, "
                f"valid offsets are {start}..{hw} (log start offset..high watermark)",
                log_start_offset=str(start),
                high_watermark=str(hw),
            )

    def read(self, offset: int, max_bytes: int) -> bytes:
        """Whole committed batches from the one holding ``offset``; at least one batch."""
        self.check_open()
        self.check_fetch_offset(offset)
        return self.log.read(offset, max_bytes, upto=self._hw)

    def offset_for_timestamp(self, timestamp_ms: int) -> tuple[int, int]:
        """(offset, timestamp) of the first committed batch with a record at or after
        ``timestamp_ms``; (high watermark, -1) when there is none."""
        self.check_open()
        found = self.log.offset_for_timestamp(timestamp_ms)
        if found is None or found[0] >= self._hw:
            return self._hw, -1
        return found

    # -- configuration and lifecycle -----------------------------------------------------

    def update_config(self, config: TopicConfig) -> None:
        if self._closed_error is not None:
            return
        self.log.update_config(config)
        self.config = config
        self.idempotence.update_config(config)
        if self.group is not None and self._raft is not None:
            self._raft.set_durable(self.group, config.flush != "os")

    def fail(self, error: TidelogError) -> None:
        """Stop serving: every waiter and stream gets ``error`` (topic deleted, node stopping,
        disk failure). Idempotent; the first error wins."""
        if self._closed_error is not None:
            return
        self._closed_error = error
        for waiters in (self._commit_waiters, self._persist_waiters):
            while waiters:
                w = waiters.popleft()
                if not w.fut.done():
                    w.fut.set_exception(error)
        self._fire()

    def end_streams(self, error: TidelogError) -> None:
        """End fetch streams (they get ``error``) but keep accepting and committing appends:
        the first step of a drain, so produce requests still in flight can finish."""
        if self._stream_error is None:
            self._stream_error = error
            self._fire()

    def close_for_shutdown(self) -> None:
        self.fail(NodeUnavailable(f"{self.topic}/{self.index}: the node is shutting down"))

    def close_for_delete(self) -> None:
        self.fail(UnknownTopic(f"topic {self.topic!r} was deleted"))

    def close_for_move(self) -> None:
        """This node no longer holds a replica (a reassignment moved it away)."""
        self.fail(
            NotLeader(f"{self.topic}/{self.index}: this node no longer holds a replica; retry")
        )

    def fail_storage(self, exc: BaseException) -> None:
        log.error(
            "%s/%d: storage failure, partition taken offline: %s", self.topic, self.index, exc
        )
        self.fail(StorageError(f"{self.topic}/{self.index}: storage failure: {exc}"))

    @property
    def closed(self) -> bool:
        return self._closed_error is not None


__all__ = ["AddressOf", "LogLike", "Partition"]
