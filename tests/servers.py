"""Fixtures for real server processes (``devstack/servers.py`` starts them), and variables tests give them."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from devstack.servers import Server
from devstack.stack import StackInfo


def scram_env(stack: StackInfo, password: str, username: str | None = None) -> dict[str, str]:
    """The server on the SASL_PLAINTEXT SCRAM-SHA-512 ports as ``username`` (the stack's ``app`` user)."""
    return {
        "BROADCAST_KAFKA__BOOTSTRAP_SERVERS": stack.kafka_scram_bootstrap,
        "BROADCAST_KAFKA__SECURITY_PROTOCOL": "SASL_PLAINTEXT",
        "BROADCAST_KAFKA__SASL_MECHANISM": "SCRAM-SHA-512",
        "BROADCAST_KAFKA__SASL_USERNAME": username or stack.scram_username,
        "BROADCAST_KAFKA__SASL_PASSWORD": password,
    }


def fast_retries(attempts: int, max_backoff_s: float = 1.0) -> dict[str, str]:
    """Variables making the delivery listeners give a failing record up after ``attempts``, quickly."""
    return {
        f"BROADCAST_CONSUMERS__{listener}__{name}": value
        for listener in ("SELECTED", "GROUP")
        for name, value in (
            ("MAX_ATTEMPTS", str(attempts)),
            ("INITIAL_BACKOFF_SECONDS", "0.2"),
            ("MAX_BACKOFF_SECONDS", str(max_backoff_s)),
        )
    }


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[list[Server]]:
    """Servers a test starts; each is stopped (SIGTERM, then SIGKILL) at teardown."""
    servers: list[Server] = []
    yield servers
    for s in servers:
        s.stop()


@pytest.fixture
def server(env: dict[str, str], tmp_path: Path, server_factory: list[Server]) -> Server:
    """One live server process (all roles) on the requesting module's ``env`` fixture."""
    started = Server(env, tmp_path)
    server_factory.append(started)
    started.wait_live()
    return started
