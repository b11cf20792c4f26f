"""Prometheus metrics of one node (``tidelog_`` prefix), served on the node's metrics port.

Costs decide the shape: ``.labels(...)`` costs more than the
increment itself, so the hot paths hold pre-bound children (:class:`ApiMetrics` per API,
:class:`TopicMetrics` per topic) and count once per batch with the header's record count,
never once per record. Per-partition gauges (log size, offsets) are not updated on every
append at all: a collector reads them from the live partitions when Prometheus scrapes.

Conventions (docs/operations.md#metrics): a leader or controller id is **0 when there is
none** (node ids start at 1), in every metric; a replica's Raft role is a label
(``tidelog_raft_replica_role{role="leader"}`` is 1 on the leader, 0 on the others); each
registry also carries prometheus_client's process, platform and GC collectors
(``process_*``, ``python_*``) and ``tidelog_build_info``.
"""

from __future__ import annotations

import importlib.metadata
import platform
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from tidelog.node.log.clean_state import CleanerStats
from tidelog.node.raft.guard import Refusal

# Seconds. Produce under acks=all includes the group commit's fsync (hundreds of us to ms).
_LATENCY_BUCKETS_S = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
#: raft.types.Role values, as the ``role`` label of ``tidelog_raft_replica_role``.
ROLE_NAMES = ("follower", "pre_candidate", "candidate", "leader")

_FSYNC_BUCKETS_S = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
    0.5, 1.0,
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class PartitionStats:
    """What the scrape-time collector reports for one partition."""

    topic: str
    partition: int
    size_bytes: int
    log_start_offset: int
    log_end_offset: int
    high_watermark: int
    segment_count: int
    #: Raft view of this replica (defaults: no group).
    raft_term: int = 0
    #: raft.types.Role value: 0 follower, 1 pre-candidate, 2 candidate, 3 leader.
    raft_role: int = 0
    leader_id: int = 0
    #: On the leader: (follower id, entries the follower lacks).
    follower_lags: tuple[tuple[int, int], ...] = ()
    #: On the leader: replicas not caught up (fewer in sync than replicas).
    under_replicated: bool = False
    elections_started: int = 0
    elections_won: int = 0
    #: Idempotence (node/idempotence.py): producer ids and msg-ids held, and request totals.
    producers: int = 0
    msg_ids: int = 0
    duplicates: int = 0
    msg_id_duplicates: int = 0
    out_of_order: int = 0
    fenced: int = 0
    unknown_producer: int = 0
    #: Compacted topics (node/table.py): keys in the replica's table and how far its applied
    #: offset is behind the high watermark; None for a partition without a table.
    table_keys: int | None = None
    table_lag: int = 0
    #: The log cleaner's figures (node/log/cleaner.py), for compacted partitions only.
    cleaner: CleanerStats | None = None


