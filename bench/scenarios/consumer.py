"""Consumer throughput: selected-topic records/s per process, ours beside a naive consumer (DESIGN §7).

Input, produced once per run of the scenario with the real write path in a fresh isolated environment
(``stack_env``: schema, topics, consumer group, Redis prefix of its own): one SELECTED broadcast to N
recipients (100,000; smoke 2,000) through ``Lifecycle.create`` (COPY of the rows and the outbox), then
``OutboxRelay.run_once`` until the outbox backlog is 0, so the selected topic holds exactly N records
(one per recipient, 10 partitions, 3 brokers, acks=all). Every 10th recipient is "connected": a presence
entry in Redis (ours' key layout, one fake instance id, 1 h TTL), so 10 % of the records lead to a Redis
``PUBLISH`` and 90 % stay PENDING.

- ``ours``: ``broadcast-server run --roles consumers`` (the delivery listeners exactly as the app runs
  them: ``ListenerContainer`` + ``DeliveryHandlers.on_selected`` — envelope decode, the inbox row upsert
  and lookup, presence lookup, bus publish, one offset commit per fetched batch), in a fresh consumer group
  per run.
- ``baseline``: ``python -m bench.baseline.consumer`` (``bench/baseline/consumer.py``): ``async for`` over
  an ``AIOKafkaConsumer``, ``json.loads``, one asyncpg ``SELECT`` of the row, one Redis presence lookup
  (same keys), a ``PUBLISH`` if present, ``await consumer.commit()`` per record; its own fresh group.

Both read the same N records; each run starts one process, the two alternate (never at the same time)
for ``ctx.repeat`` rounds. From here the group's lag (committed offsets vs end offsets, ``KafkaLag``:
admin ``OffsetFetch`` + ``ListOffsets``) is polled every 0.25 s (0.1 s in smoke). The window runs from the
first poll showing progress (lag below N: group joined and the first records handled and committed) to the
first poll showing lag 0, or to the first poll after 90 s (10 s in smoke), so a slow consumer is not
waited out (such a run is marked ``capped``); records/s = the records committed in the window / its
length, so group join and process start are excluded and the end is late by at most one poll interval.
CPU µs/record = the process's utime+stime over the same window / those records; peak RSS = ``VmHWM`` at
the window's end. Medians over the runs are reported.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from aiokafka.admin import AIOKafkaAdminClient
from pydantic import SecretStr
from sqlalchemy import text

from bench.servers import cpu_s, ours, stack_env
from bench.servers import stop_process as stop
from bench.suite import ROOT, Context, Measure, Outcome, Series, median
from broadcast.adapters.kafka.lag import KafkaLag
from broadcast.adapters.kafka.log import KafkaEventLog
from broadcast.adapters.redis.bus import RedisPresence, create_client
from broadcast.adapters.sql.broadcasts import SqlBroadcastStore
from broadcast.adapters.sql.engine import create_engine
from broadcast.adapters.sql.stores import SqlOutboxStore, SqlUserStore
from broadcast.core import constants
from broadcast.core.domain import NewBroadcast, TargetType
from broadcast.core.settings import DatabaseSettings, KafkaSettings, LimitsSettings, RedisSettings, RelaySettings
from broadcast.errors import UnavailableError
from broadcast.lifecycle.service import Lifecycle
from broadcast.outbox.relay import OutboxRelay
from devstack.servers import clean_env

N_FULL = 100_000
N_SMOKE = 2_000
PRESENT_EVERY = 10  # every 10th recipient has a presence entry: 10 % connected
INSTANCE = "bench-consumer-instance"  # the fake instance the present users are "connected" to
PRESENCE_TTL_S = 3_600
START_TIMEOUT_S = 90.0  # process start + group join + first commit
STALL_TIMEOUT_S = 60.0  # no lag change for this long: the run failed
WINDOW_CAP_S = 90.0  # a consumer slower than N / 90 s is measured over its first 90 s of progress
MUST, GOAL = 10_000.0, 50_000.0  # DESIGN §7: consumer records/s per process
CONTENT = (
    "Scheduled maintenance tonight from 22:00 to 23:30 UTC: the reporting dashboard will be read-only and "
    "exports queued meanwhile will run afterwards. Thank you for your patience."
)


@dataclass(frozen=True)
class Env:
    """The isolated environment of one scenario run, as settings objects and as variables."""

    variables: dict[str, str]
    kafka: KafkaSettings
    database: DatabaseSettings
    redis: RedisSettings

    @property
    def topic(self) -> str:
        return self.kafka.topic(constants.SELECTED_TOPIC)


@dataclass(frozen=True)
class Limits:
    """How often the lag is polled and the longest measuring window (a slow consumer is not waited out)."""

    poll_s: float
    window_s: float


@dataclass
class Run:
    """One consumer process draining the topic."""

    variant: str
    group: str
    records: int = 0  # committed within the window
    seconds: float = float("nan")
    cpu_s: float = float("nan")
    peak_rss_mb: float = float("nan")
    capped: bool = False  # the window reached its cap before the lag reached 0
    lag: list[tuple[float, int]] = field(default_factory=list)  # (seconds since the window opened, lag)

    @property
    def per_second(self) -> float:
        return self.records / self.seconds if self.seconds > 0 else float("nan")

    @property
    def cpu_us_per_record(self) -> float:
        return self.cpu_s / self.records * 1e6 if self.records else float("nan")


def _env(variables: dict[str, str]) -> Env:
    return Env(
        variables=variables,
        kafka=KafkaSettings(
            bootstrap_servers=variables["BROADCAST_KAFKA__BOOTSTRAP_SERVERS"],
            topic_prefix=variables["BROADCAST_KAFKA__TOPIC_PREFIX"],
            consumer_group=variables["BROADCAST_KAFKA__CONSUMER_GROUP"],
        ),
        database=DatabaseSettings(
            url=SecretStr(variables["BROADCAST_DATABASE__URL"]),
            schema_name=variables["BROADCAST_DATABASE__SCHEMA_NAME"],
        ),
        redis=RedisSettings(
            url=SecretStr(variables["BROADCAST_REDIS__URL"]), key_prefix=variables["BROADCAST_REDIS__KEY_PREFIX"]
        ),
    )


def recipients(n: int) -> list[str]:
    return [f"user-{i:07d}" for i in range(n)]


def present(users: list[str]) -> list[str]:
    return users[::PRESENT_EVERY]


# -- input: the real write path, once -------------------------------------------------------------------
async def produce(env: Env, users: list[str]) -> float:
    """One SELECTED broadcast to ``users`` committed and its outbox published; the seconds it took."""
    engine = create_engine(env.database)
    try:
        lifecycle = Lifecycle(SqlBroadcastStore(engine), SqlUserStore(engine), env.kafka, LimitsSettings())
        outbox = SqlOutboxStore(engine)
        async with KafkaEventLog(env.kafka) as log:
            relay = OutboxRelay(outbox, log, RelaySettings(lanes_per_claim=32), owner="bench-consumer")
            started = time.perf_counter()
            await lifecycle.create(NewBroadcast(CONTENT, TargetType.SELECTED), sender_id="bench", recipients=users)
            while await outbox.backlog():
                await relay.run_once()
            return time.perf_counter() - started
    finally:
        await engine.dispose()


async def connect(env: Env, users: list[str]) -> None:
    """Presence entries (ours' layout) for ``users`` on one fake instance."""
    client = create_client(env.redis)
    try:
        await RedisPresence(client, env.redis.key_prefix, PRESENCE_TTL_S).heartbeat_many(users, INSTANCE)
    finally:
        await client.aclose()


async def tidy(env: Env) -> None:
    """Drop the schema, the presence keys and the topics of this environment (consumer groups age out)."""
    engine = create_engine(env.database)
    try:
        async with engine.begin() as conn:
            await conn.execute(text(f'DROP SCHEMA IF EXISTS "{env.database.schema_name}" CASCADE'))
    finally:
        await engine.dispose()
    client = create_client(env.redis)
    try:
        keys = [key async for key in client.scan_iter(match=f"{env.redis.key_prefix}*", count=1_000)]
        for start in range(0, len(keys), 1_000):
            await client.delete(*keys[start : start + 1_000])
    finally:
        await client.aclose()
    admin = AIOKafkaAdminClient(bootstrap_servers=env.kafka.bootstrap_servers, request_timeout_ms=60_000)
    await admin.start()
    try:
        mine = [t for t in await admin.list_topics() if t.startswith(env.kafka.topic_prefix)]
        if mine:
            await admin.delete_topics(mine)
    finally:
        await admin.close()


# -- one run ---------------------------------------------------------------------------------------------
def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


async def total_lag(lag: KafkaLag, group: str, topic: str) -> int:
    return sum((await lag.lag(group, [topic])).values())


async def poll(lag: KafkaLag, run: Run, env: Env) -> int | None:
    """The group's total lag, or None when this one sample failed (the next poll reconnects)."""
    try:
        return await total_lag(lag, run.group, env.topic)
    except UnavailableError:
        return None


async def drain(run: Run, env: Env, pid: int, alive: Callable[[], bool], n: int, limits: Limits) -> None:
    """Poll the group's lag until it is 0 (or the window cap); fill ``run`` with the window's figures.

    The window opens at the first poll showing progress (lag below ``n``) and closes at the first poll
    showing lag 0, or at the first poll after ``limits.window_s``; its records are those committed within.
    """
    lag = KafkaLag(env.kafka)
    started = time.monotonic()
    first: tuple[float, int, float] | None = None  # (time, lag, cpu s) at the first poll showing progress
    changed, previous = started, n
    try:
        while True:
            if not alive():
                raise RuntimeError(f"the {run.variant} consumer exited before the lag reached 0")
            remaining = await poll(lag, run, env)
            now, cpu = time.monotonic(), cpu_s(pid)
            if remaining is not None:
                if first is None and remaining < n:
                    first = (now, remaining, cpu)
                if first is not None:
                    run.lag.append((round(now - first[0], 3), remaining))
                    if remaining == 0 or now - first[0] >= limits.window_s:
                        run.capped = remaining > 0
                        run.records, run.seconds, run.cpu_s = first[1] - remaining, now - first[0], cpu - first[2]
                        run.peak_rss_mb = peak_rss_mb(pid)
                        return
                if remaining != previous:
                    changed, previous = now, remaining
            if first is None and now - started > START_TIMEOUT_S:
                raise RuntimeError(f"the {run.variant} consumer made no progress within {START_TIMEOUT_S:.0f} s")
            if now - changed > STALL_TIMEOUT_S:
                raise RuntimeError(f"the {run.variant} consumer's lag stuck at {previous} for {STALL_TIMEOUT_S:.0f} s")
            await asyncio.sleep(limits.poll_s)
    finally:
        await lag.close()


async def run_ours(ctx: Context, env: Env, index: int, n: int, limits: Limits) -> Run:
    run = Run("ours", f"{env.kafka.consumer_group}-ours-{index}-{uuid.uuid4().hex[:6]}")
    variables = {**env.variables, "BROADCAST_KAFKA__CONSUMER_GROUP": run.group}
    server = await asyncio.to_thread(ours, variables, ctx, f"consumer-ours-{index}", "consumers")
    try:
        await drain(run, env, server.proc.pid, lambda: server.proc.poll() is None, n, limits)
    finally:
        await asyncio.to_thread(server.stop)
    return run


def start_baseline(
    ctx: Context, env: Env, group: str, index: int, module: str = "bench.baseline.consumer"
) -> subprocess.Popen[bytes]:
    url = env.database.url.get_secret_value().replace("postgresql+asyncpg://", "postgresql://", 1)
    assert env.redis.url is not None
    args = [
        *("--bootstrap", env.kafka.bootstrap_servers, "--topic", env.topic, "--group", group),
        *("--dsn", url, "--schema", str(env.database.schema_name)),
        *("--redis-url", env.redis.url.get_secret_value(), "--redis-prefix", env.redis.key_prefix),
    ]
    with (ctx.scratch / f"consumer-{module.rsplit('.', 1)[-1]}-{index}.log").open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", module, *args],
            cwd=ROOT,
            env=clean_env(PYTHONPATH=str(ROOT)),
            stdout=out,
            stderr=subprocess.STDOUT,
        )


