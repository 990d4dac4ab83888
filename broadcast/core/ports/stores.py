"""The database's ports (SQL, or memory): users, the outbox, broadcasts and the inbox."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

from broadcast.core.domain import (
    Broadcast,
    BroadcastStats,
    BroadcastStatus,
    ClaimedOutboxEvent,
    DeadOutboxRow,
    Delivery,
    InboxItem,
    OutboxEvent,
    Page,
    User,
)
from broadcast.core.reach import ReachRow


class UserStore(Protocol):
    """Users and their roles, so that ALL and ROLE audiences can be counted."""

    async def upsert(self, users: Sequence[User]) -> None: ...

    async def get(self, user_id: str) -> User | None: ...

    async def get_many(self, user_ids: Sequence[str]) -> dict[str, User | None]:
        """``get`` for many users in one round trip: every id asked for is a key (None: no such user)."""
        ...

    async def count(self, roles: Sequence[str] | None = None) -> int:
        """All users, or the distinct users holding any of ``roles``."""
        ...


class OutboxStore(Protocol):
    """Events waiting to be published, split into lanes by key hash.

    A relay leases whole lanes (``claim_lanes``, ``FOR UPDATE SKIP LOCKED`` on the lane rows, committed at
    once), reads their due rows in id order and publishes them with no lock held; one owner per lane keeps
    per-key order while several relays share the work. ``among`` restricts a claim to a set of lanes (the
    normal or the priority class, ``constants.NORMAL_LANES``/``PRIORITY_LANES``); None: any lane.
    """

    async def append(self, events: Sequence[OutboxEvent]) -> list[int]: ...

    async def claim_lanes(
        self, owner: str, max_lanes: int, lease: timedelta, among: Sequence[int] | None = None
    ) -> list[int]:
        """Lease up to ``max_lanes`` lanes that have due rows and no live owner (least recently served first)."""
        ...

    async def release_lanes(self, owner: str, lanes: Sequence[int]) -> None: ...

    async def due(self, lane: int, limit: int) -> list[ClaimedOutboxEvent]:
        """The oldest unpublished rows of ``lane`` whose ``not_before`` has passed, in id order."""
        ...

    async def mark_published(self, ids: Sequence[int]) -> None: ...

    async def claim(
        self, owner: str, max_lanes: int, lease: timedelta, limit: int, among: Sequence[int] | None = None
    ) -> dict[int, list[ClaimedOutboxEvent]]:
        """``claim_lanes``, then ``due(lane, limit)`` of each lane it got, at once: the relay's round start."""
        ...

    async def finish(self, owner: str, lanes: Sequence[int], published: Sequence[int]) -> None:
        """``mark_published(published)`` and ``release_lanes(owner, lanes)`` at once (one transaction): the
        relay's round end."""
        ...

    async def record_failure(self, ids: Sequence[int], error: str, poison: bool = False) -> None:
        """Count a failed publish of each row (``poison``: the event log refused the record itself)."""
        ...

    async def bury(self, ids: Sequence[int]) -> int:
        """Move the rows to the dead state, out of their lanes (one transaction); how many moved."""
        ...

    async def dead(self, limit: int, before_id: int | None = None) -> list[DeadOutboxRow]:
        """Dead rows, newest first (ids below ``before_id``)."""
        ...

    async def dead_count(self) -> int: ...

    async def redrive_dead(self, dead_id: int) -> int | None:
        """Put a dead row back at the end of its lane, attempts reset; its new outbox id, None if unknown."""
        ...

    async def purge_dead(self, dead_id: int) -> bool: ...

    async def purge_published(self, older_than: timedelta, limit: int) -> int:
        """Delete at most ``limit`` rows published more than ``older_than`` ago; how many were deleted."""
        ...

    async def backlog(self) -> int: ...

    async def oldest_unpublished(self) -> datetime | None:
        """Since when the longest-waiting due row has been due (its ``not_before``, else when it was
        written); None when nothing due is unpublished. Rows scheduled for later are not waiting yet."""
        ...


