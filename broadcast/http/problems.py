"""RFC 9457 problem+json responses: the only place errors become HTTP.

Unknown exceptions become a bare 500 problem with no detail (the stack trace goes to the log, never to
the client).
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Match

from broadcast.errors import (
    BroadcastError,
    ConflictError,
    NotFoundError,
    UnavailableError,
    ValidationError,
)

log = logging.getLogger(__name__)
MEDIA_TYPE = "application/problem+json"
METHOD_ORDER = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
STATIC_METHODS = frozenset({"GET", "HEAD"})

_STATUS: dict[type[BroadcastError], tuple[int, str]] = {
    ValidationError: (400, "Invalid request"),
    NotFoundError: (404, "Not found"),
    ConflictError: (409, "Conflict"),
    UnavailableError: (503, "Service unavailable"),
}


class HttpProblem(Exception):
    """A refusal decided by the HTTP layer itself (401, 413, 415, or a 400 listing field errors).

    ``extra`` becomes RFC 9457 extension members (e.g. ``errors``); ``headers`` are added to the response.
    """

    def __init__(
        self, status: int, title: str, detail: str | None = None, *, headers: dict[str, str] | None = None, **extra: Any
    ) -> None:
        super().__init__(detail or title)
        self.status = status
        self.title = title
        self.detail = detail
        self.headers = headers or {}
        self.extra = extra


def problem(
    status: int, title: str, detail: str | None = None, *, headers: dict[str, str] | None = None, **extra: Any
) -> Response:
    body: dict[str, Any] = {"type": "about:blank", "title": title, "status": status}
    if detail:
        body["detail"] = detail
    body.update(extra)
    all_headers = {"Retry-After": "5"} if status == 503 else {}
    all_headers.update(headers or {})
    return Response(orjson.dumps(body), status_code=status, media_type=MEDIA_TYPE, headers=all_headers or None)


async def on_http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    headers = dict(exc.headers or {})
    if exc.status_code == 405:
        headers["Allow"] = allowed_methods(request)
    return problem(exc.status_code, exc.detail if isinstance(exc.detail, str) else "Error", headers=headers)


def allowed_methods(request: Request) -> str:
    """The ``Allow`` value of a 405 (RFC 9110): the methods of every route on the request's path. Starlette's
    own names only the first route that matched the path, and one path may have a route per method."""
    methods: set[str] = set()
    scope = request.scope
    top = {**scope, "root_path": scope.get("app_root_path", scope.get("root_path", ""))}  # as before any mount
    for route in request.app.router.routes:
        match, _ = route.matches(top)
        if match is Match.NONE:
            continue
        methods |= getattr(route, "methods", None) or STATIC_METHODS  # a mount serves static files
    return ", ".join(m for m in METHOD_ORDER if m in methods)


async def on_http_problem(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HttpProblem)
    return problem(exc.status, exc.title, exc.detail, headers=exc.headers, **exc.extra)


async def on_broadcast_error(request: Request, exc: Exception) -> Response:
    for cls in type(exc).__mro__:
        if cls in _STATUS:
            status, title = _STATUS[cls]
            return problem(status, title, str(exc) if status < 500 else None)
    return await on_unexpected(request, exc)


async def on_unexpected(request: Request, exc: Exception) -> Response:
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return problem(500, "Internal server error")


EXCEPTION_HANDLERS = {
    HTTPException: on_http_exception,
    HttpProblem: on_http_problem,
    BroadcastError: on_broadcast_error,
    Exception: on_unexpected,
}
