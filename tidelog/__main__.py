"""``python -m tidelog ...`` is the ``tidelog`` command."""

from tidelog.ops.cli import main

if __name__ == "__main__":
    main()
