"""A cluster of real node processes shaped like ``tidelog cluster up --nodes N``: the first
three nodes are the controller voters, every other node joins with ``--join`` (the internal
address of node 1), all on free ports in a temporary directory with node-to-node TLS. And
helpers for the self-healing tests: the ``tidelog`` command, the cluster's description
(Admin.DescribeCluster), leaders counted from the replicas themselves."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

from tests.support.nodeproc import Cluster, Node, cluster_security
from tidelog.ops.processes import free_port

VOTERS = 3
COMMAND_TIMEOUT_S = 60.0
#: Failure detection of the test clusters: nodes are marked dead after this long.
NODE_DEAD_MS = 2_000


def joining_node(base: Path, node_id: int, join: str, security_base: Path) -> Node:
    """One more node (not a voter) that joins through ``join``; TLS files in the same CA."""
    tls, _ = cluster_security(security_base, (node_id,), "tls")
    return Node(
        base / f"n{node_id}",
        base / f"n{node_id}.log",
        node_id,
        extra_args=("--join", join, "--node-dead-ms", str(NODE_DEAD_MS)),
        tls=tls[node_id],
    )


def spawn_healing_cluster(base: Path, count: int) -> dict[int, Node]:
    """Nodes 1..count, voters 1..3, the rest joining; started without waiting."""
    ids = tuple(range(1, count + 1))
    voter_ids = ids[:VOTERS]
    ports = {i: (free_port(), free_port(), free_port()) for i in voter_ids}
    voters = ",".join(f"{i}@127.0.0.1:{ports[i][2]}" for i in voter_ids)
    tls, _ = cluster_security(base, voter_ids, "tls")
    nodes = {
        i: Node(
            base / f"n{i}",
            base / f"n{i}.log",
            i,
            ports[i][0],
            ports[i][1],
            voters,
            internal_port=ports[i][2],
            tls=tls[i],
            extra_args=("--node-dead-ms", str(NODE_DEAD_MS)),
        )
        for i in voter_ids
    }
    for i in ids[VOTERS:]:
        nodes[i] = joining_node(base, i, nodes[1].internal_address, base)
    try:
        for n in nodes.values():
            n.spawn()
    except BaseException:
        for n in nodes.values():
            n.kill()
        raise
    return nodes


def tidelog(bootstrap: str, *args: str) -> subprocess.CompletedProcess[bytes]:
    """``tidelog ARGS --bootstrap`` against the cluster, as an operator runs it."""
    env = dict(os.environ)
    env.pop("TIDELOG_BOOTSTRAP", None)
    env["TIDELOG_CLUSTER_DIR"] = "/nonexistent-tidelog-cluster"
    return subprocess.run(
        [sys.executable, "-m", "tidelog", "--bootstrap", bootstrap, *args],
        capture_output=True,
        env=env,
        timeout=COMMAND_TIMEOUT_S,
        check=False,
    )


def ok(result: subprocess.CompletedProcess[bytes]) -> str:
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout.decode()


def one_error_line(result: subprocess.CompletedProcess[bytes]) -> str:
    """The command failed with exit status 1 and exactly one 'error: ...' line."""
    err = result.stderr.decode()
    assert result.returncode == 1, (result.returncode, err, result.stdout.decode())
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


async def leader_counts(c: Cluster, alive: tuple[int, ...]) -> dict[int, int]:
    """Partitions each node leads, from the replicas' own roles."""
    leaders = await c.leaders(alive)
    counts = dict.fromkeys(alive, 0)
    for node in leaders.values():
        counts[node] = counts.get(node, 0) + 1
    return counts


class Load:
    """An acks=all producer writing ``p:seq`` to every partition of ``topic`` (one request in
    flight per partition), recording each acknowledged record's offset."""

    def __init__(self, bootstrap: str, topic: str, partitions: int) -> None:
        from tidelog.client import Producer

        self.topic = topic
        self.partitions = partitions
        self.producer = Producer(
            bootstrap,
            acks="all",
            linger_ms=2,
            max_in_flight_per_partition=1,
            request_timeout_ms=2_000,
            delivery_timeout_ms=120_000,
            retries=1_000_000,
            retry_backoff_ms=20,
        )
        #: partition -> [(offset, value)]
        self.acked: dict[int, list[tuple[int, bytes]]] = {p: [] for p in range(partitions)}
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        await self.producer.start()
        self._tasks = [asyncio.create_task(self._run(p)) for p in range(self.partitions)]

    async def _run(self, partition: int) -> None:
        from tidelog.errors import TidelogError

        seq = 0
        while not self._stop.is_set():
            value = b"%d:%d" % (partition, seq)
            seq += 1
            try:
                md = await self.producer.send(self.topic, value, partition=partition)
            except TidelogError:
                continue
            self.acked[partition].append((md.offset, value))
            await asyncio.sleep(0.01)

    def count(self) -> int:
        return sum(len(v) for v in self.acked.values())

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)
        await self.producer.stop()

    async def check_all_readable(self, bootstrap: str) -> None:
        """A consumer reads every acknowledged record at its acknowledged offset."""
        from tidelog.client import Consumer, TopicPartition

        ends = {p: max((o for o, _ in acks), default=-1) + 1 for p, acks in self.acked.items()}
        got: dict[int, dict[int, bytes]] = {p: {} for p in ends}
        async with Consumer(bootstrap, auto_offset_reset="earliest") as consumer:
            consumer.assign([TopicPartition(self.topic, p) for p in ends])
            remaining = {p for p, end in ends.items() if end > 0}
            async with asyncio.timeout(90):
                while remaining:
                    for r in await consumer.poll(timeout_ms=500):
                        got[r.partition][r.offset] = r.value or b""
                        if r.offset >= ends[r.partition] - 1:
                            remaining.discard(r.partition)
        for p, acks in self.acked.items():
            for offset, value in acks:
                assert got[p].get(offset) == value, (
                    f"partition {p}: acknowledged {value!r} at offset {offset}, read "
                    f"{got[p].get(offset)!r}"
                )
