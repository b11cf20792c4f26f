"""``python -m tests.sim.node``: run node-level simulation seeds (issue 8).

    .venv/bin/python -m tests.sim.node --seeds 1000           # seeds 0..999
    .venv/bin/python -m tests.sim.node --seeds 500 --start 7000
    .venv/bin/python -m tests.sim.node --seed 24 -v           # one seed, its whole trace
    .venv/bin/python -m tests.sim.node --regressions          # every seed in regressions.txt
    .venv/bin/python -m tests.sim.node --seeds 200 --profile wipe      # crashes lose disks
    .venv/bin/python -m tests.sim.node --seeds 200 --profile flush-os  # topics without fsync
    .venv/bin/python -m tests.sim.node --seeds 200 --profile move      # replicas moved under load
    .venv/bin/python -m tests.sim.node --seeds 200 --profile controller     # + controller group
    .venv/bin/python -m tests.sim.node --seeds 200 --profile wipe-majority  # 2 of 3 disks lost
    .venv/bin/python -m tests.sim.node --seeds 10000 --profile all --processes 2  # the big run

``--profile`` takes one profile, a comma-separated list, or ``all`` (every profile but those
in ``OPEN_PROFILES``, whose defect is known and open: see regressions.txt; none today); each
seed number runs once per profile. ``--processes N`` runs seeds in N worker processes
(each seed is deterministic on its own, so the results do not depend on N).

Each failing seed prints ``reproduce: ... --seed S  # invariant: detail`` and the last
lines of its trace; the summary counts failures by invariant and gives seeds per second.
The exit status is 1 if any seed failed.
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import time
from collections import Counter
from collections.abc import Iterator

from .runner import load_regressions
from .sim import PROFILES, RunResult, run_seed

#: Profiles ``--profile all`` leaves out: their defect is known and open (regressions.txt).
OPEN_PROFILES: tuple[str, ...] = ()


def _profiles(spec: str) -> list[str]:
    if spec == "all":
        return [p for p in PROFILES if p not in OPEN_PROFILES]
    names = [p.strip() for p in spec.split(",") if p.strip()]
    for name in names:
        if name not in PROFILES:
            raise SystemExit(f"unknown profile {name!r}: use 'all' or some of {PROFILES}")
    return names


def _run(job: tuple[int, str]) -> RunResult:
    return run_seed(job[0], profile=job[1])


def _results(jobs: list[tuple[int, str]], processes: int) -> Iterator[RunResult]:
    if processes <= 1:
        yield from map(_run, jobs)
        return
    with multiprocessing.Pool(processes) as pool:
        yield from pool.imap(_run, jobs, chunksize=4)


def main(argv: list[str] | None = None) -> int:
    doc = __doc__ or ""
    parser = argparse.ArgumentParser(
        prog="python -m tests.sim.node", description=doc.split("\n")[0]
    )
    parser.add_argument("--seeds", type=int, default=100, help="how many seeds (default 100)")
    parser.add_argument("--start", type=int, default=0, help="first seed (default 0)")
    parser.add_argument("--seed", type=int, help="run this one seed only")
    parser.add_argument("--regressions", action="store_true", help="run regressions.txt")
    parser.add_argument(
        "--profile",
        default="default",
        help=f"fault profile, a comma-separated list, or 'all' ({', '.join(PROFILES)})",
    )
    parser.add_argument("--processes", type=int, default=1, help="worker processes (default 1)")
    parser.add_argument("-v", "--verbose", action="store_true", help="print the whole trace")
    parser.add_argument("--tail", type=int, default=25, help="trace lines shown per failure")
    args = parser.parse_args(argv)

    profiles = _profiles(args.profile)
    if args.seed is not None:
        if len(profiles) != 1:
            raise SystemExit("--seed runs one profile: name it with --profile")
        result = run_seed(args.seed, profile=profiles[0], trace=print if args.verbose else None)
        s = result.stats
        if result.ok:
            print(
                f"seed {args.seed} ok: {s.virtual_s:.1f} virtual s, {s.produced} produced, "
                f"{s.acked_all} acks=all, {s.acked_one} acks=1, {s.consumed} consumed, "
                f"{s.crashes} crashes ({s.power_losses} power losses), {s.partitions} "
                f"partitions, {s.stalls} fsync stalls, {s.fsync_failures} fsync failures"
                + (
                    f", controller: {s.ctl_acked} commands acknowledged ({s.ctl_rejected} "
                    f"rejected by apply), {s.ctl_applies} applies, "
                    f"{s.ctl_snapshots_restored} snapshots restored"
                    if result.options.controller_voters
                    else ""
                )
                + (f", {s.wipes} wipes" if s.wipes else "")
                + (f", unavailable: {s.unavailable}" if s.unavailable else "")
            )
            return 0
        if not args.verbose:
            print("\n".join(result.trace[-args.tail :]))
        print(result.line())
        return 1

    if args.regressions:
        seeds = [(r.seed, r.profile) for r in load_regressions()]
    else:
        seeds = [
            (s, profile) for profile in profiles for s in range(args.start, args.start + args.seeds)
        ]
    failures: Counter[str] = Counter()
    per_profile: Counter[str] = Counter()
    failed_profile: Counter[str] = Counter()
    failed = 0
    t0 = time.perf_counter()
    for i, result in enumerate(_results(seeds, args.processes), 1):
        per_profile[result.profile] += 1
        if not result.ok:
            failed_profile[result.profile] += 1
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
    if len(per_profile) > 1:
        for profile, n in per_profile.items():
            print(f"  profile {profile}: {n} seeds, {failed_profile[profile]} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