class _PartitionCollector(Collector):
    def __init__(self, source: Callable[[], Iterable[PartitionStats]]) -> None:
        self._source = source

    def collect(self) -> Iterator[Metric]:
        labels = ["topic", "partition"]
        size = GaugeMetricFamily(
            "tidelog_log_size_bytes", "Bytes of segment files of a partition.", labels=labels
        )
        start = GaugeMetricFamily(
            "tidelog_log_start_offset", "First offset still in a partition's log.", labels=labels
        )
        end = GaugeMetricFamily(
            "tidelog_log_end_offset", "Offset the next appended record gets.", labels=labels
        )
        hw = GaugeMetricFamily(
            "tidelog_high_watermark", "Offset one past the last committed record.", labels=labels
        )
        segments = GaugeMetricFamily(
            "tidelog_log_segments", "Segment files of a partition.", labels=labels
        )
        term = GaugeMetricFamily(
            "tidelog_raft_term", "Current Raft term of a partition replica.", labels=labels
        )
        role = GaugeMetricFamily(
            "tidelog_raft_role",
            "Raft role of a partition replica as a number: 0 follower, 1 pre-candidate, 2 "
            "candidate, 3 leader (kept for old dashboards; use tidelog_raft_replica_role).",
            labels=labels,
        )
        role_set = GaugeMetricFamily(
            "tidelog_raft_replica_role",
            "1 for the Raft role a partition replica has, 0 for the others (role: follower, "
            "pre_candidate, candidate, leader).",
            labels=[*labels, "role"],
        )
        leader = GaugeMetricFamily(
            "tidelog_raft_leader",
            "Node id of the leader this replica knows of (0: none).",
            labels=labels,
        )
        lag = GaugeMetricFamily(
            "tidelog_raft_follower_lag_entries",
            "On a leader: Raft entries a follower lacks (leader's last index - match).",
            labels=[*labels, "follower"],
        )
        started = CounterMetricFamily(
            "tidelog_raft_elections_started",
            "Elections (or pre-votes) this replica started.",
            labels=labels,
        )
        won = CounterMetricFamily(
            "tidelog_raft_elections_won", "Elections this replica won.", labels=labels
        )
        producers = GaugeMetricFamily(
            "tidelog_idempotent_producers",
            "Producer ids whose sequence state a partition replica holds.",
            labels=labels,
        )
        msg_ids = GaugeMetricFamily(
            "tidelog_dedup_msg_ids",
            "Msg-ids a partition replica remembers for message.dedup.window.ms.",
            labels=labels,
        )
        refused = CounterMetricFamily(
            "tidelog_idempotence_requests",
            "Produce batches the leader did not append as new, by outcome: duplicate (same "
            "producer sequence, answered with the original offsets), msg_id_duplicate, "
            "out_of_order, fenced, unknown_producer.",
            labels=[*labels, "outcome"],
        )
        table_keys = GaugeMetricFamily(
            "tidelog_table_keys",
            "Keys in a compacted partition replica's table (its latest value per key).",
            labels=labels,
        )
        table_lag = GaugeMetricFamily(
            "tidelog_table_applied_lag_records",
            "Offsets a compacted partition replica's table has not applied yet: high "
            "watermark - the table's applied offset (0 when caught up).",
            labels=labels,
        )
        c_runs = CounterMetricFamily(
            "tidelog_cleaner_runs",
            "Log cleaner runs that finished on a compacted partition replica.",
            labels=labels,
        )
        c_reclaimed = CounterMetricFamily(
            "tidelog_cleaner_reclaimed_bytes",
            "Bytes the log cleaner removed from a compacted partition replica.",
            labels=labels,
        )
        c_io = CounterMetricFamily(
            "tidelog_cleaner_io_bytes",
            "Bytes the log cleaner read and wrote for a partition replica (its rate is the "
            "cleaner's I/O rate, bounded by --cleaner-io-bytes-per-second per node).",
            labels=labels,
        )
        c_dirty = GaugeMetricFamily(
            "tidelog_cleaner_dirty_ratio",
            "Share of the cleanable log of a compacted partition replica not cleaned yet.",
            labels=labels,
        )
        c_lag = GaugeMetricFamily(
            "tidelog_cleaner_compaction_lag_seconds",
            "Age of the oldest record of the closed segments the cleaner has not cleaned yet "
            "(an upper bound of how long a superseded record has stayed); 0: all clean.",
            labels=labels,
        )
        c_tomb = GaugeMetricFamily(
            "tidelog_cleaner_tombstone_age_seconds",
            "Age of the oldest tombstone the last cleaner run kept (0: none); it should stay "
            "below delete.retention.ms plus the time between runs.",
            labels=labels,
        )
        leaderless = 0
        under = 0
        for s in self._source():
            key = [s.topic, str(s.partition)]
            size.add_metric(key, s.size_bytes)
            start.add_metric(key, s.log_start_offset)
            end.add_metric(key, s.log_end_offset)
            hw.add_metric(key, s.high_watermark)
            segments.add_metric(key, s.segment_count)
            term.add_metric(key, s.raft_term)
            role.add_metric(key, s.raft_role)
            for number, name in enumerate(ROLE_NAMES):
                role_set.add_metric([*key, name], 1 if s.raft_role == number else 0)
            leader.add_metric(key, s.leader_id)
            for follower, entries in s.follower_lags:
                lag.add_metric([*key, str(follower)], entries)
            started.add_metric(key, s.elections_started)
            won.add_metric(key, s.elections_won)
            producers.add_metric(key, s.producers)
            msg_ids.add_metric(key, s.msg_ids)
            for outcome, n in (
                ("duplicate", s.duplicates),
                ("msg_id_duplicate", s.msg_id_duplicates),
                ("out_of_order", s.out_of_order),
                ("fenced", s.fenced),
                ("unknown_producer", s.unknown_producer),
            ):
                refused.add_metric([*key, outcome], n)
            if s.table_keys is not None:
                table_keys.add_metric(key, s.table_keys)
                table_lag.add_metric(key, s.table_lag)
            if (c := s.cleaner) is not None:
                c_runs.add_metric(key, c.runs)
                c_reclaimed.add_metric(key, c.bytes_reclaimed)
                c_io.add_metric(key, c.io_bytes)
                c_dirty.add_metric(key, c.dirty_ratio)
                c_lag.add_metric(key, c.compaction_lag_ms / 1000)
                c_tomb.add_metric(key, c.tombstone_age_ms / 1000)
            leaderless += s.leader_id == 0
            under += s.under_replicated
        yield from (size, start, end, hw, segments, term, role, role_set, leader, lag)
        yield from (started, won)
        yield from (producers, msg_ids, refused)
        yield from (table_keys, table_lag)
        yield from (c_runs, c_reclaimed, c_io, c_dirty, c_lag, c_tomb)
        yield GaugeMetricFamily(
            "tidelog_leaderless_partitions",
            "Partition replicas on this node that know of no leader.",
            value=leaderless,
        )
        yield GaugeMetricFamily(
            "tidelog_under_replicated_partitions",
            "Partitions led by this node with a replica not caught up.",
            value=under,
        )

    def describe(self) -> Iterator[Metric]:
        # No samples at registration time: the collector is called only at scrape.
        return iter(())


