"""RELIABILITY #38, resource exhaustion, the parts the other suites leave: deeply nested JSON on every route
that takes JSON, a recipients array of a million ids, and slowloris at 500 sockets with the default guard.
A real server process on the embedded default (nothing here needs the stack)."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from broadcast.runtime.openapi import OPENAPI_PATH
from devstack.servers import Server, clean_env
from tests.auth import bearer

ADMIN = bearer("admin", "admin")
PROBLEM = "application/problem+json"
SLOW_SOCKETS = 500
DEFAULT_HEADER_TIMEOUT_S = 10.0


@pytest.fixture
def embedded(tmp_path: Path) -> Iterator[Server]:
    started = Server(clean_env(), tmp_path)
    try:
        started.wait_live()
        yield started
    finally:
        started.stop()


def rss_kib(pid: int) -> int:
    line = next(ln for ln in Path(f"/proc/{pid}/status").read_text().splitlines() if ln.startswith("VmRSS:"))
    return int(line.split()[1])


def json_operations(document: dict[str, Any]) -> list[tuple[str, str]]:
    """(method, path with every parameter set to 1) of each operation that takes a JSON body."""
    found = []
    for path, item in document["paths"].items():
        for method, operation in item.items():
            content = operation.get("requestBody", {}).get("content", {}) if isinstance(operation, dict) else {}
            if "application/json" in content:
                concrete = "/".join("1" if part.startswith("{") else part for part in path.split("/"))
                found.append((method.upper(), concrete))
    return found


async def test_deeply_nested_json_is_a_clear_400_on_every_route_that_takes_json(embedded: Server) -> None:
    """500,000 open brackets (within the body cap), and 1,100 (just past the parser's depth limit): each JSON
    route answers a problem (never a 500), and the server goes on answering."""
    async with httpx.AsyncClient(base_url=embedded.base, timeout=30) as http:
        document = (await http.get(OPENAPI_PATH)).json()
        operations = json_operations(document)
        assert ("POST", "/api/admin/broadcasts") in operations, operations
        answers = {}
        for depth in (1_100, 500_000):
            body = b'{"content": "x", "targetType": "SELECTED", "targetIds": ' + b"[" * depth + b"]" * depth + b"}"
            for method, path in operations:
                headers = {**ADMIN, "Content-Type": "application/json"}
                response = await http.request(method, path, content=body, headers=headers)
                answers[(depth, method, path)] = response.status_code
                assert 400 <= response.status_code < 500, (depth, method, path, response.status_code, response.text)
                assert response.headers["content-type"].startswith(PROBLEM), response.headers
        create = answers[(500_000, "POST", "/api/admin/broadcasts")]
        assert create == 400, f"nested JSON on create: {create}"
        assert (await http.get("/health/live")).status_code == 200
    print(f"\nnested JSON: {len(operations)} JSON operations, answers {sorted(set(answers.values()))}")


async def test_a_million_recipient_array_is_refused_before_it_is_read(embedded: Server) -> None:
    """A SELECTED broadcast naming 1,000,000 recipients in JSON (12 MB): 413 as a problem, with the body
    mostly unread, so memory stays flat; JSON recipients are capped (the CSV upload takes large lists)."""
    ids = [f"user{n:07d}" for n in range(1_000_000)]
    body = orjson.dumps({"content": "to everyone by name", "targetType": "SELECTED", "targetIds": ids})
    before = rss_kib(embedded.proc.pid)
    started = time.monotonic()
    async with httpx.AsyncClient(base_url=embedded.base, timeout=60) as http:
        try:
            response = await http.post("/api/admin/broadcasts", content=body, headers=ADMIN)
        except httpx.WriteError:  # the server answered and closed before the upload ended: read its answer
            pytest.fail("the server must answer 413 rather than cut the upload without an answer")
        took = time.monotonic() - started
        grown_mib = (rss_kib(embedded.proc.pid) - before) / 1024
        listed = (await http.get("/api/admin/broadcasts", headers=ADMIN)).json()["items"]
    size_mb = len(body) / 1e6
    print(f"\n1e6 recipients ({size_mb:.1f} MB): {response.status_code} in {took:.2f} s, RSS +{grown_mib:.1f} MiB")
    assert response.status_code == 413, response.text
    assert response.headers["content-type"].startswith(PROBLEM)
    assert grown_mib < 8, f"the server read the body: RSS +{grown_mib:.1f} MiB"
    assert listed == [], "nothing is written"


async def test_500_slowloris_sockets_leave_the_server_responsive_and_are_closed(embedded: Server) -> None:
    """500 connections each sending a header byte every 2 s (the default guard: 10 s to send a head, 4,096
    heads in flight). Meanwhile the API answers within a second; after the header timeout every slow socket
    got 408 and the server's descriptors are back to their baseline."""
    pid = embedded.proc.pid
    baseline = len(os.listdir(f"/proc/{pid}/fd"))

    async def slowloris() -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", embedded.port)
        writer.write(b"GET /health/live HTTP/1.1\r\n")
        try:
            for n in range(15):  # 30 s if nobody stops it
                read = asyncio.create_task(reader.read(200))
                done, _ = await asyncio.wait({read}, timeout=2.0)
                if done:
                    return read.result()
                read.cancel()
                writer.write(b"X%d: a\r\n" % n)
                await writer.drain()
            return b"still open"
        except ConnectionError:
            return b""
        finally:
            writer.close()

    slow = [asyncio.create_task(slowloris()) for _ in range(SLOW_SOCKETS)]
    await asyncio.sleep(1.0)
    spent = []
    async with httpx.AsyncClient(base_url=embedded.base, timeout=10) as http:
        for _ in range(10):
            started = time.monotonic()
            assert (await http.get("/api/admin/broadcasts", headers=ADMIN)).status_code == 200
            assert (await http.get("/health/live")).status_code == 200
            spent.append(time.monotonic() - started)
            await asyncio.sleep(0.3)
    answers = await asyncio.gather(*slow)
    await asyncio.sleep(1.0)
    after = len(os.listdir(f"/proc/{pid}/fd"))
    timed_out = sum(1 for a in answers if a.startswith(b"HTTP/1.1 408 "))
    print(
        f"\nslowloris: {SLOW_SOCKETS} sockets; API round trips meanwhile max {max(spent) * 1000:.0f} ms; "
        f"408 for {timed_out}; descriptors {baseline} -> {after}"
    )
    assert max(spent) < 1.0, f"the API slowed to {max(spent):.2f} s under slowloris"
    assert timed_out == SLOW_SOCKETS, [a[:40] for a in answers if not a.startswith(b"HTTP/1.1 408 ")][:5]
    assert after <= baseline + 2, f"descriptors {baseline} -> {after}"
