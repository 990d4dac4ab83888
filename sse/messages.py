"""What a MESSAGE looks like to a browser, built once per event from the envelope or a stored broadcast."""

from __future__ import annotations

from typing import Any

from broadcast.domain import Broadcast, InboxItem
from broadcast.envelope import MessageDeliveryEvent
from sse.frames import Cursor, EventName, frame, micros


def from_broadcast(broadcast: Broadcast, read: bool = False) -> dict[str, Any]:
    return {
        "broadcastId": broadcast.id,
        "content": broadcast.content,
        "priority": broadcast.priority.value,
        "category": broadcast.category,
        "senderId": broadcast.sender_id,
        "targetType": broadcast.target_type.value,
        "createdAt": broadcast.created_at.isoformat(),
        "expiresAt": broadcast.expires_at.isoformat() if broadcast.expires_at else None,
        "read": read,
    }


def from_event(event: MessageDeliveryEvent) -> dict[str, Any]:
    snapshot = event.broadcast
    assert snapshot is not None, "CREATED events carry the broadcast"
    return {
        "broadcastId": event.broadcast_id,
        "content": snapshot.content,
        "priority": snapshot.priority.value,
        "category": snapshot.category,
        "senderId": snapshot.sender_id,
        "targetType": snapshot.target_type.value,
        "createdAt": snapshot.created_at.isoformat(),
        "expiresAt": snapshot.expires_at.isoformat() if snapshot.expires_at else None,
        "read": False,
        "correlationId": event.correlation_id,
    }


def cursor_of(item: InboxItem) -> Cursor:
    if item.row_id is not None and item.broadcast.target_type.value == "SELECTED":
        return Cursor(row_id=item.row_id)
    return Cursor(group_micros=micros(item.broadcast.created_at))


def item_frame(item: InboxItem) -> bytes:
    return frame(EventName.MESSAGE, from_broadcast(item.broadcast, item.read), cursor_of(item).format())
