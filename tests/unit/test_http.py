"""The app in embedded mode through ASGI: health answers, errors are problem+json without traces."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from pydantic import SecretStr
from starlette.applications import Starlette
from starlette.routing import Route

from broadcast.core.settings import DatabaseSettings, Settings
from broadcast.runtime.app import create_app
from tests.auth import bearer


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    settings = Settings(database=DatabaseSettings(url=SecretStr(f"sqlite+aiosqlite:///{tmp_path}/app.db")))
    app = create_app(settings)

    async def boom(request: object) -> None:
        raise RuntimeError("secret internals")

    app.router.routes.append(Route("/boom", boom))
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app, raise_app_exceptions=False), base_url="http://test"
        ) as http,
    ):
        yield http


async def test_live_and_ready_answer(client: httpx.AsyncClient) -> None:
    live = await client.get("/health/live")
    assert live.status_code == 200 and live.json() == {"status": "up"}
    ready = await client.get("/health/ready")
    assert ready.status_code == 200
    body = ready.json()
    assert body["status"] == "up" and body["failing"] == [] and body["instance"]
    assert body["checks"] == {"database": "ok", "loops": "ok", "consumers": "ok"}


async def test_unknown_route_is_a_problem_document(client: httpx.AsyncClient) -> None:
    response = await client.get("/nope")
    assert response.status_code == 404
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["status"] == 404


async def test_unexpected_errors_hide_their_details(client: httpx.AsyncClient) -> None:
    response = await client.get("/boom")
    assert response.status_code == 500
    assert response.headers["content-type"] == "application/problem+json"
    assert "secret internals" not in response.text and "Traceback" not in response.text


METHOD_ORDER = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")


def _methods_by_path(app: Starlette) -> dict[str, set[str]]:
    """Every route's path (path parameters filled in) and the methods of the routes whose template matches it."""
    routes = [r for r in app.routes if isinstance(r, Route) and r.methods and r.path != "/boom"]
    sample = "00000000-0000-4000-8000-000000000001"  # a value every path converter takes
    paths = {re.sub(r"\{[^}]+\}", sample, r.path) for r in routes}
    return {p: {m for r in routes if r.path_regex.fullmatch(p) for m in r.methods or ()} for p in paths}


async def test_every_405_lists_the_methods_of_its_route_in_allow(tmp_path: Path) -> None:
    settings = Settings(database=DatabaseSettings(url=SecretStr(f"sqlite+aiosqlite:///{tmp_path}/app.db")))
    settings.testing.fault_drill_enabled = True
    app = create_app(settings)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with app.router.lifespan_context(app), httpx.AsyncClient(transport=transport, base_url="http://t") as http:
        by_path = _methods_by_path(app)
        assert len(by_path) > 20
        for path, methods in [*by_path.items(), ("/static/app.css", {"GET", "HEAD"})]:
            expected = ", ".join(m for m in METHOD_ORDER if m in methods)
            for method in ["TRACE", *(m for m in METHOD_ORDER if m not in methods)]:
                response = await http.request(method, path, headers=bearer("ann", "admin"))
                assert response.status_code == 405, (method, path, response.text)
                assert response.headers["content-type"] == "application/problem+json"
                assert response.headers.get("allow") == expected, (method, path)
