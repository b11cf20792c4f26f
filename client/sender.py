"""The producer's sender: drains the accumulator, sends Produce requests, keeps each
partition's requests in order through retries and leader moves.

Shape (after aiokafka's Sender, kept apart from the accumulator as there): the
:class:`~tidelog.client.producer.Producer` appends records to the
:class:`~tidelog.client.accumulator.Accumulator` and calls :meth:`Sender.wake` for a
partition with something to send; one task per leader node drains the batches that are full
or whose ``linger_ms`` ran out, with up to ``max_in_flight`` Produce requests per partition.
A batch that fails with a retriable error (the leader moved, the node is down, a timeout)
goes back to the front of its partition's queue once the requests sent before it have
answered, so a partition's batches are resent in their original order; after a failure the
partition sends one batch at a time until one succeeds. Other errors fail the batch's
records.

When the retry goes is decided by :mod:`tidelog.client.retry` (the policy the consumer
uses too): after a leader error it follows the leader rather than the clock, so writes
resume within about LEADER_POLL_INTERVAL_MS of the cluster electing a new leader while a
dead leader is retried at most a few times a second.

A partition's requests in flight all go to one node. When the leader moves while some are
still unanswered at the old one, newer batches wait for those answers instead of going to
the new leader at once: the old node refuses them later (NOT_LEADER), and a newer batch
acknowledged by the new leader meanwhile would sit ahead of their retries in the log. A
node that holds requests without answering (paused, or black-holed) would then pin the
partition until the request timeout, so a request unanswered for LEADER_CHECK_AFTER_MS
starts watching the metadata, and once another node leads the partition the requests at
the silent one are abandoned and resent there, in order. The old node cannot commit what
it held: the new leader's election needed a majority that no longer follows it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio

from tidelog.client.accumulator import Accumulator, PendingBatch
from tidelog.client.limits import LEADER_CHECK_AFTER_MS, LEADERLESS_EXPIRY_CHECK_MS
from tidelog.client.metadata import ClusterMetadata
from tidelog.client.retry import Retry, is_leader_error
from tidelog.client.structs import TopicPartition
from tidelog.errors import (
    NodeUnavailable,
    NotLeader,
    RequestTimedOut,
    TidelogError,
    UnknownTopic,
    from_rpc_error,
)
from tidelog.records import Codec
from tidelog.v1 import broker_pb2

__all__ = ["Sender", "SenderConfig"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class SenderConfig:
    """The producer settings the sender works by (checked by the Producer)."""

    acks: broker_pb2.Acks.ValueType
    codec: Codec
    linger_s: float
    max_in_flight: int
    retries: int
    retry_backoff_ms: int
    request_timeout_ms: int
    delivery_timeout_s: float


@dataclass(slots=True)
class _PartitionState:
    retry: Retry
    in_flight: int = 0
    #: Batches that failed with a retriable error while others were in flight; they go back
    #: to the queue once in_flight drops to 0, so nothing overtakes them twice.
    failed: list[PendingBatch] = field(default_factory=list)
    #: After a failure, send one batch at a time until one succeeds (in-order recovery).
    recovering: bool = False
    retry_at_s: float = 0.0
    #: When a wake-up for retry_at_s is already scheduled (one timer per backoff).
    wake_at_s: float = 0.0
    #: Waits for a new leader during the backoff, to retry there at once.
    watch: asyncio.Task[None] | None = None
    #: The node every request in flight went to (the module docstring says why only one).
    in_flight_at: str | None = None
    #: The Produce calls in flight, to abandon them at a node that stopped answering.
    calls: set[grpc.aio.UnaryUnaryCall[Any, Any]] = field(default_factory=set)
    #: Calls cancelled because another node leads now, with that node's address.
    abandoned: dict[grpc.aio.UnaryUnaryCall[Any, Any], str] = field(default_factory=dict)
    #: Watches the metadata while a request goes unanswered (LEADER_CHECK_AFTER_MS).
    stall_watch: asyncio.Task[None] | None = None


class _NodeDrainer:
    """The one task that drains the accumulator for the partitions led by one node."""

    def __init__(self, sender: Sender, address: str) -> None:
        self.sender = sender
        self.address = address
        self.pending: set[TopicPartition] = set()
        self.event = asyncio.Event()
        self.task = asyncio.get_running_loop().create_task(self._run(), name=f"sender {address}")

    def wake(self, tp: TopicPartition) -> None:
        self.pending.add(tp)
        self.event.set()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self.event.wait()
            self.event.clear()
            pending, self.pending = self.pending, set()
            now = loop.time()
            for tp in pending:
                self.sender._drain(tp, self, now)


class Sender:
    """Sends the accumulator's batches (module docstring). ``on_released`` runs after a
    batch completed or failed and its bytes went back to the accumulator's budget;
    ``force_drain`` says whether batches go now regardless of linger (a flush)."""

    def __init__(
        self,
        meta: ClusterMetadata,
        acc: Accumulator,
        config: SenderConfig,
        *,
        on_released: Callable[[], None],
        force_drain: Callable[[], bool],
    ) -> None:
        self.meta = meta
        self.acc = acc
        self.config = config
        self._on_released = on_released
        self._force_drain = force_drain
        self._loop = asyncio.get_running_loop()
        self._parts: dict[TopicPartition, _PartitionState] = {}
        self._drainers: dict[str, _NodeDrainer] = {}
        #: Partitions without a known leader, each with the task waiting for one.
        self._leaderless: dict[TopicPartition, asyncio.Task[None]] = {}
        self._background: set[asyncio.Task[None]] = set()
        self.closed = False

    async def close(self) -> None:
        """Stop sending: cancel every request and task (their batches fail as closed)."""
        self.closed = True
        tasks: list[asyncio.Task[Any]] = [d.task for d in self._drainers.values()]
        tasks += self._background
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _state(self, tp: TopicPartition) -> _PartitionState:
        st = self._parts.get(tp)
        if st is None:
            st = self._parts[tp] = _PartitionState(
                Retry(self.meta, tp, self.config.retry_backoff_ms)
            )
        return st

    def wake(self, tp: TopicPartition) -> None:
        """Tell the partition's leader's sender to look at it."""
        if self.closed:
            return
        address = self.meta.leader_address(tp.topic, tp.partition)
        if address is None:
            if tp not in self._leaderless:
                self._leaderless[tp] = self._spawn(self._await_leader(tp), f"leader of {tp}")
            return
        sender = self._drainers.get(address)
        if sender is None:
            sender = self._drainers[address] = _NodeDrainer(self, address)
        sender.wake(tp)

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        """A background task that stop() cancels."""
        task = self._loop.create_task(coro, name=name)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def _await_leader(self, tp: TopicPartition) -> None:
        """Wait for a leader of a partition that has none (metadata is polled meanwhile);
        batches that outlive delivery_timeout_ms meanwhile fail."""
        meta = self.meta
        since_s = time.monotonic()
        try:
            while True:
                try:
                    address = await meta.wait_for_leader(
                        tp.topic,
                        tp.partition,
                        timeout_s=LEADERLESS_EXPIRY_CHECK_MS / 1000,
                        since_s=since_s,
                    )
                except UnknownTopic:
                    self.fail_partition(
                        tp,
                        UnknownTopic(
                            f"topic {tp.topic!r} no longer exists (deleted while producing?)",
                            topic=tp.topic,
                        ),
                    )
                    return
                except TidelogError as err:  # the producer is closing
                    log.debug("waiting for a leader of %s stopped: %s", tp, err)
                    return
                if address is not None:
                    break
                self._expire(tp)
                if self.acc.head(tp) is None and not self._state(tp).failed:
                    return
        finally:
            self._leaderless.pop(tp, None)
        self.wake(tp)

    def _drain(self, tp: TopicPartition, sender: _NodeDrainer, now_s: float) -> None:
        st = self._state(tp)
        address = self.meta.leader_address(tp.topic, tp.partition)
        if address != sender.address:
            self.wake(tp)  # the leader moved: hand the partition to its sender
            return
        if st.in_flight and st.in_flight_at != address:
            # Requests are still out at the old leader: newer batches wait for its answers
            # (module docstring); the last answer wakes the partition again.
            return
        if now_s < st.retry_at_s:
            if st.wake_at_s != st.retry_at_s:
                st.wake_at_s = st.retry_at_s
                self._loop.call_at(st.retry_at_s, self.wake, tp)
            return
        limit = 1 if st.recovering else self.config.max_in_flight
        force = self._force_drain() or self.closed
        while st.in_flight < limit:
            batch = self.acc.pop_ready(tp, now_s, self.config.linger_s, force)
            if batch is None:
                break
            if now_s - batch.created_s > self.config.delivery_timeout_s:
                self._fail_batch(batch, self._timed_out(batch))
                continue
            st.in_flight += 1
            st.in_flight_at = sender.address
            self._spawn(self._produce(sender.address, tp, st, batch), f"produce {tp}")

    async def _produce(
        self, address: str, tp: TopicPartition, st: _PartitionState, batch: PendingBatch
    ) -> None:
        loop = self._loop
        err: TidelogError | None = None
        resp: broker_pb2.ProduceResponse | None = None
        try:
            payload = batch.encode(self.config.codec)
        except ValueError as exc:
            st.in_flight -= 1
            self._fail_batch(batch, TidelogError(f"cannot encode the batch: {exc}"))
            self._after_response(tp, st)
            return
        if not batch.first_sent_s:
            batch.first_sent_s = loop.time()
        batch.attempts += 1
        request = broker_pb2.ProduceRequest(
            topic=tp.topic,
            partition=tp.partition,
            batches=payload,
            acks=self.config.acks,
            timeout_ms=self.config.request_timeout_ms,
        )
        call: grpc.aio.UnaryUnaryCall[Any, Any] | None = None
        stall_check: asyncio.TimerHandle | None = None
        try:
            call = self.meta.broker(address).Produce(  # type: ignore[assignment]
                request, timeout=self.config.request_timeout_ms / 1000 + 1
            )
            assert call is not None
            st.calls.add(call)
            stall_check = loop.call_later(
                LEADER_CHECK_AFTER_MS / 1000, self._on_stalled, tp, st, address
            )
            resp = await call
        except grpc.aio.AioRpcError as exc:
            err = from_rpc_error(exc)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            moved_to = None if call is None else st.abandoned.get(call)
            if moved_to is None or (current is not None and current.cancelling()):
                # stop() cancelled the request; nobody may wait on this batch forever.
                st.in_flight -= 1
                self._forget_call(st, call, stall_check)
                if not batch.done:
                    self._fail_batch(
                        batch, TidelogError("the producer was closed before delivering")
                    )
                raise
            err = NotLeader(
                f"{tp}: no answer from {address} in {LEADER_CHECK_AFTER_MS} ms and "
                f"{moved_to} leads the partition now; resending there"
            )
        except Exception as exc:  # the channel closed under us, or similar: retry elsewhere
            err = NodeUnavailable(f"produce to {address} failed: {exc!r}")
        self._forget_call(st, call, stall_check)
        st.in_flight -= 1
        if err is None:
            assert resp is not None
            if st.recovering and not st.failed:
                st.recovering = False
            st.retry.succeeded()
            self.meta.note_reachable(address)
            base = -1 if self.config.acks == broker_pb2.ACKS_NONE else resp.base_offset
            self._complete_batch(batch, base)
        else:
            self._on_error(address, tp, st, batch, err)
        self._after_response(tp, st)

    def _forget_call(
        self,
        st: _PartitionState,
        call: grpc.aio.UnaryUnaryCall[Any, Any] | None,
        stall_check: asyncio.TimerHandle | None,
    ) -> None:
        if stall_check is not None:
            stall_check.cancel()
        if call is not None:
            st.calls.discard(call)
            st.abandoned.pop(call, None)
        if not st.calls and st.stall_watch is not None:
            st.stall_watch.cancel()
            st.stall_watch = None

    def _on_stalled(self, tp: TopicPartition, st: _PartitionState, address: str) -> None:
        """A request to ``address`` has gone unanswered for LEADER_CHECK_AFTER_MS: watch the
        metadata for another leader (one watch per partition)."""
        if self.closed or st.stall_watch is not None or not st.calls:
            return
        if st.in_flight_at != address:
            return
        st.stall_watch = self._spawn(self._watch_stalled(tp, st, address), f"stalled {tp}")

    async def _watch_stalled(self, tp: TopicPartition, st: _PartitionState, address: str) -> None:
        """Abandon the requests held by ``address`` once another node leads the partition;
        cancelled (by _forget_call) when they are all answered first."""
        try:
            leader = await self.meta.wait_for_leader(tp.topic, tp.partition, not_at=address)
        except TidelogError:
            return  # the topic is gone or the producer closing: the requests report it
        finally:
            if st.stall_watch is asyncio.current_task():
                st.stall_watch = None
        if leader is None or st.in_flight_at != address or not st.calls:
            return
        log.info(
            "%s: %s holds %d requests unanswered and %s leads now: resending there",
            tp,
            address,
            len(st.calls),
            leader,
        )
        self.meta.note_unreachable(address)
        for call in list(st.calls):
            st.abandoned[call] = leader
            call.cancel()

    def _on_error(
        self,
        address: str,
        tp: TopicPartition,
        st: _PartitionState,
        batch: PendingBatch,
        err: TidelogError,
    ) -> None:
        now_s = self._loop.time()
        expired = now_s - batch.created_s > self.config.delivery_timeout_s
        if not err.retriable or batch.attempts > self.config.retries or expired:
            if expired and err.retriable:
                err = self._timed_out(batch, err)
            log.warning("batch for %s failed (%d records): %s", tp, batch.record_count, err)
            self._fail_batch(batch, err)
            return
        log.debug("retrying batch for %s after %s", tp, err)
        st.failed.append(batch)
        st.recovering = True
        if not st.retry.failed(address, err) and is_leader_error(err):
            self._spawn(self._refresh_quietly(tp.topic), f"refresh {tp.topic}")

    async def _refresh_quietly(self, topic: str) -> None:
        try:
            await self.meta.refresh(force=False, topics=[topic])
        except TidelogError as err:
            log.debug("metadata refresh failed: %s", err)

    def _after_response(self, tp: TopicPartition, st: _PartitionState) -> None:
        if st.failed and st.in_flight == 0:
            # Every request sent before the failed ones has answered: requeue the failed
            # batches ahead of everything newer, in order, and wait out the backoff.
            self.acc.push_front(tp, st.failed)
            st.failed.clear()
            self._schedule_retry(tp, st)
        self.wake(tp)

    def _schedule_retry(self, tp: TopicPartition, st: _PartitionState) -> None:
        """Set when the requeued batches go again: at once at a new leader, else after the
        backoff, or earlier if a new leader shows up meanwhile."""
        now_s = self._loop.time()
        if st.watch is not None:
            st.watch.cancel()
            st.watch = None
        delay_ms = st.retry.schedule()
        st.retry_at_s = now_s + delay_ms / 1000
        if st.retry.watch_worthwhile():
            st.watch = self._spawn(
                self._watch_leader(tp, st, st.retry_at_s), f"watch leader of {tp}"
            )

    async def _watch_leader(
        self, tp: TopicPartition, st: _PartitionState, retry_at_s: float
    ) -> None:
        """Keep the partition's metadata fresh during the backoff (the retry then goes to
        the leader of the moment), and cut the backoff short when another leader than the
        one that failed shows up, unless the partition followed too many changes in a row."""
        try:
            address = await st.retry.new_leader(retry_at_s - self._loop.time())
        except TidelogError:
            return  # the topic is gone or the producer closing: the retry reports it
        finally:
            if st.watch is asyncio.current_task():
                st.watch = None
        if address is None or st.retry_at_s != retry_at_s:
            return  # the backoff ran out, or a newer failure rescheduled the retry
        st.retry_at_s = 0.0
        self.wake(tp)

    def _complete_batch(self, batch: PendingBatch, base_offset: int) -> None:
        batch.complete(base_offset, self._loop.time())
        self._released(batch)

    def _fail_batch(self, batch: PendingBatch, err: TidelogError) -> None:
        batch.fail(err, self._loop.time())
        self._released(batch)

    def _released(self, batch: PendingBatch) -> None:
        self.acc.release(batch)
        self._on_released()

    def _timed_out(self, batch: PendingBatch, cause: TidelogError | None = None) -> TidelogError:
        waited = self._loop.time() - batch.created_s
        why = f" (last error: {cause})" if cause is not None else ""
        return RequestTimedOut(
            f"{batch.record_count} records for {batch.topic}/{batch.partition} were not "
            f"acknowledged within delivery_timeout_ms={self.config.delivery_timeout_s * 1000:.0f} "
            f"(waited {waited:.1f} s){why}"
        )

    def _expire(self, tp: TopicPartition) -> None:
        now_s = self._loop.time()
        dq = self.acc.batches.get(tp)
        while dq and now_s - dq[0].created_s > self.config.delivery_timeout_s:
            batch = dq.popleft()
            self._fail_batch(batch, self._timed_out(batch))

    def fail_partition(self, tp: TopicPartition, err: TidelogError) -> None:
        st = self._state(tp)
        batches = self.acc.drop(tp) + st.failed
        st.failed = []
        for batch in batches:
            self._fail_batch(batch, err)
        if batches:
            log.warning("%d batches for %s failed: %s", len(batches), tp, err)
