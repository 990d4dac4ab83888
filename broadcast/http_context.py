"""How a route reaches the process's components (set on ``app.state`` by the lifespan), typed."""

from __future__ import annotations

from starlette.requests import Request

from broadcast.components import Components


def components(request: Request) -> Components:
    """The components the lifespan opened for this app."""
    found: Components = request.app.state.components
    return found
