"""The topics as this node sees them, and the partition replicas it hosts.

The controller's replicated state (``Controller.state``, a ``ClusterState``) is the source of
truth for topics, configs and placement. This registry follows it: after every change it
*reconciles* (one task, one pass at a time): it opens a replica for every partition placed on
this node that it does not host yet, closes and deletes the replicas of deleted topics (or
moved away), and hands new configs to the open ones. Request paths look topics up here.

Replica moves (issue 11): a replica is kept while the partition's ``replicas`` or the
``target`` of its move names this node; one only the target names opens as a learner (empty
log, no vote). Every replica is told the set the partition should end with
(``Partition.set_target_replicas``: the target, else the replicas); the group's leader drives
its Raft configuration there. The committed configurations the partitions report
(``on_conf_changed``, and ``conf_state`` for the groups led here) are sent to the controller
with the heartbeat (``conf_reports``), which records them; the controller asks for leader transfers the same
way back (``transfer``).

Replicas live at ``<data-dir>/topics/<topic>-<topic id>/<partition>/``: the topic id (the
index of the command that created the topic) keeps a topic deleted and created again under the
same name from ever meeting the old one's files. A directory that no topic known to this node
owns, and that is not newer than what the node has applied, is left over from a deletion a
crash interrupted, and is removed.

A new partition group is started by its preferred leader with an immediate campaign (and by a
lone replica always), so a new topic takes writes within a round trip rather than an election
timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import re
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Final

import crc32c

from tidelog.config import TopicConfig
from tidelog.controller.state import NO_LEADER, ClusterState, PartitionAssignment, TopicRecord
from tidelog.errors import (
    LeaderNotAvailable,
    NotLeader,
    OffsetOutOfRange,
    RequestTimedOut,
    StorageError,
    UnknownPartition,
    UnknownTopic,
    excerpt,
)
from tidelog.node.catchup import STAGE_SUFFIX, CatchupManager, stage_dir
from tidelog.node.controller_node import Controller
from tidelog.node.idempotence_store import IdempotenceSnapshots
from tidelog.node.log import PartitionLog
from tidelog.node.log.clean_state import CleanerStats
from tidelog.node.log.cleaner import is_compacted
from tidelog.node.metastore import MetaStore
from tidelog.node.metrics import NodeMetrics, PartitionStats, TopicMetrics
from tidelog.node.multiraft import MultiRaft
from tidelog.node.partition import LogLike, Partition
from tidelog.node.raft.limits import Config
from tidelog.node.raft.types import NONE, ConfState, Role
from tidelog.node.table import PartitionTable, drop_tables_except
from tidelog.records import iter_headers
from tidelog.v1 import cluster_pb2

log = logging.getLogger(__name__)

#: The first wait before a failed reconciliation (a log that could not be opened) runs
#: again; it doubles up to the second while the failure lasts.
reconcile_retry_first_s: Final = 1.0
reconcile_retry_max_s: Final = 30.0

TOPICS_DIR = "topics"
_TOPIC_DIR_RE = re.compile(r"^(?P<name>.+)-(?P<topic_id>\d+)$")
#: How long a reconcile pass waits for the lone replicas it opened to lead.
lone_leader_wait_ms = 5_000

#: Opens (creating if needed) the log of one partition; injected so tests can instrument it.
LogOpener = Callable[[Path, TopicConfig], LogLike]


def topic_dir_name(name: str, topic_id: int) -> str:
    return f"{name}-{topic_id}"


class Topic:
    """A topic as the request paths need it: its record, parsed config, metrics and the
    replicas of it this node hosts (by partition index)."""

    __slots__ = ("config", "local", "metrics", "record")

    def __init__(self, record: TopicRecord, metrics: TopicMetrics) -> None:
        self.record = record
        self.config = record.config()
        self.metrics = metrics
        self.local: dict[int, Partition] = {}

    @property
    def name(self) -> str:
        return self.record.name

    @property
    def partition_count(self) -> int:
        return len(self.record.partitions)

    @property
    def replication_factor(self) -> int:
        return self.record.replication_factor

    @property
    def overrides(self) -> dict[str, str]:
        return dict(self.record.configs)

    def effective_configs(self) -> dict[str, str]:
        return self.record.effective_configs()


class PartitionView:
    """What Metadata and DescribeTopics report about one partition from this node."""

    __slots__ = ("assignment", "in_sync", "leader", "local", "term")

    def __init__(
        self,
        assignment: PartitionAssignment,
        leader: int,
        term: int,
        in_sync: list[int],
        local: Partition | None,
    ) -> None:
        self.assignment = assignment
        #: -1 when no leader is known.
        self.leader = leader
        self.term = term
        self.in_sync = in_sync
        self.local = local


def _cleaner_stats(lg: object) -> CleanerStats | None:
    """A copy of the log cleaner's figures of a compacted partition log (None otherwise)."""
    if not isinstance(lg, PartitionLog) or not is_compacted(lg.config.cleanup_policy):
        return None
    return dataclasses.replace(lg.cleaner_stats)


