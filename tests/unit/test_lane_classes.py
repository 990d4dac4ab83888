"""``server.lane_classes``: which priority class a process's relay loops and delivery listeners work."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest
from pydantic import SecretStr

from broadcast.app import create_app
from broadcast.settings import DatabaseSettings, ServerSettings, Settings

NORMAL = {"outbox-relay", "delivery-selected"}
PRIORITY = {"outbox-relay-priority", "delivery-group", "delivery-selected-priority"}


@pytest.mark.parametrize(
    ("classes", "running", "absent"),
    [("both", NORMAL | PRIORITY, set()), ("normal", NORMAL, PRIORITY), ("priority", PRIORITY, NORMAL)],
)
async def test_a_process_runs_the_loops_and_listeners_of_its_lane_classes_only(
    tmp_path: Path, classes: str, running: set[str], absent: set[str]
) -> None:
    settings = Settings(
        server=ServerSettings(lane_classes=classes),
        database=DatabaseSettings(url=SecretStr(f"sqlite+aiosqlite:///{tmp_path}/app.db")),
    )
    app = create_app(settings)
    transport = httpx.ASGITransport(app=app)
    async with app.router.lifespan_context(app), httpx.AsyncClient(transport=transport, base_url="http://t") as http:
        assert (await http.get("/health/ready")).status_code == 200
        names = {t.get_name() for t in asyncio.all_tasks()}
    assert running <= names, f"missing: {running - names}"
    assert not absent & names, f"should not run here: {absent & names}"
