"""The background roles of a process: outbox relay, scheduler, delivery consumers, the SSE feeding loops.

All loops share one stop event; on shutdown they get what is left of the shutdown budget
(``broadcast/runtime/shutdown.py``) to finish, then are cancelled, so a wedged dependency (e.g. Kafka
unreachable) can never hang the process. A loop that crashes is logged at once and turns readiness red
(``loops``); listeners that stop advancing turn ``consumers`` red. The gauge sampler runs in every
process, whatever its roles.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Protocol

from broadcast.core import constants
from broadcast.core.ports.log import EventPublisher, EventRecord
from broadcast.core.settings import RetrySettings, Settings
from broadcast.errors import ValidationError
from broadcast.lifecycle.scheduler import Scheduler
from broadcast.observability.loops import Supervisor
from broadcast.outbox.relay import DelayedPublisher, OutboxPurger, OutboxRelay
from broadcast.runtime.components import Components
from broadcast.runtime.observe import ConsumersHealth, LoopsHealth, Sampler
from broadcast.runtime.preflight import check_topics
from consumers.container import ListenerContainer
from consumers.delivery import DeliveryHandlers
from consumers.errors import BackOff, BatchListenerFailedError, DefaultErrorHandler, Recoverer, log_and_skip
from consumers.listener import AckMode, BatchHandler, Listener
from dlt.consumer import DeadLetterHandler
from dlt.drill import DrillSwitch
from dlt.recoverer import DeadLetterPublishingRecoverer
from sse.fanout import BusGaps, BusListener, Heartbeat, PresenceKeeper, Reconciler

log = logging.getLogger(__name__)
ROLES = ("api", "relay", "consumers", "dlt", "scheduler")


class Loop(Protocol):
    async def run(self, stop: asyncio.Event) -> None: ...


@asynccontextmanager
async def running(components: Components, roles: frozenset[str]) -> AsyncIterator[None]:
    """Start the background loops of ``roles`` for the duration of the block (once their topics passed
    ``preflight.check_topics``)."""
    settings = components.settings
    await check_topics(settings, roles)
    stop = asyncio.Event()
    tasks: list[asyncio.Task[None]] = []
    containers: list[ListenerContainer] = []

    supervisor = Supervisor(stop)

    def start(name: str, loop: Loop) -> None:
        task = asyncio.create_task(supervisor.run(name, loop.run), name=name)  # restarted when it ends early
        task.add_done_callback(_report_crash)
        tasks.append(task)

    if "relay" in roles:
        if settings.testing.relay_exit_after_acks is not None:
            log.warning(
                "failpoint on: the relay ends this process after %d acknowledged records, before marking them "
                "(BROADCAST_TESTING__RELAY_EXIT_AFTER_ACKS; for the fault suite only)",
                settings.testing.relay_exit_after_acks,
            )
        publisher: EventPublisher = components.event_log.publisher()
        if delay_ms := settings.testing.relay_publish_delay_ms:
            log.warning("failpoint on: the relay waits 0..%d ms before each publish (for the fault suite)", delay_ms)
            publisher = DelayedPublisher(publisher, delay_ms)
        # two loops, one per lane class: a priority row never waits for a bulk round (ARCHITECTURE.md)
        relays = {
            "normal": ("outbox-relay", settings.server.instance_id, constants.NORMAL_LANES),
            "priority": ("outbox-relay-priority", f"{settings.server.instance_id}:priority", constants.PRIORITY_LANES),
        }
        for lane_class in _lane_classes(settings):
            name, owner, lanes = relays[lane_class]
            relay = OutboxRelay(
                components.outbox,
                publisher,
                settings.relay,
                owner=owner,
                wakeup=components.outbox_wakeup.event(),
                metrics=components.metrics,
                exit_after_acks=settings.testing.relay_exit_after_acks,
                lanes=lanes,
            )
            start(name, relay)
        start("outbox-purger", OutboxPurger(components.outbox, settings.relay))
    if "scheduler" in roles:
        start(
            "scheduler", Scheduler(components.lifecycle, components.broadcasts, settings.relay.scheduler_tick_seconds)
        )
    if "api" in roles:
        for loop in _stream_loops(components):
            start(type(loop).__name__, loop)
    if "consumers" in roles:
        containers += _delivery_containers(components)
    if "dlt" in roles:
        containers.append(_dlt_container(components))
    for container in containers:
        start(container.listener.name, container)
    start("sampler", _sampler(components))
    observability = settings.observability
    components.health["loops"] = LoopsHealth(tasks, supervisor.down)
    if containers:
        components.health["consumers"] = ConsumersHealth(containers, observability.consumer_stall_seconds)
    log.info("running roles: %s", ",".join(sorted(roles)))
    try:
        yield
    finally:
        for name in ("loops", "consumers"):
            components.health.pop(name, None)
        stop.set()
        budget = components.shutdown.loops_budget_s()
        _, late = await asyncio.wait(tasks, timeout=budget) if tasks else (set(), set())
        for task in late:
            log.warning("background loop %s did not stop within %.1f s; cancelling it", task.get_name(), budget)
            task.cancel()
        await asyncio.gather(*late, return_exceptions=True)


def _report_crash(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.error("background loop %s crashed", task.get_name(), exc_info=exc)


def _sampler(c: Components) -> Sampler:
    kafka = c.settings.kafka
    groups = {
        kafka.consumer_group: [kafka.topic(constants.SELECTED_TOPIC), kafka.topic(constants.GROUP_TOPIC)],
        kafka.priority_consumer_group: [kafka.topic(constants.SELECTED_PRIORITY_TOPIC)],
        kafka.dlt_consumer_group: [kafka.topic(constants.dlt_topic(t)) for t in constants.BASE_TOPICS],
    }
    interval = c.settings.observability.sample_seconds
    return Sampler(c.metrics, c.outbox, c.inbox, c.dead_letter_store, c.event_log, groups, c.health, interval)


def _stream_loops(c: Components) -> list[Loop]:
    """What keeps this instance's SSE streams fed (see ``sse/fanout.py``)."""
    settings, me = c.settings, c.settings.server.instance_id
    gaps = BusGaps()
    reconciler = Reconciler(
        c.inbox,
        c.hub,
        settings.sse.reconcile_seconds,
        c.reconcile_now,
        gaps,
        c.bus_subscribed,
        replay_limit=settings.sse.replay_limit,
    )
    keeper = PresenceKeeper(c.presence, c.admission, c.hub, me, settings.redis.presence_ttl_seconds / 3)
    listener = BusListener(
        c.bus, c.hub, me, c.reconcile_now, gaps, c.bus_subscribed, catch_up=reconciler.run_once, rejoin=keeper.beat
    )
    return [
        listener,
        reconciler,
        keeper,
        Heartbeat(c.hub, settings.sse.heartbeat_seconds),
        c.marker,
    ]


