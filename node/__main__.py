"""``python -m tidelog.node --id 1 --listen 127.0.0.1:9092 --data-dir DIR --metrics-port 9644``
``[--controller-voters 1@H:P,2@H:P,3@H:P] [--election-timeout-ms 1000]``
``[--heartbeat-interval-ms 100] [--node-dead-ms 3000] [--cluster-id ID]``

The same as ``tidelog node start``, without the CLI's dependencies: tests and the
allocator re-exec (node/main.py) start nodes this way.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tidelog.node.main import (
    ELECTION_TIMEOUT_MS_DEFAULT,
    HEARTBEAT_INTERVAL_MS_DEFAULT,
    NODE_DEAD_MS_DEFAULT,
    ClusterSettings,
    run_node,
)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m tidelog.node", description="Run one tidelog node."
    )
    parser.add_argument("--id", type=int, required=True, dest="node_id", help="node id (>= 1)")
    parser.add_argument("--listen", required=True, help="gRPC host:port (port 0: any free)")
    parser.add_argument("--data-dir", type=Path, required=True, help="where logs and metadata live")
    parser.add_argument(
        "--metrics-port", type=int, required=True, help="Prometheus port (0: any free)"
    )
    parser.add_argument(
        "--advertised", default=None, help="host:port clients dial (default: listen)"
    )
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    parser.add_argument(
        "--controller-voters",
        default=None,
        metavar="ID@HOST:PORT,...",
        help="the controller's Raft voters, the same list on every node (default: this node "
        "alone, a one-node cluster); every other node follows the metadata log as a learner",
    )
    parser.add_argument(
        "--election-timeout-ms",
        type=int,
        default=ELECTION_TIMEOUT_MS_DEFAULT,
        help="Raft election timeout; followers wait a random time in [T, 1.5T) (default 1000)",
    )
    parser.add_argument(
        "--heartbeat-interval-ms",
        type=int,
        default=HEARTBEAT_INTERVAL_MS_DEFAULT,
        help="Raft leader heartbeat interval (default 100)",
    )
    parser.add_argument(
        "--node-dead-ms",
        type=int,
        default=NODE_DEAD_MS_DEFAULT,
        help="the controller marks a node dead after this much silence (default 3000)",
    )
    parser.add_argument(
        "--cluster-id",
        default=None,
        help="cluster id (default: derived from the controller voters' ids)",
    )
    parser.add_argument(
        "--rack",
        default=None,
        help="failure domain of this node (replicas of a partition go to distinct racks)",
    )
    args = parser.parse_args(argv)
    if args.node_id < 1:
        parser.error(f"--id must be >= 1, got {args.node_id}")
    if not 0 <= args.metrics_port <= 65535:
        parser.error(f"--metrics-port must be in 0..65535, got {args.metrics_port}")
    try:
        settings = ClusterSettings(
            controller_voters=args.controller_voters,
            election_timeout_ms=args.election_timeout_ms,
            heartbeat_interval_ms=args.heartbeat_interval_ms,
            node_dead_ms=args.node_dead_ms,
            cluster_id=args.cluster_id,
            rack=args.rack,
        )
    except ValueError as exc:
        parser.error(str(exc))
    run_node(
        args.node_id,
        args.listen,
        args.data_dir,
        args.metrics_port,
        args.advertised,
        args.log_level,
        settings,
    )


if __name__ == "__main__":
    main(sys.argv[1:])
