"""``/health/live`` (the process answers) and ``/health/ready`` (every dependency and role is working)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from broadcast.http.body import json_data
from broadcast.runtime.components import Components
from broadcast.runtime.observe import OK, readiness


async def live(request: Request) -> Response:
    return json_data({"status": "up"})


async def ready(request: Request) -> Response:
    """``{"status": "up"|"down", "failing": [names], "checks": {name: "ok" | why not}}``; 503 when down."""
    components: Components = request.app.state.components
    checks = await readiness(components.health, components.metrics)
    failing = sorted(n for n, verdict in checks.items() if verdict != OK)
    body = {
        "status": "down" if failing else "up",
        "instance": components.settings.server.instance_id,
        "failing": failing,
        "checks": checks,
    }
    return json_data(body, 503 if failing else 200)


routes = [Route("/health/live", live, methods=["GET"]), Route("/health/ready", ready, methods=["GET"])]
