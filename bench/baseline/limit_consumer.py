"""The raw-library limit of the ``consumer`` scenario: ours' work per batch, with nothing but the libraries.

One ``AIOKafkaConsumer`` (its own group id, ``enable_auto_commit=False``, from the earliest offset) on uvloop,
``getmany(max_records=500)`` and per partition's records: ``orjson.loads`` of each envelope, one asyncpg
lookup of all their rows (a join with two unnested arrays, as ours on PostgreSQL), one Redis pipeline of
``ZRANGEBYSCORE`` for the users' presence (ours' key layout), one pipeline of ``PUBLISH`` of an SSE frame to
each present user's instances; then one ``commit()`` per ``getmany``. No validation, no error handling, no
metrics or logs: what this machine and these libraries do for the same work, the ceiling ours is held to.

Usage: ``python -m bench.baseline.limit_consumer --bootstrap B --topic T --group G --dsn D --schema S
--redis-url R --redis-prefix P``.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import asyncpg
import orjson
import uvloop
from redis.asyncio import Redis

from bench.baseline.consumer import clients, parse, until_signalled

LOOKUP = (
    'SELECT m.broadcast_id, m.user_id, m.id FROM "{schema}".user_broadcast_messages m'
    " JOIN unnest($1::varchar[], $2::varchar[]) AS t(b, u) ON m.broadcast_id = t.b AND m.user_id = t.u"
)


async def handle(values: list[bytes], pool: asyncpg.Pool, redis: Redis, schema: str, prefix: str) -> int:
    """One partition's records; the number of publishes."""
    events: list[dict[str, Any]] = [orjson.loads(v) for v in values]
    pairs = [(e["broadcastId"], e["userId"]) for e in events]
    rows = await pool.fetch(LOOKUP.format(schema=schema), [p[0] for p in pairs], [p[1] for p in pairs])
    ids = {(r[0], r[1]): r[2] for r in rows}
    now_ms = int(time.time() * 1000)
    async with redis.pipeline(transaction=False) as pipe:
        for _, user_id in pairs:
            pipe.zrangebyscore(f"{prefix}presence:{user_id}", f"({now_ms}", "+inf")
        present = await pipe.execute()
    published = 0
    async with redis.pipeline(transaction=False) as pipe:
        for event, pair, instances in zip(events, pairs, present, strict=True):
            if instances:
                snapshot = event.get("broadcast") or {}
                data = orjson.dumps({"broadcastId": pair[0], "content": snapshot.get("content")}).decode()
                frame = f"id: s{ids.get(pair)}\nevent: MESSAGE\ndata: {data}\n\n"
                message = orjson.dumps({"user": pair[1], "frame": frame, "broadcast": pair[0]})
                for instance in instances:
                    pipe.publish(f"{prefix}instance:{instance.decode()}", message)
                    published += 1
        if published:
            await pipe.execute()
    return published


async def consume(args: Any) -> None:
    async with clients(args) as (consumer, pool, redis):
        while True:
            batches = await consumer.getmany(timeout_ms=1000, max_records=500)
            values = [[r.value for r in records if r.value is not None] for records in batches.values()]
            await asyncio.gather(*(handle(v, pool, redis, args.schema, args.redis_prefix) for v in values))
            if batches:
                await consumer.commit()


if __name__ == "__main__":
    uvloop.run(until_signalled(consume(parse())))
