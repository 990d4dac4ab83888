"""Delivery end to end: real uvicorn processes on the real stack, real SSE clients."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from devstack.servers import Server, isolated_env
from devstack.stack import StackInfo
from tests.auth import bearer
from tests.sse_client import SseClient

ADMIN = bearer("admin", "admin")


@pytest.fixture
def env(stack: StackInfo, unique_name: str, tmp_path: Path) -> Iterator[dict[str, str]]:
    """A migrated schema and provisioned topics of this test's own, and fast loops."""
    yield isolated_env(stack, unique_name, tmp_path, BROADCAST_SSE__MAX_CONNECTIONS_PER_USER="3")


async def post(base: str, body: dict[str, Any]) -> dict[str, Any]:
    async with httpx.AsyncClient(timeout=20) as http:
        response = await http.post(base + "/api/admin/broadcasts", json=body, headers=ADMIN)
    assert response.status_code == 201, response.text
    result: dict[str, Any] = response.json()
    return result


async def test_online_and_offline_users_get_a_selected_message_once(server: Server) -> None:
    async with SseClient(server.base, "alice") as alice, SseClient(server.base, "carol") as carol:
        sent = await post(server.base, {"content": "hello", "targetType": "SELECTED", "targetIds": ["alice", "bob"]})
        [got] = await alice.wait_for(lambda e: e.event == "MESSAGE")
        assert got.data["broadcastId"] == sent["id"] and got.data["content"] == "hello"
        async with SseClient(server.base, "bob") as bob:
            await bob.wait_for(lambda e: e.event == "MESSAGE")
            await asyncio.sleep(1.5)  # a reconciliation round must not repeat it
            assert [m.data["broadcastId"] for m in bob.messages] == [sent["id"]]
        assert len(alice.messages) == 1
        assert carol.messages == []
    async with httpx.AsyncClient() as http:
        for _ in range(40):
            stats = (await http.get(f"{server.base}/api/admin/broadcasts/{sent['id']}/stats", headers=ADMIN)).json()
            if stats["delivered"] == 2:
                break
            await asyncio.sleep(0.25)
    assert (stats["targeted"], stats["delivered"], stats["pending"]) == (2, 2, 0)


async def test_all_and_role_broadcasts_reach_exactly_the_matching_users(server: Server) -> None:
    async with httpx.AsyncClient() as http:
        for user, roles in (("alice", ["ops"]), ("bob", []), ("carol", ["ops"])):
            r = await http.put(f"{server.base}/api/admin/users/{user}", json={"roles": roles}, headers=ADMIN)
            assert r.status_code == 200, r.text
    async with (
        SseClient(server.base, "alice") as alice,
        SseClient(server.base, "alice") as alice_tab,
        SseClient(server.base, "bob") as bob,
    ):
        ops = await post(server.base, {"content": "ops only", "targetType": "ROLE", "targetIds": ["ops"]})
        everyone = await post(server.base, {"content": "everyone", "targetType": "ALL"})
        await alice.wait_for(lambda e: e.event == "MESSAGE", count=2)
        await alice_tab.wait_for(lambda e: e.event == "MESSAGE", count=2)
        await bob.wait_for(lambda e: e.event == "MESSAGE")
        await asyncio.sleep(1.0)
        assert {m.data["broadcastId"] for m in alice.messages} == {ops["id"], everyone["id"]}
        assert {m.data["broadcastId"] for m in alice_tab.messages} == {ops["id"], everyone["id"]}
        assert [m.data["broadcastId"] for m in bob.messages] == [everyone["id"]]
    async with SseClient(server.base, "carol") as carol:  # offline until now: gets both on connect
        await carol.wait_for(lambda e: e.event == "MESSAGE", count=2)
        assert {m.data["broadcastId"] for m in carol.messages} == {ops["id"], everyone["id"]}
        await asyncio.sleep(1.0)  # delivery marks are flushed in batches
    async with httpx.AsyncClient() as http:
        for broadcast, delivered in ((everyone, 3), (ops, 2)):  # what the streams got, live or on connect
            url = f"{server.base}/api/admin/broadcasts/{broadcast['id']}"
            stats = (await http.get(url + "/stats", headers=ADMIN)).json()
            assert (stats["targeted"], stats["delivered"], stats["read"]) == (delivered, delivered, 0), stats
            # DESIGN §2: a group broadcast costs no row per user (alice's two tabs count once, above)
            assert (await http.get(url + "/deliveries", headers=ADMIN)).json()["items"] == [], "no row per user"


