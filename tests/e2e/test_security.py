"""Security end to end: real server processes on the real stack, real SSE clients.

Tickets as a browser uses them, streams that end with their token, hostile content, the cluster-wide
connection cap, the connect rate limit, and the whole pipeline through Kafka's SASL/SCRAM listener.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from devstack.servers import Server, clean_env, isolated_env
from devstack.stack import StackInfo
from tests.auth import bearer, token
from tests.servers import scram_env
from tests.sse_client import SseClient

ADMIN = bearer("admin", "admin")
HOSTILE = [
    "<script>alert('x')</script><img src=x onerror=alert(1)>",
    "line one\n\nevent: admin\ndata: x\n\nid: s999999",
    "carriage\rreturn\r\nand\u2028separators\u2029\u0085end",
    "emoji 🎉 and right-to-left \u202e text",
]


@pytest.fixture
def env(stack: StackInfo, unique_name: str, tmp_path: Path) -> Iterator[dict[str, str]]:
    yield isolated_env(
        stack,
        unique_name,
        tmp_path,
        BROADCAST_SSE__MAX_CONNECTIONS_PER_USER="2",
        BROADCAST_AUTH__TICKET_TTL_SECONDS="2",
        BROADCAST_AUTH__LEEWAY_SECONDS="1",  # a stream lives until exp + leeway
        BROADCAST_LIMITS__CONNECT_BURST_PER_USER="6",
        BROADCAST_LIMITS__CONNECT_PER_SECOND_PER_USER="0.2",
    )


async def post(base: str, body: dict[str, Any]) -> httpx.Response:
    async with httpx.AsyncClient(timeout=20) as http:
        return await http.post(base + "/api/admin/broadcasts", json=body, headers=ADMIN)


async def ticket_for(base: str, user: str) -> str:
    async with httpx.AsyncClient(timeout=10) as http:
        response = await http.post(base + "/api/user/sse/ticket", headers=bearer(user))
    assert response.status_code == 201, response.text
    issued: str = response.json()["ticket"]
    return issued


async def test_a_ticket_opens_one_stream_once_and_never_reaches_the_log(server: Server) -> None:
    issued = await ticket_for(server.base, "alice")
    async with SseClient(server.base, "alice", ticket=issued) as alice:
        [hello] = await alice.wait_for(lambda e: e.event == "CONNECTED")
        assert hello.data["userId"] == "alice"
        sent = await post(server.base, {"content": "hi", "targetType": "SELECTED", "targetIds": ["alice"]})
        assert sent.status_code == 201
        await alice.wait_for(lambda e: e.event == "MESSAGE")
    async with httpx.AsyncClient(timeout=10) as http:
        reused = await http.get(server.base + "/api/user/sse/connect", params={"ticket": issued})
        assert reused.status_code == 401 and reused.headers["content-type"] == "application/problem+json"
        stale = await ticket_for(server.base, "alice")
        await asyncio.sleep(2.5)  # BROADCAST_AUTH__TICKET_TTL_SECONDS=2
        expired = await http.get(server.base + "/api/user/sse/connect", params={"ticket": stale})
        assert expired.status_code == 401
    log = server.log.read_text()
    assert "ticket=[redacted]" in log, "the access log shows the stream requests, without the ticket"
    assert issued not in log and stale not in log
    assert not re.search(r"eyJ[\w-]+\.eyJ[\w-]+", log), "no JWT anywhere in the log"


async def test_a_stream_is_always_the_token_holders_own(server: Server) -> None:
    """alice asks for bob's stream by every parameter a client might try: she gets hers, never his."""
    headers = {**bearer("alice"), "X-Dev-User": "bob", "Accept": "text/event-stream"}
    params = {"userId": "bob", "user": "bob", "devUser": "bob", "sub": "bob"}
    received: list[str] = []
    url = server.base + "/api/user/sse/connect"
    async with (
        httpx.AsyncClient(timeout=httpx.Timeout(10.0, read=None)) as http,
        http.stream("GET", url, headers=headers, params=params) as stream,
    ):
        sent = await post(server.base, {"content": "bob only", "targetType": "SELECTED", "targetIds": ["bob"]})
        assert sent.status_code == 201
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2.5):  # long enough for a live push (they take milliseconds)
                async for line in stream.aiter_lines():
                    received.append(line)
    assert any('"userId":"alice"' in line for line in received), received
    assert not any("bob only" in line for line in received)
    async with SseClient(server.base, "bob") as bob:
        [got] = await bob.wait_for(lambda e: e.event == "MESSAGE")
        assert got.data["content"] == "bob only"


