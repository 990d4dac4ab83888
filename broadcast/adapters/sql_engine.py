"""Engine creation and health for PostgreSQL (asyncpg) and SQLite (aiosqlite).

PostgreSQL may be confined to one schema (``DatabaseSettings.schema_name``; tests use one per test run)
through the connection's ``search_path``. SQLite gets WAL, foreign keys and a busy timeout.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import event, text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from broadcast.errors import UnavailableError
from broadcast.settings import DatabaseSettings


def create_engine(settings: DatabaseSettings) -> AsyncEngine:
    """A pooled async engine for ``settings``; the caller disposes of it."""
    url = settings.url.get_secret_value()
    if settings.dialect == "sqlite":
        engine = create_async_engine(url, echo=settings.echo, connect_args={"timeout": 30})
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        return engine
    connect_args: dict[str, Any] = {"command_timeout": 30}
    if settings.schema_name:
        connect_args["server_settings"] = {"search_path": settings.schema_name}
    return create_async_engine(
        url,
        echo=settings.echo,
        pool_size=settings.pool_size,
        max_overflow=settings.max_overflow,
        pool_pre_ping=True,
        pool_timeout=10,
        connect_args=connect_args,
    )


def _sqlite_pragmas(dbapi_connection: Any, _record: object) -> None:
    cursor = dbapi_connection.cursor()
    for pragma in ("journal_mode=WAL", "foreign_keys=ON", "busy_timeout=30000", "synchronous=NORMAL"):
        cursor.execute(f"PRAGMA {pragma}")
    cursor.close()


class SqlHealth:
    """Readiness check: one round trip to the database."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    async def check(self) -> None:
        try:
            async with self._engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
        except (SQLAlchemyError, OSError) as exc:
            raise UnavailableError(f"database unreachable: {type(exc).__name__}") from exc
