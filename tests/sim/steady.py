"""Messages per committed entry in a steady state, measured in the simulator.

A fault-free three-node cluster (heartbeat every tick, fsync of 0-1 units) runs until a
leader is elected and warmed up, then counts, over a fixed window, every message the nodes
send (appends, their acknowledgements, heartbeats and their responses) against the entries
the leader commits. The figure depends on the load and on the driver: at one proposal per
several ticks heartbeats dominate; under load each Ready's APPEND carries whatever was
proposed since the last one, so a driver that takes a Ready once per loop iteration (rather
than after every input) amortizes each round trip over many entries.
"""

from __future__ import annotations

import dataclasses

from tidelog.node.raft.types import Role

from .options import TICK_UNITS, SimOptions
from .sim import Simulation

#: Ticks before counting starts (an election and the first round trips).
WARMUP_TICKS = 100
WINDOW_TICKS = 400

#: (label, clients, mean units between proposals of one client, driver ready delay units)
SCENARIOS: tuple[tuple[str, int, int, int], ...] = (
    ("1 proposal / 5 ticks, Ready at once", 1, 50, 0),
    ("1 proposal / tick, Ready at once", 1, 10, 0),
    ("6 proposals / tick, Ready at once", 3, 5, 0),
    ("6 proposals / tick, Ready per 3-unit loop", 3, 5, 3),
    ("closed loop, 3 clients x 4 in flight, 3-unit loop", 3, 1, 3),
)


def _steady_options(
    base: SimOptions, clients: int, every_units: int, ready_delay: int
) -> SimOptions:
    return dataclasses.replace(
        base,
        voters=3,
        learners=0,
        election_ticks=10,
        heartbeat_ticks=1,
        pre_vote=True,
        check_quorum=True,
        max_inflight_msgs=256,
        max_msg_bytes=1 << 20,
        max_inflight_bytes=32 << 20,
        max_uncommitted_bytes=64 << 20,
        max_committed_bytes_per_ready=16 << 20,
        mid_sync_crash_rate=0.0,
        read_every_units=0,
        pause_every_ticks=0,
        step_while_syncing=True,
        ready_delay_units=ready_delay,
        latency_units_min=1,
        latency_units_max=3,
        slow_rate=0.0,
        drop_rate=0.0,
        duplicate_rate=0.0,
        sync_units_max=1,
        crash_every_ticks=0,
        partition_every_ticks=0,
        transfer_every_ticks=0,
        compact_every_entries=0,
        clients=clients,
        propose_every_units=every_units,
        payload_bytes_max=64,
        safety_ticks=WARMUP_TICKS + WINDOW_TICKS + 10,
    )


def measure(clients: int, every_units: int, ready_delay: int, seed: int = 1) -> tuple[int, int]:
    """(messages sent, entries committed by the leader) over the window."""
    base = Simulation(seed).opts
    opts = _steady_options(base, clients, every_units, ready_delay)
    sim = Simulation(seed, opts=opts)
    sim.start()
    sim.run_until(WARMUP_TICKS * TICK_UNITS)
    leaders = [n for n in sim.nodes.values() if n.role == Role.LEADER]
    assert leaders, "no leader after warm-up in a fault-free cluster"
    leader = leaders[0]
    msgs0, commit0, term0 = sim.stats.messages_sent, leader.log.commit, leader.term
    sim.run_until((WARMUP_TICKS + WINDOW_TICKS) * TICK_UNITS)
    assert leader.role == Role.LEADER and leader.term == term0, "leader changed while steady"
    return sim.stats.messages_sent - msgs0, leader.log.commit - commit0


def measure_steady_state() -> list[str]:
    lines = [f"steady state, 3 voters, window {WINDOW_TICKS} ticks, no faults"]
    for label, clients, every, delay in SCENARIOS:
        msgs, entries = measure(clients, every, delay)
        per = msgs / entries if entries else float("inf")
        lines.append(
            f"  {label:<40} {entries:>5} entries  {msgs:>6} messages  {per:6.2f} msgs/entry"
        )
    return lines
