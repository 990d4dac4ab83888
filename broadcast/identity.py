"""Who is acting: the one function admin routes call first, until the security issue replaces it.

For now the development header ``X-Dev-User`` names the acting admin (1-128 printable characters); there
is no token check yet, so this must never be the only gate of a production deployment. The sender of a
broadcast always comes from here, never from the request body.
"""

from __future__ import annotations

from starlette.requests import Request

from broadcast.http_problems import HttpProblem

DEV_USER_HEADER = "X-Dev-User"
MAX_USER_CHARS = 128


DEV_USER_QUERY = "devUser"


async def acting_admin(request: Request) -> str:
    """The acting admin's user id, or a 401 problem (``WWW-Authenticate: Bearer``) when nobody is signed in."""
    return _dev_user(request.headers.get(DEV_USER_HEADER))


async def acting_user(request: Request) -> str:
    """The signed-in user (any role). ``EventSource`` cannot send headers, so in development only the
    ``devUser`` query parameter is accepted too; production never takes a user id from the URL."""
    user = request.headers.get(DEV_USER_HEADER)
    if user is None and request.app.state.components.settings.environment == "development":
        user = request.query_params.get(DEV_USER_QUERY)
    return _dev_user(user)


def _dev_user(user: str | None) -> str:
    if user is None or not 1 <= len(user) <= MAX_USER_CHARS or not user.isprintable() or not user.strip():
        raise HttpProblem(
            401,
            "Unauthorized",
            f"sign in as an admin (development: send the {DEV_USER_HEADER} header, 1-{MAX_USER_CHARS} printable "
            "characters)",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return user
