"""The replicated-state-machine seam: what every owner of a Raft group on this node shares.

A state machine on a Raft group (a partition replica, the controller; next the compacted
table, consumer-group state, idempotent-producer state) needs the same plumbing around the
driver's callbacks (``multiraft.GroupHandler``), in the manner of Redpanda's
``persisted_stm``. :class:`StateMachine` holds it once:

* **Stamped proposals** (:meth:`StateMachine.propose_batches`). Each entry is one record
  batch stamped with its base offset, Raft term and Raft index before the core sees it; the
  offsets continue after every entry of the Raft log, stored or not.
* **The apply hook** (:meth:`StateMachine.apply`). Committed entries reach it in log order,
  each exactly once per start of the group (from the ``applied`` index given to
  ``MultiRaft.add_group``); :attr:`StateMachine.applied_index` follows it. A subclass turns
  entries into its state there and nowhere else.
* **The sync step** (:meth:`StateMachine.sync`, :attr:`StateMachine.synced`). A new leader
  holds entries that earlier terms wrote and it has not applied yet: its state may lag the
  old leader's. It records its last index when it wins (its own EMPTY entry included, if the
  core appended one) and is *synced* once it has applied up to there: everything earlier
  terms committed is then in its state. A leader serves reads and validates commands against
  its state only once synced.
* **Term-checked waiters** (:meth:`StateMachine.wait_committed`,
  :meth:`StateMachine.wait_persisted`). A waiter for ``(index, term)`` resolves only when the
  entry at ``index`` *with that term* is committed (resp. stored here, fsynced unless
  flush=os). By Raft's Log Matching property an index and a term name one entry, so this is
  exact. It fails when an entry of another term takes the index (committed or stored there),
  when a new leader truncates the suffix holding it, when the state machine closes, or after
  its timeout. A deposed leader's waiter is *not* failed at the moment it steps down: its
  entry may still commit under the next leader, and the answer "committed" is then true;
  if the next leader's log does not hold it, the entry that replaces it fails the waiter.

A subclass supplies the hooks (each documented below): :meth:`apply`, the errors it answers
with (:meth:`not_leader_error`, :meth:`dropped_error`, :meth:`entry_lost_error`,
:meth:`timeout_error`), :meth:`on_storage_failure`, and optionally :meth:`on_role_change`,
:meth:`on_applied` and :meth:`restore_snapshot`. Everything here runs on the event loop thread.
"""

from __future__ import annotations

import asyncio
import bisect
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, Literal, TypeVar

from tidelog.errors import RequestTimedOut, StorageError, TidelogError
from tidelog.node.raft.errors import NotRaftLeader, ProposalDropped
from tidelog.node.raft.types import Entry, Role, Snapshot, SoftState
from tidelog.node.replica_storage import next_offset
from tidelog.records import Buffer, stamped_copy

if TYPE_CHECKING:
    from collections.abc import Callable

    from tidelog.node.multiraft import MultiRaft, RaftGroup

R = TypeVar("R")
T = TypeVar("T")

#: How a waiter's entry was lost: ``overwritten`` (a new leader truncated the suffix holding
#: it) or ``replaced`` (an entry of another term was committed or stored at its index).
LostHow = Literal["overwritten", "replaced"]


class UnappliableEntry(StorageError):
    """A committed entry that this replica cannot apply (corrupt, or from a newer version).
    Raised by :meth:`StateMachine.apply`; the group stops there (the driver never advances
    it again) rather than skip the entry and diverge from the other replicas."""


@dataclass(frozen=True, slots=True)
class Proposed:
    """Where :meth:`StateMachine.propose_batches` put the batches: offsets and Raft indexes
    (both inclusive) and the term they were proposed in (what a waiter checks)."""

    first_offset: int
    last_offset: int
    first_index: int
    last_index: int
    term: int


@dataclass(frozen=True, slots=True)
class BatchSpan:
    """One batch to propose: ``size`` bytes at ``pos`` of ``buf``, holding ``record_count``
    records (the offsets it takes)."""

    buf: Buffer
    pos: int
    size: int
    record_count: int


