"""A driver statement whose session's client state broke fails as UnavailableError and drops the session."""

from __future__ import annotations

from typing import Any, cast

import asyncpg
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from broadcast.adapters.sql.engine import DriverStatement
from broadcast.errors import UnavailableError


class Driver:
    async def fetchval(self, *args: Any) -> Any:
        raise asyncpg.InternalClientError("cannot switch to state 12; another operation (2) is in progress")


class Raw:
    driver_connection = Driver()


class Conn:
    invalidated = False

    async def get_raw_connection(self) -> Raw:
        return Raw()

    async def invalidate(self) -> None:
        self.invalidated = True


async def test_a_broken_client_state_is_unavailable_and_the_session_is_dropped() -> None:
    conn = Conn()
    with pytest.raises(UnavailableError):
        await DriverStatement.of(text("SELECT 1")).fetchval(cast(AsyncConnection, conn), {})
    assert conn.invalidated, "the pool must not hand the session out again"
