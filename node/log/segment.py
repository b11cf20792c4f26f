"""One segment of a partition log: a file of record batches laid end to end, plus its sparse
indexes and what the log needs to know about it without reading it (offset and Raft index
range, last term, newest timestamp).

A segment never interprets records. It parses the 73-byte batch headers to find batch
boundaries, and checks CRCs only where bytes may be torn (recovery of the last segment).
Reads go through ``os.pread`` on one file descriptor kept open for the segment's life, so
a read never moves a shared file position and never copies through a Python file object.
"""

from __future__ import annotations

import contextlib
import errno
import os
from array import array
from collections.abc import Iterator
from pathlib import Path

from tidelog import records
from tidelog.errors import CorruptBatch, StorageError
from tidelog.node.io import REAL_FS, FileSystem
from tidelog.records import HEADER_SIZE, MAGIC, BatchHeader

from .index import U32_MAX, OffsetIndex, TimeIndex

LOG_SUFFIX = ".log"
INDEX_SUFFIX = ".index"
TIMEINDEX_SUFFIX = ".timeindex"
#: ``max_timestamp`` of a segment that holds no batch with a timestamp (Kafka's -1).
NO_TIMESTAMP = -1
#: Bytes read at a time while walking headers: several small batches per read, but a scan
#: over large batches switches to header-sized reads (see ``Segment.walk``).
HEADER_SCAN_WINDOW_BYTES = 64 * 1024
#: Bytes read at a time while checking CRCs in recovery (more if one batch is larger).
CRC_SCAN_WINDOW_BYTES = 1024 * 1024
#: Positions are u32 in the offset index; the log rolls before a segment grows past this.
SEGMENT_BYTES_MAX = U32_MAX
#: Relative offsets are u32 in the offset index; the log rolls before this is reached.
RELATIVE_OFFSET_MAX = U32_MAX

_MIN_BATCH_LENGTH = HEADER_SIZE - records.LENGTH_PREFIX_SIZE
# The header layout is records.py's; only the unpacking is done here, because
# records.read_header insists on the whole batch being in the buffer and a header walk reads
# headers alone.
_HEADER = records._HEADER


def segment_stem(base_offset: int) -> str:
    return f"{base_offset:020d}"


class BadBatch(Exception):
    """A batch in a segment file is torn, corrupt or does not continue the log; ``position``
    is where the valid prefix of the file ends."""

    def __init__(self, position: int, reason: str) -> None:
        super().__init__(f"at byte {position}: {reason}")
        self.position = position
        self.reason = reason


def peek_header(buf: bytes, pos: int, file_pos: int) -> BatchHeader:
    """The header at ``buf[pos:]`` when the batch body may not be in ``buf``.

    Checks what a header alone can tell (magic, length, record count); the body is checked
    by CRC where it matters. ``file_pos`` only serves the error message.
    """
    if len(buf) - pos < HEADER_SIZE:
        raise BadBatch(file_pos, f"torn header: {len(buf) - pos} of {HEADER_SIZE} bytes")
    h = BatchHeader._make(_HEADER.unpack_from(buf, pos))
    if h.magic != MAGIC:
        raise BadBatch(file_pos, f"magic {h.magic}, expected {MAGIC}")
    if h.batch_length < _MIN_BATCH_LENGTH:
        raise BadBatch(file_pos, f"batch_length {h.batch_length} is shorter than a header")
    if h.record_count < 1 or h.last_offset_delta != h.record_count - 1:
        raise BadBatch(
            file_pos,
            f"record_count {h.record_count} and last_offset_delta {h.last_offset_delta} "
            "do not agree",
        )
    return h


