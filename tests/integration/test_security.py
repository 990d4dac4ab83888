"""Who may call what, checked over every route the app has (enumerated from the router, so a new route is
covered the day it is added), on the real stack (PostgreSQL, Kafka, Redis) through the in-process app.

- Every ``/api/**`` route without a token → the same 401 problem, ``WWW-Authenticate: Bearer``.
- Every ``/api/admin/**`` route with a user's token → 403; any route outside ``/api/`` must be listed as
  public here.
- Forged tokens (the JWT attack matrix) → the same 401 as no token: no reason oracle.
- A user only ever sees and changes their own data (BOLA), whatever ids they pass.
- Bodies over the cap → 413 on every route that takes one, before the body is read.
- Security headers and the CORS allow-list.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import jwt
import orjson
import pytest
from starlette.routing import Mount, Route

from broadcast.core.settings import DEV_JWT_SECRET, LimitsSettings, ServerSettings, Settings
from broadcast.runtime.app import create_app
from devstack.stack import StackInfo
from tests.apps import api_in_process
from tests.auth import bearer

PUBLIC_ROUTES = {
    "/health/live",
    "/health/ready",
    "/metrics",  # public unless BROADCAST_OBSERVABILITY__METRICS_TOKEN is set (tests/unit/test_observability.py)
    "/api/openapi.json",
    "/",
    "/admin",
    "/inbox",
    "/dev/status",
}
DEV_ONLY = {"/dev/token"}  # public, but 404 unless the development secret is in use
STATIC_MOUNTS = {"/static"}  # the pages' CSS and JavaScript
ALLOWED_ORIGIN = "https://console.example"
PROBLEM = "application/problem+json"
SAMPLE = {"id": "00000000-0000-4000-8000-000000000000"}
EVIL_KEYS = "https://evil.example/keys.json"
EVIL_SECRET = "evil-secret-evil-secret-evil-secret!"
EVIL_JWK = {"kty": "oct", "k": "ZXZpbC1zZWNyZXQtZXZpbC1zZWNyZXQtZXZpbC1zZWNyZXQh"}  # EVIL_SECRET as a JWK
ALICE, BOB = bearer("alice"), bearer("bob")
ADMIN = bearer("ann", "admin")


@dataclass(frozen=True)
class Endpoint:
    method: str
    path: str

    def __str__(self) -> str:
        return f"{self.method} {self.path}"


def endpoints() -> list[Endpoint]:
    """Every (method, concrete path) the app routes, path parameters filled with a sample value."""
    found: list[Endpoint] = []
    for route in create_app(Settings()).routes:
        if isinstance(route, Mount) and route.path in STATIC_MOUNTS:
            continue
        assert isinstance(route, Route), f"unexpected route type {route!r}: extend this test"
        path = re.sub(r"\{(\w+)(:\w+)?\}", lambda m: SAMPLE.get(m.group(1), "x1"), route.path)
        found += [Endpoint(m, path) for m in sorted(route.methods or ()) if m != "HEAD"]
    return found


ENDPOINTS = endpoints()
API = [e for e in ENDPOINTS if e.path.startswith("/api/") and e.path not in PUBLIC_ROUTES]
ADMIN_ONLY = [e for e in API if e.path.startswith("/api/admin/")]
WITH_BODY = [e for e in API if e.method in ("POST", "PUT")]


@pytest.fixture
async def http(stack: StackInfo, unique_name: str) -> AsyncIterator[httpx.AsyncClient]:
    limits = LimitsSettings(max_csv_bytes=4 * 1_048_576)  # the CSV route's cap (5 MiB with the form) < 10 MB
    async with api_in_process(
        stack, unique_name, limits=limits, server=ServerSettings(cors_origins=[ALLOWED_ORIGIN])
    ) as (
        client,
        _,
    ):
        yield client


def assert_problem(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, f"{response.request.method} {response.request.url}: {response.text}"
    assert response.headers["content-type"] == PROBLEM
    assert "Traceback" not in response.text
    body: dict[str, Any] = response.json()
    return body


def test_every_route_is_either_an_api_route_or_explicitly_public() -> None:
    outside = {e.path for e in ENDPOINTS if not e.path.startswith("/api/")}
    assert outside <= PUBLIC_ROUTES | DEV_ONLY, f"routes outside /api/ must be reviewed and listed: {outside}"
    assert len(API) >= 20 and len(ADMIN_ONLY) >= 15  # the enumeration found the app's routes


@pytest.mark.parametrize("endpoint", API, ids=str)
async def test_no_token_is_401(http: httpx.AsyncClient, endpoint: Endpoint) -> None:
    response = await http.request(endpoint.method, endpoint.path, json={})
    body = assert_problem(response, 401)
    assert body == {"type": "about:blank", "title": "Unauthorized", "status": 401, "detail": NO_TOKEN_DETAIL}
    assert response.headers["www-authenticate"] == 'Bearer realm="broadcast"'


NO_TOKEN_DETAIL = "a valid bearer token is required"


@pytest.mark.parametrize("endpoint", ADMIN_ONLY, ids=str)
async def test_a_user_token_on_admin_routes_is_403(http: httpx.AsyncClient, endpoint: Endpoint) -> None:
    response = await http.request(endpoint.method, endpoint.path, json={}, headers=ALICE)
    body = assert_problem(response, 403)
    assert body["title"] == "Forbidden"
    assert "insufficient_scope" in response.headers["www-authenticate"]


def _forged() -> Iterator[tuple[str, str]]:
    now = int(time.time())
    good = {"sub": "ann", "aud": "broadcast-server", "iss": "broadcast-dev", "exp": now + 600, "roles": ["admin"]}

    def signed(**changes: Any) -> str:
        claims = {k: v for k, v in {**good, **changes}.items() if v is not None}
        return jwt.encode(claims, DEV_JWT_SECRET, algorithm="HS256")

    yield "alg none", "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0." + jwt.encode(good, "k" * 32).split(".")[1] + "."
    yield "expired", signed(exp=now - 300)
    yield "no exp", signed(exp=None)
    yield "wrong aud", signed(aud="elsewhere")
    yield "iss with a matching prefix", signed(iss="broadcast-dev-evil")
    yield "future nbf", signed(nbf=now + 3_600)
    yield "unknown kid", jwt.encode(good, DEV_JWT_SECRET, algorithm="HS256", headers={"kid": "nope"})
    yield "wrong secret", jwt.encode(good, "w" * 40, algorithm="HS256")
    yield "malformed base64", "e!J.e!J.s!g"
    yield "oversized", signed(pad="x" * 20_000)
    yield "32 KiB header", jwt.encode(good, DEV_JWT_SECRET, algorithm="HS256", headers={"x": "a" * 32_768})
    # key-location headers are refused even on a token signed with the server's own key (RFC 8725 §3.10)
    yield "jku", jwt.encode(good, DEV_JWT_SECRET, algorithm="HS256", headers={"jku": EVIL_KEYS})
    yield "x5u", jwt.encode(good, DEV_JWT_SECRET, algorithm="HS256", headers={"x5u": EVIL_KEYS})
    yield "jwk", jwt.encode(good, DEV_JWT_SECRET, algorithm="HS256", headers={"jwk": EVIL_JWK})
    yield (
        "jwk signed with the key it embeds",
        jwt.encode(good, EVIL_SECRET, algorithm="HS256", headers={"jwk": EVIL_JWK}),
    )
    yield "x5c", jwt.encode(good, DEV_JWT_SECRET, algorithm="HS256", headers={"x5c": ["MIIBevil"]})
    yield "unknown crit", jwt.encode(good, DEV_JWT_SECRET, algorithm="HS256", headers={"crit": ["exp-x"], "exp-x": 1})
    yield "basic scheme", ""


@pytest.mark.parametrize(("name", "forged"), list(_forged()), ids=[n for n, _ in _forged()])
async def test_forged_tokens_are_401_without_a_reason(http: httpx.AsyncClient, name: str, forged: str) -> None:
    header = "Basic YWRtaW46YWRtaW4=" if name == "basic scheme" else f"Bearer {forged}"
    for method, path in (("GET", "/api/admin/broadcasts"), ("GET", "/api/user/messages")):
        response = await http.request(method, path, headers={"Authorization": header})
        body = assert_problem(response, 401)
        assert body["detail"] == NO_TOKEN_DETAIL  # the same words for every failure
        assert response.headers["www-authenticate"] == 'Bearer realm="broadcast", error="invalid_token"'


async def test_a_key_url_in_a_token_is_never_fetched(http: httpx.AsyncClient) -> None:
    """jku/x5u naming a live server: 401 like any bad token, and the server never asks that URL."""
    requests: list[str] = []

    class Keys(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            requests.append(self.path)
            body = orjson.dumps({"keys": [{**EVIL_JWK, "kid": "evil"}]})
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    keys = ThreadingHTTPServer(("127.0.0.1", 0), Keys)
    threading.Thread(target=keys.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{keys.server_address[1]}/keys.json"
    claims = {"sub": "ann", "aud": "broadcast-server", "iss": "broadcast-dev", "exp": int(time.time()) + 600}
    try:
        for name in ("jku", "x5u"):
            for secret, kid in ((EVIL_SECRET, "evil"), (DEV_JWT_SECRET, None)):
                headers = {name: url, **({"kid": kid} if kid else {})}
                forged = jwt.encode({**claims, "roles": ["admin"]}, secret, algorithm="HS256", headers=headers)
                response = await http.get("/api/admin/broadcasts", headers={"Authorization": f"Bearer {forged}"})
                assert assert_problem(response, 401)["detail"] == NO_TOKEN_DETAIL
        await asyncio.sleep(0.2)
    finally:
        keys.shutdown()
    assert requests == [], f"the server fetched {requests}"
    # the same server answers a plain token: the refusals above were about the headers
    assert (await http.get("/api/admin/broadcasts", headers=ADMIN)).status_code == 200


async def test_users_only_ever_see_and_change_their_own_messages(http: httpx.AsyncClient) -> None:
    created = await http.post(
        "/api/admin/broadcasts",
        json={"content": "for bob", "targetType": "SELECTED", "targetIds": ["bob"]},
        headers=ADMIN,
    )
    assert created.status_code == 201, created.text
    bobs = created.json()["id"]
    # alice asks for bob's data every way a client might try: query parameters and the old dev header
    for params in ({}, {"userId": "bob"}, {"user": "bob"}, {"devUser": "bob"}):
        for path in ("/api/user/messages", "/api/user/messages/unread"):
            mine = await http.get(path, params=params, headers={**ALICE, "X-Dev-User": "bob"})
            # her own inbox, or a 400 for a parameter the route does not know: never bob's
            assert mine.status_code == 200 if not params else mine.status_code in (200, 400), mine.text
            assert bobs not in mine.text
    # alice "marks" bob's message read: nothing changes for bob
    marked = await http.post("/api/user/messages/read", json={"broadcastIds": [bobs]}, headers=ALICE)
    assert marked.status_code == 200 and marked.json() == {"read": []}
    unread = (await http.get("/api/user/messages/unread", headers=BOB)).json()
    assert [m["broadcastId"] for m in unread["items"]] == [bobs]
    # stats and deliveries are admin routes
    for path in (f"/api/admin/broadcasts/{bobs}/stats", f"/api/admin/broadcasts/{bobs}/deliveries"):
        assert_problem(await http.get(path, headers=ALICE), 403)
    # a user id in the body is an unknown field, not an identity
    smuggled = await http.post("/api/user/messages/read", json={"broadcastIds": [bobs], "userId": "bob"}, headers=BOB)
    assert_problem(smuggled, 400)
    assert (await http.get("/api/user/messages/unread", headers=BOB)).json()["count"] == 1


@pytest.mark.parametrize("endpoint", WITH_BODY, ids=str)
async def test_a_10_mb_body_is_413_on_every_route_that_takes_one(http: httpx.AsyncClient, endpoint: Endpoint) -> None:
    headers = {**ADMIN, "Content-Type": "application/json"}
    response = await http.request(
        endpoint.method, endpoint.path, content=b"[" + b" " * 10_000_000 + b"]", headers=headers
    )
    body = assert_problem(response, 413)
    assert "exceeds" in body["detail"]


async def test_a_chunked_body_without_length_is_cut_off_at_the_cap(http: httpx.AsyncClient) -> None:
    sent = 0

    async def chunks() -> AsyncIterator[bytes]:
        nonlocal sent
        for _ in range(100):
            sent += 1
            yield b" " * 100_000

    headers = {**ADMIN, "Content-Type": "application/json"}
    response = await http.post("/api/admin/broadcasts", content=chunks(), headers=headers)
    assert_problem(response, 413)
    assert sent < 100  # refused while arriving, not after buffering all 10 MB


async def test_security_headers_and_the_cors_allow_list(http: httpx.AsyncClient) -> None:
    response = await http.get("/api/user/messages", headers={**ALICE, "Origin": ALLOWED_ORIGIN})
    assert response.status_code == 200
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["content-security-policy"] == "default-src 'none'; frame-ancestors 'none'"
    assert response.headers["cache-control"] == "no-store"
    assert response.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    assert "access-control-allow-credentials" not in response.headers
    evil = await http.get("/api/user/messages", headers={**ALICE, "Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in evil.headers
    preflight = await http.options(
        "/api/admin/broadcasts",
        headers={
            "Origin": "https://evil.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization",
        },
    )
    assert preflight.status_code == 400 and "access-control-allow-origin" not in preflight.headers
    allowed = await http.options(
        "/api/admin/broadcasts",
        headers={
            "Origin": ALLOWED_ORIGIN,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type",
        },
    )
    assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    health = await http.get("/health/live")
    assert health.headers["x-content-type-options"] == "nosniff"


EVIL_ORIGIN = "https://evil.example"
STATE_CHANGING = [e for e in ENDPOINTS if e.method not in ("GET", "HEAD", "OPTIONS")]


async def test_a_cross_origin_write_is_refused_even_with_a_valid_token(http: httpx.AsyncClient) -> None:
    """Every state-changing route (create, cancel, redrive, purge, users, mark read, tickets, dev sign-in) with
    ``Origin: https://evil.example`` and a valid admin token: 403 before anything is read, and no CORS grant."""
    assert len(STATE_CHANGING) >= 12  # the enumeration found them
    bobs = {"content": "for bob", "targetType": "SELECTED", "targetIds": ["bob"]}
    created = await http.post("/api/admin/broadcasts", json=bobs, headers=ADMIN)  # no Origin: curl, an SDK
    assert created.status_code == 201, created.text
    broadcast = created.json()["id"]
    for endpoint in STATE_CHANGING:
        path = endpoint.path.replace(SAMPLE["id"], broadcast)
        for extra in ({}, {"Sec-Fetch-Site": "cross-site"}):
            response = await http.request(
                endpoint.method, path, json=bobs, headers={**ADMIN, "Origin": EVIL_ORIGIN, **extra}
            )
            body = assert_problem(response, 403)
            assert "another origin" in body["detail"], f"{endpoint}: {body}"
            assert "access-control-allow-origin" not in response.headers
    # nothing changed: the one broadcast is still active and still bob's only unread message
    listed = (await http.get("/api/admin/broadcasts", headers=ADMIN)).json()["items"]
    assert [(b["id"], b["status"]) for b in listed] == [(broadcast, "ACTIVE")]
    assert (await http.get("/api/user/messages/unread", headers=BOB)).json()["count"] == 1
    # the allow-listed console writes (and may read the answer); so do the server's own pages
    console = await http.post("/api/admin/broadcasts", json=bobs, headers={**ADMIN, "Origin": ALLOWED_ORIGIN})
    assert console.status_code == 201 and console.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    own = {"Origin": "http://test", "Sec-Fetch-Site": "same-origin"}  # the in-process client's Host is "test"
    cancelled = await http.delete(f"/api/admin/broadcasts/{broadcast}", headers={**ADMIN, **own})
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "CANCELLED"


