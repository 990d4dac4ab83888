"""Apply the Alembic migrations to the configured database (PostgreSQL or SQLite)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from broadcast.core.settings import DatabaseSettings
from broadcast.errors import ConfigurationError, UnavailableError

MIGRATIONS = Path(__file__).resolve().parents[2] / "migrations"


def _config(connection: Connection, schema: str | None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    config.attributes["schema"] = schema
    return config


async def upgrade(engine: AsyncEngine, settings: DatabaseSettings, revision: str = "head") -> str | None:
    """Migrate to ``revision``; returns the revision the database is at afterwards."""
    schema = settings.schema_name if settings.dialect == "postgresql" else None
    async with engine.begin() as conn:
        if schema:
            await conn.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{schema}"'))
        await conn.run_sync(lambda sync: command.upgrade(_config(sync, schema), revision))
    return await current(engine, settings)


async def current(engine: AsyncEngine, settings: DatabaseSettings) -> str | None:
    """The revision the database is at (None before the first migration)."""
    schema = settings.schema_name if settings.dialect == "postgresql" else None

    def _read(sync: Connection) -> str | None:
        ctx = MigrationContext.configure(sync, opts={"version_table_schema": schema})
        return ctx.get_current_revision()

    async with engine.connect() as conn:
        return await conn.run_sync(_read)


def head() -> str | None:
    """The newest revision shipped with this code."""
    return ScriptDirectory(str(MIGRATIONS)).get_current_head()


async def ensure_schema(engine: AsyncEngine, settings: DatabaseSettings) -> None:
    """SQLite (embedded) migrates on start; a shared PostgreSQL must be migrated by ``broadcast-server migrate``."""
    if settings.dialect == "sqlite":
        await upgrade(engine, settings)
        return
    try:
        at = await current(engine, settings)
    except (SQLAlchemyError, OSError) as exc:
        raise UnavailableError(f"database unreachable: {type(exc).__name__}: {exc}") from exc
    if at != head():
        raise ConfigurationError(
            f"database schema is at revision {at}, this code needs {head()}: run `broadcast-server migrate`"
        )
