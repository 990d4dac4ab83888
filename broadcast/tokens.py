"""Bearer tokens: verify a JWT into a ``Principal``, or mint one for development.

Verification pins the one configured algorithm (HS256 with a secret, RS256/ES256 with a public key or a
JWKS URL), requires ``exp``, ``sub``, ``aud`` and ``iss``, compares ``iss`` exactly, checks ``nbf`` when
present, refuses a ``kid`` it does not know and any token over ``max_token_bytes``, and refuses a ``typ`` header
other than ``accepted_types`` (``JWT``, ``at+jwt``: an ``id_token+jwt`` signed by the same issuer is not an
access token; RFC 8725 §3.11), or a missing one when ``require_typ``. A token carrying a key-location or
embedded-key header (``jku``, ``jwk``, ``x5u``, ``x5c``) is refused, even when its signature is good: keys
come only from the configuration, and such a header is either an attack (an attacker's key or URL) or a
misconfigured issuer (RFC 8725 §3.10); the URL is never fetched. Any ``crit`` header is refused: this server
implements no critical extension, and RFC 7515 §4.1.11 says a token naming one it does not understand is
invalid. Every refusal is the same ``InvalidToken`` to the caller; its message (never the token) is for the
log only.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import jwt

from broadcast.domain import Principal, is_user_id
from broadcast.jwks import JwksKeys
from broadcast.settings import AuthSettings

MAX_ROLES = 50
MAX_EXP = 253_402_300_799  # 9999-12-31T23:59:59Z
MAX_SUB_CHARS = 128
# Headers that name or carry a verification key (RFC 7515 §4.1.2-4.1.6): keys come from the settings only.
KEY_LOCATION_HEADERS = ("jku", "jwk", "x5u", "x5c")


class InvalidToken(Exception):
    """The token is not acceptable; the message says why, for the log (never sent to the client)."""


class TokenVerifier:
    """Checks bearer tokens against one configured key source.

    A client sends the same token with every request until it expires, so verified tokens are remembered
    (at most ``CACHE_SIZE``, least recently used dropped): a repeat costs a dictionary lookup and the
    expiry check instead of a signature check. Only successes are remembered.
    """

    CACHE_SIZE = 10_000

    def __init__(self, auth: AuthSettings, jwks: JwksKeys | None = None) -> None:
        self._auth = auth
        self._jwks = jwks  # built for the pinned algorithm: it only holds keys of that type
        self._static_key: Any = None
        self._verified: OrderedDict[str, Principal] = OrderedDict()
        if auth.jwks_url is None:
            self._static_key = (
                auth.jwt_secret.get_secret_value()
                if auth.algorithm == "HS256"
                else jwt.get_algorithm_by_name(auth.algorithm).prepare_key(auth.public_key_pem())
            )

    async def verify(self, token: str) -> Principal:
        known = self._verified.get(token)
        if known is not None:
            if time.time() < known.expires_at + self._auth.leeway_seconds:
                self._verified.move_to_end(token)
                return known
            del self._verified[token]
        principal = await self._verify(token)
        self._verified[token] = principal
        if len(self._verified) > self.CACHE_SIZE:
            self._verified.popitem(last=False)
        return principal

    async def _verify(self, token: str) -> Principal:
        auth = self._auth
        if len(token) > auth.max_token_bytes:
            raise InvalidToken("token too large")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise InvalidToken(f"malformed token: {type(exc).__name__}") from None
        if header.get("alg") != auth.algorithm:
            raise InvalidToken("algorithm not accepted")
        if carried := [name for name in KEY_LOCATION_HEADERS if name in header]:
            raise InvalidToken(f"key-location header(s) not accepted: {', '.join(carried)}")
        if "crit" in header:  # whatever it lists: no critical extension is implemented here
            raise InvalidToken("crit header not accepted")
        _check_type(header.get("typ"), auth)
        key = await self._key(header.get("kid"))
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[auth.algorithm],
                audience=auth.audience,
                issuer=auth.issuer,
                leeway=auth.leeway_seconds,
                options={"require": ["exp", "sub", "aud", "iss"], "strict_aud": True},
            )
        except Exception as exc:  # PyJWTError, and TypeError/ValueError for a key of the wrong type
            raise InvalidToken(f"rejected: {type(exc).__name__}") from None
        if claims.get("iss") != auth.issuer:  # exact, whatever the library's matching rules
            raise InvalidToken("issuer mismatch")
        expires_at = claims["exp"]
        if not isinstance(expires_at, int | float) or not 0 < expires_at < MAX_EXP:
            raise InvalidToken("exp out of range")
        return Principal(_subject(claims.get("sub")), _roles(claims.get(auth.roles_claim)), float(expires_at))

    async def _key(self, kid: object) -> Any:
        if kid is not None and not isinstance(kid, str):
            raise InvalidToken("kid is not a string")
        if self._jwks is not None:
            if kid is None:
                raise InvalidToken("kid required with a JWKS")
            found = await self._jwks.key(kid)
            if found is None:
                raise InvalidToken("unknown kid")
            return found
        if kid != self._auth.key_id:
            raise InvalidToken("unknown kid")
        return self._static_key


def _check_type(typ: object, auth: AuthSettings) -> None:
    if typ is None:
        if auth.require_typ:
            raise InvalidToken("typ header required")
        return
    accepted = {_media_type(t) for t in auth.accepted_types}
    if not isinstance(typ, str) or _media_type(typ) not in accepted:
        raise InvalidToken("typ not accepted")


def _media_type(typ: str) -> str:
    """RFC 7515 §4.1.9: case-insensitive, ``application/`` may be omitted."""
    lowered = typ.lower()
    return lowered.removeprefix("application/")


def _subject(sub: object) -> str:
    if not isinstance(sub, str) or not is_user_id(sub, MAX_SUB_CHARS):
        raise InvalidToken("sub is not a usable user id")
    return sub


def _roles(value: object) -> frozenset[str]:
    """Roles from a list of strings or a space-separated string (OAuth ``scope`` style); absent = none."""
    if value is None:
        return frozenset()
    items = value.split() if isinstance(value, str) else value
    if not isinstance(items, list) or len(items) > MAX_ROLES or not all(isinstance(r, str) for r in items):
        raise InvalidToken("roles claim is not a list of strings")
    return frozenset(items)


def mint(auth: AuthSettings, sub: str, roles: Sequence[str] = (), ttl_seconds: int = 3_600) -> str:
    """A token for ``sub`` signed with the configured HS256 secret (development and tests)."""
    if auth.algorithm != "HS256":
        raise ValueError("tokens can only be minted here for HS256; use the identity provider for RS256/ES256")
    now = int(time.time())
    claims: dict[str, Any] = {
        "sub": sub,
        "aud": auth.audience,
        "iss": auth.issuer,
        "iat": now,
        "exp": now + ttl_seconds,
        auth.roles_claim: list(roles),
    }
    headers = {"kid": auth.key_id} if auth.key_id else None
    return jwt.encode(claims, auth.jwt_secret.get_secret_value(), algorithm="HS256", headers=headers)
