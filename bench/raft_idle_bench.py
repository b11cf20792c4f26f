"""CPU cost of idle Raft groups on one node: what one tick costs over N idle follower cores.

A node runs thousands of groups; most are idle most of the time. An idle follower's tick must
be a counter increment and a compare. This prints, for N groups (default 10,000):

- tick only: ``RawNode.tick()`` on every follower;
- tick + has_ready: what a driver loop does per tick (tick, then skip the group if idle);
- heartbeat round: stepping one HEARTBEAT into every follower and taking/advancing its Ready
  (happens once per heartbeat interval, not every tick);
- idle leaders: tick + has_ready + ready/advance for N leaders of 3-voter groups (their
  heartbeats are the messages a per-peer batcher coalesces);
- quiescent groups: the node's driver (``MultiRaft._tick_all``) over N leader groups that
  went quiet (node/multiraft.py), the slow check of quiet groups included.

Usage: python bench/raft_idle_bench.py [--groups 10000] [--ticks 9] [--rounds 20]
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import time

from tidelog.node.metrics import NodeMetrics
from tidelog.node.multiraft import MultiRaft, RaftGroup
from tidelog.node.raft.core import RawNode
from tidelog.node.raft.limits import Config
from tidelog.node.raft.storage import MemoryStorage
from tidelog.node.raft.types import ConfState, Message, MessageKind, Role

CONF = ConfState(voters=frozenset({1, 2, 3}))


def make_followers(n: int, cfg: Config) -> list[RawNode]:
    rng = random.Random(1)
    nodes = []
    for _ in range(n):
        node = RawNode(2, MemoryStorage(CONF), rng, cfg)
        # Learn the leader (term 1) as an idle follower would.
        node.step(Message(MessageKind.HEARTBEAT, 1, 2, 1))
        node.advance(node.ready())
        nodes.append(node)
    return nodes


def make_leaders(n: int, cfg: Config) -> list[RawNode]:
    rng = random.Random(2)
    nodes = []
    for _ in range(n):
        node = RawNode(1, MemoryStorage(CONF), rng, cfg)
        node.campaign()
        for voter in (2, 3):
            node.step(Message(MessageKind.PRE_VOTE_RESP, voter, 1, 1))
        for voter in (2, 3):
            node.step(Message(MessageKind.VOTE_RESP, voter, 1, 1))
        assert node.role == Role.LEADER
        rd = node.ready()
        node.advance(rd)
        for voter in (2, 3):
            node.step(Message(MessageKind.APPEND_RESP, voter, 1, 1, index=1))
        node.advance(node.ready())
        nodes.append(node)
    return nodes


def heartbeat_round(nodes: list[RawNode], term: int) -> None:
    hb = Message(MessageKind.HEARTBEAT, 1, 2, term)
    for node in nodes:
        node.step(hb)
        if node.has_ready():
            node.advance(node.ready())


def measure(nodes: list[RawNode], ticks: int, rounds: int, with_ready: bool) -> list[float]:
    """Seconds of CPU per tick over all nodes, one sample per round."""
    samples = []
    for _ in range(rounds):
        heartbeat_round(nodes, 1)  # untimed: keeps the followers from campaigning
        gc.disable()
        start = time.process_time()
        for _ in range(ticks):
            if with_ready:
                for node in nodes:
                    node.tick()
                    if node.has_ready():
                        node.advance(node.ready())
            else:
                for node in nodes:
                    node.tick()
        samples.append((time.process_time() - start) / ticks)
        gc.enable()
    for node in nodes:
        assert node.role == Role.FOLLOWER, "a follower campaigned: the bench is not idle"
    return samples


def measure_heartbeat(nodes: list[RawNode], rounds: int) -> float:
    samples = []
    for _ in range(rounds):
        start = time.process_time()
        heartbeat_round(nodes, 1)
        samples.append(time.process_time() - start)
    return statistics.median(samples)


def measure_leaders(leaders: list[RawNode], ticks: int) -> tuple[float, int]:
    messages = 0
    gc.disable()
    start = time.process_time()
    for _ in range(ticks):
        for node in leaders:
            node.tick()
            if node.has_ready():
                rd = node.ready()
                messages += len(rd.messages)
                node.advance(rd)
    elapsed = time.process_time() - start
    gc.enable()
    return elapsed / ticks, messages


def measure_quiet(leaders: list[RawNode], ticks: int) -> tuple[float, int]:
    """CPU per driver tick once every group went quiet, and the messages it sent meanwhile."""
    raft = MultiRaft(1, None, NodeMetrics())  # type: ignore[arg-type]  # no storage is touched
    raft.quiesce = True

    def drive(raw: RawNode) -> None:  # store what the Ready holds, then advance
        rd = raw.ready()
        if rd.entries:
            raw.log.storage.append(rd.entries)  # type: ignore[attr-defined]
        raw.advance(rd)

    for raw in leaders:  # one write, stored, acknowledged by both followers and applied
        raw.propose(b"w")
        drive(raw)
        last = raw.log.last_index()
        for voter in (2, 3):
            raw.step(Message(MessageKind.APPEND_RESP, voter, 1, raw.term, index=last))
        drive(raw)
    for i, raw in enumerate(leaders, start=1):
        group = RaftGroup(i, raw, None, None, True)  # type: ignore[arg-type]
        raft.groups[i] = group
        raft._active[group] = None
    for _ in range(raft.quiesce_after_ticks + 1):
        raft._tick_all()
        for group in list(raft._dirty):  # what the ready loop does: send (drop) and advance
            if group.raw.has_ready():
                group.raw.advance(group.raw.ready())
        raft._dirty.clear()
    assert raft.quiet_groups == len(leaders), "the idle leaders did not all go quiet"
    gc.disable()
    start = time.process_time()
    for _ in range(ticks):
        raft._tick_all()
    elapsed = time.process_time() - start
    gc.enable()
    sent = sum(1 for raw in leaders if raw.has_ready())
    return elapsed / ticks, sent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", type=int, default=10_000)
    parser.add_argument("--ticks", type=int, default=9, help="timed ticks per round (< T)")
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    cfg = Config()
    assert args.ticks < cfg.election_timeout_ticks, "more ticks would start elections"

    followers = make_followers(args.groups, cfg)
    tick_only = measure(followers, args.ticks, args.rounds, with_ready=False)
    tick_ready = measure(followers, args.ticks, args.rounds, with_ready=True)
    hb = measure_heartbeat(followers, args.rounds)
    leaders = make_leaders(args.groups, cfg)
    leader_tick, leader_msgs = measure_leaders(leaders, args.ticks)

    n = args.groups
    print(f"{n} idle follower groups, {args.rounds} rounds x {args.ticks} ticks (CPU time):")
    print(
        f"  tick only:           median {statistics.median(tick_only) * 1e3:.2f} ms per tick "
        f"(min {min(tick_only) * 1e3:.2f}, {statistics.median(tick_only) / n * 1e9:.0f} ns/group)"
    )
    print(
        f"  tick + has_ready:    median {statistics.median(tick_ready) * 1e3:.2f} ms per tick "
        f"(min {min(tick_ready) * 1e3:.2f}, target < 5 ms)"
    )
    print(f"  heartbeat round:     {hb * 1e3:.1f} ms per round over {n} followers")
    print(
        f"{n} idle leader groups (3 voters, heartbeat every {cfg.heartbeat_interval_ticks} "
        f"tick): {leader_tick * 1e3:.1f} ms per tick, "
        f"{leader_msgs / args.ticks / n:.1f} heartbeats per group per tick"
    )
    quiet_tick, quiet_sent = measure_quiet(make_leaders(args.groups, cfg), 200)
    print(
        f"{n} quiescent leader groups (the node's driver, 200 ticks): "
        f"{quiet_tick * 1e3:.3f} ms per tick, {quiet_sent} groups with anything to send"
    )


if __name__ == "__main__":
    main()
