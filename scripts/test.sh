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
# With no arguments, two runs: the unit tests and the simulation, CPU work in one process
# with generous timeouts, on parallel workers (pytest-xdist, one per core, at least 2); then
# the tests that start real node processes (tests/integration, tests/chaos), one at a time, because their
# elections, timeouts and failover deadlines are what they test. With arguments (test paths,
# -k, -x, ...), one run of what they name, in one process.
if [ "$#" -gt 0 ]; then
  exec .venv/bin/python -m pytest -q -p no:cacheprovider -m "not packaging" "$@"
fi
WORKERS="${TIDELOG_TEST_WORKERS:-$(.venv/bin/python -c 'import os; print(max(2, len(os.sched_getaffinity(0))))')}"
status=0
.venv/bin/python -m pytest -q -p no:cacheprovider -m "not packaging" -n "$WORKERS" \
  tests/unit tests/sim || status=$?
echo "== pytest: real node processes"
.venv/bin/python -m pytest -q -p no:cacheprovider -m "not packaging" \
  tests/integration tests/chaos || status=$?
exit "$status"
