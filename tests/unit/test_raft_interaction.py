"""Datadriven interaction tests of the Raft core (in the manner of etcd raft's testdata).

Each ``tests/unit/raft_interaction/*.txt`` file is a script of commands, each followed by
``----`` and the golden output, ended by a blank line::

    # comments start with '#'
    campaign 1
    ----
    ok

The runner replays a script against a fresh ``Cluster`` and compares every output.
``TIDELOG_REWRITE=1`` rewrites the goldens instead (review the diff before committing!).

Commands (node ids are integers):

    cluster voters=1,2,3 [learners=4] [pre_vote=false] [check_quorum=false] [key=value...]
    campaign N | tick N [count] | tick-election N | tick-heartbeat N
    propose N data | transfer-leader N TO | read-index N ctx | read-states N
    process-ready [N...]      (all nodes if none given; prints the messages queued)
    deliver-msgs [N...]       (messages to those nodes; prints what was delivered)
    stabilize                 (ready+deliver until quiet; prints every delivered message)
    partition 1 / 2 3 | isolate N | heal | restart N | drop-msgs
    set-log N terms=1,1,2 term=T      (replace N's durable log and restart it)
    compact N INDEX           (snapshot N's state at INDEX, then drop the log up to it)
    status N... | log N... | raft-state
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.unit.raft_interaction.harness import Cluster, fmt_entry, fmt_msg
from tidelog.node.raft.errors import RaftError
from tidelog.node.raft.limits import Config

SCRIPTS_DIR = Path(__file__).parent / "raft_interaction"
SEPARATOR = "----"


class Script:
    """One parsed script: a list of (leading lines, command, expected output lines)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.cases: list[tuple[list[str], str, list[str]]] = []
        lines = path.read_text().splitlines()
        i = 0
        lead: list[str] = []
        while i < len(lines):
            line = lines[i]
            if not line.strip() or line.startswith("#"):
                lead.append(line)
                i += 1
                continue
            command = line
            i += 1
            assert i < len(lines) and lines[i] == SEPARATOR, (
                f"{path}:{i + 1}: expected '{SEPARATOR}' after command {command!r}"
            )
            i += 1
            out: list[str] = []
            while i < len(lines) and lines[i].strip():
                out.append(lines[i])
                i += 1
            self.cases.append((lead, command, out))
            lead = []
        self.trailer = lead

    def render(self, outputs: list[list[str]]) -> str:
        parts: list[str] = []
        for (lead, command, _), out in zip(self.cases, outputs, strict=True):
            parts.extend(lead)
            parts.append(command)
            parts.append(SEPARATOR)
            parts.extend(out)
            parts.append("")
        # Keep trailing comments, drop trailing blank lines.
        trailer = list(self.trailer)
        while trailer and not trailer[-1].strip():
            trailer.pop()
        parts.extend(trailer)
        text = "\n".join(parts)
        while "\n\n\n" in text:
            text = text.replace("\n\n\n", "\n\n")
        return text.rstrip("\n") + "\n"


def _ids(words: list[str]) -> list[int]:
    return [int(w) for w in words if w != "/"]


def _kv(words: list[str]) -> dict[str, str]:
    out = {}
    for w in words:
        k, _, v = w.partition("=")
        out[k] = v
    return out


