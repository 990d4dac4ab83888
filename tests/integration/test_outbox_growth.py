"""RELIABILITY #22, outbox growth and cleanup on PostgreSQL: a million published rows.

Published rows are kept for ``relay.retention_seconds`` and then purged by ``OutboxPurger`` in
batches of ``PURGE_BATCH``, each its own short transaction. The relay's own queries read only the partial
index of unpublished rows, so neither the million published rows nor their purge should slow them: the
test reports their latency before, during and after the purge (a report, not an assertion: the machine
is shared) and asserts what keeps it flat: the relay's own reads use that index and never scan the table
(PostgreSQL's scan counters), the table stays bounded, autovacuum progresses.
"""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta

from sqlalchemy import text

from broadcast.adapters.sql.stores import append_outbox
from broadcast.core import constants
from broadcast.core.domain import EventType, OutboxEvent
from broadcast.outbox.relay import PURGE_BATCH, OutboxPurger
from tests.integration.conftest import Pipeline

PUBLISHED = 1_000_000
RECENT = 2_000  # published within the retention period: kept


def percentile(values: list[float], q: float) -> float:
    return sorted(values)[min(len(values) - 1, int(q * len(values)))]


async def relay_query_ms(pipeline: Pipeline, rounds: int) -> list[float]:
    """Milliseconds of each of ``rounds`` relay rounds' own statements, as ``OutboxRelay.run_once`` makes
    them with the default settings: ``claim`` (lanes and their due rows), then ``finish`` (nothing was
    published, so it only gives the lanes back)."""
    relay = pipeline.settings.relay
    taken = []
    for _ in range(rounds):
        started = time.perf_counter()
        claimed = await pipeline.outbox.claim("probe", relay.lanes_per_claim, timedelta(seconds=30), relay.batch_size)
        assert claimed, "the due rows' lanes are claimed"
        await pipeline.outbox.finish("probe", sorted(claimed), [])
        taken.append((time.perf_counter() - started) * 1000)
    return taken


async def scans(pipeline: Pipeline) -> dict[str, int]:
    """The outbox table's sequential scans and its unpublished-rows index's scans, as PostgreSQL counts them."""
    async with pipeline.engine.connect() as conn:
        seq, unpublished = (
            await conn.execute(
                text(
                    "SELECT t.seq_scan, i.idx_scan FROM pg_stat_user_tables t JOIN pg_stat_user_indexes i"
                    " USING (relid) WHERE t.schemaname = :schema AND t.relname = 'outbox_events'"
                    " AND i.indexrelname = 'ix_outbox_events_unpublished'"
                ),
                {"schema": pipeline.settings.database.schema_name},
            )
        ).one()
    return {"seq": int(seq), "unpublished": int(unpublished)}


async def scans_flushed(pipeline: Pipeline, before: dict[str, int], timeout_s: float = 30.0) -> dict[str, int]:
    """``scans`` once the relay's sessions have flushed their counts (a backend reports them when idle,
    at most once a second): the reading after the index count moved and then stayed put for 2 s."""
    deadline, last = time.monotonic() + timeout_s, before
    while time.monotonic() < deadline:
        await asyncio.sleep(2)
        now = await scans(pipeline)
        if now == last and now != before:
            return now
        last = now
    return last


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

    scans_before = await scans(pipeline)
    before = await relay_query_ms(pipeline, 50)
    scans_after = await scans_flushed(pipeline, scans_before)
    assert scans_after["seq"] == scans_before["seq"], "no relay query read the whole table"
    assert scans_after["unpublished"] - scans_before["unpublished"] >= 50, (scans_before, scans_after)

    purger = OutboxPurger(pipeline.outbox, pipeline.settings.relay)
    stop = asyncio.Event()
    purge = asyncio.create_task(purger.run_once(stop))
    during: list[float] = []
    while not purge.done():
        during += await relay_query_ms(pipeline, 5)
    purged = await purge
    after = await relay_query_ms(pipeline, 50)

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
