"""The real console script as a newcomer runs it: embedded default, and on the real stack."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from broadcast import constants, envelope
from devstack.stack import StackInfo
from tests.topics import read_topic

START_TIMEOUT_S = 60.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROADCAST_")}
    env.update(extra)
    return env


def cli(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "broadcast", *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=120
    )


class Server:
    def __init__(self, env: dict[str, str], cwd: Path) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = cwd / "server.log"
        self._out = self.log.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "broadcast", "run", "--port", str(self.port)],
            env=env,
            cwd=cwd,
            stdout=self._out,
            stderr=subprocess.STDOUT,
        )

    def wait_live(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"server exited early:\n{self.log.read_text()}"
            try:
                if httpx.get(self.base + "/health/live", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.2)
        raise AssertionError(f"server not live within {START_TIMEOUT_S} s:\n{self.log.read_text()}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=20)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            self._out.close()


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[list[Server]]:
    servers: list[Server] = []
    yield servers
    for s in servers:
        s.stop()


def test_embedded_default_serves_health_and_stops_cleanly(server_factory: list[Server], tmp_path: Path) -> None:
    server = Server(clean_env(), tmp_path)
    server_factory.append(server)
    server.wait_live()
    ready = httpx.get(server.base + "/health/ready", timeout=5)
    assert ready.status_code == 200, ready.text
    assert ready.json()["checks"] == {"database": "ok"}
    assert server.stop() == 0
    assert "embedded default: single process" in server.log.read_text()
    assert (tmp_path / "broadcast.db").exists()


def test_stack_env_serves_on_kafka_postgres_and_redis(
    stack: StackInfo, unique_name: str, server_factory: list[Server], tmp_path: Path
) -> None:
    env = clean_env(
        **stack.env(),
        BROADCAST_DATABASE__SCHEMA_NAME=unique_name,
        BROADCAST_KAFKA__TOPIC_PREFIX=f"{unique_name}.",
    )
    refused = Server(env, tmp_path)
    assert refused.proc.wait(timeout=60) != 0, "an unmigrated database must be refused"
    assert "broadcast-server migrate" in refused.log.read_text()
    refused.stop()

    migrated = cli("migrate", env=env, cwd=tmp_path)
    assert migrated.returncode == 0, migrated.stderr
    assert "postgresql" in migrated.stdout and "revision 0001" in migrated.stdout
    topics = cli("topics", env=env, cwd=tmp_path)
    assert topics.returncode == 0, topics.stdout + topics.stderr
    assert topics.stdout.count(" ok") == 4 and f"{unique_name}.broadcast-user-service-group-dlt" in topics.stdout

    server = Server(env, tmp_path)
    server_factory.append(server)
    server.wait_live()
    ready = httpx.get(server.base + "/health/ready", timeout=10)
    assert ready.status_code == 200, ready.text
    assert ready.json()["checks"] == {"database": "ok", "kafka": "ok", "redis": "ok"}

    created = httpx.post(
        server.base + "/api/admin/broadcasts",
        json={"content": "hello from e2e", "targetType": "SELECTED", "targetIds": ["alice", "bob"]},
        headers={"X-Dev-User": "admin", "X-Correlation-ID": "e2e-1"},
        timeout=10,
    )
    assert created.status_code == 201, created.text
    broadcast_id = created.json()["id"]
    records = asyncio.run(read_topic(stack.kafka_bootstrap, f"{unique_name}.{constants.SELECTED_TOPIC}", 2))
    assert sorted(r.key or b"" for r in records) == [b"alice", b"bob"], "the server's own relay published them"
    assert {envelope.decode(r.value).broadcast_id for r in records} == {broadcast_id}
    assert server.stop() == 0
