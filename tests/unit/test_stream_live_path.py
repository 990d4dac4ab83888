"""A stream says CONNECTED only once a message sent to its user right after takes the live path.

The app runs in process (embedded: SQLite, in-process log, bus and presence, every role). This instance's
bus subscription is held back for a moment, as a slow Redis or a busy start-up does; a SELECTED broadcast
posted the moment CONNECTED arrives must still be written live, not by the next reconciliation round.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from broadcast.adapters.memory.bus import MemoryBus, MemorySubscriptionQueue
from broadcast.core.settings import DatabaseSettings, Settings, SseSettings
from broadcast.runtime.app import create_app
from broadcast.runtime.components import Components
from tests.auth import bearer, token

SUBSCRIPTION_DELAY_S = 1.0


class Stream:
    """A raw ASGI client for one SSE stream: collects the body, disconnects on ``close``."""

    def __init__(self, app: Any, user: str) -> None:
        self.body = b""
        self._app, self._user = app, user
        self._changed, self._gone = asyncio.Event(), asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def open(self) -> None:
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "GET",
            "scheme": "http",
            "path": "/api/user/sse/connect",
            "raw_path": b"/api/user/sse/connect",
            "root_path": "",
            "query_string": b"",
            "headers": [(b"authorization", f"Bearer {token(self._user)}".encode()), (b"host", b"t")],
            "client": ("127.0.0.1", 5000),
            "server": ("t", 80),
        }
        self._task = asyncio.create_task(self._app(scope, self._receive, self._send))

    async def _receive(self) -> dict[str, Any]:
        await self._gone.wait()
        return {"type": "http.disconnect"}

    async def _send(self, message: dict[str, Any]) -> None:
        self.body += message.get("body", b"")
        self._changed.set()

    async def wait_for(self, marker: bytes, timeout_s: float) -> None:
        async with asyncio.timeout(timeout_s):
            while marker not in self.body:
                self._changed.clear()
                await self._changed.wait()

    async def close(self) -> None:
        self._gone.set()
        if self._task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._task, 5)


@pytest.fixture
def slow_subscription(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every bus subscription is confirmed only ``SUBSCRIPTION_DELAY_S`` after it was asked for."""
    subscribe = MemoryBus.subscribe

    @contextlib.asynccontextmanager
    async def slow(self: MemoryBus, channels: Sequence[str]) -> AsyncIterator[MemorySubscriptionQueue]:
        await asyncio.sleep(SUBSCRIPTION_DELAY_S)
        async with subscribe(self, channels) as subscription:
            yield subscription

    monkeypatch.setattr(MemoryBus, "subscribe", slow)


async def test_a_message_posted_the_moment_connected_arrives_is_delivered_live(
    tmp_path: Path, slow_subscription: None
) -> None:
    settings = Settings(
        database=DatabaseSettings(url=SecretStr(f"sqlite+aiosqlite:///{tmp_path}/app.db")),
        sse=SseSettings(reconcile_seconds=60),  # a message the live path drops would wait a minute
    )
    app = create_app(settings)
    transport = httpx.ASGITransport(app=app)
    async with app.router.lifespan_context(app), httpx.AsyncClient(transport=transport, base_url="http://t") as http:
        stream = Stream(app, "alice")
        stream.open()  # at once: the instance's bus subscription is not confirmed yet
        try:
            await stream.wait_for(b"event: CONNECTED", 10)
            sent = await http.post(
                "/api/admin/broadcasts",
                json={"content": "right away", "targetType": "SELECTED", "targetIds": ["alice"]},
                headers=bearer("admin", "admin"),
            )
            assert sent.status_code == 201, sent.text
            await stream.wait_for(b"event: MESSAGE", 10)
        finally:
            await stream.close()
        c: Components = app.state.components
        assert c.metrics.stream.deliveries["live"] == 1, c.metrics.stream.deliveries
        assert c.metrics.stream.deliveries["reconciliation"] == 0, c.metrics.stream.deliveries
