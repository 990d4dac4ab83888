"""The Starlette application: routes, error handlers and the lifespan that opens the components."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.applications import Starlette

from broadcast import admin_api, health, openapi
from broadcast.components import open_components
from broadcast.http_problems import EXCEPTION_HANDLERS
from broadcast.settings import Settings
from broadcast.workers import ROLES, running
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
            yield

    app = Starlette(
        routes=[*health.routes, *admin_api.routes, *dlt_api.routes, *sse_routes.routes, *openapi.routes],
        exception_handlers=dict(EXCEPTION_HANDLERS),
        lifespan=lifespan,
    )

    def begin_shutdown() -> None:
        """Called on SIGTERM before the server stops: tell every stream, then end them."""
        components = getattr(app.state, "components", None)
        if components is not None:
            components.hub.shutdown(frame(EventName.SERVER_SHUTDOWN, {"reconnectInMs": RETRY_MS}))

    app.state.begin_shutdown = begin_shutdown
    return app