async def test_a_resume_from_another_users_event_id_shows_nothing_of_theirs(server: Server) -> None:
    """alice reconnects with ``Last-Event-ID`` = the id of a SELECTED message only bob got: she is told to
    RESYNC (an id that is not hers resumes nothing) and gets her own pending message, never bob's."""
    async with SseClient(server.base, "bob") as bob:
        secret = await post(server.base, {"content": "bob's secret", "targetType": "SELECTED", "targetIds": ["bob"]})
        assert secret.status_code == 201, secret.text
        [bobs] = await bob.wait_for(lambda e: e.event == "MESSAGE")
    assert bobs.id and bobs.id.startswith("s"), bobs  # a SELECTED message's id names bob's row
    own = await post(server.base, {"content": "alice's own", "targetType": "SELECTED", "targetIds": ["alice"]})
    assert own.status_code == 201, own.text
    async with SseClient(server.base, "alice", last_event_id=bobs.id) as alice:
        await alice.wait_for(lambda e: e.event == "MESSAGE")
        await asyncio.sleep(1.0)  # whatever else the catch-up holds has arrived by now
    assert alice.status == 200 and not alice.ended, "the stream opened and stayed open"
    assert [e.event for e in alice.events] == ["CONNECTED", "RESYNC", "MESSAGE"], alice.events
    assert alice.events[0].data["userId"] == "alice"
    assert [m.data["broadcastId"] for m in alice.messages] == [own.json()["id"]]
    assert all("bob" not in repr(e.data) for e in alice.events), alice.events
    async with httpx.AsyncClient(timeout=10) as http:  # what RESYNC makes her do: refetch her inbox
        inbox = (await http.get(server.base + "/api/user/messages", headers=bearer("alice"))).json()
        bobs_inbox = (await http.get(server.base + "/api/user/messages/unread", headers=bearer("bob"))).json()
    assert [m["content"] for m in inbox["items"]] == ["alice's own"]
    assert [m["broadcastId"] for m in bobs_inbox["items"]] == [secret.json()["id"]], "bob's message is untouched"


