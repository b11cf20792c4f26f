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
