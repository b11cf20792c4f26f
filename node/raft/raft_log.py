"""The core's view of the log: the durable part in Storage plus the unstable tail.

Entries the core appended (as leader, or received as follower) are "unstable" until the
driver has persisted them from a Ready and called ``advance``; likewise a snapshot received
from the leader. ``RaftLog`` merges both views and tracks the commit and applied indexes, so
the core can answer log questions without ever writing to storage itself.
"""

from __future__ import annotations

from .errors import CompactedError, UnavailableError
from .storage import StorageReader
from .types import Entry, EntryKind, Snapshot

#: Bytes read per step when the log is scanned for CONFIG entries at start-up.
_SCAN_BYTES = 4 << 20


class Unstable:
    """Entries (and possibly a snapshot) not yet handed to or confirmed by storage.
    ``entries[i]`` has index ``offset + i``."""

    __slots__ = ("entries", "offset", "snapshot")

    def __init__(self, offset: int) -> None:
        self.snapshot: Snapshot | None = None
        self.entries: list[Entry] = []
        self.offset = offset

    def maybe_first_index(self) -> int | None:
        if self.snapshot is not None:
            return self.snapshot.meta.index + 1
        return None

    def maybe_last_index(self) -> int | None:
        if self.entries:
            return self.offset + len(self.entries) - 1
        if self.snapshot is not None:
            return self.snapshot.meta.index
        return None

    def maybe_term(self, index: int) -> int | None:
        if index < self.offset:
            snap = self.snapshot
            if snap is not None and snap.meta.index == index:
                return snap.meta.term
            return None
        pos = index - self.offset
        if pos < len(self.entries):
            return self.entries[pos].term
        return None

    def stable_to(self, index: int, term: int) -> None:
        """Entries up to ``index`` are durable, if the one at ``index`` is still ``term``
        (it may have been replaced by a newer leader's entry since the Ready was taken)."""
        t = self.maybe_term(index)
        if t is None or t != term or index < self.offset:
            return
        del self.entries[: index + 1 - self.offset]
        self.offset = index + 1

    def stable_snap_to(self, index: int) -> None:
        if self.snapshot is not None and self.snapshot.meta.index == index:
            self.snapshot = None

    def restore(self, snapshot: Snapshot) -> None:
        self.offset = snapshot.meta.index + 1
        self.entries = []
        self.snapshot = snapshot

    def truncate_and_append(self, entries: list[Entry] | tuple[Entry, ...]) -> None:
        after = entries[0].index
        if after == self.offset + len(self.entries):
            self.entries.extend(entries)
        elif after <= self.offset:
            # Replaces everything unstable; storage truncates its own suffix on append.
            self.offset = after
            self.entries = list(entries)
        else:
            del self.entries[after - self.offset :]
            self.entries.extend(entries)


