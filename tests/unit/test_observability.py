"""Observability pieces in isolation: JSON logs and their context, the correlation middleware, the metrics
endpoint's token, the hub's delivery counters, readiness of loops, listeners and the producer."""

from __future__ import annotations

import asyncio
import io
import logging
import time
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from aiokafka.cluster import ClusterMetadata
from aiokafka.structs import PartitionMetadata
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr
from sqlalchemy import text

from broadcast.adapters.kafka.health import ProducerWatch, under_min_insync
from broadcast.adapters.memory.log import MemoryEventLog
from broadcast.adapters.memory.stores import MemoryOutboxStore
from broadcast.adapters.sql.engine import create_engine, pool_connections
from broadcast.core.ports.log import EventRecord, TopicPartition
from broadcast.core.settings import DatabaseSettings, ObservabilitySettings, Settings
from broadcast.errors import UnavailableError
from broadcast.observability import logs
from broadcast.observability.metrics import FastHistogram, Metrics
from broadcast.runtime.app import create_app
from broadcast.runtime.observe import ConsumersHealth, LoopsHealth, Sampler, readiness
from consumers.container import ListenerContainer
from consumers.delivery import _due_at
from consumers.errors import BackOff, DefaultErrorHandler, log_and_skip
from consumers.listener import Listener
from sse.hub import Hub, Outgoing
from tests.unit.test_hub import Socket


def json_lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [orjson.loads(line) for line in stream.getvalue().splitlines()]


def test_a_json_line_carries_the_ids_in_scope_and_the_extras() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.JsonFormatter())
    logger = logging.getLogger("test.json")
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.INFO)
    try:
        with logs.bound(correlation="c-1", broadcast="b-1"), logs.bound(user="alice"):
            logger.warning("hello %s", "world", extra={"attempt": 2})
        logger.info("outside")
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("failed")
    finally:
        logger.removeHandler(handler)
    first, second, third = json_lines(stream)
    assert first["message"] == "hello world" and first["level"] == "WARNING" and first["logger"] == "test.json"
    assert (first["correlation_id"], first["broadcast_id"], first["user_id"], first["attempt"]) == (
        "c-1",
        "b-1",
        "alice",
        2,
    )
    assert "correlation_id" not in second and "user_id" not in second  # unbound after the block
    assert "ValueError: boom" in str(third["exc"])


async def test_tasks_inherit_the_ids_of_the_code_that_started_them() -> None:
    async def read() -> str | None:
        return logs.correlation_id.get()

    with logs.bound(correlation="abc"):
        task = asyncio.create_task(read())
    assert await task == "abc" and logs.correlation_id.get() is None


def test_the_histogram_is_cumulative_and_exposed_by_the_library() -> None:
    histogram = FastHistogram((0.1, 1.0))
    for v in (0.05, 0.1, 0.5, 3.0):
        histogram.observe(v)
    family = histogram.family("x_seconds", "doc")
    buckets = {s.labels["le"]: s.value for s in family.samples if s.name == "x_seconds_bucket"}
    assert buckets == {"0.1": 2, "1.0": 3, "+Inf": 4} and histogram.count == 4


async def test_the_hub_counts_deliveries_by_path_times_live_ones_and_counts_drops() -> None:
    metrics = Metrics("me")
    hub = Hub(queue_size=1, max_per_user=5, stats=metrics.stream)
    metrics.watch_streams(hub.counts)
    alice, bob = hub.open("alice", frozenset()), hub.open("bob", frozenset())
    alice.start(Socket().send, None, b"", [Outgoing(b"old", "b0", counts=True, path="reconnect")])
    hub.to_user("alice", Outgoing(b"new", "b1", counts=True, created=time.time() - 0.3))
    hub.to_user("alice", Outgoing(b"beat"))  # not a MESSAGE: not counted
    hub.to_user("bob", Outgoing(b"1", "b1", counts=True))  # bob's stream has not started: queued (1 slot)
    hub.to_user("bob", Outgoing(b"2", "b2", counts=True))  # the backlog overflows: dropped
    assert bob.dropped
    text = str([(s.name, s.labels, s.value) for f in metrics.registry.collect() for s in f.samples])
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value for f in metrics.registry.collect() for s in f.samples
    }
    assert samples[("broadcast_deliveries_total", (("path", "live"),))] == 1, text
    assert samples[("broadcast_deliveries_total", (("path", "reconnect"),))] == 1, text
    assert samples[("broadcast_delivery_latency_seconds_count", ())] == 1
    assert samples[("broadcast_delivery_latency_seconds_bucket", (("le", "0.25"),))] == 0
    assert samples[("broadcast_delivery_latency_seconds_bucket", (("le", "0.5"),))] == 1
    assert samples[("broadcast_sse_slow_client_drops_total", (("reason", "backlog_full"),))] == 1
    assert samples[("broadcast_sse_connections", (("server", "me"),))] == 2  # bob is closed, not yet released
    hub.close(bob)
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value for f in metrics.registry.collect() for s in f.samples
    }
    assert samples[("broadcast_sse_connections", (("server", "me"),))] == 1
    assert samples[("broadcast_sse_users", (("server", "me"),))] == 1


