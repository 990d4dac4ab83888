"""Fault-test fixtures: a schema and topics of the test's own, real server processes, and a stack that is
healthy again after every test (whatever the test stopped is started again, and waited for)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from devstack.stack import StackInfo, status, up
from tests.servers import isolated_env, server_factory

__all__ = ["env", "healthy_stack", "server_factory"]


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
