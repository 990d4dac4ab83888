"""Admin API of the outbox's dead state: the rows the event log refused for good (too large for the topic,
corrupt) that left their lanes (see ``relay.py``). List them, put one back at the end of its lane once the
cause is fixed (``redrive``), or delete it (``purge``). Every redrive and purge is logged with its actor.
"""

from __future__ import annotations

import logging
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from broadcast.admin.context import admin_context
from broadcast.core.domain import DeadOutboxRow, rfc3339
from broadcast.errors import NotFoundError, ValidationError
from broadcast.http.body import id_number, json_data, known_query
from broadcast.http.identity import acting_admin

PREFIX = "/api/admin/outbox/dead"
DEFAULT_PAGE_SIZE = 50
log = logging.getLogger(__name__)


def _dead_id(request: Request) -> int:
    raw = request.path_params["dead_id"]
    try:
        return id_number(raw, "id")
    except ValidationError:
        raise NotFoundError(f"dead outbox row {raw[:40]!r} not found") from None


def _row(d: DeadOutboxRow) -> dict[str, Any]:
    return {
        "id": d.id,
        "outboxId": d.outbox_id,
        "topic": d.event.topic,
        "key": d.event.key,
        "eventType": d.event.event_type.value,
        "broadcastId": d.event.broadcast_id,
        "payloadBytes": len(d.event.payload),
        "attempts": d.attempts,
        "lastError": d.last_error,
        "createdAt": rfc3339(d.created_at),
        "deadAt": rfc3339(d.dead_at),
    }


async def list_dead(request: Request) -> Response:
    await acting_admin(request)
    known_query(request, "cursor", "limit")
    raw_cursor, raw_limit = request.query_params.get("cursor"), request.query_params.get("limit")
    cursor = id_number(raw_cursor, "cursor") if raw_cursor is not None else None
    limit = id_number(raw_limit, "limit") if raw_limit is not None else DEFAULT_PAGE_SIZE
    max_page = admin_context(request).settings.limits.max_page_size
    if not 1 <= limit <= max_page:
        raise ValidationError(f"limit must be between 1 and {max_page}")
    rows = await admin_context(request).outbox.dead(limit + 1, cursor)
    page = rows[:limit]
    return json_data({"items": [_row(d) for d in page], "nextCursor": str(page[-1].id) if len(rows) > limit else None})


async def redrive_dead(request: Request) -> Response:
    actor = await acting_admin(request)
    dead_id = _dead_id(request)
    outbox_id = await admin_context(request).outbox.redrive_dead(dead_id)
    if outbox_id is None:
        raise NotFoundError(f"dead outbox row {dead_id} not found")
    log.info("audit: %s redrove dead outbox row %d (now outbox row %d)", actor, dead_id, outbox_id)
    return json_data({"id": dead_id, "outboxId": outbox_id})


async def purge_dead(request: Request) -> Response:
    actor = await acting_admin(request)
    dead_id = _dead_id(request)
    if not await admin_context(request).outbox.purge_dead(dead_id):
        raise NotFoundError(f"dead outbox row {dead_id} not found")
    log.info("audit: %s purged dead outbox row %d", actor, dead_id)
    return json_data({"id": dead_id, "purged": True})


routes: list[BaseRoute] = [
    Route(PREFIX, list_dead, methods=["GET"]),
    Route(f"{PREFIX}/{{dead_id}}/redrive", redrive_dead, methods=["POST"]),
    Route(f"{PREFIX}/{{dead_id}}", purge_dead, methods=["DELETE"]),
]