class _ControllerCollector(Collector):
    def __init__(self, leader_of: Callable[[], int]) -> None:
        self._leader_of = leader_of

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "tidelog_controller_leader",
            "Node id of the active controller (leader of Raft group 0) this node knows of; "
            "0 when none.",
            value=max(0, self._leader_of()),
        )

    def describe(self) -> Iterator[Metric]:
        return iter(())


@dataclass(frozen=True, slots=True)
class RecoveryStats:
    """What this node sent to replicas catching up from it, under its recovery rate."""

    #: Bytes of streamed copies (CatchupRead chunks) and of APPENDs to followers far behind.
    streamed_bytes: int
    append_bytes: int
    #: The rate in force (``replica.recovery.bytes.per.second``; 0: unlimited).
    rate: int


class _RecoveryCollector(Collector):
    def __init__(self, source: Callable[[], RecoveryStats]) -> None:
        self._source = source

    def collect(self) -> Iterator[Metric]:
        try:
            s = self._source()
        except Exception:  # the node is starting or stopping: skip this scrape
            return
        sent = CounterMetricFamily(
            "tidelog_replica_recovery_sent_bytes",
            "Bytes this node sent to replicas catching up from it at the recovery rate: "
            "streamed copies (path=stream) and APPENDs to followers far behind "
            "(path=append).",
            labels=["path"],
        )
        sent.add_metric(["stream"], s.streamed_bytes)
        sent.add_metric(["append"], s.append_bytes)
        yield sent
        yield GaugeMetricFamily(
            "tidelog_replica_recovery_rate_bytes_per_second",
            "The recovery rate in force on this node (replica.recovery.bytes.per.second, "
            "the cluster setting or else the node's flag; 0: unlimited).",
            value=s.rate,
        )

    def describe(self) -> Iterator[Metric]:
        return iter(())


@dataclass(frozen=True, slots=True)
class GroupStats:
    """One consumer group this node coordinates, as the coordinators' ticker last saw it."""

    group_id: str
    members: int
    epoch: int
    #: (topic, partition, lag in records) of every partition with a committed offset.
    lags: tuple[tuple[str, int, int], ...]


#: Bounds on the series of consumer groups one node exports (label cardinality).
GROUPS_EXPORTED_MAX = 1000
GROUP_LAG_SERIES_MAX = 20_000


class _GroupCollector(Collector):
    def __init__(self, source: Callable[[], Sequence[GroupStats]], rebalances: Callable[[], int]):
        self._source = source
        self._rebalances = rebalances

    def collect(self) -> Iterator[Metric]:
        members = GaugeMetricFamily(
            "tidelog_group_members",
            "Members of a consumer group this node coordinates.",
            labels=["group"],
        )
        epoch = GaugeMetricFamily(
            "tidelog_group_epoch",
            "Group epoch of a consumer group this node coordinates.",
            labels=["group"],
        )
        lag = GaugeMetricFamily(
            "tidelog_group_lag_records",
            "Records between a group's committed offset and the partition's high watermark "
            "(as this node's replica sees it), for groups this node coordinates.",
            labels=["group", "topic", "partition"],
        )
        series = 0
        for stats in list(self._source())[:GROUPS_EXPORTED_MAX]:
            members.add_metric([stats.group_id], stats.members)
            epoch.add_metric([stats.group_id], stats.epoch)
            for topic, partition, records in stats.lags:
                if series >= GROUP_LAG_SERIES_MAX:
                    break
                lag.add_metric([stats.group_id, topic, str(partition)], records)
                series += 1
        yield members
        yield epoch
        yield lag
        yield CounterMetricFamily(
            "tidelog_group_rebalances",
            "Target assignments computed by this node's group coordinators since it started.",
            value=self._rebalances(),
        )


