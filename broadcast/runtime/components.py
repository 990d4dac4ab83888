"""The composition root: the only place resources are created, each inside one ``AsyncExitStack``.

``open_components`` picks the in-memory or the real adapter for every port from the settings, enters
them in order (database, event log, Redis) and closes them in reverse on the way out.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field

from broadcast.adapters.kafka.health import KafkaHealth
from broadcast.adapters.kafka.log import KafkaEventLog
from broadcast.adapters.memory.bus import MemoryBus, MemoryPresence
from broadcast.adapters.memory.log import MemoryEventLog
from broadcast.adapters.memory.sessions import MemorySlots, MemoryTickets
from broadcast.adapters.redis.bus import RedisBus, RedisHealth, RedisPresence, create_client
from broadcast.adapters.redis.sessions import RedisSlots, RedisTickets
from broadcast.adapters.sql import migrate as sql_migrate
from broadcast.adapters.sql.broadcasts import SqlBroadcastStore
from broadcast.adapters.sql.dlt import SqlDeadLetterStore, SqlDrillStore
from broadcast.adapters.sql.engine import SqlHealth, create_engine, pool_connections
from broadcast.adapters.sql.inbox import SqlInboxStore
from broadcast.adapters.sql.stores import SqlOutboxStore, SqlUserStore
from broadcast.admin.context import AdminContext
from broadcast.core import constants
from broadcast.core.dead_letters import DeadLetterStore, DrillStore
from broadcast.core.ports.bus import Bus, ConnectionSlots, Health, Presence, TicketStore
from broadcast.core.ports.log import EventLog
from broadcast.core.ports.stores import BroadcastStore, InboxStore, OutboxStore, UserStore
from broadcast.core.reach import Reach
from broadcast.core.settings import Settings
from broadcast.http.observe import Observed
from broadcast.lifecycle.service import Lifecycle
from broadcast.lifecycle.user_cache import CachedUsers
from broadcast.observability.loops import Wakeups
from broadcast.observability.metrics import Metrics
from broadcast.runtime.shutdown import ShutdownClock
from dlt.context import DeadLetterContext
from dlt.service import DeadLetterService
from sse.admission import Admission, ConnectGate
from sse.context import SseContext
from sse.fanout import DeliveredMarker
from sse.hub import Hub
from sse.seen import SeenClock

log = logging.getLogger(__name__)


@dataclass
class Components:
    """Everything the roles of one process share; built once, passed down explicitly."""

    settings: Settings
    event_log: EventLog
    users: UserStore
    outbox: OutboxStore
    bus: Bus
    presence: Presence
    broadcasts: BroadcastStore
    lifecycle: Lifecycle
    outbox_wakeup: Wakeups
    inbox: InboxStore
    hub: Hub
    marker: DeliveredMarker
    reconcile_now: asyncio.Event
    dead_letter_store: DeadLetterStore
    dead_letters: DeadLetterService
    drills: DrillStore
    tickets: TicketStore
    admission: Admission
    metrics: Metrics
    shutdown: ShutdownClock
    connect_gate: ConnectGate
    health: dict[str, Health] = field(default_factory=dict)
    # set while this instance's bus subscription is confirmed: a push to it now reaches the hub
    bus_subscribed: asyncio.Event = field(default_factory=asyncio.Event)


def feature_views(components: Components) -> tuple[SseContext, DeadLetterContext, AdminContext, Observed]:
    """The views the routes take of ``Components`` (mypy checks here that it satisfies them)."""
    return components, components, components, components


@asynccontextmanager
async def open_components(settings: Settings) -> AsyncIterator[Components]:
    async with AsyncExitStack() as stack:
        engine = create_engine(settings.database, f"broadcast-server {settings.server.instance_id}")
        stack.push_async_callback(engine.dispose)
        await sql_migrate.ensure_schema(engine, settings.database)
        health: dict[str, Health] = {"database": SqlHealth(engine)}

        event_log: EventLog
        if settings.kafka.embedded:
            event_log = MemoryEventLog(settings.kafka.partitions)
        else:
            kafka = await stack.enter_async_context(KafkaEventLog(settings.kafka))
            health["kafka"] = KafkaHealth(
                kafka,
                wedge_s=settings.observability.producer_wedge_seconds,
                topics=tuple(settings.kafka.topic(name) for name in constants.BASE_TOPICS),
                min_insync=settings.kafka.min_insync_replicas,
            )
            event_log = kafka

        bus: Bus
        presence: Presence
        tickets: TicketStore
        slots: ConnectionSlots
        ttl = settings.redis.presence_ttl_seconds
        if settings.redis.embedded:
            bus, presence = MemoryBus(), MemoryPresence(ttl)
            tickets, slots = MemoryTickets(), MemorySlots(ttl)
        else:
            client = create_client(settings.redis)
            stack.push_async_callback(client.aclose)
            bus = RedisBus(client, settings.redis.key_prefix)
            presence = RedisPresence(client, settings.redis.key_prefix, ttl)
            tickets = RedisTickets(client, settings.redis.key_prefix)
            slots = RedisSlots(client, settings.redis.key_prefix, ttl)
            health["redis"] = RedisHealth(client)

        users = CachedUsers(SqlUserStore(engine))
        broadcasts = SqlBroadcastStore(engine)
        wakeup = Wakeups()
        inbox = SqlInboxStore(engine)
        lifecycle = Lifecycle(broadcasts, users, settings.kafka, settings.limits, on_outbox=wakeup.set)
        seen_clock = SeenClock()
        reach = Reach(settings.server.instance_id)
        marker = DeliveredMarker(inbox, settings.sse.delivered_flush_seconds, seen_clock, reach)
        sse = settings.sse
        metrics = Metrics(settings.server.instance_id)
        hub = Hub(
            sse.queue_size,
            sse.max_connections_per_user,
            sse.send_timeout_seconds,
            marker.add,
            metrics.stream,
            seen_clock,
        )
        metrics.watch_streams(hub.counts)
        metrics.watch_pool(lambda: pool_connections(engine))
        dead_letter_store = SqlDeadLetterStore(engine)
        dead_letters = DeadLetterService(
            dead_letter_store, event_log.publisher(), settings.kafka, wakeup.set, metrics=metrics
        )
        yield Components(
            settings=settings,
            event_log=event_log,
            users=users,
            outbox=SqlOutboxStore(engine),
            bus=bus,
            presence=presence,
            broadcasts=broadcasts,
            lifecycle=lifecycle,
            outbox_wakeup=wakeup,
            inbox=inbox,
            hub=hub,
            marker=marker,
            reconcile_now=asyncio.Event(),
            dead_letter_store=dead_letter_store,
            dead_letters=dead_letters,
            drills=SqlDrillStore(engine),
            tickets=tickets,
            admission=Admission(settings.limits, slots, settings.server.instance_id, sse.max_connections_per_user),
            metrics=metrics,
            shutdown=ShutdownClock(settings.server.shutdown_grace_seconds),
            connect_gate=ConnectGate(sse.connect_concurrency, sse.connect_queue, sse.connect_wait_seconds),
            health=health,
        )
