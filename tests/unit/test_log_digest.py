"""The LogDigest a node answers (``topics.digest_log``): a CRC-32C of a replica's stored
batches from its log start, read on the event loop while the log may change between chunks
(the integration tests compare replicas with it while one installs a catch-up copy)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import crc32c
import pytest

from tests.unit.log_support import SEGMENT_BYTES_MIN, fill, open_log
from tidelog.node.log import PartitionLog
from tidelog.node.topics import digest_log
from tidelog.records import iter_headers


def _expected(log: PartitionLog, start: int, end: int) -> tuple[int, int]:
    """CRC-32C of the whole batches from ``start`` below ``end``, and where they end."""
    crc, offset = 0, start
    while offset < end:
        data = log.read(offset, 1 << 30, upto=end)
        if not data:
            break
        crc = crc32c.crc32c(data, crc)
        for _pos, h in iter_headers(data):
            offset = h.last_offset + 1
    return crc, offset


@pytest.mark.timeout(10)
async def test_the_digest_covers_the_batches_from_the_log_start(tmp_path: Path) -> None:
    log = open_log(tmp_path, segment_bytes=SEGMENT_BYTES_MIN)
    fill(log, 120)
    assert log.segment_count > 3  # several chunks, one event-loop turn each
    end = log.log_end_offset - 3  # inside a batch: the digest stops before it
    crc, covered = _expected(log, 0, end)
    assert await digest_log(log, end) == (0, crc, covered)
    assert covered < end
    log.close()


@pytest.mark.timeout(10)
async def test_a_log_start_moved_between_two_chunks_restarts_the_digest(
    tmp_path: Path,
) -> None:
    """Retention (or a catch-up copy adopted) moves the log start while the digest reads:
    it begins again from the new start instead of failing the RPC."""
    log = open_log(tmp_path, segment_bytes=SEGMENT_BYTES_MIN)
    fill(log, 120)
    end = log.log_end_offset
    task = asyncio.create_task(digest_log(log, end))
    await asyncio.sleep(0)  # the digest read its first chunk (the first segment) and yielded
    new_start = log.segment_base_offsets[3]
    assert log.advance_start(new_start) == 3
    crc, covered = _expected(log, new_start, end)
    assert await task == (new_start, crc, covered)
    assert covered == end
    log.close()
