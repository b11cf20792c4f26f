"""The compacted partition's table (node/table.py) over a real partition log and RocksDB:
bulk apply, tombstones, reads and snapshots, recovery, rebuilds after damage, pruning."""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.unit.log_support import open_log
from tidelog.errors import StorageError
from tidelog.node.log import PartitionLog
from tidelog.node.metastore import MetaStore
from tidelog.node.stm import UnappliableEntry
from tidelog.node.table import (
    ROW_CACHE_OVERHEAD_BYTES,
    TABLES_COLUMN,
    PartitionTable,
    RowCacheBudget,
    TableRow,
    drop_tables_except,
)
from tidelog.records import encode_batch

Op = tuple[bytes | None, bytes | None]  # (key, value); value None: tombstone


def kv_batch(ops: list[Op], ts: int = 1_000) -> bytes:
    return encode_batch([v for _k, v in ops], keys=[k for k, _v in ops], timestamps_ms=ts)


def append(lg: PartitionLog, ops: list[Op], ts: int = 1_000) -> bytes:
    """Append one batch as the next Raft entry; its stored (stamped) bytes."""
    lg.append(kv_batch(ops, ts), 1)
    return lg.entries_by_index(lg.last_index, lg.last_index + 1, 1 << 30)[0]


def replay_model(lg: PartitionLog, upto: int) -> dict[bytes, tuple[int, bytes]]:
    """The last (offset, value) per key of the log's data records below ``upto``."""
    from tidelog.records import decode_batches

    out: dict[bytes, tuple[int, bytes]] = {}
    offset = lg.log_start_offset
    while offset < upto:
        data = lg.read(offset, 1 << 20, upto=upto)
        recs = [r for r in decode_batches(data, min_offset=offset) if r.offset < upto]
        if not recs:
            break
        for r in recs:
            if r.key is None:
                continue
            if r.value is None:
                out.pop(r.key, None)
            else:
                out[r.key] = (r.offset, r.value)
        offset = recs[-1].offset + 1
    return out


def table_rows(t: PartitionTable) -> dict[bytes, tuple[int, bytes]]:
    with t.snapshot() as s:
        rows = s.scan(limit=1 << 30)
    return {r.key: (r.offset, r.value) for r in rows}


@pytest.fixture
def store(tmp_path: Path) -> Iterator[MetaStore]:
    s = MetaStore(tmp_path / "meta")
    yield s
    s.close()


def new_table(store: MetaStore, gid: int = 5, identity: str = "t/0/1") -> PartitionTable:
    return PartitionTable(store, gid, identity, "t/0")


def test_apply_puts_tombstones_and_empty_values(tmp_path: Path, store: MetaStore) -> None:
    lg = open_log(tmp_path / "log")
    t = new_table(store)
    t.recover(lg, lg.log_end_offset)
    assert t.applied_offset == 0 and t.key_count() == 0
    e1 = append(lg, [(b"a", b"1"), (b"b", b"2"), (b"a", b"3")], ts=10)
    e2 = append(lg, [(b"b", None), (b"c", b""), (b"d", b"4")], ts=20)
    t.apply_entries([e1, e2])
    assert t.applied_offset == 6
    assert t.get(b"a") == TableRow(b"a", 2, 10, b"3")
    assert t.get(b"b") is None  # tombstone deleted it
    assert t.get(b"c") == TableRow(b"c", 4, 20, b"")  # empty is a value, not a tombstone
    assert t.get_many([b"d", b"zz", b"a"]) == [
        TableRow(b"d", 5, 20, b"4"),
        None,
        TableRow(b"a", 2, 10, b"3"),
    ]
    assert t.key_count() == 3
    # Applying the same entries again (a restart re-delivers them) changes nothing.
    t.apply_entries([e1, e2])
    assert t.key_count() == 3 and t.applied_offset == 6
    # A tombstone for a key never set, then the key set again.
    t.apply_entries([append(lg, [(b"x", None), (b"b", b"again")])])
    assert t.key_count() == 4 and t.get(b"b") == TableRow(b"b", 7, 1_000, b"again")
    assert table_rows(t) == replay_model(lg, t.applied_offset)


def test_a_gap_in_the_applied_entries_stops_loudly(tmp_path: Path, store: MetaStore) -> None:
    lg = open_log(tmp_path / "log")
    t = new_table(store)
    t.recover(lg, 0)
    append(lg, [(b"a", b"1")])
    e2 = append(lg, [(b"a", b"2")])
    with pytest.raises(UnappliableEntry, match="missing"):
        t.apply_entries([e2])
    assert t.applied_offset == 0


def test_control_batches_take_offsets_and_set_nothing(tmp_path: Path, store: MetaStore) -> None:
    lg = open_log(tmp_path / "log")
    t = new_table(store)
    t.recover(lg, 0)
    lg.append(encode_batch([b"x"], keys=[b"ctl"], control=True), 1)
    ctl = lg.entries_by_index(1, 2, 1 << 20)[0]
    e = append(lg, [(b"k", b"v")])
    t.apply_entries([ctl, b"", e])  # b"": an EMPTY entry not stored as a batch
    assert t.applied_offset == 2 and table_rows(t) == {b"k": (1, b"v")}


