#!/usr/bin/env bash
# Set up the environment (once) and run every check CI runs: lint, types, generated code, tests
# (unit, deterministic simulation, integration with real node processes).
TIDELOG_EXTRAS=dev
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"

echo "== ruff"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
echo "== mypy"
bash scripts/typecheck.sh
echo "== generated protobuf code"
.venv/bin/python scripts/gen_proto.py --check
echo "== pytest"
# The packaging test (a fresh venv with the client alone, tests/integration/test_client_install.py)
# takes minutes and needs the package index: run it with `pytest -m packaging`.
.venv/bin/python -m pytest -q -p no:cacheprovider -m "not packaging" "$@"
