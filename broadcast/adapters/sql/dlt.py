"""SQL adapters of the dead-letter store and the fault drills (``broadcast/core/dead_letters.py``): PostgreSQL,
SQLite.

Every write that changes more than one table is one transaction; no Kafka await happens in here.
Text columns get NUL characters replaced (PostgreSQL text cannot hold them, and a dead letter may quote
any bytes); the record's key and value are stored as the original bytes.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import and_, delete, func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from broadcast.adapters.sql.engine import read_all, translated
from broadcast.adapters.sql.stores import append_outbox, decode_headers, dialect_insert, utc
from broadcast.adapters.sql.tables import (
    broadcast_messages,
    broadcast_statistics,
    dlt_audit,
    dlt_messages,
    fault_drills,
    user_broadcast_messages,
)
from broadcast.core.dead_letters import AuditEntry, DeadLetter, DeadLetterFilter, DeadLetterStatus, Drill, SummaryRow
from broadcast.core.domain import DeliveryStatus, OutboxEvent, Page, TargetType

d = dlt_messages.c


def _clean(text: str | None) -> str | None:
    return None if text is None else text.replace("\x00", "\ufffd")


def _letter_row(letter: DeadLetter) -> dict[str, Any]:
    return {
        "dlt_topic": letter.dlt_topic,
        "dlt_partition": letter.dlt_partition,
        "dlt_offset": letter.dlt_offset,
        "original_topic": _clean(letter.original_topic),
        "original_partition": letter.original_partition,
        "original_offset": letter.original_offset,
        "original_timestamp": letter.original_timestamp,
        "record_key": letter.key,
        "record_value": letter.value,
        "headers": [[k, v.decode("latin-1")] for k, v in letter.headers],
        "exception_fqcn": _clean(letter.exception_fqcn),
        "exception_cause_fqcn": _clean(letter.exception_cause_fqcn),
        "exception_message": _clean(letter.exception_message),
        "stacktrace": _clean(letter.stacktrace),
        "consumer_group": _clean(letter.consumer_group),
        "broadcast_id": letter.broadcast_id,
        "user_id": _clean(letter.user_id),
        "event_type": letter.event_type,
        "status": DeadLetterStatus.NEW.value,
        "received_at": datetime.now(UTC),
    }


def _letter(r: Any) -> DeadLetter:
    return DeadLetter(
        id=int(r.id),
        dlt_topic=r.dlt_topic,
        dlt_partition=int(r.dlt_partition),
        dlt_offset=int(r.dlt_offset),
        original_topic=r.original_topic,
        original_partition=r.original_partition,
        original_offset=r.original_offset,
        original_timestamp=utc(r.original_timestamp) if r.original_timestamp else None,
        key=r.record_key,
        value=r.record_value,
        headers=decode_headers(r.headers, {}),
        exception_fqcn=r.exception_fqcn,
        exception_cause_fqcn=r.exception_cause_fqcn,
        exception_message=r.exception_message,
        stacktrace=r.stacktrace,
        consumer_group=r.consumer_group,
        broadcast_id=r.broadcast_id,
        user_id=r.user_id,
        event_type=r.event_type,
        status=DeadLetterStatus(r.status),
        received_at=utc(r.received_at),
    )


def _where(f: DeadLetterFilter) -> Any:
    clauses = []
    if f.original_topic is not None:
        clauses.append(d.original_topic == f.original_topic)
    if f.exception_fqcn is not None:
        clauses.append(d.exception_fqcn == f.exception_fqcn)
    if f.broadcast_id is not None:
        clauses.append(d.broadcast_id == f.broadcast_id)
    if f.received_from is not None:
        clauses.append(d.received_at >= f.received_from)
    if f.received_to is not None:
        clauses.append(d.received_at < f.received_to)
    if f.status is not None:
        clauses.append(d.status == f.status.value)
    return and_(True, *clauses)


class SqlDeadLetterStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    async def save(self, letter: DeadLetter) -> bool:
        async with translated(), self._engine.begin() as conn:
            stmt = dialect_insert(conn)(dlt_messages).values(_letter_row(letter))
            stmt = stmt.on_conflict_do_nothing()  # either unique key: same DLT position, or same failed record
            inserted = bool((await conn.execute(stmt)).rowcount == 1)
            if inserted:
                await _mark_failed(conn, letter, True)
            return inserted

    async def get(self, letter_id: int) -> DeadLetter | None:
        rows = await read_all(self._engine, select(dlt_messages).where(d.id == letter_id))
        return _letter(rows[0]) if rows else None

    async def page(self, where: DeadLetterFilter, cursor: int | None, limit: int) -> Page[DeadLetter]:
        query = select(dlt_messages).where(_where(where)).order_by(d.id.desc()).limit(limit + 1)
        if cursor is not None:
            query = query.where(d.id < cursor)
        rows = await read_all(self._engine, query)
        items = tuple(_letter(r) for r in rows[:limit])
        return Page(items, str(items[-1].id) if len(rows) > limit else None)

    async def batch(self, where: DeadLetterFilter, after_id: int, limit: int) -> list[DeadLetter]:
        query = select(dlt_messages).where(_where(where), d.id > after_id).order_by(d.id).limit(limit)
        return [_letter(r) for r in await read_all(self._engine, query)]

    async def summary(self, where: DeadLetterFilter) -> list[SummaryRow]:
        query = (
            select(d.original_topic, d.exception_fqcn, func.count(), func.max(d.received_at))
            .where(_where(where))
            .group_by(d.original_topic, d.exception_fqcn)
            .order_by(func.count().desc(), d.original_topic, d.exception_fqcn)
        )
        return [
            SummaryRow(r[0], r[1], int(r[2]), utc(r[3]) if r[3] else None) for r in await read_all(self._engine, query)
        ]

    async def count_by_status(self) -> dict[str, int]:
        query = select(d.status, func.count()).group_by(d.status)
        counts = dict.fromkeys((s.value for s in DeadLetterStatus), 0)
        counts.update({str(r[0]): int(r[1]) for r in await read_all(self._engine, query)})
        return counts

    async def redrive(self, letter: DeadLetter, event: OutboxEvent, actor: str) -> bool:
        assert letter.id is not None
        async with translated(), self._engine.begin() as conn:
            moved = await conn.execute(
                update(dlt_messages)
                .where(d.id == letter.id, d.status == DeadLetterStatus.NEW.value)
                .values(status=DeadLetterStatus.REDRIVEN.value)
            )
            redriven = bool(moved.rowcount == 1)
            if redriven:
                await append_outbox(conn, [event])
                await _mark_failed(conn, letter, False)
            outcome = "REDRIVEN" if redriven else "ALREADY_REDRIVEN"
            await conn.execute(insert(dlt_audit), [_audit_row(actor, "REDRIVE", letter.id, outcome, {})])
            return redriven

    async def delete(self, letter_ids: Sequence[int], actor: str, action: str) -> int:
        if not letter_ids:
            return 0
        async with translated(), self._engine.begin() as conn:
            deleted = await conn.execute(delete(dlt_messages).where(d.id.in_(list(letter_ids))))
            await conn.execute(insert(dlt_audit), [_audit_row(actor, action, i, "DELETED", {}) for i in letter_ids])
            return int(deleted.rowcount)

    async def audit(
        self, actor: str, action: str, letter_id: int | None, outcome: str, detail: dict[str, object]
    ) -> None:
        async with translated(), self._engine.begin() as conn:
            await conn.execute(insert(dlt_audit), [_audit_row(actor, action, letter_id, outcome, detail)])

    async def audit_trail(self, letter_id: int) -> list[AuditEntry]:
        a = dlt_audit.c
        rows = await read_all(self._engine, select(dlt_audit).where(a.dlt_message_id == letter_id).order_by(a.id))
        return [AuditEntry(utc(r.at), r.actor, r.action, r.dlt_message_id, r.outcome, dict(r.detail)) for r in rows]


def _audit_row(
    actor: str, action: str, letter_id: int | None, outcome: str, detail: dict[str, object]
) -> dict[str, Any]:
    return {
        "at": datetime.now(UTC),
        "actor": actor,
        "action": action,
        "dlt_message_id": letter_id,
        "outcome": outcome,
        "detail": detail,
    }


async def _mark_failed(conn: AsyncConnection, letter: DeadLetter, failed: bool) -> None:
    """Mark the delivery a dead letter stands for as failed (``save``), or pending again (``redrive``):
    the user's row of a SELECTED broadcast PENDING <-> FAILED, the ``failed`` counter of an ALL/ROLE one."""
    if letter.broadcast_id is None or letter.event_type != "CREATED":
        return
    b, now = broadcast_messages.c, datetime.now(UTC)
    target = (await conn.execute(select(b.target_type).where(b.id == letter.broadcast_id))).scalar_one_or_none()
    if target == TargetType.SELECTED.value and letter.user_id is not None:
        u = user_broadcast_messages.c
        old, new = (
            (DeliveryStatus.PENDING, DeliveryStatus.FAILED)
            if failed
            else (DeliveryStatus.FAILED, DeliveryStatus.PENDING)
        )
        await conn.execute(
            update(user_broadcast_messages)
            .where(u.broadcast_id == letter.broadcast_id, u.user_id == letter.user_id, u.delivery_status == old.value)
            .values(delivery_status=new.value, updated_at=now)
        )
    elif target is not None and target != TargetType.SELECTED.value:
        s = broadcast_statistics.c
        step = 1 if failed else -1
        await conn.execute(
            update(broadcast_statistics)
            .where(s.broadcast_id == letter.broadcast_id, s.failed + step >= 0)
            .values(failed=s.failed + step, updated_at=now)
        )


class SqlDrillStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    async def arm(
        self, actor: str, broadcast_id: str | None, expires_at: datetime, fail_redrives: bool = False
    ) -> Drill:
        now = datetime.now(UTC)
        row = {
            "broadcast_id": broadcast_id,
            "armed_by": actor,
            "armed_at": now,
            "expires_at": expires_at,
            "fail_redrives": fail_redrives,
        }
        async with translated(), self._engine.begin() as conn:
            drill_id = int((await conn.execute(insert(fault_drills).returning(fault_drills.c.id), [row])).scalar_one())
        return Drill(drill_id, broadcast_id, actor, now, expires_at, fail_redrives)

    async def armed(self, now: datetime) -> list[Drill]:
        f = fault_drills.c
        rows = await read_all(self._engine, select(fault_drills).where(f.expires_at > now).order_by(f.id))
        return [
            Drill(r.id, r.broadcast_id, r.armed_by, utc(r.armed_at), utc(r.expires_at), bool(r.fail_redrives))
            for r in rows
        ]

    async def disarm(self, drill_id: int, now: datetime) -> bool:
        f = fault_drills.c
        async with translated(), self._engine.begin() as conn:
            done = await conn.execute(
                update(fault_drills).where(f.id == drill_id, f.expires_at > now).values(expires_at=now)
            )
        return bool(done.rowcount)

    async def applies(self, broadcast_id: str, created_at: datetime, now: datetime, redriven: bool = False) -> bool:
        f = fault_drills.c
        named = select(f.id).where(f.broadcast_id == broadcast_id, f.expires_at > now).limit(1)
        if redriven:
            async with translated(), self._engine.begin() as conn:
                return (await conn.execute(named.where(f.fail_redrives.is_(True)))).first() is not None
        unbound = (
            select(f.id)
            .where(f.broadcast_id.is_(None), f.armed_at <= created_at, f.expires_at > now)
            .order_by(f.id)
            .limit(1)
        )
        async with translated(), self._engine.begin() as conn:
            if (await conn.execute(named)).first() is not None:
                return True
            drill_id = (await conn.execute(unbound)).scalar_one_or_none()
            if drill_id is None:
                return False
            await conn.execute(
                update(fault_drills)
                .where(f.id == drill_id, f.broadcast_id.is_(None))
                .values(broadcast_id=broadcast_id, bound_at=now)
            )
            return (await conn.execute(named)).first() is not None  # another consumer may have bound it first
