"""One consumer-group member in its own process, for tests and the group benchmark that kill
a member with SIGKILL. ``python -m tests.support.group_member --bootstrap B --group G --topic T``

It prints one JSON object per line on stdout, flushed at once, with wall-clock times
(``time.time()``, comparable across the processes of one machine):

    {"ev": "ready", "t": ...}
    {"ev": "assigned" | "revoked" | "lost", "t": ..., "tps": [[topic, partition], ...]}
    {"ev": "records", "t": ..., "batches": [[topic, partition, first, last, count], ...]}

and ends on SIGTERM (closing the consumer: revoke, commit, leave) or SIGKILL (nothing).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time
from typing import Any

from tidelog.client import Consumer, TopicPartition


def emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def callback(kind: str) -> Any:
    def record(tps: list[TopicPartition]) -> None:
        emit({"ev": kind, "t": time.time(), "tps": [[tp.topic, tp.partition] for tp in tps]})

    return record


async def run(args: argparse.Namespace) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    async with Consumer(
        args.bootstrap,
        group_id=args.group,
        group_instance_id=args.instance_id,
        auto_offset_reset="earliest",
        session_timeout_ms=args.session_timeout_ms,
        auto_commit_interval_ms=args.auto_commit_interval_ms,
    ) as consumer:
        consumer.subscribe(
            args.topic.split(","),
            on_assigned=callback("assigned"),
            on_revoked=callback("revoked"),
            on_lost=callback("lost"),
        )
        emit({"ev": "ready", "t": time.time()})
        while not stop.is_set():
            batches = await consumer.poll_batches(timeout_ms=100)
            if batches:
                emit(
                    {
                        "ev": "records",
                        "t": time.time(),
                        "batches": [
                            [
                                b.topic,
                                b.partition,
                                b.records[0].offset,
                                b.records[-1].offset,
                                len(b.records),
                            ]
                            for b in batches
                        ],
                    }
                )
    emit({"ev": "closed", "t": time.time()})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--group", required=True)
    parser.add_argument("--topic", required=True, help="comma-separated topics")
    parser.add_argument("--instance-id", default=None)
    parser.add_argument("--session-timeout-ms", type=int, default=45_000)
    parser.add_argument("--auto-commit-interval-ms", type=int, default=1_000)
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
