"""Bulk SELECTED: a broadcast to N recipients from a CSV file, until all rows are committed and every event
is acknowledged by Kafka (3 brokers, acks=all).

Both variants parse the same CSV bytes, then write through the lifecycle service in one transaction and
publish the outbox with the relay (``bench/bulk_selected.py``):

- ``ours``: ``csv_upload.parse_recipients`` (validated, deduplicated), ``COPY`` for the recipients' and
  the outbox rows.
- ``baseline``: ``csv.reader`` and per-row ``INSERT``s (``executemany``), the way a first version would.

Timed: parse, commit (rows durable), publish (every event acknowledged), total = accepted → all durable.
The upload's HTTP transfer is not included (the same for both).
"""

from __future__ import annotations

import asyncio
import csv
import io
import time
from typing import Any

from bench.bulk_selected import PerRowStore, limit_run, one_run
from bench.suite import Context, Measure, Outcome, Series, median
from broadcast.adapters.sql.broadcasts import SqlBroadcastStore
from broadcast.core.settings import LimitsSettings
from broadcast.lifecycle.csv_upload import parse_recipients

SIZES = [100_000, 1_000_000]
SMOKE_SIZES = [2_000]


def csv_bytes(n: int) -> bytes:
    return ("userId\n" + "".join(f"user-{i:07d}\n" for i in range(n))).encode()


def parse_ours(data: bytes) -> list[str]:
    limits = LimitsSettings()
    return list(
        parse_recipients(io.BytesIO(data), max_rows=limits.max_csv_rows, max_id_chars=limits.max_user_id_chars).ids
    )


def parse_naive(data: bytes) -> list[str]:
    rows = csv.reader(io.StringIO(data.decode()))
    next(rows)
    return [row[0] for row in rows if row]


def parse_raw(data: bytes) -> list[str]:
    return data.decode().split("\n")[1:-1]


async def _run(ctx: Context, variant: str, data: bytes) -> dict[str, float]:
    started = time.perf_counter()
    recipients = {"ours": parse_ours, "baseline": parse_naive, "limit": parse_raw}[variant](data)
    parsed = time.perf_counter() - started
    if variant == "limit":
        timings = await limit_run(ctx.stack(), recipients)
        return {"parse_s": parsed, **timings, "total_s": parsed + timings["total_s"]}
    store = SqlBroadcastStore if variant == "ours" else PerRowStore
    timings = await one_run(len(recipients), store, ctx.stack(), variant.replace("-", ""), recipients)
    return {"parse_s": parsed, **timings, "total_s": parsed + timings["total_s"]}


def bulk(ctx: Context) -> Outcome:
    by_n: dict[int, dict[str, list[dict[str, float]]]] = {}
    repeat = 1 if ctx.smoke else ctx.repeat
    for n in SMOKE_SIZES if ctx.smoke else SIZES:
        data = csv_bytes(n)
        for _ in range(repeat if n < 1_000_000 else 1):  # 1M: one run each (minutes)
            for variant in ("ours", "baseline", "limit"):
                result = asyncio.run(_run(ctx, variant, data))
                print(n, variant, {k: round(v, 2) for k, v in result.items()}, flush=True)
                by_n.setdefault(n, {}).setdefault(variant, []).append(result)
    measures = []
    for n, per in by_n.items():

        def m(key: str, per: dict[str, list[dict[str, float]]] = per) -> dict[str, Any]:
            ours, baseline, limit = (median([r[key] for r in per[v]]) for v in ("ours", "baseline", "limit"))
            return {"ours": ours, "baseline": baseline, "limit": limit}

        must, goal = (5.0, 3.0) if n == 100_000 else (None, None)  # issue 20's (DESIGN §7's must: 10 s)
        measures.append(Measure(f"accepted -> all durable, N={n:,}", "s", **m("total_s"), must=must, goal=goal))
        measures.append(Measure(f"parse CSV, N={n:,}", "s", **m("parse_s")))
        measures.append(Measure(f"rows committed, N={n:,}", "s", **m("commit_s")))
        measures.append(Measure(f"events acknowledged, N={n:,}", "s", **m("publish_s")))
    sizes = sorted(by_n)
    series = [
        Series(variant, [float(n) for n in sizes], [median([r["total_s"] for r in by_n[n][variant]]) for n in sizes])
        for variant in ("ours", "baseline", "limit")
    ]
    details: dict[str, Any] = {str(n): per for n, per in by_n.items()}
    return Outcome(
        "bulk",
        "SELECTED broadcast to N recipients from CSV",
        measures,
        series,
        "recipients",
        "accepted -> all rows and events durable (s)",
        [
            "one transaction for the broadcast, its N rows and N outbox rows; then the relay until the outbox is "
            "empty (pipelined idempotent producer, acks=all); 1M recipients: one run per variant",
            "limit: the raw libraries doing that work (bench/bulk_selected.py limit_run): str.split of the CSV, "
            "one asyncpg transaction with two COPYs (an orjson envelope per user), then AIOKafkaProducer "
            "send_batch per partition (idempotent, acks=all) until acknowledged; no validation, lanes or marks",
            "PostgreSQL and Kafka on the same 2 cores as the benchmark process",
        ],
        details,
    )
