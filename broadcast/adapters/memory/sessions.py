"""In-process SSE tickets and connection slots for the embedded default (one process sees everything)."""

from __future__ import annotations

import secrets
import time
from collections.abc import Sequence

from broadcast.core.domain import Principal

TICKET_BYTES = 32
MAX_TICKETS = 100_000


class MemoryTickets:
    def __init__(self) -> None:
        self._tickets: dict[str, tuple[Principal, float]] = {}

    async def issue(self, principal: Principal, ttl_s: int) -> str:
        now = time.monotonic()
        if len(self._tickets) >= MAX_TICKETS:
            self._tickets = {t: e for t, e in self._tickets.items() if e[1] > now}
            while len(self._tickets) >= MAX_TICKETS:  # all still live: the oldest goes
                del self._tickets[next(iter(self._tickets))]
        ticket = secrets.token_urlsafe(TICKET_BYTES)
        self._tickets[ticket] = (principal, now + ttl_s)
        return ticket

    async def redeem(self, ticket: str) -> Principal | None:
        entry = self._tickets.pop(ticket, None)
        if entry is None or entry[1] <= time.monotonic():
            return None
        return entry[0]


class MemorySlots:
    def __init__(self, ttl_seconds: float = 30.0) -> None:
        self._ttl = ttl_seconds
        self._slots: dict[str, dict[str, float]] = {}

    async def acquire(self, user_id: str, slot: str, limit: int) -> bool:
        now = time.monotonic()
        live = {s: e for s, e in self._slots.get(user_id, {}).items() if e > now}
        if len(live) >= limit:
            return False
        live[slot] = now + self._ttl
        self._slots[user_id] = live
        return True

    async def release(self, user_id: str, slot: str) -> None:
        held = self._slots.get(user_id, {})
        held.pop(slot, None)
        if not held:
            self._slots.pop(user_id, None)

    async def refresh(self, slots: Sequence[tuple[str, str]]) -> None:
        expiry = time.monotonic() + self._ttl
        for user_id, slot in slots:  # re-adds a slot that expired or was never registered
            self._slots.setdefault(user_id, {})[slot] = expiry
