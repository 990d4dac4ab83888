"""Prometheus metrics of one process: one ``CollectorRegistry`` per app, served at ``GET /metrics``.

Three kinds of figures, each read the cheapest way:

- **Counters and histograms of events** (broadcasts created, records produced and consumed, dead letters,
  redrives, API latency): prometheus-client ``Counter``/``Histogram``, incremented where it happens.
- **The SSE write path** (deliveries by path, end-to-end latency, slow-client drops, open connections):
  plain integers bumped by the hub, read at scrape time by a collector. A fan-out to thousands of
  connections then costs no lock per write (a prometheus-client ``inc`` takes one).
- **Shared state** (outbox backlog and age, pending deliveries, dead letters by status, consumer lag,
  readiness): gauges set by ``broadcast/sampler.py`` every few seconds, not queried per scrape.

Label values are bounded sets (topics, target types, paths, routes, checks): never user or broadcast ids.
"""

from __future__ import annotations

import asyncio
import time
from bisect import bisect_left
from collections.abc import Callable, Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
HTTP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
DELIVERY_PATHS = ("live", "reconnect", "reconciliation")
DROP_REASONS = ("backlog_full", "send_timeout", "write_failed")
# no `_created` series beside every counter: Prometheus does not need them. Bound to a typed name rather than
# called under a `type: ignore`, which would turn "unused" (and mypy red) the day prometheus-client types it.
_disable_created: Callable[[], None] = disable_created_metrics
_disable_created()


