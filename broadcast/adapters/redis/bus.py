"""Redis adapters: pub/sub bus between instances and presence with TTL heartbeats.

Presence is one sorted set per user (member = instance id, score = expiry in epoch ms): a crashed
instance's entry ages out without anyone deleting it, and the key itself expires when all entries do.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.client import PubSub
from redis.exceptions import RedisError

from broadcast.core import constants
from broadcast.core.coalesce import Batched
from broadcast.core.ports.bus import BusMessage
from broadcast.core.settings import RedisSettings
from broadcast.errors import UnavailableError

HEARTBEAT_CHUNK = 1_000  # users per pipelined round trip (heartbeats, presence lookups)
PUBLISH_CHUNK_BYTES = 1 << 20  # payload bytes per pipelined round trip of publishes
POOL_WAIT_S = 5.0


def create_client(settings: RedisSettings) -> Redis:
    """A client on a bounded pool (``max_connections``; a caller waits up to ``POOL_WAIT_S`` for a free
    connection instead of opening one more, so a reconnect storm cannot open thousands); the composition
    root closes it (``aclose``, which closes the pool too)."""
    if settings.url is None:
        raise UnavailableError("Redis URL is not configured")
    pool = BlockingConnectionPool.from_url(
        settings.url.get_secret_value(),
        max_connections=settings.max_connections,
        timeout=POOL_WAIT_S,
        socket_timeout=5,
        socket_connect_timeout=5,
        health_check_interval=15,
        retry_on_timeout=True,
    )
    return Redis.from_pool(pool)


class RedisBusSubscription:
    """One subscription. redis-py reconnects a pub/sub connection by itself (and subscribes again), which
    would hide that messages published meanwhile are gone: a reconnect ends the subscription instead, so
    the caller resubscribes knowingly (and can make up for the gap)."""

    def __init__(self, pubsub: PubSub, prefix: str) -> None:
        self._pubsub = pubsub
        self._prefix = prefix
        self._reconnected = False
        if pubsub.connection is not None:
            pubsub.connection.register_connect_callback(self._on_reconnect)

    def _on_reconnect(self, _connection: object) -> None:
        self._reconnected = True

    async def get(self, timeout_s: float = 1.0) -> BusMessage | None:
        if self._reconnected:
            raise UnavailableError("redis subscription reconnected: messages published meanwhile are lost")
        try:
            message = await self._pubsub.get_message(ignore_subscribe_messages=True, timeout=timeout_s)
        except RedisError as exc:
            raise UnavailableError(f"redis subscription failed: {exc!r}") from exc
        if message is None:
            return None
        channel = message["channel"].decode()
        return BusMessage(channel.removeprefix(self._prefix), bytes(message["data"]))


class RedisBus:
    """Redis pub/sub (at-most-once); channel names are prefixed so deployments can share a server."""

    def __init__(self, client: Redis, key_prefix: str) -> None:
        self._client = client
        self._prefix = key_prefix

    async def publish(self, channel: str, payload: bytes) -> int:
        try:
            return int(await self._client.publish(self._prefix + channel, payload))
        except RedisError as exc:
            raise UnavailableError(f"redis publish failed: {exc!r}") from exc

    async def publish_many(self, messages: Sequence[tuple[str, bytes]]) -> list[int]:
        """Pipelined (not a transaction), about ``PUBLISH_CHUNK_BYTES`` of payload per round trip: one
        connection sends them in order."""
        received: list[int] = []
        try:
            for chunk in _chunks(messages, PUBLISH_CHUNK_BYTES):
                async with self._client.pipeline(transaction=False) as pipe:
                    for channel, payload in chunk:
                        pipe.publish(self._prefix + channel, payload)
                    received += [int(n) for n in await pipe.execute()]
        except RedisError as exc:
            raise UnavailableError(f"redis publish failed: {exc!r}") from exc
        return received

    @asynccontextmanager
    async def subscribe(self, channels: Sequence[str]) -> AsyncIterator[RedisBusSubscription]:
        pubsub = self._client.pubsub()
        try:
            await pubsub.subscribe(*(self._prefix + c for c in channels))
            await _confirmed(pubsub, len(channels))
        except (RedisError, TimeoutError) as exc:
            await _close(pubsub)
            raise UnavailableError(f"redis subscribe failed: {exc!r}") from exc
        try:
            yield RedisBusSubscription(pubsub, self._prefix)
        finally:
            await _close(pubsub)


def _chunks(messages: Sequence[tuple[str, bytes]], limit: int) -> list[Sequence[tuple[str, bytes]]]:
    """``messages`` cut in order into runs of about ``limit`` payload bytes (at least one message each)."""
    chunks: list[Sequence[tuple[str, bytes]]] = []
    start, size = 0, 0
    for end, (_, payload) in enumerate(messages):
        if size and size + len(payload) > limit:
            chunks.append(messages[start:end])
            start, size = end, 0
        size += len(payload)
    if start < len(messages):
        chunks.append(messages[start:])
    return chunks


async def _close(pubsub: PubSub) -> None:
    """Close ``pubsub``. redis-py before 8.2 has no type hints on ``PubSub.aclose``, 8.2 and later have: the
    method is bound to a typed name so that the call type-checks on both, with no ``type: ignore``."""
    aclose: Callable[[], Awaitable[None]] = pubsub.aclose
    await aclose()


async def _confirmed(pubsub: PubSub, count: int, timeout_s: float = 5.0) -> None:
    """Wait for the server to confirm every SUBSCRIBE, so a publish after ``subscribe`` returns is seen."""
    async with asyncio.timeout(timeout_s):
        while count:
            message = await pubsub.get_message(timeout=timeout_s)
            if message is not None and message["type"] == "subscribe":
                count -= 1


class RedisPresence:
    def __init__(self, client: Redis, key_prefix: str, ttl_seconds: float) -> None:
        self._client = client
        self._prefix = key_prefix
        self._ttl_ms = int(ttl_seconds * 1000)
        self._live = client.register_script(LIVE_MEMBERS)  # EVALSHA, loaded again after NOSCRIPT
        self._beat = client.register_script(HEARTBEAT)
        self._remove = client.register_script(REMOVE_MEMBERS)
        # a storm of connects (or of closes) at once: one pipeline for all of them
        self._beats: Batched[tuple[str, str], None] = Batched(self._beat_batch)
        self._leaves: Batched[tuple[str, str], None] = Batched(self._leave_batch)

    def _key(self, user_id: str) -> str:
        return self._prefix + constants.REDIS_PRESENCE_KEY.format(user_id=user_id)

    async def heartbeat(self, user_id: str, instance_id: str) -> None:
        """Concurrent callers share one pipeline (``heartbeat_many``)."""
        await self._beats.get((user_id, instance_id))

    async def _beat_batch(self, keys: list[tuple[str, str]]) -> dict[tuple[str, str], None]:
        for instance_id in {i for _, i in keys}:
            await self.heartbeat_many([u for u, i in keys if i == instance_id], instance_id)
        return dict.fromkeys(keys)

    async def heartbeat_many(self, user_ids: Sequence[str], instance_id: str) -> None:
        """One script call per ``HEARTBEAT_CHUNK`` users: a single command carrying all their keys costs the
        client a fraction of three pipelined commands per user."""
        for start in range(0, len(user_ids), HEARTBEAT_CHUNK):
            now = int(time.time() * 1000)
            keys = [self._key(user_id) for user_id in user_ids[start : start + HEARTBEAT_CHUNK]]
            try:
                await self._beat(keys=keys, args=[instance_id, now + self._ttl_ms, now, self._ttl_ms])
            except RedisError as exc:
                raise UnavailableError(f"redis presence heartbeat failed: {exc!r}") from exc

    async def leave(self, user_id: str, instance_id: str) -> None:
        """Concurrent callers (10k streams closing at once) share one pipeline."""
        await self._leaves.get((user_id, instance_id))

    async def _leave_batch(self, keys: list[tuple[str, str]]) -> dict[tuple[str, str], None]:
        try:
            await self._remove(keys=[self._key(u) for u, _ in keys], args=[i for _, i in keys])
        except RedisError as exc:
            raise UnavailableError(f"redis presence leave failed: {exc!r}") from exc
        return dict.fromkeys(keys)

    async def instances(self, user_id: str) -> frozenset[str]:
        return (await self.instances_many([user_id]))[user_id]

    async def instances_many(self, user_ids: Sequence[str]) -> dict[str, frozenset[str]]:
        """One script call per ``HEARTBEAT_CHUNK`` distinct users: a single command carrying all their keys
        costs the client a fraction of a pipeline of one command per user."""
        distinct = list(dict.fromkeys(user_ids))
        found: dict[str, frozenset[str]] = {}
        try:
            for start in range(0, len(distinct), HEARTBEAT_CHUNK):
                chunk = distinct[start : start + HEARTBEAT_CHUNK]
                now = int(time.time() * 1000)
                replies = await self._live([self._key(user_id) for user_id in chunk], [now])
                for user_id, members in zip(chunk, replies, strict=True):
                    found[user_id] = frozenset(m.decode() if isinstance(m, bytes) else str(m) for m in members)
        except RedisError as exc:
            raise UnavailableError(f"redis presence lookup failed: {exc!r}") from exc
        return found


# the live members (score > ARGV[1], now in epoch ms) of each sorted set in KEYS, in order
# KEYS: users' presence keys; ARGV: instance id, its new expiry, now (ms), ttl (ms)
HEARTBEAT = """
for _, key in ipairs(KEYS) do
  redis.call('ZADD', key, ARGV[2], ARGV[1])
  redis.call('ZREMRANGEBYSCORE', key, '-inf', ARGV[3])
  redis.call('PEXPIRE', key, ARGV[4])
end
return #KEYS
"""
# KEYS[i] loses member ARGV[i]
REMOVE_MEMBERS = """
for i, key in ipairs(KEYS) do
  redis.call('ZREM', key, ARGV[i])
end
return #KEYS
"""

LIVE_MEMBERS = """
local found = {}
for i, key in ipairs(KEYS) do
  found[i] = redis.call('ZRANGEBYSCORE', key, '(' .. ARGV[1], '+inf')
end
return found
"""


class RedisHealth:
    def __init__(self, client: Redis) -> None:
        self._client = client

    async def check(self) -> None:
        try:
            await self._client.ping()
        except RedisError as exc:
            raise UnavailableError(f"redis unreachable: {type(exc).__name__}") from exc
