"""A lifecycle pipeline on the real stack: a migrated PostgreSQL schema, topics under a unique prefix."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydantic import SecretStr
from sqlalchemy.ext.asyncio import AsyncEngine

from broadcast.adapters.kafka.admin import ensure_topics
from broadcast.adapters.kafka.log import KafkaEventLog
from broadcast.adapters.sql import migrate as sql_migrate
from broadcast.adapters.sql.broadcasts import SqlBroadcastStore
from broadcast.adapters.sql.stores import SqlOutboxStore, SqlUserStore
from broadcast.core import constants
from broadcast.core.settings import DatabaseSettings, KafkaSettings, LimitsSettings, RelaySettings, Settings
from broadcast.lifecycle.service import Lifecycle
from broadcast.outbox.relay import OutboxRelay
from devstack.stack import StackInfo
from tests.databases import empty_database


@dataclass
class Pipeline:
    settings: Settings
    engine: AsyncEngine
    users: SqlUserStore
    broadcasts: SqlBroadcastStore
    outbox: SqlOutboxStore
    lifecycle: Lifecycle
    log: KafkaEventLog

    def topic(self, name: str) -> str:
        return self.settings.kafka.topic(name)

    def relay(self, owner: str = "relay-test") -> OutboxRelay:
        return OutboxRelay(self.outbox, self.log, self.settings.relay, owner)

    async def publish_all(self, timeout_s: float = 60.0) -> int:
        """Run relay rounds until the backlog is empty."""
        relay, deadline = self.relay(), time.monotonic() + timeout_s
        while await self.outbox.backlog():
            assert time.monotonic() < deadline, f"backlog {await self.outbox.backlog()} left after {timeout_s} s"
            if not await relay.run_once():
                await asyncio.sleep(0.05)
        return relay.published

    def env(self, stack: StackInfo) -> dict[str, str]:
        """Variables for a server process on this pipeline's schema and topics."""
        return {
            **stack.env(),
            "BROADCAST_DATABASE__SCHEMA_NAME": self.settings.database.schema_name or "",
            "BROADCAST_KAFKA__TOPIC_PREFIX": self.settings.kafka.topic_prefix,
        }


@pytest.fixture
async def pipeline(
    request: pytest.FixtureRequest, stack: StackInfo, unique_name: str, tmp_path: Path
) -> AsyncIterator[Pipeline]:
    async with empty_database("postgresql", request, unique_name, tmp_path) as (engine, database):
        await sql_migrate.upgrade(engine, database)
        kafka = KafkaSettings(bootstrap_servers=stack.kafka_bootstrap, topic_prefix=f"{unique_name}.")
        reports = await ensure_topics(kafka, [kafka.topic(t) for t in constants.ALL_TOPICS])
        assert all(r.ok for r in reports), reports
        settings = Settings(
            kafka=kafka,
            database=DatabaseSettings(url=SecretStr(stack.postgres_url), schema_name=unique_name),
            relay=RelaySettings(idle_poll_seconds=0.05, scheduler_tick_seconds=0.5),
        )
        users, broadcasts = SqlUserStore(engine), SqlBroadcastStore(engine)
        lifecycle = Lifecycle(broadcasts, users, kafka, LimitsSettings())
        async with KafkaEventLog(kafka) as log:
            yield Pipeline(settings, engine, users, broadcasts, SqlOutboxStore(engine), lifecycle, log)
