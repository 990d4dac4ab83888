"""Where the stack keeps things, and the fixed ports and credentials it serves on.

Cache (downloaded jars): ``$BROADCAST_CACHE_DIR`` or ``~/.cache/broadcast-server``.
State (data, logs, pid files): ``$BROADCAST_STACK_DIR`` or ``/var/tmp/broadcast-stack`` — outside ``/root``
because the ``postgres`` OS user must reach its data directory.
"""

from __future__ import annotations

import os
from pathlib import Path

HOST = "127.0.0.1"
KAFKA_VERSION = "4.1.1"
KAFKA_NODES = (1, 2, 3)
POSTGRES_PORT = 15432
REDIS_PORT = 16379
DB_NAME = "broadcast"
DB_USER = "broadcast"
DB_PASSWORD = "broadcast"  # noqa: S105 - a local test-stack credential
SCRAM_USERS = {"admin": "admin-secret", "app": "app-secret"}
SCRAM_MECHANISM = "SCRAM-SHA-512"


def kafka_plain_port(node: int) -> int:
    """The PLAINTEXT (INTERNAL listener) port of node 1..3: 11092, 12092, 13092."""
    return 10_000 + node * 1_000 + 92


def kafka_controller_port(node: int) -> int:
    """The KRaft controller port of node 1..3: 11093, 12093, 13093."""
    return 10_000 + node * 1_000 + 93


def kafka_scram_port(node: int) -> int:
    """The SASL_PLAINTEXT SCRAM-SHA-512 client port of node 1..3: 11094, 12094, 13094."""
    return 10_000 + node * 1_000 + 94


def cache_dir() -> Path:
    """The directory for downloaded artifacts, shared by all state dirs."""
    raw = os.environ.get("BROADCAST_CACHE_DIR")
    return Path(raw).resolve() if raw else Path.home() / ".cache" / "broadcast-server"


def state_dir() -> Path:
    """The directory holding data, logs and pid files of the running stack."""
    raw = os.environ.get("BROADCAST_STACK_DIR")
    return Path(raw).resolve() if raw else Path("/var/tmp/broadcast-stack")  # noqa: S108 - must be reachable by postgres


def kafka_dir() -> Path:
    """Kafka's part of the state dir: node properties, log dirs, pid files and logs."""
    return state_dir() / "kafka"


def postgres_dir() -> Path:
    """PostgreSQL's part of the state dir (owned by the ``postgres`` OS user when run as root)."""
    return state_dir() / "postgres"


def redis_dir() -> Path:
    """Redis's part of the state dir."""
    return state_dir() / "redis"
