"""Partition log: flush, close and reopen, configuration, deletion."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from tests.unit.log_support import (
    SEGMENT_BYTES_MIN,
    Clock,
    batch,
    config,
    fill,
    headers,
    open_log,
    read_all,
)
from tidelog.errors import StorageError
from tidelog.node.log import PartitionLog


def _count_syncs(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    counts = {"fdatasync": 0, "fsync": 0}
    real_fdatasync, real_fsync = os.fdatasync, os.fsync

    def fdatasync(fd: int) -> None:
        counts["fdatasync"] += 1
        real_fdatasync(fd)

    def fsync(fd: int) -> None:
        counts["fsync"] += 1
        real_fsync(fd)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    monkeypatch.setattr(os, "fsync", fsync)
    return counts


def test_flush_advances_flushed_offset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = open_log(tmp_path, segment_bytes=SEGMENT_BYTES_MIN)
    assert log.flushed_offset == 0
    counts = _count_syncs(monkeypatch)
    fill(log, 5)
    assert log.flushed_offset == 0 and log.log_end_offset == 10
    assert log.flush() == 10 == log.flushed_offset
    assert counts == {"fdatasync": 1, "fsync": 0}
    assert log.flush() == 10
    assert counts == {"fdatasync": 1, "fsync": 0}  # nothing new: no fsync
    fill(log, 30)  # rolls: the old and new segments and the directory need syncing
    assert log.segment_count > 1
    assert log.flush() == log.log_end_offset
    assert counts["fdatasync"] >= 2 and counts["fsync"] == 1
    log.truncate_suffix(40)
    assert log.flushed_offset == 40
    assert log.flush() == 40
    log.close()


def test_flush_from_a_worker_thread_while_appending(tmp_path: Path) -> None:
    clock = Clock()
    log = open_log(tmp_path, clock, segment_bytes=SEGMENT_BYTES_MIN, retention_bytes=8 * 4096)
    stop = threading.Event()
    seen: list[tuple[int, int]] = []
    errors: list[BaseException] = []

    def flusher() -> None:
        try:
            while not stop.is_set():
                flushed = log.flush()
                seen.append((flushed, log.log_end_offset))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    worker = threading.Thread(target=flusher)
    worker.start()
    try:
        for i in range(400):
            log.append(batch(2, tag=i), 1)
            if i % 50 == 49:
                log.enforce_retention()
            if i == 300:
                log.truncate_suffix(log.log_end_offset - 20)
    finally:
        stop.set()
        worker.join(timeout=30)
    assert not errors
    assert seen and all(flushed <= end + 20 for flushed, end in seen)  # a cut lowers the end by 20
    assert log.flush() == log.log_end_offset
    log.close()


def test_reopen_gives_the_same_state(tmp_path: Path) -> None:
    clock = Clock()

    def state(log: PartitionLog) -> tuple[object, ...]:
        return (
            log.log_start_offset,
            log.log_end_offset,
            log.first_index,
            log.last_index,
            log.last_term,
            log.segment_base_offsets,
            log.size_bytes,
            log.flushed_offset,
            headers(log),
            read_all(log),
            [log.offset_for_timestamp(t) for t in range(990, 1100, 7)],
        )

    log = open_log(tmp_path, clock, segment_bytes=SEGMENT_BYTES_MIN, retention_bytes=5 * 4096)
    for term in (1, 2, 3):
        fill(log, 30, term=term, ts0=1000 + 30 * term)
    log.enforce_retention()
    log.flush()
    before = state(log)
    log.close()
    with pytest.raises(StorageError, match="closed"):
        log.read(0, 1)
    log.close()  # twice is fine
    log = open_log(tmp_path, clock, segment_bytes=SEGMENT_BYTES_MIN, retention_bytes=5 * 4096)
    assert state(log) == before
    log.close()


def test_update_config_takes_effect(tmp_path: Path) -> None:
    log = open_log(tmp_path)
    fill(log, 30)
    assert log.segment_count == 1
    log.update_config(config(segment_bytes=SEGMENT_BYTES_MIN))
    fill(log, 30)
    assert log.segment_count > 2
    assert log.config.segment_bytes == SEGMENT_BYTES_MIN
    log.close()


def test_delete_removes_the_directory(tmp_path: Path) -> None:
    directory = tmp_path / "topic-0"
    log = open_log(directory)
    fill(log, 3)
    log.delete()
    assert not directory.exists()
