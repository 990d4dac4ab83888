"""One SSE stream: open, catch up (pending, missed, unread group messages), then follow the live queue.

Catch-up after ``Last-Event-ID`` replays, in creation order, the user's SELECTED rows after the cursor
plus every still-PENDING row, and the matching ALL/ROLE broadcasts created after the cursor's moment
(less ``GROUP_OVERLAP``: group broadcasts arrive out of creation order, so a few are sent again).
A fresh connect sends the PENDING rows and the unread ALL/ROLE broadcasts.
A catch-up is bounded: at most ``replay_limit`` items and ``replay_bytes`` of frames, always the newest.
When it cannot send everything — the cursor is not provably one of ours (another user's row, beyond
anything stored, garbage), or there is more than the bounds — the stream says ``RESYNC`` first (the client
refetches its inbox) and then sends the newest. A MESSAGE counts as delivered once it was handed to the socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from broadcast.core import constants
from broadcast.core.domain import InboxItem, TargetType
from broadcast.core.ports.stores import InboxStore
from sse.frames import RETRY, Cursor, EventName, frame, from_micros, parse_cursor
from sse.hub import Connection, Outgoing
from sse.messages import item_frame

log = logging.getLogger(__name__)
LINGER_RESET = struct.pack("ii", 1, 0)
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
FUTURE_SLACK = timedelta(minutes=1)
# ALL/ROLE broadcasts reach a stream in consumption order, not creation order: they are keyed by broadcast
# id, so spread over partitions (and consumers), and a transaction may commit after a later one was
# streamed. A group cursor is therefore no watermark: a client may hold g<t> and still miss an older
# broadcast that was on its way. A resume also replays the group broadcasts of the GROUP_OVERLAP before
# the cursor; the client drops the ones it has by their SSE id (the same bytes each time).
GROUP_OVERLAP = timedelta(seconds=30)
# RESYNC reasons: the client refetches its inbox (GET /api/user/messages) either way
UNKNOWN_CURSOR = "cannot resume from the given Last-Event-ID; refetch the inbox"
TOO_MANY = "more messages than a stream sends at connect: the newest follow; refetch the inbox for the rest"


async def catch_up(
    inbox: InboxStore, user_id: str, roles: frozenset[str], raw: str | None, limit: int
) -> tuple[list[InboxItem], str | None]:
    """What to send right after connect (at most the newest ``limit`` items, in creation order), and why the
    client must RESYNC first (None: what follows is everything it missed)."""
    try:
        cursor = parse_cursor(raw)
    except ValueError:
        return await _fresh(inbox, user_id, roles, limit, UNKNOWN_CURSOR)
    if cursor is None:
        return await _fresh(inbox, user_id, roles, limit, None)
    since = await _moment(inbox, user_id, cursor)
    if since is None:
        return await _fresh(inbox, user_id, roles, limit, UNKNOWN_CURSOR)
    selected = await inbox.selected_after(user_id, cursor.row_id or 0, since, limit + 1)
    group = await inbox.group(user_id, roles, since - GROUP_OVERLAP, limit)
    items = _in_order(selected + group.items)
    if len(items) > limit or not group.complete:
        return await _fresh(inbox, user_id, roles, limit, TOO_MANY)
    return items, None


async def _moment(inbox: InboxStore, user_id: str, cursor: Cursor) -> datetime | None:
    """The time a cursor points at; None when it is not provably one of this user's positions."""
    if cursor.row_id is not None:
        return await inbox.row_created_at(user_id, cursor.row_id)
    assert cursor.group_micros is not None
    moment = from_micros(cursor.group_micros)
    return None if moment > datetime.now(UTC) + FUTURE_SLACK else moment


async def _fresh(
    inbox: InboxStore, user_id: str, roles: frozenset[str], limit: int, resync: str | None
) -> tuple[list[InboxItem], str | None]:
    """A new connection: the PENDING rows and the unread ALL/ROLE broadcasts, the newest ``limit`` of them;
    RESYNC (``TOO_MANY``) when there were more."""
    pending = await inbox.pending(user_id, limit + 1)
    group = await inbox.group(user_id, roles, None, limit)
    items = _in_order(pending + group.items)
    if len(items) > limit or not group.complete:
        return items[-limit:], resync or TOO_MANY
    return items, resync


def _in_order(items: list[InboxItem]) -> list[InboxItem]:
    unique = {i.broadcast.id: i for i in items}
    return sorted(unique.values(), key=lambda i: (i.broadcast.created_at, i.row_id or 0))


def outgoing(item: InboxItem, user_id: str) -> Outgoing:
    """A catch-up item as bytes for the hub; writing it counts as a delivery."""
    group = item.broadcast.target_type is not TargetType.SELECTED
    return Outgoing(item_frame(item), item.broadcast.id, counts=True, path="reconnect", group=group)


def bounded(items: list[InboxItem], user_id: str, max_bytes: int) -> tuple[list[Outgoing], bool]:
    """The catch-up as frames, the newest that fit in ``max_bytes`` (at least one), in creation order; True
    when older ones were left out."""
    kept: list[Outgoing] = []
    size = 0
    for item in reversed(items):
        out = outgoing(item, user_id)
        size += len(out.data)
        if kept and size > max_bytes:
            return kept[::-1], True
        kept.append(out)
    return kept[::-1], False


