"""SQL adapters for the database ports (PostgreSQL and SQLite through one SQLAlchemy Core code path).

Outbox claims are leases written in a short transaction of their own (``FOR UPDATE SKIP LOCKED`` on
PostgreSQL; SQLite serialises writers), so no row lock is held while a relay awaits Kafka.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from sqlalchemy import (
    BigInteger,
    Text,
    any_,
    bindparam,
    cast,
    delete,
    func,
    insert,
    select,
    text,
    true,
    union_all,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from broadcast.adapters.sql import outbox_pg as sql_outbox_pg
from broadcast.adapters.sql.engine import DriverStatement, translate
from broadcast.adapters.sql.tables import outbox_dead, outbox_events, outbox_lanes, user_roles, users
from broadcast.core.domain import ClaimedOutboxEvent, DeadOutboxRow, EventType, OutboxEvent, User, outbox_lane
from broadcast.observability.loops import LOOP_SLICE, hand_back


def utc(value: datetime) -> datetime:
    """SQLite hands back naive datetimes; everything we store is UTC."""
    return value if value.tzinfo else value.replace(tzinfo=UTC)


GET_CHUNK = 500  # users per lookup
# ``get_many`` on PostgreSQL, on the driver (read at every batch of connects whose users are not cached)
_PG_USERS = DriverStatement.of(
    text(
        "SELECT u.id, u.display_name, r.role FROM users u LEFT JOIN user_roles r ON r.user_id = u.id"
        " WHERE u.id = ANY(CAST(:ids AS varchar[]))"
    )
)


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
                stmt = dialect_insert(conn)(users).values(rows)
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
            raise translate(exc) from exc

    async def get(self, user_id: str) -> User | None:
        return (await self.get_many([user_id]))[user_id]

    async def get_many(self, user_ids: Sequence[str]) -> dict[str, User | None]:
        wanted = list(dict.fromkeys(user_ids))
        rows_of: dict[str, list[Any]] = {}
        try:
            async with self._engine.connect() as conn:
                for start in range(0, len(wanted), GET_CHUNK):
                    chunk = wanted[start : start + GET_CHUNK]
                    if conn.dialect.name == "postgresql":
                        rows = await _PG_USERS.fetch(conn, {"ids": chunk})
                    else:
                        query = (
                            select(users.c.id, users.c.display_name, user_roles.c.role)
                            .outerjoin(user_roles, user_roles.c.user_id == users.c.id)
                            .where(users.c.id.in_(chunk))
                        )
                        rows = list(await conn.execute(query))
                    for row in rows:  # id, display name, role (by position: a row or a driver record)
                        rows_of.setdefault(row[0], []).append(row)
        except (SQLAlchemyError, OSError) as exc:
            raise translate(exc) from exc
        found: dict[str, User | None] = dict.fromkeys(wanted)
        for user_id, rows in rows_of.items():
            found[user_id] = User(user_id, rows[0][1], frozenset(r[2] for r in rows if r[2] is not None))
        return found

    async def count(self, roles: Sequence[str] | None = None) -> int:
        query = (
            select(func.count()).select_from(users)
            if roles is None
            else select(func.count(func.distinct(user_roles.c.user_id))).where(user_roles.c.role.in_(list(roles)))
        )
        try:
            async with self._engine.connect() as conn:
                return int((await conn.execute(query)).scalar_one())
        except (SQLAlchemyError, OSError) as exc:
            raise translate(exc) from exc


class SqlOutboxStore:
    """The transactional outbox, worked lane by lane (see ``ports.OutboxStore``)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    async def append(self, events: Sequence[OutboxEvent]) -> list[int]:
        try:
            async with self._engine.begin() as conn:
                return await append_outbox(conn, events)
        except (SQLAlchemyError, OSError) as exc:
            raise translate(exc) from exc

    async def claim_lanes(
        self, owner: str, max_lanes: int, lease: timedelta, among: Sequence[int] | None = None
    ) -> list[int]:
        try:
            async with self._engine.begin() as conn:
                return await self._claim_lanes(conn, owner, max_lanes, lease, among)
        except (SQLAlchemyError, OSError) as exc:
            raise translate(exc) from exc

    async def claim(
        self, owner: str, max_lanes: int, lease: timedelta, limit: int, among: Sequence[int] | None = None
    ) -> dict[int, list[ClaimedOutboxEvent]]:
        """``claim_lanes`` and the due rows of every lane it got: on PostgreSQL one statement
        (``sql_outbox_pg.CLAIM``), elsewhere one transaction of two."""
        if self._engine.dialect.name == "postgresql":
            return await self._claim_at_once(owner, max_lanes, lease, limit, among)
        try:
            async with self._engine.begin() as conn:
                lanes = await self._claim_lanes(conn, owner, max_lanes, lease, among)
                rows = await self._due_rows(conn, lanes, limit) if lanes else []
        except (SQLAlchemyError, OSError) as exc:
            raise translate(exc) from exc
        return await _claimed(rows, lanes)  # after the commit: the lane rows' locks are gone

    async def _claim_at_once(
        self, owner: str, max_lanes: int, lease: timedelta, limit: int, among: Sequence[int] | None
    ) -> dict[int, list[ClaimedOutboxEvent]]:
        now = datetime.now(UTC)
        params = {
            "now": now,
            "until": now + lease,
            "owner": owner,
            "among": None if among is None else list(among),
            "max_lanes": max_lanes,
            "lim": limit,
        }
        try:
            async with self._engine.connect() as conn:
                found = await sql_outbox_pg.CLAIM.fetch(conn, params)
        except (SQLAlchemyError, OSError) as exc:
            raise translate(exc) from exc
        last = CLAIMED_COLUMNS  # the claimed lane, after the row's own columns
        lanes = sorted({int(r[last]) for r in found})  # a lane whose rows stopped being due: no row
        return await _claimed([r for r in found if r[1] is not None], lanes)

    async def _claim_lanes(
        self, conn: AsyncConnection, owner: str, max_lanes: int, lease: timedelta, among: Sequence[int] | None
    ) -> list[int]:
        now = datetime.now(UTC)
        due = outbox_events.c.not_before.is_(None) | (outbox_events.c.not_before <= now)
        has_work = (
            select(outbox_events.c.id)
            .where(outbox_events.c.lane == outbox_lanes.c.lane, outbox_events.c.published_at.is_(None), due)
            .exists()
        )
        free = (
            select(outbox_lanes.c.lane)
            .where(
                outbox_lanes.c.owner.is_(None) | (outbox_lanes.c.lease_until < now) | (outbox_lanes.c.owner == owner)
            )
            .where(has_work)
            .where(outbox_lanes.c.lane.in_(list(among)) if among is not None else true())
            .order_by(outbox_lanes.c.lease_until.asc().nulls_first(), outbox_lanes.c.lane)
            .limit(max_lanes)
            .with_for_update(skip_locked=True)
        )
        stmt = (
            update(outbox_lanes)
            .where(outbox_lanes.c.lane.in_(free.scalar_subquery()))
            .values(owner=owner, lease_until=now + lease)
            .returning(outbox_lanes.c.lane)
        )
        return sorted(int(lane) for lane in (await conn.execute(stmt)).scalars())

    async def release_lanes(self, owner: str, lanes: Sequence[int]) -> None:
        if lanes:
            await self._execute(self._release(owner, lanes))

    @staticmethod
    def _release(owner: str, lanes: Sequence[int]) -> Any:
        return (
            update(outbox_lanes)
            .where(outbox_lanes.c.lane.in_(list(lanes)), outbox_lanes.c.owner == owner)
            .values(owner=None, lease_until=datetime.now(UTC))
        )

    async def finish(self, owner: str, lanes: Sequence[int], published: Sequence[int]) -> None:
        """``mark_published(published)`` and ``release_lanes(owner, lanes)`` atomically: on PostgreSQL one
        statement (``sql_outbox_pg.FINISH``), elsewhere one transaction."""
        try:
            if self._engine.dialect.name == "postgresql":
                params = {"now": datetime.now(UTC), "ids": list(published), "lanes": list(lanes), "owner": owner}
                async with self._engine.connect() as conn:
                    await sql_outbox_pg.FINISH.fetchval(conn, params)
                return
            async with self._engine.begin() as conn:
                if published:
                    await conn.execute(self._mark(published))
                if lanes:
                    await conn.execute(self._release(owner, lanes))
        except (SQLAlchemyError, OSError) as exc:
            raise translate(exc) from exc

    async def due(self, lane: int, limit: int) -> list[ClaimedOutboxEvent]:
        try:
            async with self._engine.connect() as conn:
                rows = await self._due_rows(conn, [lane], limit)
        except (SQLAlchemyError, OSError) as exc:
            raise translate(exc) from exc
        return (await _claimed(rows, [lane]))[lane]

    @staticmethod
    async def _due_rows(conn: AsyncConnection, lanes: Sequence[int], limit: int) -> Sequence[Any]:
        """The oldest ``limit`` due rows of each lane, in id order: one statement, a ``UNION ALL`` of one
        index range per lane (``ix_outbox_events_unpublished``), whatever the backlog behind them."""
        now = datetime.now(UTC)
        o = outbox_events.c
        parts = [
            select(o.lane, o.id, o.topic, o.partition_key, o.event_type, o.payload)
            .add_columns(cast(o.headers, Text).label("headers"), o.broadcast_id, o.not_before, o.created_at)
            .add_columns(o.attempts, o.poison_attempts)
            .where(o.lane == lane, o.published_at.is_(None))
            .where(o.not_before.is_(None) | (o.not_before <= now))
            .order_by(o.id)
            .limit(limit)
            .subquery()
            for lane in lanes
        ]
        query: Any = select(parts[0]) if len(parts) == 1 else union_all(*(select(part) for part in parts))
        return (await conn.execute(query)).all()

    async def mark_published(self, ids: Sequence[int]) -> None:
        if ids:
            await self._execute(self._mark(ids))

    def _mark(self, ids: Sequence[int]) -> Any:
        return update(outbox_events).where(self._ids_match(ids)).values(published_at=datetime.now(UTC))

    def _ids_match(self, ids: Sequence[int]) -> Any:
        """``id IN (...)``; on PostgreSQL one array parameter (``= ANY``) instead of a bind per id."""
        if self._engine.dialect.name == "postgresql":
            return outbox_events.c.id == any_(bindparam("ids", list(ids), type_=postgresql.ARRAY(BigInteger)))
        return outbox_events.c.id.in_(list(ids))

    async def record_failure(self, ids: Sequence[int], error: str, poison: bool = False) -> None:
        if ids:
            o = outbox_events.c
            stmt = (
                update(outbox_events)
                .where(self._ids_match(ids))
                .values(
                    attempts=o.attempts + 1, poison_attempts=o.poison_attempts + int(poison), last_error=error[:2000]
                )
            )
            await self._execute(stmt)

    async def bury(self, ids: Sequence[int]) -> int:
        if not ids:
            return 0
        o = outbox_events.c
        moved = select(
            o.id, o.topic, o.partition_key, o.event_type, o.payload, o.headers, o.broadcast_id, o.attempts,
            o.last_error, o.created_at,
        ).where(o.id.in_(list(ids)))  # fmt: skip
        columns = ["outbox_id", "topic", "partition_key", "event_type", "payload", "headers", "broadcast_id"]
        columns += ["attempts", "last_error", "created_at"]
        try:
            async with self._engine.begin() as conn:
                await conn.execute(insert(outbox_dead).from_select(columns, moved))
                return int((await conn.execute(delete(outbox_events).where(o.id.in_(list(ids))))).rowcount)
        except (SQLAlchemyError, OSError) as exc:
            raise translate(exc) from exc

    async def dead(self, limit: int, before_id: int | None = None) -> list[DeadOutboxRow]:
        d = outbox_dead.c
        query = select(outbox_dead, cast(d.headers, Text).label("headers_text")).order_by(d.id.desc()).limit(limit)
        if before_id is not None:
            query = query.where(d.id < before_id)
        try:
            async with self._engine.connect() as conn:
                rows = (await conn.execute(query)).all()
        except (SQLAlchemyError, OSError) as exc:
            raise translate(exc) from exc
        return [_dead_row(r) for r in rows]

    async def dead_count(self) -> int:
        try:
            async with self._engine.connect() as conn:
                return int((await conn.execute(select(func.count()).select_from(outbox_dead))).scalar_one())
        except (SQLAlchemyError, OSError) as exc:
            raise translate(exc) from exc

    async def redrive_dead(self, dead_id: int) -> int | None:
        d = outbox_dead.c
        query = select(outbox_dead, cast(d.headers, Text).label("headers_text")).where(d.id == dead_id)
        try:
            async with self._engine.begin() as conn:
                row = (await conn.execute(query)).first()
                if row is None:
                    return None
                [new_id] = await append_outbox(conn, [_dead_row(row).event])
                await conn.execute(delete(outbox_dead).where(d.id == dead_id))
                return new_id
        except (SQLAlchemyError, OSError) as exc:
            raise translate(exc) from exc

    async def purge_dead(self, dead_id: int) -> bool:
        try:
            async with self._engine.begin() as conn:
                return bool((await conn.execute(delete(outbox_dead).where(outbox_dead.c.id == dead_id))).rowcount)
        except (SQLAlchemyError, OSError) as exc:
            raise translate(exc) from exc

    async def purge_published(self, older_than: timedelta, limit: int) -> int:
        cutoff = datetime.now(UTC) - older_than
        batch = select(outbox_events.c.id).where(outbox_events.c.published_at < cutoff).limit(limit)
        stmt = delete(outbox_events).where(outbox_events.c.id.in_(batch.scalar_subquery()))
        try:
            async with self._engine.begin() as conn:
                return int((await conn.execute(stmt)).rowcount)
        except (SQLAlchemyError, OSError) as exc:
            raise translate(exc) from exc

    async def backlog(self) -> int:
        query = select(func.count()).select_from(outbox_events).where(outbox_events.c.published_at.is_(None))
        try:
            async with self._engine.connect() as conn:
                return int((await conn.execute(query)).scalar_one())
        except (SQLAlchemyError, OSError) as exc:
            raise translate(exc) from exc

    async def oldest_unpublished(self) -> datetime | None:
        o, now = outbox_events.c, datetime.now(UTC)
        query = (
            select(func.min(func.coalesce(o.not_before, o.created_at), type_=o.created_at.type))
            .where(o.published_at.is_(None))
            .where(o.not_before.is_(None) | (o.not_before <= now))
        )
        try:
            async with self._engine.connect() as conn:
                oldest = (await conn.execute(query)).scalar_one()
        except (SQLAlchemyError, OSError) as exc:
            raise translate(exc) from exc
        return utc(oldest) if oldest is not None else None

    async def _execute(self, stmt: Any) -> None:
        try:
            async with self._engine.begin() as conn:
                await conn.execute(stmt)
        except (SQLAlchemyError, OSError) as exc:
            raise translate(exc) from exc


