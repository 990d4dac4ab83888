"""``/health/live`` (the process answers) and ``/health/ready`` (every dependency answers in time)."""

from __future__ import annotations

import asyncio

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from broadcast.components import Components
from broadcast.errors import UnavailableError
from broadcast.schemas import json_data

CHECK_TIMEOUT_S = 3.0


async def live(request: Request) -> Response:
    return json_data({"status": "up"})


async def ready(request: Request) -> Response:
    components: Components = request.app.state.components
    names = list(components.health)
    results = await asyncio.gather(*(_run(components.health[n].check()) for n in names))
    checks = dict(zip(names, results, strict=True))
    failing = sorted(n for n, r in checks.items() if r != "ok")
    body = {"status": "down" if failing else "up", "failing": failing, "checks": checks}
    return json_data(body, 503 if failing else 200)


async def _run(check: object) -> str:
    try:
        await asyncio.wait_for(check, CHECK_TIMEOUT_S)  # type: ignore[arg-type]
    except UnavailableError as exc:
        return str(exc)
    except TimeoutError:
        return f"no answer within {CHECK_TIMEOUT_S} s"
    return "ok"


routes = [Route("/health/live", live, methods=["GET"]), Route("/health/ready", ready, methods=["GET"])]
