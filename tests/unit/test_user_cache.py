"""Users as connects read them: batched, cached for a while, forgotten on a local change."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from broadcast.adapters.memory.stores import MemoryUserStore
from broadcast.core.domain import User
from broadcast.lifecycle.user_cache import CachedUsers


class Counting(MemoryUserStore):
    def __init__(self) -> None:
        super().__init__()
        self.reads: list[list[str]] = []
        self.gate: asyncio.Event | None = None

    async def get_many(self, user_ids: Sequence[str]) -> dict[str, User | None]:
        self.reads.append(list(user_ids))
        found = await super().get_many(user_ids)
        if self.gate is not None:
            await self.gate.wait()
        return found


async def test_concurrent_gets_share_one_read_and_repeats_come_from_memory_until_the_ttl() -> None:
    inner, now = Counting(), [0.0]
    await inner.upsert([User("alice", "", frozenset({"ops"}))])
    users = CachedUsers(inner, ttl_s=10, clock=lambda: now[0])
    found = await asyncio.gather(*(users.get(u) for u in ("alice", "bob", "alice")))
    assert found == [User("alice", "", frozenset({"ops"})), None, User("alice", "", frozenset({"ops"}))]
    assert inner.reads == [["alice", "bob"]], "one read for the three"
    await users.get("alice")
    await users.get("bob")
    assert len(inner.reads) == 1, "a known user, and a known absence, come from memory"
    now[0] = 11
    await users.get("alice")
    assert len(inner.reads) == 2, "read again after the ttl"


async def test_expired_users_are_forgotten_as_new_ones_are_read_not_kept_until_the_bound() -> None:
    inner, now = Counting(), [0.0]
    users = CachedUsers(inner, ttl_s=10, max_cached=100_000, clock=lambda: now[0])
    await users.get_many([f"old-{i}" for i in range(100)])
    now[0] = 5
    await users.get("middle")
    assert len(users) == 101, "within the ttl all are remembered"
    now[0] = 11
    await users.get("new")
    assert len(users) == 2, "the 100 read at 0 expired at 10 and are gone; 'middle' (5) and 'new' stay"
    reads = len(inner.reads)
    await users.get("middle")
    assert len(inner.reads) == reads, "'middle' still comes from memory"


async def test_a_local_change_is_seen_at_once_even_while_a_read_is_running() -> None:
    inner = Counting()
    users = CachedUsers(inner, ttl_s=60)
    await inner.upsert([User("alice")])
    inner.gate = asyncio.Event()
    stale = asyncio.create_task(users.get("alice"))
    await asyncio.sleep(0.01)  # the read has the old roles and waits
    inner.gate.set()
    await users.upsert([User("alice", "", frozenset({"ops"}))])
    assert await stale == User("alice")
    inner.gate = None
    assert await users.get("alice") == User("alice", "", frozenset({"ops"})), "the overlapping read was not kept"