class BroadcastStore(Protocol):
    """Broadcasts, their recipients' rows and their outbox rows, each change in one transaction."""

    async def create(
        self,
        broadcast: Broadcast,
        recipients: Sequence[str],
        events: Iterable[OutboxEvent],
        idempotency_key: str | None,
        request_hash: str,
    ) -> tuple[Broadcast, bool]:
        """Write everything or nothing; an existing ``idempotency_key`` returns that broadcast and False."""
        ...

    async def get(self, broadcast_id: str) -> Broadcast | None: ...

    async def list_broadcasts(
        self, status: BroadcastStatus | None, cursor: str | None, limit: int
    ) -> Page[Broadcast]: ...

    async def transition(
        self,
        broadcast_id: str,
        allowed: frozenset[BroadcastStatus],
        to: BroadcastStatus,
        events: Callable[[Broadcast], Sequence[OutboxEvent]],
        drop_undelivered: bool,
    ) -> Broadcast:
        """Move to ``to`` if the status is in ``allowed`` (else ConflictError), writing ``events`` with it."""
        ...

    async def due(self, status: BroadcastStatus, now: datetime, limit: int) -> list[str]:
        """SCHEDULED broadcasts whose time has come, or ACTIVE ones past their expiry."""
        ...

    async def stats(self, broadcast_id: str) -> BroadcastStats | None: ...

    async def deliveries(self, broadcast_id: str, cursor: str | None, limit: int) -> Page[Delivery]: ...

    def leadership(self, name: str) -> AbstractAsyncContextManager[bool]:
        """True inside the block for exactly one holder across processes (advisory lock)."""
        ...


@dataclass(frozen=True, slots=True)
class GroupPage:
    """The newest group broadcasts a query matched, oldest first; ``complete`` is False when older ones were
    left out (more than the limit matched, or more than the store scans), so a reader must say so (RESYNC)."""

    items: list[InboxItem]
    complete: bool


class InboxStore(Protocol):
    """What each user has, has missed and has read (see ``adapters/sql_inbox.py``)."""

    async def row_for(self, broadcast_id: str, user_id: str) -> int: ...

    async def rows_for(self, pairs: Sequence[tuple[str, str]]) -> dict[tuple[str, str], int]:
        """``row_for`` for many (broadcast id, user id) pairs at once (repeats allowed): their row ids, the
        missing rows created PENDING, existing rows left unchanged. ``RejectedByDatabaseError`` when a pair
        cannot have a row (an unknown broadcast): then none of the batch's missing rows was created."""
        ...

    async def pending(self, user_id: str, limit: int) -> list[InboxItem]:
        """The user's newest ``limit`` PENDING rows, oldest first."""
        ...

    async def pending_for(self, user_ids: Sequence[str], limit: int) -> list[tuple[str, InboxItem]]:
        """PENDING rows of any of ``user_ids`` (user id, item), oldest first — one query for many users."""
        ...

    async def selected_after(self, user_id: str, row_id: int, since: datetime, limit: int) -> list[InboxItem]:
        """A resume's SELECTED rows: after the cursor row ``row_id`` (0: created after ``since``), PENDING, or
        delivered since the cursor's moment ``since`` (the priority class overtakes older rows), in row order."""
        ...

    async def row_created_at(self, user_id: str, row_id: int) -> datetime | None: ...

    async def group(self, user_id: str, roles: frozenset[str], since: datetime | None, limit: int) -> GroupPage:
        """The user's visible ALL/ROLE broadcasts created after ``since`` (None: the unread ones): the newest
        ``limit`` of them, oldest first, and whether that is all of them."""
        ...

    async def inbox(self, user_id: str, roles: frozenset[str]) -> list[InboxItem]: ...

    async def mark_read(self, user_id: str, roles: frozenset[str], broadcast_ids: Sequence[str]) -> list[str]:
        """Mark read only what the user received or is targeted by; returns the newly read ids."""
        ...

    async def mark_delivered(self, pairs: Sequence[tuple[str, str]]) -> int:
        """SELECTED rows written to a live stream, as (broadcast id, user id): PENDING → DELIVERED; a pair
        without a row changes nothing. Returns how many rows changed."""
        ...

    async def user_numbers(self, user_ids: Sequence[str]) -> dict[str, int]:
        """Each user's number for the group tallies, assigned on first use (``broadcast/core/reach.py``)."""
        ...

    async def save_reach(self, rows: Sequence[ReachRow]) -> int:
        """Store group tallies, each replacing its earlier version; returns how many were stored (a tally of
        a broadcast that no longer exists is left out)."""
        ...

    async def pending_count(self) -> int:
        """SELECTED rows still PENDING, across all users."""
        ...
