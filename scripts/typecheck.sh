#!/usr/bin/env bash
# mypy --strict over the whole project. node/, controller/ and client/ are imported as
# tidelog.node, tidelog.controller and tidelog.client (package-dir in pyproject.toml), a
# mapping mypy cannot follow through an editable install; so it checks a tree of symlinks laid
# out the way the installed package is.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LAYOUT="$ROOT/build/typecheck"
rm -rf "$LAYOUT"
mkdir -p "$LAYOUT/tidelog"
for f in "$ROOT"/tidelog/*; do ln -s "$f" "$LAYOUT/tidelog/"; done
for pkg in node controller client; do ln -s "$ROOT/$pkg" "$LAYOUT/tidelog/$pkg"; done
for d in tests bench scripts examples; do ln -s "$ROOT/$d" "$LAYOUT/$d"; done
cd "$LAYOUT"
exec "$ROOT/.venv/bin/mypy" --config-file "$ROOT/pyproject.toml" --cache-dir "$ROOT/build/mypy-cache" tidelog tests bench scripts examples "$@"
