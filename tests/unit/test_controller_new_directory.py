"""Which partition groups a node's new data directory may bootstrap (issue 8: a majority of
replicas wiped). The node passes ``bootstrap`` to ``MultiRaft.add_group`` from
``Controller.group_newer_than_directory``: a group whose creation this node applied after its
own directory's registration is no older than the directory (its new replicas may elect
their first leader among themselves); a group created before is older, and a replica of it on
this directory must not help elect anyone until a leader reached it (the node simulation's
``wipe-majority`` profile: two wiped replicas elected an empty log and erased the survivor's).
"""

from __future__ import annotations

from tidelog.controller.commands import (
    AddPartitions,
    Command,
    CreateTopic,
    MarkNodeDead,
    RegisterNode,
)
from tidelog.controller.state import group_id_for
from tidelog.node.controller_node import Controller, command_batch
from tidelog.node.multiraft import MultiRaft
from tidelog.node.raft.types import Entry


def _controller(node_id: int, directory_id: str) -> Controller:
    driver: MultiRaft = object()  # type: ignore[assignment]  # never reached: no group opened
    return Controller(node_id, {1: "n1:1"}, driver, "c", directory_id=directory_id)


def _apply(ctl: Controller, commands: list[Command]) -> None:
    start = ctl.state.applied_index
    entries = tuple(Entry(1, start + i, command_batch(c)) for i, c in enumerate(commands, 1))
    ctl.apply(entries)


def _register(node_id: int, directory_id: str) -> RegisterNode:
    return RegisterNode(node_id, f"n{node_id}:9092", directory_id=directory_id)


def test_groups_created_after_the_directory_registered_may_be_bootstrapped() -> None:
    ctl = _controller(2, "dir-a")
    _apply(ctl, [_register(1, "x"), _register(2, "dir-a"), _register(3, "y")])
    assert ctl.registered.is_set()
    _apply(ctl, [CreateTopic("t", 2, 3, {}, [(1, 2, 3), (2, 3, 1)])])  # index 4
    _apply(ctl, [AddPartitions("t", [(3, 1, 2)])])  # index 5
    for p in range(3):
        assert ctl.group_newer_than_directory(group_id_for(4, p))


def test_groups_created_before_a_new_directory_registered_are_older() -> None:
    """Node 2 restarts on a wiped disk (directory dir-b): it replays the log from the leader,
    and everything created before its new directory's registration is older than it; what is
    created after is not."""
    ctl = _controller(2, "dir-b")
    _apply(ctl, [_register(1, "x"), _register(2, "dir-a"), _register(3, "y")])
    assert not ctl.registered.is_set()  # the old directory's registration, not this one's
    _apply(ctl, [CreateTopic("t", 1, 3, {}, [(1, 2, 3)])])  # index 4
    _apply(ctl, [AddPartitions("t", [(3, 1, 2)])])  # index 5
    assert not ctl.group_newer_than_directory(group_id_for(4, 0))
    assert not ctl.group_newer_than_directory(group_id_for(4, 1))
    # The new directory registers (once the old one is marked dead; here the state accepts
    # it as the same address): groups created from now on are newer.
    _apply(ctl, [MarkNodeDead(2), _register(2, "dir-b")])  # 6, 7
    assert ctl.registered.is_set()
    _apply(ctl, [CreateTopic("u", 1, 3, {}, [(2, 1, 3)])])  # index 8
    assert ctl.group_newer_than_directory(group_id_for(8, 0))
    assert not ctl.group_newer_than_directory(group_id_for(4, 0))


def test_a_refused_creation_marks_nothing() -> None:
    ctl = _controller(2, "dir-a")
    _apply(ctl, [_register(2, "dir-a")])
    _apply(ctl, [CreateTopic("t", 1, 1, {}, [(9,)])])  # node 9 is not registered: refused
    assert "t" not in ctl.state.topics
    assert not ctl.group_newer_than_directory(group_id_for(2, 0))
