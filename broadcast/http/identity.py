"""Who is asking: the principal the ``AuthGate`` middleware put in the request scope.

Routes call ``acting_admin`` or ``acting_user`` first. The gate has already refused an unauthenticated
request under ``/api/`` (401) and a non-admin under ``/api/admin/`` (403); these functions repeat the
check so that a route mounted elsewhere by mistake still fails closed. The user id always comes from the
token's ``sub``, never from a parameter or a body.
"""

from __future__ import annotations

from starlette.requests import Request

from broadcast.core.domain import Principal
from broadcast.http.problems import HttpProblem

PRINCIPAL_SCOPE_KEY = "broadcast.principal"
VIA_TICKET_SCOPE_KEY = "broadcast.via_ticket"  # set when a stream was opened with an SSE ticket
REALM = 'Bearer realm="broadcast"'


def unauthorized(invalid_token: bool = False) -> HttpProblem:
    """The one 401 every authentication failure gets (no reason: the log has it)."""
    challenge = REALM + (', error="invalid_token"' if invalid_token else "")
    return HttpProblem(401, "Unauthorized", "a valid bearer token is required", headers={"WWW-Authenticate": challenge})


def forbidden() -> HttpProblem:
    return HttpProblem(
        403,
        "Forbidden",
        "this operation requires the admin role",
        headers={"WWW-Authenticate": REALM + ', error="insufficient_scope"'},
    )


def principal(request: Request) -> Principal:
    found = request.scope.get(PRINCIPAL_SCOPE_KEY)
    if not isinstance(found, Principal):
        raise unauthorized()
    return found


async def acting_admin(request: Request) -> str:
    """The acting admin's user id; 401 when nobody is signed in, 403 without the admin role."""
    who = principal(request)
    if request.app.state.admin_role not in who.roles:
        raise forbidden()
    return who.sub


def via_ticket(request: Request) -> bool:
    """Whether this request signed in with a single-use SSE ticket (already counted when it was issued)."""
    return bool(request.scope.get(VIA_TICKET_SCOPE_KEY))


async def acting_user(request: Request) -> str:
    """The signed-in user's id (any role)."""
    return principal(request).sub
