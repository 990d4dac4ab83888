"""Users as stream connects read them: batched, and remembered for a few seconds.

Every stream open needs the user's roles (which ALL/ROLE broadcasts reach it). A reconnect storm asks for
thousands at once: concurrent lookups share one query (``Batched``), and a user asked for again within
``ttl_s`` is answered from memory. Expired entries are dropped as new ones are read (oldest first), so the
cache holds the users read in the last ``ttl_s``, not every user seen up to ``max_cached``. A change made
through this process (``upsert``: the admin users API) is seen at once; one made through another instance
within ``ttl_s`` (default 15 s) — as an open stream keeps the roles it was opened with until it
reconnects, a role change reaches streams as they reopen.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Sequence

from broadcast.core.coalesce import Batched
from broadcast.core.domain import User
from broadcast.core.ports.stores import UserStore

TTL_S = 15.0
MAX_CACHED = 100_000


class CachedUsers:
    """A ``UserStore`` that batches and caches ``get``; everything else goes to ``inner``."""

    def __init__(
        self,
        inner: UserStore,
        ttl_s: float = TTL_S,
        max_cached: int = MAX_CACHED,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._inner, self._ttl_s, self._max_cached, self._clock = inner, ttl_s, max_cached, clock
        self._cached: OrderedDict[str, tuple[float, User | None]] = OrderedDict()
        self._batch: Batched[str, User | None] = Batched(self._read)
        self._changes = 0  # upserts so far: a read that overlapped one is not remembered (it may predate it)

    async def get(self, user_id: str) -> User | None:
        hit = self._cached.get(user_id)
        if hit is not None and hit[0] > self._clock():
            return hit[1]
        return await self._batch.get(user_id)

    def __len__(self) -> int:
        """Users remembered now."""
        return len(self._cached)

    async def get_many(self, user_ids: Sequence[str]) -> dict[str, User | None]:
        return {user_id: await self.get(user_id) for user_id in dict.fromkeys(user_ids)}

    async def _read(self, user_ids: list[str]) -> dict[str, User | None]:
        changes = self._changes
        found = await self._inner.get_many(user_ids)
        if changes != self._changes:
            return found
        now = self._clock()
        for user_id, user in found.items():
            self._cached[user_id] = (now + self._ttl_s, user)
            self._cached.move_to_end(user_id)
        while self._cached and (len(self._cached) > self._max_cached or next(iter(self._cached.values()))[0] <= now):
            self._cached.popitem(last=False)  # oldest first: over the bound, or expired (all share one ttl)
        return found

    async def upsert(self, users: Sequence[User]) -> None:
        try:
            await self._inner.upsert(users)
        finally:
            self._changes += 1
            for user in users:
                self._cached.pop(user.id, None)

    async def count(self, roles: Sequence[str] | None = None) -> int:
        return await self._inner.count(roles)
