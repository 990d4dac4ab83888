"""The ASGI guards on their own, driven straight through ASGI: body cap, auth gate paths, log redaction."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import httpx
from pydantic import SecretStr
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message

from broadcast.auth.tokens import TokenVerifier, mint
from broadcast.core.domain import Principal
from broadcast.core.settings import AuthSettings, DatabaseSettings, ServerSettings, Settings
from broadcast.http.problems import EXCEPTION_HANDLERS
from broadcast.http.security import AuthGate, BodyLimit
from broadcast.runtime.app import create_app
from broadcast.runtime.serve import RedactSecrets
from tests.auth import token

AUTH = AuthSettings()
LIMIT = 1_000
seen: dict[str, Any] = {}


async def unbounded(request: Request) -> Response:
    """A careless handler: reads the whole body with no limit of its own."""
    body = await request.body()
    return Response(str(len(body)))


class StreamThenRead:
    """Starts answering, then keeps reading the body (as a stream waits for the client to go)."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self._run(receive, send)

    @staticmethod
    async def _run(receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                seen["disconnected"] = True
                break
        await send({"type": "http.response.body", "body": b"bye", "more_body": False})


async def whoami(request: Request) -> Response:
    principal = request.scope.get("broadcast.principal")
    return Response(principal.sub if principal else "nobody")


async def redeem(scope: Any, ticket: str) -> Principal | None:
    return Principal("tess", frozenset(), 2e9) if ticket == "good" else None


def app() -> ASGIApp:
    routes = [
        Route("/api/user/body", unbounded, methods=["POST"]),
        Route("/api/user/stream", StreamThenRead(), methods=["POST"]),
        Route("/api/admin/who", whoami, methods=["GET"]),
        Route("/api/user/sse/connect", whoami, methods=["GET"]),
    ]
    gate = Middleware(AuthGate, verifier=TokenVerifier(AUTH), admin_role="admin", redeem=redeem)
    body = Middleware(BodyLimit, default=LIMIT, per_path={})
    return Starlette(routes=routes, middleware=[body, gate], exception_handlers=dict(EXCEPTION_HANDLERS))


async def call(
    method: str,
    path: str,
    *,
    token: str | None = None,
    chunks: list[bytes] | None = None,
    query: bytes = b"",
    root_path: str = "",
) -> tuple[int, bytes]:
    headers = [(b"authorization", f"Bearer {token}".encode())] if token else []
    if chunks:
        headers.append((b"transfer-encoding", b"chunked"))  # no length: the body cap has to count
    pending = list(chunks or [])
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": root_path + path,
        "raw_path": (root_path + path).encode(),
        "root_path": root_path,
        "query_string": query,
        "headers": headers,
        "client": ("127.0.0.1", 5000),
        "server": ("127.0.0.1", 80),
    }
    status, body = 0, b""

    async def receive() -> Message:
        if pending:
            return {"type": "http.request", "body": pending.pop(0), "more_body": bool(pending)}
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        nonlocal status, body
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            body += message.get("body", b"")

    await app()(scope, receive, send)
    return status, body


async def test_a_chunked_body_over_the_cap_is_413_even_for_a_careless_handler() -> None:
    token = mint(AUTH, "ann")
    status, body = await call("POST", "/api/user/body", token=token, chunks=[b"x" * 400] * 3)
    assert status == 413 and b"exceeds 1000 bytes" in body
    assert await call("POST", "/api/user/body", token=token, chunks=[b"x" * 400] * 2) == (200, b"800")


async def test_past_the_cap_after_the_response_started_the_handler_sees_a_disconnect() -> None:
    seen.clear()
    status, body = await call("POST", "/api/user/stream", token=mint(AUTH, "ann"), chunks=[b"x" * 600] * 3)
    assert (status, body, seen) == (200, b"bye", {"disconnected": True})


async def test_a_prefix_deployment_is_guarded_like_the_root() -> None:
    for root in ("", "/broadcast"):
        assert (await call("GET", "/api/admin/who", root_path=root))[0] == 401
        assert (await call("GET", "/api/admin/who", token=mint(AUTH, "ann"), root_path=root))[0] == 403
        assert await call("GET", "/api/admin/who", token=mint(AUTH, "ann", ["admin"]), root_path=root) == (200, b"ann")


async def test_a_ticket_counts_only_under_its_literal_name_on_the_stream_route() -> None:
    assert await call("GET", "/api/user/sse/connect", query=b"ticket=good") == (200, b"tess")
    assert (await call("GET", "/api/user/sse/connect", query=b"%74icket=good"))[0] == 401
    assert (await call("GET", "/api/user/sse/connect", query=b"ticket=bad"))[0] == 401
    assert (await call("GET", "/api/admin/who", query=b"ticket=good"))[0] == 401


def test_the_access_log_never_shows_a_ticket() -> None:
    record = logging.LogRecord(
        "uvicorn.access",
        logging.INFO,
        __file__,
        1,
        '%s - "%s %s"',
        ("1.2.3.4", "GET", "/x?a=1&ticket=SECRET&b=2"),
        None,
    )
    assert RedactSecrets().filter(record)
    assert "SECRET" not in record.getMessage() and "ticket=[redacted]&b=2" in record.getMessage()


def test_the_access_log_never_shows_a_jwt_whatever_its_parameter() -> None:
    jwt = token("alice")
    for url in (
        f"/x?jwt={jwt}",
        f"/x?bearer={jwt}&b=2",
        f"/x?authorization=Bearer%20{jwt}",
        f"/x?q={jwt}",
        f"/x/{jwt}/y",
        "/x?password=hunter2",
    ):
        record = logging.LogRecord(
            "uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s"', ("1.2.3.4", "GET", url), None
        )
        assert RedactSecrets().filter(record)
        line = record.getMessage()
        assert jwt.split(".")[1] not in line and "hunter2" not in line, line
        assert "[redacted" in line, line


