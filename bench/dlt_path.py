"""The dead-letter path on the real stack (3 brokers, acks=all, PostgreSQL): what a failure costs.

In one run, for N records on the selected topic, medians of R repeats:

- ``normal``: N valid CREATED events (one SELECTED broadcast to N offline users) consumed by the
  delivery listener — the baseline every other line is a ratio of.
- ``poison``: N malformed records: each dead-lettered on its first failure (publish to the DLT, acks=all,
  then commit) and stored by the DLT listener — time until all N are in ``dlt_messages``.
- ``drilled``: the same N valid events failing on purpose (fault drill, 1 attempt) until all are stored.
- ``redrive-all``: the admin's redrive of those N letters (outbox rows + rows back to PENDING), then the
  relay and the delivery listener handling them again — time until all N were handled.

Usage: ``python -m bench.dlt_path [N] [--repeat R]`` (default 5000, 3). Prints a table, writes
``bench/results/<date>-dlt-path.json``. Asserts nothing. Consumers run in this process, one member each.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from broadcast.adapters.kafka.admin import ensure_topics
from broadcast.adapters.kafka.log import KafkaEventLog
from broadcast.adapters.memory.bus import MemoryBus, MemoryPresence
from broadcast.adapters.sql import migrate as sql_migrate
from broadcast.adapters.sql.broadcasts import SqlBroadcastStore
from broadcast.adapters.sql.dlt import SqlDeadLetterStore, SqlDrillStore
from broadcast.adapters.sql.engine import create_engine
from broadcast.adapters.sql.inbox import SqlInboxStore
from broadcast.adapters.sql.stores import SqlOutboxStore, SqlUserStore
from broadcast.core import constants
from broadcast.core.dead_letters import DeadLetterFilter
from broadcast.core.domain import NewBroadcast, TargetType
from broadcast.core.ports.log import EventRecord, OutgoingRecord
from broadcast.core.settings import DatabaseSettings, KafkaSettings, LimitsSettings, RelaySettings
from broadcast.lifecycle.service import Lifecycle
from broadcast.outbox.relay import OutboxRelay
from consumers.container import ListenerContainer
from consumers.delivery import DeliveryHandlers
from consumers.errors import BackOff, BatchListenerFailedError, DefaultErrorHandler
from consumers.listener import AckMode, Listener
from devstack import stack
from dlt.consumer import DeadLetterHandler
from dlt.drill import DrillSwitch
from dlt.recoverer import DeadLetterPublishingRecoverer
from dlt.service import DeadLetterService

RESULTS = Path(__file__).parent / "results"


async def wait(condition: Callable[[], Any], timeout_s: float = 600.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await condition():
        if time.monotonic() > deadline:
            raise TimeoutError("bench step did not finish")
        await asyncio.sleep(0.05)


async def one_run(n: int, info: stack.StackInfo) -> dict[str, float]:
    schema = f"bench_dlt_{time.monotonic_ns() % 10**9}"
    database = DatabaseSettings(url=SecretStr(info.postgres_url), schema_name=schema)
    kafka = KafkaSettings(bootstrap_servers=info.kafka_bootstrap, topic_prefix=f"{schema}.", consumer_group=schema)
    selected = kafka.topic(constants.SELECTED_TOPIC)
    engine = create_engine(database)
    timings: dict[str, float] = {}
    try:
        await sql_migrate.upgrade(engine, database)
        await ensure_topics(kafka, [selected, kafka.topic(constants.SELECTED_DLT_TOPIC)])
        async with KafkaEventLog(kafka) as log:
            broadcasts, outbox, inbox = SqlBroadcastStore(engine), SqlOutboxStore(engine), SqlInboxStore(engine)
            letters, drills = SqlDeadLetterStore(engine), SqlDrillStore(engine)
            wakeup = asyncio.Event()
            lifecycle = Lifecycle(broadcasts, SqlUserStore(engine), kafka, LimitsSettings(), on_outbox=wakeup.set)
            relay = OutboxRelay(
                outbox, log.publisher(), RelaySettings(idle_poll_seconds=0.05), owner="bench", wakeup=wakeup
            )
            handlers = DeliveryHandlers(inbox, MemoryPresence(30), MemoryBus(), DrillSwitch(drills))
            handled = 0

            async def counting(records: Sequence[EventRecord]) -> None:
                nonlocal handled
                try:
                    await handlers.on_selected_batch(records)
                except BatchListenerFailedError as exc:
                    handled += exc.index
                    raise
                handled += len(records)

            recoverer = DeadLetterPublishingRecoverer(log.publisher(), kafka.consumer_group)
            delivery = ListenerContainer(
                log,
                Listener("delivery", (selected,), kafka.consumer_group, batch_handler=counting, ack_mode=AckMode.BATCH),
                DefaultErrorHandler(recoverer, BackOff(max_attempts=1)),
            )
            dlt_listener = Listener(
                "dlt",
                (kafka.topic(constants.SELECTED_DLT_TOPIC),),
                kafka.dlt_consumer_group,
                DeadLetterHandler(letters).on_record,
            )
            stop = asyncio.Event()
            loops = [
                asyncio.create_task(relay.run(stop)),
                asyncio.create_task(delivery.run(stop)),
                asyncio.create_task(ListenerContainer(log, dlt_listener).run(stop)),
            ]

            async def stored() -> int:
                return sum(r.count for r in await letters.summary(DeadLetterFilter()))

            try:
                users = [f"u{i:07d}" for i in range(n)]
                started = time.monotonic()
                await lifecycle.create(NewBroadcast("normal", TargetType.SELECTED), sender_id="bench", recipients=users)
                await wait(lambda: _ready(handled >= n))
                timings["normal"] = time.monotonic() - started

                poison = [OutgoingRecord(selected, u.encode(), b"{not json") for u in users]
                started = time.monotonic()
                await log.publisher().publish_many(poison)
                await wait(lambda: _count_at_least(stored, n))
                timings["poison"] = time.monotonic() - started

                arm_at = datetime.now(UTC)
                await drills.arm("bench", None, arm_at.replace(year=arm_at.year + 1))
                handled = 0
                started = time.monotonic()
                drilled = await lifecycle.create(
                    NewBroadcast("drilled", TargetType.SELECTED), sender_id="bench", recipients=users
                )
                await wait(lambda: _count_at_least(stored, 2 * n))
                timings["drilled"] = time.monotonic() - started

                service = DeadLetterService(letters, log.publisher(), kafka, wakeup.set)
                handled = 0
                started = time.monotonic()
                result = await service.redrive_all(DeadLetterFilter(broadcast_id=drilled[0].id), "bench")
                timings["redrive-all API"] = time.monotonic() - started
                assert result.done == n, result
                await wait(lambda: _ready(handled >= n))
                timings["redrive-all"] = time.monotonic() - started
            finally:
                stop.set()
                await asyncio.gather(*loops, return_exceptions=True)
    finally:
        async with engine.begin() as conn:
            await conn.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await engine.dispose()
    return timings


async def _ready(value: bool) -> bool:
    return value


async def _count_at_least(count: Callable[[], Any], n: int) -> bool:
    return bool(await count() >= n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("n", nargs="?", type=int, default=5_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    info = stack.up()
    runs = [asyncio.run(one_run(args.n, info)) for _ in range(args.repeat)]
    medians = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    base = medians["normal"]
    print(f"\nDLT path, N = {args.n} records, {args.repeat} runs, medians (consumers in this process, 3 brokers)")
    print(f"{'step':<18}{'seconds':>10}{'records/s':>12}{'x normal':>10}")
    for step, seconds in medians.items():
        print(f"{step:<18}{seconds:>10.2f}{args.n / seconds:>12,.0f}{seconds / base:>10.2f}")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"{datetime.now(UTC):%Y-%m-%d}-dlt-path.json"
    out.write_text(json.dumps({"n": args.n, "runs": runs, "medians": medians}, indent=2))
    print(f"written {out}")


if __name__ == "__main__":
    main()
