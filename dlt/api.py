"""Admin HTTP API of the dead-letter store, and the fault drill.

``GET /api/admin/dlt/messages`` (newest first, ``cursor`` + ``limit``; filters ``topic``, ``exception``,
``broadcastId``, ``from``, ``to``, ``status``), ``GET …/messages/{id}`` (payload, headers, stack trace, audit
trail), ``GET …/summary`` (counts by original topic and exception class, same filters),
``POST …/redrive/{id}``, ``POST …/redrive-all`` (same filters), ``DELETE …/purge/{id}``,
``DELETE …/purge-all`` (same filters). ``POST|GET /api/admin/testing/kafka-consumer-failure`` and
``DELETE …/kafka-consumer-failure/{id}`` (disarm) when the drill is enabled (404 otherwise). Every route asks
``acting_admin`` first.
"""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import Field
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from broadcast.core import constants
from broadcast.core.dead_letters import AuditEntry, DeadLetter, DeadLetterFilter, DeadLetterStatus, Drill
from broadcast.core.domain import is_printable, rfc3339
from broadcast.core.schemas import RequestModel, WholeNumber
from broadcast.errors import NotFoundError, ValidationError
from broadcast.http.body import id_number, json_data, known_query, read_model
from broadcast.http.identity import acting_admin
from broadcast.http.problems import HttpProblem
from dlt.context import dead_letter_context
from dlt.recoverer import header_int
from dlt.service import BulkResult

PREFIX = "/api/admin/dlt"
DRILL_PATH = "/api/admin/testing/kafka-consumer-failure"
DEFAULT_PAGE_SIZE = 50
MAX_FILTER_CHARS = 255
MAX_MESSAGE_PREVIEW = 500
INT_HEADERS = {
    constants.DLT_ORIGINAL_PARTITION,
    constants.DLT_ORIGINAL_OFFSET,
    constants.DLT_ORIGINAL_TIMESTAMP,
}


def _letter_id(request: Request) -> int:
    raw = request.path_params["letter_id"]
    try:
        return id_number(raw, "id")
    except ValidationError:
        raise NotFoundError(f"dead letter {raw[:40]!r} not found") from None


def _time(raw: str | None, name: str) -> datetime | None:
    if raw is None:  # present but empty names no moment: 400, as the document's date-time says
        return None
    try:
        value = datetime.fromisoformat(raw[:64])
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    except (ValueError, OverflowError):
        raise ValidationError(f"{name} must be an ISO-8601 date-time") from None


def _text_filter(request: Request, name: str, limit: int = MAX_FILTER_CHARS) -> str | None:
    raw = request.query_params.get(name) or None
    if raw is not None and (len(raw) > limit or not is_printable(raw)):
        raise ValidationError(f"{name} must be at most {limit} printable characters")
    return raw


def _filter(request: Request) -> DeadLetterFilter:
    known_query(request, "topic", "exception", "broadcastId", "from", "to", "status", "cursor", "limit")
    kafka = dead_letter_context(request).settings.kafka
    topic = _text_filter(request, "topic")
    if topic in constants.ALL_TOPICS:  # the logical name works whatever the deployment's topic prefix
        topic = kafka.topic(topic)
    status = request.query_params.get("status")  # present but empty names no status: 400
    try:
        parsed_status = DeadLetterStatus(status.upper()) if status is not None else None
    except ValueError:
        raise ValidationError(f"status must be one of {', '.join(s.value for s in DeadLetterStatus)}") from None
    # The half-open interval [from, to): `to` not after `from` is an empty interval, which matches nothing.
    received_from, received_to = (
        _time(request.query_params.get("from"), "from"),
        _time(request.query_params.get("to"), "to"),
    )
    return DeadLetterFilter(
        original_topic=topic,
        exception_fqcn=_text_filter(request, "exception"),
        broadcast_id=_text_filter(request, "broadcastId", 36),
        received_from=received_from,
        received_to=received_to,
        status=parsed_status,
    )


def _iso(value: datetime | None) -> str | None:
    return rfc3339(value) if value else None


