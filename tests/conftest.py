"""Shared fixtures: the real local stack (started once per session, left running) and unique names."""

from __future__ import annotations

import asyncio
import uuid
import warnings
from collections.abc import Iterator

import pytest
from aiokafka.errors import KafkaError

from devstack.stack import StackInfo, up
from devstack.topics import delete_scratch_topics

_STACK_USED = False
_NAMES: set[str] = set()  # unique names handed out in this session whose topics are not deleted yet


@pytest.fixture(scope="session")
def stack() -> StackInfo:
    """The running local stack (Kafka x3, PostgreSQL, Redis); starts or reuses it, never skips.

    It is deliberately not stopped at the end of the session: the next session reuses it.
    """
    global _STACK_USED
    _STACK_USED = True
    return up()


@pytest.fixture
def unique_name() -> str:
    """A fresh short name for a topic, consumer group or schema, unique per test."""
    name = "t" + uuid.uuid4().hex[:10]
    _NAMES.add(name)
    return name


@pytest.fixture(scope="module", autouse=True)
def tidy_topics() -> Iterator[None]:
    """After each module, delete the topics of the unique names its tests were given (the stack keeps
    running): the cluster stays at a few modules' topics all session, instead of every test's (see
    ``devstack.topics``). Module-scoped and autouse, so it is torn down after the module's own fixtures
    (a module-scoped server still using its topics)."""
    before = set(_NAMES)
    yield
    if _STACK_USED and (names := _NAMES - before):
        try:
            asyncio.run(delete_scratch_topics(up().kafka_bootstrap, names))
        except (KafkaError, OSError) as exc:  # the session's last sweep tries again
            warnings.warn(f"could not delete this module's test topics yet: {exc!r}", stacklevel=1)
        else:
            _NAMES.difference_update(names)


@pytest.fixture(scope="session", autouse=True)
def tidy_leftover_topics() -> Iterator[None]:
    """At the end of the session, the topics a module could not delete (a broker was down at the time)."""
    yield
    if _STACK_USED and _NAMES:
        asyncio.run(delete_scratch_topics(up().kafka_bootstrap, _NAMES))
