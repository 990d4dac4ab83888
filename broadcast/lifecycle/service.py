"""The broadcast lifecycle: create, cancel, activate when due, expire — each one database transaction.

A broadcast and everything it implies (SELECTED recipients' PENDING rows, the outbox rows the relay will
publish) are written together or not at all; nothing here awaits Kafka. Event shapes (docs/DESIGN.md §2):
SELECTED → one CREATED event per recipient on the selected topic keyed by user id; ALL/ROLE → one CREATED
event on the group topic keyed by broadcast id; CANCELLED and EXPIRED → one group event each. A scheduled
broadcast's CREATED rows carry ``not_before = scheduledAt``, so they publish when due even if the
scheduler's status flip lags a tick behind.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import UTC, datetime

import orjson

from broadcast.core.domain import (
    Broadcast,
    BroadcastStats,
    BroadcastStatus,
    Delivery,
    EventType,
    NewBroadcast,
    Page,
    TargetType,
    is_user_id,
)
from broadcast.core.event_shapes import EventShapes
from broadcast.core.ports.stores import BroadcastStore, UserStore
from broadcast.core.settings import KafkaSettings, LimitsSettings
from broadcast.errors import NotFoundError, ValidationError

Clock = Callable[[], datetime]
CANCELLABLE = frozenset({BroadcastStatus.SCHEDULED, BroadcastStatus.ACTIVE})


def utc_now() -> datetime:
    return datetime.now(UTC)


class Lifecycle:
    """Validates admin requests and turns them into store transactions; the HTTP layer calls only this."""

    def __init__(
        self,
        store: BroadcastStore,
        users: UserStore,
        kafka: KafkaSettings,
        limits: LimitsSettings,
        clock: Clock = utc_now,
        on_outbox: Callable[[], None] = lambda: None,
    ) -> None:
        self._store = store
        self._users = users
        self.events = EventShapes(kafka, clock)
        self._limits = limits
        self._clock = clock
        self._on_outbox = on_outbox

    # ------------------------------------------------------------------ commands
    async def create(
        self,
        request: NewBroadcast,
        *,
        sender_id: str,
        recipients: Sequence[str] | None = None,
        idempotency_key: str | None = None,
        correlation_id: str | None = None,
    ) -> tuple[Broadcast, bool]:
        """Save a broadcast; returns it and whether it was created now (False: an idempotent replay).

        ``recipients`` overrides ``request.target_ids`` for SELECTED (the CSV upload passes them here).
        A ``scheduledAt`` in the past means now; an ``expiresAt`` not in the future is rejected.
        """
        now = self._clock()
        request = _in_utc(request)
        content = request.content  # kept exactly as sent; only a blank one is refused
        ids = self._audience(request, recipients)
        self._validate(request, content, now)
        status = (
            BroadcastStatus.SCHEDULED
            if request.scheduled_at is not None and request.scheduled_at > now
            else BroadcastStatus.ACTIVE
        )
        broadcast = Broadcast(
            id=str(uuid.uuid4()),
            sender_id=sender_id,
            content=content,
            target_type=request.target_type,
            target_roles=ids if request.target_type is TargetType.ROLE else (),
            priority=request.priority,
            category=request.category,
            status=status,
            fire_and_forget=request.fire_and_forget,
            targeted_count=await self._targeted(request.target_type, ids),
            created_at=now,
            updated_at=now,
            scheduled_at=request.scheduled_at if status is BroadcastStatus.SCHEDULED else None,
            expires_at=request.expires_at,
            correlation_id=correlation_id,
        )
        selected = request.target_type is TargetType.SELECTED
        rows = ids if selected and not request.fire_and_forget else ()
        events = (
            self.events.created_for_users(broadcast, ids)
            if selected
            else [self.events.group(broadcast, EventType.CREATED)]
        )
        saved, created = await self._store.create(
            broadcast, rows, events, idempotency_key, _request_hash(request, content, ids, sender_id)
        )
        if created:
            self._on_outbox()
        return saved, created

    async def cancel(self, broadcast_id: str) -> Broadcast:
        """SCHEDULED/ACTIVE → CANCELLED, dropping undelivered CREATED events; otherwise ConflictError."""
        return await self._transition(broadcast_id, CANCELLABLE, BroadcastStatus.CANCELLED, EventType.CANCELLED)

    async def activate(self, broadcast_id: str) -> Broadcast:
        """SCHEDULED → ACTIVE (its CREATED events were written at creation with ``not_before``)."""
        broadcast = await self._store.transition(
            broadcast_id,
            frozenset({BroadcastStatus.SCHEDULED}),
            BroadcastStatus.ACTIVE,
            lambda b: [],
            drop_undelivered=False,
        )
        self._on_outbox()
        return broadcast

    async def expire(self, broadcast_id: str) -> Broadcast:
        """ACTIVE → EXPIRED with one EXPIRED group event."""
        return await self._transition(
            broadcast_id, frozenset({BroadcastStatus.ACTIVE}), BroadcastStatus.EXPIRED, EventType.EXPIRED
        )

    # ------------------------------------------------------------------ queries
    async def get(self, broadcast_id: str) -> Broadcast:
        broadcast = await self._store.get(broadcast_id)
        if broadcast is None:
            raise NotFoundError(f"broadcast {broadcast_id} does not exist")
        return broadcast

    async def list_broadcasts(self, status: BroadcastStatus | None, cursor: str | None, limit: int) -> Page[Broadcast]:
        return await self._store.list_broadcasts(status, cursor, self._page_size(limit))

    async def stats(self, broadcast_id: str) -> BroadcastStats:
        stats = await self._store.stats(broadcast_id)
        if stats is None:
            raise NotFoundError(f"broadcast {broadcast_id} does not exist")
        return stats

    async def deliveries(self, broadcast_id: str, cursor: str | None, limit: int) -> Page[Delivery]:
        await self.get(broadcast_id)
        return await self._store.deliveries(broadcast_id, cursor, self._page_size(limit))

    async def due(self, now: datetime, limit: int = 500) -> tuple[list[str], list[str]]:
        """Ids of broadcasts to activate and to expire at ``now``."""
        return (
            await self._store.due(BroadcastStatus.SCHEDULED, now, limit),
            await self._store.due(BroadcastStatus.ACTIVE, now, limit),
        )

    # ------------------------------------------------------------------ helpers
    async def _transition(
        self, broadcast_id: str, allowed: frozenset[BroadcastStatus], to: BroadcastStatus, event: EventType
    ) -> Broadcast:
        broadcast = await self._store.transition(
            broadcast_id, allowed, to, lambda b: [self.events.group(b, event)], drop_undelivered=True
        )
        self._on_outbox()
        return broadcast

    def _page_size(self, limit: int) -> int:
        if not 1 <= limit <= self._limits.max_page_size:
            raise ValidationError(f"limit must be between 1 and {self._limits.max_page_size}")
        return limit

    def _audience(self, request: NewBroadcast, recipients: Sequence[str] | None) -> tuple[str, ...]:
        raw = request.target_ids if recipients is None else recipients
        if request.target_type is TargetType.ALL:
            if raw:
                raise ValidationError("targetIds must be empty when targetType is ALL")
            return ()
        if recipients is None and len(raw) > self._limits.max_json_target_ids:
            raise ValidationError(
                f"at most {self._limits.max_json_target_ids} targetIds per request; upload a CSV for more"
            )
        ids = tuple(dict.fromkeys(raw))  # duplicates collapse, order kept; ids are taken as sent, never trimmed
        if not ids:
            raise ValidationError(f"targetType {request.target_type.value} needs at least one targetId")
        for i in ids:
            if not is_user_id(i, self._limits.max_user_id_chars):
                raise ValidationError(f"invalid target id {i[:40]!r}")
        return ids

    def _validate(self, request: NewBroadcast, content: str, now: datetime) -> None:
        if not content.strip():
            raise ValidationError("content must not be empty or whitespace only")
        if "\x00" in content or (request.category and "\x00" in request.category):
            raise ValidationError("content and category must not contain NUL characters")
        if len(content) > self._limits.max_content_chars:
            raise ValidationError(f"content exceeds {self._limits.max_content_chars} characters")
        if request.category is not None and len(request.category) > self._limits.max_category_chars:
            raise ValidationError(f"category exceeds {self._limits.max_category_chars} characters")
        for name, value in (("scheduledAt", request.scheduled_at), ("expiresAt", request.expires_at)):
            if value is not None and value.tzinfo is None:
                raise ValidationError(f"{name} needs a timezone offset")
        if request.expires_at is not None:
            if request.expires_at <= now:
                raise ValidationError("expiresAt is in the past")
            if request.scheduled_at is not None and request.expires_at <= request.scheduled_at:
                raise ValidationError("expiresAt must be after scheduledAt")

    async def _targeted(self, target_type: TargetType, ids: tuple[str, ...]) -> int:
        if target_type is TargetType.SELECTED:
            return len(ids)
        return await self._users.count(None if target_type is TargetType.ALL else ids)


def _in_utc(request: NewBroadcast) -> NewBroadcast:
    """Times in UTC: SQLite keeps no offset, so a +05:00 time would otherwise fire five hours off."""
    return replace(
        request,
        scheduled_at=_utc(request.scheduled_at, "scheduledAt"),
        expires_at=_utc(request.expires_at, "expiresAt"),
    )


def _utc(moment: datetime | None, field: str) -> datetime | None:
    if moment is None or moment.tzinfo is None:
        return moment
    try:
        return moment.astimezone(UTC)
    except OverflowError:  # e.g. 0001-01-01T00:00+01:00 is before the first representable UTC moment
        raise ValidationError(f"{field} is out of range") from None


def _request_hash(request: NewBroadcast, content: str, ids: Sequence[str], sender_id: str) -> str:
    """A digest of what was asked, to tell an idempotent replay from a different request under one key."""
    digest = hashlib.sha256()
    digest.update(
        orjson.dumps(
            [
                sender_id,
                content,
                request.target_type.value,
                request.priority.value,
                request.category,
                request.scheduled_at.isoformat() if request.scheduled_at else None,
                request.expires_at.isoformat() if request.expires_at else None,
                request.fire_and_forget,
            ]
        )
    )
    for i in ids:
        digest.update(i.encode() + b"\n")
    return digest.hexdigest()
