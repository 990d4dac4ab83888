"""Fault-test fixtures: a schema and topics of the test's own, real server processes, and a stack that is
healthy again after every test (whatever the test stopped is started again, and waited for)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from devstack.servers import isolated_env
from devstack.stack import StackInfo, status, up
from tests.servers import server_factory

__all__ = ["env", "fault_scale", "healthy_stack", "server_factory"]

SCALE_VARIABLE = "BROADCAST_FAULT_SCALE"


@pytest.fixture(scope="session")
def fault_scale() -> int:
    """How many times the longest scenarios repeat their injection or multiply their load (kill cycles,
    restart rounds, clients, poison records): 1 in the full suite, more when asked with
    ``BROADCAST_FAULT_SCALE=N`` (e.g. ``BROADCAST_FAULT_SCALE=5 make test-faults``)."""
    raw = os.environ.get(SCALE_VARIABLE, "1")
    assert raw.isdigit() and int(raw) >= 1, f"{SCALE_VARIABLE} must be a positive integer, not {raw!r}"
    return int(raw)


@pytest.fixture
def env(stack: StackInfo, unique_name: str, tmp_path: Path) -> Iterator[dict[str, str]]:
    """A migrated schema and provisioned topics of this test's own, and fast loops (reconciliation 1 s).

    A crashed relay's lanes come back after the lease; a short one (publish timeout below it) keeps the
    recovery after a SIGKILL within the test's time budget.
    """
    yield isolated_env(
        stack,
        unique_name,
        tmp_path,
        BROADCAST_RELAY__LEASE_SECONDS="6",
        BROADCAST_KAFKA__PUBLISH_TIMEOUT_SECONDS="2.5",
    )


@pytest.fixture(autouse=True)
def healthy_stack(stack: StackInfo) -> Iterator[None]:
    """After each fault test, every stack part runs and is ready again (``up`` restarts what is missing)."""
    yield
    up()
    broken = {name: part for name, part in status().items() if not part["ready"]}
    assert not broken, f"the stack is not healthy after the test: {broken}"
