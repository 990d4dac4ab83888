"""The naive selected-topic consumer: the loop a capable developer writes first, for the ``consumer`` scenario.

One ``AIOKafkaConsumer`` (its own group id, ``enable_auto_commit=False``, from the earliest offset) and
``async for record in consumer``: ``json.loads`` the envelope, one ``SELECT`` of the recipient's row by
(broadcast id, user id) through an asyncpg pool, one Redis ``ZRANGEBYSCORE`` of the user's presence (the
same key layout as ours: ``<prefix>presence:<user>``, a sorted set of instance ids scored by expiry in
epoch ms), a Redis ``PUBLISH`` of the SSE frame to each instance's channel if the user is present, then
``await consumer.commit()`` after every record. Runs until SIGTERM/SIGINT, on the stdlib event loop
(``asyncio.run``).

Usage: ``python -m bench.baseline.consumer --bootstrap B --topic T --group G --dsn D --schema S
--redis-url R --redis-prefix P``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import time
from collections.abc import AsyncIterator, Coroutine
from typing import Any

import asyncpg
from aiokafka import AIOKafkaConsumer
from redis.asyncio import Redis


def sse_frame(row_id: int, event: dict[str, Any]) -> str:
    """The MESSAGE frame the user's stream would get (``id: s<row id>``)."""
    snapshot = event.get("broadcast") or {}
    data = {
        "broadcastId": event["broadcastId"],
        "content": snapshot.get("content"),
        "senderId": snapshot.get("senderId"),
        "priority": snapshot.get("priority"),
        "category": snapshot.get("category"),
        "createdAt": snapshot.get("createdAt"),
    }
    return f"id: s{row_id}\nevent: MESSAGE\ndata: {json.dumps(data)}\n\n"


async def handle(value: bytes, pool: asyncpg.Pool, redis: Redis, schema: str, prefix: str) -> int:
    """Handle one record; the number of instances it was published to."""
    event = json.loads(value)
    broadcast_id, user_id = event["broadcastId"], event["userId"]
    query = f'SELECT id FROM "{schema}".user_broadcast_messages WHERE broadcast_id = $1 AND user_id = $2'  # noqa: S608
    row_id = await pool.fetchval(query, broadcast_id, user_id)
    now_ms = int(time.time() * 1000)
    instances = await redis.zrangebyscore(f"{prefix}presence:{user_id}", f"({now_ms}", "+inf")
    if not instances:
        return 0
    message = json.dumps({"user": user_id, "frame": sse_frame(row_id, event), "broadcast": broadcast_id})
    for instance in instances:
        name = instance.decode() if isinstance(instance, bytes) else str(instance)
        await redis.publish(f"{prefix}instance:{name}", message)
    return len(instances)


@contextlib.asynccontextmanager
async def clients(args: argparse.Namespace) -> AsyncIterator[tuple[AIOKafkaConsumer, asyncpg.Pool, Redis]]:
    """The started consumer (its own group, no auto-commit, from the earliest offset), a pool and Redis."""
    consumer = AIOKafkaConsumer(
        args.topic,
        bootstrap_servers=args.bootstrap,
        group_id=args.group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    pool = await asyncpg.create_pool(args.dsn, min_size=1, max_size=10)
    redis = Redis.from_url(args.redis_url)
    await consumer.start()
    try:
        yield consumer, pool, redis
    finally:
        await consumer.stop()
        await pool.close()
        await redis.aclose()


async def consume(args: argparse.Namespace) -> None:
    async with clients(args) as (consumer, pool, redis):
        async for record in consumer:
            assert record.value is not None
            await handle(record.value, pool, redis, args.schema, args.redis_prefix)
            await consumer.commit()


async def main(args: argparse.Namespace) -> None:
    await until_signalled(consume(args))


async def until_signalled(work: Coroutine[Any, Any, None]) -> None:
    """Run ``work`` until it ends or SIGTERM/SIGINT cancels it."""
    task = asyncio.create_task(work)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)
    with contextlib.suppress(asyncio.CancelledError):
        await task


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--group", required=True)
    parser.add_argument("--dsn", required=True, help="postgresql://… (asyncpg)")
    parser.add_argument("--schema", required=True)
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--redis-prefix", required=True)
    return parser.parse_args(argv)


if __name__ == "__main__":
    asyncio.run(main(parse()))
