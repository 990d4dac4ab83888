"""Where the OpenAPI document and the server once disagreed (found by the schemathesis fuzz): each case
checks what the server answers and that the document says the same. The app runs embedded (SQLite)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import jsonschema_rs
import pytest
from pydantic import SecretStr

from broadcast.core.settings import DatabaseSettings, Settings
from broadcast.http.body import validated
from broadcast.http.problems import HttpProblem
from broadcast.runtime import openapi
from broadcast.runtime.app import create_app
from dlt import api as dlt_api
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


# Unassigned (U+E0080) and supplementary private-use (U+F0000, U+10FFFD) characters: `str.isprintable()`
# refuses them, the document's USER_ID_PATTERN allows them; the pattern is now the one rule.
@pytest.mark.parametrize("user_id", ["ann\U000e0080", "\U000f0000", "x\U0010fffdy"])
async def test_a_user_id_the_document_allows_is_accepted_everywhere(client: httpx.AsyncClient, user_id: str) -> None:
    assert allows(parameter_schema("/api/admin/users/{id}", "put", "id"), user_id)
    assert allows(component("DevTokenRequest"), {"sub": user_id})
    path = f"/api/admin/users/{quote(user_id)}"
    assert (await client.put(path, json={"roles": ["ops"]})).status_code == 200
    assert (await client.post("/api/admin/users/bulk", json=[{"id": user_id}])).status_code == 200
    assert (await client.get(path)).json()["id"] == user_id
    token = (await client.post("/dev/token", json={"sub": user_id})).json()["token"]
    inbox = await client.get("/api/user/messages", headers={"Authorization": f"Bearer {token}"})
    assert inbox.status_code == 200, inbox.text


async def test_an_invalid_dev_token_body_over_4_kib_is_a_400_not_a_413(client: httpx.AsyncClient) -> None:
    body = {"sub": 1, "roles": [["x" * 100]] * 50}
    assert not allows(component("DevTokenRequest"), body)
    response = await client.post("/dev/token", json=body)
    assert response.status_code == 400, response.text


@pytest.mark.parametrize(
    "path", ["/api/admin/broadcasts", "/api/user/messages", f"/api/admin/broadcasts/{uuid.uuid4()}/deliveries"]
)
@pytest.mark.parametrize("query", ["=false", "limitt=5", "statuss=ACTIVE"])
async def test_an_unknown_query_parameter_is_refused(client: httpx.AsyncClient, path: str, query: str) -> None:
    response = await client.get(f"{path}?{query}")
    assert response.status_code == 400, response.text
    assert "unknown query parameter" in response.json()["detail"]


@pytest.mark.parametrize(("method", "allow"), [("GET", "POST"), ("DELETE", "POST"), ("OPTIONS", "POST")])
async def test_the_csv_upload_path_is_no_broadcast_id(client: httpx.AsyncClient, method: str, allow: str) -> None:
    response = await client.request(method, "/api/admin/broadcasts/csv")
    assert response.status_code == 405, response.text
    assert response.headers["Allow"] == allow


@pytest.mark.parametrize("method", ["GET", "PUT", "OPTIONS"])
async def test_the_bulk_import_path_is_no_user_id(client: httpx.AsyncClient, method: str) -> None:
    assert not allows(parameter_schema("/api/admin/users/{id}", "put", "id"), "bulk")
    response = await client.request(method, "/api/admin/users/bulk", json={})
    assert response.status_code == 405, response.text
    assert response.headers["Allow"] == "POST"


async def test_a_broadcast_path_that_is_no_uuid_is_404(client: httpx.AsyncClient) -> None:
    for path in ("/api/admin/broadcasts/nope", "/api/admin/broadcasts/nope/stats"):
        response = await client.get(path)
        assert response.status_code == 404, response.text
        assert response.headers["content-type"] == "application/problem+json"


@pytest.mark.parametrize("path", ["/api/admin/dlt/messages", "/api/admin/dlt/summary"])
@pytest.mark.parametrize("name", ["from", "to"])
async def test_an_empty_dlt_time_filter_is_refused_as_the_document_says(
    client: httpx.AsyncClient, path: str, name: str
) -> None:
    schema = parameter_schema(path, "get", name)
    assert not jsonschema_rs.Draft202012Validator(schema, validate_formats=True).is_valid("")
    response = await client.get(path, params={name: ""})
    assert response.status_code == 400, response.text
    assert name in response.json()["detail"]


async def test_an_empty_last_event_id_is_refused_as_the_document_says(client: httpx.AsyncClient) -> None:
    assert not allows(parameter_schema("/api/user/sse/connect", "get", "lastEventId"), "")
    # refused before the stream opens (an open stream would never end: hence the timeout)
    response = await asyncio.wait_for(client.get("/api/user/sse/connect", params={"lastEventId": ""}), 5)
    assert response.status_code == 400, response.text
    assert "lastEventId" in response.json()["detail"]


async def test_a_number_is_no_boolean(client: httpx.AsyncClient) -> None:
    body = {"content": "hi", "targetType": "ALL", "fireAndForget": 0}
    assert not allows(component("CreateBroadcastRequest"), body)
    response = await client.post("/api/admin/broadcasts", json=body)
    assert response.status_code == 400, response.text
    assert response.json()["errors"][0]["field"] == "fireAndForget"


def test_an_integral_number_with_a_fraction_part_is_an_integer() -> None:
    """JSON Schema (and JavaScript) make no difference between 46 and 46.0; the server neither."""
    assert allows(component("ArmDrillRequest"), {"expiresInSeconds": 46.0})
    assert validated(dlt_api.ArmDrillRequest, b'{"expiresInSeconds": 46.0}').expires_in_seconds == 46
    assert not allows(component("ArmDrillRequest"), {"expiresInSeconds": 46.5})
    with pytest.raises(HttpProblem):
        validated(dlt_api.ArmDrillRequest, b'{"expiresInSeconds": 46.5}')
    with pytest.raises(HttpProblem):
        validated(dlt_api.ArmDrillRequest, b'{"expiresInSeconds": "46"}')