async def test_resume_with_last_event_id_replays_everything_missed_in_order_once(server: Server) -> None:
    async with SseClient(server.base, "alice") as alice:
        await post(server.base, {"content": "before", "targetType": "SELECTED", "targetIds": ["alice"]})
        await alice.wait_for(lambda e: e.event == "MESSAGE")
        cursor = alice.last_event_id
    assert cursor is not None
    missed = [
        (await post(server.base, {"content": f"m{n}", "targetType": "SELECTED", "targetIds": ["alice"]}))["id"]
        for n in range(50)
    ]
    async with SseClient(server.base, "alice", last_event_id=cursor) as again:
        await again.wait_for(lambda e: e.event == "MESSAGE", count=50)
        await asyncio.sleep(1.5)  # nothing more may arrive (no duplicates from live path or reconciliation)
        assert [m.data["broadcastId"] for m in again.messages] == missed
        assert not [e for e in again.events if e.event == "RESYNC"]


async def test_read_in_one_tab_syncs_the_other_and_cancel_removes_the_message(server: Server) -> None:
    async with SseClient(server.base, "alice") as tab1, SseClient(server.base, "alice") as tab2:
        sent = await post(server.base, {"content": "read me", "targetType": "SELECTED", "targetIds": ["alice"]})
        await tab1.wait_for(lambda e: e.event == "MESSAGE")
        await tab2.wait_for(lambda e: e.event == "MESSAGE")
        async with httpx.AsyncClient() as http:
            read = await http.post(
                server.base + "/api/user/messages/read",
                json={"broadcastIds": [sent["id"]]},
                headers=bearer("alice"),
            )
            assert read.json() == {"read": [sent["id"]]}
            again = await http.post(
                server.base + "/api/user/messages/read",
                json={"broadcastIds": [sent["id"]]},
                headers=bearer("alice"),
            )
            assert again.json() == {"read": []}, "marking read twice is idempotent"
            await tab2.wait_for(lambda e: e.event == "READ_RECEIPT" and e.data["broadcastId"] == sent["id"])
            unread = (await http.get(server.base + "/api/user/messages/unread", headers=bearer("alice"))).json()
            assert unread["count"] == 0
            cancelled = await http.delete(f"{server.base}/api/admin/broadcasts/{sent['id']}", headers=ADMIN)
            assert cancelled.status_code == 200
        for tab in (tab1, tab2):
            [removed] = await tab.wait_for(lambda e: e.event == "MESSAGE_REMOVED")
            assert removed.data == {"broadcastId": sent["id"], "reason": "CANCELLED"}
    async with httpx.AsyncClient() as http:
        inbox = (await http.get(server.base + "/api/user/messages", headers=bearer("alice"))).json()
    assert inbox["items"] == []


async def test_bad_resume_ids_and_too_many_connections_have_clear_outcomes(server: Server) -> None:
    sent = await post(server.base, {"content": "x", "targetType": "SELECTED", "targetIds": ["alice"]})
    for n, garbage in enumerate(("banana", "s999999999", "g99999999999999999", "s-1", "s1" + "0" * 30)):
        async with SseClient(server.base, "alice", last_event_id=garbage) as client:
            await client.wait_for(lambda e: e.event == "RESYNC")
            if n == 0:  # still pending: sent after the RESYNC; later streams rely on the refetched inbox
                [message] = await client.wait_for(lambda e: e.event == "MESSAGE")
                assert message.data["broadcastId"] == sent["id"]
    async with httpx.AsyncClient() as http:
        inbox = (await http.get(server.base + "/api/user/messages", headers=bearer("alice"))).json()
    assert [m["broadcastId"] for m in inbox["items"]] == [sent["id"]]
    async with (
        SseClient(server.base, "dave"),
        SseClient(server.base, "dave"),
        SseClient(server.base, "dave"),
        SseClient(server.base, "dave") as fourth,
    ):
        [limit] = await fourth.wait_for(lambda e: e.event == "CONNECTION_LIMIT_REACHED")
        assert limit.data == {"limit": 3}
    async with httpx.AsyncClient() as http:
        anonymous = await http.get(server.base + "/api/user/sse/connect")
    assert anonymous.status_code == 401
    assert anonymous.headers["content-type"] == "application/problem+json"