def test_scan_prefix_range_limit_and_snapshot_isolation(tmp_path: Path, store: MetaStore) -> None:
    lg = open_log(tmp_path / "log")
    t = new_table(store)
    other = new_table(store, gid=6, identity="u/0/2")  # a neighbour prefix must not leak
    t.recover(lg, 0)
    keys = [b"a", b"ab", b"abc", b"b", b"b\xff", b"b\xff\xff", b"c"]
    t.apply_entries([append(lg, [(k, k.upper()) for k in keys])])
    lg2 = open_log(tmp_path / "log2")
    other.recover(lg2, 0)
    other.apply_entries([append(lg2, [(b"a", b"other")])])
    with t.snapshot() as s:
        assert s.applied_offset == len(keys)
        assert [r.key for r in s.scan()] == keys
        assert [r.key for r in s.scan(prefix=b"ab")] == [b"ab", b"abc"]
        assert [r.key for r in s.scan(prefix=b"b\xff")] == [b"b\xff", b"b\xff\xff"]
        assert [r.key for r in s.scan(start=b"ab", end=b"b\xff")] == [b"ab", b"abc", b"b"]
        assert [r.key for r in s.scan(prefix=b"a", start=b"ab", end=b"abc")] == [b"ab"]
        assert [r.key for r in s.scan(start=b"b", limit=2)] == [b"b", b"b\xff"]
        assert s.scan(start=b"c", end=b"a") == []
        with pytest.raises(ValueError):
            s.scan(limit=0)
        # Later changes are invisible to the snapshot, visible to the table.
        t.apply_entries([append(lg, [(b"a", None), (b"aa", b"new"), (b"c", b"C2")])])
        assert s.get(b"a") == TableRow(b"a", 0, 1_000, b"A")
        assert s.get(b"aa") is None
        assert [r.key for r in s.scan()] == keys
        assert s.get(b"c") is not None and s.get(b"c").value == b"C"  # type: ignore[union-attr]
    assert t.get(b"a") is None and t.get(b"aa") is not None
    with t.snapshot() as s2:
        assert s2.applied_offset == len(keys) + 3
        assert [r.key for r in s2.scan(prefix=b"a")] == [b"aa", b"ab", b"abc"]
    with pytest.raises(ValueError, match="closed"):
        s2.get(b"a")


def test_restart_continues_from_the_applied_offset(tmp_path: Path, store: MetaStore) -> None:
    lg = open_log(tmp_path / "log", segment_bytes=4096)
    t = new_table(store)
    t.recover(lg, 0)
    entries = [append(lg, [(b"k%d" % (i % 7), b"v%d" % i)] * 3) for i in range(60)]
    assert lg.segment_count > 1
    t.apply_entries(entries[:40])
    # A new table object on the same store, as after a restart: it finds its applied
    # offset and replays only the committed log after it.
    t2 = new_table(store)
    t2.recover(lg, lg.log_end_offset)
    assert t2.rebuilds == 0
    assert t2.applied_offset == lg.log_end_offset
    assert table_rows(t2) == replay_model(lg, lg.log_end_offset)
    assert t2.key_count() == 7


@pytest.mark.parametrize(
    "damage",
    ["meta_deleted", "row_deleted", "row_corrupt", "meta_garbage", "other_identity", "ahead"],
)
def test_damage_is_detected_and_the_table_rebuilt(
    tmp_path: Path, store: MetaStore, damage: str
) -> None:
    lg = open_log(tmp_path / "log")
    t = new_table(store)
    t.recover(lg, 0)
    t.apply_entries([append(lg, [(b"k%d" % i, b"v%d" % i) for i in range(20)])])
    t.apply_entries([append(lg, [(b"k3", None), (b"k4", b"new")])])
    rows = b"r" + (5).to_bytes(8, "big")
    meta = b"m" + (5).to_bytes(8, "big")
    identity = "t/0/1"
    if damage == "meta_deleted":
        store.delete(TABLES_COLUMN, meta)
    elif damage == "row_deleted":
        store.delete(TABLES_COLUMN, rows + b"k7")
    elif damage == "row_corrupt":
        data = store.get(TABLES_COLUMN, rows + b"k7")
        assert data is not None
        store.put(TABLES_COLUMN, rows + b"k7", data[:-1] + b"X")
    elif damage == "meta_garbage":
        store.put(TABLES_COLUMN, meta, b"\x09garbage")
    elif damage == "other_identity":
        identity = "t/0/2"  # the group id now belongs to a new topic of that name
    elif damage == "ahead":
        t.apply_entries([append(lg, [(b"z", b"lost")])])
        lg.truncate_suffix(lg.log_end_offset - 1)  # the log lost its last record (flush=os)
    t2 = new_table(store, identity=identity)
    t2.recover(lg, lg.log_end_offset)
    assert t2.rebuilds == 1
    assert t2.applied_offset == lg.log_end_offset
    assert table_rows(t2) == replay_model(lg, lg.log_end_offset)
    assert t2.key_count() == len(replay_model(lg, lg.log_end_offset))
    # And it is sound again: the next start keeps it.
    t3 = new_table(store, identity=identity)
    t3.recover(lg, lg.log_end_offset)
    assert t3.rebuilds == 0


