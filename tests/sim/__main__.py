"""``python -m tests.sim``: run simulation seeds with a progress bar and a summary.

    .venv/bin/python -m tests.sim --seeds 10000            # seeds 0..9999
    .venv/bin/python -m tests.sim --seeds 500 --start 7000
    .venv/bin/python -m tests.sim --seed 123 -v            # one seed, every event traced
    .venv/bin/python -m tests.sim --regressions            # every seed that once failed
    .venv/bin/python -m tests.sim --steady                 # messages per committed entry
    .venv/bin/python -m tests.sim --membership --seeds 500 # with membership changes
    .venv/bin/python -m tests.sim --lazy-commit --seeds 500 # commits told lazily, as partitions
    .venv/bin/python -m tests.sim --seeds 10000 --processes 2  # in two worker processes

Each failing seed prints one line, ``reproduce: ... --seed S  # invariant: detail``; the exit
status is 1 if any seed failed. ``--record`` appends failing seeds to ``regressions.txt``.
"""

from __future__ import annotations

import argparse
import sys

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from .runner import MEMBERSHIP_REGRESSIONS_PATH, load_regressions, record_regression, run_many
from .sim import RunResult, run_seed
from .steady import measure_steady_state


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.sim", description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=300, help="how many seeds (default 300)")
    parser.add_argument("--start", type=int, default=0, help="first seed (default 0)")
    parser.add_argument("--seed", type=int, help="run this one seed only")
    parser.add_argument("--regressions", action="store_true", help="run regressions.txt")
    parser.add_argument("--record", action="store_true", help="append failures to regressions")
    parser.add_argument("-v", "--verbose", action="store_true", help="trace every event")
    parser.add_argument("--steady", action="store_true", help="measure messages per entry")
    parser.add_argument(
        "--membership", action="store_true", help="the profile with membership changes"
    )
    parser.add_argument("--processes", type=int, default=1, help="worker processes (default 1)")
    parser.add_argument(
        "--lazy-commit",
        action="store_true",
        help="followers learn commits lazily (Config.lazy_commit, as the node's partitions)",
    )
    args = parser.parse_args(argv)
    console = Console()

    if args.steady:
        for line in measure_steady_state():
            print(line)
        return 0

    if args.seed is not None:
        result = run_seed(
            args.seed,
            trace=print if args.verbose else None,
            membership=args.membership,
            lazy_commit=args.lazy_commit,
        )
        if args.verbose:
            print(result.options.describe())
        if result.ok:
            s = result.stats
            print(
                f"seed {args.seed} ok: {s.events} events, {s.elections} elections, "
                f"{s.crashes} crashes, {s.acks}/{s.proposals} proposals acknowledged"
            )
            return 0
        print(result.line())
        if args.record:
            record_regression(result)
        return 1

    regressions = (
        load_regressions(MEMBERSHIP_REGRESSIONS_PATH) if args.membership else load_regressions()
    )
    seeds = regressions if args.regressions else range(args.start, args.start + args.seeds)
    seeds = list(seeds)
    columns = (
        TextColumn("[bold]sim"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[failed]} failed"),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("seeds", total=len(seeds), failed=0)
        failed = 0

        def on_result(result: RunResult) -> None:
            nonlocal failed
            if not result.ok:
                failed += 1
                progress.console.print(result.line(), markup=False, highlight=False, soft_wrap=True)
                if args.record:
                    record_regression(result)
            progress.update(task, advance=1, failed=failed)

        summary = run_many(
            seeds,
            on_result,
            membership=args.membership,
            lazy_commit=args.lazy_commit,
            processes=args.processes,
        )
    for line in summary.lines():
        print(line)
    return 1 if summary.failures else 0


if __name__ == "__main__":
    sys.exit(main())