@dataclass(frozen=True, slots=True)
class ShapeStats:
    """The cluster's shape as this node's metadata has it (issue 11), for the scrape.
    Per-node series are bounded by the registered nodes."""

    #: node id -> (replicas, leaders, alive, draining, reprovisioning deadline in Unix s or 0)
    nodes: Mapping[int, tuple[int, int, bool, bool, float]]
    moves_in_progress: int
    moves_stalled: int
    #: Entries the learners of the moves this node leads still lack (summed).
    move_entries_left: int
    #: The controller group's voters (its committed configuration on this node).
    controller_voters: frozenset[int] = frozenset()
    #: A controller voter change is in progress (a voter being replaced or refilled).
    controller_voter_change: bool = False
    #: Bytes of the leader's log the learners of the moves this node leads lack and hold.
    move_bytes_left: int = 0
    move_bytes_copied: int = 0


class _ShapeCollector(Collector):
    def __init__(self, source: Callable[[], ShapeStats | None]) -> None:
        self._source = source

    def collect(self) -> Iterator[Metric]:
        try:
            s = self._source()
        except Exception:  # the metadata changed under the scrape: skip this one
            return
        if s is None:
            return
        families = [
            GaugeMetricFamily(
                "tidelog_cluster_node_replicas",
                "Replicas each node holds or is taking (moves included), by the metadata.",
                labels=["node"],
            ),
            GaugeMetricFamily(
                "tidelog_cluster_node_leaders",
                "Partitions each node leads, by the controller's leader hints.",
                labels=["node"],
            ),
            GaugeMetricFamily(
                "tidelog_cluster_node_alive", "1 when the node is alive.", labels=["node"]
            ),
            GaugeMetricFamily(
                "tidelog_cluster_node_draining", "1 while the node is drained.", labels=["node"]
            ),
            GaugeMetricFamily(
                "tidelog_cluster_node_reprovision_deadline_seconds",
                "When a dead node's replicas are rebuilt elsewhere (Unix seconds; dead nodes "
                "only).",
                labels=["node"],
            ),
        ]
        for node_id, (replicas, leaders, alive, draining, deadline) in sorted(s.nodes.items()):
            label = [str(node_id)]
            families[0].add_metric(label, replicas)
            families[1].add_metric(label, leaders)
            families[2].add_metric(label, 1 if alive else 0)
            families[3].add_metric(label, 1 if draining else 0)
            if deadline:
                families[4].add_metric(label, deadline)
        yield from families
        yield GaugeMetricFamily(
            "tidelog_partition_moves_in_progress",
            "Partitions whose replicas are being moved (a target set).",
            value=s.moves_in_progress,
        )
        yield GaugeMetricFamily(
            "tidelog_partition_moves_stalled",
            "Partitions that need a move but cannot (no room) or whose move is held up "
            "(target down, no leader).",
            value=s.moves_stalled,
        )
        voter = GaugeMetricFamily(
            "tidelog_controller_voter",
            "1 for each node that is a controller voter (group 0's committed configuration).",
            labels=["node"],
        )
        for node_id in sorted(s.controller_voters):
            voter.add_metric([str(node_id)], 1)
        yield voter
        yield GaugeMetricFamily(
            "tidelog_controller_voter_change_in_progress",
            "1 while a controller voter is being replaced or a missing one refilled "
            "(cluster status says which and what it waits for).",
            value=1 if s.controller_voter_change else 0,
        )
        yield GaugeMetricFamily(
            "tidelog_replica_move_entries_left",
            "Log entries the learners of the moves this node leads still lack.",
            value=s.move_entries_left,
        )
        yield GaugeMetricFamily(
            "tidelog_replica_move_bytes_left",
            "Bytes of the leader's log the learners of the moves this node leads still lack.",
            value=s.move_bytes_left,
        )
        yield GaugeMetricFamily(
            "tidelog_replica_move_bytes_copied",
            "Bytes of the leader's log the learners of the moves this node leads hold.",
            value=s.move_bytes_copied,
        )

    def describe(self) -> Iterator[Metric]:
        return iter(())