async def test_a_user_on_one_instance_gets_what_another_instance_consumed(
    env: dict[str, str], tmp_path: Path, server_factory: list[Server]
) -> None:
    edge = Server(env, tmp_path, roles="api", name="edge")
    worker = Server(env, tmp_path, roles="api,relay,consumers,scheduler", name="worker")
    server_factory += [edge, worker]
    edge.wait_live()
    worker.wait_live()
    async with SseClient(edge.base, "alice") as alice:
        await asyncio.sleep(0.5)
        sent = await post(worker.base, {"content": "across", "targetType": "SELECTED", "targetIds": ["alice"]})
        everyone = await post(worker.base, {"content": "all", "targetType": "ALL"})
        await alice.wait_for(lambda e: e.event == "MESSAGE", count=2)
        assert {m.data["broadcastId"] for m in alice.messages} == {sent["id"], everyone["id"]}
    assert "delivery-selected" not in edge.log.read_text(), "the edge instance runs no consumers"


async def test_shutdown_tells_open_streams_and_exits_promptly(server: Server) -> None:
    async with SseClient(server.base, "alice") as alice, SseClient(server.base, "bob") as bob:
        started = asyncio.get_running_loop().time()
        server.proc.send_signal(signal.SIGTERM)
        for client in (alice, bob):
            [farewell] = await client.wait_for(lambda e: e.event == "SERVER_SHUTDOWN", timeout_s=10)
            assert farewell.data == {"reconnectInMs": 3000}
        code = await asyncio.to_thread(server.proc.wait, 30)
        assert code == 0
        assert asyncio.get_running_loop().time() - started < 15, "open streams must not hold the shutdown"


async def test_a_connect_sends_at_most_the_newest_k_and_says_resync_when_there_were_more(
    env: dict[str, str], tmp_path: Path, server_factory: list[Server]
) -> None:
    """Invariant 3 at the client: a stream that cannot send everything says RESYNC, and what it sends is the
    newest (here K = 3 of 5 unread ALL broadcasts), for a fresh connect and for a resume alike."""
    started = Server({**env, "BROADCAST_SSE__REPLAY_LIMIT": "3"}, tmp_path)
    server_factory.append(started)
    started.wait_live()
    sent = [(await post(started.base, {"content": f"n{n}", "targetType": "ALL"}))["id"] for n in range(5)]
    async with SseClient(started.base, "newbie") as newbie:
        await newbie.wait_for(lambda e: e.event == "MESSAGE", count=3)
        await asyncio.sleep(0.5)
        names = [e.event for e in newbie.events if e.event in {"CONNECTED", "RESYNC", "MESSAGE"}]
        assert names == ["CONNECTED", "RESYNC", "MESSAGE", "MESSAGE", "MESSAGE"], names
        assert [m.data["broadcastId"] for m in newbie.messages] == sent[-3:], "the newest three, in order"
        first = newbie.messages[0].id
    for _ in range(2):
        await post(started.base, {"content": "later", "targetType": "ALL"})
    async with SseClient(started.base, "newbie", last_event_id=first) as back:
        await back.wait_for(lambda e: e.event == "MESSAGE", count=3)
        assert [e.event for e in back.events if e.event in {"CONNECTED", "RESYNC"}] == ["CONNECTED", "RESYNC"]
