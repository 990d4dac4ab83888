"""RELIABILITY #28, a half-open TCP client: a browser that vanishes without FIN or RST (its link drops) must
not keep its stream and its per-user slot until TCP gives up (~15 minutes). Here the client runs in a network
namespace this test creates, behind a veth pair; taking the client's end down drops its packets silently.

The server detects the dead peer within about ``SSE__DEAD_PEER_SECONDS`` (TCP keepalive and
TCP_USER_TIMEOUT on stream sockets, the heartbeats being the unacknowledged data), ends the stream and frees
the slot: with one connection allowed per user, the same user can connect again.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from devstack.servers import Server, clean_env
from tests.auth import token
from tests.sse_client import SseClient

DEAD_PEER_S = 3.0
GIVE_UP_S = 30.0  # far below TCP's own ~15 minutes, far above the promise
CLIENT = """
import socket, sys, time
sock = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
sock.sendall(("GET /api/user/sse/connect HTTP/1.1\\r\\nHost: t\\r\\nAccept: text/event-stream\\r\\n"
              "Authorization: Bearer " + sys.argv[3] + "\\r\\n\\r\\n").encode())
seen = b""
while b"CONNECTED" not in seen:
    seen += sock.recv(4096)
print("connected", flush=True)
time.sleep(3600)
"""


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


@pytest.fixture
def namespace() -> Iterator[tuple[str, str, str]]:
    """(namespace, the client's interface in it, the server's address on the host side)."""
    tag = uuid.uuid4().hex[:6]
    name, host_if, client_if = f"bs-{tag}", f"vs{tag}", f"vc{tag}"
    octet = int(tag[:2], 16)
    server_ip, client_ip = f"10.231.{octet}.1", f"10.231.{octet}.2"
    ip("netns", "add", name)
    try:
        ip("link", "add", host_if, "type", "veth", "peer", "name", client_if)
        ip("link", "set", client_if, "netns", name)
        ip("addr", "add", f"{server_ip}/30", "dev", host_if)
        ip("link", "set", host_if, "up")
        ip("netns", "exec", name, "ip", "addr", "add", f"{client_ip}/30", "dev", client_if)
        ip("netns", "exec", name, "ip", "link", "set", client_if, "up")
        ip("netns", "exec", name, "ip", "link", "set", "lo", "up")
        yield name, client_if, server_ip
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10)
        subprocess.run(["ip", "link", "del", host_if], capture_output=True, timeout=10)


async def test_a_client_that_vanishes_without_fin_or_rst_frees_its_stream_and_slot(
    namespace: tuple[str, str, str], tmp_path: Path
) -> None:
    name, client_if, server_ip = namespace
    env = clean_env(
        BROADCAST_SERVER__HOST=server_ip,
        BROADCAST_SSE__MAX_CONNECTIONS_PER_USER="1",
        BROADCAST_SSE__HEARTBEAT_SECONDS="1",
        BROADCAST_SSE__DEAD_PEER_SECONDS=str(DEAD_PEER_S),
    )
    server = Server(env, tmp_path)
    server.base = f"http://{server_ip}:{server.port}"
    client = None
    try:
        server.wait_live()
        client = await asyncio.create_subprocess_exec(
            *("ip", "netns", "exec", name, sys.executable, "-c", CLIENT, server_ip, str(server.port), token("alice")),
            stdout=asyncio.subprocess.PIPE,
        )
        assert client.stdout is not None
        assert (await asyncio.wait_for(client.stdout.readline(), 20)).strip() == b"connected"
        async with SseClient(server.base, "alice") as second:
            assert second.events[0].event == "CONNECTION_LIMIT_REACHED", "the slot is held while the client lives"

        ip("netns", "exec", name, "ip", "link", "set", client_if, "down")  # no FIN, no RST: packets vanish
        lost_at = time.monotonic()
        while True:
            async with SseClient(server.base, "alice") as again:
                if again.events[0].event == "CONNECTED":
                    break
            assert time.monotonic() - lost_at < GIVE_UP_S, "the dead client still holds its slot"
            await asyncio.sleep(0.5)
        freed_after = time.monotonic() - lost_at
        assert freed_after < DEAD_PEER_S + 1 + 5, f"freed after {freed_after:.1f} s"  # + a heartbeat + slack
        print(f"half-open client: stream and slot freed {freed_after:.1f} s after its link dropped")
    finally:
        if client is not None and client.returncode is None:
            client.kill()
            await client.wait()
        server.stop()
