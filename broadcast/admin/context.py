"""The admin routes' view of the composition root (``sse/context.py`` says why routes take a view)."""

from __future__ import annotations

from typing import Protocol

from starlette.requests import Request

from broadcast.core.ports.stores import OutboxStore, UserStore
from broadcast.core.settings import Settings
from broadcast.lifecycle.service import Lifecycle
from broadcast.observability.metrics import Metrics


class AdminContext(Protocol):
    settings: Settings
    lifecycle: Lifecycle
    metrics: Metrics
    outbox: OutboxStore
    users: UserStore


def admin_context(request: Request) -> AdminContext:
    """The components the lifespan opened for this app, as the admin routes and pages see them."""
    found: AdminContext = request.app.state.components
    return found
