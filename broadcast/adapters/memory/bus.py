"""In-process bus and presence for the embedded default: one process, so fan-out is a local queue put."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

from broadcast.core.ports.bus import BusMessage

SUBSCRIPTION_QUEUE_LIMIT = 10_000


class MemorySubscriptionQueue:
    def __init__(self, channels: frozenset[str]) -> None:
        self.channels = channels
        self.queue: asyncio.Queue[BusMessage] = asyncio.Queue(SUBSCRIPTION_QUEUE_LIMIT)

    async def get(self, timeout_s: float = 1.0) -> BusMessage | None:
        if timeout_s <= 0:
            try:
                return self.queue.get_nowait()
            except asyncio.QueueEmpty:
                return None
        try:
            return await asyncio.wait_for(self.queue.get(), timeout_s)
        except TimeoutError:
            return None


class MemoryBus:
    """At-most-once like Redis pub/sub: a full subscriber queue drops the message (the reconciler heals)."""

    def __init__(self) -> None:
        self._subscribers: set[MemorySubscriptionQueue] = set()

    async def publish(self, channel: str, payload: bytes) -> int:
        received = 0
        for sub in list(self._subscribers):
            if channel in sub.channels:
                try:
                    sub.queue.put_nowait(BusMessage(channel, payload))
                    received += 1
                except asyncio.QueueFull:
                    pass
        return received

    async def publish_many(self, messages: Sequence[tuple[str, bytes]]) -> list[int]:
        return [await self.publish(channel, payload) for channel, payload in messages]

    @asynccontextmanager
    async def subscribe(self, channels: Sequence[str]) -> AsyncIterator[MemorySubscriptionQueue]:
        sub = MemorySubscriptionQueue(frozenset(channels))
        self._subscribers.add(sub)
        try:
            yield sub
        finally:
            self._subscribers.discard(sub)


class MemoryPresence:
    """Per-user instance entries with an expiry, refreshed by heartbeats."""

    def __init__(self, ttl_seconds: float = 30.0) -> None:
        self._ttl = ttl_seconds
        self._entries: dict[str, dict[str, float]] = {}

    async def heartbeat(self, user_id: str, instance_id: str) -> None:
        self._entries.setdefault(user_id, {})[instance_id] = time.monotonic() + self._ttl

    async def heartbeat_many(self, user_ids: Sequence[str], instance_id: str) -> None:
        for user_id in user_ids:
            await self.heartbeat(user_id, instance_id)

    async def leave(self, user_id: str, instance_id: str) -> None:
        instances = self._entries.get(user_id, {})
        instances.pop(instance_id, None)
        if not instances:
            self._entries.pop(user_id, None)

    async def instances(self, user_id: str) -> frozenset[str]:
        now = time.monotonic()
        return frozenset(i for i, expiry in self._entries.get(user_id, {}).items() if expiry > now)

    async def instances_many(self, user_ids: Sequence[str]) -> dict[str, frozenset[str]]:
        return {user_id: await self.instances(user_id) for user_id in user_ids}
