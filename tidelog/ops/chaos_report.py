"""The chaos run's report: per-round failover and restart times, the verdict, JSON and the
rich tables.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from tidelog.ops.bench import percentile
from tidelog.ops.chaos_verdict import (
    Verdict,
)

__all__ = [
    "ChaosReport",
    "RoundResult",
    "fmt_ms",
    "render_report",
]


# ---------------------------------------------------------------------------------------------
# Report


@dataclass(frozen=True, slots=True)
class RoundResult:
    round: int
    victim: int
    #: The partition whose leader was chosen as the victim (None: a random node).
    partition: int | None
    #: Partitions the victim led when it was killed.
    led: tuple[int, ...]
    #: Kill to "every led partition acknowledged a record sent after the kill"; None when the
    #: victim led nothing or the deadline passed first.
    failover_ms: float | None
    partition_failover_ms: Mapping[int, float]
    timed_out: bool
    #: From the restart to the node serving and registered alive again.
    restart_ms: float | None
    #: Whether the topic had every leader and replica in sync before the kill.
    healthy_before: bool
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "round": self.round,
            "victim": self.victim,
            "partition": self.partition,
            "led_partitions": list(self.led),
            "failover_ms": _ms(self.failover_ms),
            "failover_timed_out": self.timed_out,
            "partition_failover_ms": {
                str(p): _ms(ms) for p, ms in sorted(self.partition_failover_ms.items())
            },
            "restart_ms": _ms(self.restart_ms),
            "healthy_before": self.healthy_before,
            "error": self.error,
        }


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


@dataclass(frozen=True, slots=True)
class ChaosReport:
    topic: str
    partitions: int
    replication_factor: int
    run_id: str
    seed: int
    rounds_requested: int
    rounds: tuple[RoundResult, ...]
    verdict: Verdict
    sent: int
    failed_sends: int
    send_errors: Mapping[str, int]
    #: Records in the range read that are not this run's (another writer on the topic).
    foreign: int
    seconds: float
    notes: tuple[str, ...] = field(default=())
    #: Whether the load ran the idempotent producer (then duplicates fail the verdict).
    idempotence: bool = True
    max_in_flight: int = 5

    @property
    def failovers_ms(self) -> list[float]:
        return sorted(r.failover_ms for r in self.rounds if r.failover_ms is not None)

    def failover_percentile(self, pct: float) -> float | None:
        values = self.failovers_ms
        return percentile(values, pct) if values else None

    @property
    def ok(self) -> bool:
        """The verdict passed and every round ran to the end."""
        return self.verdict.ok and all(r.error is None for r in self.rounds)

    def to_json(self) -> dict[str, Any]:
        v = self.verdict
        values = self.failovers_ms
        return {
            "rounds": len(self.rounds),
            "rounds_requested": self.rounds_requested,
            "acked": v.acked,
            "lost": v.lost,
            "duplicated": v.duplicated,
            "duplicate_copies": v.duplicate_copies,
            "duplicates_allowed": v.duplicates_allowed,
            "reordered": v.reordered,
            "misplaced": v.misplaced,
            "failover_ms_p50": _ms(self.failover_percentile(50)),
            "failover_ms_p99": _ms(self.failover_percentile(99)),
            "failover_ms_max": _ms(values[-1] if values else None),
            "failover_timeouts": sum(r.timed_out for r in self.rounds),
            "ok": self.ok,
            "idempotence": self.idempotence,
            "max_in_flight": self.max_in_flight,
            "topic": self.topic,
            "partitions": self.partitions,
            "replication_factor": self.replication_factor,
            "run_id": self.run_id,
            "seed": self.seed,
            "sent": self.sent,
            "failed_sends": self.failed_sends,
            "send_errors": dict(self.send_errors),
            "consumed": v.consumed,
            "foreign": self.foreign,
            "seconds": round(self.seconds, 2),
            "examples": {
                "lost": [list(x) for x in v.lost_examples],
                "duplicated": [list(x) for x in v.duplicated_examples],
                "reordered": [list(x) for x in v.reordered_examples],
                "misplaced": [list(x) for x in v.misplaced_examples],
            },
            "notes": list(self.notes),
            "round_details": [r.to_json() for r in self.rounds],
        }


def fmt_ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f} ms"


def render_report(report: ChaosReport) -> list[Any]:
    """Rich renderables: a table of rounds, then the verdict."""
    from rich.table import Table
    from rich.text import Text

    table = Table(
        title=f"chaos on {report.topic} ({report.partitions} partitions, RF "
        f"{report.replication_factor}), seed {report.seed}",
        title_justify="left",
    )
    for col in ("round", "killed", "led", "failover", "restart", "healthy before", "note"):
        table.add_column(
            col, justify="right" if col in ("round", "failover", "restart") else "left"
        )
    for r in report.rounds:
        failover = "timed out" if r.timed_out else fmt_ms(r.failover_ms)
        note = r.error or ("" if r.led else "victim led no partition")
        table.add_row(
            str(r.round),
            f"node {r.victim}",
            ",".join(map(str, r.led)) or "-",
            failover,
            fmt_ms(r.restart_ms),
            "yes" if r.healthy_before else "no",
            note,
        )
    v = report.verdict
    rate = report.sent / report.seconds if report.seconds > 0 else 0.0
    mode = (
        f"idempotent producer, {report.max_in_flight} in flight per partition: duplicates fail"
        if report.idempotence
        else f"producer without idempotence, {report.max_in_flight} in flight per partition: "
        "duplicates are reported, not failures"
    )
    lines = [
        mode,
        f"sent {report.sent} records ({rate:.0f}/s), acknowledged {v.acked}, failed "
        f"{report.failed_sends}"
        + (f" {dict(report.send_errors)}" if report.send_errors else "")
        + f", read back {v.consumed}",
        f"lost {v.lost}, duplicated {v.duplicated} ({v.duplicate_copies} extra copies), "
        f"reordered {v.reordered}, misplaced {v.misplaced}",
        f"failover p50 {fmt_ms(report.failover_percentile(50))}, p99 "
        f"{fmt_ms(report.failover_percentile(99))} over {len(report.failovers_ms)} round(s); "
        f"timed out {sum(r.timed_out for r in report.rounds)}",
    ]
    for label, examples in (
        ("lost (partition, seq)", v.lost_examples),
        ("reordered (partition, seq, offset)", v.reordered_examples),
        ("misplaced (partition, seq, acked offset)", v.misplaced_examples),
        ("duplicated (partition, seq)", v.duplicated_examples),
    ):
        if examples:
            lines.append(f"e.g. {label}: {', '.join(map(str, examples))}")
    lines += [f"note: {n}" for n in report.notes]
    out: list[Any] = [table, *(Text(line) for line in lines)]
    if report.ok:
        out.append(Text("verdict: PASS", style="bold green"))
    else:
        why = [
            f"{what} {n}"
            for what, n in (
                ("lost", v.lost),
                ("reordered", v.reordered),
                ("misplaced", v.misplaced),
                ("duplicated", 0 if v.duplicates_allowed else v.duplicated),
            )
            if n
        ]
        why += [f"round {r.round}: {r.error}" for r in report.rounds if r.error]
        out.append(Text(f"verdict: FAIL ({'; '.join(why)})", style="bold red"))
    return out