def test_reading_a_corrupt_row_is_a_storage_error(tmp_path: Path, store: MetaStore) -> None:
    lg = open_log(tmp_path / "log")
    t = new_table(store)
    t.recover(lg, 0)
    t.apply_entries([append(lg, [(b"a", b"value")])])
    key = b"r" + (5).to_bytes(8, "big") + b"a"
    data = store.get(TABLES_COLUMN, key)
    assert data is not None
    store.put(TABLES_COLUMN, key, data[:-1] + b"X")
    with pytest.raises(StorageError, match="CRC"):
        t.get(b"a")


def test_prune_below_a_new_log_start(tmp_path: Path, store: MetaStore) -> None:
    lg = open_log(tmp_path / "log")
    t = new_table(store)
    t.recover(lg, 0)
    t.apply_entries([append(lg, [(b"a", b"1"), (b"b", b"2")])])
    t.apply_entries([append(lg, [(b"c", b"3"), (b"a", b"4")])])
    assert t.prune_below(2) == 1  # b (offset 1) goes; a was set again at offset 3
    assert table_rows(t) == {b"a": (3, b"4"), b"c": (2, b"3")}
    assert t.key_count() == 2
    t2 = new_table(store)
    lg.advance_start(2)
    t2.recover(lg, lg.log_end_offset)
    assert t2.rebuilds == 0 and table_rows(t2) == replay_model(lg, lg.log_end_offset)


def test_drop_and_drop_orphans(tmp_path: Path, store: MetaStore) -> None:
    lg = open_log(tmp_path / "log")
    a, b = new_table(store, gid=1, identity="a/0/1"), new_table(store, gid=2, identity="b/0/2")
    for t in (a, b):
        t.recover(lg, 0)
    e = append(lg, [(b"k", b"v")])
    a.apply_entries([e])
    b.apply_entries([e])
    a.drop()
    assert list(store.items(TABLES_COLUMN, b"r" + (1).to_bytes(8, "big"))) == []
    assert b.get(b"k") is not None
    assert drop_tables_except(store, {1}) == [2]
    assert list(store.items(TABLES_COLUMN)) == []


async def test_wait_applied(tmp_path: Path, store: MetaStore) -> None:
    lg = open_log(tmp_path / "log")
    t = new_table(store)
    t.recover(lg, 0)
    assert not await t.wait_applied(0, 0.01)
    e = append(lg, [(b"k", b"v"), (b"j", b"w")])
    waiter = asyncio.create_task(t.wait_applied(1, 5))
    await asyncio.sleep(0)
    assert not waiter.done()
    t.apply_entries([e])
    assert await asyncio.wait_for(waiter, 5)
    assert await t.wait_applied(1, 0)
    late = asyncio.create_task(t.wait_applied(5, 5))
    await asyncio.sleep(0)
    t.close()
    assert not await asyncio.wait_for(late, 5)


# ---- wired into a partition replica over a running Raft group ------------------------------


async def test_a_compacted_partition_applies_its_commits_to_its_table(tmp_path: Path) -> None:
    from tests.unit.node_fakes import InstrumentedLog
    from tests.unit.test_node_partition import CONFIG, TIMING, until_serving
    from tidelog.config import TopicConfig
    from tidelog.node.metrics import NodeMetrics
    from tidelog.node.multiraft import MultiRaft
    from tidelog.node.partition import Partition
    from tidelog.node.raft.types import ConfState
    from tidelog.node.replica_storage import HardStateStore
    from tidelog.records import validate_batches

    config = TopicConfig.from_overrides({"cleanup.policy": "compact"})
    assert config.compacted and not config.retention_deletes
    store = MetaStore(tmp_path / "meta")
    raft = MultiRaft(1, HardStateStore(store), NodeMetrics(), TIMING)
    raft.start()

    def start() -> Partition:
        lg = InstrumentedLog(tmp_path / "p", config)
        table = PartitionTable(store, 7, "t/0/1", "t/0")
        p = Partition("t", 0, lg, config, group_id=7, replicas=[1], table=table)
        group = raft.add_group(
            7, lg, ConfState(voters=frozenset({1})), p, durable=True, config=CONFIG
        )
        p.attach(group, raft)
        raft.campaign(group)
        return p

    try:
        async with asyncio.timeout(20):
            p = start()
            await until_serving(p)
            assert p.table is not None
            for i in range(5):
                buf = kv_batch([(b"k%d" % (j % 3), b"v%d.%d" % (i, j)) for j in range(4)])
                _base, _last, index, term = p.propose(buf, validate_batches(buf))
                await p.wait_committed(index, term, 5)
            buf = kv_batch([(b"k1", None)])
            _base, last, index, term = p.propose(buf, validate_batches(buf))
            await p.wait_committed(index, term, 5)
            assert await p.table.wait_applied(last, 5)
            assert p.table.applied_offset == p.high_watermark == last + 1
            assert table_rows(p.table) == replay_model(p.log, p.high_watermark)  # type: ignore[arg-type]
            assert p.table.get(b"k1") is None and p.table.key_count() == 2
            # Retention does not apply to cleanup.policy=compact.
            assert p.enforce_retention(now_ms=1 << 50) is None
            rows = table_rows(p.table)
            await raft.remove_group(7, forget=False)
            p.close_for_shutdown()
            p.log.close()
            # A restart continues the stored table.
            p = start()
            await until_serving(p)
            assert p.table is not None and p.table.rebuilds == 0
            assert table_rows(p.table) == rows
            await raft.remove_group(7, forget=False)
            p.close_for_shutdown()
            p.log.close()
    finally:
        await raft.stop()
        store.close()


