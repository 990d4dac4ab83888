"""The versioned Kafka envelope: ``MessageDeliveryEvent`` as it travels on the broadcast topics.

Encoded once per event with orjson; decoding validates strictly and raises ``errors.ValidationError``,
which the listener container treats as not retryable (a malformed record goes to the dead-letter topic).
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field
from pydantic import ValidationError as PydanticValidationError

from broadcast.domain import EventType, Priority, TargetType
from broadcast.errors import ValidationError

SCHEMA_VERSION: Literal[1] = 1
MAX_ENVELOPE_BYTES = 1_000_000


class MessageDeliveryEvent(BaseModel):
    """One delivery event: a broadcast for one user (selected topic) or for a group (group topic)."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    v: Literal[1] = SCHEMA_VERSION
    event_id: str = Field(alias="eventId", min_length=1, max_length=200)
    event_type: EventType = Field(alias="eventType")
    broadcast_id: str = Field(alias="broadcastId", min_length=1, max_length=64)
    user_id: str | None = Field(default=None, alias="userId", max_length=128)
    target_type: TargetType = Field(alias="targetType")
    target_roles: tuple[str, ...] = Field(default=(), alias="targetRoles")
    sender_id: str = Field(default="", alias="senderId", max_length=128)
    content: str = Field(default="", max_length=100_000)
    priority: Priority = Priority.NORMAL
    category: str | None = Field(default=None, max_length=100)
    created_at: datetime = Field(alias="createdAt")
    expires_at: datetime | None = Field(default=None, alias="expiresAt")
    fire_and_forget: bool = Field(default=False, alias="fireAndForget")
    correlation_id: str | None = Field(default=None, alias="correlationId", max_length=200)


def encode(event: MessageDeliveryEvent) -> bytes:
    """The wire bytes of ``event`` (camelCase keys, ISO-8601 times)."""
    return orjson.dumps(event.model_dump(mode="json", by_alias=True, exclude_none=True))


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
