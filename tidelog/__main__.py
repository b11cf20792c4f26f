"""``python -m tidelog ...`` is the ``tidelog`` command.

Its client commands (produce, consume, topic, bench, cluster status and health against any
cluster) work with the plain install; the commands that run nodes (``node``, ``cluster up``,
``certs``, ...) need the node extras (``pip install "tidelog[node]"``) and, without them, say
so in one line instead of a traceback.
"""

from __future__ import annotations

import sys
from typing import NoReturn

EXIT_ERROR = 1
#: What ``tidelog[node]`` adds that the plain install lacks (pyproject.toml).
NODE_EXTRAS_MODULES = frozenset(
    {"rocksdict", "prometheus_client", "cryptography", "uvloop", "grpc_health", "grpc_reflection"}
)


def main() -> NoReturn:
    try:
        import click  # noqa: F401
        import rich  # noqa: F401
    except ImportError as exc:
        sys.stderr.write(
            f"error: the tidelog command needs the node extras ({exc.name} is not installed): "
            "pip install 'tidelog[node]'\n"
        )
        sys.exit(EXIT_ERROR)
    from tidelog.ops.cli import main as cli_main

    try:
        cli_main()
    except ModuleNotFoundError as exc:
        if exc.name is None or exc.name.split(".")[0] not in NODE_EXTRAS_MODULES:
            raise
        sys.stderr.write(
            f"error: this command needs the node extras ({exc.name} is not installed): "
            "pip install 'tidelog[node]'\n"
        )
        sys.exit(EXIT_ERROR)


if __name__ == "__main__":
    main()
