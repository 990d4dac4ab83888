"""HTTP request and response models of the admin API: camelCase on the wire, unknown fields refused.

Request models are strict (``http_body.validated`` validates the JSON text in strict mode): each field takes
its own JSON type only, and a date-time is an ISO-8601 string with an offset (never a number, nor a string of
digits read as epoch seconds).

These are distinct from the domain values (``broadcast.core.domain``): requests convert to them with
``to_domain`` and responses are built from them with ``of``. Bounds that depend on settings (content length,
id counts) are checked by the lifecycle service; the bounds here are the fixed ones of the wire format.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated

import orjson
from pydantic import (
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    field_validator,
)
from pydantic.alias_generators import to_camel

from broadcast.core.domain import (
    Broadcast,
    BroadcastStats,
    BroadcastStatus,
    Delivery,
    DeliveryStatus,
    NewBroadcast,
    Priority,
    ReadStatus,
    TargetType,
    User,
    rfc3339,
)

ROLE_PATTERN = r"^[A-Za-z0-9_.:-]{1,64}$"
# A moment in an answer: RFC 3339, UTC, ``Z``, six fractional digits (``broadcast.core.domain.rfc3339``).
Timestamp = Annotated[datetime, PlainSerializer(rfc3339, return_type=str, when_used="json")]
RoleName = Annotated[str, StringConstraints(pattern=ROLE_PATTERN)]
MAX_ROLES_PER_USER = 100
MAX_DISPLAY_NAME_CHARS = 200


class CamelModel(BaseModel):
    """Base of every wire model: camelCase on the wire, unknown fields refused; built in code by field name."""

    model_config = ConfigDict(alias_generator=to_camel, validate_by_alias=True, validate_by_name=True, extra="forbid")

    def to_json(self) -> bytes:
        return orjson.dumps(self.model_dump(mode="json", by_alias=True))


class RequestModel(CamelModel):
    """Base of request bodies: only the camelCase names are accepted (``target_type`` is an unknown field),
    and only values of the field's own JSON type (strict)."""

    model_config = ConfigDict(validate_by_name=False, strict=True)


def _integral(value: object) -> object:
    return int(value) if isinstance(value, float) and value.is_integer() else value


# An integer field of a request: a JSON number without a fraction, written `46` or `46.0` (JSON Schema's
# `integer`, and JavaScript's numbers, make no difference); `46.5`, `"46"` and `true` are refused.
WholeNumber = Annotated[int, BeforeValidator(_integral)]

_ISO_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
_DATE_TIME = TypeAdapter(AwareDatetime)
ISO_DATE_TIME_HINT = "expected an ISO-8601 date-time string with an offset, e.g. 2030-01-01T10:00:00Z"


def _iso_date_time(value: object) -> object:
    """An ISO-8601 string parsed by pydantic's own date-time parser; anything else is left for the strict
    check to refuse. (A before-validator hands its result on in Python mode, where strict mode takes no
    strings; and pydantic's parser alone would also read a string of digits as epoch seconds.)"""
    if not isinstance(value, str):
        return value
    if not _ISO_DATE.match(value):
        raise ValueError(ISO_DATE_TIME_HINT)
    try:
        return _DATE_TIME.validate_strings(value)
    except ValidationError as exc:
        raise ValueError(exc.errors(include_url=False, include_input=False)[0]["msg"]) from None


IsoDateTime = Annotated[AwareDatetime, BeforeValidator(_iso_date_time)]


# --------------------------------------------------------------------------- user inbox
MAX_READ_IDS = 500
MAX_BROADCAST_ID_CHARS = 64


class MarkReadRequest(RequestModel):
    """``POST /api/user/messages/read``: the caller's own messages to mark read (ids of other users'
    messages change nothing)."""

    broadcast_ids: Annotated[
        list[Annotated[str, StringConstraints(min_length=1, max_length=MAX_BROADCAST_ID_CHARS)]],
        Field(min_length=1, max_length=MAX_READ_IDS),
    ]


# --------------------------------------------------------------------------- broadcasts in
class BroadcastFields(RequestModel):
    """What the JSON and the CSV forms of a create request share."""

    content: str
    priority: Priority = Priority.NORMAL
    category: str | None = None
    scheduled_at: IsoDateTime | None = None
    expires_at: IsoDateTime | None = None
    fire_and_forget: bool = False


CSV_TARGET_HINT = (
    "must be SELECTED: a CSV upload's recipients are the user ids of the file (ALL and ROLE take no id list; "
    "create those with POST /api/admin/broadcasts)"
)


class CreateBroadcastRequest(BroadcastFields):
    """``POST /api/admin/broadcasts``; ``targetIds`` are user ids (SELECTED), role names (ROLE), empty for ALL."""

    target_type: TargetType
    target_ids: list[str] = Field(default_factory=list)

    def to_domain(self) -> NewBroadcast:
        return _new_broadcast(self, self.target_type, tuple(self.target_ids))


