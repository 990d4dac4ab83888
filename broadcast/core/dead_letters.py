"""Dead letters as the rest of the code sees them, and the ports of the dead-letter store and the fault drill.

A ``DeadLetter`` is one record of a ``<topic>-dlt`` topic, identified by where it sits there (topic,
partition, offset), with the original record's bytes and headers untouched and Spring's
``kafka_dlt-*`` headers read into fields. The SQL adapter is ``broadcast/adapters/sql/dlt.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Protocol

from broadcast.core.domain import OutboxEvent, Page


class DeadLetterStatus(StrEnum):
    NEW = "NEW"
    REDRIVEN = "REDRIVEN"


@dataclass(frozen=True, slots=True)
class DeadLetter:
    dlt_topic: str
    dlt_partition: int
    dlt_offset: int
    original_topic: str
    original_partition: int | None
    original_offset: int | None
    original_timestamp: datetime | None
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...]
    exception_fqcn: str | None
    exception_cause_fqcn: str | None
    exception_message: str | None
    stacktrace: str | None
    consumer_group: str | None
    broadcast_id: str | None
    user_id: str | None
    event_type: str | None
    id: int | None = None
    status: DeadLetterStatus = DeadLetterStatus.NEW
    received_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class DeadLetterFilter:
    """Which dead letters a listing, summary or bulk action covers; every field narrows, None = any."""

    original_topic: str | None = None
    exception_fqcn: str | None = None
    broadcast_id: str | None = None
    received_from: datetime | None = None
    received_to: datetime | None = None
    status: DeadLetterStatus | None = None


@dataclass(frozen=True, slots=True)
class SummaryRow:
    original_topic: str
    exception_fqcn: str | None
    count: int
    newest: datetime | None


@dataclass(frozen=True, slots=True)
class AuditEntry:
    at: datetime
    actor: str
    action: str
    dlt_message_id: int | None
    outcome: str
    detail: dict[str, object]


class DeadLetterStore(Protocol):
    async def save(self, letter: DeadLetter) -> bool:
        """Insert unless a letter at the same DLT position, or for the same failed record (group, original
        topic, partition, offset), exists (False then). On insert, in the same
        transaction, mark the delivery failed: the user's PENDING row of a SELECTED broadcast becomes
        FAILED; for an ALL/ROLE broadcast the statistics' ``failed`` counter goes up by one."""
        ...

    async def get(self, letter_id: int) -> DeadLetter | None: ...

    async def page(self, where: DeadLetterFilter, cursor: int | None, limit: int) -> Page[DeadLetter]:
        """Newest first; the cursor is the id the next page starts below."""
        ...

    async def batch(self, where: DeadLetterFilter, after_id: int, limit: int) -> list[DeadLetter]:
        """Oldest first from ``after_id`` (exclusive): how bulk actions walk a filter."""
        ...

    async def summary(self, where: DeadLetterFilter) -> list[SummaryRow]: ...

    async def count_by_status(self) -> dict[str, int]:
        """Letters per status (every status named, zeros included)."""
        ...

    async def redrive(self, letter: DeadLetter, event: OutboxEvent, actor: str) -> bool:
        """In one transaction: NEW -> REDRIVEN, ``event`` into the outbox, the user's FAILED row back to
        PENDING (or the group failure counter down by one), an audit entry. False (and nothing written
        but the audit entry) when the letter was already redriven."""
        ...

    async def delete(self, letter_ids: Sequence[int], actor: str, action: str) -> int:
        """Delete and audit; how many were deleted."""
        ...

    async def audit(
        self, actor: str, action: str, letter_id: int | None, outcome: str, detail: dict[str, object]
    ) -> None: ...

    async def audit_trail(self, letter_id: int) -> list[AuditEntry]: ...


@dataclass(frozen=True, slots=True)
class Drill:
    id: int
    broadcast_id: str | None
    armed_by: str
    armed_at: datetime
    expires_at: datetime
    fail_redrives: bool = False  # redriven records of the broadcast fail too (otherwise they never do)


class DrillStore(Protocol):
    """Armed fault drills (see ``dlt/drill.py``)."""

    async def arm(
        self, actor: str, broadcast_id: str | None, expires_at: datetime, fail_redrives: bool = False
    ) -> Drill: ...

    async def armed(self, now: datetime) -> list[Drill]: ...

    async def disarm(self, drill_id: int, now: datetime) -> bool:
        """Ends an armed drill now; False if there is no such unexpired drill."""
        ...

    async def applies(self, broadcast_id: str, created_at: datetime, now: datetime, redriven: bool = False) -> bool:
        """True if an unexpired drill names ``broadcast_id``; otherwise binds the oldest unexpired drill for
        "the next broadcast" armed no later than ``created_at`` to it (one winner across processes). For a
        ``redriven`` record only a drill that names the broadcast with ``fail_redrives`` counts (none is
        bound by it)."""
        ...