async def _claimed(rows: Sequence[Any], lanes: Sequence[int]) -> dict[int, list[ClaimedOutboxEvent]]:
    """Claimed rows as events per lane, in id order; the loop handed back as it goes. A row's first
    ``CLAIMED_COLUMNS`` columns, by position (as ``_due_rows`` and ``sql_outbox_pg.CLAIM`` select them): a
    bulk claim converts 100k rows here, and positional unpacking costs a fraction of 13 attribute reads."""
    headers: dict[str, tuple[tuple[str, bytes], ...]] = {}
    types = {t.value: t for t in EventType}
    found: dict[int, list[ClaimedOutboxEvent]] = {lane: [] for lane in lanes}
    for n, r in enumerate(sorted(rows, key=_ROW_ID), 1):
        if n % LOOP_SLICE == 0:
            await hand_back(n)
        lane, row_id, topic, key, event_type, payload, head, broadcast_id, not_before, created, attempts, poison = r[
            :CLAIMED_COLUMNS
        ]
        event = OutboxEvent(
            topic,
            key,
            types[event_type],
            payload if type(payload) is bytes else bytes(payload),
            decode_headers(head, headers),
            broadcast_id,
            utc(not_before) if not_before else None,
        )
        found[lane].append(ClaimedOutboxEvent(row_id, event, utc(created), attempts, poison))
    return found


