"""Domain values shared by the lifecycle, delivery and dead-letter code.

Plain enums and frozen dataclasses with no I/O; table models, HTTP schemas and the Kafka envelope are
distinct types that convert to and from these.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum


class TargetType(StrEnum):
    ALL = "ALL"
    SELECTED = "SELECTED"
    ROLE = "ROLE"


class Priority(StrEnum):
    LOW = "LOW"
    NORMAL = "NORMAL"
    HIGH = "HIGH"
    URGENT = "URGENT"


class BroadcastStatus(StrEnum):
    SCHEDULED = "SCHEDULED"
    ACTIVE = "ACTIVE"
    EXPIRED = "EXPIRED"
    CANCELLED = "CANCELLED"
    FAILED = "FAILED"


class DeliveryStatus(StrEnum):
    PENDING = "PENDING"
    DELIVERED = "DELIVERED"
    FAILED = "FAILED"
    SUPERSEDED = "SUPERSEDED"


class ReadStatus(StrEnum):
    UNREAD = "UNREAD"
    READ = "READ"


class EventType(StrEnum):
    CREATED = "CREATED"
    READ = "READ"
    CANCELLED = "CANCELLED"
    EXPIRED = "EXPIRED"
    UPDATED = "UPDATED"


@dataclass(frozen=True, slots=True)
class User:
    """A user known to the server, with the roles that ROLE broadcasts target."""

    id: str
    display_name: str = ""
    roles: frozenset[str] = field(default_factory=frozenset)


@dataclass(frozen=True, slots=True)
class OutboxEvent:
    """An event waiting in the outbox to be published to ``topic`` under ``key``."""

    topic: str
    key: str
    event_type: EventType
    payload: bytes
    headers: tuple[tuple[str, bytes], ...] = ()


@dataclass(frozen=True, slots=True)
class ClaimedOutboxEvent:
    """An outbox row claimed by one relay until ``claimed_until``; ``id`` orders rows of the same key."""

    id: int
    event: OutboxEvent
    created_at: datetime
    attempts: int
