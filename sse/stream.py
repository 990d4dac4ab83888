"""One SSE stream: open, catch up (pending, missed, unread group messages), then follow the live queue.

Catch-up after ``Last-Event-ID`` replays, in creation order, the user's SELECTED rows after the cursor
plus every still-PENDING row, and the matching ALL/ROLE broadcasts created after the cursor's moment
(less ``GROUP_OVERLAP``: group broadcasts arrive out of creation order, so a few are sent again).
When the cursor cannot be proven complete — not one of ours, another user's row, beyond anything stored,
or more to replay than ``replay_limit`` — the stream says ``RESYNC`` first (the client refetches its
inbox) and then sends what is pending. A MESSAGE counts as delivered once it was handed to the socket.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from broadcast.domain import InboxItem
from broadcast.ports import InboxStore, Presence
from broadcast.settings import SseSettings
from sse.frames import HEARTBEAT, RETRY, Cursor, EventName, frame, from_micros, parse_cursor
from sse.hub import CLOSE, Connection, Hub
from sse.messages import item_frame

log = logging.getLogger(__name__)
FUTURE_SLACK = timedelta(minutes=1)
# ALL/ROLE broadcasts reach a stream in consumption order, not creation order: they are keyed by broadcast
# id, so spread over partitions (and consumers), and a transaction may commit after a later one was
# streamed. A group cursor is therefore no watermark: a client may hold g<t> and still miss an older
# broadcast that was on its way. A resume also replays the group broadcasts of the GROUP_OVERLAP before
# the cursor; the client drops the ones it has by their SSE id (the same bytes each time).
GROUP_OVERLAP = timedelta(seconds=30)


@dataclass
class StreamContext:
    hub: Hub
    inbox: InboxStore
    presence: Presence
    settings: SseSettings
    instance_id: str
    mark_delivered: Callable[[tuple[str, str]], None]


async def catch_up(
    inbox: InboxStore, user_id: str, roles: frozenset[str], raw: str | None, limit: int
) -> tuple[list[InboxItem], bool]:
    """What to send right after connect, and whether the client must RESYNC first."""
    try:
        cursor = parse_cursor(raw)
    except ValueError:
        return await _fresh(inbox, user_id, roles, limit), True
    if cursor is None:
        return await _fresh(inbox, user_id, roles, limit), False
    since = await _moment(inbox, user_id, cursor)
    if since is None:
        return await _fresh(inbox, user_id, roles, limit), True
    selected = await inbox.selected_after(user_id, cursor.row_id or 0, None if cursor.row_id else since, limit + 1)
    group = await inbox.group(user_id, roles, since - GROUP_OVERLAP)
    items = _in_order(selected + group)
    if len(items) > limit:
        return await _fresh(inbox, user_id, roles, limit), True
    return items, False


async def _moment(inbox: InboxStore, user_id: str, cursor: Cursor) -> datetime | None:
    """The time a cursor points at; None when it is not provably one of this user's positions."""
    if cursor.row_id is not None:
        return await inbox.row_created_at(user_id, cursor.row_id)
    assert cursor.group_micros is not None
    moment = from_micros(cursor.group_micros)
    return None if moment > datetime.now(UTC) + FUTURE_SLACK else moment


async def _fresh(inbox: InboxStore, user_id: str, roles: frozenset[str], limit: int) -> list[InboxItem]:
    """A new connection: everything PENDING, and the unread ALL/ROLE broadcasts."""
    return _in_order(await inbox.pending(user_id, limit) + await inbox.group(user_id, roles, None))


def _in_order(items: list[InboxItem]) -> list[InboxItem]:
    unique = {i.broadcast.id: i for i in items}
    return sorted(unique.values(), key=lambda i: (i.broadcast.created_at, i.row_id or 0))


async def events(
    ctx: StreamContext, connection: Connection, backlog: list[InboxItem], resync: bool
) -> AsyncIterator[bytes]:
    """The bytes of one stream; the caller closes the connection (and presence) when it ends."""
    yield RETRY
    yield frame(
        EventName.CONNECTED, {"connectionId": connection.id, "userId": connection.user_id, "instance": ctx.instance_id}
    )
    if resync:
        yield frame(EventName.RESYNC, {"reason": "cannot resume from the given Last-Event-ID; refetch the inbox"})
    for item in backlog:
        if item.broadcast.id in connection.sent_broadcasts:
            continue  # the live path queued it meanwhile
        connection.sent_broadcasts.add(item.broadcast.id)
        yield item_frame(item)
        if item.row_id is not None and item.broadcast.target_type.value == "SELECTED":
            ctx.mark_delivered((item.broadcast.id, connection.user_id))
    while True:
        outgoing = await connection.queue.get()
        if outgoing.data == CLOSE:
            return
        yield outgoing.data
        if outgoing.delivers is not None:
            ctx.mark_delivered(outgoing.delivers)


__all__ = ["HEARTBEAT", "StreamContext", "catch_up", "events"]
