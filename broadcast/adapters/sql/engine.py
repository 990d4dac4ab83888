"""Engine creation and health for PostgreSQL (asyncpg) and SQLite (aiosqlite).

PostgreSQL may be confined to one schema (``DatabaseSettings.schema_name``; tests use one per test run)
through the connection's ``search_path``. SQLite gets WAL, foreign keys and a busy timeout.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import asyncpg
from asyncpg.exceptions._base import DataError as _ClientDataError
from sqlalchemy import TextClause, event, text
from sqlalchemy.dialects.postgresql.asyncpg import dialect as asyncpg_dialect
from sqlalchemy.exc import DataError, DisconnectionError, IntegrityError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from broadcast.core.settings import DatabaseSettings
from broadcast.errors import BroadcastError, RejectedByDatabaseError, UnavailableError

COMMAND_TIMEOUT_S = 30.0  # asyncpg's bound on one statement (a bulk COPY sets its own: sql_rows.COPY_TIMEOUT_S)


def create_engine(settings: DatabaseSettings, application_name: str = "broadcast-server") -> AsyncEngine:
    """A pooled async engine for ``settings``; the caller disposes of it. PostgreSQL sessions carry
    ``application_name`` (``pg_stat_activity`` shows which instance a session belongs to)."""
    url = settings.url.get_secret_value()
    if settings.dialect == "sqlite":
        engine = create_async_engine(url, echo=settings.echo, connect_args={"timeout": 30})
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        return engine
    server_settings = {
        "application_name": application_name[:63],  # PostgreSQL keeps 63 bytes (NAMEDATALEN - 1)
        "idle_in_transaction_session_timeout": str(int(settings.idle_in_transaction_timeout_seconds * 1000)),
    }
    if settings.schema_name:
        server_settings["search_path"] = settings.schema_name
    connect_args: dict[str, Any] = {"command_timeout": COMMAND_TIMEOUT_S, "server_settings": server_settings}
    engine = create_async_engine(
        url,
        echo=settings.echo,
        pool_size=settings.pool_size,
        max_overflow=settings.max_overflow,
        pool_pre_ping=False,  # three round trips per checkout on asyncpg: _drop_closed instead
        pool_timeout=10,
        connect_args=connect_args,
    )
    event.listen(engine.sync_engine, "checkout", _drop_closed)
    return engine


def _drop_closed(dbapi_connection: Any, _record: object, _proxy: object) -> None:
    """Pessimistic disconnect handling without a round trip. A restarted or stopped server closes its
    sessions' sockets; asyncpg sees that at once on the event loop, so a pooled connection it knows to be
    closed is replaced at checkout (the pool tries a fresh one). A connection that died silently (no FIN:
    a partition) fails its first statement instead, which invalidates the whole pool, so that failure
    happens once; callers treat it as ``UnavailableError`` (retried, or 503)."""
    driver = getattr(dbapi_connection, "driver_connection", None)
    if driver is not None and driver.is_closed():
        raise DisconnectionError("the server closed this pooled connection")


def pool_connections(engine: AsyncEngine) -> tuple[int, int]:
    """(checked out, idle) connections of ``engine``'s pool; (0, 0) for a pool that does not count them."""
    pool = engine.sync_engine.pool
    checked_out, idle = getattr(pool, "checkedout", None), getattr(pool, "checkedin", None)
    if not callable(checked_out) or not callable(idle):
        return 0, 0
    return int(checked_out()), int(idle())


def _sqlite_pragmas(dbapi_connection: Any, _record: object) -> None:
    cursor = dbapi_connection.cursor()
    for pragma in ("journal_mode=WAL", "foreign_keys=ON", "busy_timeout=30000", "synchronous=NORMAL"):
        cursor.execute(f"PRAGMA {pragma}")
    cursor.close()


def translate(exc: Exception) -> BroadcastError:
    """A driver error in the project's vocabulary: data the database refuses (a constraint, a value too long
    or out of range: SQLSTATE classes 22 and 23, or asyncpg's own data checks) fails the same way every time
    (``RejectedByDatabaseError``); anything else may pass later (unavailable)."""
    if _rejected(exc):
        return RejectedByDatabaseError(f"the database refused the data ({type(exc).__name__})")
    return UnavailableError(f"database error: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}")


