"""Redis SSE tickets (single use via ``GETDEL``) and cluster-wide connection slots.

A ticket is stored under the SHA-256 of its value, so Redis never holds a usable ticket. Slots are one
sorted set per user (member = slot id, score = expiry in Redis server time, ms): ``acquire`` runs as one
Lua script (drop expired, count, add), so two instances cannot both take the last slot; concurrent acquires
(and releases) of an instance go as one script call for all of them.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Sequence
from typing import Any

import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError

from broadcast.core.coalesce import Batched
from broadcast.core.domain import Principal
from broadcast.errors import UnavailableError

TICKET_BYTES = 32
REFRESH_CHUNK = 1_000
# KEYS[i] is a user's slots; ARGV: ttl (ms), then (slot, limit) for each key in turn. One result per key:
# 1 taken, 0 the user already holds ``limit`` live slots (keys repeat: a user's acquires count in order).
_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[1])
local taken = {}
for i, key in ipairs(KEYS) do
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
  if redis.call('ZCARD', key) >= tonumber(ARGV[2 * i + 1]) then
    taken[i] = 0
  else
    redis.call('ZADD', key, now + ttl, ARGV[2 * i])
    redis.call('PEXPIRE', key, ttl)
    taken[i] = 1
  end
end
return taken
"""
# KEYS[i] loses slot ARGV[i]
_RELEASE = """
for i, key in ipairs(KEYS) do
  redis.call('ZREM', key, ARGV[i])
end
return #KEYS
"""
_REFRESH = """
local t = redis.call('TIME')
local expiry = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[1])
for i, key in ipairs(KEYS) do
  redis.call('ZADD', key, expiry, ARGV[i + 1])
  redis.call('PEXPIRE', key, tonumber(ARGV[1]))
end
return 1
"""


def _unavailable(what: str, exc: RedisError) -> UnavailableError:
    return UnavailableError(f"redis {what} failed: {type(exc).__name__}")


class RedisTickets:
    def __init__(self, client: Redis, key_prefix: str) -> None:
        self._client = client
        self._prefix = key_prefix + "ticket:"

    def _key(self, ticket: str) -> str:
        return self._prefix + hashlib.sha256(ticket.encode()).hexdigest()

    async def issue(self, principal: Principal, ttl_s: int) -> str:
        ticket = secrets.token_urlsafe(TICKET_BYTES)
        value = orjson.dumps({"sub": principal.sub, "roles": sorted(principal.roles), "exp": principal.expires_at})
        try:
            await self._client.set(self._key(ticket), value, ex=ttl_s)
        except RedisError as exc:
            raise _unavailable("ticket store", exc) from exc
        return ticket

    async def redeem(self, ticket: str) -> Principal | None:
        try:
            raw: Any = await self._client.getdel(self._key(ticket))
        except RedisError as exc:
            raise _unavailable("ticket redeem", exc) from exc
        if raw is None:
            return None
        data = orjson.loads(raw)
        return Principal(data["sub"], frozenset(data["roles"]), float(data["exp"]))


class RedisSlots:
    def __init__(self, client: Redis, key_prefix: str, ttl_seconds: float) -> None:
        self._client = client
        self._prefix = key_prefix + "slots:"
        self._ttl_ms = int(ttl_seconds * 1000)
        self._acquire = client.register_script(_ACQUIRE)
        self._refresh = client.register_script(_REFRESH)
        self._release = client.register_script(_RELEASE)
        self._acquires: Batched[tuple[str, str, int], bool] = Batched(self._acquire_batch)
        self._releases: Batched[tuple[str, str], None] = Batched(self._release_batch)

    async def acquire(self, user_id: str, slot: str, limit: int) -> bool:
        """Concurrent callers share one pipeline of script calls (each still atomic on its own)."""
        return await self._acquires.get((user_id, slot, limit))

    async def _acquire_batch(self, keys: list[tuple[str, str, int]]) -> dict[tuple[str, str, int], bool]:
        args: list[str | int] = [self._ttl_ms]
        for _, slot, limit in keys:
            args += [slot, limit]
        try:
            taken = await self._acquire(keys=[self._prefix + user_id for user_id, _, _ in keys], args=args)
        except RedisError as exc:
            raise _unavailable("connection slot", exc) from exc
        return {key: bool(t) for key, t in zip(keys, taken, strict=True)}

    async def release(self, user_id: str, slot: str) -> None:
        """Concurrent callers (10k streams closing at once) share one pipeline."""
        await self._releases.get((user_id, slot))

    async def _release_batch(self, keys: list[tuple[str, str]]) -> dict[tuple[str, str], None]:
        try:
            await self._release(keys=[self._prefix + user_id for user_id, _ in keys], args=[slot for _, slot in keys])
        except RedisError as exc:
            raise _unavailable("connection slot release", exc) from exc
        return dict.fromkeys(keys)

    async def refresh(self, slots: Sequence[tuple[str, str]]) -> None:
        try:
            for start in range(0, len(slots), REFRESH_CHUNK):
                chunk = slots[start : start + REFRESH_CHUNK]
                keys = [self._prefix + user_id for user_id, _ in chunk]
                await self._refresh(keys=keys, args=[self._ttl_ms, *(slot for _, slot in chunk)])
        except RedisError as exc:
            raise _unavailable("connection slot refresh", exc) from exc
