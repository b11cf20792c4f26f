"""The client installs and works alone (issue 16 item 1): ``pip install .`` into a fresh
virtual environment gives ``tidelog.client`` without any of the node's dependencies, and that
client produces to and consumes from a node started from the full install (this checkout's
``.venv``, with ``[node]``).

Marked ``packaging`` and ``integration``: it creates a venv and pip-installs into it, which
takes a minute or more and needs the package index (or a wheel cache pip is configured for),
so scripts/test.sh does not run it; run it with ``pytest -m packaging``.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.support.nodeproc import Node

pytestmark = [pytest.mark.integration, pytest.mark.packaging, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[2]
NODE_ONLY = ("rocksdict", "uvloop", "prometheus_client", "cryptography")

CLIENT_SCRIPT = textwrap.dedent(
    """
    import asyncio, sys
    from tidelog.client import Admin, Consumer, Producer, TopicPartition

    async def main(bootstrap: str) -> None:
        async with Admin(bootstrap) as admin:
            await admin.create_topics("alone", 1, 1)
        async with Producer(bootstrap) as p:
            mds = [await p.send("alone", b"v%d" % i) for i in range(10)]
        async with Consumer(bootstrap, auto_offset_reset="earliest") as c:
            c.assign([TopicPartition("alone", 0)])
            got = []
            while recs := await c.poll(timeout_ms=10_000, until_end=True):
                got += [r.value for r in recs]
        assert [m.offset for m in mds] == list(range(10)), mds
        assert got == [b"v%d" % i for i in range(10)], got
        loaded = [m for m in NODE_ONLY if m in sys.modules]
        assert not loaded, loaded
        print("ok")

    asyncio.run(main(sys.argv[1]))
    """
)


def run(*argv: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [str(a) for a in argv], capture_output=True, text=True, cwd=cwd, timeout=800, check=False
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


LOWEST = ROOT / ".ci" / "client-lowest.txt"


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[name.lower()] = version
    return pins


@pytest.mark.parametrize("versions", ["newest", "lowest"])
def test_client_alone_in_a_fresh_venv(tmp_path: Path, versions: str) -> None:
    """Both ends of the client's dependency ranges: the newest versions pip picks, and the
    lowest the ranges allow (.ci/client-lowest.txt as constraints)."""
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", venv)
    py = venv / "bin" / "python"
    constraints = ["-c", str(LOWEST)] if versions == "lowest" else []
    run(py, "-m", "pip", "install", "--quiet", *constraints, ROOT)
    if versions == "lowest":
        frozen = run(py, "-m", "pip", "freeze").stdout.lower().splitlines()
        installed = dict(line.partition("==")[::2] for line in frozen if "==" in line)
        for name, version in _pins(LOWEST).items():
            assert installed.get(name) == version, (name, installed.get(name), version)
    # Nothing of the node came with it.
    probe = f"import importlib.util as u; print([m for m in {NODE_ONLY!r} if u.find_spec(m)])"
    assert run(py, "-c", probe, cwd=tmp_path).stdout.strip() == "[]"
    # Its `tidelog` command works for the client commands; a command that runs a node
    # explains what is missing in one line.
    helped = subprocess.run(
        [venv / "bin" / "tidelog", "--help"], capture_output=True, text=True, check=False
    )
    assert helped.returncode == 0 and "produce" in helped.stdout, helped.stderr
    cli = subprocess.run(
        [venv / "bin" / "tidelog", "node", "start", "--id", "1", "--listen", "127.0.0.1:0",
         "--data-dir", str(tmp_path / "nodata")],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert cli.returncode == 1 and "tidelog[node]" in cli.stderr, cli.stderr
    assert len(cli.stderr.strip().splitlines()) == 1, cli.stderr
    node = Node(tmp_path / "data", tmp_path / "node.log", via_cli=True)
    node.start()
    try:
        script = tmp_path / "client.py"
        script.write_text(f"NODE_ONLY = {NODE_ONLY!r}\n" + CLIENT_SCRIPT)
        assert run(py, script, node.address, cwd=tmp_path).stdout.strip() == "ok"
    finally:
        node.kill()
