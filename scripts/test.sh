#!/usr/bin/env bash
# The full test command (README's second command, what CI runs): installs what is missing on a fresh
# machine (Python venv and packages from the lock; Debian packages and Kafka jars through `broadcast-server stack up`),
# starts the real stack (3-node Kafka, PostgreSQL, Redis), then runs every quality gate and the whole
# pytest suite against it. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\n== %s (%s)\n' "$*" "$(date -u +%H:%M:%S)"; }
start=$(date +%s)

log "python environment (from the lock, requirements/dev.txt)"
bash scripts/venv.sh requirements/dev.txt
export PATH="$PWD/.venv/bin:$PATH"

log "local stack (installs Debian packages and Kafka jars when missing)"
broadcast-server stack up
log "test tools (promtool, chromium, kcat: Debian packages, installed here and never by a test)"
broadcast-server stack tools

log "ruff"
ruff check .
ruff format --check .
log "mypy --strict"
mypy
log "import-linter"
lint-imports
log "pytest"
set +e
pytest -p no:cacheprovider --durations=25 "$@"
code=$?
set -e
printf '\n== full test run took %s s\n' "$(( $(date +%s) - start ))"
exit $code
