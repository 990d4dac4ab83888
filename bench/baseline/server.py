"""The naive baseline: the SSE fan-out (and durable admin path) a capable developer would write first.

One Starlette app on sse-starlette's ``EventSourceResponse``: every connection gets an ``asyncio.Queue``
and an async generator that awaits it and turns each message into a ``ServerSentEvent`` (JSON-encoded
per connection). The queues are kept in one global set and, beside it, a per-user dict of sets.

- ``GET /api/user/sse/connect?devUser=<id>``: the stream (``CONNECTED``, then ``MESSAGE`` events). The user
  is the ``devUser`` query parameter; no token is checked (a bearer header is ignored).
- ``POST /publish``: puts the message dict into every queue. No database, no log, no bus: the lower bound
  on work *around* the fan-out, and the upper bound on work *in* it (``bench.sse_fanout``, ``fanout``).
- ``POST /api/admin/broadcasts`` (only with ``--database-url``): the durable naive path, same body as
  ours (``content``, ``targetType`` ALL|SELECTED, ``targetIds``). In one transaction (asyncpg directly,
  a small pool): ``INSERT`` the broadcast, then one ``INSERT`` per SELECTED recipient; after the commit
  the message goes into the queues of the targeted users' connections (all queues for ALL, which writes
  no per-recipient rows); 201 ``{"id": …, …}``. No authentication or authorisation at all, no outbox,
  no Kafka, no idempotency: only the database write and the in-process hand-off.
- ``GET /health/live``.

Run: ``python -m bench.baseline.server --port 8090 [--loop asyncio] [--database-url postgresql://… --schema
s]`` (``uvicorn.run`` defaults: uvloop when installed, httptools; sse-starlette's ping every 15 s, like the
real server's heartbeat). With ``--database-url`` the tables are created in ``--schema`` at startup and the
schema is dropped at shutdown.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import asyncpg
import uvicorn
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

Queue = asyncio.Queue[dict[str, Any]]

queues: set[Queue] = set()
by_user: dict[str, set[Queue]] = {}
database: dict[str, Any] = {"url": None, "schema": "bench_baseline", "pool": None}


async def connect(request: Request) -> Response:
    user = request.query_params.get("devUser", "anonymous")
    queue: Queue = asyncio.Queue()
    queues.add(queue)
    by_user.setdefault(user, set()).add(queue)

    async def stream() -> AsyncIterator[ServerSentEvent]:
        try:
            yield ServerSentEvent(event="CONNECTED", data=json.dumps({"userId": user}))
            while True:
                message = await queue.get()
                yield ServerSentEvent(event="MESSAGE", id=message["broadcastId"], data=json.dumps(message))
        finally:
            queues.discard(queue)
            mine = by_user.get(user)
            if mine is not None:
                mine.discard(queue)
                if not mine:
                    by_user.pop(user, None)

    return EventSourceResponse(stream(), ping=15)


def _message(broadcast_id: str, content: str, sender: str, target: str, created: datetime) -> dict[str, Any]:
    return {
        "broadcastId": broadcast_id,
        "content": content,
        "priority": "NORMAL",
        "category": None,
        "senderId": sender,
        "targetType": target,
        "createdAt": created.isoformat(),
        "expiresAt": None,
        "read": False,
    }


async def publish(request: Request) -> Response:
    body = await request.json()
    message = _message(
        str(uuid.uuid4()), body["content"], request.headers.get("X-Dev-User", "admin"), "ALL", datetime.now(UTC)
    )
    for queue in list(queues):
        queue.put_nowait(message)
    return JSONResponse({**message, "recipients": len(queues)}, status_code=201)


async def create_broadcast(request: Request) -> Response:
    """The durable naive path: broadcast row, one INSERT per recipient, commit, then the queues."""
    pool = database["pool"]
    if pool is None:
        return JSONResponse({"detail": "started without --database-url"}, status_code=404)
    body = await request.json()
    content = body.get("content")
    target = body.get("targetType", "ALL")
    users = [str(u) for u in body.get("targetIds") or []]
    if not isinstance(content, str) or not content or target not in ("ALL", "SELECTED"):
        return JSONResponse({"detail": "content and targetType ALL|SELECTED are required"}, status_code=400)
    async with pool.acquire() as conn, conn.transaction():
        row = await conn.fetchrow(
            "INSERT INTO broadcasts (sender_id, content, target_type) VALUES ($1, $2, $3) RETURNING id, created_at",
            "admin",
            content,
            target,
        )
        for user in users if target == "SELECTED" else []:
            await conn.execute("INSERT INTO user_messages (broadcast_id, user_id) VALUES ($1, $2)", row["id"], user)
    message = _message(str(row["id"]), content, "admin", target, row["created_at"])
    recipients = list(queues) if target == "ALL" else [q for u in users for q in by_user.get(u, ())]
    for queue in recipients:
        queue.put_nowait(message)
    return JSONResponse({"id": row["id"], **message}, status_code=201)


async def health(request: Request) -> Response:
    return JSONResponse({"status": "ok", "connections": len(queues)})


SCHEMA_SQL = (
    "CREATE TABLE IF NOT EXISTS broadcasts (id BIGSERIAL PRIMARY KEY, sender_id TEXT NOT NULL, content TEXT NOT NULL,"
    " target_type TEXT NOT NULL, created_at TIMESTAMPTZ NOT NULL DEFAULT now())",
    "CREATE TABLE IF NOT EXISTS user_messages (id BIGSERIAL PRIMARY KEY,"
    " broadcast_id BIGINT NOT NULL REFERENCES broadcasts (id), user_id TEXT NOT NULL,"
    " status TEXT NOT NULL DEFAULT 'PENDING', created_at TIMESTAMPTZ NOT NULL DEFAULT now())",
    "CREATE INDEX IF NOT EXISTS user_messages_user ON user_messages (user_id)",
)


def _dsn(url: str) -> str:
    """asyncpg takes ``postgresql://``; SQLAlchemy-style ``postgresql+asyncpg://`` is accepted too."""
    return re.sub(r"^postgres(ql)?\+\w+://", "postgresql://", url)


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    url, schema = database["url"], database["schema"]
    if url is None:
        yield
        return
    if not re.fullmatch(r"[a-z_][a-z0-9_]*", schema):
        raise ValueError(f"bad schema name {schema!r}")
    setup = await asyncpg.connect(_dsn(url))
    try:
        await setup.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")
        await setup.execute(f"SET search_path TO {schema}")
        for statement in SCHEMA_SQL:
            await setup.execute(statement)
    finally:
        await setup.close()
    database["pool"] = await asyncpg.create_pool(
        _dsn(url), min_size=2, max_size=10, server_settings={"search_path": schema}
    )
    try:
        yield
    finally:
        await database["pool"].close()
        database["pool"] = None
        setup = await asyncpg.connect(_dsn(url))
        try:
            await setup.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        finally:
            await setup.close()


app = Starlette(
    routes=[
        Route("/api/user/sse/connect", connect, methods=["GET"]),
        Route("/publish", publish, methods=["POST"]),
        Route("/api/admin/broadcasts", create_broadcast, methods=["POST"]),
        Route("/health/live", health, methods=["GET"]),
    ],
    lifespan=lifespan,
)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8090)
    parser.add_argument("--loop", choices=["auto", "asyncio", "uvloop"], default="auto")
    parser.add_argument("--database-url", help="PostgreSQL URL: enables POST /api/admin/broadcasts (durable)")
    parser.add_argument("--schema", default="bench_baseline", help="schema of the durable path's tables")
    args = parser.parse_args()
    database["url"], database["schema"] = args.database_url, args.schema
    uvicorn.run(app, host=args.host, port=args.port, loop=args.loop, log_level="warning", timeout_graceful_shutdown=5)