@pytest.fixture
async def app_client(tmp_path: Path) -> AsyncIterator[tuple[httpx.AsyncClient, Settings]]:
    settings = Settings(
        database=DatabaseSettings(url=SecretStr(f"sqlite+aiosqlite:///{tmp_path}/app.db")),
        observability=ObservabilitySettings(metrics_token=SecretStr("scrape-me"), sample_seconds=0.1),
    )
    app = create_app(settings)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with app.router.lifespan_context(app), httpx.AsyncClient(transport=transport, base_url="http://t") as http:
        yield http, settings


async def test_metrics_need_the_configured_token(app_client: tuple[httpx.AsyncClient, Settings]) -> None:
    http, _ = app_client
    refused = await http.get("/metrics")
    assert refused.status_code == 401 and refused.headers["content-type"] == "application/problem+json"
    assert (await http.get("/metrics", headers={"Authorization": "Bearer wrong"})).status_code == 401
    scraped = await http.get("/metrics", headers={"Authorization": "Bearer scrape-me"})
    assert scraped.status_code == 200
    names = {f.name for f in text_string_to_metric_families(scraped.text)}
    assert {"broadcast_deliveries", "broadcast_consumer_lag", "broadcast_ready"} <= names


async def test_every_answer_carries_a_correlation_id_and_a_valid_given_one_is_kept(
    app_client: tuple[httpx.AsyncClient, Settings],
) -> None:
    http, _ = app_client
    given = await http.get("/health/live", headers={"X-Correlation-ID": "abc-123"})
    assert given.headers["x-correlation-id"] == "abc-123"
    fresh = await http.get("/api/admin/broadcasts")  # refused before any route: still has one
    assert fresh.status_code == 401 and len(fresh.headers["x-correlation-id"]) == 32
    replaced = await http.get("/health/live", headers={"X-Correlation-ID": "x" * 201})
    assert len(replaced.headers["x-correlation-id"]) == 32


async def test_readiness_names_a_killed_consumer_task(app_client: tuple[httpx.AsyncClient, Settings]) -> None:
    http, _ = app_client
    assert (await http.get("/health/ready")).status_code == 200
    [task] = [t for t in asyncio.all_tasks() if t.get_name() == "delivery-selected"]
    task.cancel()
    await asyncio.sleep(0.05)
    down = await http.get("/health/ready")
    body = down.json()
    assert down.status_code == 503 and body["failing"] == ["consumers", "loops"], body
    assert "delivery-selected (cancelled)" in body["checks"]["loops"]
    assert "delivery-selected: not running" in body["checks"]["consumers"]
    await asyncio.sleep(0.3)  # the sampler sets the gauge too
    scraped = await http.get("/metrics", headers={"Authorization": "Bearer scrape-me"})
    ready = {
        s.labels["check"]: s.value
        for f in text_string_to_metric_families(scraped.text)
        for s in f.samples
        if s.name == "broadcast_ready"
    }
    assert ready == {"database": 1, "consumers": 0, "loops": 0}


def listener(handler: object) -> Listener:
    return Listener("stuck", ("t",), "g", handler)  # type: ignore[arg-type]


