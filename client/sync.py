"""Blocking facades over the async clients, for scripts and REPLs.

Each facade runs its async client on a private event loop in a daemon thread and forwards
calls to it, so a script never sees asyncio. They add no behaviour of their own: errors,
retries and ordering are those of :class:`Producer`, :class:`Consumer` and :class:`Admin`.
"""

from __future__ import annotations

import abc
import asyncio
import concurrent.futures
import threading
from collections.abc import Callable, Coroutine, Iterable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any, Self, TypeVar

from tidelog.client.admin import (
    Admin,
    ClusterView,
    GroupDescription,
    GroupListing,
    OffsetResetPlan,
    ResetTo,
    TopicDescription,
)
from tidelog.client.consumer import Consumer, FetchedBatch
from tidelog.client.producer import Producer
from tidelog.client.structs import (
    BatchMetadata,
    ConsumerRecord,
    Header,
    RecordMetadata,
    TopicPartition,
)
from tidelog.client.table import (
    SCAN_PAGE_ROWS_DEFAULT,
    Key,
    Row,
    ScanPage,
    Table,
    TableChange,
    TableContents,
    TableWatch,
)

__all__ = ["SyncAdmin", "SyncConsumer", "SyncProducer", "SyncTable", "SyncTableWatch"]

T = TypeVar("T")

#: Sends a SyncProducer lets be outstanding (queued or unacknowledged) before send() blocks:
#: the blocking-queue behaviour of Kafka's Java producer, counted in records.
PENDING_SENDS_MAX = 100_000
#: How long closing a facade waits for its loop's leftover tasks to finish.
LOOP_CLOSE_TIMEOUT_S = 5.0


