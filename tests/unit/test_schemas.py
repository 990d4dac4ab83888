"""Wire models of the admin API: camelCase in and out, unknown fields refused, enums and offsets enforced."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import TypeVar

import orjson
import pytest

from broadcast.core.domain import (
    Broadcast,
    BroadcastStats,
    BroadcastStatus,
    Delivery,
    DeliveryStatus,
    Priority,
    ReadStatus,
    TargetType,
    User,
)
from broadcast.core.schemas import (
    BroadcastOut,
    CreateBroadcastRequest,
    CsvBroadcastForm,
    DeliveryOut,
    StatsOut,
    UserBody,
    UserImport,
    UserOut,
)
from broadcast.http.body import validated
from broadcast.http.problems import HttpProblem
from dlt.api import ArmDrillRequest

M = TypeVar("M")


def parsed(model: type[M], data: object) -> M:
    """``data`` sent as a JSON body and validated as the server does."""
    return validated(model, orjson.dumps(data))


def errors_of(model: type[object], data: object) -> list[dict[str, str]]:
    with pytest.raises(HttpProblem) as caught:
        parsed(model, data)
    assert caught.value.status == 400
    errors: list[dict[str, str]] = caught.value.extra["errors"]
    return errors


def test_create_request_reads_camel_case_and_converts_to_the_domain() -> None:
    body = parsed(
        CreateBroadcastRequest,
        {
            "content": "Maintenance at 22:00",
            "targetType": "ROLE",
            "targetIds": ["ops", "dev"],
            "priority": "URGENT",
            "category": "ops",
            "scheduledAt": "2030-01-01T10:00:00+02:00",
            "expiresAt": "2030-01-02T10:00:00Z",
            "fireAndForget": True,
        },
    )
    new = body.to_domain()
    assert new.target_type is TargetType.ROLE and new.target_ids == ("ops", "dev")
    assert new.priority is Priority.URGENT and new.fire_and_forget is True
    assert new.scheduled_at == datetime(2030, 1, 1, 8, 0, tzinfo=UTC)
    assert new.expires_at == datetime(2030, 1, 2, 10, 0, tzinfo=UTC)


def test_create_request_defaults() -> None:
    new = parsed(CreateBroadcastRequest, {"content": "hi", "targetType": "ALL"}).to_domain()
    assert new.priority is Priority.NORMAL and new.target_ids == () and not new.fire_and_forget
    assert new.category is None and new.scheduled_at is None and new.expires_at is None


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"content": "hi", "targetType": "EVERYONE"}, "targetType"),
        ({"content": "hi", "targetType": "ALL", "priority": "CRITICAL"}, "priority"),
        ({"content": "hi"}, "targetType"),
        ({"targetType": "ALL"}, "content"),
        ({"content": "hi", "targetType": "ALL", "sender": "mallory"}, "sender"),
        ({"content": "hi", "target_type": "ALL"}, "target_type"),
        ({"content": "hi", "targetType": "ALL", "expiresAt": "2030-01-01T10:00:00"}, "expiresAt"),
        ({"content": "hi", "targetType": "ALL", "scheduledAt": "tomorrow"}, "scheduledAt"),
        ({"content": "hi", "targetType": "SELECTED", "targetIds": "alice"}, "targetIds"),
        ({"content": "hi", "targetType": "SELECTED", "targetIds": [1]}, "targetIds.0"),
    ],
)
def test_create_request_refuses_with_the_field_named(data: dict[str, object], field: str) -> None:
    assert field in [e["field"] for e in errors_of(CreateBroadcastRequest, data)]


ALL = {"content": "hi", "targetType": "ALL"}


@pytest.mark.parametrize(
    ("model", "data", "field"),
    [
        (CreateBroadcastRequest, {**ALL, "fireAndForget": "yes"}, "fireAndForget"),
        (CreateBroadcastRequest, {**ALL, "fireAndForget": "true"}, "fireAndForget"),
        (CreateBroadcastRequest, {**ALL, "fireAndForget": 1}, "fireAndForget"),
        (CreateBroadcastRequest, {**ALL, "scheduledAt": 1893456000}, "scheduledAt"),
        (CreateBroadcastRequest, {**ALL, "expiresAt": 1893456000.5}, "expiresAt"),
        (CreateBroadcastRequest, {**ALL, "scheduledAt": "1893456000"}, "scheduledAt"),
        (CreateBroadcastRequest, {**ALL, "priority": 1}, "priority"),
        (ArmDrillRequest, {"expiresInSeconds": "60"}, "expiresInSeconds"),
        (ArmDrillRequest, {"expiresInSeconds": True}, "expiresInSeconds"),
    ],
)
def test_a_wrong_json_type_is_refused_with_the_field_named(model: type[object], data: object, field: str) -> None:
    assert field in [e["field"] for e in errors_of(model, data)]


def test_json_datetimes_are_iso_8601_strings() -> None:
    body = parsed(CreateBroadcastRequest, {**ALL, "scheduledAt": "2030-01-01T00:00:00Z"})
    assert body.scheduled_at == datetime(2030, 1, 1, tzinfo=UTC)


def test_errors_do_not_echo_the_input() -> None:
    huge = "z" * 100_000
    errors = errors_of(CreateBroadcastRequest, {"content": "hi", "targetType": huge})
    assert huge[:50] not in orjson.dumps(errors).decode()


def test_a_non_object_body_is_a_field_error() -> None:
    assert errors_of(CreateBroadcastRequest, ["content"])[0]["field"] == "(body)"


def test_the_csv_form_has_no_target() -> None:
    form = parsed(CsvBroadcastForm, {"content": "hi", "fireAndForget": True, "priority": "HIGH"})
    new = form.to_domain()
    assert new.target_type is TargetType.SELECTED and new.fire_and_forget and new.priority is Priority.HIGH
    assert "targetType" in [e["field"] for e in errors_of(CsvBroadcastForm, {"content": "hi", "targetType": "ALL"})]


def test_broadcast_out_is_camel_case_rfc3339_utc() -> None:
    at = datetime(2030, 5, 1, 12, 0, tzinfo=timezone(timedelta(hours=2)))
    broadcast = Broadcast(
        id="b1",
        sender_id="admin",
        content="hello",
        target_type=TargetType.ROLE,
        target_roles=("ops",),
        priority=Priority.HIGH,
        category=None,
        status=BroadcastStatus.SCHEDULED,
        fire_and_forget=False,
        targeted_count=3,
        created_at=at,
        updated_at=at,
        scheduled_at=at,
        correlation_id="c1",
    )
    assert orjson.loads(BroadcastOut.of(broadcast).to_json()) == {
        "id": "b1",
        "senderId": "admin",
        "content": "hello",
        "targetType": "ROLE",
        "targetRoles": ["ops"],
        "priority": "HIGH",
        "category": None,
        "status": "SCHEDULED",
        "fireAndForget": False,
        "targetedCount": 3,
        "createdAt": "2030-05-01T10:00:00.000000Z",
        "updatedAt": "2030-05-01T10:00:00.000000Z",
        "scheduledAt": "2030-05-01T10:00:00.000000Z",
        "expiresAt": None,
        "correlationId": "c1",
    }


def test_stats_and_deliveries_out() -> None:
    stats = orjson.loads(StatsOut.of(BroadcastStats("b1", targeted=4, delivered=2, read=1, failed=1)).to_json())
    assert stats == {
        "broadcastId": "b1",
        "targeted": 4,
        "delivered": 2,
        "read": 1,
        "failed": 1,
        "pending": 1,
        "cancelled": 0,
        "expired": 0,
        "deliveryRate": 0.5,
        "readRate": 0.25,
    }
    delivery = Delivery("u1", DeliveryStatus.PENDING, ReadStatus.UNREAD, None, None)
    assert orjson.loads(DeliveryOut.of(delivery).to_json()) == {
        "userId": "u1",
        "deliveryStatus": "PENDING",
        "readStatus": "UNREAD",
        "deliveredAt": None,
        "readAt": None,
    }


def test_user_bodies_check_role_names() -> None:
    user = parsed(UserBody, {"displayName": "Ann", "roles": ["ops", "team:eu-1.x"]}).to_domain("ann")
    assert user == User("ann", "Ann", frozenset({"ops", "team:eu-1.x"}))
    assert parsed(UserBody, {}).to_domain("bob") == User("bob", "", frozenset())
    for bad in ["", "has space", "x" * 65, "semi;colon"]:
        assert errors_of(UserBody, {"roles": [bad]})[0]["field"] == "roles.0"
    assert errors_of(UserBody, {"display_name": "Ann"})[0]["field"] == "display_name"
    assert errors_of(UserImport, {"roles": []})[0]["field"] == "id"


def test_user_out_sorts_roles() -> None:
    out = UserOut.of(User("ann", "Ann", frozenset({"b", "a"})))
    assert orjson.loads(out.to_json()) == {"id": "ann", "displayName": "Ann", "roles": ["a", "b"]}
