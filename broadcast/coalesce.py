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
