"""The scheduler: activates due SCHEDULED broadcasts and expires ACTIVE ones past ``expiresAt``.

Every tick, exactly one process across the deployment does the work: the one that takes the
``broadcast-scheduler`` advisory lock (PostgreSQL; trivially the only process in embedded mode).
Each transition is its own transaction (``Lifecycle.activate`` / ``expire``); a transition another
actor got to first (e.g. an admin cancelled) is skipped.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import datetime

from broadcast.core.ports.stores import BroadcastStore
from broadcast.errors import BroadcastError, ConflictError, NotFoundError
from broadcast.lifecycle.service import Lifecycle, utc_now
from broadcast.observability.loops import pause

log = logging.getLogger(__name__)
LOCK_NAME = "broadcast-scheduler"


class Scheduler:
    def __init__(
        self,
        lifecycle: Lifecycle,
        store: BroadcastStore,
        tick_seconds: float,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self._lifecycle = lifecycle
        self._store = store
        self._tick = tick_seconds
        self._clock = clock

    async def tick(self) -> tuple[int, int] | None:
        """One pass; returns (activated, expired), or None when another process holds the leadership."""
        async with self._store.leadership(LOCK_NAME) as leader:
            if not leader:
                return None
            activate, expire = await self._lifecycle.due(self._clock())
            done = [0, 0]
            for index, (ids, step) in enumerate(
                ((activate, self._lifecycle.activate), (expire, self._lifecycle.expire))
            ):
                for broadcast_id in ids:
                    try:
                        await step(broadcast_id)
                        done[index] += 1
                    except (ConflictError, NotFoundError):
                        continue  # cancelled or changed meanwhile
            return done[0], done[1]

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                result = await self.tick()
                if result and any(result):
                    log.info("scheduler activated %d and expired %d broadcasts", *result)
            except BroadcastError as exc:
                log.warning("scheduler tick failed: %s", exc)
            await pause(stop, self._tick)
