"""Request correlation and timing (pure ASGI middleware), and ``GET /metrics``.

``Correlation`` gives every request a correlation id — the caller's ``X-Correlation-ID`` when it is 1-200
printable ASCII characters, else a new one — binds it for the logs, puts it in the scope (the admin API
stores it with a broadcast, so it travels in Kafka headers to the SSE event and any dead letter) and
returns it in the response's ``X-Correlation-ID``. ``RequestTimer`` observes API latency by route
template (the stream route is left out: its "latency" is the stream's lifetime).
"""

from __future__ import annotations

import hmac
import time
import uuid
from typing import Protocol

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.datastructures import MutableHeaders
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from broadcast.core.settings import Settings
from broadcast.http.problems import HttpProblem
from broadcast.http.security import request_header, route_path
from broadcast.observability import logs
from broadcast.observability.metrics import Metrics

CORRELATION_SCOPE_KEY = "broadcast.correlation_id"
CORRELATION_HEADER = b"x-correlation-id"
MAX_CORRELATION_CHARS = 200
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
UNTIMED = frozenset({"/api/user/sse/connect", "/metrics"})


def printable_token(value: str, max_chars: int = MAX_CORRELATION_CHARS) -> bool:
    """1..``max_chars`` printable ASCII characters: what a correlation id or an Idempotency-Key may be."""
    return 1 <= len(value) <= max_chars and all(" " <= c <= "~" for c in value)


def correlation_id(scope: Scope) -> str:
    """The request's correlation id (set by ``Correlation``; a new one outside it)."""
    found = scope.get(CORRELATION_SCOPE_KEY)
    return found if isinstance(found, str) else uuid.uuid4().hex


class Correlation:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = request_header(scope, CORRELATION_HEADER)
        cid = given if given is not None and printable_token(given) else uuid.uuid4().hex
        scope[CORRELATION_SCOPE_KEY] = cid

        async def with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)["X-Correlation-ID"] = cid
            await send(message)

        with logs.bound(correlation=cid):
            await self.app(scope, receive, with_id)


class RequestTimer:
    """``broadcast_http_request_duration_seconds{method, route, status}`` for everything under ``/api``."""

    def __init__(self, app: ASGIApp, metrics: Metrics | None = None) -> None:
        self.app = app
        self._metrics = metrics
        self._routes: dict[object, str] = {}  # endpoint -> path template

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = route_path(scope)
        if scope["type"] != "http" or not path.startswith("/api/") or path in UNTIMED:
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), 500

        async def watched(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, watched)
        finally:
            metrics = self._metrics or _metrics_of(scope)
            if metrics is not None:
                route = _template(scope, self._routes)
                method = scope["method"] if scope["method"] in METHODS else "OTHER"  # bounded label values
                metrics.http_duration.labels(method, route, str(status)).observe(time.perf_counter() - started)


class Observed(Protocol):
    """What this module needs of the composition root (``broadcast.runtime.components`` satisfies it)."""

    settings: Settings
    metrics: Metrics


def _metrics_of(scope: Scope) -> Metrics | None:
    components: Observed | None = getattr(getattr(scope.get("app"), "state", None), "components", None)
    return components.metrics if components is not None else None


def _template(scope: Scope, cache: dict[object, str]) -> str:
    """The matched route's path template (bounded label values); ``unmatched`` for anything else. The router
    leaves the matched endpoint in the scope."""
    endpoint = scope.get("endpoint")
    if endpoint is None:
        return "unmatched"
    if not cache:
        for route in getattr(scope.get("app"), "routes", ()):
            if isinstance(route, Route):
                cache.setdefault(route.endpoint, route.path_format)
    return cache.get(endpoint, "unmatched")


async def metrics_endpoint(request: Request) -> Response:
    """The Prometheus exposition of this process; with ``observability.metrics_token`` set, only for
    ``Authorization: Bearer <token>``."""
    components: Observed = request.app.state.components
    token = components.settings.observability.metrics_token
    if token is not None:
        given = request.headers.get("authorization", "")
        expected = f"Bearer {token.get_secret_value()}"
        if not hmac.compare_digest(given.encode(), expected.encode()):
            raise HttpProblem(
                401,
                "Unauthorized",
                "GET /metrics needs the configured metrics bearer token",
                headers={"WWW-Authenticate": 'Bearer realm="metrics"'},
            )
    return Response(generate_latest(components.metrics.registry), media_type=CONTENT_TYPE_LATEST)


routes = [Route("/metrics", metrics_endpoint, methods=["GET"])]
