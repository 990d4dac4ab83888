"""The real console script as a newcomer runs it: embedded default, and on the real stack."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx

from broadcast.adapters.sql import migrate as sql_migrate
from broadcast.core import constants, envelope
from devstack.servers import Server, clean_env, cli
from devstack.stack import StackInfo
from tests.auth import bearer
from tests.topics import read_topic


def test_embedded_default_serves_health_and_stops_cleanly(server_factory: list[Server], tmp_path: Path) -> None:
    server = Server(clean_env(), tmp_path)
    server_factory.append(server)
    server.wait_live()
    ready = httpx.get(server.base + "/health/ready", timeout=5)
    assert ready.status_code == 200, ready.text
    assert ready.json()["checks"] == {"database": "ok", "loops": "ok", "consumers": "ok"}
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
    assert "postgresql" in migrated.stdout and f"revision {sql_migrate.head()}" in migrated.stdout
    topics = cli("topics", env=env, cwd=tmp_path)
    assert topics.returncode == 0, topics.stdout + topics.stderr
    assert (
        topics.stdout.count(" ok") == len(constants.ALL_TOPICS)
        and f"{unique_name}.broadcast-user-service-group-dlt" in topics.stdout
    )

    server = Server(env, tmp_path)
    server_factory.append(server)
    server.wait_live()
    ready = httpx.get(server.base + "/health/ready", timeout=10)
    assert ready.status_code == 200, ready.text
    checks = ready.json()["checks"]
    assert checks == {"database": "ok", "kafka": "ok", "redis": "ok", "loops": "ok", "consumers": "ok"}

    created = httpx.post(
        server.base + "/api/admin/broadcasts",
        json={"content": "hello from e2e", "targetType": "SELECTED", "targetIds": ["alice", "bob"]},
        headers={**bearer("admin", "admin"), "X-Correlation-ID": "e2e-1"},
        timeout=10,
    )
    assert created.status_code == 201, created.text
    broadcast_id = created.json()["id"]
    records = asyncio.run(read_topic(stack.kafka_bootstrap, f"{unique_name}.{constants.SELECTED_TOPIC}", 2))
    assert sorted(r.key or b"" for r in records) == [b"alice", b"bob"], "the server's own relay published them"
    assert {envelope.decode(r.value).broadcast_id for r in records} == {broadcast_id}
    assert server.stop() == 0
