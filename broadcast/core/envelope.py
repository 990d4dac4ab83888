"""The versioned Kafka envelope: ``MessageDeliveryEvent`` as it travels on the broadcast topics.

Encoded once per event with orjson; decoding validates strictly and raises ``errors.ValidationError``,
which the listener container treats as not retryable (a malformed record goes to the dead-letter topic).
Event ids are deterministic (``<broadcast>.<type>[.<user>]``) so a redelivered record carries the same id.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field
from pydantic import ValidationError as PydanticValidationError

from broadcast.core import constants
from broadcast.core.domain import Broadcast, EventType, Priority, TargetType
from broadcast.errors import ValidationError

SCHEMA_VERSION: Literal[1] = 1
MAX_ENVELOPE_BYTES = 1_000_000


class BroadcastSnapshot(BaseModel):
    """The broadcast as it was when the event was written (what a client renders)."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    sender_id: str = Field(alias="senderId", max_length=128)
    content: str = Field(max_length=constants.ENVELOPE_MAX_CONTENT_CHARS)
    target_type: TargetType = Field(alias="targetType")
    target_roles: tuple[str, ...] = Field(default=(), alias="targetRoles")
    priority: Priority = Priority.NORMAL
    category: str | None = Field(default=None, max_length=constants.ENVELOPE_MAX_CATEGORY_CHARS)
    created_at: datetime = Field(alias="createdAt")
    expires_at: datetime | None = Field(default=None, alias="expiresAt")
    fire_and_forget: bool = Field(default=False, alias="fireAndForget")


class MessageDeliveryEvent(BaseModel):
    """One delivery event: a broadcast for one user (selected topic) or for a group (group topic)."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    v: Literal[1] = SCHEMA_VERSION
    event_id: str = Field(alias="eventId", min_length=1, max_length=300)
    event_type: EventType = Field(alias="eventType")
    broadcast_id: str = Field(alias="broadcastId", min_length=1, max_length=64)
    user_id: str | None = Field(default=None, alias="userId", max_length=128)
    occurred_at: datetime = Field(alias="occurredAt")
    correlation_id: str | None = Field(default=None, alias="correlationId", max_length=200)
    broadcast: BroadcastSnapshot | None = None


def event_id(broadcast_id: str, event_type: EventType, user_id: str | None = None) -> str:
    return f"{broadcast_id}.{event_type.value}" + (f".{user_id}" if user_id is not None else "")


def snapshot(broadcast: Broadcast) -> BroadcastSnapshot:
    return BroadcastSnapshot(
        sender_id=broadcast.sender_id,
        content=broadcast.content,
        target_type=broadcast.target_type,
        target_roles=broadcast.target_roles,
        priority=broadcast.priority,
        category=broadcast.category,
        created_at=broadcast.created_at,
        expires_at=broadcast.expires_at,
        fire_and_forget=broadcast.fire_and_forget,
    )


def encode(event: MessageDeliveryEvent) -> bytes:
    """The wire bytes of ``event`` (camelCase keys, ISO-8601 times)."""
    return orjson.dumps(event.model_dump(mode="json", by_alias=True, exclude_none=True))


class PerUserEncoder:
    """Encodes one event per recipient cheaply: the shared part is dumped once, only ids vary."""

    def __init__(self, template: MessageDeliveryEvent) -> None:
        self._common: dict[str, Any] = template.model_dump(mode="json", by_alias=True, exclude_none=True)
        self._broadcast_id = template.broadcast_id
        self._type = template.event_type

    def encode(self, user_id: str) -> bytes:
        self._common["userId"] = user_id
        self._common["eventId"] = event_id(self._broadcast_id, self._type, user_id)
        return orjson.dumps(self._common)


def decode(raw: bytes | None) -> MessageDeliveryEvent:
    """Parse and validate wire bytes; any defect raises ``ValidationError`` (not retryable)."""
    if raw is None:
        raise ValidationError("record has no value")
    if len(raw) > MAX_ENVELOPE_BYTES:
        raise ValidationError(f"record of {len(raw)} bytes exceeds {MAX_ENVELOPE_BYTES}")
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ValidationError(f"record is not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ValidationError("record is not a JSON object")
    if data.get("v") != SCHEMA_VERSION:
        raise ValidationError(f"unsupported envelope version {data.get('v')!r}")
    try:
        return MessageDeliveryEvent.model_validate(data)
    except PydanticValidationError as exc:
        raise ValidationError(f"invalid envelope: {exc.error_count()} error(s): {exc.errors()[0]['msg']}") from exc
