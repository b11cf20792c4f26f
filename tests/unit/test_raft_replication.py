"""Log replication: batching, flow control, pipelining, conflicts, commit rules, losses."""

from __future__ import annotations

import pytest

from tests.unit.raft_interaction.harness import Cluster
from tidelog.node.raft.errors import NotRaftLeader, ProposalDropped
from tidelog.node.raft.limits import Config
from tidelog.node.raft.progress import ProgressState
from tidelog.node.raft.types import ENTRY_OVERHEAD_BYTES, Message, MessageKind, Role

K = MessageKind
PAYLOAD = b"p" * 84  # 100 bytes per entry with the overhead
ENTRY_BYTES = len(PAYLOAD) + ENTRY_OVERHEAD_BYTES


def appends_to(msgs: tuple[Message, ...] | list[Message], to: int) -> list[Message]:
    return [m for m in msgs if m.kind == K.APPEND and m.to == to]


def test_proposals_between_readys_share_one_message() -> None:
    c = Cluster([1, 2, 3])
    c.elect(1)
    for _ in range(10):
        c[1].propose(PAYLOAD)
    rd = c[1].ready()
    for to in (2, 3):
        (m,) = appends_to(rd.messages, to)
        assert len(m.entries) == 10


def test_batches_are_bounded_by_max_msg_bytes_and_pipelined() -> None:
    cfg = Config(max_msg_bytes=3 * ENTRY_BYTES, max_inflight_bytes=1 << 20)
    c = Cluster([1, 2, 3], config=cfg)
    c.elect(1)
    for _ in range(10):
        c[1].propose(PAYLOAD)
    rd = c[1].ready()
    ms = appends_to(rd.messages, 2)
    # 10 entries in messages of at most 3, all sent at once without waiting (replicate state).
    assert [len(m.entries) for m in ms] == [3, 3, 3, 1]
    assert [m.index for m in ms] == [1, 4, 7, 10]
    assert c[1].progress(2).next == 12  # type: ignore[union-attr]


def test_one_oversized_entry_still_goes_alone() -> None:
    c = Cluster([1, 2], config=Config(max_msg_bytes=10))
    c.elect(1)
    c[1].propose(b"x" * 1000)
    c[1].propose(b"y")
    ms = appends_to(c[1].ready().messages, 2)
    assert [len(m.entries) for m in ms] == [1, 1]


@pytest.mark.parametrize(
    ("max_msgs", "max_bytes", "expected_msgs"),
    [
        (2, 1 << 20, 2),  # bounded by count
        (100, 2 * ENTRY_BYTES, 2),  # bounded by bytes
        (100, 5 * ENTRY_BYTES, 5),
    ],
)
def test_inflight_window_bounds_unacknowledged_messages(
    max_msgs: int, max_bytes: int, expected_msgs: int
) -> None:
    cfg = Config(
        max_msg_bytes=ENTRY_BYTES,
        max_inflight_msgs=max_msgs,
        max_inflight_bytes=max_bytes,
    )
    c = Cluster([1, 2, 3], config=cfg)
    c.elect(1)
    c.partition([1, 3], [2])  # 2 never answers
    for _ in range(20):
        c[1].propose(PAYLOAD)
    c.stabilize()
    pr = c[1].progress(2)
    assert pr is not None and pr.state == ProgressState.REPLICATE and pr.is_paused()
    assert pr.inflights.count == expected_msgs
    # A heartbeat answer proves 2 alive and frees one slot; an ack frees more.
    c.heal()
    # The first periodic round skips 2 (an APPEND went to it since the last round).
    c.tick(1, 2 * cfg.heartbeat_interval_ticks)
    c.stabilize()
    assert c[2].log.last_index() == 21 and c[1].commit_index == 21


def test_probe_state_sends_one_message_until_answered() -> None:
    c = Cluster([1, 2, 3])
    c.elect(1)
    c.isolate(2)
    c[1].report_unreachable(2)
    pr = c[1].progress(2)
    assert pr is not None and pr.state == ProgressState.PROBE
    for _ in range(5):
        c[1].propose(b"x")
        c.stabilize()
    assert pr.probe_sent
    assert c[2].log.last_index() == 1


