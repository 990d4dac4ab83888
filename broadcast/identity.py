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


async def acting_admin(request: Request) -> str:
    """The acting admin's user id, or a 401 problem (``WWW-Authenticate: Bearer``) when nobody is signed in."""
    user = request.headers.get(DEV_USER_HEADER)
    if user is None or not 1 <= len(user) <= MAX_USER_CHARS or not user.isprintable() or not user.strip():
        raise HttpProblem(
            401,
            "Unauthorized",
            f"sign in as an admin (development: send the {DEV_USER_HEADER} header, 1-{MAX_USER_CHARS} printable "
            "characters)",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return user
