"""``python -m tidelog.node --id 1 --listen 127.0.0.1:9092 --data-dir DIR --metrics-port 9644``

The same as ``tidelog node start``, without the CLI's dependencies: tests and the
allocator re-exec (node/main.py) start nodes this way.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tidelog.node.main import run_node


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m tidelog.node", description="Run one tidelog node."
    )
    parser.add_argument("--id", type=int, required=True, dest="node_id", help="node id (>= 0)")
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
    args = parser.parse_args(argv)
    if args.node_id < 0:
        parser.error(f"--id must be >= 0, got {args.node_id}")
    if not 0 <= args.metrics_port <= 65535:
        parser.error(f"--metrics-port must be in 0..65535, got {args.metrics_port}")
    run_node(
        args.node_id, args.listen, args.data_dir, args.metrics_port, args.advertised, args.log_level
    )


if __name__ == "__main__":
    main(sys.argv[1:])
