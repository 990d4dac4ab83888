"""In-memory adapters for the database ports (unit tests and the contract suite's reference)."""

from __future__ import annotations

import itertools
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from broadcast import constants
from broadcast.domain import ClaimedOutboxEvent, OutboxEvent, User


class MemoryUserStore:
    def __init__(self) -> None:
        self._users: dict[str, User] = {}

    async def upsert(self, batch: Sequence[User]) -> None:
        self._users.update({u.id: u for u in batch})

    async def get(self, user_id: str) -> User | None:
        return self._users.get(user_id)

    async def count(self, roles: Sequence[str] | None = None) -> int:
        return sum(1 for u in self._users.values() if roles is None or u.roles & set(roles))


@dataclass
class _Row:
    id: int
    lane: int
    event: OutboxEvent
    created_at: datetime
    attempts: int = 0
    published_at: datetime | None = None
    last_error: str | None = None


class MemoryOutboxStore:
    def __init__(self) -> None:
        self._rows: dict[int, _Row] = {}
        self._ids = itertools.count(1)
        self._lanes: dict[int, tuple[str | None, datetime | None]] = dict.fromkeys(
            range(constants.OUTBOX_LANES), (None, None)
        )

    async def append(self, events: Sequence[OutboxEvent]) -> list[int]:
        now = datetime.now(UTC)
        ids = []
        for event in events:
            row = _Row(next(self._ids), zlib.crc32(event.key.encode()) % constants.OUTBOX_LANES, event, now)
            self._rows[row.id] = row
            ids.append(row.id)
        return ids

    def _due_rows(self, lane: int, now: datetime) -> list[_Row]:
        return sorted(
            (
                r
                for r in self._rows.values()
                if r.lane == lane
                and r.published_at is None
                and (r.event.not_before is None or r.event.not_before <= now)
            ),
            key=lambda r: r.id,
        )

    async def claim_lanes(self, owner: str, max_lanes: int, lease: timedelta) -> list[int]:
        now = datetime.now(UTC)
        free = [
            lane
            for lane, (holder, until) in self._lanes.items()
            if (holder is None or holder == owner or (until is not None and until < now)) and self._due_rows(lane, now)
        ]
        free.sort(key=lambda lane: (self._lanes[lane][1] or datetime.min.replace(tzinfo=UTC), lane))
        claimed = sorted(free[:max_lanes])
        for lane in claimed:
            self._lanes[lane] = (owner, now + lease)
        return claimed

    async def release_lanes(self, owner: str, lanes: Sequence[int]) -> None:
        now = datetime.now(UTC)
        for lane in lanes:
            if self._lanes[lane][0] == owner:
                self._lanes[lane] = (None, now)

    async def due(self, lane: int, limit: int) -> list[ClaimedOutboxEvent]:
        rows = self._due_rows(lane, datetime.now(UTC))[:limit]
        return [ClaimedOutboxEvent(r.id, r.event, r.created_at, r.attempts) for r in rows]

    async def mark_published(self, ids: Sequence[int]) -> None:
        now = datetime.now(UTC)
        for i in ids:
            self._rows[i].published_at = now

    async def record_failure(self, ids: Sequence[int], error: str) -> None:
        for i in ids:
            self._rows[i].attempts += 1
            self._rows[i].last_error = error

    async def purge_published(self, older_than: timedelta, limit: int) -> int:
        cutoff = datetime.now(UTC) - older_than
        old = [i for i, r in self._rows.items() if r.published_at is not None and r.published_at < cutoff][:limit]
        for i in old:
            del self._rows[i]
        return len(old)

    async def backlog(self) -> int:
        return sum(1 for r in self._rows.values() if r.published_at is None)

    async def oldest_unpublished(self) -> datetime | None:
        now = datetime.now(UTC)
        due = [
            r.event.not_before or r.created_at
            for r in self._rows.values()
            if r.published_at is None and (r.event.not_before is None or r.event.not_before <= now)
        ]
        return min(due, default=None)
