"""In-memory adapters for the database ports (unit tests and the contract suite's reference)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from broadcast.core import constants
from broadcast.core.domain import ClaimedOutboxEvent, DeadOutboxRow, OutboxEvent, User, outbox_lane


class MemoryUserStore:
    def __init__(self) -> None:
        self._users: dict[str, User] = {}

    async def upsert(self, batch: Sequence[User]) -> None:
        self._users.update({u.id: u for u in batch})

    async def get(self, user_id: str) -> User | None:
        return self._users.get(user_id)

    async def get_many(self, user_ids: Sequence[str]) -> dict[str, User | None]:
        return {user_id: self._users.get(user_id) for user_id in user_ids}

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
    poison_attempts: int = 0


class MemoryOutboxStore:
    def __init__(self) -> None:
        self._rows: dict[int, _Row] = {}
        self._ids = itertools.count(1)
        self._dead: dict[int, DeadOutboxRow] = {}
        self._dead_ids = itertools.count(1)
        self._lanes: dict[int, tuple[str | None, datetime | None]] = dict.fromkeys(
            [*constants.NORMAL_LANES, *constants.PRIORITY_LANES], (None, None)
        )

    async def append(self, events: Sequence[OutboxEvent]) -> list[int]:
        now = datetime.now(UTC)
        ids = []
        for event in events:
            row = _Row(next(self._ids), outbox_lane(event.key, event.headers), event, now)
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

    async def claim_lanes(
        self, owner: str, max_lanes: int, lease: timedelta, among: Sequence[int] | None = None
    ) -> list[int]:
        now = datetime.now(UTC)
        free = [
            lane
            for lane, (holder, until) in self._lanes.items()
            if (among is None or lane in among)
            and (holder is None or holder == owner or (until is not None and until < now))
            and self._due_rows(lane, now)
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

    async def claim(
        self, owner: str, max_lanes: int, lease: timedelta, limit: int, among: Sequence[int] | None = None
    ) -> dict[int, list[ClaimedOutboxEvent]]:
        lanes = await self.claim_lanes(owner, max_lanes, lease, among)
        return {lane: await self.due(lane, limit) for lane in lanes}

    async def finish(self, owner: str, lanes: Sequence[int], published: Sequence[int]) -> None:
        await self.mark_published(published)
        await self.release_lanes(owner, lanes)

    async def due(self, lane: int, limit: int) -> list[ClaimedOutboxEvent]:
        rows = self._due_rows(lane, datetime.now(UTC))[:limit]
        return [ClaimedOutboxEvent(r.id, r.event, r.created_at, r.attempts, r.poison_attempts) for r in rows]

    async def mark_published(self, ids: Sequence[int]) -> None:
        now = datetime.now(UTC)
        for i in ids:
            self._rows[i].published_at = now

    async def record_failure(self, ids: Sequence[int], error: str, poison: bool = False) -> None:
        for i in ids:
            self._rows[i].attempts += 1
            self._rows[i].poison_attempts += int(poison)
            self._rows[i].last_error = error

    async def bury(self, ids: Sequence[int]) -> int:
        now = datetime.now(UTC)
        for i in ids:
            r = self._rows.pop(i)
            dead_id = next(self._dead_ids)
            self._dead[dead_id] = DeadOutboxRow(dead_id, r.id, r.event, r.attempts, r.last_error, r.created_at, now)
        return len(ids)

    async def dead(self, limit: int, before_id: int | None = None) -> list[DeadOutboxRow]:
        rows = sorted((d for d in self._dead.values() if before_id is None or d.id < before_id), key=lambda d: -d.id)
        return rows[:limit]

    async def dead_count(self) -> int:
        return len(self._dead)

    async def redrive_dead(self, dead_id: int) -> int | None:
        row = self._dead.pop(dead_id, None)
        return None if row is None else (await self.append([row.event]))[0]

    async def purge_dead(self, dead_id: int) -> bool:
        return self._dead.pop(dead_id, None) is not None

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
