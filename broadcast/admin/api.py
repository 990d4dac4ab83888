"""Admin HTTP API for broadcasts: create (JSON or CSV upload), list, get, cancel, stats, deliveries.

Every route first asks ``identity.acting_admin`` who is acting, then reads its input through the bounded
readers of ``broadcast.http.body`` and calls only the ``Lifecycle`` service. Errors are raised (``broadcast.errors`` or
``HttpProblem``) and rendered as problem+json by ``broadcast.http.problems``; nothing is written unless the whole
request is valid. User management lives in ``users_api`` and is mounted with these routes.
"""

from __future__ import annotations

import re
from contextlib import aclosing

import orjson
from starlette.datastructures import FormData, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from broadcast.admin import users_api as admin_users_api
from broadcast.admin.context import admin_context
from broadcast.core.domain import Broadcast, BroadcastStatus, NewBroadcast, TargetType
from broadcast.core.schemas import (
    ROLE_PATTERN,
    BroadcastOut,
    BroadcastPage,
    CreateBroadcastRequest,
    CsvBroadcastForm,
    CsvBroadcastOut,
    DeliveryOut,
    DeliveryPage,
    RecipientsOut,
    StatsOut,
)
from broadcast.core.settings import LimitsSettings
from broadcast.errors import ValidationError
from broadcast.http.body import bounded_stream, json_response, known_query, media_type, read_model, too_large, validated
from broadcast.http.identity import acting_admin
from broadcast.http.observe import correlation_id, printable_token
from broadcast.http.problems import HttpProblem
from broadcast.lifecycle import csv_upload

PREFIX = "/api/admin/broadcasts"
CSV_PATH = f"{PREFIX}/csv"
DEFAULT_PAGE_SIZE = 50
MAX_TOKEN_CHARS = 200
MAX_CURSOR_CHARS = 512
CSV_FORM_FIELDS = 10
_ROLE = re.compile(ROLE_PATTERN)


def _request_tokens(request: Request) -> tuple[str | None, str]:
    """The Idempotency-Key (if any; checked before the body, a malformed one is a 400: it decides what is
    written) and the request's correlation id (``Correlation`` kept a valid one and replaced any other)."""
    return _idempotency_key(request), correlation_id(request.scope)


def _idempotency_key(request: Request) -> str | None:
    """The Idempotency-Key: 1-200 printable ASCII characters, or 400."""
    value = request.headers.get("Idempotency-Key")
    if value is None:
        return None
    if not printable_token(value, MAX_TOKEN_CHARS):
        raise ValidationError(f"Idempotency-Key must be 1-{MAX_TOKEN_CHARS} printable ASCII characters")
    return value


def _broadcast_id(request: Request) -> str:
    """The ``{id}`` path parameter as a canonical UUID: the routes match UUIDs only (``{id:uuid}``), so a path
    naming anything else (``csv`` included) is a 404, or a 405 where another route has that path."""
    return str(request.path_params["id"])


def _page_params(request: Request) -> tuple[str | None, int]:
    cursor = request.query_params.get("cursor") or None
    if cursor is not None and len(cursor) > MAX_CURSOR_CHARS:
        raise ValidationError("invalid cursor")
    raw = request.query_params.get("limit")
    if raw is None or raw == "":
        return cursor, DEFAULT_PAGE_SIZE
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 9:
        raise ValidationError("limit must be a positive integer")
    return cursor, int(raw)


async def _create(
    request: Request,
    new: NewBroadcast,
    sender: str,
    tokens: tuple[str | None, str],
    recipients: csv_upload.Recipients | None = None,
) -> Response:
    """Create through the lifecycle; 201 + Location, or 200 + ``Idempotent-Replayed`` for a replay."""
    key, correlation_id = tokens
    broadcast, created = await admin_context(request).lifecycle.create(
        new,
        sender_id=sender,
        recipients=recipients.ids if recipients is not None else None,
        idempotency_key=key,
        correlation_id=correlation_id,
    )
    headers = {"Location": f"{PREFIX}/{broadcast.id}", "X-Correlation-ID": correlation_id}
    if created:
        admin_context(request).metrics.broadcasts_created.labels(broadcast.target_type.value).inc()
    else:
        headers["Idempotent-Replayed"] = "true"
    return json_response(_out(broadcast, recipients), 201 if created else 200, headers)