class RaftLog:
    __slots__ = ("applied", "committed", "confs", "storage", "unstable")

    def __init__(self, storage: StorageReader, applied: int = 0) -> None:
        self.storage = storage
        first = storage.first_index()
        last = storage.last_index()
        self.unstable = Unstable(last + 1)
        hs = storage.hard_state()
        assert hs.commit <= last, (
            f"stored commit {hs.commit} beyond last index {last}: the log lost synced entries"
        )
        assert applied <= last, (
            f"applied {applied} beyond last index {last}: the log lost synced entries"
        )
        # The compaction point is committed by construction (only applied entries compact),
        # and so is whatever the application applied: a commit-only hard state is not synced
        # (``Ready.must_sync``), so the stored commit may lag the applied index after a crash.
        self.committed = max(hs.commit, first - 1, applied)
        self.applied = max(applied, first - 1)
        #: The CONFIG entries of the log after ``storage.conf_index()`` not yet in force, in
        #: index order: the core takes each into force once it is committed. With one change
        #: in flight there is at most one uncommitted (see core.py).
        self.confs: list[Entry] = []
        lo = max(first, storage.conf_index() + 1)
        while lo <= last:
            chunk = storage.entries(lo, last + 1, _SCAN_BYTES)
            self.confs.extend(e for e in chunk if e.kind == EntryKind.CONFIG)
            lo = chunk[-1].index + 1

    def __repr__(self) -> str:
        return (
            f"RaftLog(committed={self.committed} applied={self.applied} "
            f"unstable.offset={self.unstable.offset} unstable.len={len(self.unstable.entries)})"
        )

    # ---- boundaries and terms -----------------------------------------------------------

    def first_index(self) -> int:
        i = self.unstable.maybe_first_index()
        return i if i is not None else self.storage.first_index()

    def last_index(self) -> int:
        i = self.unstable.maybe_last_index()
        return i if i is not None else self.storage.last_index()

    def term(self, index: int) -> int:
        """Term at ``index``; raises CompactedError / UnavailableError outside the log."""
        t = self.unstable.maybe_term(index)
        if t is not None:
            return t
        dummy = self.first_index() - 1
        if index < dummy:
            raise CompactedError(index, dummy + 1)
        if index > self.last_index():
            raise UnavailableError(index, self.last_index())
        return self.storage.term(index)

    def term_or_none(self, index: int) -> int | None:
        try:
            return self.term(index)
        except (CompactedError, UnavailableError):
            return None

    def last_term(self) -> int:
        return self.term(self.last_index())

    def match_term(self, index: int, term: int) -> bool:
        return self.term_or_none(index) == term

    def is_up_to_date(self, last_index: int, term: int) -> bool:
        """Whether a log ending at (``last_index``, ``term``) is at least as up to date as
        ours (§5.4.1): a later last term wins, equal terms compare length."""
        our_term = self.last_term()
        return term > our_term or (term == our_term and last_index >= self.last_index())

    # ---- appending ----------------------------------------------------------------------

    def append(self, entries: list[Entry] | tuple[Entry, ...]) -> int:
        if not entries:
            return self.last_index()
        after = entries[0].index - 1
        assert after >= self.committed, f"append after {after} would rewrite committed entries"
        confs = self.confs
        while confs and confs[-1].index > after:
            confs.pop()  # truncated: the configuration before it stays in force
        confs.extend(e for e in entries if e.kind == EntryKind.CONFIG)
        self.unstable.truncate_and_append(entries)
        return self.last_index()

    def maybe_append(
        self, index: int, log_term: int, committed: int, entries: tuple[Entry, ...]
    ) -> int | None:
        """A follower appends the leader's ``entries`` that follow (``index``, ``log_term``).
        Returns the last index the leader's message proves matching, or None on mismatch."""
        if not self.match_term(index, log_term):
            return None
        last_new = index + len(entries)
        conflict = self.find_conflict(entries)
        if conflict:
            assert conflict > self.committed, (
                f"entry {conflict} conflicts with the committed log (commit {self.committed})"
            )
            self.append(entries[conflict - index - 1 :])
        self.commit_to(min(committed, last_new))
        return last_new

    def find_conflict(self, entries: tuple[Entry, ...]) -> int:
        """Index of the first entry that is new or differs from ours, or 0 if all match."""
        for e in entries:
            if not self.match_term(e.index, e.term):
                return e.index
        return 0

    def find_conflict_by_term(self, index: int, term: int) -> tuple[int, int]:
        """The largest index ``<= index`` whose term is ``<= term``, with that term.

        Used on both sides of a rejection: the follower answers with the last entry that could
        still match the leader's term, and the leader skips its own log back to the last entry
        of a term the follower may hold; either way whole terms are skipped at once."""
        last = self.last_index()
        if index > last:
            return index, 0
        while True:
            t = self.term_or_none(index)
            if t is None:  # compacted: cannot look further back
                return index, 0
            if t <= term:
                return index, t
            index -= 1

    # ---- reading ------------------------------------------------------------------------

    def entries(self, lo: int, max_bytes: int) -> list[Entry]:
        """Entries from ``lo`` to the end, within ``max_bytes`` (at least one if any).
        Raises CompactedError if ``lo`` was compacted."""
        last = self.last_index()
        if lo > last:
            return []
        return self.slice(lo, last + 1, max_bytes)

    def slice(self, lo: int, hi: int, max_bytes: int) -> list[Entry]:
        """Entries ``[lo, hi)`` within ``max_bytes`` (at least one if the range is not empty)."""
        first = self.first_index()
        if lo < first:
            raise CompactedError(lo, first)
        assert hi <= self.last_index() + 1, f"slice [{lo}, {hi}) beyond the log"
        if lo >= hi:
            return []
        offset = self.unstable.offset
        out: list[Entry] = []
        if lo < offset:
            stable_hi = min(hi, offset)
            out = self.storage.entries(lo, stable_hi, max_bytes)
            if len(out) < stable_hi - lo:
                return out  # the byte limit cut it short
            if hi <= offset:
                return out
        used = sum(e.size_bytes for e in out)
        start = max(lo, offset) - offset
        for e in self.unstable.entries[start : hi - offset]:
            used += e.size_bytes
            if out and used > max_bytes:
                break
            out.append(e)
        return out

    def snapshot(self) -> Snapshot:
        """The snapshot to send to a follower that needs compacted entries."""
        if self.unstable.snapshot is not None:
            return self.unstable.snapshot
        return self.storage.snapshot()

    # ---- commit and apply ---------------------------------------------------------------

    def commit_to(self, index: int) -> None:
        if index > self.committed:
            assert index <= self.last_index(), (
                f"commit {index} beyond last index {self.last_index()} (log lost or corrupt?)"
            )
            self.committed = index

    def maybe_commit(self, index: int, term: int) -> bool:
        """Leader: commit up to ``index`` if it is from the current ``term`` (§5.4.2: entries
        of earlier terms are committed only indirectly)."""
        if index > self.committed and self.term_or_none(index) == term:
            self.commit_to(index)
            return True
        return False

    def has_next_committed(self) -> bool:
        return self.committed > max(self.applied, self.first_index() - 1)

    def next_committed(self, max_bytes: int) -> list[Entry]:
        lo = max(self.applied + 1, self.first_index())
        hi = self.committed + 1
        if lo >= hi:
            return []
        return self.slice(lo, hi, max_bytes)

    def applied_to(self, index: int) -> None:
        assert index <= self.committed, f"applied {index} beyond commit {self.committed}"
        if index > self.applied:
            self.applied = index

    # ---- snapshots and stability --------------------------------------------------------

    def restore(self, snapshot: Snapshot) -> None:
        self.committed = snapshot.meta.index
        self.confs = []  # the snapshot's configuration replaces them
        self.unstable.restore(snapshot)

    def stable_to(self, index: int, term: int) -> None:
        self.unstable.stable_to(index, term)

    def stable_snap_to(self, index: int) -> None:
        self.unstable.stable_snap_to(index)
