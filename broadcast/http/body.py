"""Bounded request bodies: the one way admin routes read JSON, and the byte counter the CSV upload uses.

A body is refused with 413 *before* it is buffered: first by its ``Content-Length``, then by counting the
bytes of ``request.stream()`` as they arrive (a chunked upload has no length to trust). JSON must come as
``application/json`` (or ``application/*+json``, 415 otherwise) and parse (400 otherwise). Request models are
validated from the JSON text in pydantic's strict mode: a value of the wrong JSON type (``"yes"`` for a
boolean, a number for a date-time, ``"60"`` for an integer) is refused, never coerced. Pydantic errors become
a 400 problem listing ``[{field, message}]`` without echoing the input.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Hashable
from functools import lru_cache
from typing import Any, TypeVar, cast

import orjson
import pydantic
from starlette.requests import Request
from starlette.responses import Response

from broadcast.core.schemas import CamelModel
from broadcast.errors import ValidationError
from broadcast.http.problems import HttpProblem

M = TypeVar("M")
MAX_REPORTED_ERRORS = 100
_MAX_MESSAGE_CHARS = 200


def too_large(limit: int, what: str = "request body") -> HttpProblem:
    return HttpProblem(413, "Content too large", f"the {what} exceeds {limit} bytes")


def declared_length(request: Request, limit: int) -> None:
    """Refuse (413) a request whose ``Content-Length`` already says it is over ``limit``; 400 if unreadable."""
    raw = request.headers.get("content-length")
    if raw is None:
        return
    if not (raw.isascii() and raw.isdigit()):
        raise HttpProblem(400, "Invalid request", "Content-Length is not a number")
    if int(raw) > limit:
        raise too_large(limit)


async def bounded_stream(request: Request, limit: int) -> AsyncGenerator[bytes, None]:
    """The request body chunk by chunk, raising 413 as soon as more than ``limit`` bytes arrived."""
    declared_length(request, limit)
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > limit:
            raise too_large(limit)
        yield chunk


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, never more than ``limit`` bytes of it held in memory."""
    chunks = [chunk async for chunk in bounded_stream(request, limit)]
    return b"".join(chunks)


MAX_ID = 2**63 - 1  # the largest id a BIGINT column holds


def id_number(raw: str, what: str) -> int:
    """``raw`` as a non-negative integer id (at most ``MAX_ID``), or a 400 naming ``what``."""
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 19 or int(raw) > MAX_ID:
        raise ValidationError(f"{what} must be a non-negative integer")
    return int(raw)


def known_query(request: Request, *known: str) -> None:
    """Refuse (400) a query parameter the route does not take (a misspelt filter must not read as none)."""
    if unknown := sorted(set(request.query_params) - set(known)):
        raise HttpProblem(400, "Invalid request", f"unknown query parameter(s): {', '.join(map(repr, unknown))[:200]}")


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


def _is_json(media: str) -> bool:
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


async def read_json(request: Request, limit: int) -> tuple[bytes, Any]:
    """A JSON body of at most ``limit`` bytes, as sent and parsed: 415 for another media type, 400 if it is
    not JSON."""
    media = media_type(request)
    if not _is_json(media):
        raise HttpProblem(415, "Unsupported media type", "send the body as application/json")
    body = await read_body(request, limit)
    if not body.strip():
        raise HttpProblem(400, "Invalid request", "the request body is empty; a JSON document is required")
    try:
        return body, orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise HttpProblem(400, "Invalid request", f"the body is not valid JSON: {exc.msg}") from None


def field_errors(exc: pydantic.ValidationError) -> list[dict[str, str]]:
    """``[{field, message}]`` for a pydantic error, first ``MAX_REPORTED_ERRORS`` only, input never echoed."""
    out: list[dict[str, str]] = []
    for error in exc.errors(include_url=False, include_input=False, include_context=False):
        field = ".".join(str(part) for part in error["loc"]) or "(body)"
        out.append({"field": field[:_MAX_MESSAGE_CHARS], "message": error["msg"][:_MAX_MESSAGE_CHARS]})
        if len(out) == MAX_REPORTED_ERRORS:
            break
    return out


@lru_cache(maxsize=64)
def _adapter(model: Any) -> pydantic.TypeAdapter[Any]:
    return pydantic.TypeAdapter(model)


def validated(model: type[M], document: bytes) -> M:
    """The JSON text ``document`` validated as ``model`` (a pydantic model or type) in strict mode, or a 400
    problem listing the field errors. Strict JSON validation takes date-times as strings only."""
    try:
        result: M = _adapter(cast(Hashable, model)).validate_json(document, strict=True)
        return result
    except pydantic.ValidationError as exc:
        raise HttpProblem(
            400, "Invalid request", "the request does not match the expected schema", errors=field_errors(exc)
        ) from None


async def read_model(request: Request, model: type[M], limit: int) -> M:
    """Read a bounded JSON body and validate it (strictly) as ``model``."""
    document, _ = await read_json(request, limit)
    return validated(model, document)


def json_response(model: CamelModel, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """``model`` serialized once (camelCase, ISO-8601 datetimes) as ``application/json``."""
    return Response(model.to_json(), status_code=status, media_type="application/json", headers=headers)


def json_data(body: object, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """Plain data (dicts, lists, strings) as ``application/json``, for answers without a wire model."""
    return Response(orjson.dumps(body), status_code=status, media_type="application/json", headers=headers)
