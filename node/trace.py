"""Where a produce request's time goes: spans of sampled requests (``--trace-sample N``).

Every Nth Produce request on a partition leader is traced from its arrival to its answer;
each step's time goes into ``tidelog_trace_produce_seconds{stage}`` and, with
``--trace-log``, into one log line per request. The stages, in order:

* ``admit``: arrival to proposal (validation, the idempotence check, decompression checks
  of a large request in a worker thread);
* ``leader_store``: proposal to the leader's own copy being durable (its round's append and
  fsync; with ``flush=os`` the append only);
* ``quorum``: proposal to commit (a majority holds the entry: the followers' rounds and the
  network, overlapping ``leader_store``; then the leader's next round);
* ``apply``: commit to applied (the partition's state machine);
* ``answer``: applied to the handler's answer (the waiter's wake-up);
* ``total``: arrival to answer.

Followers trace every Nth APPEND that carries entries: ``tidelog_trace_follower_seconds``
``{stage="queued"}`` is its arrival to the start of the round that stores it, ``{stage=
"answered"}`` its arrival to its answer leaving (after the follower's fsync).

With sampling off (the default) no request pays anything but one integer test.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Histogram

log = logging.getLogger("tidelog.trace")

_BUCKETS_S = (
    0.00005, 0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.02, 0.05,
    0.1, 0.25, 0.5, 1.0,
)  # fmt: skip
PRODUCE_STAGES = ("admit", "leader_store", "quorum", "apply", "answer", "total")
FOLLOWER_STAGES = ("queued", "answered")


@dataclass(slots=True)
class ProduceSpan:
    """Monotonic nanoseconds of one traced request's steps (0: not reached)."""

    topic: str
    partition: int
    received: int
    proposed: int = 0
    index: int = 0
    stored: int = 0
    committed: int = 0
    applied: int = 0


class Tracer:
    """The node's sampler and its histograms (one per node, in the node's registry)."""

    def __init__(self, registry: CollectorRegistry, every: int = 0, log_spans: bool = False):
        if every < 0:
            raise ValueError(f"trace sample interval must be >= 0, got {every}")
        self.every = every
        self.log_spans = log_spans
        self._produce_n = 0
        self._append_n = 0
        produce = Histogram(
            "tidelog_trace_produce_seconds",
            "Steps of sampled produce requests on the leader (--trace-sample): admit, "
            "leader_store, quorum, apply, answer, total.",
            ["stage"], buckets=_BUCKETS_S, registry=registry,
        )  # fmt: skip
        follower = Histogram(
            "tidelog_trace_follower_seconds",
            "Sampled APPENDs with entries on a follower (--trace-sample): queued (arrival to "
            "its round), answered (arrival to the answer leaving).",
            ["stage"], buckets=_BUCKETS_S, registry=registry,
        )  # fmt: skip
        self._produce = {s: produce.labels(s) for s in PRODUCE_STAGES}
        self._follower = {s: follower.labels(s) for s in FOLLOWER_STAGES}

    def produce(self, topic: str, partition: int) -> ProduceSpan | None:
        """A span for this request if it is sampled, else None."""
        if not self.every:
            return None
        self._produce_n += 1
        if self._produce_n % self.every:
            return None
        return ProduceSpan(topic, partition, time.monotonic_ns())

    def append_sampled(self) -> bool:
        if not self.every:
            return False
        self._append_n += 1
        return self._append_n % self.every == 0

    def follower(self, arrived_ns: int, round_ns: int, answered_ns: int) -> None:
        self._follower["queued"].observe(max(0, round_ns - arrived_ns) / 1e9)
        self._follower["answered"].observe(max(0, answered_ns - arrived_ns) / 1e9)

    def finish(self, span: ProduceSpan) -> None:
        """The request was answered: observe its steps (a step not reached is skipped)."""
        now = time.monotonic_ns()
        h = self._produce
        steps = {
            "admit": (span.received, span.proposed),
            "leader_store": (span.proposed, span.stored),
            "quorum": (span.proposed, span.committed),
            "apply": (span.committed, span.applied),
            "answer": (span.applied, now),
            "total": (span.received, now),
        }
        parts = []
        for stage, (a, b) in steps.items():
            if a and b:
                seconds = max(0, b - a) / 1e9
                h[stage].observe(seconds)
                parts.append(f"{stage}={seconds * 1000:.3f}ms")
        if self.log_spans:
            log.info(
                "trace produce %s/%d index %d: %s",
                span.topic, span.partition, span.index, " ".join(parts),
            )  # fmt: skip
