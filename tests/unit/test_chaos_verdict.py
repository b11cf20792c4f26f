"""The chaos checker (a pure function of what was acknowledged and what was read back), the
victim choice, the failover tracker and the report."""

from __future__ import annotations

import dataclasses
import io
import random

import pytest
from rich.console import Console

from tidelog.ops.chaos_load import Failover
from tidelog.ops.chaos_report import ChaosReport, RoundResult, render_report
from tidelog.ops.chaos_verdict import (
    Acked,
    Consumed,
    Verdict,
    choose_victim,
    decode_value,
    encode_value,
    verdict,
)


def log_of(partition: int, seqs: list[int], first_offset: int = 0) -> list[Consumed]:
    return [Consumed(partition, first_offset + i, s) for i, s in enumerate(seqs)]


def acks_of(partition: int, seqs: list[int], first_offset: int = 0) -> list[Acked]:
    return [Acked(partition, s, first_offset + i) for i, s in enumerate(seqs)]


def test_everything_acknowledged_is_read_back_in_order() -> None:
    acked = acks_of(0, list(range(10))) + acks_of(1, list(range(5)), first_offset=100)
    consumed = log_of(0, list(range(10))) + log_of(1, list(range(5)), first_offset=100)
    v = verdict(acked, consumed)
    assert v == Verdict(
        acked=15, consumed=15, lost=0, duplicated=0, duplicate_copies=0, reordered=0, misplaced=0
    )
    assert v.ok


def test_a_missing_acknowledged_record_is_lost() -> None:
    acked = acks_of(0, [0, 1, 2, 3])
    consumed = [c for c in log_of(0, [0, 1, 2, 3]) if c.seq != 2]
    v = verdict(acked, consumed)
    assert (v.lost, v.lost_examples) == (1, ((0, 2),))
    assert not v.ok


def test_the_same_seq_in_another_partition_does_not_hide_a_loss() -> None:
    v = verdict(acks_of(0, [0, 1]), log_of(0, [0]) + log_of(1, [1]))
    assert v.lost == 1
    assert v.lost_examples == ((0, 1),)


def test_unacknowledged_records_in_the_log_are_fine() -> None:
    # seq 2 failed (its ack was lost) yet was committed: not a violation.
    v = verdict(acks_of(0, [0, 1]), log_of(0, [0, 1, 2]))
    assert v.ok
    assert (v.acked, v.consumed, v.lost) == (2, 3, 0)


def test_duplicates_are_counted_and_fail_with_the_idempotent_producer() -> None:
    # A retried batch: seqs 2,3 committed twice; the ack names the second copy.
    consumed = log_of(0, [0, 1, 2, 3, 2, 3, 4])
    acked = [Acked(0, 0, 0), Acked(0, 1, 1), Acked(0, 2, 4), Acked(0, 3, 5), Acked(0, 4, 6)]
    v = verdict(acked, consumed)
    assert (v.duplicated, v.duplicate_copies, v.reordered, v.misplaced) == (2, 2, 0, 0)
    assert v.duplicated_examples == ((0, 2), (0, 3))
    assert not v.duplicates_allowed
    assert not v.ok


def test_duplicates_are_counted_but_do_not_fail_without_idempotence() -> None:
    consumed = log_of(0, [0, 1, 2, 3, 2, 3, 4])
    acked = [Acked(0, 0, 0), Acked(0, 1, 1), Acked(0, 2, 4), Acked(0, 3, 5), Acked(0, 4, 6)]
    v = verdict(acked, consumed, duplicates_allowed=True)
    assert (v.duplicated, v.duplicate_copies, v.reordered, v.misplaced) == (2, 2, 0, 0)
    assert v.duplicated_examples == ((0, 2), (0, 3))
    assert v.ok
    # Duplicates allowed do not hide anything else.
    assert not verdict(acks_of(0, [0, 1]), log_of(0, [0]), duplicates_allowed=True).ok


def test_a_seq_read_three_times_counts_once_with_two_extra_copies() -> None:
    v = verdict([], log_of(0, [0, 0, 0, 1]))
    assert (v.duplicated, v.duplicate_copies) == (1, 2)


def test_reordering_counts_first_occurrences_out_of_sequence() -> None:
    v = verdict(acks_of(0, [0, 1, 2, 3, 4]), log_of(0, [0, 1, 3, 2, 4]))
    assert v.reordered == 1
    assert v.reordered_examples == ((0, 2, 3),)
    assert not v.ok


