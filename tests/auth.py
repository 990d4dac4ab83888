"""Bearer tokens for tests, signed with the development secret every test server uses by default."""

from __future__ import annotations

from broadcast.auth.tokens import mint
from broadcast.core.settings import AuthSettings

TEST_TOKEN_TTL_S = 6 * 3_600


def token(sub: str, *roles: str, ttl_s: int = TEST_TOKEN_TTL_S) -> str:
    return mint(AuthSettings(), sub, roles, ttl_s)


def bearer(sub: str, *roles: str, ttl_s: int = TEST_TOKEN_TTL_S) -> dict[str, str]:
    """``{"Authorization": "Bearer <token>"}`` for ``sub`` with ``roles`` (e.g. ``bearer("ann", "admin")``)."""
    return {"Authorization": f"Bearer {token(sub, *roles, ttl_s=ttl_s)}"}
