"""``python -m tests.sim.node``: run node-level simulation seeds (issue 8).

    .venv/bin/python -m tests.sim.node --seeds 1000           # seeds 0..999
    .venv/bin/python -m tests.sim.node --seeds 500 --start 7000
    .venv/bin/python -m tests.sim.node --seed 24 -v           # one seed, its whole trace
    .venv/bin/python -m tests.sim.node --regressions          # every seed in regressions.txt
    .venv/bin/python -m tests.sim.node --seeds 200 --profile wipe      # crashes lose disks
    .venv/bin/python -m tests.sim.node --seeds 200 --profile flush-os  # topics without fsync

Each failing seed prints ``reproduce: ... --seed S  # invariant: detail`` and the last
lines of its trace; the summary counts failures by invariant and gives seeds per second.
The exit status is 1 if any seed failed.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter

from .runner import load_regressions
from .sim import PROFILES, run_seed


def main(argv: list[str] | None = None) -> int:
    doc = __doc__ or ""
    parser = argparse.ArgumentParser(
        prog="python -m tests.sim.node", description=doc.split("\n")[0]
    )
    parser.add_argument("--seeds", type=int, default=100, help="how many seeds (default 100)")
    parser.add_argument("--start", type=int, default=0, help="first seed (default 0)")
    parser.add_argument("--seed", type=int, help="run this one seed only")
    parser.add_argument("--regressions", action="store_true", help="run regressions.txt")
    parser.add_argument("--profile", choices=PROFILES, default="default", help="fault profile")
    parser.add_argument("-v", "--verbose", action="store_true", help="print the whole trace")
    parser.add_argument("--tail", type=int, default=25, help="trace lines shown per failure")
    args = parser.parse_args(argv)

    if args.seed is not None:
        result = run_seed(args.seed, profile=args.profile, trace=print if args.verbose else None)
        s = result.stats
        if result.ok:
            print(
                f"seed {args.seed} ok: {s.virtual_s:.1f} virtual s, {s.produced} produced, "
                f"{s.acked_all} acks=all, {s.acked_one} acks=1, {s.consumed} consumed, "
                f"{s.crashes} crashes ({s.power_losses} power losses), {s.partitions} "
                f"partitions, {s.stalls} fsync stalls, {s.fsync_failures} fsync failures"
            )
            return 0
        if not args.verbose:
            print("\n".join(result.trace[-args.tail :]))
        print(result.line())
        return 1

    if args.regressions:
        seeds = [(r.seed, r.profile) for r in load_regressions()]
    else:
        seeds = [(s, args.profile) for s in range(args.start, args.start + args.seeds)]
    failures: Counter[str] = Counter()
    failed = 0
    t0 = time.perf_counter()
    for i, (seed, profile) in enumerate(seeds, 1):
        result = run_seed(seed, profile=profile)
        if not result.ok:
            failed += 1
            failures.update(list(result.violations))
            for other in list(result.violations)[1:]:
                print(f"    also: {other}: {result.violations[other]}")
            print("\n".join("    " + line for line in result.trace[-args.tail :]))
            print(result.line(), flush=True)
        if i % 50 == 0:
            rate = i / (time.perf_counter() - t0)
            print(f"... {i}/{len(seeds)} seeds, {rate:.1f} seeds/s", file=sys.stderr, flush=True)
    wall = time.perf_counter() - t0
    print(
        f"{len(seeds)} seeds in {wall:.1f} s ({len(seeds) / wall:.2f} seeds/s), "
        f"{failed} failed; seeds per broken invariant:"
    )
    for invariant, n in failures.most_common():
        print(f"  {n:5d}  {invariant}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
