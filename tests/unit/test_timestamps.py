"""One timestamp format on every surface of the API: RFC 3339 in UTC with a ``Z`` and always six fractional
digits — admin API, user inbox, SSE MESSAGE payloads (from the store and from a Kafka envelope), DLT API."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from starlette.applications import Starlette

from broadcast.core import envelope
from broadcast.core.domain import EventType, rfc3339
from broadcast.runtime.components import Components
from sse.messages import from_event, item_frame
from tests.apps import embedded_api
from tests.auth import bearer

STAMP = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z$")
ADMIN = bearer("ann", "admin")


def test_rfc3339_is_utc_with_z_and_microseconds() -> None:
    assert rfc3339(datetime(2030, 1, 1, 12, 0, tzinfo=timezone(timedelta(hours=2)))) == "2030-01-01T10:00:00.000000Z"
    assert rfc3339(datetime(2030, 1, 1, 0, 0, 0, 5, tzinfo=UTC)) == "2030-01-01T00:00:00.000005Z"
    assert rfc3339(datetime(2030, 1, 1)) == "2030-01-01T00:00:00.000000Z"  # naive = UTC (what SQLite hands back)


@pytest.fixture
async def app(tmp_path: Path) -> AsyncIterator[tuple[Starlette, httpx.AsyncClient]]:
    async with embedded_api(tmp_path) as pair:
        yield pair


def _stamps(data: dict[str, Any], *names: str) -> list[str]:
    values = [data[name] for name in names]
    for name, value in zip(names, values, strict=True):
        assert isinstance(value, str) and STAMP.match(value), (name, value)
    return values


async def test_admin_api_inbox_sse_and_dlt_show_one_timestamp_format(app: tuple[Starlette, httpx.AsyncClient]) -> None:
    starlette, http = app
    expires = (datetime.now(UTC) + timedelta(days=1)).replace(microsecond=0).astimezone(timezone(timedelta(hours=5)))
    body = {"content": "hi", "targetType": "SELECTED", "targetIds": ["u1"], "expiresAt": expires.isoformat()}
    created = await http.post("/api/admin/broadcasts", json=body, headers=ADMIN)
    assert created.status_code == 201, created.text
    admin = _stamps(created.json(), "createdAt", "updatedAt", "expiresAt")
    assert admin[2] == rfc3339(expires)
    fetched = await http.get(created.headers["location"], headers=ADMIN)
    assert _stamps(fetched.json(), "createdAt", "updatedAt", "expiresAt") == admin

    inbox = await http.get("/api/user/messages", headers=bearer("u1"))
    assert _stamps(inbox.json()["items"][0], "createdAt", "expiresAt") == [admin[0], admin[2]]
    unread = await http.get("/api/user/messages/unread", headers=bearer("u1"))
    assert _stamps(unread.json()["items"][0], "createdAt", "expiresAt") == [admin[0], admin[2]]

    components: Components = starlette.state.components
    (item,) = await components.inbox.inbox("u1", frozenset())
    stored = orjson.loads(item_frame(item).split(b"data: ", 1)[1])  # catch-up MESSAGE, from the store
    assert _stamps(stored, "createdAt", "expiresAt") == [admin[0], admin[2]]
    broadcast = await components.lifecycle.get(created.json()["id"])
    record = components.lifecycle.events.group(broadcast, EventType.CREATED).payload
    live = from_event(envelope.decode(record))  # live MESSAGE, from the Kafka envelope
    assert _stamps(live, "createdAt", "expiresAt") == [admin[0], admin[2]]

    drill = await http.post("/api/admin/testing/kafka-consumer-failure", json={}, headers=ADMIN)
    assert drill.status_code == 201, drill.text
    _stamps(drill.json(), "armedAt", "expiresAt")
