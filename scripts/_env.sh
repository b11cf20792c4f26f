# Shared by scripts/test.sh and scripts/demo.sh: create (once) the virtual environment in .venv
# and install tidelog into it. Sourced, not run.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  for candidate in python3.11 python3.12 python3.13 python3; do
    if command -v "$candidate" >/dev/null 2>&1; then PY="$candidate"; break; fi
  done
fi
if ! "$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)'; then
  echo "error: tidelog needs Python 3.11 or newer; $PY is $("$PY" -V 2>&1)" >&2
  exit 1
fi
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# The node extras by default: the demo runs nodes and the CLI (dev includes them too).
EXTRAS="${TIDELOG_EXTRAS:-node}"
STAMP=".venv/.tidelog-installed${EXTRAS:+-$EXTRAS}"
if [ ! -f "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ]; then
  echo "installing tidelog into .venv (log: .venv/install.log)"
  if ! { .venv/bin/python -m pip install --upgrade pip &&
         .venv/bin/python -m pip install -e ".${EXTRAS:+[$EXTRAS]}"; } >.venv/install.log 2>&1; then
    tail -n 30 .venv/install.log >&2
    echo "error: installing tidelog failed; the whole log is .venv/install.log" >&2
    exit 1
  fi
  touch "$STAMP"
fi
