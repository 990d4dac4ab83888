"""The background roles of a process (relay, scheduler; consumers and DLT come with their issues).

All loops run in one task group and stop together when the shutdown event is set.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from broadcast.components import Components
from broadcast.relay import OutboxRelay
from broadcast.scheduler import Scheduler

log = logging.getLogger(__name__)
ROLES = ("api", "relay", "consumers", "dlt", "scheduler")


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
        log.info("running roles: %s", ",".join(sorted(roles)))
        try:
            yield
        finally:
            stop.set()