class TopicRegistry:
    def __init__(
        self,
        node_id: int,
        data_dir: Path,
        metrics: NodeMetrics,
        raft: MultiRaft,
        controller: Controller,
        open_log: LogOpener,
        snapshots: IdempotenceSnapshots | None = None,
        tables: MetaStore | None = None,
        catchup: CatchupManager | None = None,
    ) -> None:
        self.node_id = node_id
        self._dir = data_dir / TOPICS_DIR
        self._metrics = metrics
        self._raft = raft
        self._controller = controller
        self._open_log = open_log
        self.snapshots = snapshots
        #: Where compacted partitions keep their tables (node/table.py); None: no tables.
        self.tables = tables
        #: Streamed snapshots and catch-up copies (node/catchup.py); None: plain snapshots.
        self.catchup = catchup
        # Partitions keep their offsets dense: a leader of a committed log appends nothing.
        # Their followers learn commits lazily (with the next APPEND or heartbeat): a write
        # costs no commit-only APPEND round (the controller's group tells its at once).
        self._raft_config: Config = raft.timing.config(
            Config(always_append_empty=False, lazy_commit=True)
        )
        self._topics: dict[str, Topic] = {}
        self._local: dict[int, Partition] = {}
        self._wake = asyncio.Event()
        self._reconciled = 0
        self._reconciled_changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._orphans_checked = False
        self._closed = False
        #: The replica set each local partition was last told to end with.
        self._targets: dict[int, frozenset[int]] = {}

    # -- lookups (hot path) --------------------------------------------------------------

    def topic(self, name: str) -> Topic:
        topic = self._topics.get(name)
        if topic is None:
            if name in self._controller.state.topics:
                raise LeaderNotAvailable(
                    f"topic {excerpt(name)} is being created on this node; retry"
                )
            raise UnknownTopic(
                f"unknown topic {excerpt(name)}: create it first (tidelog topic create)"
            )
        return topic

    def partition(self, name: str, index: int) -> tuple[Topic, Partition]:
        """The local replica of a partition, for the leader's request paths. NOT_LEADER (with
        the leader's address when known) when this node holds no replica of it."""
        topic = self.topic(name)
        count = topic.partition_count
        if not 0 <= index < count:
            raise UnknownPartition(
                f"topic {excerpt(name)} has no partition {index}; its partitions are 0..{count - 1}"
            )
        part = topic.local.get(index)
        if part is not None:
            return topic, part
        a = topic.record.partitions[index]
        view = self.view(a)
        if view.leader > 0 and view.leader != self.node_id:
            address = self._controller.address_of(view.leader) or ""
            raise NotLeader(
                f"{name}/{index}: node {self.node_id} holds no replica; node {view.leader} "
                f"leads it" + (f" at {address}" if address else ""),
                leader_id=str(view.leader),
                leader_address=address,
            )
        raise LeaderNotAvailable(f"{name}/{index}: no leader is known right now; retry")

    def topics(self, names: Iterable[str] | None = None) -> list[Topic]:
        """Every topic (sorted), or the named ones (UnknownTopic for a missing one)."""
        if names is None:
            return [self._topics[n] for n in sorted(self._topics)]
        return [self.topic(n) for n in names]

    def partitions(self) -> list[Partition]:
        """The replicas hosted here."""
        return list(self._local.values())

    def leading(self) -> list[tuple[int, int]]:
        """(group id, term) of every partition this node leads (heartbeat reports)."""
        return [
            (gid, p.term)
            for gid, p in self._local.items()
            if p.role == Role.LEADER and not p.closed
        ]

    @property
    def cluster_state(self) -> ClusterState:
        return self._controller.state

    def conf_reports(self) -> dict[int, tuple[frozenset[int], frozenset[int]]]:
        """The committed (voters, learners) of the groups led here: the configuration in
        force (``Partition.conf_state``, which survives restarts), so a report lost in a
        controller failover or a restart is sent again."""
        out = {}
        for gid, p in self._local.items():
            if p.closed or not p.is_leader:
                continue
            conf = p.conf_state
            out[gid] = (frozenset(conf.voters), frozenset(conf.learners))
        return out

    def _on_conf_changed(
        self, topic: str, partition: int, voters: frozenset[int], learners: frozenset[int]
    ) -> None:
        # A committed configuration: the heartbeat carries it (conf_reports) when this node
        # leads the group; send one now rather than in up to 250 ms.
        self._controller.heartbeat_now()

    def local_partition(self, group_id: int) -> Partition | None:
        """The replica of Raft group ``group_id`` this node holds, if any."""
        return self._local.get(group_id)

    def touch_group(self, part: Partition) -> None:
        """Have the Raft driver look at ``part``'s group at its next round."""
        if part.group is not None:
            self._raft.touch(part.group)

    def transfer(self, group_id: int, to: int) -> None:
        """Hand the leadership of a group led here to node ``to`` (leader balance)."""
        part = self._local.get(group_id)
        if part is None or part.closed or not part.is_leader or part.group is None:
            return
        part.group.raw.transfer_leadership(to)
        self._raft.touch(part.group)

    def move_progress(self, part: Partition) -> dict[int, tuple[int, int]]:
        """Learner node id -> (bytes copied, bytes left) of a move the local leader drives
        ({} elsewhere)."""
        catchup = self.catchup
        if catchup is None:
            return part.move_progress()
        sent = catchup.sent_to
        return part.move_progress(lambda node: sent.get((part.group_id, node), 0))

    def _tell_target(self, part: Partition, a: PartitionAssignment) -> None:
        target = frozenset(a.target if a.target is not None else a.replicas)
        if self._targets.get(part.group_id) == target:
            return
        self._targets[part.group_id] = target
        part.set_target_replicas(target)

    def view(self, a: PartitionAssignment) -> PartitionView:
        """Leader, term and in-sync replicas as this node knows them: from its replica when it
        has one, else from the controller's leader hints (dead nodes excluded)."""
        nodes = self._controller.state.nodes
        alive = [r for r in a.replicas if (n := nodes.get(r)) is not None and n.alive]
        part = self._local.get(a.group_id)
        if part is not None and not part.closed:
            leader = part.leader_id
            if part.is_leader:
                in_sync = [r for r in part.in_sync() if r in alive or r == self.node_id]
                return PartitionView(a, leader, part.term, in_sync, part)
            if leader != NONE:
                return PartitionView(a, leader, part.term, alive, part)
            return PartitionView(a, -1, part.term, [], part)
        if a.leader != NO_LEADER and a.leader in alive:
            return PartitionView(a, a.leader, a.leader_term, alive, None)
        return PartitionView(a, -1, a.leader_term, [], None)

    def partition_stats(self) -> list[PartitionStats]:
        """Runs on the metrics HTTP thread: reads plain attributes only, and skips a
        partition that is being deleted under it rather than failing the whole scrape."""
        out = []
        for p in list(self._local.values()):
            lg = p.log
            idem = p.idempotence
            table = p.table
            try:
                lags = p.follower_lags()
                nodes = self._controller.state.nodes
                in_sync = [
                    r
                    for r in p.in_sync()
                    if r == self.node_id or ((n := nodes.get(r)) is not None and n.alive)
                ]
                out.append(
                    PartitionStats(
                        p.topic,
                        p.index,
                        lg.size_bytes,
                        lg.log_start_offset,
                        lg.log_end_offset,
                        p.high_watermark,
                        lg.segment_count,
                        raft_term=p.term,
                        raft_role=int(p.role),
                        leader_id=p.leader_id,
                        follower_lags=tuple(lags),
                        under_replicated=p.is_leader and len(in_sync) < len(p.replicas),
                        elections_started=p.elections_started,
                        elections_won=p.elections_won,
                        producers=len(idem.state),
                        msg_ids=len(idem.msg_ids),
                        duplicates=idem.counters.duplicates,
                        msg_id_duplicates=idem.counters.msg_id_duplicates,
                        out_of_order=idem.counters.out_of_order,
                        fenced=idem.counters.fenced,
                        unknown_producer=idem.counters.unknown_producer,
                        table_keys=None if table is None else table.key_count(),
                        table_lag=(
                            0 if table is None else max(0, p.high_watermark - table.applied_offset)
                        ),
                        cleaner=_cleaner_stats(lg),
                    )
                )
            except Exception:
                continue
        return out

    # -- reconciling with the controller's state -----------------------------------------

    def start(self) -> None:
        self._dir.mkdir(parents=True, exist_ok=True)
        self._task = asyncio.get_running_loop().create_task(self._run(), name="reconcile")
        self.schedule()

    def schedule(self) -> None:
        """The controller's state changed: reconcile soon."""
        self._wake.set()

    @property
    def reconciled_index(self) -> int:
        return self._reconciled

    async def wait_reconciled(self, index: int, timeout_s: float) -> None:
        """Return once the replicas hosted here match the state up to ``index``."""
        try:
            async with asyncio.timeout(timeout_s):
                while self._reconciled < index:
                    await self._reconciled_changed.wait()
        except TimeoutError:
            raise RequestTimedOut(
                f"node {self.node_id} did not set up its replicas for metadata index {index} "
                f"within {timeout_s * 1000:.0f} ms; they will follow"
            ) from None

    async def _run(self) -> None:
        retry_s = reconcile_retry_first_s
        while not self._closed:
            await self._wake.wait()
            self._wake.clear()
            try:
                complete = await self._reconcile()
            except Exception:
                log.exception("reconciling the local replicas failed; retrying in %.0f s", retry_s)
                complete = False
            if complete:
                retry_s = reconcile_retry_first_s
                continue
            # A replica whose log could not be opened (an I/O error of its disk) is opened
            # again later, not left closed until the controller's state changes; the wait
            # doubles while it keeps failing, so a broken disk is not hammered (nor the log
            # flooded) every second.
            with contextlib.suppress(TimeoutError):
                # A change of the controller's state (which wakes the loop) goes at once.
                await asyncio.wait_for(self._wake.wait(), retry_s)
            retry_s = min(retry_s * 2, reconcile_retry_max_s)
            self._wake.set()

    async def _reconcile(self) -> bool:
        """Returns False if some replica's log could not be opened (to try again later)."""
        controller = self._controller
        state = controller.state
        target = controller.applied_index
        # What ``desired`` reflects: the opening below awaits, and the controller may apply
        # more meanwhile (a topic created then is not in ``desired``, yet not an orphan).
        desired_at = state.applied_index
        desired: dict[int, tuple[TopicRecord, PartitionAssignment]] = {}
        for name, p in state.replicas_on(self.node_id):
            record = state.topics[name]
            a = record.partitions[p]
            desired[a.group_id] = (record, a)

        for gid, part in list(self._local.items()):
            if gid not in desired:
                await self._drop(part, deleted=state.locate_group(gid) is None)

        topics: dict[str, Topic] = {}
        for name, record in state.topics.items():
            old = self._topics.get(name)
            if old is not None and old.record.topic_id == record.topic_id:
                if old.record is not record:
                    old.record = record
                    config = record.config()
                    if config != old.config:
                        old.config = config
                        for part in old.local.values():
                            part.update_config(config)
                            if config.compacted != (part.table is not None):
                                part.set_table(self._table_for(record, part.index, part.group_id))
                topics[name] = old
            else:
                topics[name] = Topic(record, self._metrics.topic(name))
        for name in self._topics.keys() - topics.keys():
            self._metrics.forget_topic(name)
        self._topics = topics

        new = [(r, a) for gid, (r, a) in desired.items() if gid not in self._local]
        complete = True
        if new:
            complete = await self._open(new)
        for gid, (_r, a) in desired.items():
            local = self._local.get(gid)
            if local is not None and not local.closed:
                self._tell_target(local, a)
        if not self._orphans_checked and controller.replayed.is_set():
            self._orphans_checked = True
            await asyncio.to_thread(self._remove_orphans, desired, desired_at)

        self._reconciled = max(self._reconciled, target)
        event, self._reconciled_changed = self._reconciled_changed, asyncio.Event()
        event.set()
        return complete

    async def _open(self, new: list[tuple[TopicRecord, PartitionAssignment]]) -> bool:
        """Open the replicas ``new``; False if some log could not be opened."""

        def open_all() -> list[LogLike | BaseException]:
            out: list[LogLike | BaseException] = []
            for record, a in new:
                directory = self._dir / topic_dir_name(record.name, record.topic_id)
                try:
                    out.append(self._open_log(directory / str(a.partition), record.config()))
                except Exception as exc:
                    out.append(exc)
            return out

        logs = await asyncio.to_thread(open_all)
        lone: list[Partition] = []
        complete = True
        for (record, a), lg in zip(new, logs, strict=True):
            if isinstance(lg, BaseException):
                log.error("%s/%d: cannot open the log (retrying): %s", record.name, a.partition, lg)
                complete = False
                continue
            topic = self._topics.get(record.name)
            if topic is None or topic.record.topic_id != record.topic_id:
                lg.close()  # deleted meanwhile (the next pass removes the files)
                continue
            config = topic.config
            part = Partition(
                record.name,
                a.partition,
                lg,
                config,
                group_id=a.group_id,
                replicas=a.replicas,
                address_of=self._controller.address_of,
                table=self._table_for(record, a.partition, a.group_id),
            )
            voters = frozenset(a.replicas)
            # The initial configuration; the stored one (membership changes) wins. A replica
            # opened for a move onto this node starts as a learner: it never votes before a
            # committed configuration makes it a voter.
            learners = frozenset(a.hosts) - voters
            group = self._raft.add_group(
                a.group_id,
                lg,
                ConfState(voters=voters, learners=learners),
                part,
                durable=config.flush != "os",
                config=self._raft_config,
                logged_conf=True,
                # On a new data directory: a group older than it is not bootstrapped by new
                # replicas (a majority of wiped disks must not elect an empty log).
                bootstrap=self._controller.group_newer_than_directory(a.group_id),
            )
            if self.snapshots is not None:
                self.snapshots.load_into(part)
            part.on_conf_changed = self._on_conf_changed
            part.attach(group, self._raft)
            if self.catchup is not None:
                self.catchup.attach(group, _applied_of(part), part.snapshot_state)
            self._local[a.group_id] = part
            topic.local[a.partition] = part
            fresh = group.raw.term == 0 and lg.last_index == 0
            if a.replicas == (self.node_id,):
                self._raft.campaign(group)  # nobody else can win
                lone.append(part)
            elif fresh and a.preferred_leader == self.node_id and self.node_id in a.replicas:
                self._raft.campaign(group)
        if lone:
            # Lone replicas lead after one round: wait for it, so the topic this node just
            # reported created serves reads at once.
            try:
                async with asyncio.timeout(lone_leader_wait_ms / 1000):
                    while not all(p.serving or p.closed for p in lone):
                        await lone[0].changed().wait()
            except TimeoutError:
                log.warning("lone partition replicas did not become leaders in time")
        return complete

    def _table_for(self, record: TopicRecord, index: int, group_id: int) -> PartitionTable | None:
        """A new (not yet recovered) table for a replica of ``record``, if it is compacted."""
        if self.tables is None or not record.config().compacted:
            return None
        return PartitionTable(
            self.tables,
            group_id,
            f"{record.name}/{index}/{record.topic_id}",
            f"{record.name}/{index}",
        )

    async def _drop(self, part: Partition, *, deleted: bool) -> None:
        del self._local[part.group_id]
        self._targets.pop(part.group_id, None)
        if self.snapshots is not None:
            self.snapshots.forget(part.group_id)
        topic = self._topics.get(part.topic)
        if topic is not None and topic.local.get(part.index) is part:
            del topic.local[part.index]
        if deleted:
            part.close_for_delete()
        else:
            part.close_for_move()
        await self._raft.remove_group(part.group_id, forget=True)
        if part.table is not None:
            try:
                part.table.drop()
            except Exception:
                log.exception("dropping the table of %s/%d failed", part.topic, part.index)
        if self.catchup is not None:
            self.catchup.forget(part.group_id)
        lg = part.log

        def remove() -> None:
            directory = getattr(lg, "directory", None)
            if isinstance(directory, Path):
                shutil.rmtree(stage_dir(directory), ignore_errors=True)
            try:
                lg.delete()
            except Exception:
                log.exception("deleting the log of %s/%d failed", part.topic, part.index)
            parent = getattr(lg, "directory", None)
            if isinstance(parent, Path):
                try:
                    parent.parent.rmdir()  # the topic directory, once its last replica went
                except OSError:
                    pass

        await asyncio.to_thread(remove)
        log.info(
            "%s/%d: replica removed (%s)",
            part.topic, part.index, "topic deleted" if deleted else "moved away",
        )  # fmt: skip

    def _remove_orphans(
        self, desired: dict[int, tuple[TopicRecord, PartitionAssignment]], applied: int
    ) -> None:
        keep = {(topic_dir_name(r.name, r.topic_id), str(a.partition)) for r, a in desired.values()}
        if self.tables is not None:
            compacted = {gid for gid, (r, _a) in desired.items() if r.config().compacted}
            for gid in drop_tables_except(self.tables, compacted):
                log.warning(
                    "dropped the table of raft group %d: no compacted replica here owns it", gid
                )
        if not self._dir.is_dir():
            return
        for topic_dir in sorted(self._dir.iterdir()):
            m = _TOPIC_DIR_RE.match(topic_dir.name)
            if m is None or not topic_dir.is_dir():
                log.warning("ignoring %s: not a topic directory of this version", topic_dir)
                continue
            if int(m.group("topic_id")) > applied:
                continue  # created by metadata this node has not applied yet: keep
            for part_dir in sorted(topic_dir.iterdir()):
                # A catch-up copy in progress (node/catchup.py) belongs to its replica.
                name = part_dir.name.removesuffix(STAGE_SUFFIX)
                if (topic_dir.name, name) not in keep:
                    log.warning("removing %s: no replica of this node owns it", part_dir)
                    shutil.rmtree(part_dir, ignore_errors=True)
            try:
                topic_dir.rmdir()
            except OSError:
                pass

    # -- debugging -----------------------------------------------------------------------

    def log_of_group(self, group_id: int) -> LogLike | None:
        """The log of this node's replica of a partition group (None: no open replica)."""
        part = self._local.get(group_id)
        return None if part is None or part.closed else part.log

    async def digest(self, request: cluster_pb2.LogDigestRequest) -> cluster_pb2.LogDigestResponse:
        """CRC-32C of each local replica's stored batches below its high watermark (or a
        given lower offset), to compare replicas byte for byte."""
        names = set(request.topics)
        parts = [
            p for p in self._local.values() if not p.closed and (not names or p.topic in names)
        ]
        out = []
        for p in sorted(parts, key=lambda q: (q.topic, q.index)):
            hw = end = p.high_watermark
            if request.end_offset:
                end = min(end, request.end_offset)
            try:
                start, crc, covered = await digest_log(p.log, end)
            except StorageError:
                if p.closed:
                    continue  # closed meanwhile: left out, as one closed before is
                raise
            out.append(
                cluster_pb2.PartitionDigest(
                    topic=p.topic,
                    partition=p.index,
                    log_start_offset=start,
                    high_watermark=hw,
                    digest_end_offset=covered,
                    crc32c=crc,
                    commit_index=p.group.raw.commit_index if p.group else 0,
                    term=p.term,
                    role=int(p.role),
                    leader=p.leader_id,
                    group=p.group.group_id if p.group else 0,
                )
            )
        return cluster_pb2.LogDigestResponse(node_id=self.node_id, partitions=out)

    # -- shutdown ------------------------------------------------------------------------

    async def close(self) -> None:
        """Close every replica's log (after the Raft driver's last round: see Node.stop)."""
        self._closed = True
        self._wake.set()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        parts = list(self._local.values())
        for p in parts:
            p.close_for_shutdown()
            await self._raft.remove_group(p.group_id, forget=False)
        self._local.clear()
        self._topics.clear()

        def close_all() -> None:
            for p in parts:
                try:
                    p.log.close()
                except Exception:
                    log.exception("closing a partition log failed")

        await asyncio.to_thread(close_all)


