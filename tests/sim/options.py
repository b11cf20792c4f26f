"""The options of one simulation run, every one drawn from the run's seed.

Randomizing the options per seed (as TigerBeetle's VOPR does) explores far more of the
space than a fixed configuration: one seed runs five nodes on a lossy, slow network without
pre-vote, the next three nodes on a clean network with a crashing disk. The bounds live here
as named constants, units last, and their relations are asserted at import time.

Time: the simulated clock counts *units*; a node's Raft ``tick()`` fires every
``tick_period_units`` (about ``TICK_UNITS``, skewed per node to model clock drift), so message
and disk latencies are finer-grained than ticks.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, fields

#: Nominal length of one Raft tick on the simulated clock.
TICK_UNITS = 10
#: Per-node clock skew: a node ticks every TICK_UNITS +- this many units.
TICK_SKEW_UNITS_MAX = 1

ELECTION_TICKS_MIN = 6
ELECTION_TICKS_MAX = 14
HEARTBEAT_TICKS_MAX = 3

#: Network latency bounds: the common case is well under a tick, the slow tail is long enough
#: for a message to arrive after one or more elections (stale terms, stale appends).
LATENCY_UNITS_MIN = 1
LATENCY_UNITS_MAX = 2 * TICK_UNITS
SLOW_LATENCY_UNITS_MAX = 12 * TICK_UNITS
DROP_RATE_MAX = 0.2
DUPLICATE_RATE_MAX = 0.1
SLOW_RATE_MAX = 0.3

#: A synced write takes up to this long; the node is busy (it neither ticks nor receives)
#: until the sync completes, and a crash in that window loses or tears the write.
SYNC_UNITS_MAX = 6

#: The safety phase's length; faults are injected only inside it.
SAFETY_TICKS_MIN = 300
SAFETY_TICKS_MAX = 700
#: The liveness phase must elect a leader and commit a fresh proposal within this many ticks
#: of healing every fault, counted in election timeouts so it scales with the options.
LIVENESS_ELECTIONS_MAX = 12

#: Bounds on the work a run can do, so a livelock in the core fails the run instead of
#: hanging CI. Not a liveness bound (the liveness phase has its own, in time): membership
#: seeds 7461 and 8520 need 62,000 and 80,000 events to catch up learners one 64-byte
#: message at a time with 256 in flight on a reordering network, and pass.
EVENTS_PER_RUN_MAX = 200_000
CLIENTS_MAX = 3
#: Outstanding (proposed, not yet acknowledged or abandoned) proposals per client.
CLIENT_PENDING_MAX = 4
#: A client abandons a proposal it has not seen acknowledged after this many ticks.
CLIENT_TIMEOUT_TICKS = 40

assert TICK_SKEW_UNITS_MAX < TICK_UNITS // 2
assert 0 < HEARTBEAT_TICKS_MAX < ELECTION_TICKS_MIN <= ELECTION_TICKS_MAX
assert LATENCY_UNITS_MIN <= LATENCY_UNITS_MAX < SLOW_LATENCY_UNITS_MAX
assert SAFETY_TICKS_MIN <= SAFETY_TICKS_MAX
assert CLIENT_TIMEOUT_TICKS > ELECTION_TICKS_MAX


@dataclass(frozen=True, slots=True)
class SimOptions:
    """Everything a run varies; printed by trace mode so a failing seed's setting is visible."""

    voters: int
    learners: int
    election_ticks: int
    heartbeat_ticks: int
    pre_vote: bool
    check_quorum: bool
    max_inflight_msgs: int
    max_msg_bytes: int
    max_inflight_bytes: int
    max_uncommitted_bytes: int
    max_committed_bytes_per_ready: int
    latency_units_min: int
    latency_units_max: int
    slow_rate: float
    drop_rate: float
    duplicate_rate: float
    sync_units_max: int
    #: Mean ticks between crashes (0: no crashes in this run).
    crash_every_ticks: int
    #: Probability that a crash tears unsynced writes to a random prefix rather than losing
    #: them all.
    torn_write_rate: float
    #: A crashed node restarts after 1 unit to this many ticks.
    downtime_ticks_max: int
    #: Mean ticks between network partitions (0: none).
    partition_every_ticks: int
    partition_ticks_max: int
    #: Mean ticks between leadership transfer requests (0: none).
    transfer_every_ticks: int
    #: Snapshot and compact each node's log every this many applied entries (0: never).
    compact_every_entries: int
    clients: int
    #: Mean units between two proposals of one client.
    propose_every_units: int
    payload_bytes_max: int
    safety_ticks: int
    #: Probability that a node crashes in the middle of an fsync it just started, or just
    #: after a write that needed no fsync.
    mid_sync_crash_rate: float
    #: Mean units between two linearizable read requests (0: no reads).
    read_every_units: int
    #: Mean ticks between process pauses (0: none); a pause lasts up to 3 election timeouts.
    pause_every_ticks: int
    #: Whether the driver keeps stepping messages, ticks and proposals into the core while
    #: a Ready's fsync is in flight (ready() waits for advance() either way).
    step_while_syncing: bool
    #: How long a node's loop runs before it takes a Ready after new input (0: at once);
    #: inputs arriving meanwhile are stepped and share the Ready (batching).
    ready_delay_units: int
    #: Width of the randomized election timeout (0: the core's default, [T, 2T)).
    election_span_ticks: int
    #: Whether a new leader always appends an EMPTY entry (else only when its log holds
    #: entries beyond its commit index).
    always_append_empty: bool
    #: Whether the transport reports undeliverable messages and snapshot outcomes to the
    #: sender's core (``report_unreachable``, ``report_snapshot``).
    transport_reports: bool
    #: Whether commits travel lazily (``Config.lazy_commit``, as the node's partitions run).
    #: Not drawn: the profile sets it, so every seed keeps its eager run and gets a lazy one.
    lazy_commit: bool = False

    @classmethod
    def draw(cls, rng: random.Random) -> SimOptions:
        """Draws every option from ``rng``; the order of the draws is part of the seed's
        meaning, so append new options at the end to keep old seeds reproducing."""
        voters = rng.choice((3, 3, 5))
        latency_min = rng.randint(LATENCY_UNITS_MIN, 3)
        msg_bytes = rng.choice((1, 64, 512, 1 << 20))
        election = rng.randint(ELECTION_TICKS_MIN, ELECTION_TICKS_MAX)
        return cls(
            voters=voters,
            learners=rng.choice((0, 0, 0, 1)),
            election_ticks=election,
            heartbeat_ticks=rng.randint(1, HEARTBEAT_TICKS_MAX),
            pre_vote=rng.random() < 0.75,
            check_quorum=rng.random() < 0.75,
            max_inflight_msgs=rng.choice((1, 2, 4, 16, 256)),
            max_msg_bytes=msg_bytes,
            max_inflight_bytes=msg_bytes * rng.choice((1, 4, 64)),
            max_uncommitted_bytes=max(msg_bytes, rng.choice((256, 4096, 1 << 26))),
            max_committed_bytes_per_ready=msg_bytes * rng.choice((1, 8, 1024)),
            latency_units_min=latency_min,
            latency_units_max=rng.randint(latency_min, LATENCY_UNITS_MAX),
            # No tail, a thin one, or a fat one that keeps elections churning and delivers
            # answers to elections long lost (stale terms, stale grants, stale appends).
            slow_rate=rng.choice((0.0, rng.uniform(0.0, 0.05), rng.uniform(0.05, SLOW_RATE_MAX))),
            drop_rate=rng.choice((0.0, rng.uniform(0.0, DROP_RATE_MAX))),
            duplicate_rate=rng.choice((0.0, rng.uniform(0.0, DUPLICATE_RATE_MAX))),
            sync_units_max=rng.randint(0, SYNC_UNITS_MAX),
            crash_every_ticks=rng.choice((0, 15, 30, 60, 120)),
            torn_write_rate=rng.choice((0.0, 0.5, 1.0)),
            downtime_ticks_max=rng.randint(5, 40),
            partition_every_ticks=rng.choice((0, 25, 50, 100)),
            partition_ticks_max=rng.randint(10, 60),
            transfer_every_ticks=rng.choice((0, 0, 40, 80)),
            compact_every_entries=rng.choice((0, 0, 5, 20, 50)),
            clients=rng.randint(1, CLIENTS_MAX),
            propose_every_units=rng.choice((5, 10, 20, 50)),
            payload_bytes_max=rng.choice((8, 64, 300)),
            safety_ticks=rng.randint(SAFETY_TICKS_MIN, SAFETY_TICKS_MAX),
            mid_sync_crash_rate=rng.choice((0.0, 0.002, 0.01)),
            read_every_units=rng.choice((0, 10, 40)),
            pause_every_ticks=rng.choice((0, 20, 50, 100)),
            step_while_syncing=rng.random() < 0.5,
            ready_delay_units=rng.choice((0, 0, 1, 3)),
            # A span of a tick or two leaves no randomization to break split votes (seeds
            # 1586 and 2846 livelocked so): keep at least a third of the timeout.
            election_span_ticks=rng.choice((0, 0, election // 2, election // 3)),
            always_append_empty=rng.random() < 0.6,
            transport_reports=rng.random() < 0.5,
        )

    def describe(self) -> str:
        return " ".join(f"{f.name}={getattr(self, f.name)}" for f in fields(self))