def error_handler(
    retry: RetrySettings, recoverer: Recoverer, not_retryable: tuple[type[Exception], ...] = (ValidationError,)
) -> DefaultErrorHandler:
    backoff = BackOff(retry.max_attempts, retry.initial_backoff_seconds, retry.multiplier, retry.max_backoff_seconds)
    return DefaultErrorHandler(recoverer, backoff, not_retryable)


def _delivery_containers(c: Components) -> list[ListenerContainer]:
    """The delivery listeners of this process's lane classes, in consumer groups shared across instances (the
    delivery group; the priority topic's own): work is split across instances; what fails for good goes to
    ``<topic>-dlt`` (``DeadLetterPublishingRecoverer``, naming the listener's group)."""
    settings, kafka = c.settings, c.settings.kafka
    drill = DrillSwitch(c.drills) if settings.testing.fault_drill_enabled else None
    level = logging.INFO if settings.observability.delivery_log else logging.DEBUG
    handlers = DeliveryHandlers(c.inbox, c.presence, c.bus, drill, level)
    on_selected: BatchHandler = handlers.on_selected_batch
    on_group: BatchHandler = handlers.on_group_batch
    if delay_ms := settings.testing.delivery_record_delay_ms:
        log.warning("failpoint on: the delivery listeners take %d ms per record (for the fault suite)", delay_ms)
        on_selected, on_group = slowed(on_selected, delay_ms), slowed(on_group, delay_ms)

    def container(
        name: str, topic: str, handler: BatchHandler, retry: RetrySettings, group: str = kafka.consumer_group
    ) -> ListenerContainer:
        listener = Listener(name, (kafka.topic(topic),), group, batch_handler=handler, ack_mode=AckMode.BATCH)
        recoverer = DeadLetterPublishingRecoverer(c.event_log.publisher(), group, metrics=c.metrics)
        return ListenerContainer(
            c.event_log,
            listener,
            error_handler(retry, recoverer),
            metrics=c.metrics,
            rebalance_log_level=_rebalance_log_level(c),
        )

    by_class = {
        "normal": [container("delivery-selected", constants.SELECTED_TOPIC, on_selected, settings.consumers.selected)],
        "priority": [
            # the group topic carries one record per broadcast, never a bulk: it goes with the priority class
            container("delivery-group", constants.GROUP_TOPIC, on_group, settings.consumers.group),
            # the priority class's own fetch positions and consumer group: its records never queue behind a
            # bulk backlog, and a bulk consumer's rebalance never stops it
            container(
                "delivery-selected-priority",
                constants.SELECTED_PRIORITY_TOPIC,
                on_selected,
                settings.consumers.selected,
                kafka.priority_consumer_group,
            ),
        ],
    }
    return [container for lane_class in _lane_classes(settings) for container in by_class[lane_class]]