def _out(broadcast: Broadcast, recipients: csv_upload.Recipients | None) -> BroadcastOut:
    out = BroadcastOut.of(broadcast)
    if recipients is None:
        return out
    counts = RecipientsOut(accepted=recipients.accepted, duplicates=recipients.duplicates)
    return CsvBroadcastOut.model_validate({**out.model_dump(), "recipients": counts})


# --------------------------------------------------------------------------- create
async def create_broadcast(request: Request) -> Response:
    sender = await acting_admin(request)
    tokens = _request_tokens(request)
    body = await read_model(request, CreateBroadcastRequest, admin_context(request).settings.limits.max_body_bytes)
    if body.target_type is TargetType.ROLE:
        bad = [r for r in body.target_ids if not _ROLE.fullmatch(r)]
        if bad:
            raise ValidationError(f"invalid role name {bad[0][:64]!r}: 1-64 characters of A-Z a-z 0-9 _ . : -")
    return await _create(request, body.to_domain(), sender, tokens)


async def upload_broadcast(request: Request) -> Response:
    """CSV upload: the multipart body is streamed (bounded) to a spooled file, then read line by line."""
    sender = await acting_admin(request)
    tokens = _request_tokens(request)
    limits = admin_context(request).settings.limits
    if media_type(request) != "multipart/form-data":
        raise HttpProblem(415, "Unsupported media type", "send multipart/form-data with a `file` part")
    form = await _read_form(request, limits)
    try:
        upload, fields = _split_form(form)
        new = validated(CsvBroadcastForm, _form_document(fields)).to_domain()
        if upload.size is not None and upload.size > limits.max_csv_bytes:
            raise too_large(limits.max_csv_bytes, "CSV file")
        recipients = await _read_csv(upload, limits)
    finally:
        await form.close()
    if not recipients.ids:
        raise ValidationError("the CSV holds no recipient ids")
    return await _create(request, new, sender, tokens, recipients)


async def _read_form(request: Request, limits: LimitsSettings) -> FormData:
    # Same parser as ``request.form(max_files=1, ...)``, fed from a byte-counting stream so that an
    # oversized upload is refused while it arrives instead of being spooled to disk in full.
    try:
        async with aclosing(bounded_stream(request, csv_body_limit(limits))) as stream:
            parser = MultiPartParser(
                request.headers, stream, max_files=1, max_fields=CSV_FORM_FIELDS, max_part_size=limits.max_body_bytes
            )
            return await parser.parse()
    except MultiPartException as exc:
        raise HttpProblem(400, "Invalid request", f"malformed multipart body: {exc.message}") from None


def csv_body_limit(limits: LimitsSettings) -> int:
    """The largest multipart body of a CSV upload: the file plus the form fields."""
    return limits.max_csv_bytes + limits.max_body_bytes


def _split_form(form: FormData) -> tuple[UploadFile, dict[str, str]]:
    upload: UploadFile | None = None
    fields: dict[str, str] = {}
    for name, value in form.multi_items():
        if name == "file" and isinstance(value, UploadFile):
            upload = value
        elif isinstance(value, UploadFile):
            raise ValidationError(f"unexpected file part {name[:64]!r}; send the CSV as `file`")
        elif name in fields:
            raise ValidationError(f"form field {name[:64]!r} appears more than once")
        elif value != "" or name == "content":  # an empty optional field means "not given"
            fields[name] = value
    if upload is None:
        raise ValidationError("missing the `file` part holding the CSV of recipient ids")
    return upload, fields


