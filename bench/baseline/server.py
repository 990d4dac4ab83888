"""The baseline for ``bench.sse_fanout``: the SSE fan-out a capable developer would write first.

One Starlette app on sse-starlette's ``EventSourceResponse``: every connection gets an ``asyncio.Queue``
and an async generator that awaits it and turns each message into a ``ServerSentEvent`` (JSON-encoded
per connection); ``POST /publish`` puts the message dict into every queue. No database, no log, no bus:
it is the lower bound on work *around* the fan-out, and the upper bound on work *in* it.

Run: ``python -m bench.baseline_sse --port 8090 [--loop asyncio]`` (``uvicorn.run`` defaults: uvloop when
installed, httptools; sse-starlette's ping every 15 s, like the real server's heartbeat).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import uvicorn
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

queues: set[asyncio.Queue[dict[str, Any]]] = set()


async def connect(request: Request) -> Response:
    user = request.query_params.get("devUser", "anonymous")
    queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    queues.add(queue)

    async def stream() -> AsyncIterator[ServerSentEvent]:
        try:
            yield ServerSentEvent(event="CONNECTED", data=json.dumps({"userId": user}))
            while True:
                message = await queue.get()
                yield ServerSentEvent(event="MESSAGE", id=message["broadcastId"], data=json.dumps(message))
        finally:
            queues.discard(queue)

    return EventSourceResponse(stream(), ping=15)


async def publish(request: Request) -> Response:
    body = await request.json()
    now = datetime.now(UTC).isoformat()
    message = {
        "broadcastId": str(uuid.uuid4()),
        "content": body["content"],
        "priority": "NORMAL",
        "category": None,
        "senderId": request.headers.get("X-Dev-User", "admin"),
        "targetType": "ALL",
        "createdAt": now,
        "expiresAt": None,
        "read": False,
    }
    for queue in list(queues):
        queue.put_nowait(message)
    return JSONResponse({**message, "recipients": len(queues)}, status_code=201)


async def health(request: Request) -> Response:
    return JSONResponse({"status": "ok", "connections": len(queues)})


app = Starlette(
    routes=[
        Route("/api/user/sse/connect", connect, methods=["GET"]),
        Route("/publish", publish, methods=["POST"]),
        Route("/health/live", health, methods=["GET"]),
    ]
)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8090)
    parser.add_argument("--loop", choices=["auto", "asyncio", "uvloop"], default="auto")
    args = parser.parse_args()
    uvicorn.run(app, host=args.host, port=args.port, loop=args.loop, log_level="warning", timeout_graceful_shutdown=5)