async def test_cookies_are_no_credential(http: httpx.AsyncClient) -> None:
    """A forged cross-site request carries the victim's cookies but never an Authorization header: no cookie
    is a credential here, whatever it holds, so such a request is a 401 (and 403 when its Origin is foreign)."""
    admin_token = ADMIN["Authorization"].removeprefix("Bearer ")
    cookie = f"session=abc; access_token={admin_token}; Authorization=Bearer%20{admin_token}; jwt={admin_token}"
    for method, path in (
        ("POST", "/api/admin/broadcasts"),
        ("POST", "/api/admin/dlt/redrive-all"),
        ("POST", "/api/user/sse/ticket"),
        ("GET", "/api/user/messages"),
        ("GET", "/api/user/sse/connect"),
    ):
        bare = await http.request(method, path, json={"content": "x", "targetType": "ALL"}, headers={"Cookie": cookie})
        assert assert_problem(bare, 401)["detail"] == NO_TOKEN_DETAIL
        forged = await http.request(
            method, path, json={"content": "x", "targetType": "ALL"}, headers={"Cookie": cookie, "Origin": EVIL_ORIGIN}
        )
        assert forged.status_code == (401 if method == "GET" else 403), forged.text
        assert "access-control-allow-origin" not in forged.headers
        assert "set-cookie" not in bare.headers and "set-cookie" not in forged.headers
    assert (await http.get("/api/admin/broadcasts", headers=ADMIN)).json()["items"] == []