def test_one_record_jumping_ahead_counts_as_one_reordering() -> None:
    seqs = [0, 1, 50, *range(2, 50), 51]
    v = verdict([], log_of(0, seqs))
    assert v.reordered == 1  # the fewest records to move, not every record after the jump


def test_a_late_duplicate_is_not_a_reordering() -> None:
    v = verdict([], log_of(0, [0, 1, 2, 1, 3]))
    assert (v.reordered, v.duplicated) == (0, 1)


def test_gaps_in_seqs_are_not_reorderings() -> None:
    v = verdict([], log_of(0, [0, 3, 7, 8]))
    assert v.reordered == 0


def test_reordering_is_per_partition() -> None:
    v = verdict([], log_of(0, [5, 6]) + log_of(1, [0, 1]))
    assert v.reordered == 0


def test_an_overwritten_acknowledged_offset_is_misplaced() -> None:
    # Seq 1 was acknowledged at offset 1, but offset 1 now holds seq 2; seq 1 survives only
    # as a copy written later (a retry), so the acknowledged write itself was lost.
    consumed = log_of(0, [0, 2, 1])
    v = verdict([Acked(0, 0, 0), Acked(0, 1, 1)], consumed)
    assert (v.lost, v.misplaced) == (0, 1)
    assert v.misplaced_examples == ((0, 1, 1),)
    assert not v.ok


def test_consumed_order_in_the_input_does_not_matter() -> None:
    consumed = log_of(0, list(range(50))) + log_of(1, list(range(50)))
    random.Random(7).shuffle(consumed)
    v = verdict(acks_of(0, list(range(50))), consumed)
    assert v.ok
    assert v.reordered == 0


def test_examples_are_bounded() -> None:
    v = verdict(acks_of(0, list(range(1000))), [])
    assert v.lost == 1000
    assert len(v.lost_examples) == 10


def test_value_round_trip_and_foreign_values() -> None:
    assert decode_value(encode_value("ab12", 3, 99)) == ("ab12", 3, 99)
    for junk in (None, b"", b"hello", b"tidelog-chaos x 1", b"tidelog-chaos x y z", b"other a 1 2"):
        assert decode_value(junk) is None


def test_victim_is_the_leader_of_a_random_partition() -> None:
    leaders = {0: 1, 1: 2, 2: 3, 3: -1}
    seen = set()
    rng = random.Random(1)
    for _ in range(50):
        victim, partition = choose_victim(rng, leaders, [1, 2, 3])
        assert partition is not None
        assert leaders[partition] == victim
        seen.add(victim)
    assert seen == {1, 2, 3}


def test_victim_skips_leaders_that_are_not_running() -> None:
    victim, partition = choose_victim(random.Random(3), {0: 1, 1: 2}, [2, 3])
    assert (victim, partition) == (2, 1)


def test_victim_is_a_random_node_when_no_partition_has_a_leader() -> None:
    victim, partition = choose_victim(random.Random(5), {0: -1}, [4, 5])
    assert partition is None
    assert victim in (4, 5)
    with pytest.raises(ValueError):
        choose_victim(random.Random(5), {}, [])


def test_victim_choice_is_reproducible_from_the_seed() -> None:
    leaders = {p: 1 + p % 3 for p in range(12)}
    a = [choose_victim(random.Random(42), leaders, [1, 2, 3]) for _ in range(3)]
    b = [choose_victim(random.Random(42), leaders, [1, 2, 3]) for _ in range(3)]
    assert a == b


async def test_failover_ends_when_every_led_partition_acks_a_record_sent_after_the_kill() -> None:
    f = Failover()
    f.arm([1, 4], kill_s=100.0)
    f.on_ack(1, sent_s=99.0, acked_s=100.5)  # sent before the kill: does not count
    f.on_ack(2, sent_s=100.1, acked_s=100.2)  # not the victim's partition
    assert not f.done.is_set()
    f.on_ack(1, sent_s=100.0, acked_s=101.2)
    f.on_ack(1, sent_s=100.3, acked_s=101.9)  # only the first counts
    assert not f.done.is_set()
    f.on_ack(4, sent_s=100.7, acked_s=101.5)
    assert f.done.is_set()
    assert f.recovered_ms == pytest.approx({1: 1200.0, 4: 1500.0})
    f.disarm()
    f.on_ack(4, sent_s=200.0, acked_s=201.0)
    assert f.recovered_ms == pytest.approx({1: 1200.0, 4: 1500.0})


