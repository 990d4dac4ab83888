"""Where the OpenAPI document and the server once disagreed (found by the schemathesis fuzz): each case
checks what the server answers and that the document says the same. The app runs embedded (SQLite)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema_rs
import pytest
from pydantic import SecretStr

from broadcast import openapi
from broadcast.app import create_app
from broadcast.settings import DatabaseSettings, Settings
from tests.auth import bearer

ADMIN = bearer("contract-admin", "admin")
DOCUMENT = openapi.build_document(openapi.Bounds.of(Settings()))


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    settings = Settings(database=DatabaseSettings(url=SecretStr(f"sqlite+aiosqlite:///{tmp_path}/app.db")))
    app = create_app(settings)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test", headers=ADMIN) as http,
    ):
        yield http


def parameter_schema(path: str, method: str, name: str) -> dict[str, Any]:
    item = DOCUMENT["paths"][path]
    parameters = [*item.get("parameters", []), *item[method].get("parameters", [])]
    found: dict[str, Any] = next(p["schema"] for p in parameters if p["name"] == name)
    return found


def component(name: str) -> dict[str, Any]:
    """A component schema that can be validated alone (its `$ref`s resolve against the whole document)."""
    return {**DOCUMENT["components"]["schemas"][name], "components": DOCUMENT["components"]}


def allows(schema: dict[str, Any], value: object) -> bool:
    return jsonschema_rs.Draft202012Validator(schema).is_valid(value)


@pytest.mark.parametrize("path", ["/api/admin/broadcasts", "/api/admin/dlt/messages"])
async def test_an_empty_status_filter_is_refused_as_the_document_says(client: httpx.AsyncClient, path: str) -> None:
    assert not allows(parameter_schema(path, "get", "status"), "")
    response = await client.get(path, params={"status": ""})
    assert response.status_code == 400, response.text
    assert "status" in response.json()["detail"]


async def test_an_empty_inbox_cursor_is_the_first_page(client: httpx.AsyncClient) -> None:
    assert allows(parameter_schema("/api/user/messages", "get", "cursor"), "")
    response = await client.get("/api/user/messages", params={"cursor": ""})
    assert response.status_code == 200, response.text
    assert response.json()["nextCursor"] is None


@pytest.mark.parametrize("path", ["/api/admin/dlt/messages", "/api/admin/dlt/summary"])
@pytest.mark.parametrize("to", ["2000-01-01T00:00:00Z", "1999-01-01T00:00:00Z"])
async def test_a_dlt_interval_that_ends_before_it_starts_matches_nothing(
    client: httpx.AsyncClient, path: str, to: str
) -> None:
    response = await client.get(path, params={"from": "2000-01-01T00:00:00Z", "to": to})
    assert response.status_code == 200, response.text
    assert response.json().get("items", []) == [] and response.json().get("total", 0) == 0


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"targetType": "ALL", "targetIds": ["u1"]}, "targetIds must be empty"),
        ({"targetType": "SELECTED"}, "at least one targetId"),
        ({"targetType": "ROLE", "targetIds": []}, "at least one targetId"),
        ({"targetType": "ROLE", "targetIds": ["no spaces"]}, "role name"),
    ],
)
async def test_the_audience_rules_per_target_type_are_in_the_document(
    client: httpx.AsyncClient, body: dict[str, Any], needle: str
) -> None:
    body = {"content": "hi", **body}
    assert not allows(component("CreateBroadcastRequest"), body)
    response = await client.post("/api/admin/broadcasts", json=body)
    assert response.status_code == 400, response.text
    assert needle in response.json()["detail"]


@pytest.mark.parametrize(
    "body",
    [
        {"targetType": "ALL"},
        {"targetType": "ALL", "targetIds": []},
        {"targetType": "SELECTED", "targetIds": ["u1"]},
        {"targetType": "ROLE", "targetIds": ["ops"]},
    ],
)
async def test_each_target_type_with_its_audience_is_valid(client: httpx.AsyncClient, body: dict[str, Any]) -> None:
    body = {"content": "hi", **body}
    assert allows(component("CreateBroadcastRequest"), body)
    response = await client.post("/api/admin/broadcasts", json=body)
    assert response.status_code == 201, response.text


async def test_a_bulk_import_over_the_user_limit_is_400_as_the_documents_max_items(client: httpx.AsyncClient) -> None:
    limit = Settings().limits.max_bulk_users
    body = DOCUMENT["paths"]["/api/admin/users/bulk"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body["maxItems"] == limit
    response = await client.post("/api/admin/users/bulk", json=[{"id": f"u{i}"} for i in range(limit + 1)])
    assert response.status_code == 400, response.text
    assert f"at most {limit} users" in response.json()["detail"]


@pytest.mark.parametrize("sub", ["ann\x85lee", "ann\u2028lee", "ann\u200blee", " ann", "ann\xa0"])
async def test_a_sub_the_server_refuses_is_refused_by_the_document(client: httpx.AsyncClient, sub: str) -> None:
    assert not allows(component("DevTokenRequest"), {"sub": sub})
    assert not allows(parameter_schema("/api/admin/users/{id}", "put", "id"), sub)
    assert (await client.post("/dev/token", json={"sub": sub})).status_code == 400


async def test_a_printable_sub_with_an_inner_space_signs_in(client: httpx.AsyncClient) -> None:
    assert allows(component("DevTokenRequest"), {"sub": "ann lee"})
    token = (await client.post("/dev/token", json={"sub": "ann lee"})).json()["token"]
    inbox = await client.get("/api/user/messages", headers={"Authorization": f"Bearer {token}"})
    assert inbox.status_code == 200, inbox.text


async def test_marking_read_an_id_that_is_no_broadcast_id_changes_nothing(client: httpx.AsyncClient) -> None:
    body = {"broadcastIds": ["nul\x00inside", "not-a-uuid", "00000000-0000-0000-0000-000000000000"]}
    assert allows(component("MarkReadRequest"), body)
    response = await client.post("/api/user/messages/read", json=body)
    assert response.status_code == 200, response.text
    assert response.json() == {"read": []}