def head(connection: Connection, instance_id: str, resync: str | None) -> bytes:
    """What every stream starts with: the retry hint, CONNECTED, and RESYNC with its reason when the catch-up
    that follows is not everything the client missed."""
    hello = {"connectionId": connection.id, "userId": connection.user_id, "instance": instance_id}
    parts = [RETRY, frame(EventName.CONNECTED, hello)]
    if resync:
        parts.append(frame(EventName.RESYNC, {"reason": resync}))
    return b"".join(parts)


def _transport(scope: Scope) -> asyncio.Transport | None:
    """The server's transport under this stream (uvicorn's), when the server exposes it."""
    cycle = getattr(scope.get(constants.RAW_SEND_SCOPE_KEY), "__self__", None)
    transport: asyncio.Transport | None = getattr(cycle, "transport", None)  # uvloop's is not a subclass
    if transport is None or not callable(getattr(transport, "abort", None)):
        return None
    return transport


def detect_dead_peer(scope: Scope, dead_after_s: float) -> bool:
    """Make the kernel give up on a client that vanished without FIN or RST (a dropped link, a laptop lid)
    within about ``dead_after_s``, instead of TCP's ~15 minutes of retransmissions: keepalive probes once
    the stream is idle for a third of it, and ``TCP_USER_TIMEOUT`` for data (heartbeats) left unacknowledged.
    The stream then ends as any disconnect does, and frees its per-user slot. False when not possible."""
    transport = _transport(scope)
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return False
    idle = max(1, int(dead_after_s / 3))
    options = [
        (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
        (socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle),
        (socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, max(1, idle // 2)),
        (socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 4),
        (socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(dead_after_s * 1000)),
    ]
    try:
        for level, name, value in options:
            sock.setsockopt(level, name, value)
    except (OSError, ValueError):  # ValueError: uvloop's socket of a transport the client already closed (fd -1)
        return False
    return True


def abort_of(scope: Scope) -> Callable[[], None] | None:
    """The server's way to drop a socket at once (uvicorn's transport), when the server exposes it.

    A plain close would leave the kernel holding the unsent bytes of a client that stopped reading (the
    socket lingers in FIN_WAIT with megabytes queued); SO_LINGER 0 makes the close a reset that frees them.
    """
    transport = _transport(scope)
    if transport is None:
        return None

    def abort() -> None:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
        transport.abort()

    return abort


class SseStream(Response):
    """One stream as an ASGI response: the hub writes to it; this task only waits for the client to go.

    No generator and no queue per connection: after the head and catch-up, bytes are written by whoever
    fans out (see ``sse/hub.py``). The stream ends when the client disconnects, when the hub finishes it
    (shutdown) or when it is dropped (socket aborted) — all three surface here as ``http.disconnect``.
    """

    media_type = "text/event-stream"

    def __init__(
        self,
        connection: Connection,
        start: bytes,
        items: list[Outgoing],
        on_end: Callable[[], Awaitable[None]],
        expires_at: float | None = None,
        dead_peer_s: float | None = None,
    ) -> None:
        super().__init__(headers=HEADERS, media_type=self.media_type)
        self.raw_headers = [(k, v) for k, v in self.raw_headers if k != b"content-length"]  # open-ended: chunked
        self._connection, self._head, self._items, self._on_end = connection, start, items, on_end
        self._expires_at = expires_at
        self._dead_peer_s = dead_peer_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            if self._dead_peer_s is not None:
                detect_dead_peer(scope, self._dead_peer_s)
            if self._connection.dropped:  # fell behind during catch-up: reconnect and resume
                await send({"type": "http.response.body", "body": RETRY, "more_body": False})
                return
            items, self._items = self._items, []  # written now: a long-lived stream must not keep them
            self._connection.start(_body_send(scope, send), abort_of(scope), self._head, items)
            del items
            try:
                async with asyncio.timeout(None if self._expires_at is None else self._expires_at - time.time()):
                    await _disconnected(receive)
            except TimeoutError:  # the token this stream was opened with expired: sign in again
                self._connection.finish(frame(EventName.TOKEN_EXPIRED, {"reason": "the access token expired"}))
                await _disconnected(receive)
        finally:
            await self._on_end()


def _body_send(scope: Scope, send: Send) -> Send:
    """Where the stream's body goes once its headers went out through every middleware: the server's own
    ``send`` when it is known (``serve.py`` puts it in the scope). The middlewares here only act on
    ``http.response.start`` (headers, status, timing); skipping their wrappers for every frame saves six
    coroutine calls per delivery. A middleware that rewrote bodies (compression) would have to go before
    this: an event stream must not be compressed or buffered anyway."""
    raw: Send | None = scope.get(constants.RAW_SEND_SCOPE_KEY)
    return raw if raw is not None else send


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


__all__ = [
    "TOO_MANY",
    "UNKNOWN_CURSOR",
    "SseStream",
    "abort_of",
    "bounded",
    "catch_up",
    "detect_dead_peer",
    "head",
    "outgoing",
]