class _DiskCollector(Collector):
    """Free and total bytes of the file system that holds the data directory."""

    def __init__(self, path: Path) -> None:
        self._path = path

    def collect(self) -> Iterator[Metric]:
        try:
            usage = shutil.disk_usage(self._path)
        except OSError:
            return
        yield GaugeMetricFamily(
            "tidelog_disk_free_bytes",
            "Bytes free on the file system of the data directory (for unprivileged users).",
            value=usage.free,
        )
        yield GaugeMetricFamily(
            "tidelog_disk_total_bytes",
            "Size in bytes of the file system of the data directory.",
            value=usage.total,
        )

    def describe(self) -> Iterator[Metric]:
        return iter(())


class ApiMetrics:
    """Pre-bound children of one API: the OK counter and the latency histogram."""

    __slots__ = ("_by_code", "_requests", "api", "latency", "ok")

    def __init__(self, api: str, requests: Counter, latency: Histogram) -> None:
        self.api = api
        self._requests = requests
        self.ok = requests.labels(api, grpc.StatusCode.OK.name)
        self.latency = latency.labels(api)
        self._by_code: dict[grpc.StatusCode, Counter] = {grpc.StatusCode.OK: self.ok}

    def count(self, code: grpc.StatusCode) -> None:
        child = self._by_code.get(code)
        if child is None:
            child = self._by_code[code] = self._requests.labels(self.api, code.name)
        child.inc()


class TopicMetrics:
    """Pre-bound per-topic data counters."""

    __slots__ = ("bytes_in", "bytes_out", "records_in", "records_out")

    def __init__(
        self, records_in: Counter, bytes_in: Counter, records_out: Counter, bytes_out: Counter
    ) -> None:
        self.records_in = records_in
        self.bytes_in = bytes_in
        self.records_out = records_out
        self.bytes_out = bytes_out


