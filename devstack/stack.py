"""The public API of the local stack: ``up``, ``down``, ``status``, ``info`` and the Kafka and Redis fault hooks.

Synchronous on purpose (a pytest session fixture and the CLI call it). ``up`` is idempotent: it installs
what is missing, starts what is not running, reuses what is healthy and waits until all three parts —
Kafka (3 KRaft nodes), PostgreSQL and Redis — are ready. Processes outlive the caller; ``down`` stops them
by their recorded pids only.
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass
from typing import Any

from devstack import kafka, paths, postgres, proc, redis
from devstack.proc import StackError

__all__ = [
    "StackError",
    "StackInfo",
    "down",
    "info",
    "kafka_node_pid",
    "kill_kafka_node",
    "pause_redis",
    "redis_pid",
    "restart_redis",
    "resume_redis",
    "set_scram_user",
    "start_kafka_node",
    "start_redis",
    "status",
    "stop_redis",
    "up",
]


@dataclass(frozen=True)
class StackInfo:
    """How to reach the running stack."""

    kafka_bootstrap: str
    kafka_scram_bootstrap: str
    scram_username: str
    scram_password: str
    postgres_url: str
    redis_url: str

    def env(self) -> dict[str, str]:
        """Exactly the ``BROADCAST_*`` variables that point the server at this stack."""
        return {
            "BROADCAST_KAFKA__BOOTSTRAP_SERVERS": self.kafka_bootstrap,
            "BROADCAST_DATABASE__URL": self.postgres_url,
            "BROADCAST_REDIS__URL": self.redis_url,
        }


def info() -> StackInfo:
    """The stack's addresses and credentials (fixed; does not check that anything runs)."""
    h = paths.HOST
    return StackInfo(
        kafka_bootstrap=kafka.bootstrap(),
        kafka_scram_bootstrap=",".join(f"{h}:{paths.kafka_scram_port(n)}" for n in paths.KAFKA_NODES),
        scram_username="app",
        scram_password=paths.SCRAM_USERS["app"],
        postgres_url=f"postgresql+asyncpg://{paths.DB_USER}:{paths.DB_PASSWORD}@{h}:{paths.POSTGRES_PORT}/{paths.DB_NAME}",
        redis_url=f"redis://{h}:{paths.REDIS_PORT}/0",
    )


def up(timings: dict[str, float] | None = None) -> StackInfo:
    """Install what is missing, start what is not running and wait until everything is ready.

    Safe to call again at any time. If ``timings`` is given, it receives seconds spent per part.
    Raises :class:`StackError` (with the log to look at) if a part cannot start.
    """
    spent = timings if timings is not None else {}
    paths.state_dir().mkdir(parents=True, exist_ok=True)
    paths.state_dir().chmod(0o755)
    with proc.locked(paths.state_dir()):
        _up(spent)
    return info()


def _up(spent: dict[str, float]) -> None:
    """The body of :func:`up`, run under the state-dir lock; records seconds per part in ``spent``."""
    t0 = time.monotonic()
    kafka.prepare()  # jars + configs + format (may download)
    kafka.start()  # returns at once; the JVMs boot while PostgreSQL and Redis start
    spent["kafka-prepare"] = time.monotonic() - t0

    t1 = time.monotonic()
    postgres.start()
    proc.wait_until(postgres.ready, 60.0, "PostgreSQL to answer a query")
    spent["postgres"] = time.monotonic() - t1

    t2 = time.monotonic()
    redis.start()
    spent["redis"] = time.monotonic() - t2

    t3 = time.monotonic()
    kafka.wait_ready()
    kafka.ensure_offsets_topic()
    spent["kafka-ready"] = time.monotonic() - t3
    spent["total"] = time.monotonic() - t0


def down() -> None:
    """Stop Kafka, PostgreSQL and Redis if running (by recorded pids only). Idempotent."""
    if not paths.state_dir().exists():
        return
    with proc.locked(paths.state_dir()):
        kafka.stop()
        postgres.stop()
        redis.stop()