# ---- cleanup.policy and keys -----------------------------------------------------------------


def test_cleanup_policy_accepts_exactly_the_three_policies() -> None:
    from tidelog.config import TopicConfig, validate_topic_configs
    from tidelog.errors import InvalidConfig

    for policy, compacted, deletes in (
        ("delete", False, True),
        ("compact", True, False),
        ("compact,delete", True, True),
    ):
        validate_topic_configs({"cleanup.policy": policy})
        c = TopicConfig.from_overrides({"cleanup.policy": policy})
        assert (c.compacted, c.retention_deletes) == (compacted, deletes)
    assert not TopicConfig.from_overrides({}).compacted
    for bad in ("delete,compact", "compact, delete", "Compact", "", "compact,", "none"):
        with pytest.raises(InvalidConfig, match=r"cleanup\.policy"):
            validate_topic_configs({"cleanup.policy": bad})


def test_records_without_a_key_are_refused_when_keys_are_required() -> None:
    from tidelog.errors import InvalidRecord, KeyRequired
    from tidelog.records import ProduceLimits, check_batches, scan_batches

    lim = ProduceLimits(
        batch_bytes_max=1 << 20, batch_records_max=10_000, expanded_bytes_max=1 << 24
    )
    keyed = kv_batch([(b"a", b"1"), (b"b", None)])
    one_missing = kv_batch([(b"a", b"1"), (None, b"2"), (b"c", b"")])
    none_keyed = encode_batch([b"x", b"y"])
    for buf in (keyed, none_keyed, keyed + one_missing):
        check_batches(buf, scan_batches(buf, lim), lim)  # a delete-policy topic takes all
    check_batches(keyed, scan_batches(keyed, lim), lim, keys_required_by="t")
    for buf, missing in ((one_missing, 1), (none_keyed, 2), (keyed + one_missing, 1)):
        with pytest.raises(KeyRequired, match=f"{missing} record\\(s\\) without a key") as e:
            check_batches(buf, scan_batches(buf, lim), lim, keys_required_by="rates")
        assert "'rates' is compacted" in str(e.value) and "needs a key" in str(e.value)
        assert isinstance(e.value, InvalidRecord) and e.value.reason == "KEY_REQUIRED"


# ---- property: the table is a replay of the log, across rolls, crashes and restarts ---------

