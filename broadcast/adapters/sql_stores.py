"""SQL adapters for the database ports (PostgreSQL and SQLite through one SQLAlchemy Core code path).

Outbox claims are leases written in a short transaction of their own (``FOR UPDATE SKIP LOCKED`` on
PostgreSQL; SQLite serialises writers), so no row lock is held while a relay awaits Kafka.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from broadcast.adapters.sql_tables import outbox_events, user_roles, users
from broadcast.domain import ClaimedOutboxEvent, EventType, OutboxEvent, User
from broadcast.errors import UnavailableError


def utc(value: datetime) -> datetime:
    """SQLite hands back naive datetimes; everything we store is UTC."""
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _translate(exc: Exception) -> UnavailableError:
    return UnavailableError(f"database error: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")


class SqlUserStore:
    """Users and roles in ``users`` / ``user_roles``."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    async def upsert(self, batch: Sequence[User]) -> None:
        if not batch:
            return
        now = datetime.now(UTC)
        rows = [{"id": u.id, "display_name": u.display_name, "created_at": now, "updated_at": now} for u in batch]
        ids = [u.id for u in batch]
        roles = [{"user_id": u.id, "role": r} for u in batch for r in sorted(u.roles)]
        try:
            async with self._engine.begin() as conn:
                stmt = _insert(conn)(users).values(rows)
                await conn.execute(
                    stmt.on_conflict_do_update(
                        index_elements=[users.c.id],
                        set_={"display_name": stmt.excluded.display_name, "updated_at": now},
                    )
                )
                await conn.execute(delete(user_roles).where(user_roles.c.user_id.in_(ids)))
                if roles:
                    await conn.execute(insert(user_roles), roles)
        except (SQLAlchemyError, OSError) as exc:
            raise _translate(exc) from exc

    async def get(self, user_id: str) -> User | None:
        try:
            async with self._engine.connect() as conn:
                row = (await conn.execute(select(users).where(users.c.id == user_id))).first()
                if row is None:
                    return None
                roles = (await conn.execute(select(user_roles.c.role).where(user_roles.c.user_id == user_id))).scalars()
                return User(row.id, row.display_name, frozenset(roles))
        except (SQLAlchemyError, OSError) as exc:
            raise _translate(exc) from exc

    async def count(self, role: str | None = None) -> int:
        query = (
            select(func.count()).select_from(users)
            if role is None
            else select(func.count()).select_from(user_roles).where(user_roles.c.role == role)
        )
        try:
            async with self._engine.connect() as conn:
                return int((await conn.execute(query)).scalar_one())
        except (SQLAlchemyError, OSError) as exc:
            raise _translate(exc) from exc


class SqlOutboxStore:
    """The transactional outbox table, claimed by leases."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    async def append(self, events: Sequence[OutboxEvent]) -> list[int]:
        try:
            async with self._engine.begin() as conn:
                return await append_outbox(conn, events)
        except (SQLAlchemyError, OSError) as exc:
            raise _translate(exc) from exc

    async def claim(self, limit: int, lease: timedelta) -> list[ClaimedOutboxEvent]:
        now = datetime.now(UTC)
        free = (
            select(outbox_events.c.id)
            .where(outbox_events.c.published_at.is_(None))
            .where((outbox_events.c.claimed_until.is_(None)) | (outbox_events.c.claimed_until < now))
            .order_by(outbox_events.c.id)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        stmt = (
            update(outbox_events)
            .where(outbox_events.c.id.in_(free.scalar_subquery()))
            .values(claimed_until=now + lease, attempts=outbox_events.c.attempts + 1)
            .returning(*outbox_events.c)
        )
        try:
            async with self._engine.begin() as conn:
                rows = (await conn.execute(stmt)).all()
        except (SQLAlchemyError, OSError) as exc:
            raise _translate(exc) from exc
        claimed = [
            ClaimedOutboxEvent(
                id=r.id,
                event=OutboxEvent(
                    r.topic,
                    r.partition_key,
                    EventType(r.event_type),
                    bytes(r.payload),
                    tuple((k, v.encode("latin-1")) for k, v in r.headers),
                ),
                created_at=utc(r.created_at),
                attempts=r.attempts,
            )
            for r in rows
        ]
        return sorted(claimed, key=lambda c: c.id)

    async def mark_published(self, ids: Sequence[int]) -> None:
        await self._update(ids, published_at=datetime.now(UTC), claimed_until=None)

    async def release(self, ids: Sequence[int], error: str) -> None:
        await self._update(ids, claimed_until=None, last_error=error[:2000])

    async def backlog(self) -> int:
        query = select(func.count()).select_from(outbox_events).where(outbox_events.c.published_at.is_(None))
        try:
            async with self._engine.connect() as conn:
                return int((await conn.execute(query)).scalar_one())
        except (SQLAlchemyError, OSError) as exc:
            raise _translate(exc) from exc

    async def _update(self, ids: Sequence[int], **values: Any) -> None:
        if not ids:
            return
        try:
            async with self._engine.begin() as conn:
                await conn.execute(update(outbox_events).where(outbox_events.c.id.in_(list(ids))).values(**values))
        except (SQLAlchemyError, DBAPIError, OSError) as exc:
            raise _translate(exc) from exc


async def append_outbox(conn: AsyncConnection, events: Sequence[OutboxEvent]) -> list[int]:
    """Insert outbox rows inside the caller's transaction (the lifecycle service's one write)."""
    if not events:
        return []
    rows = [
        {
            "topic": e.topic,
            "partition_key": e.key,
            "event_type": e.event_type.value,
            "payload": e.payload,
            "headers": [[k, v.decode("latin-1")] for k, v in e.headers],
            "created_at": datetime.now(UTC),
        }
        for e in events
    ]
    result = await conn.execute(insert(outbox_events).returning(outbox_events.c.id), rows)
    return sorted(int(i) for i in result.scalars())


def _insert(conn: AsyncConnection) -> Any:
    return postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