def status() -> dict[str, dict[str, Any]]:
    """Per component: ``running`` (bool), ``pids``, ``ports`` and ``ready`` (bool)."""
    brokers = kafka.registered_brokers()
    result: dict[str, dict[str, Any]] = {}
    for node in paths.KAFKA_NODES:
        pid = kafka.node_pid(node)
        result[f"kafka-{node}"] = {
            "running": pid is not None,
            "pids": [pid] if pid else [],
            "ports": kafka.ports(node),
            "ready": pid is not None and node in brokers,
        }
    pg_pid = postgres.pid()
    result["postgres"] = {
        "running": pg_pid is not None,
        "pids": [pg_pid] if pg_pid else [],
        "ports": [paths.POSTGRES_PORT],
        "ready": pg_pid is not None and postgres.ready(),
    }
    redis_pid = redis.pid()
    result["redis"] = {
        "running": redis_pid is not None,
        "pids": [redis_pid] if redis_pid else [],
        "ports": [paths.REDIS_PORT],
        "ready": redis_pid is not None and redis.ready(),
    }
    return result


def kafka_node_pid(node: int) -> int | None:
    """The pid of Kafka node 1..3 if it is running, else None."""
    _check_node(node)
    return kafka.node_pid(node)


def kill_kafka_node(node: int, sig: int = signal.SIGKILL) -> None:
    """Signal Kafka node 1..3 (SIGKILL by default); for SIGKILL/SIGTERM, returns once it has exited.

    ``signal.SIGSTOP``/``signal.SIGCONT`` pause and resume it instead. A node that is not running is a no-op.
    """
    _check_node(node)
    kafka.kill_node(node, sig)


def start_kafka_node(node: int, wait: bool = True, timeout: float = kafka.READY_TIMEOUT) -> None:
    """Restart Kafka node 1..3 with its original command (never reformats it).

    With ``wait`` (the default) returns once the node is a registered broker again. Blocking: from async
    code prefer ``await asyncio.to_thread(start_kafka_node, n)``.
    """
    _check_node(node)
    with proc.locked(paths.state_dir()):
        kafka.start_node(node)
    if wait:
        kafka.wait_ready((node,), timeout)


def _check_node(node: int) -> None:
    if node not in paths.KAFKA_NODES:
        raise ValueError(f"Kafka node must be one of {paths.KAFKA_NODES}, not {node!r}")


def redis_pid() -> int | None:
    """The pid of the stack's Redis if it is running, else None."""
    return redis.pid()


def stop_redis() -> None:
    """Stop Redis (SIGTERM, SIGKILL after 10 s; a paused one is resumed first); returns once it has exited.

    Redis runs without persistence, so its data (presence, subscriptions) is gone. A stopped Redis is a no-op.
    """
    with proc.locked(paths.state_dir()):
        redis.stop()


def start_redis() -> None:
    """Start Redis again on its fixed port (no-op if running); returns once it answers PING."""
    with proc.locked(paths.state_dir()):
        redis.start()


def restart_redis() -> None:
    """``stop_redis`` then ``start_redis``: an empty Redis on the same port. Blocking, like the Kafka hooks."""
    stop_redis()
    start_redis()


def pause_redis() -> None:
    """SIGSTOP Redis: its port still accepts connections but nothing answers (a hung server)."""
    redis.send_signal(signal.SIGSTOP)


def resume_redis() -> None:
    """SIGCONT a paused Redis (no-op if it runs normally or is not running)."""
    redis.send_signal(signal.SIGCONT)


def set_scram_user(user: str, password: str | None) -> None:
    """Add or change ``user``'s SCRAM-SHA-512 credential on the running cluster; None deletes it. Blocking
    (a JVM runs ``ConfigCommand``): from async code ``await asyncio.to_thread(set_scram_user, …)``."""
    kafka.set_scram_user(user, password)
