"""Admin HTTP API for users and their roles, so that ALL and ROLE audiences can be counted.

``PUT /api/admin/users/{id}`` replaces one user's display name and roles; ``POST /api/admin/users/bulk``
upserts up to ``limits.max_bulk_users`` at once (a repeated id: the last entry wins); ``GET`` reads one.
"""

from __future__ import annotations

from starlette.convertors import Convertor, register_url_convertor
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from broadcast.admin.context import admin_context
from broadcast.core.domain import User, is_user_id
from broadcast.core.schemas import ImportOut, UserBody, UserImport, UserOut
from broadcast.core.settings import LimitsSettings
from broadcast.errors import NotFoundError, ValidationError
from broadcast.http.body import json_response, read_json, read_model, validated
from broadcast.http.identity import acting_admin

PREFIX = "/api/admin/users"
BULK = "bulk"


class UserIdConvertor(Convertor[str]):
    """``{id:user_id}``: any path segment but ``bulk``, which names the import route. As in OpenAPI, the concrete
    path wins over the template, so ``GET``/``PUT`` on ``…/users/bulk`` are a 405 (``Allow: POST``)."""

    regex = f"(?!{BULK}$)[^/]+"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("user_id", UserIdConvertor())
# Rows per store call: keeps one INSERT well under PostgreSQL's 32,767 bind parameters.
UPSERT_CHUNK = 1_000


def _user_id(raw: str, limits: LimitsSettings) -> str:
    if not is_user_id(raw, limits.max_user_id_chars):
        raise ValidationError(
            f"user id must be 1-{limits.max_user_id_chars} printable characters without surrounding spaces"
        )
    return raw


async def put_user(request: Request) -> Response:
    await acting_admin(request)
    limits = admin_context(request).settings.limits
    user_id = _user_id(request.path_params["id"], limits)
    body = await read_model(request, UserBody, limits.max_body_bytes)
    user = body.to_domain(user_id)
    await admin_context(request).users.upsert([user])
    return json_response(UserOut.of(user))


async def import_users(request: Request) -> Response:
    await acting_admin(request)
    limits = admin_context(request).settings.limits
    document, data = await read_json(request, limits.max_body_bytes)
    if isinstance(data, list) and len(data) > limits.max_bulk_users:
        # a rule of the request, as `maxItems` in the document says (like targetIds); 413 is for bytes only
        raise ValidationError(f"at most {limits.max_bulk_users} users per bulk import")
    entries = validated(list[UserImport], document)
    by_id: dict[str, User] = {}
    for index, entry in enumerate(entries):
        try:
            user_id = _user_id(entry.id, limits)
        except ValidationError as exc:
            raise ValidationError(f"[{index}].id: {exc}") from None
        by_id.pop(user_id, None)  # the last entry of a repeated id wins, in its own position
        by_id[user_id] = entry.to_domain(user_id)
    users = list(by_id.values())
    store = admin_context(request).users
    for start in range(0, len(users), UPSERT_CHUNK):
        await store.upsert(users[start : start + UPSERT_CHUNK])
    return json_response(ImportOut(imported=len(users)))


async def get_user(request: Request) -> Response:
    await acting_admin(request)
    user_id: str = request.path_params["id"]
    limits = admin_context(request).settings.limits
    user = await admin_context(request).users.get(user_id) if is_user_id(user_id, limits.max_user_id_chars) else None
    if user is None:
        raise NotFoundError(f"user {user_id[:64]!r} does not exist")
    return json_response(UserOut.of(user))


routes: list[BaseRoute] = [
    Route(f"{PREFIX}/{BULK}", import_users, methods=["POST"]),
    Route(f"{PREFIX}/{{id:user_id}}", put_user, methods=["PUT"]),
    Route(f"{PREFIX}/{{id:user_id}}", get_user, methods=["GET"]),
]
