"""The admin API of the outbox's dead state, on the embedded app: list, redrive, purge, admins only; answers
as the OpenAPI document describes them."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import jsonschema_rs
import pytest
from pydantic import SecretStr
from starlette.applications import Starlette

from broadcast.core.domain import EventType, OutboxEvent
from broadcast.core.ports.stores import OutboxStore
from broadcast.core.settings import DatabaseSettings, Settings
from broadcast.runtime import openapi
from broadcast.runtime.app import create_app
from tests.auth import bearer

ADMIN = bearer("ops-admin", "admin")
DEAD = "/api/admin/outbox/dead"
DOCUMENT = openapi.build_document(openapi.Bounds.of(Settings()))


@pytest.fixture
async def app(tmp_path: Path) -> AsyncIterator[Starlette]:
    settings = Settings(database=DatabaseSettings(url=SecretStr(f"sqlite+aiosqlite:///{tmp_path}/app.db")))
    app = create_app(settings, roles=frozenset({"api"}))
    async with app.router.lifespan_context(app):
        yield app


def valid(name: str, value: object) -> bool:
    schema = {**DOCUMENT["components"]["schemas"][name], "components": DOCUMENT["components"]}
    return bool(jsonschema_rs.Draft202012Validator(schema).is_valid(value))


async def test_dead_rows_are_listed_redriven_and_purged_by_admins_only(app: Starlette) -> None:
    outbox: OutboxStore = app.state.components.outbox
    ids = await outbox.append([OutboxEvent("t", f"k{n}", EventType.CREATED, b"x" * 10, (), "b-1") for n in range(3)])
    await outbox.record_failure(ids, "MessageSizeTooLargeError", poison=True)
    await outbox.bury(ids)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test", headers=ADMIN) as http:
        first = await http.get(DEAD, params={"limit": 2})
        assert first.status_code == 200 and valid("DeadOutboxPage", first.json()), first.text
        page = first.json()
        assert [i["outboxId"] for i in page["items"]] == [ids[2], ids[1]], "newest first"
        assert page["items"][0]["lastError"] == "MessageSizeTooLargeError" and page["items"][0]["payloadBytes"] == 10
        rest = (await http.get(DEAD, params={"cursor": page["nextCursor"]})).json()
        assert [i["outboxId"] for i in rest["items"]] == [ids[0]] and rest["nextCursor"] is None

        backlog = await outbox.backlog()
        redriven = await http.post(f"{DEAD}/{page['items'][0]['id']}/redrive")
        assert redriven.status_code == 200 and redriven.json()["id"] == page["items"][0]["id"]
        assert await outbox.backlog() == backlog + 1 and await outbox.dead_count() == 2
        assert (await http.post(f"{DEAD}/{page['items'][0]['id']}/redrive")).status_code == 404
        purged = await http.delete(f"{DEAD}/{page['items'][1]['id']}")
        assert purged.json() == {"id": page["items"][1]["id"], "purged": True}
        assert (await http.delete(f"{DEAD}/{page['items'][1]['id']}")).status_code == 404
        assert (await http.delete(f"{DEAD}/not-a-number")).status_code == 404
        assert (await http.get(DEAD, params={"limit": "0"})).status_code == 400
        assert (await http.get(DEAD, params={"topic": "t"})).status_code == 400, "unknown parameters are refused"
        assert await outbox.dead_count() == 1
    async with httpx.AsyncClient(transport=transport, base_url="http://test", headers=bearer("bob")) as http:
        assert (await http.get(DEAD)).status_code == 403
        assert (await http.post(f"{DEAD}/1/redrive")).status_code == 403
