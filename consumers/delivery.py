"""Delivery consumers: turn Kafka records into pushes to the instances holding the users' streams.

SELECTED (keyed by user): the user's row is upserted (idempotent), presence says which instances hold
the user's connections, and the pre-encoded frame goes to each of them over the bus; with none, the row
stays PENDING and is sent on connect. Group (keyed by broadcast): one bus message every instance's hub
fans out to its matching connections. The bus is at-most-once; reconciliation covers what it drops.
"""

from __future__ import annotations

import logging
from datetime import datetime

import orjson

from broadcast import constants, envelope, logs
from broadcast.domain import EventType, TargetType
from broadcast.envelope import MessageDeliveryEvent
from broadcast.errors import ValidationError
from broadcast.ports import Bus, EventRecord, InboxStore, Presence
from dlt.drill import DrillSwitch
from sse.frames import EventName, frame, micros
from sse.messages import from_event

log = logging.getLogger(__name__)


LATE_PUBLISH_S = 60.0


def _due_at(created: datetime, record_ms: int) -> float:
    """When a broadcast became due, for the end-to-end latency: its creation, unless its record was produced
    much later (a scheduled broadcast, a redriven dead letter), then the record's time."""
    created_s, produced_s = created.timestamp(), record_ms / 1000
    return produced_s if produced_s - created_s > LATE_PUBLISH_S else created_s


class DeliveryHandlers:
    """The record handlers of the two delivery listeners."""

    def __init__(
        self,
        inbox: InboxStore,
        presence: Presence,
        bus: Bus,
        drill: DrillSwitch | None = None,
        log_level: int = logging.INFO,
    ) -> None:
        self._inbox = inbox
        self._presence = presence
        self._bus = bus
        self._drill = drill  # only when the fault drill is enabled: it fails armed broadcasts on purpose
        self._log_level = log_level  # of the one line per handled record

    async def on_selected(self, record: EventRecord) -> None:
        event = envelope.decode(record.value)
        user_id = event.user_id
        if user_id is None:
            raise ValidationError("selected-topic event without userId")
        with logs.bound(correlation=event.correlation_id, broadcast=event.broadcast_id, user=user_id):
            instances = await self._selected(record, event, user_id)
            self._log(record, event, instances)

    def _log(self, record: EventRecord, event: MessageDeliveryEvent, instances: int | None) -> None:
        if log.isEnabledFor(self._log_level):
            if instances is None:
                outcome = "nothing to push"
            elif instances == 0 and event.user_id is not None and event.event_type is EventType.CREATED:
                outcome = "user not connected, stays PENDING"
            else:
                outcome = f"pushed to {instances} instance(s)"
            log.log(
                self._log_level,
                "delivery %s %s: %s (%s-%d@%d)",
                event.event_type.value,
                event.broadcast_id,
                outcome,
                record.topic,
                record.partition,
                record.offset,
            )

    async def _selected(self, record: EventRecord, event: MessageDeliveryEvent, user_id: str) -> int | None:
        """Handle one selected-topic event; the number of instances it was pushed to (None: nothing to do)."""
        if event.event_type is EventType.CREATED:
            snapshot = event.broadcast
            if snapshot is None:
                raise ValidationError("CREATED event without its broadcast")
            if self._drill is not None:
                await self._drill.check(record, event.broadcast_id, snapshot.created_at)
            delivers: list[str] | None = None
            event_id = None
            if not snapshot.fire_and_forget:
                row_id = await self._inbox.row_for(event.broadcast_id, user_id)
                delivers, event_id = [event.broadcast_id, user_id], f"s{row_id}"
            data = frame(EventName.MESSAGE, from_event(event), event_id)
            return await self._to_user(
                user_id, data, delivers, event.broadcast_id, _due_at(snapshot.created_at, record.timestamp_ms)
            )
        if event.event_type is EventType.READ:
            data = frame(EventName.READ_RECEIPT, {"broadcastId": event.broadcast_id})
            return await self._to_user(user_id, data, None, None)
        return None

    async def _to_user(
        self, user_id: str, data: bytes, delivers: list[str] | None, broadcast_id: str | None, at: float = 0.0
    ) -> int:
        payload = orjson.dumps(
            {
                "kind": "user",
                "user": user_id,
                "frame": data.decode(),
                "delivers": delivers,
                "broadcast": broadcast_id,
                "at": at,
            }
        )
        instances = await self._presence.instances(user_id)
        for instance in instances:
            await self._bus.publish(constants.instance_channel(instance), payload)
        return len(instances)

    async def on_group(self, record: EventRecord) -> None:
        event = envelope.decode(record.value)
        with logs.bound(correlation=event.correlation_id, broadcast=event.broadcast_id):
            pushed = await self._group(record, event)
            self._log(record, event, pushed)

    async def _group(self, record: EventRecord, event: MessageDeliveryEvent) -> int | None:
        snapshot = event.broadcast
        if event.event_type is EventType.CREATED:
            if snapshot is None or snapshot.target_type is TargetType.SELECTED:
                raise ValidationError("group CREATED event without an ALL/ROLE broadcast")
            if self._drill is not None:
                await self._drill.check(record, event.broadcast_id, snapshot.created_at)
            data = frame(EventName.MESSAGE, from_event(event), f"g{micros(snapshot.created_at)}")
            payload = {
                "kind": "group",
                "targetType": snapshot.target_type.value,
                "roles": list(snapshot.target_roles),
                "frame": data.decode(),
                "broadcast": event.broadcast_id,
                "counts": not snapshot.fire_and_forget,  # written to a stream = a delivery, for the stats
                "at": _due_at(snapshot.created_at, record.timestamp_ms),
            }
        elif event.event_type in (EventType.CANCELLED, EventType.EXPIRED):
            reason = event.event_type.value
            data = frame(EventName.MESSAGE_REMOVED, {"broadcastId": event.broadcast_id, "reason": reason})
            payload = {"kind": "all", "frame": data.decode()}
        else:
            return None
        return await self._bus.publish(constants.REDIS_GROUP_CHANNEL, orjson.dumps(payload))
