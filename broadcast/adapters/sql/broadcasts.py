"""The SQL ``BroadcastStore``: broadcasts, recipients' rows and outbox rows, each change one transaction.

Large SELECTED audiences go in with ``COPY`` on PostgreSQL (asyncpg ``copy_records_to_table``, inside the
same transaction as the broadcast row) and chunked ``executemany`` on SQLite. The scheduler's leadership
is a PostgreSQL session advisory lock; SQLite is single-process, so an in-process lock stands in for it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import orjson
from sqlalchemy import Row, and_, case, delete, func, insert, or_, select, text, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from broadcast.adapters.sql.engine import read_all, translate, translated
from broadcast.adapters.sql.group_create import GroupCreate
from broadcast.adapters.sql.rows import (
    broadcast_from_row,
    broadcast_row,
    chunks,
    copy_records,
    decode_cursor,
    encode_cursor,
)
from broadcast.adapters.sql.stores import OUTBOX_COLUMNS, outbox_records, utc
from broadcast.adapters.sql.tables import (
    broadcast_messages,
    broadcast_statistics,
    group_reach,
    outbox_events,
    user_broadcast_messages,
    user_numbers,
)
from broadcast.core import reach
from broadcast.core.domain import (
    PRIORITY_HEADER,
    Broadcast,
    BroadcastStats,
    BroadcastStatus,
    Delivery,
    DeliveryStatus,
    EventType,
    OutboxEvent,
    Page,
    ReadStatus,
    TargetType,
)
from broadcast.errors import ConflictError, NotFoundError, ValidationError

log = logging.getLogger(__name__)
_INSERT_BROADCAST = insert(broadcast_messages)
_INSERT_STATISTICS = insert(broadcast_statistics)


COPY_FROM = 64  # rows: below, an INSERT costs less than COPY's set-up (a targeted message's 1 row and 1 event)
# Recipients from which a committed broadcast refreshes the planner's statistics of the tables it filled
# (``_refresh_statistics``). PostgreSQL's advice after a bulk load ("Populating a Database": run ANALYZE
# afterwards): until autovacuum gets to it (a minute or more), the statistics still describe the table before
# the bulk. Measured (bench urgent-under-bulk, auto_explain): with the statistics of a table holding only the
# online users' rows, their pending rows (the reconciler, every 5 s) and the consumer's row lookups were planned
# as sequential scans of the 1M fresh rows, 0.3-0.6 s each, beside the URGENT messages' statements.
ANALYZE_FROM = 10_000
_ANALYZE = text(f"ANALYZE {user_broadcast_messages.name}, {outbox_events.name}")


def _headers_as_text(head: list[tuple[Any, ...]], rest: Iterable[tuple[Any, ...]]) -> Iterator[tuple[Any, ...]]:
    """Outbox records for COPY: the headers column as JSON text, encoded once per distinct headers list (the
    rows of one broadcast share one: ``outbox_records``)."""
    at = OUTBOX_COLUMNS.index("headers")
    texts: dict[int, tuple[object, str]] = {}  # by id, the list kept alive beside its text (no id reuse)
    for r in itertools.chain(head, rest):
        headers = r[at]
        known = texts.get(id(headers))
        if known is None or known[0] is not headers:
            known = texts[id(headers)] = (headers, orjson.dumps(headers).decode())
        yield (*r[:at], known[1], *r[at + 1 :])


def _copying(conn: AsyncConnection, records: Sequence[object]) -> bool:
    """Whether to write ``records`` with COPY (PostgreSQL, and enough of them to pay for it)."""
    return conn.dialect.name == "postgresql" and len(records) >= COPY_FROM


class SqlBroadcastStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._group = GroupCreate(engine)
        self._local_leaders: dict[str, asyncio.Lock] = {}

    # ------------------------------------------------------------------ writes
    async def create(
        self,
        broadcast: Broadcast,
        recipients: Sequence[str],
        events: Iterable[OutboxEvent],
        idempotency_key: str | None,
        request_hash: str,
    ) -> tuple[Broadcast, bool]:
        if self._engine.dialect.name == "postgresql" and len(recipients) < COPY_FROM:
            head = list(itertools.islice(events, COPY_FROM))
            if len(head) < COPY_FROM:  # a targeted message: one statement
                return await self._create_at_once(broadcast, recipients, head, idempotency_key, request_hash)
            events = itertools.chain(head, events)
        try:
            async with self._engine.begin() as conn:
                if idempotency_key is not None:
                    existing = await self._by_key(conn, idempotency_key, request_hash)
                    if existing is not None:
                        return existing, False
                # statements with their parameters apart: one compiled form, cached, for every broadcast
                await conn.execute(_INSERT_BROADCAST, broadcast_row(broadcast, idempotency_key, request_hash))
                stats = {"broadcast_id": broadcast.id, "targeted": broadcast.targeted_count}
                await conn.execute(_INSERT_STATISTICS, {**stats, "updated_at": broadcast.created_at})
                await self._write_recipients(conn, broadcast, recipients)
                await self._write_outbox(conn, events, broadcast.created_at)
        except IntegrityError as exc:
            if idempotency_key is None:
                raise ConflictError("broadcast clashes with an existing one") from exc
            async with self._engine.connect() as conn:  # a concurrent request with the same key won
                existing = await self._by_key(conn, idempotency_key, request_hash)
            if existing is None:
                raise ConflictError("broadcast clashes with an existing one") from exc
            return existing, False
        except (SQLAlchemyError, OSError) as exc:
            raise translate(exc) from exc
        if self._engine.dialect.name == "postgresql" and len(recipients) >= ANALYZE_FROM:
            await self._refresh_statistics()
        return broadcast, True

    async def _refresh_statistics(self) -> None:
        """ANALYZE the recipients' and outbox tables after a bulk (``ANALYZE_FROM``), once committed: a short lock
        of its own (held to the end of a transaction it would make concurrent uploads wait for each other). The
        broadcast is saved whatever happens here: a failure is logged, autovacuum catches up later."""
        try:
            async with self._engine.connect() as conn:
                once = await conn.execution_options(isolation_level="AUTOCOMMIT")
                await once.execute(_ANALYZE)
        except (SQLAlchemyError, OSError) as exc:
            log.warning("could not refresh the planner statistics after a bulk broadcast: %s", exc)

    async def _create_at_once(
        self,
        broadcast: Broadcast,
        recipients: Sequence[str],
        events: Sequence[OutboxEvent],
        idempotency_key: str | None,
        request_hash: str,
    ) -> tuple[Broadcast, bool]:
        """PostgreSQL, a few rows: the broadcast, its statistics, its recipients' rows and its outbox rows in one
        statement, shared with the NORMAL creates beside it (``GroupCreate``), where the transaction of ``create`` costs
        six round trips. An idempotency key already taken inserts nothing: the replay (or the conflict) is then
        read as in ``create``."""
        priority = any(PRIORITY_HEADER in e.headers for e in events[:1])  # HIGH and URGENT: never queued
        if await self._group.create(broadcast, recipients, events, idempotency_key, request_hash, alone=priority):
            return broadcast, True
        async with translated(), self._engine.connect() as conn:
            once = await conn.execution_options(isolation_level="AUTOCOMMIT")
            existing = await self._by_key(once, idempotency_key or "", request_hash)
        if existing is None:
            raise ConflictError("broadcast clashes with an existing one")
        return existing, False

    async def _by_key(self, conn: AsyncConnection, key: str, request_hash: str) -> Broadcast | None:
        row = (
            await conn.execute(select(broadcast_messages).where(broadcast_messages.c.idempotency_key == key))
        ).first()
        if row is None:
            return None
        if row.request_hash != request_hash:
            raise ConflictError("Idempotency-Key was already used for a different request")
        return broadcast_from_row(row)

    async def _write_recipients(self, conn: AsyncConnection, broadcast: Broadcast, user_ids: Sequence[str]) -> None:
        now = broadcast.created_at
        pending, unread = DeliveryStatus.PENDING.value, ReadStatus.UNREAD.value
        columns = ["broadcast_id", "user_id", "delivery_status", "read_status", "created_at", "updated_at"]
        records = ((broadcast.id, u, pending, unread, now, now) for u in user_ids)
        if _copying(conn, user_ids):
            await copy_records(conn, user_broadcast_messages.name, columns, records)
            return
        for batch in chunks(records):
            await conn.execute(insert(user_broadcast_messages), [dict(zip(columns, r, strict=True)) for r in batch])

    async def _write_outbox(self, conn: AsyncConnection, events: Iterable[OutboxEvent], now: datetime) -> None:
        records = outbox_records(events, now)
        head = list(itertools.islice(records, COPY_FROM))
        if _copying(conn, head):
            await copy_records(conn, outbox_events.name, list(OUTBOX_COLUMNS), _headers_as_text(head, records))
            return
        for batch in chunks(itertools.chain(head, records)):
            await conn.execute(insert(outbox_events), [dict(zip(OUTBOX_COLUMNS, r, strict=True)) for r in batch])

    async def transition(
        self,
        broadcast_id: str,
        allowed: frozenset[BroadcastStatus],
        to: BroadcastStatus,
        events: Callable[[Broadcast], Sequence[OutboxEvent]],
        drop_undelivered: bool,
    ) -> Broadcast:
        now = datetime.now(UTC)
        try:
            async with self._engine.begin() as conn:
                query = select(broadcast_messages).where(broadcast_messages.c.id == broadcast_id).with_for_update()
                row = (await conn.execute(query)).first()
                if row is None:
                    raise NotFoundError(f"broadcast {broadcast_id} does not exist")
                current = broadcast_from_row(row)
                if current.status not in allowed:
                    raise ConflictError(f"broadcast {broadcast_id} is {current.status.value}, not {to.value}-able")
                changed_rows = await conn.execute(
                    update(broadcast_messages)
                    .where(
                        broadcast_messages.c.id == broadcast_id,
                        broadcast_messages.c.status.in_([s.value for s in allowed]),
                    )
                    .values(status=to.value, updated_at=now)
                )
                if changed_rows.rowcount != 1:  # SQLite has no FOR UPDATE: another writer got there first
                    raise ConflictError(f"broadcast {broadcast_id} changed concurrently; not {to.value}-able")
                if drop_undelivered:
                    await conn.execute(
                        delete(outbox_events).where(
                            outbox_events.c.broadcast_id == broadcast_id,
                            outbox_events.c.published_at.is_(None),
                            outbox_events.c.event_type == EventType.CREATED.value,
                        )
                    )
                changed = replace(current, status=to, updated_at=now)
                await self._write_outbox(conn, events(changed), now)
                return changed
        except (SQLAlchemyError, OSError) as exc:
            raise translate(exc) from exc

    # ------------------------------------------------------------------ reads
    async def get(self, broadcast_id: str) -> Broadcast | None:
        row = await self._first(select(broadcast_messages).where(broadcast_messages.c.id == broadcast_id))
        return None if row is None else broadcast_from_row(row)

    async def list_broadcasts(self, status: BroadcastStatus | None, cursor: str | None, limit: int) -> Page[Broadcast]:
        b = broadcast_messages.c
        query = select(broadcast_messages).order_by(b.created_at.desc(), b.id.desc()).limit(limit + 1)
        if status is not None:
            query = query.where(b.status == status.value)
        if cursor is not None:
            created_at, last_id = decode_cursor(cursor)
            query = query.where(or_(b.created_at < created_at, and_(b.created_at == created_at, b.id < last_id)))
        rows = await read_all(self._engine, query)
        items = tuple(broadcast_from_row(r) for r in rows[:limit])
        next_cursor = encode_cursor(items[-1]) if len(rows) > limit else None
        return Page(items, next_cursor)

    async def due(self, status: BroadcastStatus, now: datetime, limit: int) -> list[str]:
        b = broadcast_messages.c
        column = b.scheduled_at if status is BroadcastStatus.SCHEDULED else b.expires_at
        query = select(b.id).where(b.status == status.value, column <= now).order_by(column).limit(limit)
        return [r.id for r in await read_all(self._engine, query)]

    async def stats(self, broadcast_id: str) -> BroadcastStats | None:
        broadcast = await self.get(broadcast_id)
        if broadcast is None:
            return None
        # SELECTED rows are written at creation; an ALL/ROLE row only when the user reads it (a read implies a
        # delivery), its other deliveries being tallied in bitmaps (broadcast/core/reach.py)
        u = user_broadcast_messages.c
        query = select(
            func.coalesce(func.sum(case((u.delivery_status == DeliveryStatus.DELIVERED.value, 1), else_=0)), 0),
            func.coalesce(func.sum(case((u.read_status == ReadStatus.READ.value, 1), else_=0)), 0),
            func.coalesce(func.sum(case((u.delivery_status == DeliveryStatus.FAILED.value, 1), else_=0)), 0),
        ).where(u.broadcast_id == broadcast_id)
        row = await self._first(query)
        delivered, read, failed = (int(v) for v in row) if row is not None else (0, 0, 0)
        if broadcast.target_type is not TargetType.SELECTED:
            delivered = await self._group_delivered(broadcast_id)
        # ALL/ROLE: dead-lettered events not redriven yet (the DLT consumer counts them; there are no rows)
        s = broadcast_statistics.c
        dead = await self._first(select(s.failed).where(s.broadcast_id == broadcast_id))
        failed += int(dead[0]) if dead is not None else 0
        return BroadcastStats(broadcast_id, broadcast.targeted_count, delivered, read, failed, broadcast.status)

    async def _group_delivered(self, broadcast_id: str) -> int:
        """The distinct users a group broadcast reached: its tallies' union with the users holding a
        DELIVERED row (readers, and deliveries recorded as rows before the tallies), each user once."""
        u, n, g = user_broadcast_messages.c, user_numbers.c, group_reach.c
        tallies = await read_all(self._engine, select(g.users).where(g.broadcast_id == broadcast_id))
        holders = await read_all(
            self._engine,
            select(n.number)
            .select_from(user_broadcast_messages.outerjoin(user_numbers, n.user_id == u.user_id))
            .where(u.broadcast_id == broadcast_id, u.delivery_status == DeliveryStatus.DELIVERED.value),
        )
        numbered = [int(h.number) for h in holders if h.number is not None]
        return len(reach.union((t.users for t in tallies), numbered)) + len(holders) - len(numbered)

    async def deliveries(self, broadcast_id: str, cursor: str | None, limit: int) -> Page[Delivery]:
        u = user_broadcast_messages.c
        query = select(user_broadcast_messages).where(u.broadcast_id == broadcast_id).order_by(u.id).limit(limit + 1)
        if cursor is not None:
            if not (cursor.isascii() and cursor.isdigit()) or len(cursor) > 18:
                raise ValidationError("invalid cursor")
            query = query.where(u.id > int(cursor))
        rows = await read_all(self._engine, query)
        items = tuple(
            Delivery(
                r.user_id,
                DeliveryStatus(r.delivery_status),
                ReadStatus(r.read_status),
                utc(r.delivered_at) if r.delivered_at else None,
                utc(r.read_at) if r.read_at else None,
            )
            for r in rows[:limit]
        )
        return Page(items, str(rows[limit - 1].id) if len(rows) > limit else None)

    @asynccontextmanager
    async def leadership(self, name: str) -> AsyncIterator[bool]:
        if self._engine.dialect.name != "postgresql":
            lock = self._local_leaders.setdefault(name, asyncio.Lock())
            if lock.locked():
                yield False
                return
            async with lock:
                yield True
            return
        try:
            async with self._engine.connect() as conn:
                got = bool(
                    (await conn.execute(text("SELECT pg_try_advisory_lock(hashtext(:n))"), {"n": name})).scalar()
                )
                try:
                    yield got
                finally:
                    if got:
                        await conn.execute(text("SELECT pg_advisory_unlock(hashtext(:n))"), {"n": name})
        except (SQLAlchemyError, OSError) as exc:
            raise translate(exc) from exc

    async def _first(self, query: Any) -> Row[Any] | None:
        try:
            async with self._engine.connect() as conn:
                return (await conn.execute(query)).first()
        except (SQLAlchemyError, OSError) as exc:
            raise translate(exc) from exc