class NodeMetrics:
    """All metrics of a node, in their own registry (tests run several nodes per process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        # The default registry's collectors: CPU, memory, open files (process_*), the
        # interpreter (python_info) and its garbage collector (python_gc_*).
        for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
            r.register(collector)
        build = Gauge(
            "tidelog_build_info",
            "Always 1; the labels say which tidelog runs, on which Python.",
            ["version", "python"], registry=r,
        )  # fmt: skip
        build.labels(_version(), platform.python_version()).set(1)
        self._requests = Counter(
            "tidelog_requests", "gRPC requests handled, by API and status code.",
            ["api", "code"], registry=r,
        )  # fmt: skip
        self._latency = Histogram(
            "tidelog_request_latency_seconds", "Time to answer a request (Fetch: until the "
            "first response).", ["api"], buckets=_LATENCY_BUCKETS_S, registry=r,
        )  # fmt: skip
        self._records_in = Counter(
            "tidelog_records_in", "Records appended, by topic.", ["topic"], registry=r
        )
        self._bytes_in = Counter(
            "tidelog_bytes_in", "Batch bytes appended, by topic.", ["topic"], registry=r
        )
        self._records_out = Counter(
            "tidelog_records_out", "Records sent to consumers (whole batches), by topic.",
            ["topic"], registry=r,
        )  # fmt: skip
        self._bytes_out = Counter(
            "tidelog_bytes_out", "Batch bytes sent to consumers, by topic.", ["topic"], registry=r
        )
        self.fsyncs = Counter(
            "tidelog_fsyncs", "Partition log fsyncs (one per dirty partition per group commit).",
            registry=r,
        )  # fmt: skip
        self.fsync_latency = Histogram(
            "tidelog_fsync_latency_seconds", "Time of one partition log fsync.",
            buckets=_FSYNC_BUCKETS_S, registry=r,
        )  # fmt: skip
        self.group_commits = Counter(
            "tidelog_group_commits", "Group commit rounds (each fsyncs every dirty partition).",
            registry=r,
        )  # fmt: skip
        self.group_commit_partitions = Histogram(
            "tidelog_group_commit_partitions", "Partitions fsynced by one group commit round.",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024), registry=r,
        )  # fmt: skip
        self.raft_ready_rounds = Histogram(
            "tidelog_raft_ready_round_seconds",
            "Time of one Raft ready round: store, fsync, send, apply for every busy group.",
            buckets=_LATENCY_BUCKETS_S, registry=r,
        )  # fmt: skip
        self.raft_ready_groups = Histogram(
            "tidelog_raft_ready_round_groups", "Raft groups handled by one ready round.",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096), registry=r,
        )  # fmt: skip
        self.apply_failures = Counter(
            "tidelog_raft_apply_failures",
            "Raft groups stopped because a committed entry could not be applied (never skipped).",
            registry=r,
        )
        self.groups_quiet = Gauge(
            "tidelog_raft_groups_quiet",
            "Raft groups of this node that are quiet: idle, every replica holds everything, "
            "no heartbeats and no ticks until the next write or a peer's failure.",
            registry=r,
        )
        self.groups_offline = Gauge(
            "tidelog_raft_groups_offline",
            "Raft groups of this node taken offline (storage failure or an entry it cannot "
            "apply); they never advance again until the node restarts.",
            registry=r,
        )
        refused = Counter(
            "tidelog_raft_messages_refused",
            "Raft messages a group refused before stepping them (node/raft/guard.py): sender "
            "not a member, term too far ahead, append or snapshot not from the leader.",
            ["reason"], registry=r,
        )  # fmt: skip
        #: Pre-bound per reason (a fixed set: the values of ``raft.guard.Refusal``).
        self.raft_refused = {reason: refused.labels(reason.value) for reason in Refusal}
        #: Client requests being handled (node/rpc.py): a stopping node drains them first.
        self.in_flight = 0
        self._apis: dict[str, ApiMetrics] = {}
        self._topics: dict[str, TopicMetrics] = {}

    def api(self, name: str) -> ApiMetrics:
        api = self._apis.get(name)
        if api is None:
            api = self._apis[name] = ApiMetrics(name, self._requests, self._latency)
        return api

    def topic(self, name: str) -> TopicMetrics:
        topic = self._topics.get(name)
        if topic is None:
            topic = self._topics[name] = TopicMetrics(
                self._records_in.labels(name),
                self._bytes_in.labels(name),
                self._records_out.labels(name),
                self._bytes_out.labels(name),
            )
        return topic

    def forget_topic(self, name: str) -> None:
        """Drop a deleted topic's series, so a busy cluster's scrape does not grow forever."""
        if self._topics.pop(name, None) is None:
            return
        for family in (self._records_in, self._bytes_in, self._records_out, self._bytes_out):
            try:
                family.remove(name)
            except KeyError:
                pass

    def watch_partitions(self, source: Callable[[], Iterable[PartitionStats]]) -> None:
        """Report per-partition gauges from ``source`` at every scrape. ``source`` runs on the
        HTTP server's thread, so it must only read plain attributes."""
        self.registry.register(_PartitionCollector(source))

    def watch_groups(
        self, source: Callable[[], Sequence[GroupStats]], rebalances: Callable[[], int]
    ) -> None:
        """Report consumer groups this node coordinates at every scrape; ``source`` returns a
        snapshot the event loop built (it runs on the HTTP server's thread)."""
        self.registry.register(_GroupCollector(source, rebalances))

    def watch_shape(self, source: Callable[[], ShapeStats | None]) -> None:
        """Report the cluster's shape (replicas and leaders per node, moves) at every
        scrape; ``source`` runs on the HTTP thread and may fail (the scrape skips it)."""
        self.registry.register(_ShapeCollector(source))

    def watch_recovery(self, source: Callable[[], RecoveryStats]) -> None:
        """Report what catch-up sent under the recovery rate at every scrape."""
        self.registry.register(_RecoveryCollector(source))

    def watch_disk(self, data_dir: Path) -> None:
        """Report the data directory's file system (free, total) at every scrape."""
        self.registry.register(_DiskCollector(data_dir))

    def watch_controller(self, leader_of: Callable[[], int]) -> None:
        """Report the active controller this node knows of at every scrape."""
        self.registry.register(_ControllerCollector(leader_of))

    def serve(self, host: str, port: int) -> MetricsServer:
        server, thread = start_http_server(port, addr=host, registry=self.registry)
        return MetricsServer(server, thread)


def _version() -> str:
    try:
        return importlib.metadata.version("tidelog")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


class MetricsServer:
    def __init__(self, server: object, thread: object) -> None:
        self._server = server
        self._thread = thread

    @property
    def port(self) -> int:
        port = self._server.server_port  # type: ignore[attr-defined]
        assert isinstance(port, int)
        return port

    def close(self) -> None:
        self._server.shutdown()  # type: ignore[attr-defined]
        self._server.server_close()  # type: ignore[attr-defined]