class Runner:
    def __init__(self) -> None:
        self.cluster: Cluster | None = None
        self.handlers: dict[str, Callable[[list[str]], list[str]]] = {
            "cluster": self.cmd_cluster,
            "campaign": self.cmd_campaign,
            "tick": self.cmd_tick,
            "tick-election": self.cmd_tick_election,
            "tick-heartbeat": self.cmd_tick_heartbeat,
            "propose": self.cmd_propose,
            "transfer-leader": self.cmd_transfer,
            "read-index": self.cmd_read_index,
            "read-states": self.cmd_read_states,
            "process-ready": self.cmd_process_ready,
            "deliver-msgs": self.cmd_deliver,
            "stabilize": self.cmd_stabilize,
            "partition": self.cmd_partition,
            "isolate": self.cmd_isolate,
            "heal": self.cmd_heal,
            "restart": self.cmd_restart,
            "drop-msgs": self.cmd_drop,
            "set-log": self.cmd_set_log,
            "compact": self.cmd_compact,
            "status": self.cmd_status,
            "log": self.cmd_log,
            "raft-state": self.cmd_raft_state,
        }

    @property
    def c(self) -> Cluster:
        assert self.cluster is not None, "the script must start with a 'cluster' command"
        return self.cluster

    def run(self, command: str) -> list[str]:
        words = command.split()
        handler = self.handlers.get(words[0])
        assert handler is not None, f"unknown command {words[0]!r}"
        try:
            out = handler(words[1:])
        except RaftError as exc:
            out = [f"error: {type(exc).__name__}: {exc}"]
        return out or ["ok"]

    # ---- commands -----------------------------------------------------------------------

    def cmd_cluster(self, args: list[str]) -> list[str]:
        kv = _kv(args)
        voters = [int(x) for x in kv.pop("voters").split(",")]
        learners = [int(x) for x in kv.pop("learners").split(",")] if "learners" in kv else []
        fields: dict[str, object] = {}
        for k, v in kv.items():
            fields[k] = v == "true" if v in ("true", "false") else int(v)
        config = Config(**fields)  # type: ignore[arg-type]
        self.cluster = Cluster(voters, learners, config)
        return []

    def cmd_campaign(self, args: list[str]) -> list[str]:
        self.c[int(args[0])].campaign()
        return []

    def cmd_tick(self, args: list[str]) -> list[str]:
        nid = int(args[0])
        self.c.tick(nid, int(args[1]) if len(args) > 1 else 1)
        return []

    def cmd_tick_election(self, args: list[str]) -> list[str]:
        for nid in _ids(args):
            self.c.tick(nid, self.c.config.election_timeout_ticks)
        return []

    def cmd_tick_heartbeat(self, args: list[str]) -> list[str]:
        for nid in _ids(args):
            self.c.tick(nid, self.c.config.heartbeat_interval_ticks)
        return []

    def cmd_propose(self, args: list[str]) -> list[str]:
        index = self.c[int(args[0])].propose(" ".join(args[1:]).encode())
        return [f"index {index}"]

    def cmd_transfer(self, args: list[str]) -> list[str]:
        self.c[int(args[0])].transfer_leadership(int(args[1]))
        return []

    def cmd_read_index(self, args: list[str]) -> list[str]:
        self.c[int(args[0])].read_index(args[1].encode())
        return []

    def cmd_read_states(self, args: list[str]) -> list[str]:
        out = []
        for nid in _ids(args):
            node = self.c.nodes[nid]
            for rs in node.read_states:
                out.append(f"{nid}: read index={rs.index} ctx={rs.context.decode()}")
            node.read_states.clear()
        return out

    def cmd_process_ready(self, args: list[str]) -> list[str]:
        out = []
        for nid in _ids(args) or list(self.c.nodes):
            rd = self.c.process_ready(nid)
            if rd is None:
                continue
            if rd.soft_state is not None:
                ss = rd.soft_state
                out.append(f"{nid}: soft state {ss.role.name} leader={ss.leader_id}")
            if rd.hard_state is not None:
                hs = rd.hard_state
                sync = " sync" if rd.must_sync else ""
                out.append(
                    f"{nid}: hard state term={hs.term} vote={hs.vote} commit={hs.commit}{sync}"
                )
            if rd.entries:
                out.append(f"{nid}: persist " + ", ".join(fmt_entry(e) for e in rd.entries))
            if rd.committed:
                out.append(f"{nid}: apply " + ", ".join(fmt_entry(e) for e in rd.committed))
            if rd.snapshot is not None:
                meta = rd.snapshot.meta
                out.append(f"{nid}: install snapshot {meta.term}/{meta.index}")
            out.extend(fmt_msg(m) for m in rd.messages)
        return out

    def cmd_deliver(self, args: list[str]) -> list[str]:
        targets = _ids(args)
        out = []
        recipients: list[int | None] = list(targets) if targets else [None]
        for to in recipients:
            for m, arrived in self.c.deliver(to):
                out.append(fmt_msg(m) if arrived else f"{fmt_msg(m)} (dropped)")
        return out

    def cmd_stabilize(self, args: list[str]) -> list[str]:
        return self.c.stabilize()

    def cmd_partition(self, args: list[str]) -> list[str]:
        groups: list[list[int]] = [[]]
        for w in args:
            if w == "/":
                groups.append([])
            else:
                groups[-1].append(int(w))
        self.c.partition(*groups)
        return []

    def cmd_isolate(self, args: list[str]) -> list[str]:
        self.c.isolate(int(args[0]))
        return []

    def cmd_heal(self, args: list[str]) -> list[str]:
        self.c.heal()
        return []

    def cmd_restart(self, args: list[str]) -> list[str]:
        for nid in _ids(args):
            self.c.restart(nid)
        return []

    def cmd_drop(self, args: list[str]) -> list[str]:
        out = [f"dropped {fmt_msg(m)}" for m in self.c.outbox]
        self.c.outbox.clear()
        return out

    def cmd_set_log(self, args: list[str]) -> list[str]:
        nid = int(args[0])
        kv = _kv(args[1:])
        terms = [int(t) for t in kv["terms"].split(",")] if kv.get("terms") else []
        self.c.set_log(nid, terms, int(kv["term"]))
        return []

    def cmd_compact(self, args: list[str]) -> list[str]:
        nid, index = int(args[0]), int(args[1])
        storage = self.c.nodes[nid].storage
        storage.create_snapshot(index, f"state@{index}".encode())
        storage.compact(index)
        return [f"{nid}: first index {storage.first_index()}"]

    def cmd_status(self, args: list[str]) -> list[str]:
        out = []
        for nid in _ids(args):
            out.extend(self.c.status(nid))
        return out

    def cmd_log(self, args: list[str]) -> list[str]:
        out = []
        for nid in _ids(args):
            ents = self.c.log_of(nid)
            first = self.c.nodes[nid].storage.first_index()
            body = ", ".join(fmt_entry(e) for e in ents) if ents else "(empty)"
            prefix = f"(from {first}) " if first > 1 else ""
            out.append(f"{nid}: {prefix}{body}")
        return out

    def cmd_raft_state(self, args: list[str]) -> list[str]:
        out = []
        for nid, node in self.c.nodes.items():
            r = node.raft
            out.append(f"{nid}: {r.role.name} term={r.term} leader={r.leader_id}")
        return out


def _scripts() -> list[Path]:
    return sorted(SCRIPTS_DIR.glob("*.txt"))


@pytest.mark.parametrize("path", _scripts(), ids=lambda p: p.stem)
def test_interaction(path: Path) -> None:
    script = Script(path)
    runner = Runner()
    outputs = [runner.run(command) for _, command, _ in script.cases]
    if os.environ.get("TIDELOG_REWRITE") == "1":
        path.write_text(script.render(outputs))
        return
    for (_, command, expected), got in zip(script.cases, outputs, strict=True):
        assert got == expected, (
            f"{path.name}: command {command!r}\n"
            + "expected:\n  "
            + "\n  ".join(expected)
            + "\ngot:\n  "
            + "\n  ".join(got)
            + "\n(rerun with TIDELOG_REWRITE=1 to accept, then review the diff)"
        )


def test_scripts_present() -> None:
    names = {p.stem for p in _scripts()}
    for required in ("prevote_partition", "checkquorum_stepdown", "conflict_truncation"):
        assert required in names
    assert "leadership_transfer" in names
