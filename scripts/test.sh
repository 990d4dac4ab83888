#!/usr/bin/env bash
# The full test command (README's second command, what CI runs): installs what is missing on a fresh
# machine (Python venv and packages; Debian packages and Kafka jars through `broadcast-server stack up`),
# starts the real stack (3-node Kafka, PostgreSQL, Redis), then runs every quality gate and the whole
# pytest suite against it. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\n== %s (%s)\n' "$*" "$(date -u +%H:%M:%S)"; }
start=$(date +%s)

PY=${PYTHON:-python3}
if ! "$PY" -c 'import sys; assert sys.version_info[:2] == (3, 11)' 2>/dev/null; then
  command -v python3.11 >/dev/null && PY=python3.11
fi

log "python environment"
if [ ! -x .venv/bin/python ]; then
  if ! "$PY" -m venv .venv 2>/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv
    "$PY" -m venv .venv
  fi
fi
stamp=.venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -f "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e '.[dev]'
  rm -f .venv/.installed-* && touch "$stamp"
fi
export PATH="$PWD/.venv/bin:$PATH"

log "local stack (installs Debian packages and Kafka jars when missing)"
broadcast-server stack up

log "ruff"
ruff check .
ruff format --check .
log "mypy --strict"
mypy
log "import-linter"
lint-imports
log "pytest"
set +e
pytest -p no:cacheprovider "$@"
code=$?
set -e
printf '\n== full test run took %s s\n' "$(( $(date +%s) - start ))"
exit $code