class _Waiter(Generic[R]):
    __slots__ = ("fut", "index", "term")

    def __init__(self, index: int, term: int, fut: asyncio.Future[R | None]) -> None:
        self.index = index
        self.term = term
        self.fut = fut


class TermCheckedWaiters(Generic[R]):
    """Waiters for ``(index, term)`` in index order. The owner resolves them as entries are
    stored or committed; a waiter succeeds only if the entry at its index has its term."""

    __slots__ = ("_q",)

    def __init__(self) -> None:
        self._q: deque[_Waiter[R]] = deque()

    def __len__(self) -> int:
        return len(self._q)

    def __iter__(self) -> Iterator[_Waiter[R]]:
        return iter(self._q)

    def add(self, index: int, term: int) -> _Waiter[R]:
        fut: asyncio.Future[R | None] = asyncio.get_running_loop().create_future()
        w = _Waiter(index, term, fut)
        q = self._q
        if not q or q[-1].index <= index:
            q.append(w)  # the usual case: proposals come in index order
        else:
            # A leader of a later term proposes below a deposed term's waiter that nothing
            # has resolved yet: keep the queue sorted so resolution stops at the right place.
            q.insert(bisect.bisect_right(q, index, key=lambda x: x.index), w)
        return w

    def discard(self, w: _Waiter[R]) -> None:
        try:
            self._q.remove(w)
        except ValueError:
            pass

    def resolve_upto(
        self,
        last_index: int,
        term_at: Callable[[int], int | None],
        lost: Callable[[], TidelogError],
        result_at: Callable[[int], R | None] = lambda _index: None,
    ) -> None:
        """Settle every waiter at or below ``last_index``: success (with ``result_at``) if
        ``term_at(index)`` is its term, else the ``lost()`` error."""
        q = self._q
        while q and q[0].index <= last_index:
            w = q.popleft()
            if w.fut.done():
                continue
            if term_at(w.index) == w.term:
                w.fut.set_result(result_at(w.index))
            else:
                w.fut.set_exception(lost())

    def fail_from(self, index: int, error: TidelogError) -> None:
        """Fail every waiter at or above ``index`` (that suffix of the log is gone)."""
        q = self._q
        while q and q[-1].index >= index:
            w = q.pop()
            if not w.fut.done():
                w.fut.set_exception(error)

    def fail_all(self, error: TidelogError) -> None:
        q = self._q
        while q:
            w = q.popleft()
            if not w.fut.done():
                w.fut.set_exception(error)