async def test_a_listener_holding_one_record_too_long_is_not_ready() -> None:
    log = MemoryEventLog(2)
    release = asyncio.Event()

    async def handle(record: EventRecord) -> None:
        await release.wait()

    container = ListenerContainer(log, listener(handle))
    health = ConsumersHealth([container], stall_s=0.2)
    with pytest.raises(UnavailableError, match="not running"):
        await health.check()
    async with container:
        await log.publish("t", b"k", b"v")
        await asyncio.sleep(0.1)
        await health.check()  # in hand, but not for long yet
        await asyncio.sleep(0.3)
        with pytest.raises(UnavailableError, match=r"stuck\[0\] has been handling one record \(or batch\) for"):
            await health.check()
        release.set()
        await asyncio.sleep(0.1)
        await health.check()


async def test_a_listener_whose_record_keeps_failing_is_not_ready_until_it_moves_on() -> None:
    log = MemoryEventLog(1)
    failing = True

    async def handle(record: EventRecord) -> None:
        if failing:
            raise RuntimeError("database down")

    retry_forever = DefaultErrorHandler(log_and_skip, BackOff(10_000, 0.05, 1.0, 0.05))
    container = ListenerContainer(log, listener(handle), retry_forever)
    health = ConsumersHealth([container], stall_s=0.3)
    async with container:
        await log.publish("t", b"k", b"v")
        await asyncio.sleep(0.6)
        with pytest.raises(UnavailableError, match="no progress"):
            await health.check()
        failing = False
        await asyncio.sleep(0.3)
        await health.check()
        assert await log.lag("g", ["t"]) == {TopicPartition("t", 0): 0}


async def test_loops_health_names_the_loop_that_ended_and_how() -> None:
    async def crash() -> None:
        raise RuntimeError("kaput")

    async def forever() -> None:
        await asyncio.Event().wait()

    crashed, alive = asyncio.create_task(crash(), name="relay"), asyncio.create_task(forever(), name="hub")
    await asyncio.sleep(0)
    checks = await readiness({"loops": LoopsHealth([crashed, alive])})
    assert checks == {"loops": "background loops stopped: relay (RuntimeError: kaput)"}
    alive.cancel()


async def test_the_producer_watch_reports_a_failure_streak_only_while_it_lasts() -> None:
    watch = ProducerWatch(recent_s=0.2)
    assert watch.wedged_for() == 0
    watch.failed()
    await asyncio.sleep(0.1)
    watch.failed()
    assert watch.wedged_for() >= 0.1  # the first failure of the streak starts the clock
    watch.acknowledged()
    assert watch.wedged_for() == 0 and watch.last_ack is not None
    watch.failed()
    await asyncio.sleep(0.3)  # no failure since: nothing is being published, the streak is over
    assert watch.wedged_for() == 0


def test_latency_counts_from_creation_unless_the_record_was_produced_much_later() -> None:
    created = datetime(2026, 1, 1, tzinfo=UTC)
    prompt = int(created.timestamp() * 1000) + 300
    scheduled = int(created.timestamp() * 1000) + 3_600_000
    assert _due_at(created, prompt) == created.timestamp()
    assert _due_at(created, scheduled) == scheduled / 1000


async def test_the_sampler_survives_any_failing_source() -> None:
    metrics = Metrics()

    class Broken:
        async def lag(self, group_id: str, topics: Sequence[str]) -> dict[TopicPartition, int]:
            raise AssertionError("a library bug")

    outbox = MemoryOutboxStore()

    class Inbox:
        async def pending_count(self) -> int:
            return 4

    class Letters:
        async def count_by_status(self) -> dict[str, int]:
            raise ValueError("odd row")

    sampler = Sampler(metrics, outbox, Inbox(), Letters(), Broken(), {"g": ["t"]}, {}, 0.05)  # type: ignore[arg-type]
    stop = asyncio.Event()
    task = asyncio.create_task(sampler.run(stop))
    await asyncio.sleep(0.2)
    assert not task.done()
    stop.set()
    await task
    errors = {
        s.labels["source"]: s.value
        for f in metrics.registry.collect()
        for s in f.samples
        if s.name.endswith("sample_errors_total")
    }
    assert errors["consumer_lag"] >= 2 and errors["dead_letters"] >= 2 and "pending" not in errors
    assert metrics.pending._value.get() == 4


