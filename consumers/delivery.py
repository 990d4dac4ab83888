"""Delivery consumers: turn Kafka records into pushes to the instances holding the users' streams.

SELECTED (keyed by user): the user's row is upserted (idempotent), presence says which instances hold
the user's connections, and the pre-encoded frame goes to each of them over the bus; with none, the row
stays PENDING and is sent on connect. Group (keyed by broadcast): one bus message every instance's hub
fans out to its matching connections. The bus is at-most-once; reconciliation covers what it drops.
"""

from __future__ import annotations

import logging

import orjson

from broadcast import constants, envelope
from broadcast.domain import EventType, TargetType
from broadcast.errors import ValidationError
from broadcast.ports import Bus, EventRecord, InboxStore, Presence
from dlt.drill import DrillSwitch
from sse.frames import EventName, frame, micros
from sse.messages import from_event

log = logging.getLogger(__name__)


class DeliveryHandlers:
    """The record handlers of the two delivery listeners."""

    def __init__(self, inbox: InboxStore, presence: Presence, bus: Bus, drill: DrillSwitch | None = None) -> None:
        self._inbox = inbox
        self._presence = presence
        self._bus = bus
        self._drill = drill  # only when the fault drill is enabled: it fails armed broadcasts on purpose

    async def on_selected(self, record: EventRecord) -> None:
        event = envelope.decode(record.value)
        user_id = event.user_id
        if user_id is None:
            raise ValidationError("selected-topic event without userId")
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
            await self._to_user(user_id, data, delivers, event.broadcast_id)
        elif event.event_type is EventType.READ:
            data = frame(EventName.READ_RECEIPT, {"broadcastId": event.broadcast_id})
            await self._to_user(user_id, data, None, None)

    async def _to_user(self, user_id: str, data: bytes, delivers: list[str] | None, broadcast_id: str | None) -> None:
        payload = orjson.dumps(
            {"kind": "user", "user": user_id, "frame": data.decode(), "delivers": delivers, "broadcast": broadcast_id}
        )
        for instance in await self._presence.instances(user_id):
            await self._bus.publish(constants.instance_channel(instance), payload)

    async def on_group(self, record: EventRecord) -> None:
        event = envelope.decode(record.value)
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
            }
        elif event.event_type in (EventType.CANCELLED, EventType.EXPIRED):
            reason = event.event_type.value
            data = frame(EventName.MESSAGE_REMOVED, {"broadcastId": event.broadcast_id, "reason": reason})
            payload = {"kind": "all", "frame": data.decode()}
        else:
            return
        await self._bus.publish(constants.REDIS_GROUP_CHANNEL, orjson.dumps(payload))
