"""Shared fixtures: the real local stack (started once per session, left running) and unique names."""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import Iterator

import pytest
from aiokafka.admin import AIOKafkaAdminClient

from devstack.stack import StackInfo, up

_STACK_USED = False
_NAMES: set[str] = set()  # unique names handed out in this session: only their topics are deleted


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


TEST_TOPIC = re.compile(r"^(t[0-9a-f]{10}|bench_\w+|prof_\w+)([.-].*)?$")


async def delete_test_topics(bootstrap: str, owners: set[str] | None = None) -> int:
    """Delete the topics tests and benchmarks created (unique-name prefixes), so the cluster stays small.

    With ``owners``, only topics whose unique-name prefix is one of them (this session's), so that
    concurrent test sessions on the same stack keep theirs.
    """
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=60_000)
    await admin.start()
    try:
        names = [
            t
            for t in await admin.list_topics()
            if (m := TEST_TOPIC.match(t)) and (owners is None or m.group(1) in owners)
        ]
        for start in range(0, len(names), 50):
            await admin.delete_topics(names[start : start + 50])
        return len(names)
    finally:
        await admin.close()


@pytest.fixture(scope="session", autouse=True)
def tidy_topics() -> Iterator[None]:
    """After a session that used the stack, delete its test topics (the stack itself keeps running)."""
    yield
    if _STACK_USED:
        asyncio.run(delete_test_topics(up().kafka_bootstrap, _NAMES))
