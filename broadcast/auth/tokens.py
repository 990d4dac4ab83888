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
import orjson
from jwt.algorithms import HMACAlgorithm

from broadcast.auth.jwks import JwksKeys
from broadcast.core.domain import Principal, is_user_id
from broadcast.core.settings import AuthSettings

MAX_ROLES = 50
MAX_EXP = 253_402_300_799  # 9999-12-31T23:59:59Z
MAX_SUB_CHARS = 128
# Headers that name or carry a verification key (RFC 7515 §4.1.2-4.1.6): keys come from the settings only.
KEY_LOCATION_HEADERS = ("jku", "jwk", "x5u", "x5c")
REQUIRED_CLAIMS = ("exp", "sub", "aud", "iss")


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
        # signatures only (claims are checked by ``_claims``), with the pinned algorithm alone registered
        self._jws = jwt.PyJWS(algorithms=[])
        self._jws.register_algorithm(
            auth.algorithm, _PreparedHmac() if auth.algorithm == "HS256" else jwt.get_algorithm_by_name(auth.algorithm)
        )
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
        if self._jwks is None:  # one key whatever the token says: parse and check the signature once
            decoded = self._decode(token, self._static_key)
            _check_header(decoded["header"], auth)
            await self._key(decoded["header"].get("kid"))  # the configured kid, or none
        else:  # the key depends on the token's kid: read the header first
            try:
                header = self._jws.get_unverified_header(token)
            except Exception as exc:  # PyJWTError, and UnicodeEncodeError for a lone surrogate
                raise InvalidToken(f"malformed token: {type(exc).__name__}") from None
            _check_header(header, auth)
            decoded = self._decode(token, await self._key(header.get("kid")))
        claims = _claims(decoded["payload"], auth)
        return Principal(_subject(claims["sub"]), _roles(claims.get(auth.roles_claim)), float(claims["exp"]))

    def _decode(self, token: str, key: Any) -> dict[str, Any]:
        """The header and payload of ``token`` once its signature is good (with the one pinned algorithm)."""
        try:
            return self._jws.decode_complete(token, key, algorithms=[self._auth.algorithm])
        except Exception as exc:  # PyJWTError, and TypeError/ValueError for a key of the wrong type
            raise InvalidToken(f"rejected: {type(exc).__name__}") from None

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


def _check_header(header: dict[str, Any], auth: AuthSettings) -> None:
    if header.get("alg") != auth.algorithm:
        raise InvalidToken("algorithm not accepted")
    if carried := [name for name in KEY_LOCATION_HEADERS if name in header]:
        raise InvalidToken(f"key-location header(s) not accepted: {', '.join(carried)}")
    if "crit" in header:  # whatever it lists: no critical extension is implemented here
        raise InvalidToken("crit header not accepted")
    _check_type(header.get("typ"), auth)


def _claims(payload: bytes, auth: AuthSettings) -> dict[str, Any]:
    """The verified payload's claims, checked as RFC 7519 §4.1 says, with ``auth.leeway_seconds`` on every
    time: ``exp``, ``sub``, ``aud`` and ``iss`` required; ``aud`` one string equal to the audience (a list is
    refused, even one naming it); ``iss`` exactly the issuer; ``nbf`` and ``iat``, when present, not in the
    future; times are JSON numbers."""
    try:
        claims = orjson.loads(payload)
    except orjson.JSONDecodeError:
        raise InvalidToken("payload is not JSON") from None
    if not isinstance(claims, dict):
        raise InvalidToken("payload is not a JSON object")
    if missing := [name for name in REQUIRED_CLAIMS if name not in claims]:
        raise InvalidToken(f"missing claim(s): {', '.join(missing)}")
    now, leeway = time.time(), auth.leeway_seconds
    if not 0 < _numeric_date(claims, "exp") < MAX_EXP:
        raise InvalidToken("exp out of range")
    if claims["exp"] <= now - leeway:
        raise InvalidToken("expired")
    for name in ("nbf", "iat"):
        if name in claims and _numeric_date(claims, name) > now + leeway:
            raise InvalidToken(f"{name} in the future")
    if claims["aud"] != auth.audience or not isinstance(claims["aud"], str):
        raise InvalidToken("audience mismatch")
    if claims["iss"] != auth.issuer or not isinstance(claims["iss"], str):  # exact
        raise InvalidToken("issuer mismatch")
    return claims


def _numeric_date(claims: dict[str, Any], name: str) -> float:
    value = claims[name]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidToken(f"{name} is not a number")
    return float(value)


class _PreparedHmac(HMACAlgorithm):
    """HS256 whose key is checked once: PyJWT re-checks the secret on every verification (that it is not a
    PEM, SSH, DER or JWK key: ~20 µs, a third of a verification), and this verifier has one secret."""

    def __init__(self) -> None:
        super().__init__(HMACAlgorithm.SHA256)
        self._prepared: tuple[str | bytes, bytes] | None = None

    def prepare_key(self, key: str | bytes) -> bytes:
        if self._prepared is None or self._prepared[0] != key:
            self._prepared = (key, super().prepare_key(key))
        return self._prepared[1]


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
