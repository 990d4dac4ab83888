"""What authentication costs per request: token verification by algorithm, and the middleware stack.

``python -m bench.auth_overhead [--rounds R] [--n N]`` prints two tables (medians of R rounds) and writes
``bench/results/auth-<date>.json``:

1. ``TokenVerifier.verify`` in µs per token for HS256, RS256 (2048-bit) and ES256 (P-256): first sight of
   a token (all checks and the signature) and a repeat (the verified-token cache), beside PyJWT's bare
   ``jwt.decode`` with a pre-loaded key (the baseline: what a hand-written check would cost every time).
2. One trivial route driven straight through ASGI (no sockets, no HTTP parsing): bare, with the security
   headers and body cap, and with the whole stack including ``AuthGate`` — µs per request and ratios.

In-process and single-threaded: it measures our code, not the network; the machine is recorded.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jwt
import orjson
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from pydantic import SecretStr
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message

from broadcast.auth.tokens import TokenVerifier, mint
from broadcast.core.domain import Principal
from broadcast.core.settings import AuthSettings
from broadcast.http.security import AuthGate, BodyLimit, SecurityHeaders

RESULTS = Path(__file__).parent / "results"
PEM = serialization.Encoding.PEM
SPKI = serialization.PublicFormat.SubjectPublicKeyInfo


def _claims() -> dict[str, Any]:
    now = int(time.time())
    return {"sub": "alice", "aud": "broadcast-server", "iss": "broadcast-dev", "exp": now + 3_600, "roles": ["admin"]}


def key_setups(n: int) -> dict[str, tuple[AuthSettings, list[str], Any]]:
    """Per algorithm: verifier settings, ``n`` distinct valid tokens, and the key PyJWT's bare decode needs."""
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    hs = AuthSettings()
    rs = AuthSettings(algorithm="RS256", public_key=SecretStr(rsa_key.public_key().public_bytes(PEM, SPKI).decode()))
    es = AuthSettings(algorithm="ES256", public_key=SecretStr(ec_key.public_key().public_bytes(PEM, SPKI).decode()))
    return {
        "HS256": (hs, [mint(hs, f"u{i}", ["admin"]) for i in range(n)], hs.jwt_secret.get_secret_value()),
        "RS256": (rs, [_signed(rsa_key, "RS256", i) for i in range(n)], rsa_key.public_key()),
        "ES256": (es, [_signed(ec_key, "ES256", i) for i in range(n)], ec_key.public_key()),
    }


def _signed(key: Any, algorithm: str, i: int) -> str:
    return jwt.encode({**_claims(), "sub": f"u{i}"}, key, algorithm=algorithm)


async def _time_verify(settings: AuthSettings, tokens: list[str]) -> float:
    verifier = TokenVerifier(settings)  # a fresh cache: every token is seen for the first time
    start = time.perf_counter()
    for token in tokens:
        await verifier.verify(token)
    return (time.perf_counter() - start) / len(tokens) * 1e6


async def _time_repeat(settings: AuthSettings, token: str, n: int) -> float:
    verifier = TokenVerifier(settings)
    await verifier.verify(token)
    start = time.perf_counter()
    for _ in range(n):
        await verifier.verify(token)
    return (time.perf_counter() - start) / n * 1e6


def _time_decode(tokens: list[str], key: Any, algorithm: str) -> float:
    start = time.perf_counter()
    for token in tokens:
        jwt.decode(token, key, algorithms=[algorithm], audience="broadcast-server", issuer="broadcast-dev")
    return (time.perf_counter() - start) / len(tokens) * 1e6


async def _ok(request: Request) -> Response:
    return Response(b"ok", media_type="text/plain")


async def _no_ticket(scope: Any, ticket: str) -> Principal | None:
    return None


def apps(token_settings: AuthSettings) -> dict[str, ASGIApp]:
    routes = [Route("/api/user/ping", _ok, methods=["GET"])]
    verifier = TokenVerifier(token_settings)
    outer = [Middleware(SecurityHeaders), Middleware(BodyLimit, default=1_048_576, per_path={})]
    gate = Middleware(AuthGate, verifier=verifier, admin_role="admin", redeem=_no_ticket)
    return {
        "bare route": Starlette(routes=routes),
        "+ headers, body cap": Starlette(routes=routes, middleware=outer),
        "+ AuthGate (HS256)": Starlette(routes=routes, middleware=[*outer, gate]),
    }


async def _time_requests(app: ASGIApp, headers: list[tuple[bytes, bytes]], n: int) -> float:
    scope_base = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/api/user/ping",
        "raw_path": b"/api/user/ping",
        "query_string": b"",
        "headers": headers,
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8080),
    }
    statuses: list[int] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    start = time.perf_counter()
    for _ in range(n):
        await app(dict(scope_base), receive, send)
    elapsed = (time.perf_counter() - start) / n * 1e6
    assert set(statuses) == {200}, f"unexpected statuses {set(statuses)}"
    return elapsed


async def run(rounds: int, n: int) -> dict[str, Any]:
    verify: dict[str, dict[str, float]] = {}
    for name, (settings, tokens, key) in key_setups(n).items():
        first = [await _time_verify(settings, tokens) for _ in range(rounds)]
        repeat = [await _time_repeat(settings, tokens[0], n) for _ in range(rounds)]
        bare = [_time_decode(tokens, key, name) for _ in range(rounds)]
        verify[name] = {
            "first_sight_us": statistics.median(first),
            "repeat_us": statistics.median(repeat),
            "pyjwt_decode_us": statistics.median(bare),
        }
    hs = AuthSettings()
    headers = [(b"authorization", f"Bearer {mint(hs, 'alice')}".encode())]
    stack: dict[str, float] = {}
    for name, app in apps(hs).items():
        stack[name] = statistics.median([await _time_requests(app, headers, n) for _ in range(rounds)])
    return {"verify": verify, "stack": stack}


def machine() -> dict[str, Any]:
    return {
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "pyjwt": jwt.__version__,
        "platform": platform.platform(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--n", type=int, default=2_000, help="operations per round")
    args = parser.parse_args()
    result = asyncio.run(run(args.rounds, args.n))
    print(f"machine: {machine()}; in-process, single thread; medians of {args.rounds} rounds x {args.n}")
    print(
        f"\n{'algorithm':10} {'first µs':>9} {'repeat µs':>10} {'pyjwt µs':>9} {'first/pyjwt':>12} {'repeat/pyjwt':>13}"
    )
    for name, v in result["verify"].items():
        bare = v["pyjwt_decode_us"]
        print(
            f"{name:10} {v['first_sight_us']:9.1f} {v['repeat_us']:10.2f} {bare:9.1f} "
            f"{v['first_sight_us'] / bare:12.2f} {v['repeat_us'] / bare:13.3f}"
        )
    route = result["stack"]["bare route"]
    print(f"\n{'ASGI stack (same token)':24} {'µs/req':>8} {'vs bare':>8}")
    for name, us in result["stack"].items():
        print(f"{name:24} {us:8.1f} {us / route:8.2f}")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"auth-{datetime.now(UTC):%Y-%m-%d}.json"
    out.write_bytes(orjson.dumps({"machine": machine(), "args": vars(args), **result}, option=orjson.OPT_INDENT_2))
    print(f"\nwritten {out}")


if __name__ == "__main__":
    main()
