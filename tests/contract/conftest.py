"""Adapters under contract: every port's in-memory and real adapter, built per test on unique names."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
from pydantic import SecretStr
from redis.asyncio import Redis

from broadcast.adapters.kafka.admin import ensure_topics
from broadcast.adapters.kafka.log import KafkaEventLog
from broadcast.adapters.memory.bus import MemoryBus, MemoryPresence
from broadcast.adapters.memory.log import MemoryEventLog
from broadcast.adapters.memory.sessions import MemorySlots, MemoryTickets
from broadcast.adapters.memory.stores import MemoryOutboxStore, MemoryUserStore
from broadcast.adapters.redis.bus import RedisBus, RedisPresence, create_client
from broadcast.adapters.redis.sessions import RedisSlots, RedisTickets
from broadcast.adapters.sql import migrate as sql_migrate
from broadcast.adapters.sql.stores import SqlOutboxStore, SqlUserStore
from broadcast.core.ports.bus import Bus, ConnectionSlots, Presence, TicketStore
from broadcast.core.ports.stores import OutboxStore, UserStore
from broadcast.core.settings import KafkaSettings, RedisSettings
from devstack.stack import StackInfo
from tests.contract.support import PARTITIONS, PRESENCE_TTL_S, LogUnderTest
from tests.databases import empty_database


@pytest.fixture(params=["memory", "kafka"])
async def event_log(request: pytest.FixtureRequest, unique_name: str) -> AsyncIterator[LogUnderTest]:
    topics = [f"{unique_name}-a", f"{unique_name}-b"]
    if request.param == "memory":
        yield LogUnderTest(MemoryEventLog(PARTITIONS), topics)
        return
    stack: StackInfo = request.getfixturevalue("stack")
    settings = KafkaSettings(bootstrap_servers=stack.kafka_bootstrap, partitions=PARTITIONS, client_id=unique_name)
    reports = await ensure_topics(settings, topics)
    assert all(r.ok for r in reports), reports
    async with KafkaEventLog(settings) as log:
        yield LogUnderTest(log, topics)


@pytest.fixture(params=["memory", "sqlite", "postgresql"])
async def stores(
    request: pytest.FixtureRequest, unique_name: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[tuple[UserStore, OutboxStore]]:
    if request.param == "memory":
        yield MemoryUserStore(), MemoryOutboxStore()
        return
    async with empty_database(request.param, request, unique_name, tmp_path_factory.mktemp("db")) as (
        engine,
        settings,
    ):
        assert await sql_migrate.upgrade(engine, settings) == sql_migrate.head()
        yield SqlUserStore(engine), SqlOutboxStore(engine)


@asynccontextmanager
async def _redis(request: pytest.FixtureRequest, unique_name: str) -> AsyncIterator[tuple[Redis, str]]:
    """A client on the stack's Redis and a key prefix of this test's own."""
    stack: StackInfo = request.getfixturevalue("stack")
    settings = RedisSettings(url=SecretStr(stack.redis_url), key_prefix=f"{unique_name}:")
    client = create_client(settings)
    try:
        yield client, settings.key_prefix
    finally:
        await client.aclose()


@pytest.fixture(params=["memory", "redis"])
async def bus_presence(request: pytest.FixtureRequest, unique_name: str) -> AsyncIterator[tuple[Bus, Presence]]:
    if request.param == "memory":
        yield MemoryBus(), MemoryPresence(PRESENCE_TTL_S)
        return
    async with _redis(request, unique_name) as (client, prefix):
        yield RedisBus(client, prefix), RedisPresence(client, prefix, PRESENCE_TTL_S)


@pytest.fixture(params=["memory", "redis"])
async def sessions(
    request: pytest.FixtureRequest, unique_name: str
) -> AsyncIterator[tuple[TicketStore, ConnectionSlots]]:
    if request.param == "memory":
        yield MemoryTickets(), MemorySlots(PRESENCE_TTL_S)
        return
    async with _redis(request, unique_name) as (client, prefix):
        yield RedisTickets(client, prefix), RedisSlots(client, prefix, PRESENCE_TTL_S)
