"""The app's PostgreSQL sessions: a session left idle inside a transaction is ended by the server, so a stuck
task cannot hold locks (an outbox lane, a purge's rows) for ever."""

from __future__ import annotations

import asyncio

import pytest
from pydantic import SecretStr
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from broadcast.adapters.sql.engine import DriverStatement, create_engine, pool_connections
from broadcast.core.settings import DatabaseSettings
from broadcast.errors import RejectedByDatabaseError, UnavailableError
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


async def test_pooled_connections_the_server_closed_are_replaced_at_checkout_without_an_error(
    stack: StackInfo,
) -> None:
    """No pre-ping round trip: a session the server ended (a restart, an admin's pg_terminate_backend) is
    seen closed on the client and swapped for a fresh one when it is checked out."""
    engine = create_engine(DatabaseSettings(url=SecretStr(stack.postgres_url), pool_size=3))
    try:
        async with engine.connect() as a, engine.connect() as b, engine.connect() as c:
            pids = [(await conn.execute(text("SELECT pg_backend_pid()"))).scalar_one() for conn in (a, b, c)]
        async with engine.connect() as admin:  # one of the three, ending the other two and itself
            own = (await admin.execute(text("SELECT pg_backend_pid()"))).scalar_one()
            others = [pid for pid in pids if pid != own]
            await admin.execute(
                text("SELECT pg_terminate_backend(pid) FROM unnest(CAST(:p AS int[])) AS pid"), {"p": others}
            )
        await asyncio.sleep(0.3)  # the client's event loop reads the server's goodbye

        async def backend() -> int:
            async with engine.begin() as conn:
                return int((await conn.execute(text("SELECT pg_backend_pid()"))).scalar_one())

        seen = await asyncio.gather(*(backend() for _ in range(3)))
        assert not set(seen) & set(others), "no statement ran on an ended session, and none failed"
    finally:
        await engine.dispose()


SUM = DriverStatement.of(text("SELECT CAST(:a AS smallint) + CAST(:b AS smallint)"))


async def test_a_driver_statement_runs_with_named_parameters_and_the_servers_refusal_keeps_the_session(
    stack: StackInfo,
) -> None:
    engine = create_engine(DatabaseSettings(url=SecretStr(stack.postgres_url), pool_size=1))
    try:
        async with engine.connect() as conn:
            assert await SUM.fetchval(conn, {"b": 2, "a": 40}) == 42
            with pytest.raises(RejectedByDatabaseError):  # smallint out of range: SQLSTATE 22003
                await SUM.fetchval(conn, {"a": 32_000, "b": 32_000})
            assert await SUM.fetchval(conn, {"a": 1, "b": 1}) == 2  # the same session goes on
        assert pool_connections(engine) == (0, 1)
    finally:
        await engine.dispose()


async def test_a_driver_statement_on_a_session_that_died_fails_unavailable_and_the_next_checkout_works(
    stack: StackInfo,
) -> None:
    """A session ended under a checked-out connection: the statement fails as ``UnavailableError`` (a 503 for
    the API, a retry for a loop), not as the driver's own error; the next checkout gets a live session."""
    engine = create_engine(DatabaseSettings(url=SecretStr(stack.postgres_url), pool_size=1))
    other = create_engine(DatabaseSettings(url=SecretStr(stack.postgres_url), pool_size=1))
    try:
        async with engine.connect() as conn:
            pid = (await conn.execute(text("SELECT pg_backend_pid()"))).scalar_one()
            async with other.connect() as admin:
                await admin.execute(text("SELECT pg_terminate_backend(:p)"), {"p": pid})
            await asyncio.sleep(0.3)  # the client reads the server's goodbye
            with pytest.raises(UnavailableError):
                await SUM.fetchval(conn, {"a": 1, "b": 1})
        async with engine.connect() as fresh:
            assert await SUM.fetchval(fresh, {"a": 20, "b": 22}) == 42
            assert (await fresh.execute(text("SELECT pg_backend_pid()"))).scalar_one() != pid
    finally:
        await engine.dispose()
        await other.dispose()
