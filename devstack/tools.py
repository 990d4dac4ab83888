"""The programs the test suite drives besides the stack: installed by the test command's setup step
(``broadcast-server stack tools``, which ``scripts/test.sh`` runs), never by a test.

A test asks :func:`require` for a tool's path; a missing tool fails the test with the command that installs
it (a skipped test has not run).
"""

from __future__ import annotations

import shutil

from devstack import proc

# binary -> the Debian package that provides it
TOOLS = {
    "promtool": "prometheus",  # tests/unit/test_deploy.py: the alert rules and dashboard queries
    "chromium": "chromium",  # tests/browser: Playwright drives Debian's Chromium
    "kcat": "kcat",  # tests/e2e/test_dead_letters.py: an independent Kafka client
}


def missing() -> dict[str, str]:
    """The tools not on PATH, each with its package."""
    return {binary: package for binary, package in TOOLS.items() if shutil.which(binary) is None}


def install() -> list[str]:
    """Install the packages of the missing tools (apt, as root); the packages installed."""
    packages = sorted(set(missing().values()))
    if packages:
        proc.apt_install(*packages)
    return packages


def require(binary: str) -> str:
    """The path of ``binary``, one of :data:`TOOLS`; an AssertionError naming the setup step when it is missing."""
    assert binary in TOOLS, f"{binary} is not a declared test tool (devstack.tools.TOOLS)"
    found = shutil.which(binary)
    assert found, (
        f"{binary} is not installed (Debian package {TOOLS[binary]}): the test command's setup step installs it, "
        "run `broadcast-server stack tools`"
    )
    return found