async def test_a_resume_replays_only_what_the_users_current_roles_entitle(server: Server) -> None:
    """A ROLE broadcast replayed on resume follows the roles the user holds *now*: roles come from the user
    directory (``PUT /api/admin/users/{id}``), read at every connect; a token's role claims grant no audience."""

    async def set_roles(*roles: str) -> None:
        async with httpx.AsyncClient(timeout=10) as http:
            done = await http.put(server.base + "/api/admin/users/olga", json={"roles": list(roles)}, headers=ADMIN)
        assert done.status_code == 200, done.text

    def contents(client: SseClient, has: str | None = None) -> list[str]:
        """What the client shows, dropping the message it already has (``has``, its Last-Event-ID: a delivered
        mark not yet written may bring it again, with the same id, and a client skips a repeated id)."""
        return [m.data["content"] for m in client.messages if m.id != has]

    await set_roles("ops")
    async with SseClient(server.base, "olga", roles=("ops",)) as olga:
        bodies: list[dict[str, Any]] = [
            {"content": "before", "targetType": "SELECTED", "targetIds": ["olga"]},
            {"content": "ops only", "targetType": "ROLE", "targetIds": ["ops"]},
            {"content": "for all", "targetType": "ALL"},
        ]
        for sent, body in enumerate(bodies, start=1):
            assert (await post(server.base, body)).status_code == 201
            await olga.wait_for(lambda e: e.event == "MESSAGE", count=sent)  # one at a time: in this order
        cursor = olga.messages[0].id
    assert cursor and contents(olga) == ["before", "ops only", "for all"]
    # while she holds the role, a resume from before them replays both group messages
    async with SseClient(server.base, "olga", roles=("ops",), last_event_id=cursor) as held:
        await held.wait_for(lambda e: e.event == "MESSAGE" and e.data["content"] == "for all")
    assert contents(held, cursor) == ["ops only", "for all"]
    # the role is taken away; her new token has no ops either: the replay leaves the ROLE message out
    await set_roles()
    async with SseClient(server.base, "olga", last_event_id=cursor) as dropped:
        await dropped.wait_for(lambda e: e.event == "MESSAGE" and e.data["content"] == "for all")
        await asyncio.sleep(1.0)
    assert contents(dropped, cursor) == ["for all"], dropped.events
    # a token that still claims ops does not bring it back: the directory, not the token, names her roles
    async with SseClient(server.base, "olga", roles=("ops",), last_event_id=cursor) as claimed:
        await claimed.wait_for(lambda e: e.event == "MESSAGE" and e.data["content"] == "for all")
        await asyncio.sleep(1.0)
    assert contents(claimed, cursor) == ["for all"], claimed.events
    async with httpx.AsyncClient(timeout=10) as http:
        inbox = (await http.get(server.base + "/api/user/messages", headers=bearer("olga", "ops"))).json()
    assert [m["content"] for m in inbox["items"]] == ["for all", "before"]


async def test_a_stream_ends_when_its_token_expires(server: Server) -> None:
    short = {"Authorization": f"Bearer {token('bob', ttl_s=3)}"}
    async with httpx.AsyncClient(timeout=10) as http:
        issued = (await http.post(server.base + "/api/user/sse/ticket", headers=short)).json()["ticket"]
    started = time.monotonic()
    async with SseClient(server.base, "bob", ticket=issued) as bob:
        await bob.wait_for(lambda e: e.event == "TOKEN_EXPIRED", timeout_s=10)
        for _ in range(50):
            if bob.ended:
                break
            await asyncio.sleep(0.1)
        assert bob.ended, "the server closed the stream"
    assert time.monotonic() - started < 8


async def test_hostile_content_arrives_as_one_event_with_the_text_intact(server: Server) -> None:
    async with SseClient(server.base, "carol") as carol:
        for content in HOSTILE:
            sent = await post(server.base, {"content": content, "targetType": "SELECTED", "targetIds": ["carol"]})
            assert sent.status_code == 201, sent.text
        got = await carol.wait_for(lambda e: e.event == "MESSAGE", count=len(HOSTILE))
        await asyncio.sleep(1.0)
        assert [e.data["content"] for e in carol.messages] == HOSTILE
        assert {e.event for e in carol.events} <= {"CONNECTED", "MESSAGE"}, "no event injected"
        assert all(e.id and e.id.startswith("s") for e in got)
    async with httpx.AsyncClient(timeout=10) as http:
        nul = await http.post(
            server.base + "/api/admin/broadcasts",
            json={"content": "a\u0000b", "targetType": "ALL"},
            headers=ADMIN,
        )
        assert nul.status_code == 400 and "NUL" in nul.json()["detail"]
        invalid_utf8 = await http.post(
            server.base + "/api/admin/broadcasts",
            content=b'{"content": "bad \xff\xfe bytes", "targetType": "ALL"}',
            headers={**ADMIN, "Content-Type": "application/json"},
        )
        assert invalid_utf8.status_code == 400 and invalid_utf8.headers["content-type"] == "application/problem+json"


