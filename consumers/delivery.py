"""Delivery consumers: turn Kafka records into pushes to the instances holding the users' streams.

Both are batch listeners (``AckMode.BATCH``): each call gets the records of one partition, in offset order.

SELECTED (keyed by user): the users' rows are looked up (created PENDING if missing: idempotent), then
presence says which instances hold each user's connections, and the pre-encoded frames go to them over the
bus; a user with none keeps the row PENDING and gets it on connect. Rows first, presence second: a user who
connects in between finds the PENDING row in the catch-up. Per batch that is one row lookup, one presence
round trip and one pipeline of publishes, whatever the batch size. Group (keyed by broadcast): one bus
message per record that every instance's hub fans out to its matching connections, one pipeline per batch.
The bus is at-most-once; reconciliation covers what it drops.

A record that cannot be handled (malformed, an armed fault drill, a row the database refuses) ends the batch
there: the records before it are handled in full, then ``BatchListenerFailedError(index)`` hands that one to
the error handler (retry, then the dead-letter topic) and the container goes on with the rest. A failure of a
shared step (database, Redis) names the first record: nothing of the batch counts as handled, it is retried.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TypeVar

import orjson

from broadcast.core import constants, envelope
from broadcast.core.domain import EventType, TargetType
from broadcast.core.envelope import MessageDeliveryEvent
from broadcast.core.ports.bus import Bus, Presence
from broadcast.core.ports.log import EventRecord
from broadcast.core.ports.stores import InboxStore
from broadcast.errors import RejectedByDatabaseError, ValidationError
from broadcast.observability import logs
from consumers.errors import BatchListenerFailedError
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


@dataclass(frozen=True, slots=True)
class _Selected:
    """One decoded selected-topic record; ``row`` is the (broadcast, user) pair whose row id becomes the
    frame's SSE id (None: fire-and-forget or not a message)."""

    record: EventRecord
    event: MessageDeliveryEvent
    user_id: str
    row: tuple[str, str] | None


Failure = tuple[int, Exception]  # the first record of a batch that failed, and why
T = TypeVar("T")


async def _until_failure(
    records: Sequence[EventRecord], step: Callable[[EventRecord], Awaitable[T]]
) -> tuple[list[T], Failure | None]:
    """``step`` of each record in order, up to the first that raises: the results before it, and it."""
    done: list[T] = []
    for index, record in enumerate(records):
        try:
            done.append(await step(record))
        except Exception as exc:  # this record fails; the ones before it are handled
            return done, (index, exc)
    return done, None


