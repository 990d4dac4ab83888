"""Pure ASGI middlewares (no ``BaseHTTPMiddleware``: it would buffer streams) guarding every request.

- ``AuthGate``: deny by default under ``/api/``. A bearer token (or, on the SSE connect route only, a
  single-use ``?ticket=``) becomes the scope's principal; ``/api/admin/**`` also needs the admin role.
- ``BodyLimit``: 413 before a body is buffered, by ``Content-Length`` and by counting what arrives.
- ``SecurityHeaders``: ``nosniff``, no framing, no referrer, a CSP (``default-src 'none'`` unless the
  response brought its own) and ``no-store`` on API answers.
- ``CrossOriginGuard``: 403 for a state-changing request a browser sent from an origin that is neither this
  server's nor allow-listed (CSRF defence in depth; the algorithm of Go's ``http.CrossOriginProtection``).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from broadcast.auth.tokens import InvalidToken, TokenVerifier
from broadcast.core.domain import Principal
from broadcast.errors import UnavailableError
from broadcast.http.body import too_large
from broadcast.http.identity import PRINCIPAL_SCOPE_KEY, VIA_TICKET_SCOPE_KEY, forbidden, unauthorized
from broadcast.http.problems import HttpProblem, problem
from broadcast.observability import logs

log = logging.getLogger(__name__)
API_PREFIX = "/api/"
ADMIN_PREFIX = "/api/admin/"
TICKET_PATH = "/api/user/sse/connect"
PUBLIC_API_PATHS = frozenset({"/api/openapi.json"})
API_CSP = "default-src 'none'; frame-ancestors 'none'"
MAX_TICKET_CHARS = 128
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

Redeem = Callable[[Scope, str], Awaitable[Principal | None]]


async def _reply(send: Send, exc: HttpProblem) -> None:
    response = problem(exc.status, exc.title, exc.detail, headers=exc.headers, **exc.extra)
    await response({"type": "http"}, _never_receive, send)


async def _never_receive() -> Message:  # a problem response never reads the request
    return {"type": "http.disconnect"}


class AuthGate:
    def __init__(self, app: ASGIApp, verifier: TokenVerifier, admin_role: str, redeem: Redeem) -> None:
        self.app, self._verifier, self._admin_role, self._redeem = app, verifier, admin_role, redeem

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = route_path(scope)
        if scope["type"] != "http" or not path.startswith(API_PREFIX) or path in PUBLIC_API_PATHS:
            await self.app(scope, receive, send)
            return
        try:
            who = await self._authenticate(scope)
            if path.startswith(ADMIN_PREFIX) and self._admin_role not in who.roles:
                log.info("forbidden: %s %s by %r (not %s)", scope["method"], path, who.sub, self._admin_role)
                raise forbidden()
        except HttpProblem as exc:
            await _reply(send, exc)
            return
        except UnavailableError as exc:
            log.warning("cannot check an SSE ticket: %s", exc)
            await _reply(send, HttpProblem(503, "Service unavailable", "sign-in cannot be checked now; retry"))
            return
        scope[PRINCIPAL_SCOPE_KEY] = who
        with logs.bound(user=who.sub):
            await self.app(scope, receive, send)

    async def _authenticate(self, scope: Scope) -> Principal:
        header = request_header(scope, b"authorization")
        if header is not None:
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise unauthorized(invalid_token=True)
            try:
                return await self._verifier.verify(token.strip())
            except InvalidToken as exc:
                log.info("refused bearer token on %s %s: %s", scope["method"], scope["path"], exc)
                raise unauthorized(invalid_token=True) from None
        ticket = _ticket(scope)
        if ticket is None:
            raise unauthorized()
        who = await self._redeem(scope, ticket) if len(ticket) <= MAX_TICKET_CHARS else None
        if who is None:
            log.info("refused SSE ticket on %s: unknown, used or expired", scope["path"])
            raise unauthorized(invalid_token=True)
        scope[VIA_TICKET_SCOPE_KEY] = True
        return who


def route_path(scope: Scope) -> str:
    """The path the router matches (``root_path`` removed, as Starlette does), so that a deployment under a
    prefix is guarded exactly like one at the root."""
    path: str = scope.get("path", "")
    root: str = scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


def request_header(scope: Scope, name: bytes) -> str | None:
    """The first value of request header ``name`` (lower-case bytes), as text."""
    for key, value in scope.get("headers", ()):
        if key == name:
            return str(value.decode("latin-1"))
    return None


def _ticket(scope: Scope) -> str | None:
    """``?ticket=`` — accepted only on the SSE connect route (``EventSource`` cannot send headers)."""
    if route_path(scope) != TICKET_PATH or scope["method"] != "GET":
        return None
    query: bytes = scope.get("query_string", b"")
    for pair in query.decode("latin-1").split("&"):
        key, _, value = pair.partition("=")
        if key == "ticket":  # the literal name only: an encoded one (%74icket) would dodge log redaction
            return value
    return None


class BodyLimit:
    """At most ``default`` bytes per request body (``per_path`` overrides, e.g. the CSV upload).

    A declared ``Content-Length`` is checked up front (the server then delivers exactly that many bytes);
    only a chunked body, which has no length to trust, is counted as it arrives. A request without a body
    (every stream, every GET) passes through untouched: no wrapper sits on its per-event writes.
    """

    def __init__(self, app: ASGIApp, default: int, per_path: Mapping[str, int]) -> None:
        self.app, self._default, self._per_path = app, default, dict(per_path)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self._per_path.get(route_path(scope), self._default)
        declared = request_header(scope, b"content-length")
        if declared is not None and declared.isascii() and declared.isdigit() and int(declared) > limit:
            await _reply(send, too_large(limit))
            return
        if declared is not None or request_header(scope, b"transfer-encoding") is None:
            await self.app(scope, receive, send)
            return
        received = 0
        responding = False

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    if responding:  # too late for a 413 (e.g. a stream reading for disconnects): hang up
                        return {"type": "http.disconnect"}
                    raise too_large(limit)
            return message

        async def watched(message: Message) -> None:
            nonlocal responding
            responding = responding or message["type"] == "http.response.start"
            await send(message)

        await self.app(scope, counted, watched)


class SecurityHeaders:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        api = route_path(scope).startswith(API_PREFIX)

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers.setdefault("X-Content-Type-Options", "nosniff")
                headers.setdefault("X-Frame-Options", "DENY")
                headers.setdefault("Referrer-Policy", "no-referrer")
                headers.setdefault("Content-Security-Policy", API_CSP)
                if api:
                    headers.setdefault("Cache-Control", "no-store")
            await send(message)

        await self.app(scope, receive, with_headers)


class CrossOriginGuard:
    """Refuses (403) a state-changing request (any method but GET, HEAD, OPTIONS) that a browser sent from an
    origin other than this server's and not in ``trusted`` (``SERVER__CORS_ORIGINS``).

    Authentication is by header only (no cookies), so a forged cross-site request carries no credential and
    is a 401 anyway; this is defence in depth, should an ambient credential ever appear. A browser says where
    a request comes from: ``Sec-Fetch-Site`` (every current browser), else ``Origin`` compared with ``Host``.
    Allowed: ``Sec-Fetch-Site`` ``same-origin`` or ``none`` (the pages this server serves, a typed URL); an
    allow-listed ``Origin``; and, without ``Sec-Fetch-Site``, no ``Origin`` at all (a non-browser client: curl,
    SDKs, other services) or one naming the request's own ``Host``. Everything else is refused before
    authentication, so nothing is read or written.
    """

    def __init__(self, app: ASGIApp, trusted: Iterable[str]) -> None:
        self.app = app
        self._trusted = frozenset(o.rstrip("/").lower() for o in trusted)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in SAFE_METHODS or self._allowed(scope):
            await self.app(scope, receive, send)
            return
        origin = request_header(scope, b"origin")
        log.info("refused cross-origin %s %s from %r", scope["method"], scope["path"], (origin or "")[:100])
        detail = "a request from another origin may not change anything here (its origin is not allowed)"
        await _reply(send, HttpProblem(403, "Forbidden", detail))

    def _allowed(self, scope: Scope) -> bool:
        origin = request_header(scope, b"origin")
        site = request_header(scope, b"sec-fetch-site")
        if origin is not None and origin.lower() in self._trusted:
            return True
        if site is not None:
            return site.lower() in ("same-origin", "none")
        if origin is None:
            return True
        host = request_header(scope, b"host")
        _, separator, authority = origin.partition("://")
        return bool(separator) and host is not None and authority.lower() == host.lower()
