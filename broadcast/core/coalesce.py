"""Coalescing concurrent reads of the same thing without serving anyone a stale answer.

``FreshRead`` runs one query for every caller that arrived before it started — a caller never joins a
query that was already running when it arrived (it might predate something the caller must see). While
one query runs, newcomers wait for the next, which starts when the current one ends: under load there is
at most one query in flight and one forming, however many callers there are.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class FreshRead(Generic[T]):
    def __init__(self, read: Callable[[], Awaitable[T]]) -> None:
        self._read = read
        self._forming: asyncio.Future[T] | None = None
        self._running: asyncio.Task[None] | None = None

    async def get(self) -> T:
        if self._forming is None:
            self._forming = asyncio.get_running_loop().create_future()
            self._running = asyncio.create_task(self._run(self._forming, self._running))
        return await asyncio.shield(self._forming)

    async def _run(self, result: asyncio.Future[T], previous: asyncio.Task[None] | None) -> None:
        if previous is not None:
            await asyncio.wait([previous])
        await asyncio.sleep(0)  # let callers arriving in the same loop iteration join
        self._forming = None  # from here on, newcomers form the next read
        try:
            value = await self._read()
        except Exception as exc:
            result.set_exception(exc)
            result.exception()  # retrieved here too: a caller may have gone (cancelled) meanwhile
        else:
            result.set_result(value)


K = TypeVar("K")


class Batched(Generic[K, T]):
    """Coalesces concurrent lookups of different keys into one call of ``read_many`` for all of them.

    The same rule as ``FreshRead``: a caller joins the batch that is forming, never one already running;
    under load one batch runs while the next forms, so a storm of N callers costs about N / (callers per
    batch) calls. ``read_many`` answers every key it was given (a missing key is an error for its callers).
    """

    def __init__(self, read_many: Callable[[list[K]], Awaitable[dict[K, T]]], max_batch: int = 500) -> None:
        self._read_many = read_many
        self._max_batch = max_batch
        self._forming: dict[K, asyncio.Future[T]] = {}
        self._running: asyncio.Task[None] | None = None

    async def get(self, key: K) -> T:
        future = self._forming.get(key)
        if future is None:
            if not self._forming:
                self._running = asyncio.create_task(self._run(self._forming, self._running))
            future = self._forming[key] = asyncio.get_running_loop().create_future()
            if len(self._forming) >= self._max_batch:
                self._forming = {}  # full: it runs as it is, newcomers form the next
        return await asyncio.shield(future)

    async def _run(self, batch: dict[K, asyncio.Future[T]], previous: asyncio.Task[None] | None) -> None:
        if previous is not None:
            await asyncio.wait([previous])
        await asyncio.sleep(0)  # let callers arriving in the same loop iteration join
        if self._forming is batch:
            self._forming = {}  # from here on, newcomers form the next batch
        try:
            values = await self._read_many(list(batch))
        except Exception as exc:
            for future in batch.values():
                future.set_exception(exc)
                future.exception()  # retrieved: a caller may have gone (cancelled) meanwhile
            return
        for key, future in batch.items():
            if key in values:
                future.set_result(values[key])
            else:
                future.set_exception(KeyError(key))
                future.exception()
