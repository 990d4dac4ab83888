"""User-facing routes: the SSE stream and the inbox API. The user is always the signed-in identity."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from broadcast.core.domain import Principal
from broadcast.core.schemas import MarkReadRequest
from broadcast.errors import BroadcastError, ConflictError, ValidationError
from broadcast.http.body import json_data, known_query, read_model
from broadcast.http.identity import acting_user, principal, via_ticket
from sse.context import SseContext, sse_context
from sse.frames import EventName, frame, is_event_id
from sse.hub import Connection
from sse.messages import from_broadcast
from sse.stream import HEADERS, TOO_MANY, SseStream, bounded, catch_up, head

log = logging.getLogger(__name__)
LIMIT_RETRY = b"retry: 60000\n\n"
CONNECT_PATH = "/api/user/sse/connect"
LIVE_PATH_WAIT_S = 3.0  # longest a connect waits for the bus subscription


async def ticket(request: Request) -> Response:
    """A single-use ticket for ``GET /api/user/sse/connect?ticket=`` (``EventSource`` cannot send headers).

    It is bound to the caller and expires after ``auth.ticket_ttl_seconds``; the stream it opens ends when
    the caller's token would have expired.
    """
    who = principal(request)
    c = sse_context(request)
    c.admission.rate(who.sub, request.client.host if request.client else None)
    ttl = c.settings.auth.ticket_ttl_seconds
    issued = await c.tickets.issue(who, ttl)
    return json_data({"ticket": issued, "expiresInSeconds": ttl, "streamUrl": f"{CONNECT_PATH}?ticket={issued}"}, 201)


async def connect(request: Request) -> Response:
    who = principal(request)
    c = sse_context(request)
    # Unknown query parameters are ignored here (not a 400 as on the admin lists): an EventSource URL often
    # carries a cache buster or a tracking parameter, and a stream must not fail on one.
    resume = request.query_params.get("lastEventId")
    if resume is not None and not is_event_id(resume):
        # a client that has no id sends none (broadcast-client.js); a Last-Event-ID header the server cannot
        # resume from is answered with RESYNC instead (EventSource sends back whatever id it last saw)
        raise ValidationError("lastEventId must be an event id (s<row> or g<µs>); leave it out to start afresh")
    if not via_ticket(request):  # a ticket's stream open was counted when the ticket was issued
        c.admission.rate(who.sub, request.client.host if request.client else None)
    async with c.connect_gate.admit():  # a storm waits (boundedly) here, not in the database pool
        return await _open(request, who, c)


async def _open(request: Request, who: Principal, c: SseContext) -> Response:
    """Register the stream, make it reachable live, read its catch-up; the response writes the rest."""
    user_id, settings = who.sub, c.settings.sse
    user = await c.users.get(user_id)
    roles = user.roles if user else frozenset()
    raw_cursor = request.headers.get("last-event-id") or request.query_params.get("lastEventId")
    try:
        connection = c.hub.open(user_id, roles)
    except ConflictError:
        return _limit_reached(settings.max_connections_per_user)
    if not await c.admission.acquire(connection):
        c.hub.close(connection)
        return _limit_reached(settings.max_connections_per_user)
    await _join_live_path(c, user_id)
    try:
        backlog, resync = await catch_up(c.inbox, user_id, roles, raw_cursor, settings.replay_limit)
    except BaseException:
        await _close(request, connection)
        raise
    items, trimmed = bounded(backlog, user_id, settings.replay_bytes)
    start = head(connection, c.settings.server.instance_id, resync or (TOO_MANY if trimmed else None))
    ends_at = who.expires_at + c.settings.auth.leeway_seconds  # as long as the token is accepted
    return SseStream(connection, start, items, lambda: _close(request, connection), ends_at, settings.dead_peer_seconds)


async def _join_live_path(c: SseContext, user_id: str) -> None:
    """Make the stream reachable live before it says CONNECTED (and before its catch-up reads): the user's
    presence names this instance, and this instance's bus subscription is confirmed (at start-up or after
    a Redis outage it may not be yet, and a push published meanwhile is lost). Past ``LIVE_PATH_WAIT_S``
    the stream opens anyway: reconciliation delivers until the live path works."""
    try:
        await c.presence.heartbeat(user_id, c.settings.server.instance_id)
    except BroadcastError as exc:
        log.warning("presence heartbeat for %s failed: %s", user_id, exc)
    if c.bus_subscribed.is_set():
        return
    try:
        async with asyncio.timeout(LIVE_PATH_WAIT_S):
            await c.bus_subscribed.wait()
    except TimeoutError:
        log.warning("stream of %s opens before the bus subscription: reconciliation delivers meanwhile", user_id)


def _limit_reached(limit: int) -> Response:
    event = frame(EventName.CONNECTION_LIMIT_REACHED, {"limit": limit})
    return Response(LIMIT_RETRY + event, media_type=SseStream.media_type, headers=HEADERS)


async def _close(request: Request, connection: Connection) -> None:
    c = sse_context(request)
    await c.admission.release(connection)
    if c.hub.close(connection):
        with contextlib.suppress(BroadcastError):
            await c.presence.leave(connection.user_id, c.settings.server.instance_id)


async def inbox(request: Request) -> Response:
    user_id = await acting_user(request)
    c = sse_context(request)
    user = await c.users.get(user_id)
    known_query(request, "cursor", "limit")
    items = await c.inbox.inbox(user_id, user.roles if user else frozenset())
    limit = _limit(request.query_params.get("limit", "50"))
    cursor = request.query_params.get("cursor") or None  # empty: the first page, as on every other list
    if cursor is not None:
        ids = [i.broadcast.id for i in items]
        if cursor not in ids:
            raise ValidationError("invalid cursor")
        items = items[ids.index(cursor) + 1 :]
    page = items[:limit]
    return json_data(
        {
            "items": [from_broadcast(i.broadcast, i.read) for i in page],
            "nextCursor": page[-1].broadcast.id if len(items) > limit else None,
            "unreadCount": sum(1 for i in items if not i.read) if cursor is None else None,
        }
    )


async def unread(request: Request) -> Response:
    user_id = await acting_user(request)
    c = sse_context(request)
    user = await c.users.get(user_id)
    items = [i for i in await c.inbox.inbox(user_id, user.roles if user else frozenset()) if not i.read]
    return json_data({"count": len(items), "items": [from_broadcast(i.broadcast) for i in items]})


async def mark_read(request: Request) -> Response:
    """Idempotent; each newly read message emits one READ event that syncs the user's other tabs."""
    user_id = await acting_user(request)
    c = sse_context(request)
    body = await read_model(request, MarkReadRequest, c.settings.limits.max_body_bytes)
    user = await c.users.get(user_id)
    ids = [i for i in body.broadcast_ids if _names_a_broadcast(i)]
    newly = await c.inbox.mark_read(user_id, user.roles if user else frozenset(), ids) if ids else []
    events_ = [c.lifecycle.events.read(b, user_id) for b in newly]
    if events_:
        await c.outbox.append(events_)
        c.outbox_wakeup.set()
    return json_data({"read": newly})


def _names_a_broadcast(raw: str) -> bool:
    """Broadcast ids are canonical UUIDs; any other string names none (like an unknown id, it changes nothing)."""
    try:
        return str(uuid.UUID(raw)) == raw
    except ValueError:
        return False


def _limit(raw: str) -> int:
    if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw[:4]) <= 500 or len(raw) > 3:
        raise ValidationError("limit must be between 1 and 500")
    return int(raw)


routes = [
    Route(CONNECT_PATH, connect, methods=["GET"]),
    Route("/api/user/sse/ticket", ticket, methods=["POST"]),
    Route("/api/user/messages", inbox, methods=["GET"]),
    Route("/api/user/messages/unread", unread, methods=["GET"]),
    Route("/api/user/messages/read", mark_read, methods=["POST"]),
]
