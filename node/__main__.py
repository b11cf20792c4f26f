"""``python -m tidelog.node --id 1 --listen 127.0.0.1:9092 --data-dir DIR --metrics-port 9644``
``[--controller-voters 1@H:P,2@H:P,3@H:P] [--election-timeout-ms 1000]``
``[--heartbeat-interval-ms 100] [--node-dead-ms 3000] [--cluster-id ID] [--rack NAME]``

Settings also come from ``--config node.toml`` and ``TIDELOG_NODE_*`` variables
(node/settings.py). The same as ``tidelog node start`` (both are built from the table in node/settings.py),
without the CLI's dependencies: tests and the allocator re-exec (node/main.py) start nodes
this way.
"""

from __future__ import annotations

import argparse
import os
import sys

from tidelog.node.main import node_flags, run_flags
from tidelog.node.settings import add_arguments, resolve


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tidelog.node", description="Run one tidelog node.")
    add_arguments(p)
    return p


def main(argv: list[str] | None = None) -> None:
    p = parser()
    args = p.parse_args(argv)
    try:
        flags, settings = node_flags(resolve(vars(args), os.environ).values)
    except ValueError as exc:
        # A bad setting is a usage error (exit 2, as argparse and click): one line naming
        # the setting, its value and what is allowed, without the usage text around it.
        print(f"{p.prog}: error: {exc}", file=sys.stderr)
        sys.exit(2)
    run_flags(flags, settings)


if __name__ == "__main__":
    main(sys.argv[1:])