async def run_baseline(ctx: Context, env: Env, index: int, n: int, limits: Limits, variant: str = "baseline") -> Run:
    """The naive baseline, or (``variant="limit"``) the raw libraries doing ours' work."""
    run = Run(variant, f"{env.kafka.consumer_group}-{variant}-{index}-{uuid.uuid4().hex[:6]}")
    module = "bench.baseline.limit_consumer" if variant == "limit" else "bench.baseline.consumer"
    proc = start_baseline(ctx, env, run.group, index, module)
    try:
        await drain(run, env, proc.pid, lambda: proc.poll() is None, n, limits)
    finally:
        await asyncio.to_thread(stop, proc)
    return run


async def check_input(env: Env, n: int) -> None:
    """The topic holds exactly the N records (a fresh group's lag counts from the log start)."""
    lag = KafkaLag(env.kafka)
    try:
        found = await total_lag(lag, f"{env.kafka.consumer_group}-probe", env.topic)
    finally:
        await lag.close()
    if found != n:
        raise RuntimeError(f"the selected topic holds {found} records, expected {n}")


# -- the scenario ----------------------------------------------------------------------------------------
def consumer(ctx: Context) -> Outcome:
    n = N_SMOKE if ctx.smoke else N_FULL
    limits = Limits(poll_s=0.1, window_s=10.0) if ctx.smoke else Limits(poll_s=0.25, window_s=WINDOW_CAP_S)
    env = _env(stack_env(ctx, "consumer"))
    users = recipients(n)
    runs: dict[str, list[Run]] = {"ours": [], "baseline": [], "limit": []}
    try:
        produce_s = asyncio.run(produce(env, users))
        asyncio.run(connect(env, present(users)))
        asyncio.run(check_input(env, n))
        for index in range(ctx.repeat):  # alternating, one process at a time
            runs["ours"].append(asyncio.run(run_ours(ctx, env, index, n, limits)))
            runs["baseline"].append(asyncio.run(run_baseline(ctx, env, index, n, limits)))
            runs["limit"].append(asyncio.run(run_baseline(ctx, env, index, n, limits, "limit")))
    finally:
        try:
            asyncio.run(tidy(env))
        except Exception as exc:  # leftovers are harmless; never hide the run's own error
            print(f"consumer: tidying {env.database.schema_name} failed: {exc!r}", flush=True)
    return outcome(runs, n, limits, produce_s)