def _bytes(raw: bytes | None) -> dict[str, Any] | None:
    """Bytes for people: the text when it is UTF-8, always the exact bytes in base64."""
    if raw is None:
        return None
    try:
        text: str | None = raw.decode()
    except UnicodeDecodeError:
        text = None
    return {"text": text, "base64": base64.b64encode(raw).decode(), "size": len(raw)}


def _header(key: str, value: bytes) -> dict[str, Any]:
    shown = _bytes(value) or {}
    if key in INT_HEADERS:
        shown["int"] = header_int(value)
    return {"key": key, **shown}


def _summary(x: DeadLetter) -> dict[str, Any]:
    return {
        "id": x.id,
        "status": x.status.value,
        "receivedAt": _iso(x.received_at),
        "dltTopic": x.dlt_topic,
        "dltPartition": x.dlt_partition,
        "dltOffset": x.dlt_offset,
        "originalTopic": x.original_topic,
        "originalPartition": x.original_partition,
        "originalOffset": x.original_offset,
        "originalTimestamp": _iso(x.original_timestamp),
        "exceptionFqcn": x.exception_fqcn,
        "exceptionCauseFqcn": x.exception_cause_fqcn,
        "exceptionMessage": (x.exception_message or "")[:MAX_MESSAGE_PREVIEW] or None,
        "broadcastId": x.broadcast_id,
        "userId": x.user_id,
        "eventType": x.event_type,
        "key": _bytes(x.key),
    }


def _audit(a: AuditEntry) -> dict[str, Any]:
    return {"at": _iso(a.at), "actor": a.actor, "action": a.action, "outcome": a.outcome, "detail": a.detail}


def _bulk(result: BulkResult, done_name: str) -> dict[str, Any]:
    failures = [{"id": i, "reason": reason} for i, reason in result.failures]
    return {"matched": result.matched, done_name: result.done, "failed": result.failed, "failures": failures}


async def list_messages(request: Request) -> Response:
    await acting_admin(request)
    where = _filter(request)
    cursor_raw = request.query_params.get("cursor") or None
    cursor = id_number(cursor_raw, "cursor") if cursor_raw is not None else None
    limit_raw = request.query_params.get("limit") or None
    limit = id_number(limit_raw, "limit") if limit_raw is not None else DEFAULT_PAGE_SIZE
    max_page = dead_letter_context(request).settings.limits.max_page_size
    if not 1 <= limit <= max_page:
        raise ValidationError(f"limit must be between 1 and {max_page}")
    page = await dead_letter_context(request).dead_letter_store.page(where, cursor, limit)
    return json_data({"items": [_summary(x) for x in page.items], "nextCursor": page.next_cursor})


async def get_message(request: Request) -> Response:
    await acting_admin(request)
    c = dead_letter_context(request)
    letter = await c.dead_letters.letter(_letter_id(request))
    assert letter.id is not None
    body = _summary(letter)
    body.update(
        exceptionMessage=letter.exception_message,
        stacktrace=letter.stacktrace,
        consumerGroup=letter.consumer_group,
        payload=_bytes(letter.value),
        headers=[_header(k, v) for k, v in letter.headers],
        audit=[_audit(a) for a in await c.dead_letter_store.audit_trail(letter.id)],
    )
    return json_data(body)


async def summary(request: Request) -> Response:
    await acting_admin(request)
    rows = await dead_letter_context(request).dead_letter_store.summary(_filter(request))
    return json_data(
        {
            "total": sum(r.count for r in rows),
            "groups": [
                {
                    "originalTopic": r.original_topic,
                    "exceptionFqcn": r.exception_fqcn,
                    "count": r.count,
                    "newest": _iso(r.newest),
                }
                for r in rows
            ],
        }
    )


async def redrive(request: Request) -> Response:
    actor = await acting_admin(request)
    letter_id = _letter_id(request)
    try:
        done = await dead_letter_context(request).dead_letters.redrive(letter_id, actor)
    except ValidationError as exc:
        raise HttpProblem(422, "Cannot redrive", str(exc)) from None
    return json_data({"id": letter_id, "status": DeadLetterStatus.REDRIVEN.value, "alreadyRedriven": not done})