class Segment:
    """The file and in-memory state of one segment.

    ``first_index``/``last_index`` are the Raft indexes of its first and last batch; an empty
    segment has ``last_index == first_index - 1`` and ``last_term`` is then the term of the
    entry just before it, so the log's "last term" stays answerable after a roll, a
    truncation or a deletion of everything older.

    ``positions`` (file position per Raft index) is built on demand for closed segments: on
    open only the index files, the first header and the tail are read, so a node with many
    large segments starts without reading them all.
    """

    __slots__ = (
        "_last_indexed_pos",
        "base_offset",
        "created_ms",
        "directory",
        "dirty",
        "fd",
        "first_index",
        "fs",
        "index_dirty",
        "index_interval_bytes",
        "last_base_offset",
        "last_index",
        "last_term",
        "max_timestamp",
        "next_offset",
        "offset_index",
        "positions",
        "size",
        "time_index",
    )

    def __init__(
        self,
        directory: Path,
        base_offset: int,
        fd: int,
        *,
        first_index: int,
        prev_term: int,
        index_interval_bytes: int,
        fs: FileSystem = REAL_FS,
    ) -> None:
        self.fs = fs
        self.directory = directory
        self.base_offset = base_offset
        self.fd = fd
        self.index_interval_bytes = index_interval_bytes
        self.offset_index = OffsetIndex()
        self.time_index = TimeIndex()
        self.positions: array[int] | None = array("q")
        #: Data written and not yet fsynced (also set by a truncation).
        self.dirty = False
        #: The index files on disk lag the in-memory indexes.
        self.index_dirty = True
        #: Clock reading at the first append (for segment.ms); None while empty.
        self.created_ms: int | None = None
        self.size = 0
        self.first_index = first_index
        self._reset_to_empty(prev_term)

    def _reset_to_empty(self, prev_term: int) -> None:
        self.size = 0
        self.next_offset = self.base_offset
        self.last_base_offset = self.base_offset
        self.last_index = self.first_index - 1
        self.last_term = prev_term
        self.max_timestamp = NO_TIMESTAMP
        self.offset_index = OffsetIndex()
        self.time_index = TimeIndex()
        self.positions = array("q")
        self._last_indexed_pos = 0
        self.created_ms = None

    # ---- files ---------------------------------------------------------------------------

    @property
    def stem(self) -> str:
        return segment_stem(self.base_offset)

    @property
    def path(self) -> Path:
        return self.directory / (self.stem + LOG_SUFFIX)

    @property
    def index_path(self) -> Path:
        return self.directory / (self.stem + INDEX_SUFFIX)

    @property
    def timeindex_path(self) -> Path:
        return self.directory / (self.stem + TIMEINDEX_SUFFIX)

    @classmethod
    def create(
        cls,
        directory: Path,
        base_offset: int,
        *,
        first_index: int,
        prev_term: int,
        index_interval_bytes: int,
        fs: FileSystem = REAL_FS,
    ) -> Segment:
        """A new empty segment. A file already there under that name lies past the end of
        the log (left by an interrupted deletion), so it is overwritten."""
        path = directory / (segment_stem(base_offset) + LOG_SUFFIX)
        fd = fs.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        seg = cls(
            directory,
            base_offset,
            fd,
            first_index=first_index,
            prev_term=prev_term,
            index_interval_bytes=index_interval_bytes,
            fs=fs,
        )
        for stale in (seg.index_path, seg.timeindex_path):
            fs.unlink(stale)
        return seg

    @classmethod
    def open_existing(
        cls,
        directory: Path,
        base_offset: int,
        index_interval_bytes: int,
        fs: FileSystem = REAL_FS,
    ) -> Segment:
        """The segment file as found; its state stays empty until ``load_closed`` or
        ``recover`` reads it."""
        path = directory / (segment_stem(base_offset) + LOG_SUFFIX)
        fd = fs.open(path, os.O_RDWR | os.O_CLOEXEC)
        return cls(
            directory,
            base_offset,
            fd,
            first_index=1,
            prev_term=0,
            index_interval_bytes=index_interval_bytes,
            fs=fs,
        )

    def file_size(self) -> int:
        return self.fs.file_size(self.fd)

    def write_indexes(self) -> None:
        """Write both index files whole. They are caches checked on open, so they are not
        fsynced and a torn write only costs a rebuild."""
        for path, data in (
            (self.index_path, self.offset_index.to_bytes()),
            (self.timeindex_path, self.time_index.to_bytes()),
        ):
            fs = self.fs
            fd = fs.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
            try:
                view = memoryview(data)
                while view:
                    view = view[fs.write(fd, view) :]
            finally:
                fs.close(fd)
        self.index_dirty = False

    def close(self) -> None:
        if self.fd >= 0:
            self.fs.close(self.fd)
            self.fd = -1

    def unlink(self) -> None:
        """Remove the files, the data file first: an index without data is recognized as
        stray on open, data without an index is merely re-indexed."""
        self.close()
        for path in (self.path, self.index_path, self.timeindex_path):
            self.fs.unlink(path)

    # ---- appending -----------------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Append ``data`` at the end with ``pwrite``. On failure (disk full, I/O error) the
        file is cut back to its previous size, so a failed append leaves no partial batch for
        a later append to land after."""
        view = memoryview(data)
        at = self.size
        try:
            while view:
                n = self.fs.pwrite(self.fd, view, at)
                if n == 0:
                    raise OSError(errno.EIO, "pwrite wrote 0 bytes")
                at += n
                view = view[n:]
        except OSError as exc:
            with contextlib.suppress(OSError):
                self.fs.ftruncate(self.fd, self.size)
            raise StorageError(
                f"cannot append {len(data)} bytes to {self.path}: {exc.strerror or exc}"
            ) from exc

    def track(
        self,
        pos: int,
        size: int,
        base_offset: int,
        last_offset: int,
        raft_index: int,
        raft_term: int,
        max_timestamp: int,
    ) -> None:
        """Account for a batch now stored at ``pos``: indexes, positions and end state."""
        assert pos == self.size, (pos, self.size)
        assert base_offset == self.next_offset, (base_offset, self.next_offset)
        assert raft_index == self.last_index + 1, (raft_index, self.last_index)
        if max_timestamp > self.max_timestamp:
            self.max_timestamp = max_timestamp
        if pos > 0 and pos - self._last_indexed_pos >= self.index_interval_bytes:
            rel = base_offset - self.base_offset
            self.offset_index.append(rel, pos)
            self._last_indexed_pos = pos
            if self.max_timestamp > self.time_index.last_timestamp(NO_TIMESTAMP):
                self.time_index.append(self.max_timestamp, rel)
        if self.positions is not None:
            self.positions.append(pos)
        self.size = pos + size
        self.next_offset = last_offset + 1
        self.last_base_offset = base_offset
        self.last_index = raft_index
        self.last_term = raft_term
        self.index_dirty = True

    def seal(self) -> None:
        """Close the segment for appends: a last time index entry records its newest
        timestamp, which retention and timestamp lookups read without a scan."""
        if self.size and self.max_timestamp > self.time_index.last_timestamp(NO_TIMESTAMP):
            self.time_index.append(self.max_timestamp, self.last_base_offset - self.base_offset)
            self.index_dirty = True

    # ---- reading -------------------------------------------------------------------------

    def pread(self, n: int, pos: int) -> bytes:
        data = self.fs.pread(self.fd, n, pos)
        if len(data) != n:
            raise StorageError(
                f"short read of {self.path}: {len(data)} of {n} bytes at {pos} "
                "(was the file truncated behind the log's back?)"
            )
        return data

    def header_at(self, pos: int) -> BatchHeader:
        return peek_header(self.fs.pread(self.fd, HEADER_SIZE, pos), 0, pos)

    def walk(
        self, start: int, end: int, *, bodies: bool = False, window: int | None = None
    ) -> Iterator[tuple[int, BatchHeader, bytes, int]]:
        """``(position, header, buffer, offset in buffer)`` for each batch in ``[start, end)``.

        With ``bodies`` the buffer holds the whole batch (for CRC checks); otherwise only its
        header is guaranteed. Raises ``BadBatch`` at a header that does not parse or a batch
        that runs past ``end``.
        """
        buf = b""
        buf_at = 0
        last_size = 0
        if window is None:
            window = CRC_SCAN_WINDOW_BYTES if bodies else HEADER_SCAN_WINDOW_BYTES
        pos = start
        while pos < end:
            off = pos - buf_at
            if off < 0 or off + HEADER_SIZE > len(buf):
                # Reading a window to use only one header of a large batch is wasted copying.
                n = HEADER_SIZE if (not bodies and last_size * 4 > window) else window
                buf = self.fs.pread(self.fd, min(max(n, HEADER_SIZE), end - pos), pos)
                buf_at, off = pos, 0
            h = peek_header(buf, off, pos)
            if pos + h.size > end:
                raise BadBatch(
                    pos, f"torn batch: header says {h.size} bytes, {end - pos} are present"
                )
            if bodies and off + h.size > len(buf):
                buf = self.fs.pread(self.fd, min(max(window, h.size), end - pos), pos)
                buf_at, off = pos, 0
            yield pos, h, buf, off
            last_size = h.size
            pos += h.size

    def find(self, offset: int) -> tuple[int, BatchHeader]:
        """Position and header of the batch holding ``offset`` (which must be stored here)."""
        assert self.base_offset <= offset < self.next_offset, (offset, self.base_offset)
        rel, pos = self.offset_index.floor(offset - self.base_offset)
        # The batch lies within about one index interval of the entry.
        window = min(HEADER_SCAN_WINDOW_BYTES, self.index_interval_bytes + 2 * HEADER_SIZE)
        for attempt in range(2):
            try:
                for p, h, _buf, _off in self.walk(pos, self.size, window=window):
                    if attempt == 0 and p == pos and h.base_offset != self.base_offset + rel:
                        raise BadBatch(p, f"index says offset {self.base_offset + rel}")
                    if h.last_offset >= offset:
                        return p, h
            except BadBatch:
                if attempt:
                    raise
            # The index does not match the file: rebuild it from the headers and retry.
            self.rebuild()
            rel, pos = self.offset_index.floor(offset - self.base_offset)
        raise StorageError(f"offset {offset} not found in {self.path} below byte {self.size}")

    def ensure_positions(self) -> array[int]:
        """File position of each batch, by Raft index minus ``first_index``."""
        if self.positions is None:
            positions: array[int] = array("q")
            for p, _h, _buf, _off in self.walk(0, self.size):
                positions.append(p)
            if len(positions) != self.last_index - self.first_index + 1:
                raise StorageError(
                    f"{self.path} holds {len(positions)} batches, expected Raft indexes "
                    f"{self.first_index}..{self.last_index}"
                )
            self.positions = positions
        return self.positions

    # ---- opening and recovery ------------------------------------------------------------

    def recover(
        self, *, verify_crc: bool, expect_index: int | None, min_term: int, prev_term: int
    ) -> BadBatch | None:
        """Rebuild all in-memory state by walking the file from the start, stopping at the
        first batch that is torn, fails its CRC (with ``verify_crc``) or does not continue the
        log (offset, Raft index, term). Returns what stopped the walk, or None; the state
        covers exactly the batches before it and the file is cut there by the caller.

        ``expect_index`` is the Raft index the first batch must carry (None: take it from the
        file). ``prev_term`` is what ``last_term`` reads while the segment is empty.
        """
        self.first_index = expect_index if expect_index is not None else 1
        self._reset_to_empty(prev_term)
        file_size = self.file_size()
        expect_offset = self.base_offset
        want_index = expect_index
        term_floor = min_term
        try:
            for pos, h, buf, off in self.walk(0, file_size, bodies=verify_crc):
                if h.base_offset != expect_offset:
                    raise BadBatch(pos, f"base_offset {h.base_offset}, expected {expect_offset}")
                if want_index is not None and h.raft_index != want_index:
                    raise BadBatch(pos, f"raft_index {h.raft_index}, expected {want_index}")
                if h.raft_index < 1:
                    raise BadBatch(pos, f"raft_index {h.raft_index} is below 1")
                if h.raft_term < term_floor:
                    raise BadBatch(pos, f"raft_term {h.raft_term} is below {term_floor}")
                if verify_crc:
                    try:
                        records.validate_batch(buf, off, check_records=False)
                    except CorruptBatch as exc:
                        raise BadBatch(pos, str(exc)) from None
                if pos == 0:
                    self.first_index = h.raft_index
                    self.last_index = h.raft_index - 1
                self.track(
                    pos,
                    h.size,
                    h.base_offset,
                    h.last_offset,
                    h.raft_index,
                    h.raft_term,
                    h.max_timestamp,
                )
                expect_offset = h.last_offset + 1
                want_index = h.raft_index + 1
                term_floor = h.raft_term
        except BadBatch as bad:
            return bad
        return None

    def rebuild(self) -> None:
        """Re-derive the indexes of a segment whose index did not match its file (its data
        was checked when it was opened)."""
        created = self.created_ms
        bad = self.recover(verify_crc=False, expect_index=self.first_index, min_term=0, prev_term=0)
        self.created_ms = created
        if bad is not None:
            raise StorageError(f"{self.path} changed on disk: {bad}")

    def load_closed(self, expect_index: int | None, min_term: int) -> str | None:
        """Open a closed segment from its index files, reading only its first header and
        the batches after the last index entry. Returns None on success, or why the files
        cannot be trusted (the caller then calls ``recover``)."""
        file_size = self.file_size()
        if file_size == 0:
            return "empty closed segment"
        try:
            offsets = OffsetIndex.from_bytes(self.fs.read_bytes(self.index_path), file_size)
            times = TimeIndex.from_bytes(self.fs.read_bytes(self.timeindex_path))
        except FileNotFoundError as exc:
            return f"missing {Path(exc.filename).name}"
        if offsets is None or times is None:
            return "index file has a torn length or entries out of order"
        try:
            first = self.header_at(0)
            if first.base_offset != self.base_offset:
                return f"first batch has base_offset {first.base_offset}"
            if expect_index is not None and first.raft_index != expect_index:
                return f"first batch has raft_index {first.raft_index}, expected {expect_index}"
            if first.raft_term < min_term:
                return f"first batch has raft_term {first.raft_term} below {min_term}"
            rel, start = offsets.last()
            tail_max_ts = NO_TIMESTAMP
            last: BatchHeader | None = None
            for pos, h, _buf, _off in self.walk(start, file_size):
                if last is None:
                    if h.base_offset != self.base_offset + rel:
                        return f"last index entry names offset {self.base_offset + rel}"
                else:
                    if h.base_offset != last.last_offset + 1 or h.raft_index != last.raft_index + 1:
                        return f"batch at byte {pos} does not continue the one before"
                    if h.raft_term < last.raft_term:
                        return f"batch at byte {pos} goes back in term"
                    if pos - start >= self.index_interval_bytes:
                        return "offset index ends early"
                tail_max_ts = max(tail_max_ts, h.max_timestamp)
                last = h
        except BadBatch as bad:
            return str(bad)
        assert last is not None
        if tail_max_ts > times.last_timestamp(NO_TIMESTAMP):
            return "time index ends early"
        if times.rel_offsets and times.rel_offsets[-1] > last.base_offset - self.base_offset:
            return "time index points past the last batch"
        self.offset_index = offsets
        self.time_index = times
        self.positions = None
        self._last_indexed_pos = start
        self.first_index = first.raft_index
        self.size = file_size
        self.next_offset = last.last_offset + 1
        self.last_base_offset = last.base_offset
        self.last_index = last.raft_index
        self.last_term = last.raft_term
        self.max_timestamp = times.last_timestamp(NO_TIMESTAMP)
        self.index_dirty = False
        return None

    # ---- truncation ----------------------------------------------------------------------

    def cut_file(self, pos: int) -> None:
        """Cut the file at ``pos`` (state must already describe only what lies before)."""
        self.fs.ftruncate(self.fd, pos)
        self.dirty = True
        self.index_dirty = True

    def truncate(self, pos: int, at: BatchHeader, prev_term: int) -> None:
        """Drop the batch ``at`` (stored at ``pos``) and every batch after it.

        ``prev_term`` is the term of the entry before this segment, for when nothing is
        left. The newest remaining timestamp is the last surviving time index entry combined
        with the headers after the last surviving offset index entry.
        """
        assert at.base_offset >= self.base_offset and pos < self.size
        if pos == 0:
            self._reset_to_empty(prev_term)
            self.cut_file(0)
            return
        rel = at.base_offset - self.base_offset
        if self.positions is not None:
            del self.positions[at.raft_index - self.first_index :]
        self.offset_index.truncate_from(rel)
        self.time_index.truncate_from(rel)
        _rel, start = self.offset_index.last()
        max_ts = self.time_index.last_timestamp(NO_TIMESTAMP)
        last: BatchHeader | None = None
        for _pos, h, _buf, _off in self.walk(start, pos):
            max_ts = max(max_ts, h.max_timestamp)
            last = h
        assert last is not None
        self._last_indexed_pos = start
        self.max_timestamp = max_ts
        self.size = pos
        self.next_offset = last.last_offset + 1
        self.last_base_offset = last.base_offset
        self.last_index = last.raft_index
        self.last_term = last.raft_term
        self.cut_file(pos)
