"""The fault drill's switch and admin API on SQLite: which records an armed drill fails, and disarming it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from pydantic import SecretStr
from starlette.applications import Starlette

from broadcast.core import constants
from broadcast.core.ports.log import EventRecord
from broadcast.core.settings import DatabaseSettings, Settings
from broadcast.runtime.app import create_app
from broadcast.runtime.components import Components
from dlt.drill import DrillSwitch, FaultDrillError
from tests.apps import embedded_api
from tests.auth import bearer

ADMIN = bearer("ann", "admin")
DRILL = "/api/admin/testing/kafka-consumer-failure"


@pytest.fixture
async def app(tmp_path: Path) -> AsyncIterator[tuple[Starlette, httpx.AsyncClient]]:
    async with embedded_api(tmp_path) as pair:
        yield pair


def record(redriven: bool) -> EventRecord:
    headers = ((constants.HEADER_REDRIVEN_FROM, b"7"),) if redriven else ()
    return EventRecord("t", 0, 0, b"alice", b"{}", headers, 0)


async def fails(switch: DrillSwitch, broadcast_id: str, redriven: bool) -> bool:
    try:
        await switch.check(record(redriven), broadcast_id, datetime.now(UTC))
    except FaultDrillError:
        return True
    return False


async def test_redriven_records_fail_only_under_a_drill_that_says_so_and_a_disarmed_drill_fails_no_redrive(
    app: tuple[Starlette, httpx.AsyncClient],
) -> None:
    starlette, http = app
    components: Components = starlette.state.components
    switch = DrillSwitch(components.drills)

    plain = await http.post(DRILL, json={"broadcastId": "b-plain"}, headers=ADMIN)
    assert plain.status_code == 201, plain.text
    assert plain.json()["failRedrives"] is False
    both = await http.post(DRILL, json={"broadcastId": "b-both", "failRedrives": True}, headers=ADMIN)
    assert both.status_code == 201, both.text
    assert (both.json()["failRedrives"], both.json()["scope"]) == (True, "broadcast")
    listed = (await http.get(DRILL, headers=ADMIN)).json()["armed"]
    assert [(d["broadcastId"], d["failRedrives"]) for d in listed] == [("b-plain", False), ("b-both", True)]

    assert await fails(switch, "b-plain", redriven=False)
    assert not await fails(switch, "b-plain", redriven=True), "by default a redrive is the way out"
    assert await fails(switch, "b-both", redriven=False)
    assert await fails(switch, "b-both", redriven=True), "failRedrives: a redrive fails again"
    assert not await fails(switch, "b-other", redriven=True)

    refused = await http.post(DRILL, json={"failRedrives": "yes"}, headers=ADMIN)
    assert refused.status_code == 400, refused.text
    assert (await http.delete(f"{DRILL}/{both.json()['id']}", headers=bearer("alice"))).status_code == 403

    disarmed = await http.delete(f"{DRILL}/{both.json()['id']}", headers=ADMIN)
    assert disarmed.status_code == 200, disarmed.text
    assert disarmed.json() == {"id": both.json()["id"], "disarmed": True}
    assert not await fails(switch, "b-both", redriven=True), "a redrive after the disarm is not failed"
    assert [d["broadcastId"] for d in (await http.get(DRILL, headers=ADMIN)).json()["armed"]] == ["b-plain"]
    for again in (f"{DRILL}/{both.json()['id']}", f"{DRILL}/424242", f"{DRILL}/abc"):
        response = await http.delete(again, headers=ADMIN)
        assert response.status_code == 404, (again, response.text)
        assert response.headers["content-type"] == "application/problem+json"


async def test_the_disarm_route_is_404_when_the_drill_is_disabled(tmp_path: Path) -> None:
    settings = Settings(database=DatabaseSettings(url=SecretStr(f"sqlite+aiosqlite:///{tmp_path}/app.db")))
    app = create_app(settings, roles=frozenset({"api"}))
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with app.router.lifespan_context(app), httpx.AsyncClient(transport=transport, base_url="http://t") as http:
        response = await http.delete(f"{DRILL}/1", headers=ADMIN)
    assert response.status_code == 404 and "disabled" in response.text
