"""The app in process, on the real stack: a migrated PostgreSQL schema, topic prefix and Redis prefix of its
own, the ``api`` role only, driven through httpx's ASGI transport (no sockets; streams are e2e tests' job)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
from pydantic import SecretStr
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.applications import Starlette

from broadcast.adapters.sql import migrate as sql_migrate
from broadcast.adapters.sql.engine import create_engine
from broadcast.core.settings import (
    DatabaseSettings,
    KafkaSettings,
    LimitsSettings,
    RedisSettings,
    ServerSettings,
    Settings,
)
from broadcast.runtime.app import create_app
from devstack.stack import StackInfo


@asynccontextmanager
async def api_in_process(
    stack: StackInfo,
    unique_name: str,
    limits: LimitsSettings | None = None,
    server: ServerSettings | None = None,
) -> AsyncIterator[tuple[httpx.AsyncClient, AsyncEngine]]:
    """A client on the app, and an engine on its schema (dropped afterwards)."""
    settings = Settings(
        database=DatabaseSettings(url=SecretStr(stack.postgres_url), schema_name=unique_name),
        kafka=KafkaSettings(bootstrap_servers=stack.kafka_bootstrap, topic_prefix=f"{unique_name}."),
        redis=RedisSettings(url=SecretStr(stack.redis_url), key_prefix=f"{unique_name}:"),
        limits=limits or LimitsSettings(),
        server=server or ServerSettings(),
    )
    engine = create_engine(settings.database)
    try:
        await sql_migrate.upgrade(engine, settings.database)
        app = create_app(settings, roles=frozenset({"api"}))
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=transport, base_url="http://test", timeout=10) as http,
        ):
            yield http, engine
    finally:
        async with engine.begin() as conn:
            await conn.execute(text(f'DROP SCHEMA IF EXISTS "{unique_name}" CASCADE'))
        await engine.dispose()


@asynccontextmanager
async def embedded_api(folder: Path) -> AsyncIterator[tuple[Starlette, httpx.AsyncClient]]:
    """The app in process on the embedded default (a SQLite file in ``folder``), ``api`` role only, with the
    fault drill enabled; the app and a client on it."""
    settings = Settings(database=DatabaseSettings(url=SecretStr(f"sqlite+aiosqlite:///{folder}/app.db")))
    settings.testing.fault_drill_enabled = True
    app = create_app(settings, roles=frozenset({"api"}))
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with app.router.lifespan_context(app), httpx.AsyncClient(transport=transport, base_url="http://t") as http:
        yield app, http
