"""The relay's claim on PostgreSQL while a bulk upload's transaction is still writing (issue 20).

A 1M-recipient CSV upload COPYs its outbox rows into the normal lanes in one transaction that lasts tens of
seconds. Until it commits its rows are invisible, yet their entries are in ``ix_outbox_events_unpublished``
and every scan that crosses them visits each one. The priority relay's claim must probe only the priority
lanes' ranges: when its "lane has a due row" test was planned as one scan of the whole index (a young
table's statistics), each URGENT claim walked the bulk's rows (0.9 s a claim under a 1M upload) and URGENT
messages waited seconds. Counted here in buffers, which do not depend on the machine's speed.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from broadcast.adapters.sql import migrate as sql_migrate
from broadcast.adapters.sql.outbox_pg import CLAIM
from broadcast.adapters.sql.stores import SqlOutboxStore
from broadcast.core import constants
from tests.databases import empty_database, plan_buffers

BULK_ROWS = 200_000
ROW = (
    "INSERT INTO outbox_events (lane, topic, partition_key, event_type, payload, headers)"
    " SELECT {lane}, 't', 'k' || g, 'CREATED', '\\x00'::bytea, '[]'::json FROM generate_series(1, {n}) g"
)


async def _claim(probe: AsyncConnection) -> dict[str, Any]:
    """The relay's CLAIM of the priority lanes, run on ``probe`` (its statement prepared as ``claim``): the
    executed plan with its buffer counts."""
    now = datetime.now(UTC)
    lanes = "{" + ",".join(map(str, constants.PRIORITY_LANES)) + "}"
    explained = await probe.exec_driver_sql(
        "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) EXECUTE claim("
        f"'{now.isoformat()}', 'relay', '{lanes}', 8, '{(now + timedelta(seconds=30)).isoformat()}', 100)"
    )
    raw = explained.scalar_one()
    await probe.commit()
    plan: dict[str, Any] = (json.loads(raw) if isinstance(raw, str) else raw)[0]["Plan"]
    return plan


@pytest.mark.parametrize("plan_mode", ["force_generic_plan", "force_custom_plan"])
async def test_a_priority_claim_reads_only_its_own_lanes_while_a_bulk_is_being_written(
    request: pytest.FixtureRequest, unique_name: str, tmp_path: Path, plan_mode: str
) -> None:
    urgent_lane, normal = constants.PRIORITY_LANES[0], len(constants.NORMAL_LANES)
    async with empty_database("postgresql", request, unique_name, tmp_path) as (engine, settings):
        await sql_migrate.upgrade(engine, settings)
        async with engine.begin() as conn:  # a quiet start: rows published as they came, and autovacuum's look
            await conn.execute(text(ROW.format(lane=f"g % {normal}", n=2_000)))
            await conn.execute(text("UPDATE outbox_events SET published_at = now()"))
            await conn.execute(text(ROW.format(lane=urgent_lane, n=1)))
            await conn.execute(text("ANALYZE outbox_events"))
        async with engine.connect() as probe, engine.connect() as bulk:
            await probe.exec_driver_sql(f"SET plan_cache_mode = {plan_mode}")
            await probe.exec_driver_sql(
                "PREPARE claim(timestamptz, text, smallint[], int, timestamptz, int) AS " + CLAIM.sql
            )
            await _claim(probe)  # as a relay's pooled connection does from the start: a generic plan is kept
            await bulk.begin()  # the upload's transaction: written, not committed
            await bulk.execute(text(ROW.format(lane=f"g % {normal}", n=BULK_ROWS)))
            plan = await _claim(probe)
            await bulk.rollback()
        claimed = await SqlOutboxStore(engine).claim("relay", 8, timedelta(seconds=30), 100, constants.PRIORITY_LANES)
    assert plan_buffers(plan) < 300, (
        f"the claim read {plan_buffers(plan)} buffers: it crossed the bulk's {BULK_ROWS} rows"
    )
    assert plan["Actual Rows"] == 1, "the urgent row was claimed"
    assert list(claimed) == [urgent_lane] and len(claimed[urgent_lane]) == 1, "claimed again: the bulk never committed"