def _applied_of(part: Partition) -> Callable[[], int]:
    return lambda: part.applied_index


#: Bytes a digest reads between two turns of the event loop.
_DIGEST_CHUNK_BYTES: Final = 1 << 20
#: Digests begun again from a moved log start before the last one is answered as it is.
_DIGEST_RESTARTS_MAX: Final = 8


async def digest_log(lg: LogLike, end: int) -> tuple[int, int, int]:
    """CRC-32C over the stored batches from the log start up to the last one ending at or
    below ``end``; returns the log start it began at, the CRC and the offset it stops at.

    It reads on the event loop, one chunk per turn, like Fetch: the log belongs to the loop's
    thread, which may replace its segments meanwhile (retention deleting the front, a
    catch-up copy adopted; ``PartitionLog.adopt`` empties the segment list before it fills it
    again), and a reader in a worker thread saw that half-done state (an IndexError). Between
    two chunks the log may change; the committed batches below ``end`` are the same bytes in
    every version of it, so only a log start moved beyond the next offset matters: the
    digest begins again from the new start."""
    restarts = 0
    while True:
        start = offset = lg.log_start_offset
        crc = 0
        try:
            while offset < end:
                data = lg.read(offset, _DIGEST_CHUNK_BYTES, upto=end)
                if not data:
                    break
                crc = crc32c.crc32c(data, crc)
                for _pos, h in iter_headers(data):
                    offset = h.last_offset + 1
                await asyncio.sleep(0)
        except OffsetOutOfRange:
            if restarts >= _DIGEST_RESTARTS_MAX or lg.log_start_offset <= offset:
                raise
            restarts += 1
            continue
        return start, crc, offset


__all__ = ["LogOpener", "PartitionView", "Topic", "TopicRegistry", "topic_dir_name"]