async def test_the_connection_cap_holds_across_instances(env: dict[str, str], tmp_path: Path) -> None:
    first, second = Server(env, tmp_path, name="a"), Server(env, tmp_path, name="b")
    try:
        first.wait_live()
        second.wait_live()
        async with SseClient(first.base, "dora") as one, SseClient(second.base, "dora") as two:
            assert {one.events[0].event, two.events[0].event} == {"CONNECTED"}
            async with SseClient(first.base, "dora") as third, SseClient(second.base, "dora") as fourth:
                for refused in (third, fourth):
                    assert refused.events[0].event == "CONNECTION_LIMIT_REACHED"
                    assert refused.events[0].data == {"limit": 2}
        async with SseClient(second.base, "dora") as again:  # closed slots are free again at once
            assert again.events[0].event == "CONNECTED"
    finally:
        first.stop()
        second.stop()


async def test_connecting_too_fast_is_429_with_retry_after(server: Server) -> None:
    statuses: list[int] = []
    async with httpx.AsyncClient(timeout=10) as http:
        for _ in range(8):  # burst 6, refilled at 0.2/s
            response = await http.post(server.base + "/api/user/sse/ticket", headers=bearer("eve"))
            statuses.append(response.status_code)
        assert statuses[:6] == [201] * 6 and statuses[6:] == [429, 429]
        assert int(response.headers["retry-after"]) >= 1
        other = await http.post(server.base + "/api/user/sse/ticket", headers=bearer("frank"))
        assert other.status_code == 201, "the limit is per user"
    for _ in range(5):  # a stream opened with a ticket is one open: counted at the ticket, not again
        async with SseClient(server.base, "gus", ticket=await ticket_for(server.base, "gus")) as gus:
            assert gus.events[0].event == "CONNECTED"
    # counted twice, those 5 opens would have taken 10 of the 6 (+ refill) tokens; now about 1 is left
    async with httpx.AsyncClient(timeout=10) as http:
        more = [
            (await http.post(server.base + "/api/user/sse/ticket", headers=bearer("gus"))).status_code for _ in range(4)
        ]
    assert 429 in more and more.count(201) <= 2, more


# --------------------------------------------------------------------------- Kafka SASL/SCRAM
async def test_the_whole_pipeline_runs_through_the_scram_listener(
    stack: StackInfo, unique_name: str, tmp_path: Path
) -> None:
    scram = isolated_env(stack, unique_name, tmp_path, **scram_env(stack, stack.scram_password))
    server = Server(scram, tmp_path, name="scram")
    try:
        server.wait_live()
        async with SseClient(server.base, "alice") as alice:
            sent = await post(server.base, {"content": "via SCRAM", "targetType": "SELECTED", "targetIds": ["alice"]})
            assert sent.status_code == 201, sent.text
            [got] = await alice.wait_for(lambda e: e.event == "MESSAGE")
            assert got.data["content"] == "via SCRAM"
        everyone = await post(server.base, {"content": "all via SCRAM", "targetType": "ALL"})
        async with SseClient(server.base, "bob") as bob:
            [got] = await bob.wait_for(lambda e: e.event == "MESSAGE")
            assert got.data["broadcastId"] == everyone.json()["id"]
    finally:
        server.stop()
    assert stack.scram_password not in server.log.read_text()


def test_wrong_kafka_credentials_fail_fast_with_a_clear_error(stack: StackInfo, tmp_path: Path) -> None:
    wrong = "not-the-password-31337"
    variables = clean_env(
        BROADCAST_DATABASE__URL=f"sqlite+aiosqlite:///{tmp_path}/db.sqlite",
        **scram_env(stack, wrong),
    )
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "broadcast", "run", "--port", "0"],
        env=variables,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    elapsed = time.monotonic() - started
    output = done.stdout + done.stderr
    assert done.returncode != 0, output
    assert elapsed < 45, f"took {elapsed:.0f} s to give up"
    assert "authentication failed" in output.lower() or "invalid credentials" in output.lower(), output[-3000:]
    assert wrong not in output
