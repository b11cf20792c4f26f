"""The producer's sender: drains the accumulator, sends Produce requests, keeps each
partition's requests in order through retries and leader moves.

Shape (after aiokafka's Sender, kept apart from the accumulator as there): the
:class:`~tidelog.client.producer.Producer` appends records to the
:class:`~tidelog.client.accumulator.Accumulator` and calls :meth:`Sender.wake` for a
partition with something to send; one drainer per leader node (a loop callback) drains the
batches that are full or whose ``linger_ms`` ran out, with up to ``max_in_flight`` Produce
requests per partition.
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

Idempotence (``SenderConfig.idempotent``). The producer's session is a producer id and
epoch from InitProducerId (asked of any node before the first batch goes). Each partition
counts sequences in one session; a batch gets the next sequence once, in :meth:`_stamp`,
when it is first drained, and keeps it on every retry, so the node answers a batch it
stored already with its original offsets (a lost answer or a timeout is settled by sending
again). With up to 5 requests in flight, one may reach the node before the one ahead of it
(gRPC does not order concurrent calls): the node refuses it with OUT_OF_ORDER_SEQUENCE,
and since a batch before it is not acknowledged yet, it is requeued like any retriable
failure (after the requests sent before it answered, in sequence order) without a backoff.
An OUT_OF_ORDER_SEQUENCE for a batch whose every predecessor is acknowledged means the node
lost acknowledged data: the batch fails (as in Kafka's producer) and the partition's next
batches go in a new session. A partition moves to a new session (a new producer id, its
sequences from 0) only when nothing is in flight for it, so no request of the old session
can land after one of the new: after UNKNOWN_PRODUCER_ID (the partition forgot the
producer: nothing of it is stored there, the batches are resent from 0), or after one of
its stamped batches failed for good (a gap the node would refuse forever). Other
partitions keep their session. PRODUCER_FENCED ends the producer (:attr:`Sender.fatal`).

A batch whose attempt went unanswered after the node may have appended it (a timeout, a
broken connection, a request abandoned at a silent node) is ``maybe_written``; if it fails
in the end it fails with :class:`~tidelog.client.errors.OutcomeUnknown`, every other
failure means the batch surely was not stored.
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
from tidelog.client.errors import OutcomeUnknown
from tidelog.client.limits import (
    INIT_PRODUCER_ID_ATTEMPTS_MAX,
    INIT_PRODUCER_ID_TIMEOUT_MS,
    LEADER_CHECK_AFTER_MS,
    LEADERLESS_EXPIRY_CHECK_MS,
    PIPELINE_BATCH_BYTES_MIN,
    RETRY_BACKOFF_MAX_MS,
    SEQUENCE_MOD,
)
from tidelog.client.metadata import ClusterMetadata, transport_failure
from tidelog.client.retry import Retry, is_leader_error
from tidelog.client.structs import TopicPartition
from tidelog.errors import (
    NodeUnavailable,
    NotLeader,
    OutOfOrderSequence,
    ProducerFenced,
    RequestTimedOut,
    TidelogError,
    UnknownProducerId,
    UnknownTopic,
    Unsupported,
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
    #: Stamp batches with a producer id, epoch and sequence (module docstring).
    idempotent: bool = False
    #: A partition with no request in flight sends its batch at once; while requests are
    #: out, a batch below PIPELINE_BATCH_BYTES_MIN waits for an answer, a larger one for
    #: linger (the producer's docstring).
    adaptive_linger: bool = True


@dataclass(frozen=True, slots=True)
class _Session:
    """A producer id and epoch from InitProducerId; ``generation`` orders the sessions of
    this producer (a partition only ever moves to a newer one)."""

    producer_id: int
    producer_epoch: int
    generation: int


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
    #: A failure since the last requeue calls for a backoff (a batch refused only because
    #: one before it is not stored yet just waits for that one).
    backoff_due: bool = False
    # Idempotence (module docstring): the session this partition's sequences count in, the
    # sequence the next batch gets, and the one after the last acknowledged batch.
    session: _Session | None = None
    next_sequence: int = 0
    acked_sequence_next: int = 0
    #: The partition moves to a newer session before it sends again (a gap in its sequences,
    #: or the node forgot the producer); done once nothing is in flight.
    reset_session: bool = False


class _NodeDrainer:
    """Drains the accumulator for the partitions led by one node: one pass over the woken
    partitions per event-loop iteration, scheduled with ``call_soon`` on the first wake-up
    (so it runs once the caller of ``send`` yields, and a burst of sends shares a batch). A
    callback rather than a task waiting on an Event, which cost an Event future and a task
    step per request on the one-record-at-a-time path."""

    def __init__(self, sender: Sender, address: str) -> None:
        self.sender = sender
        self.address = address
        self.pending: set[TopicPartition] = set()
        self._loop = asyncio.get_running_loop()
        self._scheduled: asyncio.Handle | None = None

    def wake(self, tp: TopicPartition) -> None:
        self.pending.add(tp)
        if self._scheduled is None:
            self._scheduled = self._loop.call_soon(self._run)

    def cancel(self) -> None:
        if self._scheduled is not None:
            self._scheduled.cancel()
            self._scheduled = None

    def _run(self) -> None:
        self._scheduled = None
        pending, self.pending = self.pending, set()
        now = self._loop.time()
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
        #: An error that ends the producer (PRODUCER_FENCED): every send fails with it.
        self.fatal: TidelogError | None = None
        self._session: _Session | None = None
        self._session_task: asyncio.Task[None] | None = None
        #: Partitions waiting for a (newer) session.
        self._session_waiters: set[TopicPartition] = set()
        #: Sessions obtained, and batches the node answered as already stored (metrics).
        self.sessions_started = 0
        self.duplicates = 0
        #: With adaptive linger, the smallest batch sent while the partition has requests
        #: out (a full batch always may go).
        self._pipeline_bytes = min(PIPELINE_BATCH_BYTES_MIN, acc.batch_bytes_max)
        #: The gRPC deadline of a Produce call: a second past the node's own timeout, so
        #: the node's answer (REQUEST_TIMED_OUT) normally comes first.
        self._call_timeout_s = config.request_timeout_ms / 1000 + 1

    async def close(self) -> None:
        """Stop sending: cancel every request and task (their batches fail as closed)."""
        self.closed = True
        for drainer in self._drainers.values():
            drainer.cancel()
        tasks: list[asyncio.Task[Any]] = list(self._background)
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
        if self.fatal is not None:
            self.fail_partition(tp, self.fatal)
            return
        idempotent = self.config.idempotent
        if idempotent and self.acc.head(tp) is not None and not self._session_ready(tp, st):
            return
        limit = 1 if st.recovering else self.config.max_in_flight
        force = self._force_drain() or self.closed
        # Adaptive linger: with nothing in flight for the partition there is no answer to
        # batch behind, so its first batch goes now; the records that arrive while it is
        # out gather into the next one, which goes when linger ends or an answer comes.
        adaptive = self.config.adaptive_linger
        idle = adaptive and st.in_flight == 0
        while st.in_flight < limit:
            if adaptive and not (idle or force):
                # With requests out, an adaptive partition pipelines only large batches: a
                # small one waits for an answer (and then goes with everything that came
                # meanwhile), as Nagle's algorithm; small requests in flight together only
                # queue behind each other in the leader's and the followers' rounds
                # (docs/latency.md). A large one goes once its linger is over.
                head = self.acc.head(tp)
                if head is None or (
                    not head.closed
                    and head.size_bytes < self._pipeline_bytes
                    and len(self.acc.batches[tp]) == 1
                ):
                    break
            batch = self.acc.pop_ready(tp, now_s, self.config.linger_s, force or idle)
            idle = False
            if batch is None:
                break
            if now_s - batch.created_s > self.config.delivery_timeout_s:
                self._fail_batch(batch, self._timed_out(batch))
                if st.reset_session:
                    # The next batches need a new session: stamp none in this one.
                    if not st.in_flight:
                        self.wake(tp)
                    break
                continue
            if idempotent and batch.sequence < 0:
                self._stamp(st, batch)
            st.in_flight += 1
            st.in_flight_at = sender.address
            if not self._send(sender.address, tp, st, batch):
                break

    def sends_at_once(self, tp: TopicPartition) -> bool:
        """Whether the partition's next drain sends its front batch whatever its age
        (adaptive linger with nothing in flight), so a new batch needs no linger timer:
        when that drain cannot send (no leader, no session, a backoff), whatever it waits
        for wakes the partition again, still with nothing in flight."""
        if not self.config.adaptive_linger:
            return False
        st = self._parts.get(tp)
        return st is None or st.in_flight == 0

    def _send(
        self, address: str, tp: TopicPartition, st: _PartitionState, batch: PendingBatch
    ) -> bool:
        """Start one attempt of ``batch`` (counted in flight already): the call is made here,
        in the drain, so the request leaves in the loop's next iteration, and a task awaits
        the answer (:meth:`_produce`). False when the batch could not be encoded (it failed,
        and the partition is woken again)."""
        try:
            payload = batch.encode(self.config.codec)
        except ValueError as exc:
            st.in_flight -= 1
            self._fail_batch(batch, TidelogError(f"cannot encode the batch: {exc}"))
            self._after_response(tp, st)
            return False
        if not batch.first_sent_s:
            batch.first_sent_s = self._loop.time()
        batch.attempts += 1
        batch.sent_behind = batch.sequence >= 0 and batch.sequence != st.acked_sequence_next
        request = broker_pb2.ProduceRequest(
            topic=tp.topic,
            partition=tp.partition,
            batches=payload,
            acks=self.config.acks,
            timeout_ms=self.config.request_timeout_ms,
        )
        call: grpc.aio.UnaryUnaryCall[Any, Any] | None = None
        stall_check: asyncio.TimerHandle | None = None
        failure: Exception | None = None
        try:
            call = self.meta.broker(address).Produce(  # type: ignore[assignment]
                request, timeout=self._call_timeout_s
            )
        except Exception as exc:  # the channel closed under us, or similar: retry elsewhere
            failure = exc
        else:
            assert call is not None
            st.calls.add(call)
            stall_check = self._loop.call_later(
                LEADER_CHECK_AFTER_MS / 1000, self._on_stalled, tp, st, address
            )
        self._spawn(
            self._produce(address, tp, st, batch, call, stall_check, failure), f"produce {tp}"
        )
        return True

    async def _produce(
        self,
        address: str,
        tp: TopicPartition,
        st: _PartitionState,
        batch: PendingBatch,
        call: grpc.aio.UnaryUnaryCall[Any, Any] | None,
        stall_check: asyncio.TimerHandle | None,
        failure: Exception | None,
    ) -> None:
        """Await the answer to the attempt :meth:`_send` started, and settle the batch."""
        err: TidelogError | None = None
        resp: broker_pb2.ProduceResponse | None = None
        try:
            if call is None:
                assert failure is not None
                raise failure
            resp = await call
        except grpc.aio.AioRpcError as exc:
            err = from_rpc_error(exc)
            if _outcome_unknown(exc, err):
                batch.maybe_written = True
        except asyncio.CancelledError:
            current = asyncio.current_task()
            moved_to = None if call is None else st.abandoned.get(call)
            if moved_to is None or (current is not None and current.cancelling()):
                # stop() cancelled the request; nobody may wait on this batch forever.
                st.in_flight -= 1
                self._forget_call(st, call, stall_check)
                if call is not None:
                    batch.maybe_written = True
                if not batch.done:
                    self._fail_batch(
                        batch, TidelogError("the producer was closed before delivering")
                    )
                raise
            err = NotLeader(
                f"{tp}: no answer from {address} in {LEADER_CHECK_AFTER_MS} ms and "
                f"{moved_to} leads the partition now; resending there"
            )
            # The silent node may have appended it (and a follower that leads now have it).
            batch.maybe_written = True
        except Exception as exc:  # the channel closed under us, or similar: retry elsewhere
            err = NodeUnavailable(f"produce to {address} failed: {exc!r}")
            batch.maybe_written = True
        self._forget_call(st, call, stall_check)
        st.in_flight -= 1
        if err is None:
            assert resp is not None
            if st.recovering and not st.failed:
                st.recovering = False
            st.retry.succeeded()
            self.meta.note_reachable(address)
            base = -1 if self.config.acks == broker_pb2.ACKS_NONE else resp.base_offset
            if batch.sequence >= 0:
                self._acknowledged(st, batch, resp)
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
        if isinstance(err, ProducerFenced):
            self._fenced(err)
            self._fail_batch(batch, self.fatal or err)
            return
        if batch.sequence >= 0 and isinstance(err, OutOfOrderSequence | UnknownProducerId):
            refusal = self._sequence_refusal(tp, st, batch, err)
            if refusal is None:
                if expired:
                    self._fail_batch(batch, self._timed_out(batch, err))
                    return
                # Not stored, and the batch keeps its place: it goes again, in order, once
                # the requests sent before it have answered (no backoff: nothing is wrong
                # with the node).
                st.failed.append(batch)
                st.recovering = True
                return
            err = refusal
        if not err.retriable or batch.attempts > self.config.retries or expired:
            if expired and err.retriable:
                err = self._timed_out(batch, err)
            log.warning("batch for %s failed (%d records): %s", tp, batch.record_count, err)
            self._fail_batch(batch, err)
            return
        log.debug("retrying batch for %s after %s", tp, err)
        st.failed.append(batch)
        st.recovering = True
        st.backoff_due = True
        if not st.retry.failed(address, err) and is_leader_error(err):
            self._spawn(self._refresh_quietly(tp.topic), f"refresh {tp.topic}")

    def _sequence_refusal(
        self, tp: TopicPartition, st: _PartitionState, batch: PendingBatch, err: TidelogError
    ) -> TidelogError | None:
        """What a sequence refusal of an idempotent batch means: None when the batch is to
        go again in order (it was refused because a batch before it is not stored yet, or
        the partition forgot the producer and a new session resends it), else the error
        the batch fails with."""
        if batch.sequence != st.acked_sequence_next or batch.sent_behind:
            # A batch before it failed or is still in flight (it may reach the node later:
            # gRPC does not order concurrent calls), or was acknowledged only after this
            # attempt left: the node may have refused this one before it stored the earlier
            # batch (answers come back in any order too). It goes again after it; a refusal
            # is taken for lost state only when every earlier batch was acknowledged before
            # the attempt was sent.
            return None
        if isinstance(err, UnknownProducerId):
            # Every batch before it is acknowledged, and the partition holds nothing of this
            # producer: it was idle past the node's producer.id.expiration.ms, or retention
            # deleted its batches. Nothing in flight is stored there, so a new session
            # resends the batches from sequence 0.
            log.info(
                "%s: the node forgot producer %d; starting a new session", tp, batch.producer_id
            )
            st.reset_session = True
            return None
        # Every batch before it is acknowledged and the node still expects another sequence:
        # it lost acknowledged batches or this producer's state. Kafka's producer fails the
        # batch rather than guess; the partition's later batches go in a new session.
        st.reset_session = True
        return OutOfOrderSequence(
            f"{tp}: the node refused batch sequence {batch.sequence} of producer "
            f"{batch.producer_id} although every earlier batch was acknowledged ({err}); "
            "the node may have lost acknowledged records. These records were not stored; "
            "the partition's next batches go in a new producer session",
            **err.metadata,
        )

    def _fenced(self, err: TidelogError) -> None:
        """PRODUCER_FENCED: a newer session of this producer id took over. Nothing more can
        be sent (Kafka's producer must be closed too): every waiting batch fails with it."""
        if self.fatal is not None:
            return
        log.error("producer fenced: %s", err)
        self.fatal = ProducerFenced(
            f"{err}; this producer can send nothing more: close it and create a new one",
            **err.metadata,
        )
        for tp in list(self.acc.batches):
            self.fail_partition(tp, self.fatal)
        for tp, st in self._parts.items():
            if st.failed:
                self.fail_partition(tp, self.fatal)

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
            if st.backoff_due:
                st.backoff_due = False
                self._schedule_retry(tp, st)
            else:
                st.retry_at_s = 0.0
        if self.acc.head(tp) is not None:
            # Something queued may go now; with nothing queued (the caller awaited this
            # answer before sending more), the next send wakes the partition itself.
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
        if batch.maybe_written and not isinstance(err, OutcomeUnknown | ProducerFenced):
            err = OutcomeUnknown(
                f"{err} (an attempt went unanswered after the node may have stored it: "
                "the records may be stored, and sending them again may store them twice)"
            )
        if batch.sequence >= 0:
            st = self._parts.get(TopicPartition(batch.topic, batch.partition))
            if st is not None and st.session is not None:
                if batch.producer_id == st.session.producer_id:
                    # A gap in the partition's sequences: the batches after it would be
                    # refused forever, so they go in a new session.
                    st.reset_session = True
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

    # -- idempotence ------------------------------------------------------------------------

    def _session_ready(self, tp: TopicPartition, st: _PartitionState) -> bool:
        """Whether the partition may stamp and send now: it counts its sequences in a
        session that is still good. A partition moves to a newer session only once nothing
        is in flight for it (no request of the old session can land after the new one's),
        and then its queued batches are stamped again, in order, from sequence 0."""
        if st.session is not None and not st.reset_session:
            return True
        if st.in_flight:
            return False  # the last answer wakes the partition again
        current = self._session
        if current is None or (
            st.session is not None and current.generation <= st.session.generation
        ):
            self._want_session(tp)
            return False
        if st.session is not None:
            log.info(
                "%s: producer session %d/%d -> %d/%d",
                tp,
                st.session.producer_id,
                st.session.producer_epoch,
                current.producer_id,
                current.producer_epoch,
            )
        st.session = current
        st.next_sequence = 0
        st.acked_sequence_next = 0
        st.reset_session = False
        for batch in self.acc.batches.get(tp, ()):
            if batch.sequence >= 0:
                batch.stamp(-1, -1, -1)
        return True

    def _stamp(self, st: _PartitionState, batch: PendingBatch) -> None:
        """The one place a batch gets its sequence: when it is first drained. Retries
        resend it with the same one, so the node recognizes a batch it already stored."""
        session = st.session
        assert session is not None
        batch.stamp(session.producer_id, session.producer_epoch, st.next_sequence)
        st.next_sequence = (st.next_sequence + batch.record_count) % SEQUENCE_MOD

    def _acknowledged(
        self, st: _PartitionState, batch: PendingBatch, resp: broker_pb2.ProduceResponse
    ) -> None:
        if any(r.duplicate for r in resp.results):
            self.duplicates += 1
        session = st.session
        if session is None or batch.producer_id != session.producer_id:
            return
        end = (batch.sequence + batch.record_count) % SEQUENCE_MOD
        # Answers may come in any order; only a later end moves the mark (modulo 2**31).
        if (end - st.acked_sequence_next) % SEQUENCE_MOD < SEQUENCE_MOD // 2:
            st.acked_sequence_next = end

    def _want_session(self, tp: TopicPartition) -> None:
        self._session_waiters.add(tp)
        if self._session_task is None and not self.closed:
            self._session_task = self._spawn(self._init_session(), "init producer id")

    async def _init_session(self) -> None:
        """Get a new producer id from any node (InitProducerId), then wake the partitions
        waiting for it. Every call asks for a new id: a session ends only when a partition
        forgot it or its sequences have a gap, and a fresh id cannot clash with either."""
        backoff_ms = float(max(self.config.retry_backoff_ms, 1))
        request = broker_pb2.InitProducerIdRequest()
        timeout_s = INIT_PRODUCER_ID_TIMEOUT_MS / 1000

        async def ask(address: str) -> broker_pb2.InitProducerIdResponse:
            resp: broker_pb2.InitProducerIdResponse = await self.meta.broker(
                address
            ).InitProducerId(request, timeout=timeout_s)
            return resp

        try:
            for attempt in range(INIT_PRODUCER_ID_ATTEMPTS_MAX):
                try:
                    resp = await self.meta.call_any("InitProducerId", ask)
                    break
                except TidelogError as err:
                    last = attempt == INIT_PRODUCER_ID_ATTEMPTS_MAX - 1
                    if isinstance(err, Unsupported) or not err.retriable or last:
                        self._session_failed(err)
                        return
                    log.debug("InitProducerId failed (%s); retrying", err)
                await asyncio.sleep(backoff_ms / 1000)
                backoff_ms = min(backoff_ms * 2, RETRY_BACKOFF_MAX_MS)
            else:  # pragma: no cover - the loop returns or breaks
                return
            generation = 1 if self._session is None else self._session.generation + 1
            self._session = _Session(resp.producer_id, resp.producer_epoch, generation)
            self.sessions_started += 1
            log.debug("producer id %d epoch %d", resp.producer_id, resp.producer_epoch)
        finally:
            self._session_task = None
        waiters, self._session_waiters = self._session_waiters, set()
        for tp in waiters:
            self.wake(tp)

    def _session_failed(self, err: TidelogError) -> None:
        if isinstance(err, Unsupported):
            why = "the cluster does not support idempotent producers"
        else:
            why = "no node handed out a producer id"
        failure = TidelogError(
            f"{why} (InitProducerId: {err}); the records were not sent. Create the producer "
            "with enable_idempotence=False to send without producer ids (retries may then "
            "store a batch twice)"
        )
        waiters, self._session_waiters = self._session_waiters, set()
        for tp in waiters:
            self.fail_partition(tp, failure)


def _outcome_unknown(exc: grpc.aio.AioRpcError, err: TidelogError) -> bool:
    """Whether a failed Produce call may have been appended: it timed out (at the client, or
    at the node while waiting for replicas), or the connection broke with no answer. A
    refused connection, or any answer of the node, means it surely was not."""
    if isinstance(err, RequestTimedOut):
        return True
    if isinstance(err, NodeUnavailable) and transport_failure(exc):
        return "failed to connect" not in (exc.details() or "").lower()
    return False