async def test_a_slow_count_is_sampled_less_often_and_the_rest_every_round() -> None:
    now = [0.0]
    counted: list[float] = []
    letters_counted: list[float] = []
    checked: list[float] = []
    failing_at = {40.0}

    class SlowInbox:  # counting a million pending rows: one second of the database each time
        async def pending_count(self) -> int:
            counted.append(now[0])
            now[0] += 1.0
            if now[0] - 1.0 in failing_at:  # the database went away mid-count: not the count's cost
                raise UnavailableError("connection lost")
            return 1_000_000

    class Letters:
        async def count_by_status(self) -> dict[str, int]:
            letters_counted.append(now[0])
            return {"NEW": 1}

    class SlowCheck:  # a dependency that answers only at the timeout: waiting, not work
        async def check(self) -> None:
            checked.append(now[0])
            now[0] += 3.0

    metrics = Metrics()
    inbox: Any = SlowInbox()
    letters: Any = Letters()
    log = MemoryEventLog(1)
    health = {"kafka": SlowCheck()}
    sampler = Sampler(metrics, MemoryOutboxStore(), inbox, letters, log, {}, health, 10.0, clock=lambda: now[0])
    ticks = 0
    while ticks < 10:
        now[0] = 10.0 * ticks  # the sampler's own pause between rounds
        await sampler.sample_once()
        ticks += 1
    # a 1 s count every 20 s (5 % of the time); the one that failed at 40 s tried again the next round
    assert counted == [0.0, 20.0, 40.0, 50.0, 70.0, 90.0]
    assert metrics.pending._value.get() == 1_000_000
    assert len(letters_counted) == ticks, "a fast count every round"
    assert len(checked) == ticks, "readiness every round, however long its checks wait"


async def test_memory_lag_counts_from_the_committed_offset() -> None:
    log = MemoryEventLog(2)
    for n in range(5):
        await log.publish("t", None, str(n).encode(), partition=n % 2)
    assert await log.lag("g", ["t"]) == {TopicPartition("t", 0): 3, TopicPartition("t", 1): 2}
    async with log.subscribe(["t"], "g") as sub:
        await sub.commit({TopicPartition("t", 0): 2})
    assert await log.lag("g", ["t"]) == {TopicPartition("t", 0): 1, TopicPartition("t", 1): 2}


def test_partitions_under_min_insync_replicas_are_named() -> None:
    cluster = ClusterMetadata()
    cluster._partitions = {  # what a metadata response leaves there
        "sel": {
            0: PartitionMetadata("sel", 0, 1, [1, 2, 3], [1, 2, 3], None),
            1: PartitionMetadata("sel", 1, 2, [2, 3, 1], [2], None),  # ISR shrunk to one
            2: PartitionMetadata("sel", 2, -1, [3, 1, 2], [], None),  # no leader
        },
        "other": {0: PartitionMetadata("other", 0, 1, [1], [1], None)},
    }
    assert under_min_insync(cluster, ("sel",), 2) == ["sel-1", "sel-2"]
    assert under_min_insync(cluster, ("sel",), 1) == ["sel-2"]
    assert under_min_insync(cluster, ("missing",), 2) == []


async def test_the_database_pool_is_reported_in_use_and_idle(tmp_path: Path) -> None:
    """A connection held (as a leaked checkout would be) shows as checked_out until it is given back."""
    engine = create_engine(DatabaseSettings(url=SecretStr(f"sqlite+aiosqlite:///{tmp_path}/pool.db")))
    metrics = Metrics("me")
    metrics.watch_pool(lambda: pool_connections(engine))

    def pool() -> dict[str, float]:
        return {
            s.labels["state"]: s.value
            for f in metrics.registry.collect()
            for s in f.samples
            if s.name == "broadcast_db_pool_connections"
        }

    try:
        async with engine.connect() as held:
            await held.execute(text("SELECT 1"))
            assert pool() == {"checked_out": 1, "idle": 0}
        assert pool() == {"checked_out": 0, "idle": 1}
    finally:
        await engine.dispose()
