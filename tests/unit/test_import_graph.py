"""The library never depends on the operator tools: no module of ``tidelog.node``,
``tidelog.controller`` or ``tidelog.client`` imports ``tidelog.ops`` (the CLI, local cluster,
chaos and bench), directly or through a relative import, at the top or inside a function."""

from __future__ import annotations

import ast
from pathlib import Path

import tidelog.client as client_pkg
import tidelog.controller as controller_pkg
import tidelog.node as node_pkg

OPS = "tidelog.ops"


def _package_of(module: str, is_package: bool) -> list[str]:
    parts = module.split(".")
    return parts if is_package else parts[:-1]


def imported_modules(source: str, module: str, is_package: bool = False) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in ``source``, relative ones resolved
    against ``module``; ``from X import Y`` yields both X and X.Y (Y may be a submodule)."""
    out: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source, filename=module)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                package = _package_of(module, is_package)
                base_parts = package[: len(package) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            out.append((node.lineno, base))
            out += [(node.lineno, f"{base}.{a.name}") for a in node.names if a.name != "*"]
    return out


def ops_imports(source: str, module: str, is_package: bool = False) -> list[str]:
    return [
        f"{module}:{line} imports {name}"
        for line, name in sorted(imported_modules(source, module, is_package), key=lambda x: x[0])
        if name == OPS or name.startswith(OPS + ".")
    ]


def test_node_controller_and_client_import_nothing_from_ops() -> None:
    bad: list[str] = []
    scanned = 0
    for pkg, name in (
        (node_pkg, "tidelog.node"),
        (controller_pkg, "tidelog.controller"),
        (client_pkg, "tidelog.client"),
    ):
        assert pkg.__file__ is not None
        root = Path(pkg.__file__).parent
        for path in sorted(root.rglob("*.py")):
            rel = path.relative_to(root).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            module = ".".join([name, *parts])
            bad += ops_imports(path.read_text(), module, path.name == "__init__.py")
            scanned += 1
    assert scanned > 30, f"only {scanned} modules found: is the package layout still the same?"
    assert not bad, "the library must not import the ops tools:\n" + "\n".join(bad)


def test_scan_catches_each_kind_of_import() -> None:
    src = (
        "import tidelog.ops.cli\n"
        "from tidelog.ops import localcluster\n"
        "from tidelog import ops\n"
        "def f():\n"
        "    from tidelog.ops.bench import percentile\n"
        "from ... import ops\n"
        "from ...ops.chaos import run_chaos\n"
        "import tidelog.opsx\n"
        "from tidelog import records\n"
    )
    assert ops_imports(src, "tidelog.node.raft.core") == [
        "tidelog.node.raft.core:1 imports tidelog.ops.cli",
        "tidelog.node.raft.core:2 imports tidelog.ops",
        "tidelog.node.raft.core:2 imports tidelog.ops.localcluster",
        "tidelog.node.raft.core:3 imports tidelog.ops",
        "tidelog.node.raft.core:5 imports tidelog.ops.bench",
        "tidelog.node.raft.core:5 imports tidelog.ops.bench.percentile",
        "tidelog.node.raft.core:6 imports tidelog.ops",
        "tidelog.node.raft.core:7 imports tidelog.ops.chaos",
        "tidelog.node.raft.core:7 imports tidelog.ops.chaos.run_chaos",
    ]
