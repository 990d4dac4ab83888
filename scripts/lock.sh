#!/usr/bin/env bash
# Resolve the dependencies of pyproject.toml into the lock: requirements/dev.txt (runtime + dev + build
# backend) and requirements/runtime.txt (runtime + build backend, constrained to dev.txt's versions, so both
# agree). Pinned versions with sha256 hashes, resolved for every platform and Python 3.11-3.12 at once
# (uv's --universal), in pip's requirements format: installing from the lock needs nothing but pip.
#   scripts/lock.sh            keep the pinned versions, add or drop what pyproject.toml changed (`make lock`)
#   scripts/lock.sh --upgrade  the newest versions pyproject.toml allows (`make deps-upgrade`)
set -euo pipefail
cd "$(dirname "$0")/.."
UV=${UV:-.venv/bin/uv}
common=(--universal --python-version 3.11 --generate-hashes --quiet "$@")
"$UV" pip compile pyproject.toml requirements/build.in --extra dev "${common[@]}" -o requirements/dev.txt
"$UV" pip compile pyproject.toml requirements/build.in -c requirements/dev.txt "${common[@]}" -o requirements/runtime.txt
