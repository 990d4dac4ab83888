"""Row mapping for the broadcast tables: domain ↔ row, list cursors, chunking and PostgreSQL COPY."""

from __future__ import annotations

import base64
import binascii
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from datetime import UTC, datetime
from typing import Any, TypeVar, cast

import asyncpg
import orjson
from sqlalchemy import Row
from sqlalchemy.ext.asyncio import AsyncConnection

from broadcast.adapters.sql.engine import translate
from broadcast.adapters.sql.stores import utc
from broadcast.core.domain import Broadcast, BroadcastStatus, Priority, TargetType
from broadcast.errors import ValidationError
from broadcast.observability.loops import hand_back

CHUNK = 20_000
# One streamed COPY carries a whole bulk (up to limits.max_csv_rows rows, built and encoded as it goes, the
# loop handed back on the way): the pool's command_timeout (30 s) is sized for statements, not for that.
COPY_TIMEOUT_S = 600.0
T = TypeVar("T")


def chunks(items: Iterable[T], size: int = CHUNK) -> Iterator[list[T]]:
    batch: list[T] = []
    for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


async def copy_records(
    conn: AsyncConnection, table: str, columns: list[str], records: Iterable[tuple[Any, ...]]
) -> None:
    """One PostgreSQL ``COPY`` of every record, on the transaction's own connection (the table resolves
    through search_path). The records are produced and encoded as the COPY streams, handing the event loop
    back every ``loops.LOOP_SLICE`` of them."""
    raw = await conn.get_raw_connection()
    try:
        await raw.driver_connection.copy_records_to_table(  # type: ignore[union-attr]
            table, records=_sliced(records), columns=columns, timeout=COPY_TIMEOUT_S
        )
    except (asyncpg.PostgresError, asyncpg.InterfaceError) as exc:  # raw driver errors, not SQLAlchemy's
        raise translate(exc) from exc


async def _sliced(records: Iterable[tuple[Any, ...]]) -> AsyncIterator[tuple[Any, ...]]:
    for n, record in enumerate(records, 1):
        yield record
        await hand_back(n)


def broadcast_row(b: Broadcast, idempotency_key: str | None, request_hash: str) -> dict[str, Any]:
    return {
        "id": b.id,
        "sender_id": b.sender_id,
        "content": b.content,
        "target_type": b.target_type.value,
        "target_roles": list(b.target_roles),
        "priority": b.priority.value,
        "category": b.category,
        "status": b.status.value,
        "fire_and_forget": b.fire_and_forget,
        "targeted_count": b.targeted_count,
        "idempotency_key": idempotency_key,
        "request_hash": request_hash,
        "correlation_id": b.correlation_id,
        "scheduled_at": b.scheduled_at,
        "expires_at": b.expires_at,
        "created_at": b.created_at,
        "updated_at": b.updated_at,
    }


def columns_of(r: Row[Any] | Mapping[str, Any]) -> Mapping[str, Any]:
    """A row's columns by name: a SQLAlchemy row's mapping, or an asyncpg record as it is (read on the
    driver by a ``DriverStatement``)."""
    return cast("Mapping[str, Any]", r._mapping) if isinstance(r, Row) else r


def broadcast_from_row(r: Row[Any] | Mapping[str, Any]) -> Broadcast:
    m = columns_of(r)
    return Broadcast(
        id=m["id"],
        sender_id=m["sender_id"],
        content=m["content"],
        target_type=TargetType(m["target_type"]),
        # JSON, decoded on the driver too (SQLAlchemy's asyncpg dialect registers the codec on its connections)
        target_roles=tuple(m["target_roles"] or ()),
        priority=Priority(m["priority"]),
        category=m["category"],
        status=BroadcastStatus(m["status"]),
        fire_and_forget=bool(m["fire_and_forget"]),
        targeted_count=int(m["targeted_count"]),
        created_at=utc(m["created_at"]),
        updated_at=utc(m["updated_at"]),
        scheduled_at=utc(m["scheduled_at"]) if m["scheduled_at"] else None,
        expires_at=utc(m["expires_at"]) if m["expires_at"] else None,
        correlation_id=m["correlation_id"],
    )


def encode_cursor(b: Broadcast) -> str:
    return base64.urlsafe_b64encode(orjson.dumps([b.created_at.isoformat(), b.id])).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created_at, last_id = orjson.loads(raw)
        return datetime.fromisoformat(created_at).astimezone(UTC), str(last_id)
    except (ValueError, TypeError, OverflowError, binascii.Error, orjson.JSONDecodeError) as exc:
        raise ValidationError("invalid cursor") from exc
