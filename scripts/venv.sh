#!/usr/bin/env bash
# The project's virtualenv, .venv, installed from the lock: every package pinned and hash-checked
# (requirements/dev.txt by default, or the file given), then the project itself, editable, with no
# dependency resolution and the locked build backend. Re-installs only when the lock or pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."
LOCK=${1:-requirements/dev.txt}

PY=${PYTHON:-python3}
if ! "$PY" -c 'import sys; assert sys.version_info[:2] == (3, 11)' 2>/dev/null; then
  command -v python3.11 >/dev/null && PY=python3.11
fi
if [ ! -x .venv/bin/python ]; then
  if ! "$PY" -m venv .venv 2>/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv
    rm -rf .venv
    "$PY" -m venv .venv
  fi
fi
stamp=.venv/.installed-$(cat "$LOCK" pyproject.toml | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ]; then
  .venv/bin/python -m pip install -q --disable-pip-version-check --require-hashes -r "$LOCK"
  .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
  rm -f .venv/.installed-* && touch "$stamp"
fi
