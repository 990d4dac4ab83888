"""Which class, topic and lane each event of a broadcast takes (priority lanes, issue 20)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from broadcast.core import constants
from broadcast.core.domain import (
    PRIORITY_HEADER,
    Broadcast,
    BroadcastStatus,
    EventType,
    Priority,
    TargetType,
    outbox_lane,
)
from broadcast.core.event_shapes import EventShapes
from broadcast.core.settings import KafkaSettings

NOW = datetime(2026, 12, 6, tzinfo=UTC)
SHAPES = EventShapes(KafkaSettings(topic_prefix="p."), lambda: NOW)


def broadcast(priority: Priority, target: TargetType = TargetType.SELECTED) -> Broadcast:
    return Broadcast("b-1", "admin", "hello", target, (), priority, None, BroadcastStatus.ACTIVE, False, 1, NOW, NOW)


@pytest.mark.parametrize("priority", [Priority.HIGH, Priority.URGENT])
def test_a_high_or_urgent_targeted_message_takes_the_priority_topic_and_lanes(priority: Priority) -> None:
    events = list(SHAPES.created_for_users(broadcast(priority), ["alice", "bob"]))
    assert {e.topic for e in events} == {"p." + constants.SELECTED_PRIORITY_TOPIC}
    assert all(PRIORITY_HEADER in e.headers for e in events)
    assert {outbox_lane(e.key, e.headers) for e in events} <= set(constants.PRIORITY_LANES)


@pytest.mark.parametrize("priority", [Priority.LOW, Priority.NORMAL])
def test_low_and_normal_messages_stay_in_the_normal_class(priority: Priority) -> None:
    [event] = SHAPES.created_for_users(broadcast(priority), ["alice"])
    assert event.topic == "p." + constants.SELECTED_TOPIC
    assert PRIORITY_HEADER not in event.headers
    assert outbox_lane(event.key, event.headers) in constants.NORMAL_LANES


def test_an_urgent_bulk_broadcast_stays_bulk_so_it_cannot_hold_up_the_small_urgent_ones() -> None:
    users = [f"u{i}" for i in range(constants.PRIORITY_MAX_RECIPIENTS + 1)]
    events = list(SHAPES.created_for_users(broadcast(Priority.URGENT), users))
    assert {e.topic for e in events} == {"p." + constants.SELECTED_TOPIC}
    assert {outbox_lane(e.key, e.headers) for e in events} <= set(constants.NORMAL_LANES)
    at_limit = list(SHAPES.created_for_users(broadcast(Priority.URGENT), users[:-1]))
    assert {e.topic for e in at_limit} == {"p." + constants.SELECTED_PRIORITY_TOPIC}


def test_every_group_event_of_an_urgent_broadcast_shares_one_priority_lane_so_their_order_holds() -> None:
    urgent = broadcast(Priority.URGENT, TargetType.ALL)
    events = [SHAPES.group(urgent, t) for t in (EventType.CREATED, EventType.CANCELLED, EventType.EXPIRED)]
    assert {e.topic for e in events} == {"p." + constants.GROUP_TOPIC}, "one group topic: one record per broadcast"
    [lane] = {outbox_lane(e.key, e.headers) for e in events}
    assert lane in constants.PRIORITY_LANES
    normal = SHAPES.group(broadcast(Priority.NORMAL, TargetType.ALL), EventType.CREATED)
    assert outbox_lane(normal.key, normal.headers) in constants.NORMAL_LANES


def test_read_events_stay_in_the_normal_class() -> None:
    event = SHAPES.read("b-1", "alice")
    assert event.topic == "p." + constants.SELECTED_TOPIC and PRIORITY_HEADER not in event.headers


def test_a_key_keeps_its_lane_within_a_class() -> None:
    """Lanes are stable across processes and releases (rows already in the outbox keep per-key order only if
    a new release puts the key's next rows in the same lane): pinned values, crc32 of the key."""
    assert (outbox_lane("alice", ()), outbox_lane("user-7", ())) == (7, 1)
    assert (outbox_lane("alice", (PRIORITY_HEADER,)), outbox_lane("user-7", (PRIORITY_HEADER,))) == (39, 33)
    keys = [f"user-{i}" for i in range(200)]
    assert len({outbox_lane(k, ()) for k in keys}) == constants.OUTBOX_LANES, "spread over every normal lane"
    assert len({outbox_lane(k, (PRIORITY_HEADER,)) for k in keys}) == constants.OUTBOX_PRIORITY_LANES
