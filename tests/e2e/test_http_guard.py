"""The server defends its port below the app (``broadcast/http/guard.py``): request heads have a size cap, a read
deadline, and a bound on how many connections may be sending one. Raw sockets against a real server process
(the embedded default: nothing here needs the stack)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import jwt
import pytest

from broadcast.core.settings import DEV_JWT_SECRET
from devstack.servers import Server, clean_env

HEAD_TIMEOUT_S = 1.5
MAX_HEADS = 20


@pytest.fixture
def guarded(tmp_path: Path) -> Iterator[Server]:
    env = clean_env(
        BROADCAST_SERVER__HEADER_TIMEOUT_SECONDS=str(HEAD_TIMEOUT_S),
        BROADCAST_SERVER__MAX_HEADS_IN_FLIGHT=str(MAX_HEADS),
    )
    server = Server(env, tmp_path)
    try:
        server.wait_live()
        yield server
    finally:
        server.stop()


def rss_kb(pid: int) -> int:
    line = next(ln for ln in Path(f"/proc/{pid}/status").read_text().splitlines() if ln.startswith("VmRSS:"))
    return int(line.split()[1])


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def fd_targets(pid: int) -> list[str]:
    """What the process's descriptors point at (``socket:[…]``, files); one that closed meanwhile is left out."""
    found = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            found.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except FileNotFoundError:
            continue
    return found


async def send_head(port: int, head_bytes: int, finish: bool) -> bytes:
    """Send a request whose one header is ``head_bytes`` long (unfinished unless ``finish``), 64 KiB at a time,
    while reading; what the server answered (b"" if it only closed)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    answer = asyncio.create_task(reader.read(200))
    try:
        writer.write(b"GET /health/live HTTP/1.1\r\nHost: t\r\nX-Big: ")
        sent = 0
        with contextlib.suppress(ConnectionError):
            while sent < head_bytes and not answer.done():
                writer.write(b"a" * 65_536)
                sent += 65_536
                await writer.drain()
            if finish and not answer.done():
                writer.write(b"\r\n\r\n")
                await writer.drain()
        async with asyncio.timeout(10):
            try:
                return await answer
            except ConnectionError:
                return b""
    finally:
        answer.cancel()
        writer.close()


async def test_a_32_mib_header_is_refused_with_431(guarded: Server) -> None:
    answer = await send_head(guarded.port, 32 * 1024 * 1024, finish=True)
    assert answer.startswith(b"HTTP/1.1 431 "), answer
    async with httpx.AsyncClient() as http:
        big = await http.get(guarded.base + "/health/live", headers={"X-Big": "a" * 40_000})
        normal = await http.get(guarded.base + "/health/live", headers={"X-Fine": "a" * 8_000})
    assert (big.status_code, normal.status_code) == (431, 200)


def padded_token(length: int) -> str:
    """A token signed with the development secret whose JOSE header is padded to make it ``length`` long."""
    claims = {"sub": "ann", "aud": "broadcast-server", "iss": "broadcast-dev", "exp": int(time.time()) + 600}
    short = len(jwt.encode(claims, DEV_JWT_SECRET, algorithm="HS256", headers={"x": ""}))
    pad = (length - short) * 3 // 4  # base64url: 4 characters per 3 bytes
    token = jwt.encode(claims, DEV_JWT_SECRET, algorithm="HS256", headers={"x": "a" * pad})
    assert abs(len(token) - length) < 8
    return token


async def test_a_32_kb_token_is_refused_like_any_bad_token_or_before_the_app(guarded: Server) -> None:
    """RELIABILITY #34's 32 KB header: a token that fits in the head cap (32 KiB) reaches the app and is its usual
    401 (over the 8 KiB token cap, never parsed); one that makes the head too large is 431 below the app."""
    async with httpx.AsyncClient() as http:
        fits = await http.get(
            guarded.base + "/api/user/messages", headers={"Authorization": f"Bearer {padded_token(32_000)}"}
        )
        over = await http.get(
            guarded.base + "/api/user/messages", headers={"Authorization": f"Bearer {padded_token(33_000)}"}
        )
    assert fits.status_code == 401 and fits.headers["content-type"] == "application/problem+json"
    assert fits.json()["detail"] == "a valid bearer token is required"
    assert fits.headers["www-authenticate"] == 'Bearer realm="broadcast", error="invalid_token"'
    assert over.status_code == 431


async def test_unfinished_8_mib_headers_do_not_hold_memory(guarded: Server) -> None:
    before = rss_kb(guarded.proc.pid)
    answers = await asyncio.gather(*(send_head(guarded.port, 8 * 1024 * 1024, finish=False) for _ in range(10)))
    grown_mib = (rss_kb(guarded.proc.pid) - before) / 1024
    assert all(a.startswith(b"HTTP/1.1 431 ") for a in answers), answers
    assert grown_mib < 16, f"RSS grew {grown_mib:.1f} MiB for 10 refused heads (was +87 MiB unguarded)"


async def test_slowloris_connections_are_closed_after_the_header_timeout(guarded: Server) -> None:
    pid = guarded.proc.pid
    before = fd_targets(pid)

    async def slowloris() -> tuple[bytes, float]:
        reader, writer = await asyncio.open_connection("127.0.0.1", guarded.port)
        started = asyncio.get_running_loop().time()
        writer.write(b"GET /health/live HTTP/1.1\r\n")
        try:
            for n in range(40):  # one header byte every 0.25 s: 10 s if nobody stops it
                read = asyncio.create_task(reader.read(200))
                done, _ = await asyncio.wait({read}, timeout=0.25)
                if done:
                    return read.result(), asyncio.get_running_loop().time() - started
                read.cancel()
                writer.write(b"X-Slow-%d: a\r\n" % n)
                await writer.drain()
            return b"still open", asyncio.get_running_loop().time() - started
        except ConnectionError:
            return b"", asyncio.get_running_loop().time() - started
        finally:
            writer.close()

    results = await asyncio.gather(*(slowloris() for _ in range(MAX_HEADS // 2)))
    assert all(answer.startswith(b"HTTP/1.1 408 ") for answer, _ in results), results
    assert max(spent for _, spent in results) < HEAD_TIMEOUT_S + 2.0, results
    await asyncio.sleep(0.5)
    # Sockets only: what the slow clients held. Other descriptors may open meanwhile (the embedded database's
    # pool growing by a connection: a database file, its WAL and shared memory). A CI run once saw 24 -> 27
    # descriptors here, what they were unrecorded; the message now names them.
    after = fd_targets(pid)
    sockets = [t for t in after if t.startswith("socket:")]
    assert len(sockets) <= sum(t.startswith("socket:") for t in before) + 2, f"descriptors {before} -> {after}"


async def test_connections_past_the_heads_in_flight_bound_get_503_with_a_retry_hint(guarded: Server) -> None:
    idle = [await asyncio.open_connection("127.0.0.1", guarded.port) for _ in range(MAX_HEADS)]
    try:
        await asyncio.sleep(0.2)
        reader, writer = await asyncio.open_connection("127.0.0.1", guarded.port)
        async with asyncio.timeout(5):
            answer = await reader.read(300)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 503 ") and b"retry-after: 1" in answer, answer
    finally:
        for _, w in idle:
            w.close()
    await asyncio.sleep(0.3)
    async with httpx.AsyncClient() as http:
        assert (await http.get(guarded.base + "/health/live")).status_code == 200, "the bound frees with its holders"
