"""The client's retry and sender limits, each beside the reason for its value.

One module for the bounds the producer's sender and the consumer's fetchers share, so they
cannot drift apart (they did: two copies of the backoff cap disagreed, 1 s and 2 s). User
facing defaults of one client object (``linger_ms``, ``max_bytes``, ...) stay with that
object; what is here is policy. Relations between the bounds are asserted at import time.
"""

from __future__ import annotations

from typing import Final

from tidelog.client.metadata import LEADER_POLL_INTERVAL_MS

#: First step of the doubling backoff between retries of one partition's requests (Kafka's
#: retry.backoff.ms): long enough that a node refusing for load is not asked again at once,
#: short against the ~1 s a failover takes.
RETRY_BACKOFF_MS_DEFAULT: Final = 100
#: Cap of the doubling backoff after errors that leave the leader in place (not enough
#: replicas, a bad request the node may accept later): the cluster needs time, and asking
#: more often does not give it any. 1 s as Kafka's retry.backoff.max.ms: a partition that
#: recovers is written again within a second, and a stuck one costs one request a second.
RETRY_BACKOFF_MAX_MS: Final = 1_000
#: Cap after leader errors: the wait also watches the metadata for a new leader (every
#: LEADER_POLL_INTERVAL_MS), so this only bounds how often a leader that stays put (or
#: dead) is asked again: 4 times a second.
LEADER_RETRY_BACKOFF_MAX_MS: Final = 250
#: Leader changes in a row a partition follows without any backoff; beyond it (two nodes
#: naming each other, a stale hint) the backoff applies until a request succeeds again.
#: 3 covers a leader moving twice during one failover (old -> transient -> final).
LEADER_HOPS_IMMEDIATE_MAX: Final = 3

#: How long a Produce request may go unanswered before the producer checks the metadata for
#: a new leader (client/sender.py); below the node's election timeout (1 s by default),
#: which no failover beats anyway.
LEADER_CHECK_AFTER_MS: Final = 1_000
#: How often a partition without a leader checks its batches against delivery_timeout_ms.
LEADERLESS_EXPIRY_CHECK_MS: Final = 500

#: Requests in flight per partition with idempotence on. The node remembers the last 5
#: batches of each producer per partition (Kafka's limit, kept by the node's producer
#: state): a retry of any batch still in flight is then recognized as a duplicate and
#: answered with its first offsets. More in flight could resend a batch the node forgot.
IDEMPOTENT_IN_FLIGHT_MAX: Final = 5
#: With adaptive linger, a partition that has requests out sends another only once its batch
#: holds this many bytes (or is full, or an answer came back): small requests in flight
#: together queue behind each other's Raft rounds on the nodes (docs/latency.md), so below
#: this a batch is better sent with everything that arrives until the answer.
PIPELINE_BATCH_BYTES_MIN: Final = 64 * 1024
#: With idempotence off the producer keeps ONE request in flight per partition by default:
#: gRPC does not order concurrent unary calls and the node appends them in the order its
#: handlers run, so two requests out at once may be stored in either order.
IN_FLIGHT_NON_IDEMPOTENT_DEFAULT: Final = 1
#: Sequence numbers are int32 in the batch header and wrap from 2**31 - 1 to 0 (as in Kafka
#: and the node, node/producer_state.py).
SEQUENCE_MOD: Final = 2**31
#: Attempts of an InitProducerId call before the batches waiting for an id fail (each
#: attempt asks the next node; the backoff between attempts is the retry backoff).
INIT_PRODUCER_ID_ATTEMPTS_MAX: Final = 20
INIT_PRODUCER_ID_TIMEOUT_MS: Final = 5_000

assert RETRY_BACKOFF_MS_DEFAULT <= LEADER_RETRY_BACKOFF_MAX_MS <= RETRY_BACKOFF_MAX_MS
assert LEADER_POLL_INTERVAL_MS < LEADER_RETRY_BACKOFF_MAX_MS
assert IN_FLIGHT_NON_IDEMPOTENT_DEFAULT <= IDEMPOTENT_IN_FLIGHT_MAX
