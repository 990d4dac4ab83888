"""The OpenAPI 3.1 description of every HTTP route, built in code and served at ``GET /api/openapi.json``.

Request bodies are the pydantic request models' own JSON Schemas (``model_json_schema(by_alias=True)``),
with the bounds that come from the settings (``limits``, ``testing``) added, so the document says what the
running server accepts. Responses name their status codes and media types (``application/json``,
``application/problem+json``, ``text/event-stream``) and, where the body is a wire model, its schema.
Every ``/api/**`` operation needs the ``bearerAuth`` scheme except this document itself, which is public.

``tests/unit/test_openapi.py`` fails when a route of the app is not described here, or a described one is
not a route.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import orjson
from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from broadcast import web
from broadcast.admin import api as admin_api
from broadcast.admin import outbox_api as admin_outbox_api
from broadcast.admin import users_api as admin_users_api
from broadcast.admin.context import admin_context
from broadcast.core.dead_letters import DeadLetterStatus
from broadcast.core.domain import PRINTABLE_PATTERN, USER_ID_PATTERN, BroadcastStatus, TargetType
from broadcast.core.schemas import (
    ROLE_PATTERN,
    BroadcastOut,
    BroadcastPage,
    CreateBroadcastRequest,
    CsvBroadcastForm,
    CsvBroadcastOut,
    DeliveryPage,
    ImportOut,
    MarkReadRequest,
    StatsOut,
    UserBody,
    UserImport,
    UserOut,
)
from broadcast.core.settings import Settings
from broadcast.http.body import MAX_ID
from broadcast.http.problems import MEDIA_TYPE as PROBLEM
from broadcast.http.security import SAFE_METHODS
from dlt import api as dlt_api
from sse.frames import EVENT_ID_PATTERN, MAX_EVENT_ID_CHARS, EventName

OPENAPI_PATH = "/api/openapi.json"
OPENAPI_VERSION = "3.1.0"
JSON = "application/json"
EVENT_STREAM = "text/event-stream"
SECURITY_SCHEME = "bearerAuth"
USER_MESSAGES = "/api/user/messages"
NO_NUL_PATTERN = r"^[^\x00]*$"
CONTENT_PATTERN = r"^[^\x00]*[^\s\x00][^\x00]*$"  # not blank (kept as sent, never stripped), no NUL

Schema = dict[str, Any]


@dataclass(frozen=True, slots=True)
class Bounds:
    """The settings a document depends on (hashable, so one document is built per distinct set)."""

    max_content_chars: int
    max_category_chars: int
    max_json_target_ids: int
    max_csv_bytes: int
    max_user_id_chars: int
    max_bulk_users: int
    max_page_size: int
    max_drill_seconds: int

    @classmethod
    def of(cls, settings: Settings) -> Bounds:
        limits = settings.limits
        return cls(
            max_content_chars=limits.max_content_chars,
            max_category_chars=limits.max_category_chars,
            max_json_target_ids=limits.max_json_target_ids,
            max_csv_bytes=limits.max_csv_bytes,
            max_user_id_chars=limits.max_user_id_chars,
            max_bulk_users=limits.max_bulk_users,
            max_page_size=limits.max_page_size,
            max_drill_seconds=settings.testing.max_drill_seconds,
        )


def ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


# --------------------------------------------------------------------------- component schemas
class _Components:
    """``components.schemas`` being filled: pydantic models with their ``$defs`` hoisted beside them."""

    def __init__(self) -> None:
        self.schemas: dict[str, Schema] = {}

    def model(self, model: type[BaseModel], mode: JsonSchemaMode = "validation") -> None:
        schema = model.model_json_schema(by_alias=True, ref_template="#/components/schemas/{model}", mode=mode)
        for def_name, definition in schema.pop("$defs", {}).items():
            self.add(def_name, definition)
        self.add(model.__name__, schema)

    def add(self, name: str, schema: Schema) -> None:
        if self.schemas.setdefault(name, schema) != schema:
            raise ValueError(f"two different schemas named {name!r}")


def _problem_schema() -> Schema:
    return {
        "title": "Problem",
        "description": "RFC 9457 problem details; extension members (e.g. `errors`) may follow.",
        "type": "object",
        "required": ["type", "title", "status"],
        "properties": {
            "type": {"type": "string"},
            "title": {"type": "string"},
            "status": {"type": "integer", "minimum": 400, "maximum": 599},
            "detail": {"type": "string"},
            "errors": {"type": "array", "items": {"type": "object"}},
        },
    }


_NULLABLE_STRING: Schema = {"type": ["string", "null"]}
_NULLABLE_TIME: Schema = {"type": ["string", "null"], "format": "date-time"}
_BYTES: Schema = {
    "type": ["object", "null"],
    "description": "bytes: the text when it is UTF-8, always the exact bytes in base64",
    "required": ["text", "base64", "size"],
    "properties": {
        "text": _NULLABLE_STRING,
        "base64": {"type": "string", "contentEncoding": "base64"},
        "size": {"type": "integer", "minimum": 0},
    },
}


def _dead_letter_schemas() -> dict[str, Schema]:
    summary: Schema = {
        "type": "object",
        "required": ["id", "status", "receivedAt", "originalTopic", "exceptionFqcn"],
        "properties": {
            "id": {"type": "integer"},
            "status": {"type": "string", "enum": [s.value for s in DeadLetterStatus]},
            "receivedAt": _NULLABLE_TIME,
            "dltTopic": {"type": "string"},
            "dltPartition": {"type": "integer"},
            "dltOffset": {"type": "integer"},
            "originalTopic": _NULLABLE_STRING,
            "originalPartition": {"type": ["integer", "null"]},
            "originalOffset": {"type": ["integer", "null"]},
            "originalTimestamp": _NULLABLE_TIME,
            "exceptionFqcn": _NULLABLE_STRING,
            "exceptionCauseFqcn": _NULLABLE_STRING,
            "exceptionMessage": _NULLABLE_STRING,
            "broadcastId": _NULLABLE_STRING,
            "userId": _NULLABLE_STRING,
            "eventType": _NULLABLE_STRING,
            "key": _BYTES,
        },
    }
    header: Schema = {
        "type": "object",
        "required": ["key"],
        "properties": {**_BYTES["properties"], "key": {"type": "string"}, "int": {"type": ["integer", "null"]}},
    }
    audit: Schema = {
        "type": "object",
        "properties": {
            "at": _NULLABLE_TIME,
            "actor": {"type": "string"},
            "action": {"type": "string"},
            "outcome": {"type": "string"},
            "detail": {},
        },
    }
    detail: Schema = {
        "allOf": [ref("DeadLetterSummary")],
        "type": "object",
        "required": ["payload", "headers", "audit"],
        "properties": {
            "stacktrace": _NULLABLE_STRING,
            "consumerGroup": _NULLABLE_STRING,
            "payload": _BYTES,
            "headers": {"type": "array", "items": header},
            "audit": {"type": "array", "items": audit},
        },
    }
    bulk: Schema = {
        "type": "object",
        "required": ["matched", "failed", "failures"],
        "properties": {
            "matched": {"type": "integer", "minimum": 0},
            "redriven": {"type": "integer", "minimum": 0},
            "purged": {"type": "integer", "minimum": 0},
            "alreadyRedriven": {"type": "integer", "minimum": 0},
            "failed": {"type": "integer", "minimum": 0},
            "failures": {
                "type": "array",
                "items": {"type": "object", "properties": {"id": {"type": "integer"}, "reason": {"type": "string"}}},
            },
        },
    }
    drill: Schema = {
        "type": "object",
        "required": ["id", "broadcastId", "scope", "failRedrives", "armedBy", "armedAt", "expiresAt"],
        "properties": {
            "id": {"type": "integer"},
            "broadcastId": _NULLABLE_STRING,
            "scope": {"type": "string", "enum": ["broadcast", "next broadcast"]},
            "failRedrives": {"type": "boolean", "description": "redriven records of the broadcast fail too"},
            "armedBy": {"type": "string"},
            "armedAt": {"type": "string", "format": "date-time"},
            "expiresAt": {"type": "string", "format": "date-time"},
        },
    }
    return {
        "DeadLetterSummary": summary,
        "DeadLetter": detail,
        "DeadOutboxRow": {
            "type": "object",
            "required": [
                "id",
                "outboxId",
                "topic",
                "key",
                "eventType",
                "broadcastId",
                "payloadBytes",
                "attempts",
                "lastError",
                "createdAt",
                "deadAt",
            ],
            "properties": {
                "id": {"type": "integer"},
                "outboxId": {"type": "integer", "description": "the row's id in the outbox, its place in its lane"},
                "topic": {"type": "string"},
                "key": {"type": "string"},
                "eventType": {"type": "string"},
                "broadcastId": {"type": ["string", "null"]},
                "payloadBytes": {"type": "integer", "minimum": 0},
                "attempts": {"type": "integer", "minimum": 0},
                "lastError": {"type": ["string", "null"]},
                "createdAt": {"type": "string", "format": "date-time"},
                "deadAt": {"type": "string", "format": "date-time"},
            },
        },
        "DeadOutboxPage": {
            "type": "object",
            "required": ["items", "nextCursor"],
            "properties": {
                "items": {"type": "array", "items": ref("DeadOutboxRow")},
                "nextCursor": {"type": ["string", "null"]},
            },
        },
        "DeadLetterPage": {
            "type": "object",
            "required": ["items", "nextCursor"],
            "properties": {"items": {"type": "array", "items": ref("DeadLetterSummary")}, "nextCursor": {}},
        },
        "DeadLetterCounts": {
            "type": "object",
            "required": ["total", "groups"],
            "properties": {
                "total": {"type": "integer", "minimum": 0},
                "groups": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["originalTopic", "exceptionFqcn", "count", "newest"],
                        "properties": {
                            "originalTopic": _NULLABLE_STRING,
                            "exceptionFqcn": _NULLABLE_STRING,
                            "count": {"type": "integer", "minimum": 0},
                            "newest": _NULLABLE_TIME,
                        },
                    },
                },
            },
        },
        "BulkResult": bulk,
        "Drill": drill,
        "ArmedDrills": {
            "type": "object",
            "required": ["armed"],
            "properties": {"armed": {"type": "array", "items": ref("Drill")}},
        },
    }


def _user_schemas() -> dict[str, Schema]:
    message: Schema = {
        "type": "object",
        "required": ["broadcastId", "content", "priority", "senderId", "targetType", "createdAt", "read"],
        "properties": {
            "broadcastId": {"type": "string"},
            "content": {"type": "string"},
            "priority": ref("Priority"),
            "category": _NULLABLE_STRING,
            "senderId": {"type": "string"},
            "targetType": ref("TargetType"),
            "createdAt": {"type": "string", "format": "date-time"},
            "expiresAt": _NULLABLE_TIME,
            "read": {"type": "boolean"},
            "correlationId": {
                **_NULLABLE_STRING,
                "description": "The X-Correlation-ID of the admin request that created the broadcast",
            },
        },
    }
    return {
        "Message": message,
        "Inbox": {
            "type": "object",
            "required": ["items", "nextCursor", "unreadCount"],
            "properties": {
                "items": {"type": "array", "items": ref("Message")},
                "nextCursor": _NULLABLE_STRING,
                "unreadCount": {"type": ["integer", "null"], "minimum": 0},
            },
        },
        "Unread": {
            "type": "object",
            "required": ["count", "items"],
            "properties": {
                "count": {"type": "integer", "minimum": 0},
                "items": {"type": "array", "items": ref("Message")},
            },
        },
        "MarkReadRequest": MarkReadRequest.model_json_schema(by_alias=True),
        "SseTicket": {
            "type": "object",
            "required": ["ticket", "expiresInSeconds", "streamUrl"],
            "properties": {
                "ticket": {"type": "string"},
                "expiresInSeconds": {"type": "integer", "minimum": 1},
                "streamUrl": {"type": "string"},
            },
        },
        "MarkedRead": {
            "type": "object",
            "required": ["read"],
            "properties": {"read": {"type": "array", "items": {"type": "string"}}},
        },
    }


def _event_schema() -> Schema:
    """One event of the SSE stream (what OpenAPI 3.2 calls the ``itemSchema`` of ``text/event-stream``)."""
    names = [v for k, v in vars(EventName).items() if k.isupper()]
    return {
        "title": "ServerSentEvent",
        "type": "object",
        "required": ["event", "data"],
        "properties": {
            "event": {"type": "string", "enum": names},
            "data": {"type": "string", "contentMediaType": JSON},
            "id": {"type": "string", "pattern": EVENT_ID_PATTERN, "description": "resume cursor (MESSAGE events)"},
            "retry": {"type": "integer", "minimum": 0},
        },
    }


def _health_schemas() -> dict[str, Schema]:
    return {
        "Live": {"type": "object", "required": ["status"], "properties": {"status": {"const": "up"}}},
        "DevTokenRequest": web.DevTokenRequest.model_json_schema(by_alias=True),
        "DevToken": {
            "type": "object",
            "required": ["token", "sub", "roles", "expiresInSeconds"],
            "properties": {
                "token": {"type": "string"},
                "sub": {"type": "string"},
                "roles": {"type": "array", "items": {"type": "string"}},
                "expiresInSeconds": {"type": "integer"},
            },
        },
        "Ready": {
            "type": "object",
            "required": ["status", "failing", "checks"],
            "properties": {
                "status": {"enum": ["up", "down"]},
                "instance": {"type": "string"},
                "failing": {"type": "array", "items": {"type": "string"}},
                "checks": {"type": "object", "additionalProperties": {"type": "string"}},
            },
        },
    }


def _component_schemas(bounds: Bounds) -> dict[str, Schema]:
    c = _Components()
    for request_model in (CreateBroadcastRequest, CsvBroadcastForm, UserBody, UserImport, dlt_api.ArmDrillRequest):
        c.model(request_model)
    for response_model in (BroadcastOut, CsvBroadcastOut, BroadcastPage, StatsOut, DeliveryPage, UserOut, ImportOut):
        c.model(response_model, "serialization")
    c.add("Problem", _problem_schema())
    c.add("ServerSentEvent", _event_schema())
    for name, schema in {**_dead_letter_schemas(), **_user_schemas(), **_health_schemas()}.items():
        c.add(name, schema)
    _with_service_rules(c.schemas, bounds)
    form = c.schemas["CsvBroadcastForm"]
    fields = {name: _not_null(field) for name, field in form["properties"].items()}  # a form has no null: omit it
    c.add(
        "CsvUpload",
        {
            **form,
            "title": "CsvUpload",
            "description": "The multipart form: the `file` part holding the CSV, and the broadcast's fields.",
            "properties": {"file": {"type": "string", "format": "binary", "contentMediaType": "text/csv"}} | fields,
            "required": ["file", *form["required"]],
        },
    )
    return c.schemas


def _with_service_rules(schemas: dict[str, Schema], bounds: Bounds) -> None:
    """What the service checks beyond the request models: the settings' bounds, non-blank content without NUL,
    user ids without surrounding spaces (the models keep only the fixed rules of the wire format)."""
    for name in ("CreateBroadcastRequest", "CsvBroadcastForm"):
        fields = schemas[name]["properties"]
        fields["content"].update(
            minLength=1,
            maxLength=bounds.max_content_chars,
            pattern=CONTENT_PATTERN,
            description="kept exactly as sent (never trimmed); empty or whitespace-only is a 400",
        )
        fields["category"]["anyOf"][0].update(maxLength=bounds.max_category_chars, pattern=NO_NUL_PATTERN)
    schemas["CsvBroadcastForm"]["properties"]["targetType"] = {
        "type": "string",
        "enum": [TargetType.SELECTED.value],
        "default": TargetType.SELECTED.value,
        "description": "the recipients are the file's user ids: SELECTED only (ALL and ROLE are a 400)",
    }
    create = schemas["CreateBroadcastRequest"]
    target_ids = create["properties"]["targetIds"]
    target_ids["maxItems"] = bounds.max_json_target_ids
    target_ids["items"]["maxLength"] = bounds.max_user_id_chars
    create["allOf"] = _audience_rules()
    schemas["UserImport"]["properties"]["id"].update(_user_id_schema(bounds))
    schemas["ArmDrillRequest"]["properties"]["expiresInSeconds"]["maximum"] = bounds.max_drill_seconds


def _audience_rules() -> list[Schema]:
    """What `targetIds` must hold for each `targetType`: none for ALL, at least one id for SELECTED and ROLE,
    user ids (as sent: never trimmed) for SELECTED and role names for ROLE."""

    def when(*types: TargetType) -> Schema:
        return {"properties": {"targetType": {"enum": [t.value for t in types]}}}

    def ids(rule: Schema) -> Schema:
        return {"properties": {"targetIds": rule}}

    return [
        {"if": when(TargetType.ALL), "then": ids({"maxItems": 0})},
        {"if": when(TargetType.SELECTED, TargetType.ROLE), "then": {"required": ["targetIds"], **ids({"minItems": 1})}},
        {"if": when(TargetType.SELECTED), "then": ids({"items": {"minLength": 1, "pattern": USER_ID_PATTERN}})},
        {"if": when(TargetType.ROLE), "then": ids({"items": {"pattern": ROLE_PATTERN}})},
    ]


def _user_id_schema(bounds: Bounds) -> Schema:
    return {"type": "string", "minLength": 1, "maxLength": bounds.max_user_id_chars, "pattern": USER_ID_PATTERN}


def _not_null(schema: Schema) -> Schema:
    variants = [v for v in schema.get("anyOf", []) if v != {"type": "null"}]
    if len(variants) != 1:
        return schema
    return {**{k: v for k, v in schema.items() if k not in ("anyOf", "default")}, **variants[0]}


# --------------------------------------------------------------------------- operations
PURGED: Schema = {  # a purge's answer (dead letters and dead outbox rows)
    "type": "object",
    "required": ["id", "purged"],
    "properties": {"id": {"type": "integer"}, "purged": {"const": True}},
}
DISARMED: Schema = {
    "type": "object",
    "required": ["id", "disarmed"],
    "properties": {"id": {"type": "integer"}, "disarmed": {"const": True}},
}
_PROBLEMS = {
    400: "Invalid request: a parameter, header or the body breaks a rule (field errors in `errors`)",
    401: "No valid bearer token (or SSE ticket) was presented (`WWW-Authenticate: Bearer`)",
    403: (
        "The token lacks the admin role (admin routes), or a browser sent this state-changing request from an "
        "origin that is neither this server's nor allowed (`SERVER__CORS_ORIGINS`)"
    ),
    404: "Not found",
    409: "Conflict with the current state",
    413: "The body exceeds the configured limit",
    405: "The path names another resource, which does not take this method (`Allow` lists the ones it does)",
    415: "Unsupported media type",
    422: "The request is understood but cannot be carried out",
    429: "Too many stream connections or tickets in a short time; retry after `Retry-After` seconds",
    503: "A dependency (database, Kafka, Redis) cannot serve now; retry after `Retry-After` seconds",
}


def _problem(status: int) -> Schema:
    response: Schema = {"description": _PROBLEMS[status], "content": {PROBLEM: {"schema": ref("Problem")}}}
    if status == 401:
        response["headers"] = {"WWW-Authenticate": {"schema": {"type": "string"}}}
    if status in (429, 503):
        response["headers"] = {"Retry-After": {"schema": {"type": "integer"}}}
    return response


def _ok(schema: Schema, description: str = "OK", headers: dict[str, Schema] | None = None) -> Schema:
    response: Schema = {"description": description, "content": {JSON: {"schema": schema}}}
    if headers:
        response["headers"] = {name: {"schema": s} for name, s in headers.items()}
    return response


def _operation(
    operation_id: str,
    summary: str,
    tag: str,
    responses: dict[int, Schema],
    problems: tuple[int, ...] = (),
    *,
    parameters: list[Schema] | None = None,
    body: Schema | None = None,
    secured: bool = True,
) -> Schema:
    """One operation; a secured one answers 401 and every operation that reads a store may answer 503."""
    all_problems = set(problems)
    if secured:
        all_problems |= {401, 503}
        if parameters or body is not None:
            all_problems.add(400)
    if body is not None:
        all_problems |= {413, 415}  # every body is capped before it is read, and has one media type
    out: Schema = {"operationId": operation_id, "summary": summary, "tags": [tag]}
    if parameters:
        out["parameters"] = parameters
    if body is not None:
        out["requestBody"] = body
    out["responses"] = {
        str(status): response
        for status, response in sorted({**responses, **{p: _problem(p) for p in all_problems}}.items())
    }
    out["security"] = [{SECURITY_SCHEME: []}] if secured else []
    return out


def _param(name: str, where: str, schema: Schema, description: str) -> Schema:
    return {"name": name, "in": where, "required": where == "path", "description": description, "schema": schema}


def _json_body(schema: Schema, description: str, *examples: Any) -> Schema:
    media: Schema = {"schema": schema}
    if examples:
        media["examples"] = {f"example{i}": {"value": value} for i, value in enumerate(examples, 1)}
    return {"required": True, "description": description, "content": {JSON: media}}


def _page_params(bounds: Bounds, cursor: Schema) -> list[Schema]:
    return [
        _param("cursor", "query", cursor, "`nextCursor` of the previous page"),
        _param(
            "limit",
            "query",
            {"type": "integer", "minimum": 1, "maximum": bounds.max_page_size, "default": admin_api.DEFAULT_PAGE_SIZE},
            "page size",
        ),
    ]


def _token_header(name: str, description: str) -> Schema:
    token = {"type": "string", "minLength": 1, "maxLength": admin_api.MAX_TOKEN_CHARS, "pattern": "^[ -~]+$"}
    return _param(name, "header", token, description)


def _broadcast_paths(bounds: Bounds) -> dict[str, Schema]:
    prefix = admin_api.PREFIX
    broadcast_id = _param(
        "id", "path", {"type": "string", "format": "uuid"}, "broadcast id (anything but a UUID names none: 404)"
    )
    tokens = [
        _token_header("Idempotency-Key", "a replay with the same key and request returns the first result (200)"),
        _param(
            "X-Correlation-ID",
            "header",
            {"type": "string"},
            "kept when 1-200 printable ASCII characters and carried through to the events; absent or any other "
            "value: replaced by a new id, never refused (every route; the id used is echoed in X-Correlation-ID)",
        ),
    ]
    created_headers = {"Location": {"type": "string"}, "X-Correlation-ID": {"type": "string"}}
    replayed_headers = {**created_headers, "Idempotent-Replayed": {"const": "true"}}
    status = _param(
        "status",
        "query",
        {"type": "string", "enum": [s.value for s in BroadcastStatus]},
        "only broadcasts in this status (case-insensitive)",
    )
    csv_body: Schema = {
        "required": True,
        "description": (
            f"`file`: a CSV of user ids, one per line (at most {bounds.max_csv_bytes} bytes), and the create "
            "request's fields as form fields: every one but `targetIds` (the file holds the ids); `targetType` may "
            "be given and must be SELECTED; `fireAndForget` is `true` or `false`; the same rules as the JSON create. "
            "For example a file `userId\\nalice\\nbob\\n` and a field `content`."
        ),
        "content": {
            "multipart/form-data": {
                "schema": ref("CsvUpload"),
                # no `examples`: schemathesis 4.32 labels a multipart example whose file it sends as bytes a
                # negative body, and then expects the server to refuse the document's own example
                "encoding": {"file": {"contentType": "text/csv"}},
            }
        },
    }
    tag = "broadcasts"
    return {
        prefix: {
            "post": _operation(
                "createBroadcast",
                "Create a broadcast",
                tag,
                {
                    201: _ok(ref("BroadcastOut"), "Created", created_headers),
                    200: _ok(ref("BroadcastOut"), "An idempotent replay of an earlier request", replayed_headers),
                },
                (409, 413, 415),
                parameters=tokens,
                body=_json_body(
                    ref("CreateBroadcastRequest"),
                    "the broadcast to create",
                    {"content": "Maintenance tonight at 22:00 UTC", "targetType": "ALL", "priority": "HIGH"},
                    {"content": "Your report is ready", "targetType": "SELECTED", "targetIds": ["alice", "bob"]},
                    {"content": "Deploy freeze", "targetType": "ROLE", "targetIds": ["ops"], "category": "ops"},
                ),
            ),
            "get": _operation(
                "listBroadcasts",
                "List broadcasts, newest first",
                tag,
                {200: _ok(ref("BroadcastPage"))},
                parameters=[status, *_page_params(bounds, {"type": "string", "maxLength": admin_api.MAX_CURSOR_CHARS})],
            ),
        },
        f"{prefix}/csv": {
            "post": _operation(
                "uploadBroadcast",
                "Create a broadcast to the user ids of an uploaded CSV",
                tag,
                {
                    201: _ok(ref("CsvBroadcastOut"), "Created", created_headers),
                    200: _ok(ref("CsvBroadcastOut"), "An idempotent replay of an earlier request", replayed_headers),
                },
                (409, 413, 415),
                parameters=tokens,
                body=csv_body,
            ),
        },
        f"{prefix}/{{id}}": {
            "parameters": [broadcast_id],
            "get": _operation("getBroadcast", "One broadcast", tag, {200: _ok(ref("BroadcastOut"))}, (404,)),
            "delete": _operation(
                "cancelBroadcast",
                "Cancel a scheduled or active broadcast",
                tag,
                {200: _ok(ref("BroadcastOut"), "Cancelled")},
                (404, 409),
            ),
        },
        f"{prefix}/{{id}}/stats": {
            "parameters": [broadcast_id],
            "get": _operation("broadcastStats", "Delivery and read counts", tag, {200: _ok(ref("StatsOut"))}, (404,)),
        },
        f"{prefix}/{{id}}/deliveries": {
            "parameters": [broadcast_id],
            "get": _operation(
                "broadcastDeliveries",
                "Per-user delivery states (of an ALL/ROLE broadcast: its readers)",
                tag,
                {200: _ok(ref("DeliveryPage"))},
                (404,),
                parameters=_page_params(bounds, {"type": "string", "maxLength": admin_api.MAX_CURSOR_CHARS}),
            ),
        },
    }


def _user_paths(bounds: Bounds) -> dict[str, Schema]:
    prefix = admin_users_api.PREFIX
    user_id = _param(
        "id",
        "path",
        {**_user_id_schema(bounds), "not": {"const": admin_users_api.BULK}},
        f"user id: printable, without surrounding spaces (`{admin_users_api.BULK}` names the import route)",
    )
    tag = "users"
    bulk: Schema = {"type": "array", "items": ref("UserImport"), "maxItems": bounds.max_bulk_users}
    return {
        f"{prefix}/{admin_users_api.BULK}": {
            "post": _operation(
                "importUsers",
                "Upsert many users (a repeated id: the last entry wins)",
                tag,
                {200: _ok(ref("ImportOut"))},
                (413, 415),
                body=_json_body(
                    bulk,
                    "the users to insert or replace",
                    [{"id": "alice", "displayName": "Alice", "roles": ["ops"]}, {"id": "bob"}],
                ),
            ),
        },
        f"{prefix}/{{id}}": {
            "parameters": [user_id],
            "put": _operation(
                "putUser",
                "Replace one user's display name and roles",
                tag,
                {200: _ok(ref("UserOut"))},
                (405, 413, 415),  # 405: `bulk` is the bulk import's path
                body=_json_body(
                    ref("UserBody"),
                    "the user's display name and full set of roles",
                    {"displayName": "Alice", "roles": ["ops"]},
                ),
            ),
            "get": _operation("getUser", "One user", tag, {200: _ok(ref("UserOut"))}, (404, 405)),
        },
    }


def _dead_outbox_paths(bounds: Bounds) -> dict[str, Schema]:
    prefix, tag = admin_outbox_api.PREFIX, "outbox"
    number = {"type": "integer", "minimum": 0, "maximum": MAX_ID}
    dead_id = _param("dead_id", "path", number, "dead outbox row id (anything else names none: 404)")
    return {
        prefix: {
            "get": _operation(
                "listDeadOutboxRows",
                "Outbox rows the event log refused for good, newest first (unknown query parameters are refused)",
                tag,
                {200: _ok(ref("DeadOutboxPage"))},
                parameters=_page_params(bounds, number),
            ),
        },
        f"{prefix}/{{dead_id}}/redrive": {
            "parameters": [dead_id],
            "post": _operation(
                "redriveDeadOutboxRow",
                "Put the row back at the end of its lane, attempts reset (fix the cause first)",
                tag,
                {
                    200: _ok(
                        {
                            "type": "object",
                            "required": ["id", "outboxId"],
                            "properties": {"id": {"type": "integer"}, "outboxId": {"type": "integer"}},
                        }
                    )
                },
                (404,),
            ),
        },
        f"{prefix}/{{dead_id}}": {
            "parameters": [dead_id],
            "delete": _operation(
                "purgeDeadOutboxRow",
                "Delete the row: its event is never published",
                tag,
                {200: _ok(PURGED)},
                (404,),
            ),
        },
    }


def _dead_letter_paths(bounds: Bounds) -> dict[str, Schema]:
    prefix = dlt_api.PREFIX
    text = {"type": "string", "maxLength": dlt_api.MAX_FILTER_CHARS, "pattern": PRINTABLE_PATTERN}
    filters = [
        _param("topic", "query", text, "original topic (the logical name works whatever the topic prefix)"),
        _param("exception", "query", text, "exception class (fully qualified)"),
        _param(
            "broadcastId",
            "query",
            {"type": "string", "maxLength": 36, "pattern": PRINTABLE_PATTERN},
            "the broadcast the record was about",
        ),
        _param("from", "query", {"type": "string", "format": "date-time"}, "received at or after"),
        _param("to", "query", {"type": "string", "format": "date-time"}, "received before (not after `from`: none)"),
        _param("status", "query", {"type": "string", "enum": [s.value for s in DeadLetterStatus]}, "letter status"),
    ]
    cursor = {"type": "integer", "minimum": 0, "maximum": MAX_ID}
    letter_id = _param("letter_id", "path", cursor, "dead letter id (anything else names none: 404)")
    tag = "dead letters"
    drill_tag = "fault drill"
    return {
        f"{prefix}/messages": {
            "get": _operation(
                "listDeadLetters",
                "Dead letters, newest first (unknown query parameters are refused)",
                tag,
                {200: _ok(ref("DeadLetterPage"))},
                parameters=[*filters, *_page_params(bounds, cursor)],
            ),
        },
        f"{prefix}/messages/{{letter_id}}": {
            "parameters": [letter_id],
            "get": _operation(
                "getDeadLetter",
                "One dead letter: payload, headers, stack trace, audit trail",
                tag,
                {200: _ok(ref("DeadLetter"))},
                (404,),
            ),
        },
        f"{prefix}/summary": {
            "get": _operation(
                "deadLetterSummary",
                "Counts by original topic and exception class",
                tag,
                {200: _ok(ref("DeadLetterCounts"))},
                parameters=filters,
            ),
        },
        f"{prefix}/redrive-all": {
            "post": _operation(
                "redriveAllDeadLetters",
                "Put every matching NEW letter back on its topic",
                tag,
                {200: _ok(ref("BulkResult"))},
                parameters=filters,
            ),
        },
        f"{prefix}/redrive/{{letter_id}}": {
            "parameters": [letter_id],
            "post": _operation(
                "redriveDeadLetter",
                "Put one letter back on its topic",
                tag,
                {
                    200: _ok(
                        {
                            "type": "object",
                            "required": ["id", "status", "alreadyRedriven"],
                            "properties": {
                                "id": {"type": "integer"},
                                "status": {"const": DeadLetterStatus.REDRIVEN.value},
                                "alreadyRedriven": {"type": "boolean"},
                            },
                        }
                    )
                },
                (404, 422),
            ),
        },
        f"{prefix}/purge-all": {
            "delete": _operation(
                "purgeAllDeadLetters",
                "Delete every matching letter",
                tag,
                {200: _ok(ref("BulkResult"))},
                parameters=filters,
            ),
        },
        f"{prefix}/purge/{{letter_id}}": {
            "parameters": [letter_id],
            "delete": _operation(
                "purgeDeadLetter",
                "Delete one letter",
                tag,
                {200: _ok(PURGED)},
                (404,),
            ),
        },
        dlt_api.DRILL_PATH: {
            "post": _operation(
                "armDrill",
                "Arm the fault drill: the next (or the named) broadcast's consumption fails (404 when disabled)",
                drill_tag,
                {201: _ok(ref("Drill"), "Armed")},
                (404, 413, 415),
                body=_json_body(ref("ArmDrillRequest"), "which broadcast, and for how long", {"expiresInSeconds": 60}),
            ),
            "get": _operation(
                "armedDrills",
                "The armed drills (404 when the drill is disabled)",
                drill_tag,
                {200: _ok(ref("ArmedDrills"))},
                (404,),
            ),
        },
        f"{dlt_api.DRILL_PATH}/{{drill_id}}": {
            "parameters": [_param("drill_id", "path", cursor, "drill id (anything else names none: 404)")],
            "delete": _operation(
                "disarmDrill",
                "Disarm a drill now (404 when it is not armed, or the drill is disabled); consumers that saw it "
                "may fail its broadcast's first-time records for up to 5 s more, never a later redrive",
                drill_tag,
                {200: _ok(DISARMED)},
                (404,),
            ),
        },
    }


def _sse_paths() -> dict[str, Schema]:
    tag = "user"
    stream: Schema = {
        "description": (
            "The stream: CONNECTED, the missed messages, then live MESSAGE/READ/... events and heartbeats; "
            "CONNECTION_LIMIT_REACHED (and the stream ends) when the user has too many"
        ),
        "content": {EVENT_STREAM: {"schema": ref("ServerSentEvent")}},
    }
    event_id: Schema = {"type": "string", "maxLength": MAX_EVENT_ID_CHARS, "pattern": EVENT_ID_PATTERN}
    return {
        "/api/user/sse/connect": {
            "get": _operation(
                "connect",
                "The signed-in user's Server-Sent Events stream",
                tag,
                {200: stream},
                (429,),
                parameters=[
                    _param(
                        "Last-Event-ID",
                        "header",
                        {"type": "string"},
                        "resume after this event id; any value the server cannot resume from (what a browser's "
                        "EventSource sends back is whatever id it last saw) is answered with RESYNC, not refused",
                    ),
                    _param(
                        "lastEventId",
                        "query",
                        event_id,
                        "as `Last-Event-ID`, for an EventSource's first connect; not an event id: 400",
                    ),
                    _param(
                        "ticket",
                        "query",
                        {"type": "string"},
                        "a single-use ticket from `POST /api/user/sse/ticket`, instead of the bearer header (which"
                        " wins when both are sent); any other value: 401",
                    ),
                ],
            ),
        },
        "/api/user/sse/ticket": {
            "post": _operation(
                "sseTicket",
                "A single-use, short-lived ticket for opening the stream with EventSource",
                tag,
                {201: _ok(ref("SseTicket"), "Issued")},
                (429,),
            ),
        },
        USER_MESSAGES: {
            "get": _operation(
                "inbox",
                "The signed-in user's messages, newest first",
                tag,
                {200: _ok(ref("Inbox"))},
                parameters=[
                    _param("cursor", "query", {"type": "string"}, "`nextCursor` of the previous page"),
                    _param(
                        "limit", "query", {"type": "integer", "minimum": 1, "maximum": 500, "default": 50}, "page size"
                    ),
                ],
            ),
        },
        f"{USER_MESSAGES}/unread": {
            "get": _operation("unread", "The signed-in user's unread messages", tag, {200: _ok(ref("Unread"))}),
        },
        f"{USER_MESSAGES}/read": {
            "post": _operation(
                "markRead",
                "Mark messages read (idempotent; other tabs get a READ event)",
                tag,
                {200: _ok(ref("MarkedRead"), "The ids read now (not those read before)")},
                body=_json_body(
                    ref("MarkReadRequest"),
                    "the broadcast ids to mark read",
                    {"broadcastIds": ["0b6e2f4e-8f0a-4d1c-9a51-3f1f5d2c7e90"]},
                ),
            ),
        },
    }


def _public_paths() -> dict[str, Schema]:
    tag = "operations"
    return {
        "/health/live": {
            "get": _operation("live", "The process answers", tag, {200: _ok(ref("Live"))}, secured=False),
        },
        "/health/ready": {
            "get": _operation(
                "ready",
                "Every dependency answers in time",
                tag,
                {200: _ok(ref("Ready")), 503: _ok(ref("Ready"), "A dependency is failing (see `failing`)")},
                secured=False,
            ),
        },
        "/metrics": {
            "get": _operation(
                "metrics",
                "Prometheus metrics of this instance (needs the metrics bearer token when one is configured)",
                tag,
                {
                    200: {
                        "description": "Prometheus text format",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
                (401,),
                secured=False,
            ),
        },
        OPENAPI_PATH: {
            "get": _operation(
                "openapi", "This document", tag, {200: _ok({"type": "object"}, "OpenAPI 3.1")}, secured=False
            ),
        },
        web.DEV_TOKEN_PATH: {
            "post": _operation(
                "devToken",
                "Development sign-in: a token for any user and roles (404 unless the dev secret is in use)",
                "development",
                {200: _ok(ref("DevToken"))},
                (400, 404, 413, 415),
                body=_json_body(ref("DevTokenRequest"), "who to sign in as", {"sub": "alice", "roles": ["admin"]}),
                secured=False,
            ),
        },
        web.DEV_STATUS_PATH: {
            "get": _operation(
                "devStatus",
                "Whether development sign-in is on",
                "development",
                {200: _ok({"type": "object", "properties": {"devSignIn": {"type": "boolean"}}})},
                secured=False,
            ),
        },
    }


def _admin_only(paths: dict[str, Schema]) -> dict[str, Schema]:
    """Every operation under ``/api/admin/`` may also answer 403 (a token without the admin role), and so may
    every state-changing one (``http_security.CrossOriginGuard``: a browser's request from a foreign origin)."""
    for path, item in paths.items():
        for method, operation in item.items():
            if not (isinstance(operation, dict) and "responses" in operation):
                continue
            if path.startswith("/api/admin/") or method.upper() not in SAFE_METHODS:
                operation["responses"]["403"] = _problem(403)
                operation["responses"] = dict(sorted(operation["responses"].items()))
    return paths


def build_document(bounds: Bounds) -> dict[str, Any]:
    """The OpenAPI document of the app for a server with these bounds."""
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "Broadcast messaging server",
            "version": "0.1.0",
            "description": (
                "Admin broadcasts fanned out through Kafka to Server-Sent Event streams. Every error is "
                "application/problem+json (RFC 9457); a method a path does not take is a 405 whose `Allow` "
                "header lists the methods it does take. Every answer carries the request's correlation id in "
                "`X-Correlation-ID`: the caller's when it is 1-200 printable ASCII characters, else a new one (an "
                "invalid one is replaced, never refused). Every timestamp in an answer or a stream event is "
                "RFC 3339 in UTC with six fractional digits and a `Z` (`2030-01-01T10:00:00.000000Z`)."
            ),
        },
        "paths": _admin_only(
            {
                **_public_paths(),
                **_broadcast_paths(bounds),
                **_user_paths(bounds),
                **_dead_letter_paths(bounds),
                **_dead_outbox_paths(bounds),
                **_sse_paths(),
            }
        ),
        "components": {
            "schemas": _component_schemas(bounds),
            "securitySchemes": {SECURITY_SCHEME: {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}},
        },
        "security": [{SECURITY_SCHEME: []}],
    }


@lru_cache(maxsize=8)
def _encoded(bounds: Bounds) -> bytes:
    return orjson.dumps(build_document(bounds))


async def openapi_json(request: Request) -> Response:
    """The document, built on the first request and cached (it depends only on the settings)."""
    body = _encoded(Bounds.of(admin_context(request).settings))
    return Response(body, media_type=JSON)


routes: list[BaseRoute] = [Route(OPENAPI_PATH, openapi_json, methods=["GET"])]