def test_lost_appends_are_recovered_through_heartbeats() -> None:
    c = Cluster([1, 2, 3])
    c.elect(1)
    c.isolate(3)
    for i in range(5):
        c[1].propose(b"%d" % i)
        c.stabilize()
    c.heal()
    # Nothing new is proposed: a heartbeat answer makes the leader resend what was lost
    # (the first periodic round skips 3, which was sent APPENDs since the last one).
    c.tick(1, 2 * c.config.heartbeat_interval_ticks)
    c.stabilize()
    assert [e.data for e in c.log_of(3)] == [e.data for e in c.log_of(1)]
    assert c[3].commit_index == 6


def test_stale_rejections_after_a_reset_leave_the_progress_alone() -> None:
    """Pipelined APPENDs that reach a follower out of order are rejected, and the answers are
    reordered too. The first rejection to arrive resets the progress (probe); once the probe
    is acknowledged, the rejections still in flight answer APPENDs sent before the reset and
    say nothing about the follower's log now. Acting on them reset the progress again and
    again (the sim's seed 7928: a follower never caught up)."""
    c = Cluster([1, 2, 3], config=Config(max_msg_bytes=ENTRY_BYTES))
    c.elect(1)
    for _ in range(4):
        c[1].propose(PAYLOAD)
    c.process_ready(1)
    sent = appends_to(c.outbox, 2)
    c.outbox = [m for m in c.outbox if m.to != 2]
    assert [m.index for m in sent] == [1, 2, 3, 4]  # one entry each, 2..5
    # They reach 2 in reverse order: only the APPEND after 1 fits its log.
    for m in reversed(sent):
        c[2].step(m)
    c.process_ready(2)
    answers = [m for m in c.outbox if m.frm == 2]
    c.outbox = [m for m in c.outbox if m.frm != 2]
    rej = {m.index: m for m in answers if m.reject}
    (ack,) = [m for m in answers if not m.reject]
    assert sorted(rej) == [2, 3, 4] and {m.reject_hint for m in rej.values()} == {1}
    assert ack.index == 2
    pr = c[1].progress(2)
    assert pr is not None and (pr.state, pr.match) == (ProgressState.REPLICATE, 1)
    # The answers arrive in yet another order. The first rejection resets the progress to
    # probe from 2; the next one answers an APPEND sent before that reset.
    c[1].step(rej[3])
    assert (pr.state, pr.match, pr.next) == (ProgressState.PROBE, 1, 2)
    c[1].step(rej[4])
    assert (pr.state, pr.match, pr.next) == (ProgressState.PROBE, 1, 2)
    c.process_ready(1)
    (probe,) = appends_to(c.outbox, 2)
    assert probe.index == 1
    c.outbox.remove(probe)  # lost: 2 has entry 2 already
    c[1].step(ack)
    assert (pr.state, pr.match) == (ProgressState.REPLICATE, 2)
    # Overtaken by the acknowledgement of 2: the rejection of the APPEND after 2, hinting
    # below match. Not a sign that 2 lost entries: it left before 2 acknowledged them.
    c[1].step(rej[2])
    assert (pr.state, pr.match) == (ProgressState.REPLICATE, 2)
    rd = c[1].ready()
    assert [m.index for m in appends_to(rd.messages, 2)] == [2, 3, 4]
    c.outbox.extend(rd.messages)
    c[1].advance(rd)
    c.stabilize()
    assert [e.data for e in c.log_of(2)] == [e.data for e in c.log_of(1)]
    assert (pr.state, pr.match) == (ProgressState.REPLICATE, c[1].log.last_index())


