"""After a bulk broadcast, PostgreSQL plans the hot lookups with statistics that know the bulk (issue 20).

A 1M-recipient CSV broadcast multiplies ``user_broadcast_messages`` in one transaction. A pooled connection
keeps the plan it made for a prepared statement (asyncpg's statement cache) until the statistics of its
tables change, which autovacuum does a minute or more after the bulk. Made while the table held only the
online users' rows, the consumer's row lookup and the reconciler's pending rows stayed sequential scans of
the fresh rows (auto_explain in bench urgent-under-bulk: 0.3-0.6 s each, beside every URGENT message's
statements). The store now refreshes the statistics once such a broadcast is committed
(``sql_broadcasts.ANALYZE_FROM``), which also makes every connection plan again.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from broadcast.adapters.sql import migrate as sql_migrate
from broadcast.adapters.sql.broadcasts import SqlBroadcastStore
from broadcast.adapters.sql.inbox import _PG_LOOKUP_DRIVER
from broadcast.adapters.sql.stores import SqlUserStore
from broadcast.core.domain import NewBroadcast, TargetType
from broadcast.core.settings import KafkaSettings, LimitsSettings
from broadcast.lifecycle.service import Lifecycle
from tests.databases import empty_database, plan_buffers

ONLINE = [f"online-{i:02d}" for i in range(20)]
QUIET_BROADCASTS = 50
BULK = 200_000


async def test_the_row_lookup_after_a_bulk_broadcast_probes_the_index_not_the_bulk(
    request: pytest.FixtureRequest, unique_name: str, tmp_path: Path
) -> None:
    async with empty_database("postgresql", request, unique_name, tmp_path) as (engine, settings):
        await sql_migrate.upgrade(engine, settings)
        lifecycle = Lifecycle(SqlBroadcastStore(engine), SqlUserStore(engine), KafkaSettings(), LimitsSettings())
        quiet = [
            await lifecycle.create(NewBroadcast(f"quiet {n}", TargetType.SELECTED), sender_id="ann", recipients=ONLINE)
            for n in range(QUIET_BROADCASTS)
        ]
        async with engine.begin() as conn:  # autovacuum's look at the quiet table: only the online users' rows
            await conn.execute(text("ANALYZE user_broadcast_messages"))
        async with engine.connect() as probe:  # a consumer's pooled connection: its plan made on the quiet table
            await probe.exec_driver_sql("SET plan_cache_mode = force_generic_plan")
            await probe.exec_driver_sql("PREPARE lookup(varchar[], varchar[]) AS " + _PG_LOOKUP_DRIVER.sql)
            await probe.exec_driver_sql(_execute("", [(quiet[0][0].id, ONLINE[0])]))
            await probe.commit()
            bulk = [f"bulk-{i:06d}" for i in range(BULK)]
            big, _ = await lifecycle.create(
                NewBroadcast("the bulk", TargetType.SELECTED), sender_id="ann", recipients=bulk
            )
            pairs = [(big.id, user) for user in bulk[:: BULK // 500]]  # a consumer's batch while the bulk drains
            raw = (await probe.exec_driver_sql(_execute("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON)", pairs))).scalar_one()
    plan: dict[str, Any] = (json.loads(raw) if isinstance(raw, str) else raw)[0]["Plan"]
    scans = {(node["Node Type"], node.get("Relation Name")) for node in _nodes(plan)}
    assert plan["Actual Rows"] == len(pairs)
    assert ("Seq Scan", "user_broadcast_messages") not in scans, f"the lookup scanned the bulk's rows: {scans}"
    assert plan_buffers(plan) < 10 * len(pairs), f"{plan_buffers(plan)} buffers for {len(pairs)} rows"


def _execute(explain: str, pairs: list[tuple[str, str]]) -> str:
    arrays = ["ARRAY[" + ",".join(f"'{v}'" for v in column) + "]::varchar[]" for column in zip(*pairs, strict=True)]
    return f"{explain} EXECUTE lookup({', '.join(arrays)})"


def _nodes(plan: dict[str, Any]) -> list[dict[str, Any]]:
    return [plan, *(node for child in plan.get("Plans", []) for node in _nodes(child))]