async def test_tickets_are_opaque_and_work_only_on_the_stream(http: httpx.AsyncClient) -> None:
    issued = await http.post("/api/user/sse/ticket", headers=ALICE)
    assert issued.status_code == 201, issued.text
    body = issued.json()
    assert body["expiresInSeconds"] == 30 and body["streamUrl"].endswith(body["ticket"])
    # a ticket is no credential for anything but the stream
    assert_problem(await http.get("/api/user/messages", params={"ticket": body["ticket"]}), 401)
    assert_problem(await http.get("/api/user/sse/connect", params={"ticket": "made-up"}), 401)
    assert_problem(await http.post("/api/user/sse/ticket"), 401)
    assert "." not in body["ticket"] and not body["ticket"].startswith("eyJ"), "an opaque ticket, not a token"


async def test_pages_carry_their_csp_and_static_files_are_public(http: httpx.AsyncClient) -> None:
    for path in ("/admin", "/inbox"):
        page = await http.get(path)
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        csp = page.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "default-src 'none'" in csp and "unsafe-inline" not in csp
        assert page.headers["x-content-type-options"] == "nosniff"
    script = await http.get("/static/broadcast-client.js")
    assert script.status_code == 200 and "BroadcastClient" in script.text
    assert (await http.get("/static/../tokens.py")).status_code == 404