def test_only_current_term_entries_commit_by_counting() -> None:
    """Raft §5.4.2 / figure 8: an entry from an older term on a majority is not committed
    by counting; it commits once an entry of the leader's own term does."""
    c = Cluster([1, 2, 3], config=Config(pre_vote=False))
    c.set_log(1, [1, 2], term=2)
    c.set_log(2, [1, 2], term=2)
    c.set_log(3, [1], term=2)
    c[1].campaign()
    c.stabilize()
    assert c[1].role == Role.LEADER and c[1].term == 3
    assert c[1].commit_index == 3  # the EMPTY entry of term 3 committed, and 1..2 with it

    # Again, with the EMPTY entry held back: all three ack index 2 (term 2) only.
    c3 = Cluster([1, 2, 3], config=Config(pre_vote=False))
    c3.set_log(1, [1, 2], term=2)
    c3.set_log(2, [1, 2], term=2)
    c3.set_log(3, [1, 2], term=2)
    c3[1].campaign()
    for _ in range(2):  # votes out, votes back
        c3.round()
    assert c3[1].role == Role.LEADER
    c3.process_ready(1)
    c3.outbox.clear()  # the appends carrying 3/3 EMPTY are lost
    leader = c3[1]
    for follower in (2, 3):
        leader.step(Message(K.APPEND_RESP, follower, 1, 3, index=2))
    assert leader.commit_index == 0  # index 2 is on all three, but it is from term 2
    leader.step(Message(K.APPEND_RESP, 2, 1, 3, index=3))
    assert leader.commit_index == 3


def test_follower_answers_below_commit_with_its_commit() -> None:
    c = Cluster([1, 2, 3])
    c.elect(1)
    c[1].propose(b"a")
    c.stabilize()
    c[2].step(Message(K.APPEND, 1, 2, 1, log_term=1, index=1, entries=()))
    (m,) = c[2].ready().messages
    assert (m.kind, m.index, m.reject) == (K.APPEND_RESP, 2, False)


def test_proposals_refused_off_leader_and_when_too_much_is_uncommitted() -> None:
    cfg = Config(max_msg_bytes=ENTRY_BYTES, max_uncommitted_bytes=3 * ENTRY_BYTES)
    c = Cluster([1, 2, 3], config=cfg)
    c.elect(1)
    with pytest.raises(NotRaftLeader) as exc:
        c[2].propose(b"x")
    assert exc.value.leader_id == 1
    c.partition([1], [2, 3])
    for _ in range(3):
        c[1].propose(PAYLOAD)
    with pytest.raises(ProposalDropped, match="uncommitted"):
        c[1].propose(PAYLOAD)
    c.heal()
    c.tick(1, cfg.heartbeat_interval_ticks)
    c.stabilize()
    assert c[1].commit_index == 4
    c[1].propose(PAYLOAD)  # room again once committed


def test_follower_commit_never_exceeds_what_it_holds() -> None:
    c = Cluster([1, 2, 3])
    c.elect(1)
    c.isolate(3)
    for _ in range(3):
        c[1].propose(b"x")
    c.stabilize()
    c.heal()
    c[3].step(Message(K.HEARTBEAT, 1, 3, 1, commit=min(c[1].progress(3).match, 4)))  # type: ignore[union-attr]
    assert c[3].commit_index <= c[3].log.last_index()


def steady_state(rounds: int, proposals_per_round: int, ticks_per_round: float) -> float:
    """Messages delivered per committed entry with a 3-node group under continuous load:
    each round the leader proposes, every node processes its Ready once and every queued
    message is delivered once (so acks and new entries overlap, as in a real pipeline)."""
    c = Cluster([1, 2, 3])
    c.elect(1)
    start_delivered, start_commit = c.delivered, c[1].commit_index
    tick_debt = 0.0
    for _ in range(rounds):
        for _ in range(proposals_per_round):
            c[1].propose(b"record-batch")
        tick_debt += ticks_per_round
        while tick_debt >= 1:
            tick_debt -= 1
            for nid in (1, 2, 3):
                c.tick(nid)
        c.round()
    c.stabilize()
    committed = c[1].commit_index - start_commit
    assert committed == rounds * proposals_per_round
    return (c.delivered - start_delivered) / committed


