"""Who may open a stream now: connection-rate buckets (per user and per client IP, this instance) and the
cluster-wide slot count per user (``ConnectionSlots``: Redis when configured).

A refused rate is a 429 with ``Retry-After``; a connect that would wait too long for its turn to read
(``ConnectGate``: a reconnect storm) is a 503 with ``Retry-After`` spread over a few seconds, so the
refused clients do not come back as one wave; a user over ``max_connections_per_user`` across the cluster
gets the ``CONNECTION_LIMIT_REACHED`` event and a long ``retry:`` hint. When Redis cannot answer, the
per-instance limit of the hub still holds (the slot check fails open, with a warning).
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from broadcast.core.ports.bus import ConnectionSlots
from broadcast.core.settings import LimitsSettings
from broadcast.errors import UnavailableError
from broadcast.http.problems import HttpProblem
from sse.hub import Connection

log = logging.getLogger(__name__)
MAX_TRACKED_KEYS = 100_000
RETRY_SPREAD_S = 5  # a refused connect is told to come back after 1..RETRY_SPREAD_S seconds


class TokenBuckets:
    """One bucket of ``burst`` tokens per key, refilled at ``per_second``; least recently used keys go first.

    A bucket that has refilled to ``burst`` is the same as no bucket, so it is forgotten: each ``take``
    drops up to ``SWEEP`` such buckets from the least recently used end. Kept, they would hold an entry per
    user ever seen until ``max_keys``, scattered among short-lived stream objects (a churn of new users
    grew the process by about 3 KB per replaced stream, mostly in allocator pages those entries pinned).
    """

    SWEEP = 2  # forgotten per take at most: the table shrinks faster than one new key per take can grow it

    def __init__(self, burst: int, per_second: float, max_keys: int = MAX_TRACKED_KEYS) -> None:
        self._burst, self._rate, self._max_keys = float(burst), per_second, max_keys
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def take(self, key: str, now: float | None = None) -> float:
        """0 when a token was taken; otherwise the seconds until one is available."""
        now = time.monotonic() if now is None else now
        tokens, last = self._buckets.pop(key, (self._burst, now))
        tokens = min(self._burst, tokens + (now - last) * self._rate)
        wait = 0.0 if tokens >= 1 else (1 - tokens) / self._rate
        self._buckets[key] = (tokens - 1 if wait == 0 else tokens, now)
        if len(self._buckets) > self._max_keys:
            self._buckets.popitem(last=False)
        self._forget_full(now)
        return wait

    def _forget_full(self, now: float) -> None:
        for _ in range(self.SWEEP):
            if not self._buckets:
                return
            key, (tokens, last) = next(iter(self._buckets.items()))
            if tokens + (now - last) * self._rate < self._burst:
                return
            del self._buckets[key]

    def __len__(self) -> int:
        return len(self._buckets)


class Admission:
    def __init__(self, limits: LimitsSettings, slots: ConnectionSlots, instance_id: str, per_user: int) -> None:
        self._users = TokenBuckets(limits.connect_burst_per_user, limits.connect_per_second_per_user)
        self._ips = TokenBuckets(limits.connect_burst_per_ip, limits.connect_per_second_per_ip)
        self._slots, self._instance_id, self._per_user = slots, instance_id, per_user

    def rate(self, user_id: str, client_ip: str | None) -> None:
        """Count one stream open (or ticket); 429 when the user or the address is over its rate."""
        wait = self._users.take("u:" + user_id)
        if client_ip is not None:
            wait = max(wait, self._ips.take("a:" + client_ip))
        if wait > 0:
            raise HttpProblem(
                429,
                "Too many requests",
                "too many stream connections in a short time; retry later",
                headers={"Retry-After": str(max(1, math.ceil(wait)))},
            )

    def slot(self, connection: Connection) -> str:
        return f"{self._instance_id}/{connection.id}"

    async def acquire(self, connection: Connection) -> bool:
        try:
            return await self._slots.acquire(connection.user_id, self.slot(connection), self._per_user)
        except UnavailableError as exc:
            log.warning("connection slots unavailable, using this instance's limit only: %s", exc)
            return True

    async def release(self, connection: Connection) -> None:
        try:
            await self._slots.release(connection.user_id, self.slot(connection))
        except UnavailableError as exc:  # the slot expires on its own
            log.warning("could not release connection slot: %s", exc)

    async def refresh(self, connections: list[Connection]) -> None:
        await self._slots.refresh([(c.user_id, self.slot(c)) for c in connections])


class ConnectGate:
    """Bounds the stream connects doing their reads (user, catch-up) at once, so a reconnect storm waits
    here in a bounded queue instead of in the database pool (where the API, relay and consumers wait too,
    and where every connect past the pool timeout fails after having waited). A connect beyond ``queue``
    waiting ones, or waiting longer than ``max_wait_s``, is refused at once: 503 with ``Retry-After``."""

    def __init__(self, concurrency: int, queue: int, max_wait_s: float) -> None:
        self._turns = asyncio.Semaphore(concurrency)
        self._queue, self._max_wait_s = queue, max_wait_s
        self.waiting = 0
        self.refused = 0

    @asynccontextmanager
    async def admit(self) -> AsyncIterator[None]:
        if self.waiting >= self._queue and self._turns.locked():
            raise self._busy()
        self.waiting += 1
        try:
            async with asyncio.timeout(self._max_wait_s):
                await self._turns.acquire()
        except TimeoutError:
            raise self._busy() from None
        finally:
            self.waiting -= 1
        try:
            yield
        finally:
            self._turns.release()

    def _busy(self) -> HttpProblem:
        self.refused += 1
        return HttpProblem(
            503,
            "Service unavailable",
            "too many streams are opening at once; retry after Retry-After seconds",
            headers={"Retry-After": str(random.randint(1, RETRY_SPREAD_S))},
        )
