"""Consumer-group coordinators on this node: one per ``__consumer_offsets`` partition it leads.

Where groups live (docs/architecture.md says why): in the internal compacted topic
``__consumer_offsets``. A group belongs to partition ``crc32(group_id utf-8) % N`` (zlib's
CRC-32, stable across processes and versions; N the topic's partition count, fixed at
creation), and its coordinator is that partition's leader. Group state and committed offsets
are records of the partition (controller/groups/records.py), so the partition's Raft group
replicates them and its table (node/table.py) is their materialized view.

The topic is created through the controller like any topic the first time a node needs it
(``group.offsets.partitions`` partitions, default 12; replication min(3, live nodes);
``cleanup.policy=compact``).

A coordinator:

- **loads** as soon as its partition's leader serves (synced: what earlier terms committed
  is applied), or at the first group request: it waits until the table reflects the high
  watermark, replays the table into the pure state machine
  (controller/groups/state.py) and starts every session timer afresh (as Kafka does);
- **writes before it answers**: a heartbeat, commit or timeout that changes state yields
  records, which go through the partition's produce path as one batch with acks=all; only
  once committed are they applied to the in-memory state and the answer sent. Nothing a
  failover can undo is acknowledged. A heartbeat that changes nothing writes nothing;
- runs one request at a time (a lock per coordinator) so compute, write and apply are atomic;
- is **dropped** as soon as the partition's leadership or term changes; every request then
  fails with NOT_COORDINATOR and the client asks FindCoordinator again. A write that failed
  or timed out also drops it (the entry may still commit): the next request reloads it.

One background task per node ticks every coordinator every ``tick_ms``: it expires sessions
and rebalance timeouts and re-evaluates subscriptions when the cluster metadata changed.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tidelog.controller.groups.records import KIND_OFFSET, Record, group_prefix, parse_key
from tidelog.controller.groups.state import (
    CommitEntry,
    GroupConfig,
    GroupCoordinator,
    HeartbeatInput,
    HeartbeatOutcome,
    decode_offset,
)
from tidelog.errors import (
    CoordinatorLoading,
    LeaderNotAvailable,
    NotCoordinator,
    NotLeader,
    TidelogError,
    TopicExists,
)
from tidelog.node.controller_node import TopicSpec
from tidelog.node.metrics import GroupStats
from tidelog.records import encode_batch, unpack_header

if TYPE_CHECKING:
    from tidelog.node.controller_node import Controller
    from tidelog.node.partition import Partition
    from tidelog.node.table import TableRow
    from tidelog.node.topics import TopicRegistry

log = logging.getLogger(__name__)

OFFSETS_TOPIC = "__consumer_offsets"
#: Rows read from the table per scan while loading or deleting.
SCAN_ROWS_MAX = 1000


def partition_for(group_id: str, partitions: int) -> int:
    """The ``__consumer_offsets`` partition of a group: CRC-32 of its UTF-8 id, modulo."""
    return zlib.crc32(group_id.encode()) % partitions


@dataclass(frozen=True, slots=True)
class GroupSettings:
    offsets_partitions: int = 12
    offsets_replication_max: int = 3
    write_timeout_ms: int = 10_000
    load_timeout_ms: int = 10_000
    tick_ms: int = 100
    config: GroupConfig = field(default_factory=GroupConfig)


class Coordinator:
    """The groups of one ``__consumer_offsets`` partition, while this node leads it."""

    def __init__(self, part: Partition, settings: GroupSettings) -> None:
        self.part = part
        self.term = part.term
        self.settings = settings
        self.state = GroupCoordinator(settings.config)
        self.lock = asyncio.Lock()
        self.loaded = False
        self.dropped = False
        #: The offset of the last record written (OffsetFetch waits until the table has it).
        self.written_offset = -1
        self.metadata_version = -1
        #: Committed offsets by (group, topic, partition), for the lag metrics.
        self.committed: dict[tuple[str, str, int], int] = {}

    def _note_offsets(self, records: Iterable[Record]) -> None:
        for record in records:
            if record.key[:1] != b"G":
                continue
            parsed = parse_key(record.key)
            if parsed.kind != KIND_OFFSET or parsed.tp is None:
                continue
            key = (parsed.group_id, *parsed.tp)
            if record.value is None:
                self.committed.pop(key, None)
            else:
                self.committed[key] = decode_offset(record.value).offset

    def valid(self) -> bool:
        p = self.part
        return not self.dropped and p.serving and p.term == self.term

    def check(self, group_id: str) -> None:
        if not self.valid():
            self.dropped = True
            raise NotCoordinator(
                f"node no longer coordinates group {group_id!r} (leadership of "
                f"{OFFSETS_TOPIC}/{self.part.index} moved): find the coordinator again",
                group_id=group_id,
            )

    async def load(self, now_ms: Callable[[], int]) -> None:
        timeout_s = self.settings.load_timeout_ms / 1000
        part = self.part
        table = part.table
        if table is None:
            raise CoordinatorLoading(f"{OFFSETS_TOPIC}/{part.index} has no table yet; retry")
        # Serving means synced: everything earlier terms committed is applied here (a read
        # barrier would wait for an entry of this term, and an idle partition has none).
        if not part.serving:
            raise CoordinatorLoading(f"{OFFSETS_TOPIC}/{part.index}: not serving yet; retry")
        hw = part.high_watermark
        if hw > 0 and not await table.wait_applied(hw - 1, timeout_s):
            raise CoordinatorLoading(
                f"{OFFSETS_TOPIC}/{part.index}: the table did not reach offset {hw} in time"
            )
        rows: list[TableRow] = []
        with table.snapshot() as snap:
            start: bytes | None = None
            while True:
                page = snap.scan(prefix=b"G", start=start, limit=SCAN_ROWS_MAX)
                rows.extend(page)
                if len(page) < SCAN_ROWS_MAX:
                    break
                start = page[-1].key + b"\x00"
        records: list[Record] = []
        for r in rows:
            record = Record(r.key, r.value)
            try:
                self.state.apply([record], now_ms())
            except (ValueError, KeyError, TypeError) as exc:
                # A record the coordinators did not write (nothing else may produce here).
                log.warning("%s/%d: skipping an unreadable group record %r: %s",
                            OFFSETS_TOPIC, part.index, r.key[:64], exc)  # fmt: skip
                continue
            records.append(record)
        self._note_offsets(records)
        self.state.start_timers(now_ms())
        self.written_offset = hw - 1
        self.loaded = True
        log.info(
            "coordinating %d groups of %s/%d (term %d, %d records)",
            len(self.state.groups), OFFSETS_TOPIC, part.index, self.term, len(rows),
        )  # fmt: skip

    async def write(self, records: Sequence[Record], now_ms: int) -> None:
        """Commit ``records`` (acks=all), then apply them. Any failure drops the coordinator
        (the entry may still commit under a new leader, or later here)."""
        if not records:
            return
        buf = encode_batch(
            [r.value for r in records], [r.key for r in records], timestamps_ms=now_ms
        )
        waits: list[tuple[int, int]] = []
        try:
            _base, last, _index, _term = self.part.propose(
                buf,
                [(0, unpack_header(buf))],
                lambda _i, _b, index, term: waits.append((index, term)),
            )
            await self.part.wait_batches(
                waits, committed=True, timeout_s=self.settings.write_timeout_ms / 1000
            )
        except (NotLeader, LeaderNotAvailable) as exc:
            self.dropped = True
            raise NotCoordinator(
                f"{OFFSETS_TOPIC}/{self.part.index} lost its leadership while writing: "
                f"find the coordinator again ({exc.message})"
            ) from None
        except BaseException:
            self.dropped = True
            raise
        self.written_offset = last
        self.state.apply(records, now_ms)
        self._note_offsets(records)

    async def read_table_ready(self) -> None:
        table = self.part.table
        if table is None:
            raise CoordinatorLoading(f"{OFFSETS_TOPIC}/{self.part.index} has no table; retry")
        if self.written_offset >= 0 and not await table.wait_applied(
            self.written_offset, self.settings.load_timeout_ms / 1000
        ):
            raise CoordinatorLoading(f"{OFFSETS_TOPIC}/{self.part.index}: table lagging; retry")


class GroupRuntime:
    """Every coordinator of this node, and the node-wide parts (FindCoordinator, the topic)."""

    def __init__(
        self,
        registry: TopicRegistry,
        controller: Controller,
        settings: GroupSettings | None = None,
        *,
        clock_ms: Callable[[], int] | None = None,
    ) -> None:
        self.registry = registry
        self.controller = controller
        self.settings = settings or GroupSettings()
        self.now_ms = clock_ms or (lambda: time.time_ns() // 1_000_000)
        self.coordinators: dict[int, Coordinator] = {}
        self._creating: asyncio.Task[None] | None = None
        self._task: asyncio.Task[None] | None = None
        #: Target assignments computed here since the node started (a metric).
        self.rebalances = 0
        #: What the metrics export, rebuilt by the ticker on the event loop.
        self.stats: tuple[GroupStats, ...] = ()

    # ----- the topic -----

    def topics(self) -> dict[str, int]:
        return {
            name: len(record.partitions) for name, record in self.controller.state.topics.items()
        }

    def offsets_partitions(self) -> int | None:
        record = self.controller.state.topics.get(OFFSETS_TOPIC)
        return None if record is None else len(record.partitions)

    async def ensure_topic(self) -> int:
        """The partition count of ``__consumer_offsets``, creating it first if needed."""
        count = self.offsets_partitions()
        if count is not None:
            return count
        if self._creating is None or self._creating.done():
            self._creating = asyncio.create_task(self._create(), name="create-consumer-offsets")
        await asyncio.shield(self._creating)
        count = self.offsets_partitions()
        if count is None:
            raise LeaderNotAvailable(f"{OFFSETS_TOPIC} is being created; retry")
        return count

    async def _create(self) -> None:
        live = len(self.controller.state.live_node_ids())
        rf = max(1, min(self.settings.offsets_replication_max, live))
        spec = TopicSpec(
            OFFSETS_TOPIC,
            self.settings.offsets_partitions,
            rf,
            {"cleanup.policy": "compact"},
        )
        try:
            _, index = await self.controller.create_topics([spec], validate_only=False)
            log.info("created %s (%d partitions, replication %d)", OFFSETS_TOPIC,
                     spec.partitions, rf)  # fmt: skip
            await self.registry.wait_reconciled(index, self.settings.load_timeout_ms / 1000)
        except TopicExists:
            pass

    # ----- finding and getting coordinators -----

    async def find(self, group_id: str) -> tuple[int, str, int]:
        """(node id, client address, partition) of the group's coordinator, from metadata."""
        group_prefix(group_id)
        count = await self.ensure_topic()
        index = partition_for(group_id, count)
        record = self.controller.state.topics[OFFSETS_TOPIC]
        view = self.registry.view(record.partitions[index])
        address = self.controller.address_of(view.leader) if view.leader > 0 else None
        if view.leader <= 0 or not address:
            raise LeaderNotAvailable(
                f"{OFFSETS_TOPIC}/{index} (group {group_id!r}) has no leader right now; retry"
            )
        return view.leader, address, index

    async def coordinator(self, group_id: str) -> Coordinator:
        count = self.offsets_partitions()
        if count is None:
            raise NotCoordinator(
                f"no coordinator for group {group_id!r} yet: ask FindCoordinator",
                group_id=group_id,
            )
        index = partition_for(group_id, count)
        try:
            _, part = self.registry.partition(OFFSETS_TOPIC, index)
        except TidelogError:
            raise NotCoordinator(
                f"this node does not coordinate group {group_id!r}: find the coordinator",
                group_id=group_id,
            ) from None
        coord = self.coordinators.get(index)
        if coord is not None and not coord.valid():
            self.coordinators.pop(index, None)
            coord = None
        if coord is None:
            if not part.serving:
                raise NotCoordinator(
                    f"this node does not coordinate group {group_id!r} (it does not lead "
                    f"{OFFSETS_TOPIC}/{index}): find the coordinator",
                    group_id=group_id,
                )
            coord = self.coordinators[index] = Coordinator(part, self.settings)
        if not coord.loaded:
            async with coord.lock:
                if not coord.loaded:
                    try:
                        await coord.load(self.now_ms)
                    except TidelogError:
                        self.coordinators.pop(index, None)
                        raise
        coord.check(group_id)
        self._ensure_ticker()
        return coord

    # ----- operations -----

    async def heartbeat(self, req: HeartbeatInput) -> HeartbeatOutcome:
        coord = await self.coordinator(req.group_id)
        async with coord.lock:
            coord.check(req.group_id)
            await self._sync_metadata(coord)
            now = self.now_ms()
            before = coord.state.rebalances
            outcome = coord.state.heartbeat(
                req, now_ms=now, topics=self.topics(), new_member_id=uuid.uuid4().hex
            )
            await coord.write(outcome.records, now)
            self.rebalances += coord.state.rebalances - before
            return outcome

    async def commit(
        self, group_id: str, member_id: str, member_epoch: int, entries: Sequence[CommitEntry]
    ) -> None:
        coord = await self.coordinator(group_id)
        async with coord.lock:
            coord.check(group_id)
            now = self.now_ms()
            records = coord.state.commit(group_id, member_id, member_epoch, entries, now_ms=now)
            await coord.write(records, now)

    async def delete(self, group_id: str) -> None:
        coord = await self.coordinator(group_id)
        async with coord.lock:
            coord.check(group_id)
            now = self.now_ms()
            await coord.write(coord.state.delete(group_id), now)

    async def _sync_metadata(self, coord: Coordinator) -> None:
        """Under the coordinator's lock: re-evaluate subscriptions if the metadata changed."""
        version = self.controller.state.version
        if version == coord.metadata_version:
            return
        now = self.now_ms()
        before = coord.state.rebalances
        await coord.write(coord.state.metadata_changed(self.topics()), now)
        self.rebalances += coord.state.rebalances - before
        coord.metadata_version = version

    # ----- the ticker -----

    def _ensure_ticker(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._tick_loop(), name="group-coordinators")

    def start(self) -> None:
        """Start the ticker: it also loads the coordinator of every partition of
        ``__consumer_offsets`` this node comes to lead, so sessions are timed even before a
        member reaches the new coordinator."""
        self._ensure_ticker()

    async def _load_leading(self) -> None:
        count = self.offsets_partitions()
        if count is None:
            return
        for index in range(count):
            coord = self.coordinators.get(index)
            if coord is not None and coord.valid():
                continue
            try:
                _, part = self.registry.partition(OFFSETS_TOPIC, index)
            except TidelogError:
                continue
            if not part.serving:
                continue
            coord = self.coordinators[index] = Coordinator(part, self.settings)
            try:
                async with coord.lock:
                    await coord.load(self.now_ms)
            except TidelogError as exc:
                log.info("loading %s/%d: %s (retrying)", OFFSETS_TOPIC, index, exc)
                self.coordinators.pop(index, None)

    async def _tick_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.tick_ms / 1000)
            try:
                await self._load_leading()
            except Exception:
                log.exception("loading coordinators failed")
            for index, coord in list(self.coordinators.items()):
                if not coord.valid():
                    log.info("no longer coordinating %s/%d", OFFSETS_TOPIC, index)
                    self.coordinators.pop(index, None)
                    continue
                if not coord.loaded or coord.lock.locked():
                    continue
                try:
                    async with coord.lock:
                        if not coord.valid():
                            continue
                        await self._sync_metadata(coord)
                        now = self.now_ms()
                        before = coord.state.rebalances
                        records, removed = coord.state.expire(now, self.topics())
                        for group_id, member_id in removed:
                            log.info("group %r: member %s removed (timeout)", group_id, member_id)
                        await coord.write(records, now)
                        self.rebalances += coord.state.rebalances - before
                except TidelogError as exc:
                    log.warning("coordinator %s/%d: %s", OFFSETS_TOPIC, index, exc)
                except Exception:
                    log.exception("coordinator %s/%d failed a tick", OFFSETS_TOPIC, index)
                    coord.dropped = True

            self.stats = self._stats()

    def _stats(self) -> tuple[GroupStats, ...]:
        out: list[GroupStats] = []
        for coord in self.local_groups().values():
            lags: dict[str, list[tuple[str, int, int]]] = {}
            for (group_id, topic, partition), offset in coord.committed.items():
                try:
                    _, part = self.registry.partition(topic, partition)
                except TidelogError:
                    continue
                lags.setdefault(group_id, []).append(
                    (topic, partition, max(0, part.high_watermark - offset))
                )
            for group_id, g in coord.state.groups.items():
                out.append(
                    GroupStats(group_id, len(g.members), g.epoch, tuple(lags.get(group_id, ())))
                )
        return tuple(sorted(out, key=lambda s: s.group_id))

    def local_groups(self) -> Mapping[int, Coordinator]:
        return {i: c for i, c in self.coordinators.items() if c.loaded and c.valid()}

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
