"""In-memory adapters for the database ports (unit tests and the contract suite's reference)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from broadcast.domain import ClaimedOutboxEvent, OutboxEvent, User


class MemoryUserStore:
    def __init__(self) -> None:
        self._users: dict[str, User] = {}

    async def upsert(self, batch: Sequence[User]) -> None:
        self._users.update({u.id: u for u in batch})

    async def get(self, user_id: str) -> User | None:
        return self._users.get(user_id)

    async def count(self, role: str | None = None) -> int:
        return sum(1 for u in self._users.values() if role is None or role in u.roles)


@dataclass
class _Row:
    id: int
    event: OutboxEvent
    created_at: datetime
    attempts: int = 0
    claimed_until: datetime | None = None
    published_at: datetime | None = None
    last_error: str | None = None


class MemoryOutboxStore:
    def __init__(self) -> None:
        self._rows: dict[int, _Row] = {}
        self._ids = itertools.count(1)

    async def append(self, events: Sequence[OutboxEvent]) -> list[int]:
        now = datetime.now(UTC)
        ids = []
        for event in events:
            row = _Row(next(self._ids), event, now)
            self._rows[row.id] = row
            ids.append(row.id)
        return ids

    async def claim(self, limit: int, lease: timedelta) -> list[ClaimedOutboxEvent]:
        now = datetime.now(UTC)
        free = [
            r
            for r in sorted(self._rows.values(), key=lambda r: r.id)
            if r.published_at is None and (r.claimed_until is None or r.claimed_until < now)
        ][:limit]
        for row in free:
            row.claimed_until = now + lease
            row.attempts += 1
        return [ClaimedOutboxEvent(r.id, r.event, r.created_at, r.attempts) for r in free]

    async def mark_published(self, ids: Sequence[int]) -> None:
        now = datetime.now(UTC)
        for i in ids:
            self._rows[i].published_at = now
            self._rows[i].claimed_until = None

    async def release(self, ids: Sequence[int], error: str) -> None:
        for i in ids:
            self._rows[i].claimed_until = None
            self._rows[i].last_error = error

    async def backlog(self) -> int:
        return sum(1 for r in self._rows.values() if r.published_at is None)
