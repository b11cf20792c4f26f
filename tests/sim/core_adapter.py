"""The one place the simulator names the Raft core's constructor and configuration.

Everything else in the simulator talks to a core through ``Core`` (the accessors and the
tick/step/ready/advance surface), so a change in how a core is built touches this file only,
and the mutation script can swap what it builds.
"""

from __future__ import annotations

import random
from typing import Protocol

from tidelog.node.raft.core import RawNode
from tidelog.node.raft.limits import Config
from tidelog.node.raft.storage import MemoryStorage
from tidelog.node.raft.types import ConfChangeKind, ConfState, Message, Ready, Role

from .options import SimOptions


class Core(Protocol):
    """What the simulator needs from a Raft core."""

    @property
    def id(self) -> int: ...
    @property
    def term(self) -> int: ...
    @property
    def role(self) -> Role: ...
    @property
    def leader_id(self) -> int: ...
    @property
    def commit_index(self) -> int: ...

    def tick(self) -> None: ...
    def step(self, m: Message) -> None: ...
    def has_ready(self) -> bool: ...
    def ready(self) -> Ready: ...
    def advance(self, rd: Ready) -> None: ...
    def propose(self, data: bytes) -> int: ...
    def transfer_leadership(self, to: int) -> None: ...
    def read_index(self, context: bytes) -> None: ...
    def report_unreachable(self, to: int) -> None: ...
    def report_snapshot(self, to: int, ok: bool) -> None: ...


def log_term(core: Core, index: int) -> int | None:
    """The term of the entry at ``index`` in the core's whole log (persisted or not), None
    if it has no such entry (or compacted it)."""
    assert isinstance(core, RawNode)
    return core.term_at(index)


def log_first_index(core: Core) -> int:
    """The first index the core's log still holds (its compaction point + 1)."""
    assert isinstance(core, RawNode)
    return core.first_index()


def conf_of(core: Core) -> tuple[int, ConfState]:
    """The configuration the core believes in and the index it is in force from."""
    assert isinstance(core, RawNode)
    return core.conf_index, core.conf_state


def propose_conf_change(core: Core, kind: ConfChangeKind, node_id: int) -> int:
    """A membership change on the leader (raises like ``RawNode.propose_conf_change``)."""
    assert isinstance(core, RawNode)
    return core.propose_conf_change(kind, node_id)


def config_for(opts: SimOptions) -> Config:
    return Config(
        election_timeout_ticks=opts.election_ticks,
        election_timeout_span_ticks=opts.election_span_ticks,
        always_append_empty=opts.always_append_empty,
        lazy_commit=opts.lazy_commit,
        heartbeat_interval_ticks=opts.heartbeat_ticks,
        max_msg_bytes=opts.max_msg_bytes,
        max_inflight_msgs=opts.max_inflight_msgs,
        max_inflight_bytes=opts.max_inflight_bytes,
        max_uncommitted_bytes=opts.max_uncommitted_bytes,
        max_committed_bytes_per_ready=opts.max_committed_bytes_per_ready,
        pre_vote=opts.pre_vote,
        check_quorum=opts.check_quorum,
    )


def make_core(
    node_id: int, storage: MemoryStorage, opts: SimOptions, rng: random.Random, applied: int
) -> Core:
    """A core restarted from ``storage`` whose state machine has applied up to ``applied``."""
    return RawNode(node_id, storage, rng, config_for(opts), applied)
