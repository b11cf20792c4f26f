"""A small randomized safety check of the core over the in-process harness.

Not the simulator (tests/sim/ owns crashes with lost writes, clocks and long runs): this is a
quick net under the unit tests. Messages are dropped, duplicated and reordered, links cut and
healed, nodes restarted from their storage; after every step the Raft safety properties are
checked, then faults are healed and the group must commit again.
"""

from __future__ import annotations

import random

import pytest

from tests.unit.raft_interaction.harness import Cluster
from tidelog.node.raft.errors import ProposalDropped
from tidelog.node.raft.limits import Config
from tidelog.node.raft.types import Role

STEPS = 400


class Checker:
    def __init__(self, c: Cluster) -> None:
        self.c = c
        self.leaders: dict[int, int] = {}
        self.committed: dict[int, tuple[int, bytes]] = {}

    def check(self) -> None:
        c = self.c
        for nid, node in c.nodes.items():
            r = node.raft
            if r.role == Role.LEADER:
                prev = self.leaders.setdefault(r.term, nid)
                assert prev == nid, f"two leaders in term {r.term}: {prev} and {nid}"
            # Everything up to the commit index is fixed forever, identically everywhere.
            first = r.log.first_index()
            for index in range(max(first, r.commit_index - 20), r.commit_index + 1):
                if index == 0:
                    continue
                e = r.log.slice(index, index + 1, 1 << 30)[0]
                seen = self.committed.setdefault(index, (e.term, e.data))
                assert seen == (e.term, e.data), f"committed entry {index} changed on {nid}"
            for e in node.applied[-5:]:
                assert self.committed.get(e.index, (e.term, e.data)) == (e.term, e.data)

    def check_log_matching(self) -> None:
        logs = {nid: {e.index: e for e in self.c.log_of(nid)} for nid in self.c.nodes}
        ids = list(logs)
        for i, a in enumerate(ids):
            for b in ids[i + 1 :]:
                common = sorted(set(logs[a]) & set(logs[b]), reverse=True)
                matched = False
                for index in common:
                    same = logs[a][index].term == logs[b][index].term
                    if matched:
                        assert same and logs[a][index].data == logs[b][index].data, (
                            f"log matching broken between {a} and {b} at {index}"
                        )
                    elif same:
                        matched = True
                        assert logs[a][index].data == logs[b][index].data


def run(seed: int, n: int, cfg: Config) -> None:
    rng = random.Random(seed)
    c = Cluster(range(1, n + 1), config=cfg, rng=random.Random(seed + 1))
    checker = Checker(c)
    proposals = 0
    for _ in range(STEPS):
        action = rng.random()
        if action < 0.35:
            for nid in c.nodes:
                c.tick(nid)
        elif action < 0.55:
            leaders = [r for r in (node.raft for node in c.nodes.values()) if r.role == Role.LEADER]
            if leaders:
                try:
                    rng.choice(leaders).propose(b"v%d" % proposals)
                    proposals += 1
                except ProposalDropped:
                    pass
        elif action < 0.6:
            ids = list(c.nodes)
            rng.shuffle(ids)
            cut = rng.randint(1, n - 1)
            c.partition(ids[:cut], ids[cut:])
        elif action < 0.65:
            c.heal()
        elif action < 0.68:
            c.restart(rng.choice(list(c.nodes)))
        for nid in c.nodes:
            c.process_ready(nid)
        # The network: drop, duplicate and reorder what is in flight.
        out = [m for m in c.outbox if rng.random() > 0.1]
        out += [m for m in out if rng.random() < 0.05]
        rng.shuffle(out)
        c.outbox = out
        c.deliver()
        checker.check()
    checker.check_log_matching()

    # Liveness: heal everything; a leader must emerge and every node must commit a new entry.
    # (Without pre-vote and check-quorum a lagging node may still disrupt a few terms first.)
    c.heal()
    final: dict[int, int] = {}  # term -> index of the entry its leader proposed
    for _ in range(50 * cfg.election_timeout_ticks):
        for nid in c.nodes:
            c.tick(nid)
        c.stabilize()
        for node in c.nodes.values():
            r = node.raft
            if r.role == Role.LEADER and r.term not in final:
                try:
                    final[r.term] = r.propose(b"final")
                except ProposalDropped:
                    pass
        c.stabilize()
        checker.check()
        done = [
            index
            for index in final.values()
            if checker.committed.get(index, (0, b""))[1] == b"final"
            and all(node.raft.commit_index >= index for node in c.nodes.values())
        ]
        if done:
            break
    else:
        raise AssertionError(f"seed {seed}: no entry committed everywhere after healing")
    checker.check_log_matching()


@pytest.mark.parametrize("seed", range(12))
def test_random_faults_keep_raft_safe(seed: int) -> None:
    cfg = Config(
        election_timeout_ticks=6,
        heartbeat_interval_ticks=1,
        max_msg_bytes=64,
        max_inflight_msgs=3,
        max_inflight_bytes=256,
        max_uncommitted_bytes=1024,
        max_committed_bytes_per_ready=64,
        pre_vote=seed % 3 != 0,
        check_quorum=seed % 4 != 0,
    )
    run(seed, n=3 if seed % 2 else 5, cfg=cfg)
