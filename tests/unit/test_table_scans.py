"""The scan snapshots a node keeps (node/table_service.py ScanSnapshots): bounded in number
(least recently used closed first), closed after the idle time, and closed when their
partition stops being served; a page asking for a gone snapshot is SCAN_EXPIRED."""

from __future__ import annotations

import time
from typing import Any, cast

import grpc
import pytest

from tidelog.errors import ScanExpired
from tidelog.node.partition import Partition
from tidelog.node.table_service import ScanSnapshots, is_compacted, key_bytes_max


class FakeSnapshot:
    def __init__(self) -> None:
        self.closed = False
        self.applied_offset = 0

    def close(self) -> None:
        self.closed = True


class FakePartition:
    topic = "t"
    index = 0

    def __init__(self) -> None:
        self.closed = False
        self.serving = True


def _part() -> Partition:
    return cast(Partition, FakePartition())


def _snap() -> Any:
    return FakeSnapshot()


def test_a_scan_gets_its_snapshot_back_until_done() -> None:
    scans = ScanSnapshots(max_open=4, idle_s=60)
    part = _part()
    snap = _snap()
    sid = scans.add(part, snap)
    assert id(scans.get(sid, part)) == id(snap)
    scans.done(sid)
    assert snap.closed
    with pytest.raises(ScanExpired, match="scan expired, restart") as info:
        scans.get(sid, part)
    assert info.value.code == grpc.StatusCode.ABORTED


def test_the_least_recently_used_snapshot_is_closed_beyond_the_bound() -> None:
    scans = ScanSnapshots(max_open=2, idle_s=60)
    part = _part()
    a, b, c = _snap(), _snap(), _snap()
    sa = scans.add(part, a)
    sb = scans.add(part, b)
    scans.get(sa, part)  # a is used again: b is now the least recently used
    scans.add(part, c)
    assert len(scans) == 2
    assert b.closed and not a.closed and not c.closed
    with pytest.raises(ScanExpired):
        scans.get(sb, part)


def test_an_idle_snapshot_expires() -> None:
    scans = ScanSnapshots(max_open=4, idle_s=0.05)
    part = _part()
    snap = _snap()
    sid = scans.add(part, snap)
    time.sleep(0.1)
    with pytest.raises(ScanExpired):
        scans.get(sid, part)
    assert snap.closed


def test_a_snapshot_of_a_partition_no_longer_served_is_closed() -> None:
    scans = ScanSnapshots(max_open=4, idle_s=60)
    fake = FakePartition()
    part = cast(Partition, fake)
    snap = _snap()
    sid = scans.add(part, snap)
    fake.serving = False  # lost leadership
    scans.sweep()
    assert snap.closed
    with pytest.raises(ScanExpired):
        scans.get(sid, part)


def test_a_token_of_another_partition_object_is_expired() -> None:
    """A topic deleted and created again: the old scan's snapshot is not the new one's."""
    scans = ScanSnapshots(max_open=4, idle_s=60)
    old, new = _part(), _part()
    sid = scans.add(old, _snap())
    with pytest.raises(ScanExpired):
        scans.get(sid, new)


def test_close_closes_every_snapshot() -> None:
    scans = ScanSnapshots(max_open=4, idle_s=60)
    snaps = [_snap() for _ in range(3)]
    for s in snaps:
        scans.add(_part(), s)
    scans.close()
    assert all(s.closed for s in snaps) and len(scans) == 0


def test_policies_and_key_limit() -> None:
    assert is_compacted("compact") and is_compacted("compact,delete")
    assert is_compacted("delete, compact")
    assert not is_compacted("delete")
    assert key_bytes_max(4096) == 4096
    assert key_bytes_max(64 * 1024 * 1024) == 1024 * 1024


def test_tidelog_exports_the_table_client_lazily() -> None:
    """``from tidelog import Table`` works; ``import tidelog`` alone loads no client."""
    import subprocess
    import sys

    code = (
        "import sys, tidelog\n"
        "assert 'tidelog.client' not in sys.modules\n"
        "from tidelog import Row, SyncTable, Table, TableChange, TableContents\n"
        "import tidelog.client as c\n"
        "assert Table is c.Table and SyncTable is c.SyncTable and Row is c.Row\n"
        "try:\n"
        "    tidelog.Nope\n"
        "except AttributeError:\n"
        "    pass\n"
        "else:\n"
        "    raise SystemExit('no AttributeError')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr.decode()


def test_table_reads_are_a_client_right() -> None:
    from tidelog.node.auth import Principal, Resource, authorize

    client = Principal("reader", frozenset({"client"}))
    nobody = Principal("nobody", frozenset())
    for op in ("TableGet", "TableGetMany", "TableScan", "TableWatch"):
        assert authorize(client, op, Resource.topic("rates")) is None
        assert authorize(nobody, op, Resource.topic("rates")) is not None
