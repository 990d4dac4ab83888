"""The ports of the shared fast state (Redis, or memory): the bus, presence, SSE tickets, connection slots;
and the health check every dependency answers."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Protocol

from broadcast.core.domain import (
    Principal,
)


@dataclass(frozen=True, slots=True)
class BusMessage:
    channel: str
    payload: bytes


class BusSubscription(Protocol):
    async def get(self, timeout_s: float = 1.0) -> BusMessage | None:
        """The next message, or None after ``timeout_s`` (0: only one that has already arrived)."""
        ...


class Bus(Protocol):
    """At-most-once fan-out between instances (Redis pub/sub, or in-process)."""

    async def publish(self, channel: str, payload: bytes) -> int:
        """Send ``payload`` to current subscribers of ``channel``; returns how many received it."""
        ...

    async def publish_many(self, messages: Sequence[tuple[str, bytes]]) -> list[int]:
        """``publish`` for many (channel, payload) messages in one round trip, sent in order; the receiver
        counts in the same order. On ``UnavailableError`` some of them may have gone out."""
        ...

    def subscribe(self, channels: Sequence[str]) -> AbstractAsyncContextManager[BusSubscription]: ...


class Presence(Protocol):
    """Which instances hold live connections of a user; entries expire unless heartbeated."""

    async def heartbeat(self, user_id: str, instance_id: str) -> None: ...

    async def heartbeat_many(self, user_ids: Sequence[str], instance_id: str) -> None:
        """``heartbeat`` for many users in one round trip (an instance refreshing all its users)."""
        ...

    async def leave(self, user_id: str, instance_id: str) -> None: ...

    async def instances(self, user_id: str) -> frozenset[str]: ...

    async def instances_many(self, user_ids: Sequence[str]) -> dict[str, frozenset[str]]:
        """``instances`` of many users in one round trip: every user asked about is a key (empty: offline)."""
        ...


class TicketStore(Protocol):
    """Single-use SSE tickets: ``issue`` binds one to a principal for ``ttl_s``; ``redeem`` consumes it."""

    async def issue(self, principal: Principal, ttl_s: int) -> str: ...

    async def redeem(self, ticket: str) -> Principal | None:
        """The ticket's principal, once; None when unknown, used or expired. Raises ``UnavailableError``."""
        ...


class ConnectionSlots(Protocol):
    """Open streams per user across all instances; a slot expires unless refreshed (a crashed instance's
    slots free themselves)."""

    async def acquire(self, user_id: str, slot: str, limit: int) -> bool:
        """Take ``slot`` for ``user_id`` unless the user already holds ``limit`` live slots."""
        ...

    async def release(self, user_id: str, slot: str) -> None: ...

    async def refresh(self, slots: Sequence[tuple[str, str]]) -> None:
        """Keep ``(user_id, slot)`` pairs alive, re-adding any that expired (called periodically by the
        instance holding them: after an outage the count is true again)."""
        ...


class Health(Protocol):
    """Anything readiness asks: raises ``UnavailableError`` (with a reason) when it cannot serve."""

    async def check(self) -> None: ...