_KEYS = [b"k%d" % i for i in range(8)]
_op = st.one_of(
    st.tuples(st.just("put"), st.sampled_from(_KEYS), st.binary(max_size=300)),
    st.tuples(st.just("tombstone"), st.sampled_from(_KEYS), st.none()),
    st.tuples(st.just("batch"), st.none(), st.none()),  # close the batch: the next entry
    st.tuples(st.just("commit"), st.none(), st.none()),  # every appended entry commits
    st.tuples(st.just("apply"), st.none(), st.none()),  # the committed ones reach the table
    st.tuples(st.just("crash"), st.none(), st.none()),  # node restart, table not closed
    st.tuples(st.just("reopen_log"), st.none(), st.none()),  # log closed and reopened too
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(_op, min_size=1, max_size=60))
def test_the_table_equals_a_replay_of_the_log(
    ops: list[tuple[str, bytes | None, bytes | None]],
) -> None:
    with tempfile.TemporaryDirectory() as d:
        base = Path(d)
        store = MetaStore(base / "meta")
        lg = open_log(base / "log", segment_bytes=4096)
        t = new_table(store)
        t.recover(lg, 0)
        pending: list[Op] = []
        entries: list[bytes] = []  # appended, in order
        committed = 0  # entries committed
        applied = 0  # entries handed to the table
        try:
            for kind, key, value in [*ops, ("batch", None, None), ("commit", None, None)]:
                if kind in ("put", "tombstone"):
                    pending.append((key, value))
                elif kind == "batch" and pending:
                    entries.append(append(lg, pending, ts=len(entries)))
                    pending = []
                elif kind == "commit":
                    committed = len(entries)
                elif kind == "apply" and applied < committed:
                    t.apply_entries(entries[applied:committed])
                    applied = committed
                elif kind in ("crash", "reopen_log"):
                    store.close()
                    if kind == "reopen_log":
                        lg.close()
                        lg = open_log(base / "log", segment_bytes=4096)
                    store = MetaStore(base / "meta")
                    t = new_table(store)
                    end = batch_end(entries[committed - 1]) if committed else 0
                    t.recover(lg, end)  # replays the committed entries the table lacks
                    assert t.rebuilds == 0
                    applied = committed
                model = replay_model(lg, t.applied_offset)
                assert table_rows(t) == model
                assert t.key_count() == len(model)
            t.apply_entries(entries[applied:committed])
            assert t.applied_offset == lg.log_end_offset
            assert table_rows(t) == replay_model(lg, lg.log_end_offset)
            assert lg.segment_count >= 1
        finally:
            lg.close()
            store.close()


def batch_end(entry: bytes) -> int:
    from tidelog.records import batch_end_offset

    return batch_end_offset(entry)


_CRASH_CHILD = """
import sys
from pathlib import Path
from tests.unit.log_support import open_log
from tests.unit.test_table import append, new_table
from tidelog.node.metastore import MetaStore

base = Path(sys.argv[1])
store = MetaStore(base / "meta")
lg = open_log(base / "log", segment_bytes=65536)
t = new_table(store)
t.recover(lg, lg.log_end_offset)
i = 0
while True:
    ops = [(b"k%d" % ((i * 7 + j) % 500), None if j % 11 == 0 else b"v%d.%d" % (i, j) * 3)
           for j in range(40)]
    entry = append(lg, ops, ts=i)
    lg.flush()  # a node applies only committed entries, stored before they commit
    t.apply_entries([entry])
    i += 1
    if i == 20:
        print("running", flush=True)
"""


@pytest.mark.timeout(60)
def test_after_sigkill_the_table_is_a_replay_up_to_its_applied_offset(tmp_path: Path) -> None:
    """A real crash: a child process applies entries as fast as it can and is SIGKILLed
    mid-stream; the stored table equals a replay of the log up to its stored applied offset,
    and the next start resumes from there without a rebuild."""
    import os
    import signal
    import subprocess
    import sys
    import time

    root = Path(__file__).resolve().parents[2]
    for _round in range(3):
        child = subprocess.Popen(
            [sys.executable, "-c", _CRASH_CHILD, str(tmp_path)],
            cwd=root,
            stdout=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(root)},
        )
        try:
            assert child.stdout is not None
            assert child.stdout.readline() == b"running\n"
            time.sleep(0.3)
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait()
        store = MetaStore(tmp_path / "meta")
        lg = open_log(tmp_path / "log", segment_bytes=65536)
        try:
            t = new_table(store)
            t.recover(lg, 0)  # load and check only: replay nothing
            assert t.rebuilds == 0
            assert 0 < t.applied_offset <= lg.log_end_offset
            assert table_rows(t) == replay_model(lg, t.applied_offset)
            t.recover(lg, lg.log_end_offset)
            assert t.rebuilds == 0 and t.applied_offset == lg.log_end_offset
            assert table_rows(t) == replay_model(lg, lg.log_end_offset)
        finally:
            lg.close()
            store.close()


def test_table_metrics_only_for_replicas_with_a_table() -> None:
    from tidelog.node.metrics import NodeMetrics, PartitionStats

    m = NodeMetrics()
    m.watch_partitions(
        lambda: [
            PartitionStats("rates", 0, 0, 0, 120, 100, 1, table_keys=42, table_lag=3),
            PartitionStats("plain", 0, 0, 0, 10, 10, 1),
        ]
    )
    reg = m.registry
    rates = {"topic": "rates", "partition": "0"}
    assert reg.get_sample_value("tidelog_table_keys", rates) == 42
    assert reg.get_sample_value("tidelog_table_applied_lag_records", rates) == 3
    plain = {"topic": "plain", "partition": "0"}
    assert reg.get_sample_value("tidelog_table_keys", plain) is None
    assert reg.get_sample_value("tidelog_table_applied_lag_records", plain) is None


