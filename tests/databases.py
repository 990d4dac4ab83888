"""An empty database of either dialect for one test: an SQLite file, or a PostgreSQL schema of its own; and
the buffers a PostgreSQL plan read (``EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON)``), which do not depend on the
machine's speed."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from broadcast.adapters.sql.engine import create_engine
from broadcast.core.settings import DatabaseSettings
from devstack.stack import StackInfo


@asynccontextmanager
async def empty_database(
    dialect: str, request: pytest.FixtureRequest, unique_name: str, directory: Path
) -> AsyncIterator[tuple[AsyncEngine, DatabaseSettings]]:
    """Yield an engine on a fresh, unmigrated database; PostgreSQL schemas are dropped afterwards."""
    if dialect == "sqlite":
        settings = DatabaseSettings(url=SecretStr(f"sqlite+aiosqlite:///{directory}/{unique_name}.db"))
    else:
        stack: StackInfo = request.getfixturevalue("stack")
        settings = DatabaseSettings(url=SecretStr(stack.postgres_url), schema_name=unique_name)
    engine = create_engine(settings)
    try:
        yield engine, settings
        if settings.schema_name:
            async with engine.begin() as conn:
                await conn.execute(text(f'DROP SCHEMA IF EXISTS "{settings.schema_name}" CASCADE'))
    finally:
        await engine.dispose()


def plan_buffers(plan: dict[str, Any]) -> int:
    """Shared buffers an executed plan's top node read, hit or not (its children's included)."""
    return int(plan["Shared Hit Blocks"]) + int(plan["Shared Read Blocks"])
