"""The Starlette application: routes, error handlers and the lifespan that opens the components."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.types import Scope

from broadcast import web
from broadcast.admin import api as admin_api
from broadcast.admin import outbox_api as admin_outbox_api
from broadcast.admin.api import CSV_PATH, csv_body_limit
from broadcast.auth.jwks import JwksKeys
from broadcast.auth.tokens import TokenVerifier
from broadcast.core.domain import Principal
from broadcast.core.settings import Settings
from broadcast.http import observe as http_observe
from broadcast.http.observe import Correlation, RequestTimer
from broadcast.http.problems import EXCEPTION_HANDLERS
from broadcast.http.security import AuthGate, BodyLimit, CrossOriginGuard, SecurityHeaders
from broadcast.runtime import health, openapi
from broadcast.runtime.components import Components, open_components
from broadcast.runtime.workers import ROLES, running
from dlt import api as dlt_api
from sse import routes as sse_routes
from sse.frames import RETRY_MS, EventName, frame

log = logging.getLogger(__name__)


def create_app(settings: Settings, roles: frozenset[str] = frozenset(ROLES)) -> Starlette:
    """An app bound to ``settings``; resources open on lifespan start and close on shutdown."""

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with open_components(settings) as components, running(components, roles):
            app.state.components = components
            if settings.embedded:
                log.warning(
                    "embedded default: single process, SQLite at %s, in-process event log, bus and presence; "
                    "configure BROADCAST_KAFKA__BOOTSTRAP_SERVERS, BROADCAST_DATABASE__URL and "
                    "BROADCAST_REDIS__URL to run on Kafka, PostgreSQL and Redis",
                    settings.database.url.get_secret_value().split("///", 1)[-1],
                )
            else:
                log.info("serving on %s", settings.describe())
            if settings.auth.dev_secret_in_use:
                log.warning(
                    "development JWT secret in use: sign in on http://%s:%s/admin or /inbox (development "
                    "sign-in), or mint a token with `broadcast-server token --sub alice` (add `--role admin` for "
                    "the admin API) and send it as `Authorization: Bearer <token>`",
                    settings.server.host,
                    settings.server.port,
                )
            yield

    app = Starlette(
        routes=[
            *health.routes,
            *http_observe.routes,
            *admin_api.routes,
            *dlt_api.routes,
            *admin_outbox_api.routes,
            *sse_routes.routes,
            *openapi.routes,
            *web.routes,
        ],
        middleware=_middleware(settings),
        exception_handlers=dict(EXCEPTION_HANDLERS),
        lifespan=lifespan,
    )
    app.state.admin_role = settings.auth.admin_role

    def begin_shutdown() -> None:
        """Called on SIGTERM before the server stops: tell every stream, then end them."""
        components = getattr(app.state, "components", None)
        if components is not None:
            components.shutdown.begin()
            components.hub.shutdown(frame(EventName.SERVER_SHUTDOWN, {"reconnectInMs": RETRY_MS}))

    app.state.begin_shutdown = begin_shutdown
    return app


async def _redeem(scope: Scope, ticket: str) -> Principal | None:
    components: Components = scope["app"].state.components
    return await components.tickets.redeem(ticket)


def _middleware(settings: Settings) -> list[Middleware]:
    """Outermost first: the correlation id (on every answer, refusals too), security headers, CORS
    (preflights answer before auth), the cross-origin guard, API timing, body cap, then authentication."""
    auth = settings.auth
    verifier = TokenVerifier(auth, JwksKeys(auth.jwks_url, auth.algorithm) if auth.jwks_url else None)
    limits = settings.limits
    stack = [Middleware(Correlation), Middleware(SecurityHeaders)]
    if settings.server.cors_origins:
        stack.append(
            Middleware(
                CORSMiddleware,
                allow_origins=settings.server.cors_origins,
                allow_methods=["GET", "POST", "PUT", "DELETE"],
                allow_headers=["Authorization", "Content-Type", "Idempotency-Key", "X-Correlation-ID", "Last-Event-ID"],
                expose_headers=["X-Correlation-ID", "Location", "Retry-After"],
                allow_credentials=False,
                max_age=600,
            )
        )
    stack.append(Middleware(CrossOriginGuard, trusted=settings.server.cors_origins))
    stack.append(Middleware(RequestTimer))
    stack.append(Middleware(BodyLimit, default=limits.max_body_bytes, per_path={CSV_PATH: csv_body_limit(limits)}))
    stack.append(Middleware(AuthGate, verifier=verifier, admin_role=auth.admin_role, redeem=_redeem))
    return stack