def test_decode_last_per_key_skips_keyless_and_leading_records() -> None:
    from tidelog.records import decode_last_per_key, stamp

    buf = bytearray(
        encode_batch(
            [b"1", None, b"", b"4", None, b"6"],
            keys=[b"a", b"b", None, b"a", b"c", b"b"],
            timestamps_ms=[100, 105, 110, 120, 130, 140],
        )
    )
    stamp(buf, 0, 50, 1, 1)
    assert decode_last_per_key(buf) == {
        b"a": (53, 120, b"4"),
        b"c": (54, 130, None),
        b"b": (55, 140, b"6"),
    }
    assert decode_last_per_key(buf, skip=4) == {b"c": (54, 130, None), b"b": (55, 140, b"6")}
    assert decode_last_per_key(buf, skip=6) == {}
    tombstones = encode_batch([None, None], keys=[b"x", b"y"], timestamps_ms=7)
    assert decode_last_per_key(tombstones) == {b"x": (0, 7, None), b"y": (1, 7, None)}
    assert decode_last_per_key(encode_batch([b"v", b"w"])) == {}  # no keys at all


async def test_a_policy_change_builds_the_table_from_the_log_or_drops_it(tmp_path: Path) -> None:
    from tests.unit.node_fakes import InstrumentedLog
    from tests.unit.test_node_partition import CONFIG, TIMING, until_serving
    from tidelog.config import TopicConfig
    from tidelog.node.metrics import NodeMetrics
    from tidelog.node.multiraft import MultiRaft
    from tidelog.node.partition import Partition
    from tidelog.node.raft.types import ConfState
    from tidelog.node.replica_storage import HardStateStore
    from tidelog.records import validate_batches

    plain = TopicConfig.from_overrides({})
    store = MetaStore(tmp_path / "meta")
    raft = MultiRaft(1, HardStateStore(store), NodeMetrics(), TIMING)
    raft.start()
    try:
        async with asyncio.timeout(20):
            lg = InstrumentedLog(tmp_path / "p", plain)
            p = Partition("t", 0, lg, plain, group_id=7, replicas=[1])
            group = raft.add_group(
                7, lg, ConfState(voters=frozenset({1})), p, durable=True, config=CONFIG
            )
            p.attach(group, raft)
            raft.campaign(group)
            await until_serving(p)
            assert p.table is None
            for buf in (
                kv_batch([(None, b"keyless"), (b"a", b"1")]),
                kv_batch([(b"a", None), (b"b", b"2")]),
            ):
                _b, _l, index, term = p.propose(buf, validate_batches(buf))
                await p.wait_committed(index, term, 5)
            p.set_table(PartitionTable(store, 7, "t/0/1", "t/0"))  # delete -> compact
            assert p.table is not None
            assert p.table.applied_offset == p.high_watermark == 4
            assert table_rows(p.table) == {b"b": (3, b"2")}  # the keyless record sets nothing
            buf = kv_batch([(b"c", b"3")])
            _b, last, index, term = p.propose(buf, validate_batches(buf))
            await p.wait_committed(index, term, 5)
            assert await p.table.wait_applied(last, 5)
            assert table_rows(p.table) == {b"b": (3, b"2"), b"c": (4, b"3")}
            p.set_table(None)  # compact -> delete
            assert p.table is None
            assert list(store.items(TABLES_COLUMN)) == []
            await raft.remove_group(7, forget=False)
            p.close_for_shutdown()
            lg.close()
    finally:
        await raft.stop()
        store.close()


