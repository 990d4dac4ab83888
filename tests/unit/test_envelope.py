"""The Kafka envelope: round trip, and every defect is a not-retryable ValidationError."""

from __future__ import annotations

from datetime import UTC, datetime

import orjson
import pytest

from broadcast import envelope
from broadcast.domain import EventType, Priority, TargetType
from broadcast.errors import ValidationError


def sample() -> envelope.MessageDeliveryEvent:
    return envelope.MessageDeliveryEvent(
        event_id="b1:alice",
        event_type=EventType.CREATED,
        broadcast_id="b1",
        user_id="alice",
        target_type=TargetType.SELECTED,
        content="hello ✓",
        priority=Priority.URGENT,
        created_at=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
    )


def test_round_trip_keeps_every_field_and_uses_camel_case() -> None:
    raw = envelope.encode(sample())
    data = orjson.loads(raw)
    assert data["v"] == 1
    assert data["eventId"] == "b1:alice"
    assert data["targetType"] == "SELECTED"
    assert envelope.decode(raw) == sample()


@pytest.mark.parametrize(
    "raw",
    [
        None,
        b"",
        b"not json",
        b"[1, 2]",
        b'{"v": 2}',
        orjson.dumps({**orjson.loads(envelope.encode(sample())), "eventType": "EXPLODED"}),
        orjson.dumps({**orjson.loads(envelope.encode(sample())), "unknown": 1}),
        b'{"v": 1, "x": "' + b"a" * 1_000_001 + b'"}',
    ],
)
def test_malformed_records_raise_validation_error(raw: bytes | None) -> None:
    with pytest.raises(ValidationError):
        envelope.decode(raw)