CLAIMED_COLUMNS = 12  # lane, id, topic, key, type, payload, headers, broadcast id, not_before, created, attempts x2
_ROW_ID = operator.itemgetter(1)


def _dead_row(r: Any) -> DeadOutboxRow:
    event = OutboxEvent(
        r.topic, r.partition_key, EventType(r.event_type), bytes(r.payload), decode_headers(r.headers_text, {}),
        r.broadcast_id,
    )  # fmt: skip
    return DeadOutboxRow(r.id, r.outbox_id, event, r.attempts, r.last_error, utc(r.created_at), utc(r.dead_at))


OUTBOX_COLUMNS = (
    "lane",
    "topic",
    "partition_key",
    "event_type",
    "payload",
    "headers",
    "broadcast_id",
    "not_before",
    "created_at",
)


def outbox_records(events: Iterable[OutboxEvent], now: datetime) -> Iterator[tuple[Any, ...]]:
    """Outbox rows as tuples in ``OUTBOX_COLUMNS`` order; headers as a JSON list, encoded once per distinct set.

    The per-recipient events of one broadcast share one headers tuple, so the cache keeps this O(1) per row.
    """
    encoded: dict[tuple[tuple[str, bytes], ...], list[list[str]]] = {}
    for e in events:
        headers = encoded.get(e.headers)
        if headers is None:
            headers = encoded[e.headers] = [[k, v.decode("latin-1")] for k, v in e.headers]
        yield (
            outbox_lane(e.key, e.headers),
            e.topic,
            e.key,
            e.event_type.value,
            e.payload,
            headers,
            e.broadcast_id,
            e.not_before,
            now,
        )


def decode_headers(raw: Any, cache: dict[str, tuple[tuple[str, bytes], ...]]) -> tuple[tuple[str, bytes], ...]:
    """The inverse of the JSON headers column (given as text), memoised per distinct value."""
    text_value = raw if isinstance(raw, str) else orjson.dumps(raw).decode()
    headers = cache.get(text_value)
    if headers is None:
        headers = cache[text_value] = tuple((k, v.encode("latin-1")) for k, v in orjson.loads(text_value))
    return headers


async def append_outbox(conn: AsyncConnection, events: Sequence[OutboxEvent]) -> list[int]:
    """Insert outbox rows inside the caller's transaction (the lifecycle service's one write)."""
    if not events:
        return []
    now = datetime.now(UTC)
    rows = [dict(zip(OUTBOX_COLUMNS, r, strict=True)) for r in outbox_records(events, now)]
    result = await conn.execute(insert(outbox_events).returning(outbox_events.c.id), rows)
    return sorted(int(i) for i in result.scalars())


def dialect_insert(conn: AsyncConnection) -> Any:
    """The dialect's ``insert`` (with ``on_conflict_do_*``) for the connection's database."""
    return postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