@pytest.mark.timeout(30)
async def test_a_follower_installing_a_snapshot_clears_its_table_and_catches_up(
    tmp_path: Path,
) -> None:
    """A follower too far behind gets the leader's Raft snapshot (its log restarts at the
    leader's log start): its table is cleared there, and after catching up it equals the
    leader's table pruned below that log start, both the replay of the log that remains."""
    from tests.unit.test_snapshot_idempotence import RAFT_CONFIG, TIMING
    from tidelog.config import TopicConfig
    from tidelog.node.metrics import NodeMetrics
    from tidelog.node.multiraft import MultiRaft
    from tidelog.node.partition import Partition
    from tidelog.node.raft.storage import NO_LIMIT_BYTES
    from tidelog.node.raft.types import ConfState, Entry, HardState
    from tidelog.node.replica_storage import HardStateStore, ReplicaStorage
    from tidelog.records import stamp, validate_batches

    config = TopicConfig.from_overrides(
        {"segment.bytes": "4096", "cleanup.policy": "compact,delete"}
    )
    store = MetaStore(tmp_path / "meta")
    raft = MultiRaft(1, HardStateStore(store), NodeMetrics(), TIMING)
    raft.start()
    try:
        lg = PartitionLog(tmp_path / "leader", config)
        leader_table = PartitionTable(store, 7, "t/0/1", "t/0")
        leader = Partition("t", 0, lg, config, group_id=7, replicas=[1], table=leader_table)
        group = raft.add_group(
            7, lg, ConfState(voters=frozenset({1})), leader, durable=True, config=RAFT_CONFIG
        )
        leader.attach(group, raft)
        raft.campaign(group)
        async with asyncio.timeout(10):
            while not leader.serving:
                await asyncio.sleep(0.005)
            for b in range(40):
                # Keys k10.. only in the first 20 batches; k0..k9 all along.
                keys = [b"k%d" % (b * 5 + i if b < 20 else (b * 5 + i) % 10) for i in range(5)]
                buf = kv_batch([(k, b"v%d" % b * 40) for k in keys])
                _base, _last, index, term = leader.propose(buf, validate_batches(buf))
                await leader.wait_committed(index, term, 5)
        assert lg.truncate_prefix(lg.log_end_offset - 15) > 0  # retention dropped segments
        leader_table.prune_below(lg.log_start_offset)  # as the log-start batch does
        assert lg.log_start_offset > 100
        assert leader_table.key_count() == 10

        flog = PartitionLog(tmp_path / "follower", config)
        storage = ReplicaStorage(flog, HardState(), ConfState(voters=frozenset({1, 2, 3})))
        old = bytearray(kv_batch([(b"stale", b"x")]))
        stamp(old, 0, 0, 1, 1)
        storage.append([Entry(1, 1, bytes(old))])
        ftable = PartitionTable(store, 8, "t/0/1", "t/0")
        part = Partition("t", 0, flog, config, group_id=8, replicas=[1, 2, 3], table=ftable)
        ftable.recover(flog, 1)
        assert ftable.get(b"stale") is not None
        assert group is leader.group
        snap = group.storage.snapshot()
        storage.install_snapshot(snap)
        part.restore_snapshot(snap)
        assert ftable.key_count() == 0 and ftable.get(b"stale") is None
        assert ftable.applied_offset == flog.log_end_offset == lg.log_start_offset
        entries = group.storage.entries(storage.first_index(), lg.last_index + 1, NO_LIMIT_BYTES)
        storage.append(entries)
        part.apply(tuple(entries))
        assert ftable.applied_offset == leader_table.applied_offset == lg.log_end_offset
        assert table_rows(ftable) == table_rows(leader_table) == replay_model(lg, lg.log_end_offset)
        await raft.remove_group(7, forget=False)
        leader.close_for_shutdown()
        lg.close()
        flog.close()
    finally:
        await raft.stop()
        store.close()


def test_last_per_key_of_a_cleaned_batch_uses_its_offsets() -> None:
    """A table rebuilt from a cleaned log reads cleaned batches: offsets with gaps, and a
    skip counted in offsets, not in surviving records."""
    from tidelog.records import compact_batch, decode_last_per_key, decode_records, read_header
    from tidelog.records import stamp as stamp_batch

    buf = bytearray(
        encode_batch([b"a1", b"b1", b"a2", None, b"c1"], keys=[b"a", b"b", b"a", b"b", b"c"])
    )
    stamp_batch(buf, 0, base_offset=100, raft_term=1, raft_index=1)
    records = decode_records(bytes(buf))
    survivors = [r for r in records if r.offset in (102, 103, 104)]
    cleaned = compact_batch(read_header(bytes(buf)), survivors)
    assert decode_last_per_key(cleaned) == {
        b"a": (102, records[2].timestamp_ms, b"a2"),
        b"b": (103, records[3].timestamp_ms, None),
        b"c": (104, records[4].timestamp_ms, b"c1"),
    }
    # Applied up to offset 103 (skip 3): only offset 103 on is new.
    assert set(decode_last_per_key(cleaned, skip=3)) == {b"b", b"c"}
    assert set(decode_last_per_key(cleaned, skip=4)) == {b"c"}


@pytest.mark.parametrize("budget", [1, 50, 333, 1_000, 1 << 30])
@pytest.mark.parametrize("limit", [1, 7, 100, 10_000])
def test_a_page_stops_at_its_row_limit_or_byte_budget(
    tmp_path: Path, store: MetaStore, monkeypatch: pytest.MonkeyPatch, budget: int, limit: int
) -> None:
    """The service's pages (node/table_service._page): rows join until ``limit`` rows, or
    until the rows so far hold ``budget`` bytes (a page has at least one row); every row of
    the table comes out exactly once, in key order, over the pages."""
    from tidelog.node import limits
    from tidelog.node.table_service import _after, _page

    monkeypatch.setattr(limits, "table_page_bytes_max", budget)
    lg = open_log(tmp_path / "log")
    t = new_table(store)
    t.recover(lg, 0)
    t.apply_entries([append(lg, [(b"k%04d" % i, b"v" * (i % 37)) for i in range(300)])])
    expected = sorted(table_rows(t).items())
    seen: list[bytes] = []
    with t.snapshot() as s:
        start: bytes | None = None
        while True:
            rows, more = _page(s, prefix=None, start=start, end=None, limit=limit)
            assert 1 <= len(rows) <= limit
            sizes = [len(r.key) + len(r.value) for r in rows]
            assert sum(sizes[:-1]) < budget  # no row joined a page already at its budget
            if more and len(rows) < limit:
                assert sum(sizes) >= budget  # the page stopped at its budget, not before
            seen += [r.key for r in rows]
            if not more:
                break
            start = _after(rows[-1].key)
    assert seen == [k for k, _ in expected]


