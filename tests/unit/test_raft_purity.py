"""The Raft core stays pure: no clock, randomness, threads, OS or file access inside it."""

from __future__ import annotations

import ast
from pathlib import Path

import tidelog.node.raft as raft_pkg

FORBIDDEN_MODULES = {"asyncio", "time", "random", "os", "threading", "io", "socket", "pathlib"}
FORBIDDEN_CALLS = {"open", "print", "input"}


def offenders(source: str, name: str) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source, filename=name)):
        modules: list[str] = []
        line = getattr(node, "lineno", 0)
        if isinstance(node, ast.Import):
            modules = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules = [node.module]
        for module in modules:
            if module.split(".")[0] in FORBIDDEN_MODULES:
                found.append(f"{name}:{line} imports {module}")
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in FORBIDDEN_CALLS
        ):
            found.append(f"{name}:{line} calls {node.func.id}()")
    return found


def test_raft_package_is_pure() -> None:
    root = Path(raft_pkg.__file__).parent
    files = sorted(root.glob("*.py"))
    assert {p.name for p in files} >= {"core.py", "types.py", "storage.py", "quorum.py"}
    bad = [o for p in files for o in offenders(p.read_text(), p.name)]
    assert not bad, "the Raft core must stay pure:\n" + "\n".join(bad)


def test_scan_catches_each_kind_of_offence() -> None:
    src = "import time\nfrom asyncio import sleep\nimport os.path\nopen('x')\nfrom . import os\n"
    assert offenders(src, "x.py") == [
        "x.py:1 imports time",
        "x.py:2 imports asyncio",
        "x.py:3 imports os.path",
        "x.py:4 calls open()",
    ]


# ---- the driver does not reach into the core --------------------------------------------
#
# Outside node/raft/ nothing reads a RawNode's ``log`` (its RaftLog) or the unstable tail:
# the driver, the state machines and the simulator use RawNode's public accessors
# (``last_index()``, ``first_index()``, ``term_at()``, ``unstored_entries()``). A RawNode is
# recognised by the names the code gives it (``raw``, ``core``, ``raw_node``, also as
# attributes: ``group.raw``, ``node.core``); ``.unstable`` is RaftLog's alone.

CORE_NAMES = {"raw", "core", "raw_node", "rawnode"}
#: tests/sim/mutations.py holds deliberately broken copies of core methods (they run as
#: RawNode / RaftLog methods, ``self`` is the core), so it is core code by nature.
BOUNDARY_EXEMPT = {"tests/sim/mutations.py"}


def _terminal_name(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return None


def core_reaches(source: str, name: str) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source, filename=name)):
        if not isinstance(node, ast.Attribute):
            continue
        line = node.lineno
        if node.attr == "log" and (_terminal_name(node.value) or "").lower() in CORE_NAMES:
            found.append(f"{name}:{line} reads {ast.unparse(node)}")
        elif node.attr == "unstable":
            found.append(f"{name}:{line} reads {ast.unparse(node)}")
    return found


def test_nothing_outside_the_core_reads_its_log() -> None:
    repo = Path(raft_pkg.__file__).resolve().parents[2]
    raft_dir = repo / "node" / "raft"
    files = [
        p
        for d in ("node", "controller", "tests/sim")
        for p in sorted((repo / d).rglob("*.py"))
        if raft_dir not in p.parents
    ]
    assert any(p.name == "partition.py" for p in files)
    assert any(p.name == "core_adapter.py" for p in files)
    bad = [
        o
        for p in files
        if (rel := p.relative_to(repo).as_posix()) not in BOUNDARY_EXEMPT
        for o in core_reaches(p.read_text(), rel)
    ]
    assert not bad, "use RawNode's accessors, not its log:\n" + "\n".join(bad)


def test_boundary_scan_catches_each_form() -> None:
    src = (
        "a = raw.log.last_index()\n"
        "b = group.raw.log.unstable.entries\n"
        "c = node.core.log.term_or_none(3)\n"
        "d = self.log.last_index\n"  # a partition's own log: fine
        "e = node.log.last_index\n"  # the simulator's shadow of a node's log: fine
    )
    assert sorted(core_reaches(src, "x.py")) == [
        "x.py:1 reads raw.log",
        "x.py:2 reads group.raw.log",
        "x.py:2 reads group.raw.log.unstable",
        "x.py:3 reads node.core.log",
    ]