class _LoopThread:
    """An event loop running forever in a daemon thread."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout_s: float | None = None) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def close(self) -> None:
        if self.loop.is_closed():
            return
        # Let tasks the client left behind (gRPC call bookkeeping) finish or cancel before the
        # loop goes, so closing never warns "Task was destroyed but it is pending".
        try:
            self.run(_drain_tasks(), timeout_s=LOOP_CLOSE_TIMEOUT_S)
        except (TimeoutError, concurrent.futures.TimeoutError):
            pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()


async def _drain_tasks() -> None:
    me = asyncio.current_task()
    others = [t for t in asyncio.all_tasks() if t is not me]
    for task in others:
        task.cancel()
    await asyncio.gather(*others, return_exceptions=True)


class _Facade(abc.ABC):
    def __init__(self, name: str) -> None:
        self._lt = _LoopThread(name)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @abc.abstractmethod
    def close(self) -> None:
        """Stop the async client, then the loop thread."""


class SyncProducer(_Facade):
    """``with SyncProducer("127.0.0.1:9092") as p: p.send("t", b"v").result()``.

    Keyword arguments are those of :class:`Producer`.
    """

    def __init__(self, bootstrap: str | Sequence[str], **options: Any) -> None:
        super().__init__("tidelog-producer")
        self._pending = threading.BoundedSemaphore(PENDING_SENDS_MAX)

        async def make() -> Producer:
            p = Producer(bootstrap, **options)
            await p.start()
            return p

        try:
            self._producer = self._lt.run(make())
        except BaseException:
            self._lt.close()
            raise

    def send(
        self,
        topic: str,
        value: Any,
        key: Any = None,
        *,
        partition: int | None = None,
        headers: Sequence[Header] | None = None,
        timestamp_ms: int | None = None,
    ) -> concurrent.futures.Future[RecordMetadata]:
        """Queue a record; ``.result()`` on the returned future waits for its metadata.
        Blocks while PENDING_SENDS_MAX sends are outstanding."""
        self._pending.acquire()
        fut = self._lt.submit(
            self._producer.send_and_wait(
                topic, value, key, partition=partition, headers=headers, timestamp_ms=timestamp_ms
            )
        )
        fut.add_done_callback(lambda _: self._pending.release())
        return fut

    def send_many(
        self,
        topic: str,
        values: Sequence[bytes | None],
        keys: Sequence[bytes | None] | None = None,
        *,
        partition: int | None = None,
    ) -> concurrent.futures.Future[list[BatchMetadata]]:
        async def go() -> list[BatchMetadata]:
            return await self._producer.send_many(topic, values, keys, partition=partition)

        return self._lt.submit(go())

    def flush(self) -> None:
        self._lt.run(self._producer.flush())

    def partitions_for(self, topic: str) -> list[TopicPartition]:
        return self._lt.run(self._producer.partitions_for(topic))

    def close(self) -> None:
        try:
            self._lt.run(self._producer.stop())
        finally:
            self._lt.close()


class SyncConsumer(_Facade):
    """``with SyncConsumer("127.0.0.1:9092") as c: c.assign([...]); c.poll()``.

    Keyword arguments are those of :class:`Consumer`.
    """

    def __init__(self, bootstrap: str | Sequence[str], **options: Any) -> None:
        super().__init__("tidelog-consumer")

        async def make() -> Consumer:
            c = Consumer(bootstrap, **options)
            await c.start()
            return c

        try:
            self._consumer = self._lt.run(make())
        except BaseException:
            self._lt.close()
            raise

    def _call(self, fn: Any, *args: Any) -> Any:
        async def go() -> Any:
            return fn(*args)

        return self._lt.run(go())

    def assign(self, partitions: Iterable[TopicPartition]) -> None:
        self._call(self._consumer.assign, list(partitions))

    def assignment(self) -> list[TopicPartition]:
        result: list[TopicPartition] = self._call(self._consumer.assignment)
        return result

    def subscribe(
        self,
        topics: str | Iterable[str] = (),
        *,
        pattern: str | None = None,
        on_assigned: Callable[[list[TopicPartition]], None] | None = None,
        on_revoked: Callable[[list[TopicPartition]], None] | None = None,
        on_lost: Callable[[list[TopicPartition]], None] | None = None,
    ) -> None:
        """As :meth:`Consumer.subscribe`; the callbacks run on the facade's loop thread,
        inside poll(), while the calling thread waits for poll to return."""
        names = [topics] if isinstance(topics, str) else list(topics)

        async def go() -> None:
            self._consumer.subscribe(
                names,
                pattern=pattern,
                on_assigned=on_assigned,
                on_revoked=on_revoked,
                on_lost=on_lost,
            )

        self._lt.run(go())

    def unsubscribe(self) -> None:
        self._lt.run(self._consumer.unsubscribe())

    def commit(self, offsets: Mapping[TopicPartition, int] | None = None) -> None:
        """Commit and wait for the answer (see :meth:`Consumer.commit`)."""
        self._lt.run(self._consumer.commit(offsets))

    def commit_async(
        self, offsets: Mapping[TopicPartition, int] | None = None
    ) -> concurrent.futures.Future[None]:
        """Start a commit; the future holds its outcome (PartitionRevoked at once for a
        partition this member does not own)."""

        async def go() -> None:
            await self._consumer.commit_async(offsets)

        return self._lt.submit(go())

    def committed(
        self, partitions: Iterable[TopicPartition] | None = None
    ) -> dict[TopicPartition, int | None]:
        return self._lt.run(
            self._consumer.committed(None if partitions is None else list(partitions))
        )

    def lag(self) -> dict[TopicPartition, int]:
        return self._lt.run(self._consumer.lag())

    def pause(self, *partitions: TopicPartition) -> None:
        self._call(self._consumer.pause, *partitions)

    def resume(self, *partitions: TopicPartition) -> None:
        self._call(self._consumer.resume, *partitions)

    def paused(self) -> list[TopicPartition]:
        result: list[TopicPartition] = self._call(self._consumer.paused)
        return result

    @property
    def has_assignment(self) -> bool:
        result: bool = self._call(lambda: self._consumer.has_assignment)
        return result

    @property
    def member_id(self) -> str:
        result: str = self._call(lambda: self._consumer.member_id)
        return result

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self._call(self._consumer.seek, tp, offset)

    def seek_to_beginning(self, *partitions: TopicPartition) -> dict[TopicPartition, int]:
        return self._lt.run(self._consumer.seek_to_beginning(*partitions))

    def seek_to_end(self, *partitions: TopicPartition) -> dict[TopicPartition, int]:
        return self._lt.run(self._consumer.seek_to_end(*partitions))

    def seek_to_time(
        self, timestamp_ms: int, *partitions: TopicPartition
    ) -> dict[TopicPartition, int]:
        return self._lt.run(self._consumer.seek_to_time(timestamp_ms, *partitions))

    def position(self, tp: TopicPartition) -> int:
        return self._lt.run(self._consumer.position(tp))

    def partitions_for(self, topic: str) -> list[TopicPartition]:
        return self._lt.run(self._consumer.partitions_for(topic))

    def end_offsets(self, partitions: Iterable[TopicPartition]) -> dict[TopicPartition, int]:
        return self._lt.run(self._consumer.end_offsets(list(partitions)))

    def beginning_offsets(self, partitions: Iterable[TopicPartition]) -> dict[TopicPartition, int]:
        return self._lt.run(self._consumer.beginning_offsets(list(partitions)))

    def poll(
        self, timeout_ms: float = 1000, max_records: int = 10_000, *, until_end: bool = False
    ) -> list[ConsumerRecord]:
        return self._lt.run(self._consumer.poll(timeout_ms, max_records, until_end=until_end))

    def poll_batches(
        self, timeout_ms: float = 1000, max_records: int = 10_000, *, until_end: bool = False
    ) -> list[FetchedBatch]:
        return self._lt.run(
            self._consumer.poll_batches(timeout_ms, max_records, until_end=until_end)
        )

    def at_end(self, *partitions: TopicPartition) -> bool:
        result: bool = self._call(self._consumer.at_end, *partitions)
        return result

    def __iter__(self) -> Iterator[ConsumerRecord]:
        """Records forever (stop with break or Ctrl-C)."""
        while True:
            yield from self.poll(timeout_ms=1000)

    def close(self) -> None:
        try:
            self._lt.run(self._consumer.stop())
        finally:
            self._lt.close()


class SyncAdmin(_Facade):
    def __init__(self, bootstrap: str | Sequence[str], **options: Any) -> None:
        super().__init__("tidelog-admin")

        async def make() -> Admin:
            return Admin(bootstrap, **options)

        self._admin = self._lt.run(make())

    def create_topics(
        self,
        name: str | Sequence[str],
        partitions: int = 1,
        replication_factor: int | None = None,
        configs: Mapping[str, str] | None = None,
        *,
        validate_only: bool = False,
    ) -> list[str]:
        return self._lt.run(
            self._admin.create_topics(
                name, partitions, replication_factor, configs, validate_only=validate_only
            )
        )

    def delete_topics(self, names: str | Sequence[str]) -> list[str]:
        return self._lt.run(self._admin.delete_topics(names))

    def describe_topics(self, names: str | Sequence[str] | None = None) -> list[TopicDescription]:
        return self._lt.run(self._admin.describe_topics(names))

    def alter_topic_config(
        self,
        topic: str,
        *,
        set: Mapping[str, str] | None = None,
        delete: Sequence[str] = (),
    ) -> TopicDescription:
        return self._lt.run(self._admin.alter_topic_config(topic, set=set, delete=delete))

    def create_partitions(
        self, topic: str, total_count: int, *, validate_only: bool = False
    ) -> TopicDescription:
        return self._lt.run(
            self._admin.create_partitions(topic, total_count, validate_only=validate_only)
        )

    def list_topics(self, *, internal: bool = False) -> list[str]:
        return self._lt.run(self._admin.list_topics(internal=internal))

    def metadata(self) -> ClusterView:
        return self._lt.run(self._admin.metadata())

    def list_groups(self) -> list[GroupListing]:
        return self._lt.run(self._admin.list_groups())

    def describe_group(self, group_id: str) -> GroupDescription:
        return self._lt.run(self._admin.describe_group(group_id))

    def delete_group(self, group_id: str) -> None:
        self._lt.run(self._admin.delete_group(group_id))

    def list_group_offsets(
        self, group_id: str, partitions: Sequence[TopicPartition] = ()
    ) -> dict[TopicPartition, int]:
        return self._lt.run(self._admin.list_group_offsets(group_id, partitions))

    def alter_group_offsets(self, group_id: str, offsets: Mapping[TopicPartition, int]) -> None:
        self._lt.run(self._admin.alter_group_offsets(group_id, offsets))

    def reset_group_offsets(
        self,
        group_id: str,
        topic: str,
        to: ResetTo,
        *,
        partitions: Sequence[int] = (),
        execute: bool = False,
    ) -> list[OffsetResetPlan]:
        return self._lt.run(
            self._admin.reset_group_offsets(
                group_id, topic, to, partitions=partitions, execute=execute
            )
        )

    def close(self) -> None:
        try:
            self._lt.run(self._admin.close())
        finally:
            self._lt.close()


class SyncTable(_Facade):
    """``with SyncTable("127.0.0.1:9092", "rates") as t: t.get(b"EUR/USD")``.

    Keyword arguments are those of :class:`Table`.
    """

    def __init__(self, bootstrap: str | Sequence[str], topic: str, **options: Any) -> None:
        super().__init__("tidelog-table")

        async def make() -> Table:
            t = Table(bootstrap, topic, **options)
            await t.start()
            return t

        try:
            self._table = self._lt.run(make())
        except BaseException:
            self._lt.close()
            raise

    @property
    def topic(self) -> str:
        return self._table.topic

    def partition_for(self, key: Key) -> int:
        return self._table.partition_for(key)

    def get(
        self, key: Key, *, min_offset: int | None = None, partition: int | None = None
    ) -> Row | None:
        return self._lt.run(self._table.get(key, min_offset=min_offset, partition=partition))

    def get_many(
        self, keys: Iterable[Key], *, min_offsets: Mapping[int, int] | None = None
    ) -> dict[bytes, Row]:
        return self._lt.run(self._table.get_many(list(keys), min_offsets=min_offsets))

    def scan(
        self,
        *,
        prefix: Key | None = None,
        start: Key | None = None,
        end: Key | None = None,
        partition: int | None = None,
        page_size: int = SCAN_PAGE_ROWS_DEFAULT,
        min_offsets: Mapping[int, int] | None = None,
    ) -> Iterator[ScanPage]:
        """Pages as :meth:`Table.scan` yields them, each fetched when asked for."""
        pages = self._table.scan(
            prefix=prefix,
            start=start,
            end=end,
            partition=partition,
            page_size=page_size,
            min_offsets=min_offsets,
        )

        async def step() -> ScanPage | None:
            try:
                return await anext(pages)
            except StopAsyncIteration:
                return None

        try:
            while (page := self._lt.run(step())) is not None:
                yield page
        finally:
            self._lt.run(pages.aclose())

    def read_all(self, *, prefix: Key | None = None, partition: int | None = None) -> TableContents:
        return self._lt.run(self._table.read_all(prefix=prefix, partition=partition))

    def watch(
        self,
        from_offsets: Mapping[int, int] | None = None,
        *,
        partitions: Iterable[int] | None = None,
    ) -> SyncTableWatch:
        async def make() -> TableWatch:
            return self._table.watch(
                from_offsets, partitions=None if partitions is None else list(partitions)
            )

        return SyncTableWatch(self._lt, self._lt.run(make()))

    def close(self) -> None:
        try:
            self._lt.run(self._table.close())
        finally:
            self._lt.close()


class SyncTableWatch:
    """The blocking iterator of :meth:`SyncTable.watch`; ``next_change(timeout_s)`` returns
    None when nothing came within the timeout."""

    def __init__(self, lt: _LoopThread, watch: TableWatch) -> None:
        self._lt = lt
        self._watch = watch

    @property
    def positions(self) -> dict[int, int]:
        return dict(self._watch.positions)

    @property
    def snapshot_done(self) -> bool:
        return self._watch.snapshot_done

    def next_change(self, timeout_s: float | None = None) -> TableChange | None:
        async def go() -> TableChange | None:
            try:
                async with asyncio.timeout(timeout_s):
                    return await anext(self._watch)
            except TimeoutError:
                return None

        try:
            return self._lt.run(go())
        except StopAsyncIteration:
            raise StopIteration from None

    def __iter__(self) -> Iterator[TableChange]:
        while True:
            try:
                change = self.next_change()
            except StopIteration:
                return
            if change is not None:
                yield change

    def close(self) -> None:
        self._lt.run(self._watch.close())

    def __enter__(self) -> SyncTableWatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
