"""Signing keys from a JWKS URL, cached by ``kid``; an unknown ``kid`` refetches at most once per interval.

The fetch runs in a thread (PyJWT parses the set); a failing fetch keeps the keys already known. Without a
floor on refetches, tokens with random ``kid``s would turn every request into a request to the IdP.
"""

from __future__ import annotations

import asyncio
import logging
import time
import urllib.request
from typing import Any

import jwt

log = logging.getLogger(__name__)
MAX_JWKS_BYTES = 1_048_576
KEY_TYPES = {"RS256": "RSA", "ES256": "EC", "HS256": "oct"}


class JwksKeys:
    def __init__(
        self, url: str, algorithm: str, refresh_seconds: float = 300.0, min_refetch_seconds: float = 30.0
    ) -> None:
        self._url = url
        self._key_type = KEY_TYPES[algorithm]
        self._refresh_s = refresh_seconds
        self._min_refetch_s = min_refetch_seconds
        self._keys: dict[str, Any] = {}
        self._fetched_at = float("-inf")
        self._lock = asyncio.Lock()

    async def key(self, kid: str) -> Any | None:
        """The verification key for ``kid``, or None when the set does not have it (even after a refetch)."""
        now = time.monotonic()
        stale = now - self._fetched_at > self._refresh_s
        if kid not in self._keys or stale:
            async with self._lock:
                if time.monotonic() - self._fetched_at >= self._min_refetch_s:
                    await self._refetch()
        return self._keys.get(kid)

    async def _refetch(self) -> None:
        self._fetched_at = time.monotonic()
        try:
            self._keys = await asyncio.to_thread(self._fetch)
        except Exception as exc:  # keep what we have; the next refetch may succeed
            log.warning("JWKS fetch from %s failed: %r", self._url, exc)

    def _fetch(self) -> dict[str, Any]:
        with urllib.request.urlopen(self._url, timeout=5) as response:  # noqa: S310 - operator-configured URL
            data = response.read(MAX_JWKS_BYTES + 1)
        if len(data) > MAX_JWKS_BYTES:
            raise ValueError("JWKS document too large")
        keys = jwt.PyJWKSet.from_json(data.decode())
        # only keys of the pinned algorithm's type: a token naming an EC key under RS256 is then unknown
        return {k.key_id: k.key for k in keys.keys if k.key_id and k.key_type == self._key_type}
