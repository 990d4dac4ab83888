"""RELIABILITY #22, outbox growth and cleanup on PostgreSQL: a million published rows.

Published rows are kept for ``relay.retention_seconds`` and then purged by ``OutboxPurger`` in
batches of ``PURGE_BATCH``, each its own short transaction. The relay's own queries read only the partial
index of unpublished rows, so neither the million published rows nor their purge should slow them: the
test reports their latency before, during and after the purge (a report, not an assertion: the machine
is shared) and asserts what keeps it flat: the query plan, the bounded table, autovacuum's progress.
"""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta

from sqlalchemy import text

from broadcast import constants
from broadcast.adapters.sql_stores import append_outbox
from broadcast.domain import EventType, OutboxEvent
from broadcast.relay import PURGE_BATCH, OutboxPurger
from tests.integration.conftest import Pipeline

PUBLISHED = 1_000_000
RECENT = 2_000  # published within the retention period: kept


def percentile(values: list[float], q: float) -> float:
    return sorted(values)[min(len(values) - 1, int(q * len(values)))]


async def relay_query_ms(pipeline: Pipeline, lanes: int, rounds: int) -> list[float]:
    """Milliseconds of each of ``rounds`` relay rounds' reads (claim a lane, read its due rows, release)."""
    taken = []
    for n in range(rounds):
        started = time.perf_counter()
        claimed = await pipeline.outbox.claim_lanes("probe", 1, timedelta(seconds=30))
        for lane in claimed or [n % lanes]:
            await pipeline.outbox.due(lane, 500)
        await pipeline.outbox.release_lanes("probe", claimed)
        taken.append((time.perf_counter() - started) * 1000)
    return taken


async def test_a_million_published_rows_are_purged_in_batches_and_the_relay_queries_stay_on_their_index(
    pipeline: Pipeline,
) -> None:
    schema = pipeline.settings.database.schema_name
    lanes = constants.OUTBOX_LANES
    async with pipeline.engine.begin() as conn:
        await conn.execute(
            text(
                "INSERT INTO outbox_events (lane, topic, partition_key, event_type, payload, headers, published_at,"
                " created_at) SELECT n % :lanes, :topic, 'user-' || (n % 5000), 'CREATED', '\\x7b7d'::bytea, '[]',"
                " now() - make_interval(days => 2) + n * interval '1 ms', now() - make_interval(days => 2)"
                " FROM generate_series(1, :count) AS n"
            ),
            {"lanes": lanes, "topic": pipeline.topic(constants.SELECTED_TOPIC), "count": PUBLISHED},
        )
        await conn.execute(
            text(
                "INSERT INTO outbox_events (lane, topic, partition_key, event_type, payload, headers, published_at)"
                " SELECT n % :lanes, :topic, 'recent', 'CREATED', '\\x7b7d'::bytea, '[]', now()"
                " FROM generate_series(1, :count) AS n"
            ),
            {"lanes": lanes, "topic": pipeline.topic(constants.SELECTED_TOPIC), "count": RECENT},
        )
        await conn.execute(text("ANALYZE outbox_events"))
    due = [OutboxEvent(pipeline.topic(constants.SELECTED_TOPIC), f"k{n}", EventType.READ, b"{}") for n in range(200)]
    async with pipeline.engine.begin() as conn:
        await append_outbox(conn, due)  # unpublished rows for the relay's queries to find

    before = await relay_query_ms(pipeline, lanes, 50)
    async with pipeline.engine.connect() as conn:
        plan = "\n".join(
            row[0]
            for row in await conn.execute(
                text(
                    "EXPLAIN SELECT id FROM outbox_events WHERE lane = 3 AND published_at IS NULL"
                    " AND (not_before IS NULL OR not_before <= now()) ORDER BY id LIMIT 500"
                )
            )
        )
    assert "ix_outbox_events_unpublished" in plan, plan

    purger = OutboxPurger(pipeline.outbox, pipeline.settings.relay)
    stop = asyncio.Event()
    purge = asyncio.create_task(purger.run_once(stop))
    during: list[float] = []
    while not purge.done():
        during += await relay_query_ms(pipeline, lanes, 5)
    purged = await purge
    after = await relay_query_ms(pipeline, lanes, 50)

    async with pipeline.engine.connect() as conn:
        left = (await conn.execute(text("SELECT count(*) FROM outbox_events"))).scalar_one()
    assert purged == PUBLISHED, purged
    assert left == RECENT + len(due), "only rows within the retention period and unpublished ones are left"

    vacuumed, deadline = None, time.monotonic() + 180
    while vacuumed is None:  # autovacuum (default naptime 1 min) reclaims the million dead tuples
        async with pipeline.engine.connect() as conn:
            vacuumed, dead = (
                await conn.execute(
                    text(
                        "SELECT last_autovacuum, n_dead_tup FROM pg_stat_user_tables"
                        " WHERE schemaname = :schema AND relname = 'outbox_events'"
                    ),
                    {"schema": schema},
                )
            ).one()
        if vacuumed is None:
            assert time.monotonic() < deadline, f"autovacuum has not run on the outbox ({dead} dead tuples)"
            await asyncio.sleep(2)
    print(
        f"\n{PUBLISHED:,} published rows purged in batches of {PURGE_BATCH:,}; relay reads p50/p99 (ms): before "
        f"{percentile(before, 0.5):.1f}/{percentile(before, 0.99):.1f}, during {percentile(during, 0.5):.1f}/"
        f"{percentile(during, 0.99):.1f} ({len(during)} rounds), after {percentile(after, 0.5):.1f}/"
        f"{percentile(after, 0.99):.1f}; {left} rows left; autovacuum ran at {vacuumed} ({dead} dead tuples left)"
    )