def _rejected(exc: BaseException) -> bool:
    if isinstance(exc, IntegrityError | DataError):
        return True
    orig = getattr(exc, "orig", None)
    for seen in (exc, orig, getattr(orig, "__cause__", None), exc.__cause__):
        if isinstance(seen, asyncpg.IntegrityConstraintViolationError | asyncpg.DataError | _ClientDataError):
            return True
        code = getattr(seen, "sqlstate", None)
        if isinstance(code, str) and code[:2] in ("22", "23"):
            return True
    return False


@asynccontextmanager
async def translated() -> AsyncIterator[None]:
    """Driver errors raised in the block come out in the project's vocabulary (``translate``)."""
    try:
        yield
    except (SQLAlchemyError, OSError) as exc:
        raise translate(exc) from exc


@dataclass(frozen=True, slots=True)
class DriverStatement:
    """A ``text()`` statement compiled once for asyncpg, run on a pooled connection's driver.

    For the hottest statement (a targeted message's one-statement create): SQLAlchemy's per-execution work
    (compiled-cache lookup, execution context, parameter processing, the greenlet hop, the result) cost
    about 120 µs of CPU per statement more than asyncpg's own on this box (``SELECT $1`` on a 20-connection
    pool), and more with many parameters. The connection, its pool and its ``search_path`` stay SQLAlchemy's;
    asyncpg prepares and caches the statement per connection. No transaction is opened: the statement
    commits on its own, as under ``AUTOCOMMIT``. Driver errors come out as ``translate`` has them (a refused
    value: ``RejectedByDatabaseError``; the rest: ``UnavailableError``); after a client-side failure (a closed
    session, a timeout) the connection is invalidated, so the pool never hands it out again.
    """

    sql: str
    names: tuple[str, ...]

    @classmethod
    def of(cls, statement: TextClause) -> DriverStatement:
        compiled = statement.compile(dialect=asyncpg_dialect())  # type: ignore[no-untyped-call]
        return cls(compiled.string, tuple(compiled.positiontup or ()))

    async def fetchval(self, conn: AsyncConnection, params: Mapping[str, Any]) -> Any:
        """The first column of the first row (None for no row) of the statement run with ``params``."""
        return await self._run(conn, params, all_rows=False)

    async def fetch(self, conn: AsyncConnection, params: Mapping[str, Any]) -> list[Any]:
        """Every row (asyncpg records: read their columns by position, or by name with ``row["id"]``)."""
        rows: list[Any] = await self._run(conn, params, all_rows=True)
        return rows

    async def _run(self, conn: AsyncConnection, params: Mapping[str, Any], all_rows: bool) -> Any:
        raw = await conn.get_raw_connection()
        driver: asyncpg.Connection = raw.driver_connection
        args = [params[name] for name in self.names]
        try:
            if all_rows:
                return await driver.fetch(self.sql, *args)
            return await driver.fetchval(self.sql, *args)
        except asyncpg.PostgresError as exc:  # the server refused the statement: the session is fine
            raise translate(exc) from exc
        # the session itself may be broken; InternalClientError ("another operation is in progress"): the
        # client's state for it is (seen in a PostgreSQL fast restart, where it had made a POST answer 500)
        except (asyncpg.InterfaceError, asyncpg.InternalClientError, OSError, TimeoutError) as exc:
            await conn.invalidate()
            raise translate(exc) from exc


async def read_all(engine: AsyncEngine, query: Any) -> Sequence[Any]:
    """The rows of one read-only query, on a pooled connection."""
    async with translated(), engine.connect() as conn:
        return (await conn.execute(query)).all()


async def driver_read(engine: AsyncEngine, statement: DriverStatement, params: Mapping[str, Any]) -> list[Any]:
    """``read_all`` for a PostgreSQL ``DriverStatement``: asyncpg records, and no BEGIN/ROLLBACK around it."""
    async with translated(), engine.connect() as conn:
        return await statement.fetch(conn, params)


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