def test_messages_per_committed_entry() -> None:
    one_at_a_time = Cluster([1, 2, 3])
    one_at_a_time.elect(1)
    before = one_at_a_time.delivered
    for _ in range(100):
        one_at_a_time[1].propose(b"x")
        one_at_a_time.stabilize()
    sequential = (one_at_a_time.delivered - before) / 100
    pipelined = steady_state(rounds=1000, proposals_per_round=1, ticks_per_round=0.1)
    batched = steady_state(rounds=1000, proposals_per_round=10, ticks_per_round=0.1)
    print(
        f"\nmessages per committed entry, 3 nodes: sequential {sequential:.2f}, "
        f"pipelined {pipelined:.2f}, 10 proposals per Ready {batched:.2f}"
    )
    # APPEND + APPEND_RESP per follower, plus an empty APPEND/RESP carrying the commit.
    assert sequential == 8
    # Under continuous load the commit rides on the next APPEND (2 messages per follower) and
    # busy followers get no periodic heartbeats.
    assert pipelined <= 4.1
    assert batched <= 0.41


def test_propose_all_appends_every_entry_or_none() -> None:
    """One produce request is one all-or-nothing proposal: refused whole when the uncommitted
    budget cannot take all of it, so nothing of it is half stored."""
    cfg = Config(max_uncommitted_bytes=4 * ENTRY_BYTES, max_msg_bytes=ENTRY_BYTES)
    c = Cluster([1, 2, 3], config=cfg)
    c.elect(1)
    c.isolate(1)  # nothing commits: the budget fills
    first = c[1].log.last_index() + 1
    assert c[1].propose_all([PAYLOAD, PAYLOAD]) == first + 1
    last = c[1].log.last_index()
    with pytest.raises(ProposalDropped):
        c[1].propose_all([PAYLOAD, PAYLOAD, PAYLOAD])  # 2 would fit, 3 do not
    assert c[1].log.last_index() == last
    assert c[1].propose_all([PAYLOAD, PAYLOAD]) == last + 2
    with pytest.raises(NotRaftLeader):
        c[2].propose_all([PAYLOAD])


# ---- lazy commits (Config.lazy_commit, the node's partitions) --------------------------------


def test_lazy_commit_halves_the_messages_of_a_write_one_at_a_time() -> None:
    """A commit with nothing else to send waits for the next APPEND: one write at a time
    costs APPEND + APPEND_RESP per follower, not twice that (the eager count is above)."""
    c = Cluster([1, 2, 3], config=Config(lazy_commit=True))
    c.elect(1)
    before = c.delivered
    for i in range(100):
        c[1].propose(b"x")
        c.stabilize()
        # The leader committed it at once (its writer is answered), the followers hold it.
        assert c[1].commit_index == c[1].log.last_index()
        assert c[2].log.last_index() == c[1].log.last_index()
        if i:  # each APPEND told the followers the commit of the write before
            assert c[2].commit_index == c[3].commit_index == c[1].commit_index - 1
    assert (c.delivered - before) / 100 == 4


def test_lazy_commit_reaches_idle_followers_with_the_next_heartbeat() -> None:
    c = Cluster([1, 2, 3], config=Config(lazy_commit=True, heartbeat_interval_ticks=1))
    c.elect(1)
    c[1].propose(b"x")
    c.stabilize()
    last = c[1].log.last_index()
    assert c[1].commit_index == last and c[2].commit_index == c[3].commit_index == last - 1
    # The followers got an APPEND since the last heartbeat round, but not this commit: the
    # round does not skip them.
    c.tick(1)
    c.process_ready(1)
    heartbeats = [m for m in c.outbox if m.kind == K.HEARTBEAT]
    assert sorted(m.to for m in heartbeats) == [2, 3]
    assert all(m.commit == last for m in heartbeats)
    c.stabilize()
    assert c[2].commit_index == c[3].commit_index == last
    assert [e.index for e in c.nodes[2].applied][-1] == last
    # Later heartbeat rounds carry the same commit.
    c.tick(1)
    c.process_ready(1)
    assert all(m.commit == last for m in c.outbox if m.kind == K.HEARTBEAT)


def test_eager_commit_still_sends_a_commit_only_append() -> None:
    c = Cluster([1, 2, 3])
    c.elect(1)
    c[1].propose(b"x")
    c.stabilize()
    assert c[2].commit_index == c[3].commit_index == c[1].commit_index