def _lane_classes(settings: Settings) -> tuple[str, ...]:
    """The priority classes this process works (``server.lane_classes``)."""
    chosen = settings.server.lane_classes
    return ("normal", "priority") if chosen == "both" else (chosen,)


SLOWED_SLICE = 50  # records per slice of a slowed batch handler


def slowed(handler: BatchHandler, per_record_ms: int) -> BatchHandler:
    """The failpoint ``testing.delivery_record_delay_ms``: ``handler`` given a batch's records in slices of
    ``SLOWED_SLICE``, each after waiting ``per_record_ms`` per record; a failure names its index in the whole
    batch, as the container expects."""

    async def handle(records: Sequence[EventRecord]) -> None:
        for start in range(0, len(records), SLOWED_SLICE):
            part = records[start : start + SLOWED_SLICE]
            await asyncio.sleep(len(part) * per_record_ms / 1000)
            try:
                await handler(part)
            except BatchListenerFailedError as exc:
                raise BatchListenerFailedError(start + exc.index) from exc.__cause__
            except Exception as exc:
                raise BatchListenerFailedError(start) from exc

    return handle


def _dlt_container(c: Components) -> ListenerContainer:
    """The DLT listener: every dead-letter topic into the DLT store, in a consumer group of its own."""
    kafka, consumers = c.settings.kafka, c.settings.consumers
    topics = tuple(kafka.topic(constants.dlt_topic(t)) for t in constants.BASE_TOPICS)
    handler = DeadLetterHandler(c.dead_letter_store, c.metrics)
    listener = Listener("dead-letters", topics, kafka.dlt_consumer_group, handler.on_record)
    # nothing is "not retryable" here: the DLT store is the last stop, a letter is never dropped
    handling = error_handler(consumers.dlt, log_and_skip, not_retryable=())
    return ListenerContainer(
        c.event_log, listener, handling, metrics=c.metrics, rebalance_log_level=_rebalance_log_level(c)
    )


def _rebalance_log_level(c: Components) -> int:
    """INFO on Kafka, where rebalances tell an operator something; DEBUG on the embedded log, where the one
    member takes every partition at start (three long lines that say nothing)."""
    return logging.DEBUG if c.settings.kafka.embedded else logging.INFO
