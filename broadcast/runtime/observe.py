"""Readiness checks of the running roles, and the sampler of the shared-state gauges.

``readiness`` asks every ``Health`` of the process (database, Kafka producer, Redis, and while roles
run: ``loops`` — every background task alive — and ``consumers`` — every listener in its group and
moving) at once, each bounded by a timeout; ``/health/ready`` and the ``broadcast_ready`` gauge both come
from it. ``Sampler`` sets the gauges of shared state (outbox, pending deliveries, dead letters, consumer
lag, readiness) every ``sample_seconds``: a scrape reads numbers, it never queries the database or Kafka.
A count whose query grows slow (a million-row backlog takes the database a second) is sampled less often,
so it never spends more than ``SAMPLE_DUTY`` of the time, however large the tables grow; readiness and lag,
whose slowness is waiting on a dependency rather than work, are sampled every round.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime

from broadcast.core.dead_letters import DeadLetterStore
from broadcast.core.ports.bus import Health
from broadcast.core.ports.log import EventLog
from broadcast.core.ports.stores import InboxStore, OutboxStore
from broadcast.errors import BroadcastError, UnavailableError
from broadcast.observability.loops import pause
from broadcast.observability.metrics import Metrics
from consumers.container import ListenerContainer

log = logging.getLogger(__name__)
CHECK_TIMEOUT_S = 3.0
# A count (``COUNTS``) is sampled again once ``SAMPLE_DUTY`` of the time since its last successful start went
# to it, and never more often than ``sample_seconds``: under a 1M-row bulk the outbox backlog, oldest-row and
# pending counts took 0.5-1.2 s each every 10 s (auto_explain, bench urgent-under-bulk), a sixth of a core of
# the database. A failed count is tried again next round (it measured an outage, not the count's cost).
SAMPLE_DUTY = 0.05
COUNTS = frozenset({"outbox", "pending", "dead_letters"})
OK = "ok"


async def readiness(health: Mapping[str, Health], metrics: Metrics | None = None) -> dict[str, str]:
    """Every check's verdict: ``"ok"`` or why not."""
    names = sorted(health)
    verdicts = await asyncio.gather(*(_verdict(health[n].check()) for n in names))
    checks = dict(zip(names, verdicts, strict=True))
    if metrics is not None:
        for name, verdict in checks.items():
            metrics.ready.labels(name).set(1 if verdict == OK else 0)
    return checks


async def _verdict(check: Awaitable[None]) -> str:
    try:
        await asyncio.wait_for(check, CHECK_TIMEOUT_S)
    except UnavailableError as exc:
        return str(exc)
    except TimeoutError:
        return f"no answer within {CHECK_TIMEOUT_S} s"
    return OK


class LoopsHealth:
    """Red when a background loop of this process has ended (crashed or killed) while the roles run, or is
    waiting to be restarted after it ended early."""

    def __init__(self, tasks: Sequence[asyncio.Task[None]], restarting: Mapping[str, str] | None = None) -> None:
        self._tasks = tasks
        self._restarting = restarting if restarting is not None else {}

    async def check(self) -> None:
        dead = [_ended(t) for t in self._tasks if t.done()]
        dead += [f"{name} ({why}; restarting)" for name, why in self._restarting.items()]
        if dead:
            raise UnavailableError("background loops stopped: " + "; ".join(dead))


def _ended(task: asyncio.Task[None]) -> str:
    if task.cancelled():
        return f"{task.get_name()} (cancelled)"
    exc = task.exception()
    return f"{task.get_name()} ({type(exc).__name__}: {exc})" if exc else f"{task.get_name()} (returned)"


class ConsumersHealth:
    """Red when a listener container is not running, not in its group, or not advancing (see
    ``ListenerContainer.stalled``)."""

    def __init__(self, containers: Sequence[ListenerContainer], stall_s: float) -> None:
        self._containers = containers
        self._stall_s = stall_s

    async def check(self) -> None:
        problems = [f"{c.listener.name}: {p}" for c in self._containers if (p := c.stalled(self._stall_s))]
        if problems:
            raise UnavailableError("consumers not making progress: " + "; ".join(problems))


class Sampler:
    """Refreshes the shared-state gauges; a source that fails keeps its last value and counts an error."""

    def __init__(
        self,
        metrics: Metrics,
        outbox: OutboxStore,
        inbox: InboxStore,
        dead_letters: DeadLetterStore,
        event_log: EventLog,
        groups: Mapping[str, Sequence[str]],
        health: Mapping[str, Health],
        interval_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._metrics = metrics
        self._outbox = outbox
        self._inbox = inbox
        self._dead_letters = dead_letters
        self._event_log = event_log
        self._groups = groups  # consumer group -> its topics
        self._health = health
        self._interval_s = interval_s
        self._clock = clock
        self._due: dict[str, float] = {}  # count -> when it may be sampled again (SAMPLE_DUTY)

    async def sample_once(self) -> None:
        lags = (functools.partial(self._sample_lag, group, topics) for group, topics in self._groups.items())
        await asyncio.gather(
            self._guarded("outbox", self._sample_outbox),
            self._guarded("pending", self._sample_pending),
            self._guarded("dead_letters", self._sample_dead_letters),
            *(self._guarded("consumer_lag", lag) for lag in lags),
            self._guarded("readiness", lambda: readiness(self._health, self._metrics)),
        )

    async def _guarded(self, source: str, sample: Callable[[], Awaitable[object]]) -> None:
        started = self._clock()
        if started < self._due.get(source, started):
            return
        try:
            async with asyncio.timeout(max(self._interval_s, CHECK_TIMEOUT_S * 2)):
                await sample()
        except (BroadcastError, TimeoutError) as exc:
            self._metrics.sample_errors.labels(source).inc()
            log.debug("sampling %s failed: %s", source, exc)
        except Exception:  # anything else must not end the sampler (and freeze every gauge)
            self._metrics.sample_errors.labels(source).inc()
            log.warning("sampling %s failed unexpectedly", source, exc_info=True)
        else:
            if source in COUNTS:
                self._due[source] = started + (self._clock() - started) / SAMPLE_DUTY

    async def _sample_outbox(self) -> None:
        self._metrics.outbox_backlog.set(await self._outbox.backlog())
        self._metrics.outbox_dead.set(await self._outbox.dead_count())
        oldest = await self._outbox.oldest_unpublished()
        age = 0.0 if oldest is None else max((datetime.now(UTC) - oldest).total_seconds(), 0.0)
        self._metrics.outbox_oldest_age.set(age)

    async def _sample_pending(self) -> None:
        self._metrics.pending.set(await self._inbox.pending_count())

    async def _sample_dead_letters(self) -> None:
        for status, count in (await self._dead_letters.count_by_status()).items():
            self._metrics.dlt_letters.labels(status).set(count)

    async def _sample_lag(self, group: str, topics: Sequence[str]) -> None:
        for tp, lag in sorted((await self._event_log.lag(group, topics)).items()):
            self._metrics.consumer_lag.labels(group, tp.topic, str(tp.partition)).set(lag)

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self.sample_once()
            await pause(stop, self._interval_s)