class CsvBroadcastForm(BroadcastFields):
    """The form fields beside the ``file`` part of ``POST /api/admin/broadcasts/csv``: the create request's
    fields but ``targetIds`` (the file holds the user ids); ``targetType`` may be given and must be SELECTED."""

    target_type: TargetType = TargetType.SELECTED

    @field_validator("target_type")
    @classmethod
    def _selected_only(cls, value: TargetType) -> TargetType:
        if value is not TargetType.SELECTED:
            raise ValueError(CSV_TARGET_HINT)
        return value

    def to_domain(self) -> NewBroadcast:
        return _new_broadcast(self, TargetType.SELECTED, ())


def _new_broadcast(fields: BroadcastFields, target_type: TargetType, ids: tuple[str, ...]) -> NewBroadcast:
    return NewBroadcast(
        content=fields.content,
        target_type=target_type,
        target_ids=ids,
        priority=fields.priority,
        category=fields.category,
        scheduled_at=fields.scheduled_at,
        expires_at=fields.expires_at,
        fire_and_forget=fields.fire_and_forget,
    )


# --------------------------------------------------------------------------- broadcasts out
class BroadcastOut(CamelModel):
    """A saved broadcast as the admin API shows it."""

    id: str
    sender_id: str
    content: str
    target_type: TargetType
    target_roles: list[str]
    priority: Priority
    category: str | None
    status: BroadcastStatus
    fire_and_forget: bool
    targeted_count: int
    created_at: Timestamp
    updated_at: Timestamp
    scheduled_at: Timestamp | None
    expires_at: Timestamp | None
    correlation_id: str | None

    @classmethod
    def of(cls, b: Broadcast) -> BroadcastOut:
        return cls(
            id=b.id,
            sender_id=b.sender_id,
            content=b.content,
            target_type=b.target_type,
            target_roles=list(b.target_roles),
            priority=b.priority,
            category=b.category,
            status=b.status,
            fire_and_forget=b.fire_and_forget,
            targeted_count=b.targeted_count,
            created_at=b.created_at,
            updated_at=b.updated_at,
            scheduled_at=b.scheduled_at,
            expires_at=b.expires_at,
            correlation_id=b.correlation_id,
        )


class RecipientsOut(CamelModel):
    """How a CSV upload's rows were counted: distinct ids accepted, repeated rows collapsed."""

    accepted: int
    duplicates: int


class CsvBroadcastOut(BroadcastOut):
    recipients: RecipientsOut


class BroadcastPage(CamelModel):
    items: list[BroadcastOut]
    next_cursor: str | None


class StatsOut(CamelModel):
    """targeted = delivered + failed + pending + cancelled + expired; ``read`` counts within ``delivered``."""

    broadcast_id: str
    targeted: int
    delivered: int
    read: int
    failed: int
    pending: int = Field(description="targeted users it can still reach (0 once CANCELLED or EXPIRED)")
    cancelled: int = Field(description="targeted users it had not reached when it was cancelled")
    expired: int = Field(description="targeted users it had not reached when it expired")
    delivery_rate: float
    read_rate: float

    @classmethod
    def of(cls, s: BroadcastStats) -> StatsOut:
        return cls(
            broadcast_id=s.broadcast_id,
            targeted=s.targeted,
            delivered=s.delivered,
            read=s.read,
            failed=s.failed,
            pending=s.pending,
            cancelled=s.cancelled,
            expired=s.expired,
            delivery_rate=s.delivery_rate,
            read_rate=s.read_rate,
        )


class DeliveryOut(CamelModel):
    user_id: str
    delivery_status: DeliveryStatus
    read_status: ReadStatus
    delivered_at: Timestamp | None
    read_at: Timestamp | None

    @classmethod
    def of(cls, d: Delivery) -> DeliveryOut:
        return cls(
            user_id=d.user_id,
            delivery_status=d.delivery_status,
            read_status=d.read_status,
            delivered_at=d.delivered_at,
            read_at=d.read_at,
        )


class DeliveryPage(CamelModel):
    items: list[DeliveryOut]
    next_cursor: str | None


# --------------------------------------------------------------------------- users
Roles = Annotated[list[RoleName], Field(max_length=MAX_ROLES_PER_USER)]
DisplayName = Annotated[str, StringConstraints(max_length=MAX_DISPLAY_NAME_CHARS, pattern=r"^[^\x00]*$")]


class UserBody(RequestModel):
    """``PUT /api/admin/users/{id}``: the user's display name and the full set of roles (replaced)."""

    display_name: DisplayName | None = None
    roles: Roles = Field(default_factory=list)

    def to_domain(self, user_id: str) -> User:
        return User(id=user_id, display_name=self.display_name or "", roles=frozenset(self.roles))


class UserImport(UserBody):
    """One entry of ``POST /api/admin/users/bulk``; the id is checked by the route against the settings."""

    id: str


class UserOut(CamelModel):
    id: str
    display_name: str
    roles: list[str]

    @classmethod
    def of(cls, u: User) -> UserOut:
        return cls(id=u.id, display_name=u.display_name, roles=sorted(u.roles))


class ImportOut(CamelModel):
    imported: int
