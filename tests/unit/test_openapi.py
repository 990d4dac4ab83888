"""The OpenAPI document describes every route of the app, and only those; ``/api/**`` needs bearer auth."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import httpx
import schemathesis
from pydantic import SecretStr
from schemathesis.core.result import Err
from starlette.routing import BaseRoute, Mount, Route

from broadcast import web
from broadcast.core.schemas import CreateBroadcastRequest, UserBody
from broadcast.core.settings import DatabaseSettings, LimitsSettings, Settings
from broadcast.runtime import openapi
from broadcast.runtime.app import create_app

HTTP_METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}
_CONVERTER = re.compile(r"{(\w+):\w+}")  # Starlette's "{id:int}" is OpenAPI's "{id}"


def app_operations(routes: Iterable[BaseRoute], prefix: str = "") -> Iterator[tuple[str, str]]:
    """(path, method) of every route, mounted ones included; HEAD comes with GET and is not listed."""
    for route in routes:
        if isinstance(route, Mount):
            yield from app_operations(route.routes, prefix + route.path)
        elif isinstance(route, Route):
            assert route.methods, f"{route.path} accepts every method: list them so they can be described"
            path = _CONVERTER.sub(r"{\1}", prefix + route.path)
            yield from ((path, m.lower()) for m in route.methods if m != "HEAD")
        else:
            raise AssertionError(f"a route of unknown kind cannot be checked: {route!r}")


def documented(document: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in document["paths"].items():
        for method, operation in item.items():
            if method in HTTP_METHODS:
                yield path, method, operation


def default_document() -> dict[str, Any]:
    return openapi.build_document(openapi.Bounds.of(Settings()))


def test_every_route_of_the_app_is_described_and_nothing_else() -> None:
    routes = {(p, m) for p, m in app_operations(create_app(Settings()).routes) if p not in web.PAGE_PATHS}
    described = {(path, method) for path, method, _ in documented(default_document())}
    assert len(routes) >= 26
    assert sorted(routes - described) == [], "routes without a description in broadcast/runtime/openapi.py"
    assert sorted(described - routes) == [], "descriptions of routes the app does not have"


def test_api_operations_need_bearer_auth_and_say_401() -> None:
    document = default_document()
    scheme = document["components"]["securitySchemes"][openapi.SECURITY_SCHEME]
    assert scheme == {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}
    for path, method, operation in documented(document):
        if path.startswith("/api/") and path != openapi.OPENAPI_PATH:
            assert operation["security"] == [{openapi.SECURITY_SCHEME: []}], (method, path)
            assert "401" in operation["responses"], (method, path)
            problem = operation["responses"]["401"]["content"]
            assert list(problem) == ["application/problem+json"], (method, path)
        else:
            assert operation["security"] == [], f"{method} {path} is public"


def test_every_operation_is_complete() -> None:
    document = default_document()
    ids = [operation["operationId"] for _, _, operation in documented(document)]
    assert len(ids) == len(set(ids)), "operationIds must be unique"
    for path, method, operation in documented(document):
        parameters = [*document["paths"][path].get("parameters", []), *operation.get("parameters", [])]
        declared = {p["name"] for p in parameters if p["in"] == "path"}
        assert declared == set(re.findall(r"{(\w+)}", path)), (method, path)
        assert operation["responses"], (method, path)
        for status, response in operation["responses"].items():
            assert list(response["content"]), (method, path, status)


def test_media_types_of_responses() -> None:
    paths = default_document()["paths"]
    assert list(paths["/api/user/sse/connect"]["get"]["responses"]["200"]["content"]) == ["text/event-stream"]
    assert list(paths["/api/admin/broadcasts"]["post"]["responses"]["201"]["content"]) == ["application/json"]
    assert list(paths["/api/admin/broadcasts/{id}"]["get"]["responses"]["404"]["content"]) == [
        "application/problem+json"
    ]
    csv = paths["/api/admin/broadcasts/csv"]["post"]["requestBody"]["content"]
    assert list(csv) == ["multipart/form-data"]


def test_request_bodies_are_the_models_schemas_with_the_settings_bounds() -> None:
    limits = LimitsSettings(max_content_chars=77, max_bulk_users=3, max_page_size=9)
    document = openapi.build_document(openapi.Bounds.of(Settings(limits=limits)))
    schemas = document["components"]["schemas"]
    create = schemas["CreateBroadcastRequest"]
    model = CreateBroadcastRequest.model_json_schema(by_alias=True)
    assert create["properties"].keys() == model["properties"].keys()
    assert create["required"] == model["required"] and create["additionalProperties"] is False
    assert create["properties"]["content"]["maxLength"] == 77
    assert schemas["UserBody"]["properties"] == UserBody.model_json_schema(by_alias=True)["properties"]
    paths = document["paths"]
    bulk = paths["/api/admin/users/bulk"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert bulk["maxItems"] == 3
    limit = {p["name"]: p for p in paths["/api/admin/broadcasts"]["get"]["parameters"]}["limit"]
    assert limit["schema"]["maximum"] == 9


def test_schemathesis_reads_every_operation() -> None:
    schema = schemathesis.openapi.from_dict(default_document())
    results = list(schema.get_all_operations())
    assert [str(r.err()) for r in results if isinstance(r, Err)] == []
    assert len(results) == len(list(documented(default_document())))


async def test_the_app_serves_the_document_of_its_settings(tmp_path: Path) -> None:
    settings = Settings(
        database=DatabaseSettings(url=SecretStr(f"sqlite+aiosqlite:///{tmp_path}/app.db")),
        limits=LimitsSettings(max_page_size=42),
    )
    app = create_app(settings)
    transport = httpx.ASGITransport(app=app)
    async with app.router.lifespan_context(app), httpx.AsyncClient(transport=transport, base_url="http://t") as http:
        first = await http.get(openapi.OPENAPI_PATH)
        second = await http.get(openapi.OPENAPI_PATH)
    assert first.status_code == 200 and first.headers["content-type"] == "application/json"
    assert first.json() == openapi.build_document(openapi.Bounds.of(settings))
    assert first.content == second.content
    assert first.json()["openapi"].startswith("3.1")
