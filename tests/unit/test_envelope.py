"""The Kafka envelope: round trip, per-user encoding, and every defect is a not-retryable ValidationError."""

from __future__ import annotations

from datetime import UTC, datetime

import orjson
import pytest

from broadcast.core import envelope
from broadcast.core.domain import EventType, Priority, TargetType
from broadcast.errors import ValidationError

CREATED_AT = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def sample(user_id: str | None = "alice") -> envelope.MessageDeliveryEvent:
    return envelope.MessageDeliveryEvent(
        event_id=envelope.event_id("b1", EventType.CREATED, user_id),
        event_type=EventType.CREATED,
        broadcast_id="b1",
        user_id=user_id,
        occurred_at=CREATED_AT,
        correlation_id="c-1",
        broadcast=envelope.BroadcastSnapshot(
            sender_id="admin",
            content="hello ✓",
            target_type=TargetType.SELECTED,
            priority=Priority.URGENT,
            created_at=CREATED_AT,
        ),
    )


def test_round_trip_keeps_every_field_and_uses_camel_case() -> None:
    raw = envelope.encode(sample())
    data = orjson.loads(raw)
    assert data["v"] == 1
    assert data["eventId"] == "b1.CREATED.alice"
    assert data["broadcast"]["targetType"] == "SELECTED"
    assert envelope.decode(raw) == sample()


def test_the_per_user_encoder_matches_encoding_each_event_in_full() -> None:
    encoder = envelope.PerUserEncoder(sample(user_id=None))
    for user in ("alice", "bob"):
        assert envelope.decode(encoder.encode(user)) == sample(user)


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