def _form_document(fields: dict[str, str]) -> bytes:
    """The form fields as the JSON document the create request would be: each field is the string it is in
    JSON, but for ``fireAndForget``, which must be ``true`` or ``false``. Validated by the same strict rules."""
    document: dict[str, object] = dict(fields)
    flag = fields.get("fireAndForget")
    if flag is not None:
        if flag not in ("true", "false"):
            error = {"field": "fireAndForget", "message": "must be true or false"}
            raise HttpProblem(400, "Invalid request", "the request does not match the expected schema", errors=[error])
        document["fireAndForget"] = flag == "true"
    return orjson.dumps(document)


async def _read_csv(upload: UploadFile, limits: LimitsSettings) -> csv_upload.Recipients:
    upload.file.seek(0)
    try:
        return await csv_upload.read_recipients(
            upload.file, max_rows=limits.max_csv_rows, max_id_chars=limits.max_user_id_chars
        )
    except csv_upload.CsvTooManyRows as exc:
        raise HttpProblem(413, "Content too large", str(exc)) from None
    except csv_upload.CsvRejected as exc:
        raise HttpProblem(
            400,
            "Invalid request",
            str(exc),
            errors=[{"line": e.line, "error": e.error} for e in exc.errors],
            invalidLines=exc.invalid_lines,
        ) from None


# --------------------------------------------------------------------------- queries and cancel
async def list_broadcasts(request: Request) -> Response:
    await acting_admin(request)
    known_query(request, "status", "cursor", "limit")
    raw_status = request.query_params.get("status")  # present but empty names no status: 400
    status: BroadcastStatus | None = None
    if raw_status is not None:
        try:
            status = BroadcastStatus(raw_status.upper())
        except ValueError:
            allowed = ", ".join(s.value for s in BroadcastStatus)
            raise ValidationError(f"status must be one of {allowed}") from None
    cursor, limit = _page_params(request)
    page = await admin_context(request).lifecycle.list_broadcasts(status, cursor, limit)
    return json_response(BroadcastPage(items=[BroadcastOut.of(b) for b in page.items], next_cursor=page.next_cursor))


async def get_broadcast(request: Request) -> Response:
    await acting_admin(request)
    return json_response(BroadcastOut.of(await admin_context(request).lifecycle.get(_broadcast_id(request))))


async def cancel_broadcast(request: Request) -> Response:
    await acting_admin(request)
    return json_response(BroadcastOut.of(await admin_context(request).lifecycle.cancel(_broadcast_id(request))))


async def broadcast_stats(request: Request) -> Response:
    await acting_admin(request)
    return json_response(StatsOut.of(await admin_context(request).lifecycle.stats(_broadcast_id(request))))


async def broadcast_deliveries(request: Request) -> Response:
    await acting_admin(request)
    broadcast_id = _broadcast_id(request)
    known_query(request, "cursor", "limit")
    cursor, limit = _page_params(request)
    page = await admin_context(request).lifecycle.deliveries(broadcast_id, cursor, limit)
    return json_response(DeliveryPage(items=[DeliveryOut.of(d) for d in page.items], next_cursor=page.next_cursor))


routes: list[BaseRoute] = [
    Route(PREFIX, create_broadcast, methods=["POST"]),
    Route(PREFIX, list_broadcasts, methods=["GET"]),
    Route(CSV_PATH, upload_broadcast, methods=["POST"]),
    Route(f"{PREFIX}/{{id:uuid}}", get_broadcast, methods=["GET"]),
    Route(f"{PREFIX}/{{id:uuid}}", cancel_broadcast, methods=["DELETE"]),
    Route(f"{PREFIX}/{{id:uuid}}/stats", broadcast_stats, methods=["GET"]),
    Route(f"{PREFIX}/{{id:uuid}}/deliveries", broadcast_deliveries, methods=["GET"]),
    *admin_users_api.routes,
]
