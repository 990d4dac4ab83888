"""The background roles of a process (relay, scheduler; consumers and DLT come with their issues).

All loops run in one task group and stop together when the shutdown event is set.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Protocol

from broadcast import constants
from broadcast.components import Components
from broadcast.relay import OutboxRelay
from broadcast.scheduler import Scheduler
from consumers.container import ListenerContainer
from consumers.delivery import DeliveryHandlers
from consumers.listener import Listener
from sse.fanout import BusListener, PresenceKeeper, Reconciler

log = logging.getLogger(__name__)
ROLES = ("api", "relay", "consumers", "dlt", "scheduler")


class Loop(Protocol):
    async def run(self, stop: asyncio.Event) -> None: ...


@asynccontextmanager
async def running(components: Components, roles: frozenset[str]) -> AsyncIterator[None]:
    """Start the background loops of ``roles`` for the duration of the block."""
    settings = components.settings
    stop = asyncio.Event()
    async with asyncio.TaskGroup() as group:
        if "relay" in roles:
            relay = OutboxRelay(
                components.outbox,
                components.event_log.publisher(),
                settings.relay,
                owner=settings.server.instance_id,
                wakeup=components.outbox_wakeup,
            )
            group.create_task(relay.run(stop), name="outbox-relay")
        if "scheduler" in roles:
            scheduler = Scheduler(components.lifecycle, components.broadcasts, settings.relay.scheduler_tick_seconds)
            group.create_task(scheduler.run(stop), name="scheduler")
        if "api" in roles:
            for loop in _stream_loops(components):
                group.create_task(loop.run(stop), name=type(loop).__name__)
        if "consumers" in roles:
            for container in _delivery_containers(components):
                group.create_task(container.run(stop), name=container.listener.name)
        log.info("running roles: %s", ",".join(sorted(roles)))
        try:
            yield
        finally:
            stop.set()


def _stream_loops(c: Components) -> list[Loop]:
    """What keeps this instance's SSE streams fed (see ``sse/fanout.py``)."""
    settings, me = c.settings, c.settings.server.instance_id
    return [
        BusListener(c.bus, c.hub, me, c.reconcile_now),
        Reconciler(c.inbox, c.hub, settings.sse.reconcile_seconds, c.reconcile_now),
        PresenceKeeper(c.presence, c.hub, me, settings.redis.presence_ttl_seconds / 3),
        c.marker,
    ]


def _delivery_containers(c: Components) -> list[ListenerContainer]:
    """The two delivery listeners, one shared consumer group: work is split across instances."""
    handlers = DeliveryHandlers(c.inbox, c.presence, c.bus)
    kafka = c.settings.kafka
    return [
        ListenerContainer(
            c.event_log,
            Listener(
                "delivery-selected",
                (kafka.topic(constants.SELECTED_TOPIC),),
                kafka.consumer_group,
                handlers.on_selected,
            ),
        ),
        ListenerContainer(
            c.event_log,
            Listener("delivery-group", (kafka.topic(constants.GROUP_TOPIC),), kafka.consumer_group, handlers.on_group),
        ),
    ]