class FastHistogram:
    """A histogram for one event loop's hot path: no lock, one ``bisect`` per observation."""

    __slots__ = ("_bounds", "_counts", "_sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self._bounds = tuple(bounds)
        self._counts = [0] * (len(self._bounds) + 1)
        self._sum = 0.0

    def observe(self, value: float) -> None:
        self._counts[bisect_left(self._bounds, value)] += 1
        self._sum += value

    @property
    def count(self) -> int:
        return sum(self._counts)

    def family(self, name: str, documentation: str) -> HistogramMetricFamily:
        cumulative, running = [], 0
        for bound, count in zip((*self._bounds, float("inf")), self._counts, strict=True):
            running += count
            cumulative.append(("+Inf" if bound == float("inf") else repr(bound), running))
        return HistogramMetricFamily(name, documentation, buckets=cumulative, sum_value=self._sum)


class StreamStats:
    """What the SSE hub reports: deliveries by path, live latency, drops by reason. Plain integers."""

    def __init__(self) -> None:
        self.deliveries = dict.fromkeys(DELIVERY_PATHS, 0)
        self.drops = dict.fromkeys(DROP_REASONS, 0)
        self.latency = FastHistogram(LATENCY_BUCKETS)

    def delivered(self, path: str, created: float = 0.0) -> None:
        """One MESSAGE written to a stream on ``path``; a live one with its broadcast's creation time (epoch
        seconds) is timed."""
        self.deliveries[path] = self.deliveries.get(path, 0) + 1
        if created > 0 and path == "live":
            self.latency.observe(max(time.time() - created, 0.0))

    def dropped(self, reason: str) -> None:
        self.drops[reason] = self.drops.get(reason, 0) + 1


def _no_streams() -> tuple[int, int]:
    return 0, 0


def _tasks() -> dict[str, int]:
    """Tasks of the running loop (a scrape runs on it) by origin: the Kafka client's own (one reader per
    broker connection, fetches in flight: they come and go) and the rest; empty outside a loop."""
    try:
        tasks = asyncio.all_tasks()
    except RuntimeError:
        return {}
    counts = {"app": 0, "kafka_client": 0}
    for task in tasks:
        code = getattr(task.get_coro(), "cr_code", None)
        counts["kafka_client" if "aiokafka" in getattr(code, "co_filename", "") else "app"] += 1
    return counts


class _StreamCollector(Collector):
    def __init__(self, stats: StreamStats, instance: str) -> None:
        self._stats = stats
        self.connections: Callable[[], tuple[int, int]] = _no_streams
        self.pool: Callable[[], tuple[int, int]] | None = None  # (checked out, idle) database connections
        self._instance = instance

    def collect(self) -> Iterator[Metric]:
        stats = self._stats
        deliveries = CounterMetricFamily(
            "broadcast_deliveries",
            "Tracked MESSAGE events written to an SSE stream, by path (fire-and-forget ones are not tracked)",
            labels=["path"],
        )
        for path, count in sorted(stats.deliveries.items()):
            deliveries.add_metric([path], count)
        yield deliveries
        drops = CounterMetricFamily(
            "broadcast_sse_slow_client_drops",
            "SSE streams dropped because the client could not keep up",
            labels=["reason"],
        )
        for reason, count in sorted(stats.drops.items()):
            drops.add_metric([reason], count)
        yield drops
        yield stats.latency.family(
            "broadcast_delivery_latency_seconds", "Broadcast created to written to an SSE stream (live path)"
        )
        streams, users = self.connections()
        for name, doc, value in (
            ("broadcast_sse_connections", "SSE streams open on this instance", streams),
            ("broadcast_sse_users", "Distinct users with a stream open on this instance", users),
        ):
            gauge = GaugeMetricFamily(name, doc, labels=["server"])  # Prometheus owns `instance`
            gauge.add_metric([self._instance], value)
            yield gauge
        if self.pool is not None:
            pool = GaugeMetricFamily(
                "broadcast_db_pool_connections",
                "This process's database connections by state: checked_out (in use, or leaked) and idle",
                labels=["server", "state"],
            )
            checked_out, idle = self.pool()
            pool.add_metric([self._instance, "checked_out"], checked_out)
            pool.add_metric([self._instance, "idle"], idle)
            yield pool
        tasks = GaugeMetricFamily(
            "broadcast_event_loop_tasks",
            "asyncio tasks alive in this process by origin (app, kafka_client); a leak grows app",
            labels=["server", "origin"],
        )
        for origin, count in sorted(_tasks().items()):
            tasks.add_metric([self._instance, origin], count)
        yield tasks


class Metrics:
    """Every metric of one process; pass it down explicitly (components, workers, routes)."""

    def __init__(self, instance: str = "") -> None:
        self.registry = registry = CollectorRegistry(auto_describe=True)
        self.stream = StreamStats()
        self._streams = _StreamCollector(self.stream, instance)
        registry.register(self._streams)
        self.broadcasts_created = Counter(
            "broadcast_broadcasts_created", "Broadcasts created through the API", ["target_type"], registry=registry
        )
        self.events_produced = Counter(
            "broadcast_events_produced", "Records acknowledged by the event log", ["topic"], registry=registry
        )
        self.produce_errors = Counter(
            "broadcast_produce_errors", "Records the event log did not acknowledge", ["topic"], registry=registry
        )
        self.records_consumed = Counter(
            "broadcast_records_consumed", "Records handled by this process's listeners", ["topic"], registry=registry
        )
        self.dlt_records = Counter(
            "broadcast_dlt_records",
            "Dead letters stored by this process's DLT consumer",
            ["topic", "exception"],
            registry=registry,
        )
        self.redrives = Counter(
            "broadcast_redrives", "Dead letters redriven through the admin API", ["outcome"], registry=registry
        )
        self.sample_errors = Counter(
            "broadcast_sample_errors", "Gauge samples that failed", ["source"], registry=registry
        )
        self.http_duration = Histogram(
            "broadcast_http_request_duration_seconds",
            "API request latency",
            ["method", "route", "status"],
            buckets=HTTP_BUCKETS,
            registry=registry,
        )
        self.outbox_backlog = Gauge("broadcast_outbox_backlog", "Unpublished outbox rows", registry=registry)
        self.outbox_buried = Counter(
            "broadcast_outbox_buried", "Outbox rows moved to the dead state by this process", registry=registry
        )
        self.outbox_dead = Gauge(
            "broadcast_outbox_dead",
            "Outbox rows the event log refused for good (too large, corrupt), out of their lanes: list and "
            "redrive them with /api/admin/outbox/dead",
            registry=registry,
        )
        self.outbox_oldest_age = Gauge(
            "broadcast_outbox_oldest_age_seconds", "Age of the oldest unpublished outbox row", registry=registry
        )
        self.pending = Gauge("broadcast_pending_deliveries", "SELECTED deliveries still PENDING", registry=registry)
        self.dlt_letters = Gauge(
            "broadcast_dlt_letters", "Dead letters stored, by status", ["status"], registry=registry
        )
        self.consumer_lag = Gauge(
            "broadcast_consumer_lag",
            "End offset minus committed offset",
            ["group", "topic", "partition"],
            registry=registry,
        )
        self.ready = Gauge("broadcast_ready", "1 when the last readiness check passed", ["check"], registry=registry)

    def watch_streams(self, connections: Callable[[], tuple[int, int]]) -> None:
        """Report the hub's open (streams, users) at every scrape."""
        self._streams.connections = connections

    def watch_pool(self, connections: Callable[[], tuple[int, int]]) -> None:
        """Report the database pool's (checked out, idle) connections at every scrape."""
        self._streams.pool = connections

    def produced(self, topic: str, acknowledged: int, failed: int = 0) -> None:
        if acknowledged:
            self.events_produced.labels(topic).inc(acknowledged)
        if failed:
            self.produce_errors.labels(topic).inc(failed)


NO_METRICS = Metrics()  # the default of code that runs without an app (unit tests, tools): counted, never served