# ---- the row cache: point reads from memory equal the stored table --------------------------

_cache_op = st.one_of(
    st.tuples(st.just("put"), st.sampled_from(_KEYS), st.binary(max_size=50)),
    st.tuples(st.just("tombstone"), st.sampled_from(_KEYS), st.none()),
    st.tuples(st.just("apply"), st.none(), st.none()),  # the pending ops, as one entry
    st.tuples(st.just("read"), st.none(), st.none()),  # get_many of every key, then gets
    st.tuples(st.just("prune"), st.none(), st.none()),  # the log start moves to the end
    st.tuples(st.just("rebuild"), st.none(), st.none()),  # cleared, the log replayed
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    ops=st.lists(_cache_op, min_size=1, max_size=60),
    budget_bytes=st.sampled_from([0, 700, 1 << 20]),
)
def test_cached_reads_equal_the_stored_table(
    ops: list[tuple[str, bytes | None, bytes | None]], budget_bytes: int
) -> None:
    """get and get_many, served from the row cache where they can, always equal a replay of
    the log: every write, tombstone, prune and rebuild keeps the cache exact, whatever the
    budget (none, a few rows, all of them); and the cache stays within its budget."""
    with tempfile.TemporaryDirectory() as d:
        base = Path(d)
        store = MetaStore(base / "meta")
        lg = open_log(base / "log")
        budget = RowCacheBudget(budget_bytes)
        t = PartitionTable(store, 5, "t/0/1", "t/0", row_cache=budget)
        other = PartitionTable(store, 6, "u/0/1", "u/0", row_cache=budget)
        try:
            t.recover(lg, 0)
            pending: list[Op] = []
            for kind, key, value in [*ops, ("apply", None, None), ("read", None, None)]:
                if kind in ("put", "tombstone"):
                    pending.append((key, value))
                elif kind == "apply" and pending:
                    t.apply_entries([append(lg, pending)])
                    pending = []
                elif kind == "prune":
                    lg.advance_start(lg.log_end_offset)
                    t.prune_below(lg.log_start_offset)
                elif kind == "rebuild":
                    t.rebuild(lg, lg.log_end_offset, "test")
                elif kind == "read":
                    model = replay_model(lg, t.applied_offset)
                    want = [
                        TableRow(k, model[k][0], 1_000, model[k][1]) if k in model else None
                        for k in _KEYS
                    ]
                    assert t.get_many(_KEYS) == want  # fills the cache
                    assert t.get_many(_KEYS) == want  # from the cache
                    assert [t.get(k) for k in _KEYS] == want
                    assert t.get_found([*reversed(_KEYS)]) == [
                        r for r in reversed(want) if r is not None
                    ]
                    other.get_many(_KEYS)  # a second table shares the budget
                assert budget.used <= max(budget.max_bytes, 0)
                assert t.cached_rows() <= len(_KEYS)
                if budget_bytes == 0:
                    assert t.cached_rows() == 0
        finally:
            lg.close()
            store.close()


def test_a_full_budget_empties_every_cache_and_stays_exact(
    tmp_path: Path, store: MetaStore
) -> None:
    lg = open_log(tmp_path / "log")
    row = 1 + 10 + ROW_CACHE_OVERHEAD_BYTES  # a one-byte key, a ten-byte value
    budget = RowCacheBudget(3 * row)
    a = PartitionTable(store, 1, "a/0/1", "a/0", row_cache=budget)
    b = PartitionTable(store, 2, "b/0/1", "b/0", row_cache=budget)
    for t in (a, b):
        t.recover(lg, 0)
    e = append(lg, [(k, b"0123456789") for k in (b"1", b"2", b"3")])
    a.apply_entries([e])
    b.apply_entries([e])
    assert a.cached_rows() == 0  # writes do not fill the cache
    assert len(a.get_found([b"1", b"2"])) == 2
    assert a.cached_rows() == 2 and budget.used == 2 * row
    assert b.get(b"1") is not None
    assert budget.used == 3 * row
    # One more row does not fit: every table's cache empties, then the row is cached.
    assert b.get(b"2") is not None
    assert (a.cached_rows(), b.cached_rows(), budget.used) == (0, 1, row)
    # A cached row follows the writes: a new value, then a tombstone.
    e2 = append(lg, [(b"2", b"new")])
    b.apply_entries([e2])
    assert b.get(b"2") == TableRow(b"2", 3, 1_000, b"new") and b.cached_rows() == 1
    assert budget.used == row - len(b"0123456789") + len(b"new")
    b.apply_entries([append(lg, [(b"2", None)])])
    assert b.get(b"2") is None and b.cached_rows() == 0 and budget.used == 0
    # Dropping a table forgets its rows.
    a.get(b"1")
    a.drop()
    assert a.cached_rows() == 0 and budget.used == 0
