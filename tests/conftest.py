"""Shared fixtures: the real local stack (started once per session, left running) and unique names."""

from __future__ import annotations

import uuid

import pytest

from devstack.stack import StackInfo, up


@pytest.fixture(scope="session")
def stack() -> StackInfo:
    """The running local stack (Kafka x3, PostgreSQL, Redis); starts or reuses it, never skips.

    It is deliberately not stopped at the end of the session: the next session reuses it.
    """
    return up()


@pytest.fixture
def unique_name() -> str:
    """A fresh short name for a topic, consumer group or schema, unique per test."""
    return "t" + uuid.uuid4().hex[:10]
