"""A first voter of a brand-new group stays an ordinary replica after a restart (issue 8,
node simulation controller seeds 274, 501, 576).

A voter on a new data directory opens group 0 as a new replica (``lost_to=NEW_REPLICA``,
stored as its commit index). Once every listed voter answered that it is fresh, the
controller settles it (``MultiRaft.settle``): the group is brand new, so nothing this replica
ever acknowledged can be missing from its directory. Before the fix the marker stayed stored
until a leader's APPEND reached the node: a voter cut off while the others formed the
cluster restarted as a new replica and never voted for the holder of the controller log,
which was left without a leader for good once the other first voter lost its disk."""

from __future__ import annotations

from pathlib import Path

from tests.unit.test_multiraft import CONFIG, TIMING, VOTERS
from tidelog.config import TopicConfig
from tidelog.node.log import PartitionLog
from tidelog.node.metastore import MetaStore
from tidelog.node.metrics import NodeMetrics
from tidelog.node.multiraft import MultiRaft
from tidelog.node.partition import Partition
from tidelog.node.raft.core import NEW_REPLICA
from tidelog.node.raft.types import ConfState
from tidelog.node.replica_storage import HardStateStore


def _open(tmp_path: Path, store: MetaStore, *, new_directory: bool) -> tuple[MultiRaft, list[int]]:
    raft = MultiRaft(1, HardStateStore(store), NodeMetrics(), TIMING)
    raft.new_directory = new_directory
    lost = []
    for gid in (0, 1):
        config = TopicConfig.from_overrides({})
        lg = PartitionLog(tmp_path / f"g{gid}", config)
        owner = Partition("t", gid, lg, config, group_id=gid, replicas=sorted(VOTERS))
        group = raft.add_group(gid, lg, ConfState(voters=VOTERS), owner, durable=True,
                               config=CONFIG)  # fmt: skip
        lost.append(group.raw.lost_to)
        if new_directory and gid == 0:
            raft.settle(group)
            assert group.raw.lost_to == 0 and raft.formed(group)
    return raft, lost


def test_a_settled_new_replica_restarts_as_an_ordinary_one(tmp_path: Path) -> None:
    store = MetaStore(tmp_path / "meta")
    try:
        _raft, lost = _open(tmp_path, store, new_directory=True)
        assert lost == [NEW_REPLICA, NEW_REPLICA]
    finally:
        store.close()
    store = MetaStore(tmp_path / "meta")  # the restart
    try:
        raft, lost = _open(tmp_path, store, new_directory=False)
        # Group 0 was settled: an ordinary replica (it votes for an up-to-date candidate).
        # Group 1 was not: still a new replica, until a leader reaches it.
        assert lost == [0, NEW_REPLICA]
        assert raft.formed(raft.groups[0]) and not raft.formed(raft.groups[1])
    finally:
        store.close()
