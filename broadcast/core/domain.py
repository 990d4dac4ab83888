"""Domain values shared by the lifecycle, delivery and dead-letter code.

Plain enums and frozen dataclasses with no I/O; table models, HTTP schemas and the Kafka envelope are
distinct types that convert to and from these.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Generic, TypeVar

from broadcast.core import constants

T = TypeVar("T")

# The characters `str.isprintable()` refuses that a regex can name in every dialect the pattern meets (Python
# `re`, ECMA-262 for OpenAPI clients, Rust for pydantic and jsonschema-rs): C0, DEL and C1 controls (NEL
# U+0085 among them), non-ASCII spaces, line and paragraph separators, format and bidi controls. Spelled
# out because `\s` differs between those dialects (ECMA-262's leaves out NEL).
NOT_PRINTABLE_CLASS = (
    r"\x00-\x1f\x7f-\xa0\xad\u0600-\u0605\u061c\u06dd\u070f\u180e\u1680\u2000-\u200f\u2028-\u202f"
    r"\u205f-\u2064\u2066-\u206f\u3000\ufeff\ufff9-\ufffb"
)
# A user id (and a token's `sub`): at least one character, none of those above, no space at either end. This
# regex is the whole rule: the server checks exactly it (`is_user_id`) and the document states it.
USER_ID_PATTERN = rf"^[^ {NOT_PRINTABLE_CLASS}](?:[^{NOT_PRINTABLE_CLASS}]*[^ {NOT_PRINTABLE_CLASS}])?$"
_USER_ID = re.compile(USER_ID_PATTERN)
# Free text in a filter (a topic, an exception class): printable, as a regex says it, one rule for the server
# and the OpenAPI document.
PRINTABLE_PATTERN = rf"^[^{NOT_PRINTABLE_CLASS}]*$"
_PRINTABLE = re.compile(PRINTABLE_PATTERN)


def is_printable(value: str) -> bool:
    """Whether ``value`` has no character of ``NOT_PRINTABLE_CLASS`` (what ``PRINTABLE_PATTERN`` says)."""
    return _PRINTABLE.fullmatch(value) is not None


def is_user_id(value: str, max_chars: int) -> bool:
    """The one rule for a user id (a token's `sub`, a path, an import, a recipient, a CSV line): at most
    ``max_chars`` characters matching ``USER_ID_PATTERN``, exactly as the OpenAPI document states it."""
    return len(value) <= max_chars and _USER_ID.fullmatch(value) is not None


def rfc3339(moment: datetime) -> str:
    """The one way the API writes a moment: RFC 3339 in UTC, ``Z``, always six fractional digits
    (``2030-01-01T10:00:00.000000Z``). A naive datetime is taken as UTC (SQLite keeps no offset)."""
    utc = moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
    return utc.replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


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
class Principal:
    """Who is asking (from a verified token): user id, roles, and the token's expiry in epoch seconds."""

    sub: str
    roles: frozenset[str]
    expires_at: float


@dataclass(frozen=True, slots=True)
class User:
    """A user known to the server, with the roles that ROLE broadcasts target."""

    id: str
    display_name: str = ""
    roles: frozenset[str] = field(default_factory=frozenset)


@dataclass(frozen=True, slots=True)
class OutboxEvent:
    """An event waiting in the outbox to be published to ``topic`` under ``key``, not before ``not_before``."""

    topic: str
    key: str
    event_type: EventType
    payload: bytes
    headers: tuple[tuple[str, bytes], ...] = ()
    broadcast_id: str | None = None
    not_before: datetime | None = None


PRIORITY_HEADER = (constants.HEADER_LANE_CLASS, constants.PRIORITY_CLASS)


def outbox_lane(key: str, headers: tuple[tuple[str, bytes], ...]) -> int:
    """The outbox lane of an event (stable across processes and restarts): by key hash, among the priority
    lanes when its headers put it in the priority class, else among the normal ones."""
    if PRIORITY_HEADER in headers:
        return constants.PRIORITY_LANES[zlib.crc32(key.encode()) % constants.OUTBOX_PRIORITY_LANES]
    return zlib.crc32(key.encode()) % constants.OUTBOX_LANES


@dataclass(frozen=True, slots=True)
class ClaimedOutboxEvent:
    """An unpublished outbox row read by the relay that owns its lane; ``id`` orders rows of one key."""

    id: int
    event: OutboxEvent
    created_at: datetime
    attempts: int
    poison_attempts: int = 0  # refusals of the record itself (too large, corrupt), not broker outages


@dataclass(frozen=True, slots=True)
class DeadOutboxRow:
    """An outbox row the event log refused for good; it left its lane (``outbox_id`` was its place)."""

    id: int
    outbox_id: int
    event: OutboxEvent
    attempts: int
    last_error: str | None
    created_at: datetime
    dead_at: datetime


@dataclass(frozen=True, slots=True)
class NewBroadcast:
    """What an admin asks for; ``target_ids`` are user ids (SELECTED) or role names (ROLE), empty for ALL."""

    content: str
    target_type: TargetType
    target_ids: tuple[str, ...] = ()
    priority: Priority = Priority.NORMAL
    category: str | None = None
    scheduled_at: datetime | None = None
    expires_at: datetime | None = None
    fire_and_forget: bool = False


@dataclass(frozen=True, slots=True)
class Broadcast:
    """A saved broadcast. For ROLE targets ``target_roles`` names the roles; SELECTED recipients are rows."""

    id: str
    sender_id: str
    content: str
    target_type: TargetType
    target_roles: tuple[str, ...]
    priority: Priority
    category: str | None
    status: BroadcastStatus
    fire_and_forget: bool
    targeted_count: int
    created_at: datetime
    updated_at: datetime
    scheduled_at: datetime | None = None
    expires_at: datetime | None = None
    correlation_id: str | None = None


@dataclass(frozen=True, slots=True)
class BroadcastStats:
    """Counters of one broadcast; rates are fractions of ``targeted`` (0 when nobody is targeted).

    The targeted users not delivered to nor failed are ``pending`` while the broadcast can still reach them,
    and ``cancelled`` or ``expired`` once it was (then nothing is pending): targeted = delivered + failed +
    pending + cancelled + expired. ``read`` counts within ``delivered``.
    """

    broadcast_id: str
    targeted: int
    delivered: int
    read: int
    failed: int
    status: BroadcastStatus = BroadcastStatus.ACTIVE

    @property
    def _unreached(self) -> int:
        return max(self.targeted - self.delivered - self.failed, 0)

    @property
    def pending(self) -> int:
        return 0 if self.status in (BroadcastStatus.CANCELLED, BroadcastStatus.EXPIRED) else self._unreached

    @property
    def cancelled(self) -> int:
        return self._unreached if self.status is BroadcastStatus.CANCELLED else 0

    @property
    def expired(self) -> int:
        return self._unreached if self.status is BroadcastStatus.EXPIRED else 0

    @property
    def delivery_rate(self) -> float:
        return self.delivered / self.targeted if self.targeted else 0.0

    @property
    def read_rate(self) -> float:
        return self.read / self.targeted if self.targeted else 0.0


@dataclass(frozen=True, slots=True)
class Delivery:
    """One user's copy of a SELECTED broadcast."""

    user_id: str
    delivery_status: DeliveryStatus
    read_status: ReadStatus
    delivered_at: datetime | None
    read_at: datetime | None


@dataclass(frozen=True, slots=True)
class Page(Generic[T]):
    """One page of a cursor-paginated listing; ``next_cursor`` is None on the last page."""

    items: tuple[T, ...]
    next_cursor: str | None


@dataclass(frozen=True, slots=True)
class InboxItem:
    """A message as a user sees it: the broadcast, the user's row (SELECTED, or once read) and read state."""

    broadcast: Broadcast
    row_id: int | None
    read: bool
