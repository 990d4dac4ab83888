"""The two pages (admin console, user inbox), their static assets, and the development sign-in.

Pages are static HTML with dependency-free JavaScript (no build step). They get a CSP of their own that
allows only same-origin scripts, styles and connections (no inline code), and they render every message
as text. ``POST /dev/token`` mints a token for a chosen user and roles, and exists only while the
development secret is in use (404 otherwise): it is how the embedded default is tried in a browser.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints
from starlette.requests import Request
from starlette.responses import FileResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from broadcast.admin.context import admin_context
from broadcast.auth.tokens import mint
from broadcast.core.domain import USER_ID_PATTERN
from broadcast.core.schemas import ROLE_PATTERN
from broadcast.errors import NotFoundError
from broadcast.http.body import json_data, read_model

HERE = Path(__file__).parent
PAGE_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
    "base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
PAGE_HEADERS = {"Content-Security-Policy": PAGE_CSP, "Cache-Control": "no-cache"}
DEV_TOKEN_PATH = "/dev/token"  # noqa: S105 - a path
DEV_STATUS_PATH = "/dev/status"
DEV_TOKEN_TTL_S = 8 * 3_600
PAGE_PATHS = frozenset({"/", "/admin", "/inbox"})  # HTML, not API: outside the OpenAPI document


class DevTokenRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sub: Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=USER_ID_PATTERN)]
    roles: list[Annotated[str, StringConstraints(pattern=ROLE_PATTERN)]] = Field(default_factory=list, max_length=20)


def _page(name: str) -> FileResponse:
    return FileResponse(HERE / "pages" / name, media_type="text/html; charset=utf-8", headers=PAGE_HEADERS)


async def admin_page(request: Request) -> Response:
    return _page("admin.html")


async def inbox_page(request: Request) -> Response:
    return _page("inbox.html")


async def home(request: Request) -> Response:
    return RedirectResponse("/inbox", status_code=302)


async def dev_token(request: Request) -> Response:
    settings = admin_context(request).settings
    if not settings.auth.dev_secret_in_use:
        raise NotFoundError("development sign-in is off (a real token issuer is configured)")
    body = await read_model(request, DevTokenRequest, settings.limits.max_body_bytes)
    token = mint(settings.auth, body.sub, body.roles, DEV_TOKEN_TTL_S)
    answer = {"token": token, "sub": body.sub, "roles": body.roles, "expiresInSeconds": DEV_TOKEN_TTL_S}
    return json_data(answer, headers={"Cache-Control": "no-store"})


async def dev_status(request: Request) -> Response:
    enabled = admin_context(request).settings.auth.dev_secret_in_use
    return json_data({"devSignIn": enabled})


routes: list[BaseRoute] = [
    Route("/", home, methods=["GET"]),
    Route("/admin", admin_page, methods=["GET"]),
    Route("/inbox", inbox_page, methods=["GET"]),
    Route(DEV_TOKEN_PATH, dev_token, methods=["POST"]),
    Route(DEV_STATUS_PATH, dev_status, methods=["GET"]),
    Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
]
