"""The shapes of the events the server writes to its outbox (docs/DESIGN.md §2), built in one place.

- CREATED for SELECTED: one event per recipient on the selected topic, keyed by user id, encoded from a
  shared template (only the user and event ids vary);
- CREATED for ALL/ROLE, CANCELLED, EXPIRED: one event per broadcast on the group topic, keyed by its id;
- READ: one event per (broadcast, user) on the selected topic, keyed by user id (tab sync).
Scheduled CREATED events carry ``not_before = scheduledAt``.

The priority class (``priority_class``): every event of a HIGH or URGENT broadcast carries the lane-class
header, so it takes the priority outbox lanes; its per-recipient CREATED events go to the selected priority
topic, unless it has more than ``constants.PRIORITY_MAX_RECIPIENTS`` recipients (a bulk broadcast stays bulk,
whatever its priority). READ events stay in the normal class.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from datetime import datetime

from broadcast.core import constants, envelope
from broadcast.core.domain import PRIORITY_HEADER, Broadcast, EventType, OutboxEvent, Priority
from broadcast.core.settings import KafkaSettings


class EventShapes:
    def __init__(self, kafka: KafkaSettings, clock: Callable[[], datetime]) -> None:
        self._selected_topic = kafka.topic(constants.SELECTED_TOPIC)
        self._priority_topic = kafka.topic(constants.SELECTED_PRIORITY_TOPIC)
        self._group_topic = kafka.topic(constants.GROUP_TOPIC)
        self._clock = clock

    @staticmethod
    def headers(
        event_type: EventType, correlation_id: str | None, priority: bool = False
    ) -> tuple[tuple[str, bytes], ...]:
        headers = [
            (constants.HEADER_EVENT_TYPE, event_type.value.encode()),
            (constants.HEADER_SCHEMA_VERSION, str(envelope.SCHEMA_VERSION).encode()),
        ]
        if correlation_id:
            headers.append((constants.HEADER_CORRELATION_ID, correlation_id.encode()))
        if priority:
            headers.append(PRIORITY_HEADER)
        return tuple(headers)

    def created_for_users(self, broadcast: Broadcast, user_ids: Sequence[str]) -> Iterator[OutboxEvent]:
        template = envelope.MessageDeliveryEvent(
            event_id=envelope.event_id(broadcast.id, EventType.CREATED),
            event_type=EventType.CREATED,
            broadcast_id=broadcast.id,
            occurred_at=broadcast.created_at,
            correlation_id=broadcast.correlation_id,
            broadcast=envelope.snapshot(broadcast),
        )
        encoder = envelope.PerUserEncoder(template)
        priority = priority_class(broadcast) and len(user_ids) <= constants.PRIORITY_MAX_RECIPIENTS
        headers = self.headers(EventType.CREATED, broadcast.correlation_id, priority)
        topic = self._priority_topic if priority else self._selected_topic
        for user_id in user_ids:
            yield OutboxEvent(
                topic,
                user_id,
                EventType.CREATED,
                encoder.encode(user_id),
                headers,
                broadcast.id,
                broadcast.scheduled_at,
            )

    def group(self, broadcast: Broadcast, event_type: EventType) -> OutboxEvent:
        event = envelope.MessageDeliveryEvent(
            event_id=envelope.event_id(broadcast.id, event_type),
            event_type=event_type,
            broadcast_id=broadcast.id,
            occurred_at=self._clock() if event_type is not EventType.CREATED else broadcast.created_at,
            correlation_id=broadcast.correlation_id,
            broadcast=envelope.snapshot(broadcast),
        )
        return OutboxEvent(
            self._group_topic,
            broadcast.id,
            event_type,
            envelope.encode(event),
            self.headers(event_type, broadcast.correlation_id, priority_class(broadcast)),
            broadcast.id,
            broadcast.scheduled_at if event_type is EventType.CREATED else None,
        )

    def read(self, broadcast_id: str, user_id: str) -> OutboxEvent:
        event = envelope.MessageDeliveryEvent(
            event_id=envelope.event_id(broadcast_id, EventType.READ, user_id),
            event_type=EventType.READ,
            broadcast_id=broadcast_id,
            user_id=user_id,
            occurred_at=self._clock(),
        )
        return OutboxEvent(
            self._selected_topic,
            user_id,
            EventType.READ,
            envelope.encode(event),
            self.headers(EventType.READ, None),
            broadcast_id,
        )


def priority_class(broadcast: Broadcast) -> bool:
    """Whether ``broadcast``'s events take the priority lanes (HIGH and URGENT)."""
    return broadcast.priority in (Priority.HIGH, Priority.URGENT)