def outcome(runs: dict[str, list[Run]], n: int, limits: Limits, produce_s: float) -> Outcome:
    def med(variant: str, metric: Callable[[Run], float]) -> float:
        return median([metric(r) for r in runs[variant]])

    def three(metric: Callable[[Run], float]) -> tuple[float, float, float]:
        return med("ours", metric), med("baseline", metric), med("limit", metric)

    rate, cpu = three(lambda r: r.per_second), three(lambda r: r.cpu_us_per_record)
    rss = three(lambda r: r.peak_rss_mb)
    measures = [
        Measure("records/s per process", "records/s", *rate[:2], "higher", MUST, GOAL, "10 % present", rate[2]),
        Measure("CPU per record", "µs", *cpu[:2], "lower", note="utime+stime over the window", limit=cpu[2]),
        Measure("peak RSS", "MB", *rss[:2], "lower", note="VmHWM of the consumer process", limit=rss[2]),
    ]
    capped = ", ".join(f"{v} {sum(r.capped for r in rs)}/{len(rs)}" for v, rs in runs.items())
    series = [
        Series(f"{variant} (run 1)", [t for t, _ in runs[variant][0].lag], [float(v) for _, v in runs[variant][0].lag])
        for variant in ("ours", "baseline", "limit")
        if runs[variant]
    ]
    notes = [
        f"Input: one SELECTED broadcast to {n:,} recipients through Lifecycle.create + OutboxRelay "
        f"({produce_s:.1f} s), i.e. {n:,} records on the selected topic (10 partitions, 3 brokers), produced once "
        "and read by every run in a fresh consumer group.",
        f"Presence mix: every {PRESENT_EVERY}th recipient ({100 // PRESENT_EVERY} %) has a Redis presence entry "
        "(one instance), so its record is PUBLISHed to the bus; the rest stay PENDING.",
        "ours = `broadcast-server run --roles consumers` (ListenerContainer + DeliveryHandlers.on_selected: "
        "inbox row upsert+lookup, presence, bus publish, one commit per fetched batch), uvloop; baseline = "
        "bench/baseline/consumer.py (async for over AIOKafkaConsumer, json.loads, one asyncpg SELECT, one "
        "Redis ZRANGEBYSCORE, PUBLISH if present, commit() per record), stdlib asyncio loop; limit = "
        "bench/baseline/limit_consumer.py (the same work with the raw libraries on uvloop: getmany(500), per "
        "partition orjson.loads, one asyncpg unnest lookup of the rows, one Redis pipeline of presence lookups "
        "and one of PUBLISHes, one commit() per getmany; no validation, error handling, metrics or logs).",
        f"records/s: the group's committed-offset lag (KafkaLag: OffsetFetch vs ListOffsets) polled every "
        f"{limits.poll_s} s from the suite process; window = first poll showing progress → first poll at lag 0 "
        f"(or the first poll after {limits.window_s:.0f} s; runs capped so: {capped}); records/s = records "
        "committed in the window / its length (process start and group join excluded; the end is late by ≤ "
        f"{limits.poll_s} s). "
        "CPU µs/record = utime+stime over the same window / those records; peak RSS = VmHWM at the window's end.",
        "Both consumer processes log at level warning (the benchmark default of stack_env): ours' per-record "
        "INFO delivery line is not written.",
        f"Medians of {len(runs['ours'])} run(s) per variant, ours, baseline and limit in turn, one process at a "
        "time, on the shared machine (the stack runs on the same 2 cores).",
    ]
    details = {
        "n": n,
        "present_every": PRESENT_EVERY,
        "poll_s": limits.poll_s,
        "window_cap_s": limits.window_s,
        "produce_s": produce_s,
        "runs": {
            variant: [{**asdict(r), "per_second": r.per_second, "cpu_us_per_record": r.cpu_us_per_record} for r in rs]
            for variant, rs in runs.items()
        },
    }
    return Outcome(
        scenario="consumer",
        title=f"selected-topic consumer throughput, {n:,} records, 10 % present",
        measures=measures,
        series=series,
        x_label="seconds since the window opened (first progress)",
        y_label="consumer group lag (records)",
        notes=notes,
        details=details,
    )
