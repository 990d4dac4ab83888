"""A real SSE client for tests: reads a stream over HTTP, parses frames, remembers the last event id."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson

from devstack.sse_frames import FrameReader
from tests.auth import bearer


@dataclass
class SseEvent:
    event: str
    data: Any
    id: str | None


@dataclass
class SseClient:
    """Connects as ``user`` (a bearer token carrying ``roles``, or the given single-use ``ticket`` in the URL the
    way a browser's ``EventSource`` does) and collects events until closed; ``ended`` once the server ends it."""

    base: str
    user: str
    last_event_id: str | None = None
    ticket: str | None = None
    roles: tuple[str, ...] = ()
    ended: bool = False
    events: list[SseEvent] = field(default_factory=list)
    comments: list[float] = field(default_factory=list)  # when each comment line (heartbeat) arrived
    status: int | None = None
    _task: asyncio.Task[None] | None = None
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def __aenter__(self) -> SseClient:
        self._task = asyncio.create_task(self._read())
        await self.wait_for(lambda e: e.event in ("CONNECTED", "CONNECTION_LIMIT_REACHED"), timeout_s=20)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, httpx.HTTPError):
                await self._task
            self._task = None

    @property
    def messages(self) -> list[SseEvent]:
        return [e for e in self.events if e.event == "MESSAGE"]

    async def _read(self) -> None:
        headers = {"Accept": "text/event-stream", **({} if self.ticket else bearer(self.user, *self.roles))}
        if self.last_event_id:
            headers["Last-Event-ID"] = self.last_event_id
        timeout = httpx.Timeout(10.0, read=None)
        params = {"ticket": self.ticket} if self.ticket else None
        async with (
            httpx.AsyncClient(timeout=timeout) as client,
            client.stream("GET", self.base + "/api/user/sse/connect", headers=headers, params=params) as response,
        ):
            self.status = response.status_code
            frames = FrameReader()
            async for piece in response.aiter_bytes():
                for frame in frames.feed(piece):
                    if frame.comment:
                        self.comments.append(time.monotonic())  # a heartbeat
                    if frame.data is not None:
                        self._add(SseEvent(frame.event or "message", orjson.loads(frame.data), frame.id))
        self.ended = True
        self._changed.set()

    def _add(self, event: SseEvent) -> None:
        self.events.append(event)
        if event.id:
            self.last_event_id = event.id
        self._changed.set()

    async def wait_for(
        self, predicate: Callable[[SseEvent], bool], timeout_s: float = 20.0, count: int = 1
    ) -> list[SseEvent]:
        """Wait until ``count`` events satisfy ``predicate``; fail after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while True:
            found = [e for e in self.events if predicate(e)]
            if len(found) >= count:
                return found
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(
                    f"{self.user}: {len(found)}/{count} events within {timeout_s} s; got {self.events}"
                )
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(remaining, 0.5))