async def redrive_all(request: Request) -> Response:
    actor = await acting_admin(request)
    result = await dead_letter_context(request).dead_letters.redrive_all(_filter(request), actor)
    return json_data({**_bulk(result, "redriven"), "alreadyRedriven": result.skipped})


async def purge(request: Request) -> Response:
    actor = await acting_admin(request)
    letter_id = _letter_id(request)
    await dead_letter_context(request).dead_letters.purge(letter_id, actor)
    return json_data({"id": letter_id, "purged": True})


async def purge_all(request: Request) -> Response:
    actor = await acting_admin(request)
    result = await dead_letter_context(request).dead_letters.purge_all(_filter(request), actor)
    return json_data(_bulk(result, "purged"))


class ArmDrillRequest(RequestModel):
    broadcast_id: str | None = Field(default=None, min_length=1, max_length=36, pattern=r"^[A-Za-z0-9-]+$")
    expires_in_seconds: WholeNumber = Field(default=300, ge=1)
    fail_redrives: bool = False  # redriven records of the broadcast fail too, until it expires or is disarmed


def _drill_enabled(request: Request) -> None:
    if not dead_letter_context(request).settings.testing.fault_drill_enabled:
        raise HttpProblem(
            404, "Not Found", "the fault drill is disabled (set BROADCAST_TESTING__FAULT_DRILL_ENABLED=true)"
        )


async def arm_drill(request: Request) -> Response:
    actor = await acting_admin(request)
    _drill_enabled(request)
    c = dead_letter_context(request)
    body = await read_model(request, ArmDrillRequest, c.settings.limits.max_body_bytes)
    if body.expires_in_seconds > c.settings.testing.max_drill_seconds:
        raise ValidationError(f"expiresInSeconds must be at most {c.settings.testing.max_drill_seconds}")
    expires_at = datetime.now(UTC) + timedelta(seconds=body.expires_in_seconds)
    drill = await c.drills.arm(actor, body.broadcast_id, expires_at, body.fail_redrives)
    return json_data(_drill(drill), 201)


async def armed_drills(request: Request) -> Response:
    await acting_admin(request)
    _drill_enabled(request)
    drills = await dead_letter_context(request).drills.armed(datetime.now(UTC))
    return json_data({"armed": [_drill(d) for d in drills]})


async def disarm_drill(request: Request) -> Response:
    await acting_admin(request)
    _drill_enabled(request)
    raw = request.path_params["drill_id"]
    try:
        drill_id = id_number(raw, "id")
    except ValidationError:
        drill_id = None
    if drill_id is None or not await dead_letter_context(request).drills.disarm(drill_id, datetime.now(UTC)):
        raise NotFoundError(f"no armed drill {raw[:40]!r}")
    return json_data({"id": drill_id, "disarmed": True})


def _drill(d: Drill) -> dict[str, Any]:
    return {
        "id": d.id,
        "broadcastId": d.broadcast_id,
        "scope": "broadcast" if d.broadcast_id else "next broadcast",
        "failRedrives": d.fail_redrives,
        "armedBy": d.armed_by,
        "armedAt": _iso(d.armed_at),
        "expiresAt": _iso(d.expires_at),
    }


routes: list[BaseRoute] = [
    Route(f"{PREFIX}/messages", list_messages, methods=["GET"]),
    Route(f"{PREFIX}/messages/{{letter_id}}", get_message, methods=["GET"]),
    Route(f"{PREFIX}/summary", summary, methods=["GET"]),
    Route(f"{PREFIX}/redrive-all", redrive_all, methods=["POST"]),
    Route(f"{PREFIX}/redrive/{{letter_id}}", redrive, methods=["POST"]),
    Route(f"{PREFIX}/purge-all", purge_all, methods=["DELETE"]),
    Route(f"{PREFIX}/purge/{{letter_id}}", purge, methods=["DELETE"]),
    Route(DRILL_PATH, arm_drill, methods=["POST"]),
    Route(DRILL_PATH, armed_drills, methods=["GET"]),
    Route(f"{DRILL_PATH}/{{drill_id}}", disarm_drill, methods=["DELETE"]),
]
