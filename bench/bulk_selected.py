"""Bulk SELECTED: a broadcast to N recipients, from request to all rows committed and all events acked.

Measured on the real stack (3 Kafka brokers, acks=all, PostgreSQL), in one run, beside a baseline:

- ``copy``: the lifecycle service as shipped — one transaction, ``COPY`` for the recipients' rows and the
  outbox rows — then the relay publishing the outbox (pipelined, idempotent producer).
- ``per-row``: the same rows written with plain per-row ``INSERT``s (``executemany``), the way a first
  version would, then the same relay.

Usage: ``python -m bench.bulk_selected [N ...] [--repeat R]`` (default 100000, 3 repeats). Prints a table
of medians and writes ``bench/results/<date>-bulk-selected.json``. Asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
import uuid
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import orjson
from aiokafka import AIOKafkaProducer
from pydantic import SecretStr
from sqlalchemy import insert, text

from broadcast.adapters.kafka.admin import ensure_topics
from broadcast.adapters.kafka.log import KafkaEventLog
from broadcast.adapters.sql import migrate as sql_migrate
from broadcast.adapters.sql.broadcasts import SqlBroadcastStore
from broadcast.adapters.sql.engine import create_engine
from broadcast.adapters.sql.rows import chunks
from broadcast.adapters.sql.stores import OUTBOX_COLUMNS, SqlOutboxStore, SqlUserStore, outbox_records
from broadcast.adapters.sql.tables import outbox_events, user_broadcast_messages
from broadcast.core import constants
from broadcast.core.domain import Broadcast, NewBroadcast, OutboxEvent, TargetType
from broadcast.core.settings import DatabaseSettings, KafkaSettings, LimitsSettings, RelaySettings
from broadcast.lifecycle.service import Lifecycle
from broadcast.outbox.relay import OutboxRelay
from devstack import stack

RESULTS = Path(__file__).parent / "results"


class PerRowStore(SqlBroadcastStore):
    """The baseline: identical transaction, but rows go in with executemany INSERTs instead of COPY."""

    async def _write_recipients(self, conn: Any, broadcast: Broadcast, user_ids: Any) -> None:
        now = broadcast.created_at
        for batch in chunks(user_ids):
            rows = [
                {
                    "broadcast_id": broadcast.id,
                    "user_id": u,
                    "delivery_status": "PENDING",
                    "read_status": "UNREAD",
                    "created_at": now,
                    "updated_at": now,
                }
                for u in batch
            ]
            await conn.execute(insert(user_broadcast_messages), rows)

    async def _write_outbox(self, conn: Any, events: Iterable[OutboxEvent], now: datetime) -> None:
        for batch in chunks(outbox_records(events, now)):
            await conn.execute(insert(outbox_events), [dict(zip(OUTBOX_COLUMNS, r, strict=True)) for r in batch])


async def one_run(
    n: int,
    make_store: Callable[[Any], SqlBroadcastStore],
    info: stack.StackInfo,
    tag: str,
    recipients: list[str] | None = None,
) -> dict[str, float]:
    schema = f"bench_{tag}_{time.monotonic_ns() % 10**9}"
    database = DatabaseSettings(url=SecretStr(info.postgres_url), schema_name=schema)
    kafka = KafkaSettings(bootstrap_servers=info.kafka_bootstrap, topic_prefix=f"{schema}.")
    engine = create_engine(database)
    try:
        await sql_migrate.upgrade(engine, database)
        await ensure_topics(kafka, [kafka.topic(constants.SELECTED_TOPIC)])
        lifecycle = Lifecycle(make_store(engine), SqlUserStore(engine), kafka, LimitsSettings())
        recipients = recipients or [f"user-{i:07d}" for i in range(n)]
        async with KafkaEventLog(kafka) as log:
            relay = OutboxRelay(SqlOutboxStore(engine), log, RelaySettings(lanes_per_claim=32), owner="bench")
            outbox = SqlOutboxStore(engine)
            started = time.perf_counter()
            await lifecycle.create(NewBroadcast("bench", TargetType.SELECTED), sender_id="bench", recipients=recipients)
            committed = time.perf_counter()
            while await outbox.backlog():
                await relay.run_once()
            acked = time.perf_counter()
        return {"commit_s": committed - started, "publish_s": acked - committed, "total_s": acked - started}
    finally:
        async with engine.begin() as conn:
            await conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        await engine.dispose()


async def limit_run(info: stack.StackInfo, recipients: list[str]) -> dict[str, float]:
    """The raw-library limit of ``one_run``'s work: one asyncpg transaction with the broadcast row, a COPY of
    the recipients' rows and a COPY of the outbox rows (an ``orjson``-encoded envelope each, built from a dict
    per user), then ``AIOKafkaProducer`` (idempotent, acks=all) sending those envelopes, one record batch per
    partition with ``send_batch`` (aiokafka's own partitioner, no lanes), until every batch is acknowledged.
    No validation, domain objects, relay lanes, marks or metrics."""
    schema = f"bench_limit_{time.monotonic_ns() % 10**9}"
    database = DatabaseSettings(url=SecretStr(info.postgres_url), schema_name=schema)
    kafka = KafkaSettings(bootstrap_servers=info.kafka_bootstrap, topic_prefix=f"{schema}.")
    engine = create_engine(database)
    await sql_migrate.upgrade(engine, database)  # the same tables and indexes
    topic = kafka.topic(constants.SELECTED_TOPIC)
    await ensure_topics(kafka, [topic])
    dsn = info.postgres_url.replace("postgresql+asyncpg://", "postgresql://", 1)
    conn = await asyncpg.connect(dsn, server_settings={"search_path": schema})
    producer = AIOKafkaProducer(bootstrap_servers=info.kafka_bootstrap, acks="all", enable_idempotence=True)
    await producer.start()
    try:
        started = time.perf_counter()
        now, bid = datetime.now(UTC), str(uuid.uuid4())
        payloads = [
            orjson.dumps({"eventId": f"{bid}:CREATED:{u}", "eventType": "CREATED", "broadcastId": bid, "userId": u})
            for u in recipients
        ]
        async with conn.transaction():
            await conn.execute(
                "INSERT INTO broadcast_messages (id, sender_id, content, target_type, target_roles, priority, status,"
                " fire_and_forget, targeted_count, created_at, updated_at) VALUES ($1, 'bench', 'bench', 'SELECTED',"
                " '[]', 'NORMAL', 'ACTIVE', false, $2, $3, $3)",
                bid, len(recipients), now,
            )  # fmt: skip
            rows = ((bid, u, "PENDING", "UNREAD", now, now) for u in recipients)
            columns = ["broadcast_id", "user_id", "delivery_status", "read_status", "created_at", "updated_at"]
            await conn.copy_records_to_table("user_broadcast_messages", records=rows, columns=columns)
            outbox = (
                (0, topic, u, "CREATED", p, "[]", bid, None, now) for u, p in zip(recipients, payloads, strict=True)
            )
            await conn.copy_records_to_table("outbox_events", records=outbox, columns=list(OUTBOX_COLUMNS))
        committed = time.perf_counter()
        partitions = sorted(await producer.partitions_for(topic))
        batches: dict[int, Any] = {}
        sent = []
        for u, p in zip(recipients, payloads, strict=True):
            key = u.encode()
            partition = producer._partition(topic, None, key, p, key, p)  # aiokafka's default partitioner
            batch = batches.get(partition) or batches.setdefault(partition, producer.create_batch())
            if batch.append(key=key, value=p, timestamp=None) is None:
                sent.append(await producer.send_batch(batch, topic, partition=partition))
                batches[partition] = batch = producer.create_batch()
                batch.append(key=key, value=p, timestamp=None)
        sent += [await producer.send_batch(b, topic, partition=part) for part, b in batches.items()]
        await asyncio.gather(*sent)
        acked = time.perf_counter()
        assert partitions
        return {"commit_s": committed - started, "publish_s": acked - committed, "total_s": acked - started}
    finally:
        await producer.stop()
        await conn.close()
        async with engine.begin() as c:
            await c.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        await engine.dispose()


async def main(sizes: list[int], repeat: int) -> None:
    info = await asyncio.to_thread(stack.up)
    rows: list[dict[str, Any]] = []
    for n in sizes:
        runs: dict[str, list[dict[str, float]]] = {"copy": [], "per-row": []}
        for _ in range(repeat):  # interleaved so machine noise hits both alike
            runs["copy"].append(await one_run(n, SqlBroadcastStore, info, "copy"))
            runs["per-row"].append(await one_run(n, PerRowStore, info, "rows"))
        for variant, results in runs.items():
            rows.append(
                {"n": n, "variant": variant, **{k: statistics.median(r[k] for r in results) for k in results[0]}}
            )
    print(f"\nbulk SELECTED, medians of {repeat} runs (3 brokers, acks=all, PostgreSQL)")
    header = ("recipients", "variant", "commit s", "publish s", "total s", "rows/s", "vs per-row")
    print("{:>10} {:>8} {:>9} {:>10} {:>8} {:>9} {:>10}".format(*header))
    for row in rows:
        base = next(r for r in rows if r["n"] == row["n"] and r["variant"] == "per-row")
        print(
            f"{row['n']:>10} {row['variant']:>8} {row['commit_s']:>9.2f} {row['publish_s']:>10.2f} "
            f"{row['total_s']:>8.2f} {row['n'] / row['total_s']:>9.0f} {base['total_s'] / row['total_s']:>9.2f}x"
        )
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"{datetime.now(UTC):%Y-%m-%d}-bulk-selected.json"
    out.write_text(json.dumps({"repeat": repeat, "rows": rows}, indent=2))
    print(f"written {out}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("sizes", nargs="*", type=int, default=[100_000])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    asyncio.run(main(args.sizes, args.repeat))
