"""``python -m tidelog ...`` is the ``tidelog`` command.

The command needs the node extras (``pip install "tidelog[node]"``); with the client alone
installed it says so in one line instead of a traceback.
"""

from __future__ import annotations

import sys
from typing import NoReturn

EXIT_ERROR = 1


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

    cli_main()


if __name__ == "__main__":
    main()
