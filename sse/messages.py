"""What a MESSAGE looks like to a browser, built once per event from the envelope or a stored broadcast."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Protocol

from broadcast.core.domain import Broadcast, InboxItem, Priority, TargetType, rfc3339
from broadcast.core.envelope import MessageDeliveryEvent
from sse.frames import Cursor, EventName, frame, micros


class _Shown(Protocol):
    """What a MESSAGE shows of a broadcast: a stored ``Broadcast`` and an envelope snapshot both have it."""

    @property
    def sender_id(self) -> str: ...
    @property
    def content(self) -> str: ...
    @property
    def target_type(self) -> TargetType: ...
    @property
    def priority(self) -> Priority: ...
    @property
    def category(self) -> str | None: ...
    @property
    def created_at(self) -> datetime: ...
    @property
    def expires_at(self) -> datetime | None: ...


def _payload(broadcast_id: str, shown: _Shown, read: bool, correlation_id: str | None) -> dict[str, Any]:
    return {
        "broadcastId": broadcast_id,
        "content": shown.content,
        "priority": shown.priority.value,
        "category": shown.category,
        "senderId": shown.sender_id,
        "targetType": shown.target_type.value,
        "createdAt": rfc3339(shown.created_at),
        "expiresAt": rfc3339(shown.expires_at) if shown.expires_at else None,
        "read": read,
        "correlationId": correlation_id,
    }


def from_broadcast(broadcast: Broadcast, read: bool = False) -> dict[str, Any]:
    return _payload(broadcast.id, broadcast, read, broadcast.correlation_id)


def from_event(event: MessageDeliveryEvent) -> dict[str, Any]:
    snapshot = event.broadcast
    assert snapshot is not None, "CREATED events carry the broadcast"
    return _payload(event.broadcast_id, snapshot, False, event.correlation_id)


def cursor_of(item: InboxItem) -> Cursor:
    if item.row_id is not None and item.broadcast.target_type.value == "SELECTED":
        return Cursor(row_id=item.row_id)
    return Cursor(group_micros=micros(item.broadcast.created_at))


def item_frame(item: InboxItem) -> bytes:
    """A catch-up item's MESSAGE frame. A group broadcast's is the same bytes for every user (same cursor,
    same payload but for ``read``): a reconnect storm encodes each once (``GROUP_FRAMES_CACHED`` kept)."""
    if item.row_id is not None:
        return _encode(item)
    key = (item.broadcast.id, item.broadcast.updated_at, item.read)
    cached = _group_frames.get(key)
    if cached is None:
        cached = _group_frames[key] = _encode(item)
        if len(_group_frames) > GROUP_FRAMES_CACHED:
            del _group_frames[next(iter(_group_frames))]  # the oldest entry
    return cached


def _encode(item: InboxItem) -> bytes:
    return frame(EventName.MESSAGE, from_broadcast(item.broadcast, item.read), cursor_of(item).format())


GROUP_FRAMES_CACHED = 4_096
_group_frames: dict[tuple[str, datetime, bool], bytes] = {}