async def test_failover_with_nothing_led_is_done_at_once() -> None:
    f = Failover()
    f.arm([], kill_s=1.0)
    assert f.done.is_set()


def _report(v: Verdict, failovers: list[float | None], *, idempotence: bool = True) -> ChaosReport:
    rounds = tuple(
        RoundResult(
            round=i + 1,
            victim=1 + i % 3,
            partition=i % 6 if ms is not None else None,
            led=(i % 6,) if ms is not None else (),
            failover_ms=ms,
            partition_failover_ms={i % 6: ms} if ms is not None else {},
            timed_out=False,
            restart_ms=2500.0,
            healthy_before=True,
        )
        for i, ms in enumerate(failovers)
    )
    return ChaosReport(
        topic="chaos",
        partitions=6,
        replication_factor=3,
        run_id="abcd",
        seed=9,
        rounds_requested=len(failovers),
        rounds=rounds,
        verdict=v,
        sent=1000,
        failed_sends=0,
        send_errors={},
        foreign=0,
        seconds=10.0,
        idempotence=idempotence,
        max_in_flight=5 if idempotence else 1,
    )


def test_report_json_has_the_documented_keys_and_percentiles() -> None:
    v = verdict(acks_of(0, [0, 1, 2]), log_of(0, [0, 1, 2, 2]), duplicates_allowed=True)
    report = _report(v, [900.0, 1100.0, None, 1300.0], idempotence=False)
    out = report.to_json()
    for key in (
        "rounds",
        "acked",
        "lost",
        "duplicated",
        "reordered",
        "failover_ms_p50",
        "failover_ms_p99",
        "round_details",
    ):
        assert key in out
    assert (out["rounds"], out["acked"], out["lost"], out["duplicated"]) == (4, 3, 0, 1)
    assert out["failover_ms_p50"] == 1100.0
    assert out["failover_ms_p99"] == 1300.0
    assert out["ok"] is True
    assert (out["idempotence"], out["max_in_flight"], out["duplicates_allowed"]) == (False, 1, True)
    assert out["round_details"][2]["failover_ms"] is None
    assert out["round_details"][0]["partition_failover_ms"] == {"0": 900.0}


def test_report_without_failovers_has_null_percentiles() -> None:
    out = _report(verdict([], []), [None]).to_json()
    assert out["failover_ms_p50"] is None and out["failover_ms_p99"] is None


def _text(report: ChaosReport) -> str:
    console = Console(file=io.StringIO(), width=160, color_system=None)
    for r in render_report(report):
        console.print(r)
    out = console.file.getvalue()  # type: ignore[attr-defined]
    assert isinstance(out, str)
    return out


def test_rendered_report_says_pass_or_fail_and_why() -> None:
    ok = _text(_report(verdict(acks_of(0, [0]), log_of(0, [0])), [1000.0]))
    assert "verdict: PASS" in ok and "1000 ms" in ok
    bad = _text(_report(verdict(acks_of(0, [0, 1]), log_of(0, [0])), [1000.0]))
    assert "verdict: FAIL (lost 1)" in bad
    assert "(0, 1)" in bad


def test_a_round_error_fails_the_report() -> None:
    report = _report(verdict([], []), [1000.0])
    broken = RoundResult(2, 2, None, (), None, {}, False, None, True, error="node 2 exited")
    report = dataclasses.replace(report, rounds=(*report.rounds, broken))
    assert not report.ok
    assert "round 2: node 2 exited" in _text(report)


def test_a_duplicate_fails_the_idempotent_report_and_says_so() -> None:
    dup = verdict(acks_of(0, [0, 1]), log_of(0, [0, 1, 1]))
    report = _report(dup, [1000.0])
    assert not report.ok and report.to_json()["ok"] is False
    text = _text(report)
    assert "verdict: FAIL (duplicated 1)" in text
    assert "idempotent producer, 5 in flight per partition: duplicates fail" in text
    old = _report(verdict(acks_of(0, [0, 1]), log_of(0, [0, 1, 1]), duplicates_allowed=True),
                  [1000.0], idempotence=False)  # fmt: skip
    assert old.ok
    text = _text(old)
    assert "verdict: PASS" in text
    assert "without idempotence, 1 in flight per partition: duplicates are reported" in text
