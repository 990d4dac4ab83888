"""The app's PostgreSQL sessions: a session left idle inside a transaction is ended by the server, so a stuck
task cannot hold locks (an outbox lane, a purge's rows) for ever."""

from __future__ import annotations

import asyncio

import pytest
from pydantic import SecretStr
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from broadcast.adapters.sql_engine import create_engine
from broadcast.settings import DatabaseSettings
from devstack.stack import StackInfo


async def test_a_session_idle_in_a_transaction_is_ended(stack: StackInfo) -> None:
    default = create_engine(DatabaseSettings(url=SecretStr(stack.postgres_url)))
    try:
        async with default.connect() as conn:
            shown = (await conn.execute(text("SHOW idle_in_transaction_session_timeout"))).scalar_one()
        assert shown == "1min"
    finally:
        await default.dispose()

    engine = create_engine(DatabaseSettings(url=SecretStr(stack.postgres_url), idle_in_transaction_timeout_seconds=0.5))
    try:
        with pytest.raises(DBAPIError):
            async with engine.begin() as conn:
                await conn.execute(text("SELECT 1"))
                await asyncio.sleep(1.5)  # idle inside the transaction
                await conn.execute(text("SELECT 1"))
    finally:
        await engine.dispose()
