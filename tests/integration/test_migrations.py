"""Alembic migrations build exactly the table models on PostgreSQL and SQLite, idempotently."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from pydantic import SecretStr
from sqlalchemy import Connection, inspect, text
from sqlalchemy.ext.asyncio import AsyncEngine

from broadcast.adapters.sql import migrate as sql_migrate
from broadcast.adapters.sql.engine import create_engine
from broadcast.adapters.sql.tables import metadata
from broadcast.core.settings import DatabaseSettings
from broadcast.errors import ConfigurationError
from devstack.stack import StackInfo
from tests.databases import empty_database

TABLES = {
    "users",
    "user_roles",
    "broadcast_messages",
    "user_broadcast_messages",
    "outbox_events",
    "dlt_messages",
    "broadcast_statistics",
    "dlt_audit",
    "fault_drills",
}


@pytest.fixture(params=["sqlite", "postgresql"])
async def database(
    request: pytest.FixtureRequest, unique_name: str, tmp_path: Path
) -> AsyncIterator[tuple[AsyncEngine, DatabaseSettings]]:
    async with empty_database(request.param, request, unique_name, tmp_path) as database:
        yield database


async def test_upgrade_creates_the_models_and_is_idempotent(database: tuple[AsyncEngine, DatabaseSettings]) -> None:
    engine, settings = database
    assert await sql_migrate.current(engine, settings) is None
    assert await sql_migrate.upgrade(engine, settings) == sql_migrate.head()
    assert await sql_migrate.upgrade(engine, settings) == sql_migrate.head()

    def diff(sync: Connection) -> tuple[set[str], list[object]]:
        ctx = MigrationContext.configure(sync, opts={"compare_type": True})
        return set(inspect(sync).get_table_names()), compare_metadata(ctx, metadata)

    async with engine.connect() as conn:
        tables, differences = await conn.run_sync(diff)
    assert tables >= TABLES
    assert differences == []


async def test_0002_keeps_the_dead_letters_stored_under_0001(database: tuple[AsyncEngine, DatabaseSettings]) -> None:
    engine, settings = database
    assert await sql_migrate.upgrade(engine, settings, "0001") == "0001"
    row = (
        "INSERT INTO dlt_messages (dlt_topic, dlt_partition, dlt_offset, original_topic, headers) "
        "VALUES ('t-dlt', 1, 2, 't', '[]')"
    )
    async with engine.begin() as conn:
        await conn.execute(text(row))
    assert await sql_migrate.upgrade(engine, settings) == sql_migrate.head()
    async with engine.connect() as conn:
        kept = (await conn.execute(text("SELECT dlt_topic, status, event_type FROM dlt_messages"))).all()
    assert [tuple(r) for r in kept] == [("t-dlt", "NEW", None)]


async def test_user_rows_are_unique_per_broadcast(database: tuple[AsyncEngine, DatabaseSettings]) -> None:
    engine, settings = database
    await sql_migrate.upgrade(engine, settings)

    def unique_sets(sync: Connection) -> list[list[str]]:
        return [list(u["column_names"]) for u in inspect(sync).get_unique_constraints("user_broadcast_messages")]

    async with engine.connect() as conn:
        assert ["broadcast_id", "user_id"] in await conn.run_sync(unique_sets)


async def test_an_unmigrated_postgres_is_refused_at_start(stack: StackInfo, unique_name: str) -> None:
    settings = DatabaseSettings(url=SecretStr(stack.postgres_url), schema_name=unique_name)
    engine = create_engine(settings)
    try:
        with pytest.raises(ConfigurationError, match="broadcast-server migrate"):
            await sql_migrate.ensure_schema(engine, settings)
    finally:
        await engine.dispose()