class StateMachine(ABC, Generic[R]):
    """Base of a state machine on one Raft group (a ``multiraft.GroupHandler``).

    ``R`` is what applying one entry yields for the proposer (the controller's
    ``ApplyResult``; ``None`` for a partition, whose producers need only "committed").
    Subclasses call :meth:`attach` right after ``MultiRaft.add_group`` and implement the
    hooks; they do not override the ``on_*`` callbacks of the driver except
    :meth:`on_storage_failure`.
    """

    __slots__ = (
        "_applied_index",
        "_changed",
        "_commit_waiters",
        "_persist_waiters",
        "_raft",
        "_stm_error",
        "_sync_index",
        "group",
    )

    def __init__(self) -> None:
        self.group: RaftGroup | None = None
        self._raft: MultiRaft | None = None
        self._applied_index = 0
        # The last index a new leader held when it won; None when not leader.
        self._sync_index: int | None = None
        self._commit_waiters: TermCheckedWaiters[R] = TermCheckedWaiters()
        self._persist_waiters: TermCheckedWaiters[None] = TermCheckedWaiters()
        # Set (and replaced) at every apply, role change and whatever a subclass notifies.
        self._changed = asyncio.Event()
        self._stm_error: TidelogError | None = None

    # ---- hooks: the abstract ones a subclass implements, the others it may override ------

    @abstractmethod
    def apply(self, entries: tuple[Entry, ...]) -> Sequence[R | None] | None:
        """Apply committed ``entries`` (in order, contiguous with the previous call) to the
        state. Return one result per entry for the proposers' waiters, or None when the
        waiters need no result. Must be deterministic: every replica applies the same log."""
        raise NotImplementedError

    def on_applied(self, last_index: int) -> None:
        """After :meth:`apply`: :attr:`applied_index` is ``last_index`` now and the
        proposers' waiters are settled. For work that reads the new state as a whole
        (reconciling replicas, waking readers). The default does nothing."""

    def restore_snapshot(self, snapshot: Snapshot) -> None:
        """The log was replaced by ``snapshot`` (it now continues after its index); bring
        the state to it. The default keeps the state as it is."""

    def on_log_truncated(self, from_index: int) -> None:
        """Optional: stored entries from ``from_index`` on were removed (a new leader's log
        overwrote them); state derived from unapplied entries (a leader's view of its
        proposals in flight) drops them here."""

    def on_role_change(self, soft: SoftState, was_leader: bool) -> None:
        """The role or the known leader changed (``sync`` bookkeeping is done already).
        ``was_leader``: this node led before the change."""

    @abstractmethod
    def on_storage_failure(self, group: RaftGroup, exc: BaseException) -> None:
        """The group's log failed; the group is offline from now on."""
        raise NotImplementedError

    @abstractmethod
    def not_leader_error(self) -> TidelogError:
        """What a proposal or ``sync`` answers on a node that is not the (synced) leader."""
        raise NotImplementedError

    @abstractmethod
    def dropped_error(self, exc: ProposalDropped) -> TidelogError:
        """What a proposal the core refused for now (a transfer, too much uncommitted)
        answers."""
        raise NotImplementedError

    @abstractmethod
    def entry_lost_error(self, how: LostHow) -> TidelogError:
        """What the waiter of an entry that will never commit here gets."""
        raise NotImplementedError

    def timeout_error(self, index: int, what: str, timeout_s: float) -> TidelogError:
        """What a waiter gets after its timeout; ``what`` is "committed" or "stored"."""
        return RequestTimedOut(
            f"raft index {index} was appended but not {what} within "
            f"{timeout_s * 1000:.0f} ms; it may still become visible"
        )

    # ---- state ---------------------------------------------------------------------------

    def attach(self, group: RaftGroup, raft: MultiRaft) -> None:
        """Bind to the running group (right after ``MultiRaft.add_group``)."""
        self.group = group
        self._raft = raft
        self._applied_index = group.raw.applied_index

    @property
    def applied_index(self) -> int:
        """The last index :meth:`apply` has seen (or the snapshot installed)."""
        return self._applied_index

    @property
    def is_leader(self) -> bool:
        return self.group is not None and self.group.raw.role == Role.LEADER

    @property
    def synced(self) -> bool:
        """Leader, and everything earlier terms wrote is applied here: the state is the
        group's, so the leader may serve reads and validate commands against it."""
        target = self._sync_index
        return target is not None and self.is_leader and self._applied_index >= target

    def changed(self) -> asyncio.Event:
        """An event set at the next apply, role change or subclass notification. Take it
        before checking the condition you wait for, then wait on it: no wake-up can fall in
        between."""
        return self._changed

    def notify(self) -> None:
        """Wake everyone waiting on :meth:`changed`."""
        event, self._changed = self._changed, asyncio.Event()
        event.set()

    async def sync(self, timeout_s: float) -> None:
        """The sync step: return once this node is the leader and :attr:`synced`; raise
        :meth:`not_leader_error` as soon as it is not the leader, and
        ``timeout_error`` when the earlier terms' entries are not applied in time."""
        try:
            async with asyncio.timeout(timeout_s):
                while not self.synced:
                    if self._stm_error is not None:
                        raise self._stm_error
                    if not self.is_leader:
                        raise self.not_leader_error()
                    await self.changed().wait()
        except TimeoutError:
            raise RequestTimedOut(
                f"this node leads but has not applied the entries of earlier terms (up to "
                f"raft index {self._sync_index}) within {timeout_s * 1000:.0f} ms; retry"
            ) from None

    # ---- proposing -----------------------------------------------------------------------

    def propose_batches(
        self,
        batches: Iterable[BatchSpan],
        *,
        on_proposed: Callable[[int, int, int, int], None] | None = None,
    ) -> Proposed:
        """Propose each batch as one entry, stamped with its base offset, the term and its
        index: all of them or none. Raises :meth:`not_leader_error` off the leader and
        :meth:`dropped_error` when the core refuses (then nothing was proposed, so a client
        retrying the whole request duplicates nothing). Once they are proposed,
        ``on_proposed(i, base_offset, raft_index, term)`` hears of each."""
        if self._stm_error is not None:
            raise self._stm_error
        group, raft = self.group, self._raft
        if group is None or raft is None:
            raise self.not_leader_error()
        raw = group.raw
        if raw.role != Role.LEADER:
            raise self.not_leader_error()
        term = raw.term
        offset = first_offset = next_offset(raw, group.log)
        index = first_index = raw.last_index() + 1
        datas: list[bytes] = []
        placed: list[tuple[int, int]] = []
        for b in batches:
            datas.append(stamped_copy(b.buf, b.pos, b.size, offset, term, index))
            placed.append((offset, index))
            offset += b.record_count
            index += 1
        if not datas:
            raise ValueError("no batches to propose")
        try:
            got = raw.propose_all(datas)
        except NotRaftLeader:
            raise self.not_leader_error() from None
        except ProposalDropped as exc:
            raise self.dropped_error(exc) from None
        assert got == index - 1, f"proposed up to index {got}, stamped up to {index - 1}"
        raft.touch(group)
        if on_proposed is not None:
            for i, (at_offset, at_index) in enumerate(placed):
                on_proposed(i, at_offset, at_index, term)
        return Proposed(first_offset, offset - 1, first_index, index - 1, term)

    # ---- waiting -------------------------------------------------------------------------

    def commit_future(self, index: int, term: int) -> asyncio.Future[R | None]:
        """A future for the entry ``(index, term)`` being committed and applied: its
        :meth:`apply` result, or the error of a lost entry. No timeout; see
        :meth:`wait_committed`."""
        if self._stm_error is not None:
            raise self._stm_error
        return self._commit_waiters.add(index, term).fut

    async def wait_committed(self, index: int, term: int, timeout_s: float) -> R | None:
        """Return (the apply result) once the entry proposed at ``index`` in ``term`` is
        committed and applied here; :meth:`entry_lost_error` if another entry took its
        place; :meth:`timeout_error` after ``timeout_s``."""
        return await self._wait(self._commit_waiters, index, term, timeout_s, "committed")

    async def wait_persisted(self, index: int, term: int, timeout_s: float) -> None:
        """Return once the entry ``(index, term)`` is stored here (fsynced unless flush=os);
        :meth:`entry_lost_error` if an entry of another term was stored at ``index``."""
        await self._wait(self._persist_waiters, index, term, timeout_s, "stored")

    async def _wait(
        self, waiters: TermCheckedWaiters[T], index: int, term: int, timeout_s: float, what: str
    ) -> T | None:
        if self._stm_error is not None:
            raise self._stm_error
        w = waiters.add(index, term)
        try:
            async with asyncio.timeout(timeout_s):
                return await w.fut
        except TimeoutError:
            # Drop it now: a stuck group must not let timed-out waiters pile up.
            waiters.discard(w)
            raise self.timeout_error(index, what, timeout_s) from None

    async def wait_each(
        self, entries: Sequence[tuple[int, int]], timeout_s: float, *, committed: bool
    ) -> tuple[int, TidelogError | None]:
        """Wait for several entries ``(index, term)`` of one request, in the order given:
        committed and applied (``committed``) or stored here. Returns how many of the
        leading entries succeeded, and the error of the first that did not (None when all
        did). All waiters are registered before the first await: one added after its entry
        was settled would never be. :meth:`timeout_error` is raised after ``timeout_s``."""
        if self._stm_error is not None:
            raise self._stm_error
        waiters: TermCheckedWaiters[R] | TermCheckedWaiters[None] = (
            self._commit_waiters if committed else self._persist_waiters
        )
        added = [waiters.add(index, term) for index, term in entries]
        done = 0
        try:
            async with asyncio.timeout(timeout_s):
                for w in added:
                    try:
                        await w.fut
                    except TidelogError as exc:
                        return done, exc
                    done += 1
            return done, None
        except TimeoutError:
            what = "committed" if committed else "stored"
            raise self.timeout_error(added[done].index, what, timeout_s) from None
        finally:
            for w in added[done:]:
                waiters.discard(w)  # type: ignore[arg-type]
                if w.fut.done():
                    if not w.fut.cancelled():
                        w.fut.exception()  # retrieved: the first failure is the answer
                else:
                    w.fut.cancel()

    def fail_waiters(self, error: TidelogError) -> None:
        """Close: every waiter, present and future, and every proposal get ``error``
        (idempotent; the first error wins)."""
        if self._stm_error is None:
            self._stm_error = error
        self._commit_waiters.fail_all(error)
        self._persist_waiters.fail_all(error)
        self.notify()

    # ---- the driver's callbacks (multiraft.GroupHandler) ---------------------------------

    def on_soft_state(self, group: RaftGroup, soft: SoftState) -> None:
        was_leader = self._sync_index is not None
        if soft.role == Role.LEADER:
            if not was_leader:
                # Synced once applied up to its last index as of now (the EMPTY entry it
                # appended, if any): every entry of earlier terms lies at or below it.
                self._sync_index = group.raw.last_index()
        else:
            self._sync_index = None
        self.on_role_change(soft, was_leader)
        self.notify()

    def on_snapshot(self, group: RaftGroup, snapshot: Snapshot) -> None:
        self._applied_index = max(self._applied_index, snapshot.meta.index)
        self.restore_snapshot(snapshot)
        self.notify()

    def on_truncated(self, group: RaftGroup, from_index: int) -> None:
        self.on_log_truncated(from_index)
        err = self.entry_lost_error("overwritten")
        self._commit_waiters.fail_from(from_index, err)
        self._persist_waiters.fail_from(from_index, err)

    def on_persisted(self, group: RaftGroup, last_index: int) -> None:
        # Term-checked: an entry of a later term may have replaced ours in the unstored
        # tail (no truncation of stored entries happened, so on_truncated did not fire).
        self._persist_waiters.resolve_upto(
            last_index, group.storage.stored_term, lambda: self.entry_lost_error("replaced")
        )

    def on_committed(self, group: RaftGroup, entries: tuple[Entry, ...]) -> None:
        try:
            results = self.apply(entries)
        except Exception as exc:
            # The driver takes the group offline and never advances it: nothing after the
            # entry that failed is applied here, and nobody waits for it.
            self.fail_waiters(
                StorageError(
                    f"raft group {group.group_id} stopped: a committed entry could not be "
                    f"applied on this node: {exc}"
                )
            )
            raise
        first, last = entries[0].index, entries[-1].index
        self._applied_index = last
        stored_term = group.storage.stored_term

        def term_at(index: int) -> int | None:
            return entries[index - first].term if index >= first else stored_term(index)

        def result_at(index: int) -> R | None:
            if results is None or index < first:
                return None
            return results[index - first]

        self._commit_waiters.resolve_upto(
            last, term_at, lambda: self.entry_lost_error("replaced"), result_at
        )
        self.on_applied(last)
        self.notify()


__all__ = [
    "BatchSpan",
    "LostHow",
    "Proposed",
    "StateMachine",
    "TermCheckedWaiters",
    "UnappliableEntry",
]