async def test_dev_sign_in_exists_only_with_the_dev_secret(tmp_path: Path) -> None:
    for secret, expected in ((None, 200), ("s" * 40, 404)):
        auth = AuthSettings() if secret is None else AuthSettings(jwt_secret=SecretStr(secret))
        settings = Settings(auth=auth, database=DatabaseSettings(url=SecretStr(f"sqlite:///{tmp_path}/{expected}.db")))
        app = create_app(settings)
        transport = httpx.ASGITransport(app=app)
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=transport, base_url="http://t") as http,
        ):
            answer = await http.post("/dev/token", json={"sub": "alice", "roles": ["admin"]})
            assert answer.status_code == expected, answer.text
            status = (await http.get("/dev/status")).json()
            assert status == {"devSignIn": secret is None}
            if expected == 200:
                assert (await TokenVerifier(auth).verify(answer.json()["token"])).roles == {"admin"}


CONSOLE = "https://console.example"  # the allow-listed origin (SERVER__CORS_ORIGINS)
EVIL = "https://evil.example"


async def test_a_state_changing_request_from_a_foreign_origin_is_403_and_changes_nothing(tmp_path: Path) -> None:
    """CSRF defence in depth: the browser says where a request comes from (Sec-Fetch-Site, else Origin vs Host);
    a write from an origin that is neither this server's nor allow-listed is refused before it is read, even
    with a valid token. Same-origin pages, allow-listed origins and non-browser clients (no Origin) work."""
    settings = Settings(
        database=DatabaseSettings(url=SecretStr(f"sqlite+aiosqlite:///{tmp_path}/app.db")),
        server=ServerSettings(cors_origins=[CONSOLE]),
    )
    app = create_app(settings)
    admin = {"Authorization": f"Bearer {token('ann', 'admin')}"}
    body = {"content": "hi", "targetType": "ALL"}
    refused = [
        {"Origin": EVIL},
        {"Origin": EVIL, "Sec-Fetch-Site": "cross-site"},
        {"Origin": "https://sub.test", "Sec-Fetch-Site": "same-site"},
        {"Sec-Fetch-Site": "cross-site"},  # a browser always says Origin on a cross-site POST; refused anyway
        {"Origin": "null"},  # a sandboxed frame or a file:// page
        {"Origin": "http://test.evil.example"},  # the Host as a prefix is no match
    ]
    allowed = [
        {},  # curl, SDKs, other services: no Origin, no Sec-Fetch-Site
        {"Origin": "http://test"},  # the server's own pages, a browser without Sec-Fetch-Site (Origin == Host)
        {"Origin": "https://test"},  # the same, TLS ended by a proxy: the scheme is not compared (as in Go)
        {"Origin": "http://test", "Sec-Fetch-Site": "same-origin"},
        {"Origin": "https://public.example", "Sec-Fetch-Site": "same-origin"},  # behind a proxy rewriting Host
        {"Origin": CONSOLE, "Sec-Fetch-Site": "cross-site"},  # the allow-listed console
        {"Origin": CONSOLE.upper()},
    ]
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http,
    ):
        for headers in refused:
            for method, path, json_body in (
                ("POST", "/api/admin/broadcasts", body),
                ("PUT", "/api/admin/users/u1", {"roles": ["admin"]}),
                ("POST", "/api/user/messages/read", {"broadcastIds": ["x"]}),
                ("POST", "/api/user/sse/ticket", None),
                ("POST", "/dev/token", {"sub": "ann", "roles": ["admin"]}),
            ):
                response = await http.request(method, path, json=json_body, headers={**admin, **headers})
                assert response.status_code == 403, (headers, path, response.text)
                assert response.headers["content-type"] == "application/problem+json"
                assert "another origin" in response.json()["detail"]
                assert response.headers.get("access-control-allow-origin") is None
        assert (await http.get("/api/admin/broadcasts", headers=admin)).json()["items"] == []
        assert (await http.get("/api/admin/users/u1", headers=admin)).status_code == 404
        created = []
        for headers in allowed:
            response = await http.post("/api/admin/broadcasts", json=body, headers={**admin, **headers})
            assert response.status_code == 201, (headers, response.text)
            created.append(response.json()["id"])
        # reads are not refused (CORS keeps a foreign page from reading the answer: no Allow-Origin for it)
        read = await http.get(f"/api/admin/broadcasts/{created[0]}", headers={**admin, "Origin": EVIL})
        assert read.status_code == 200 and "access-control-allow-origin" not in read.headers
        # a cancel is a state change too
        cancel = await http.delete(f"/api/admin/broadcasts/{created[0]}", headers={**admin, "Origin": EVIL})
        assert cancel.status_code == 403
        assert (await http.get(f"/api/admin/broadcasts/{created[0]}", headers=admin)).json()["status"] == "ACTIVE"
        assert (await http.delete(f"/api/admin/broadcasts/{created[0]}", headers=admin)).status_code == 200
        # the served document says so for every state-changing operation
        document = (await http.get("/api/openapi.json")).json()
        writes = [(p, m, op) for p, item in document["paths"].items() for m, op in item.items() if m in WRITES]
        assert len(writes) >= 12 and all("403" in op["responses"] for _, _, op in writes), writes
        assert "origin" in document["paths"]["/api/user/sse/ticket"]["post"]["responses"]["403"]["description"]


WRITES = ("post", "put", "patch", "delete")