class DeliveryHandlers:
    """The batch handlers of the two delivery listeners."""

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

    # -- selected topic -------------------------------------------------------------------------------
    async def on_selected_batch(self, records: Sequence[EventRecord]) -> None:
        items, failure = await _until_failure(records, self._selected)  # items[i] is records[i]
        try:
            rows, refused = await self._rows(items)
            if refused is not None:
                failure, items = refused, items[: refused[0]]
            pushed = await self._push(items, rows)
        except Exception as exc:  # a shared step: nothing of the batch is handled
            raise BatchListenerFailedError(0) from exc
        for item, instances in zip(items, pushed, strict=True):
            self._log(item.record, item.event, instances)
        if failure is not None:
            raise BatchListenerFailedError(failure[0]) from failure[1]

    async def _selected(self, record: EventRecord) -> _Selected:
        """Decode and check one record (and run the fault drill on it)."""
        event = envelope.decode(record.value)
        user_id = event.user_id
        if user_id is None:
            raise ValidationError("selected-topic event without userId")
        row = None
        if event.event_type is EventType.CREATED:
            snapshot = event.broadcast
            if snapshot is None:
                raise ValidationError("CREATED event without its broadcast")
            if self._drill is not None:
                await self._drill.check(record, event.broadcast_id, snapshot.created_at)
            if not snapshot.fire_and_forget:
                row = (event.broadcast_id, user_id)
        return _Selected(record, event, user_id, row)

    async def _rows(self, items: Sequence[_Selected]) -> tuple[dict[tuple[str, str], int], Failure | None]:
        """The row ids of the items' pairs, in one call; when the database refuses the batch, pair by pair
        up to the first it refuses, which is returned as the failure."""
        pairs = [item.row for item in items if item.row is not None]
        if not pairs:
            return {}, None
        try:
            return await self._inbox.rows_for(pairs), None
        except RejectedByDatabaseError:
            rows: dict[tuple[str, str], int] = {}
            for index, item in enumerate(items):
                if item.row is not None:
                    try:
                        rows[item.row] = await self._inbox.row_for(*item.row)
                    except RejectedByDatabaseError as exc:
                        return rows, (index, exc)
            return rows, None

    async def _push(self, items: Sequence[_Selected], rows: dict[tuple[str, str], int]) -> list[int | None]:
        """Publish each item's frame to the instances holding its user; per item, how many (None: nothing
        to push). Frames are built only for users someone holds (most are offline in a large broadcast)."""
        pushing = [item.event.event_type in (EventType.CREATED, EventType.READ) for item in items]
        users = [item.user_id for item, push in zip(items, pushing, strict=True) if push]
        instances = await self._presence.instances_many(users) if users else {}
        messages: list[tuple[str, bytes]] = []
        pushed: list[int | None] = []
        for item, push in zip(items, pushing, strict=True):
            held = sorted(instances[item.user_id]) if push else []
            if held:
                payload = self._payload(item, rows)
                messages += [(constants.instance_channel(instance), payload) for instance in held]
            pushed.append(len(held) if push else None)
        if messages:
            await self._bus.publish_many(messages)
        return pushed

    @staticmethod
    def _payload(item: _Selected, rows: dict[tuple[str, str], int]) -> bytes:
        event, record = item.event, item.record
        if event.event_type is EventType.CREATED and event.broadcast is not None:
            event_id = None if item.row is None else f"s{rows[item.row]}"
            data = frame(EventName.MESSAGE, from_event(event), event_id)
            at = _due_at(event.broadcast.created_at, record.timestamp_ms)
            return _to_user(item.user_id, data, None if item.row is None else list(item.row), event.broadcast_id, at)
        data = frame(EventName.READ_RECEIPT, {"broadcastId": event.broadcast_id})
        return _to_user(item.user_id, data, None, None, 0.0)

    # -- group topic ----------------------------------------------------------------------------------
    async def on_group_batch(self, records: Sequence[EventRecord]) -> None:
        handled, failure = await _until_failure(records, self._group)
        messages = [(constants.REDIS_GROUP_CHANNEL, payload) for _, _, payload in handled if payload is not None]
        try:
            received = iter(await self._bus.publish_many(messages) if messages else [])
        except Exception as exc:  # nothing of the batch is handled
            raise BatchListenerFailedError(0) from exc
        for record, event, payload in handled:
            self._log(record, event, None if payload is None else next(received))
        if failure is not None:
            raise BatchListenerFailedError(failure[0]) from failure[1]

    async def _group(self, record: EventRecord) -> tuple[EventRecord, MessageDeliveryEvent, bytes | None]:
        """One group-topic record decoded, with its bus message (None: nothing to push)."""
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
                "at": _due_at(snapshot.created_at, record.timestamp_ms),
            }
        elif event.event_type in (EventType.CANCELLED, EventType.EXPIRED):
            reason = event.event_type.value
            data = frame(EventName.MESSAGE_REMOVED, {"broadcastId": event.broadcast_id, "reason": reason})
            payload = {"kind": "all", "frame": data.decode()}
        else:
            return record, event, None
        return record, event, orjson.dumps(payload)

    def _log(self, record: EventRecord, event: MessageDeliveryEvent, instances: int | None) -> None:
        if not log.isEnabledFor(self._log_level):
            return
        if instances is None:
            outcome = "nothing to push"
        elif instances == 0 and event.user_id is not None and event.event_type is EventType.CREATED:
            outcome = "user not connected, stays PENDING"
        else:
            outcome = f"pushed to {instances} instance(s)"
        with logs.bound(correlation=event.correlation_id, broadcast=event.broadcast_id, user=event.user_id):
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


def _to_user(user_id: str, data: bytes, delivers: list[str] | None, broadcast_id: str | None, at: float) -> bytes:
    """The bus message that pushes ``data`` to ``user_id``'s streams on an instance (``delivers``: the
    (broadcast, user) row the instance marks DELIVERED once written)."""
    message = {"kind": "user", "user": user_id, "frame": data.decode(), "delivers": delivers, "broadcast": broadcast_id}
    return orjson.dumps({**message, "at": at})
