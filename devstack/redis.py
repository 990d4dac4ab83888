"""Redis from Debian's packages on 127.0.0.1:16379, without persistence, run in the foreground mode
(``--daemonize no``) as a detached background process whose pid is recorded in the state dir."""

from __future__ import annotations

import shutil
import signal
import socket
from pathlib import Path

from devstack import paths, proc


def pid_file() -> Path:
    return paths.redis_dir() / "redis.pid"


def log_file() -> Path:
    return paths.redis_dir() / "redis.log"


def _marker() -> str:
    # redis rewrites its process title to "<binary> 127.0.0.1:16379", so the marker is the address.
    return f"{paths.HOST}:{paths.REDIS_PORT}"


def pid() -> int | None:
    """The pid of the Redis server we started, or None."""
    return proc.read_pid(pid_file())


def start() -> None:
    """Install Redis if missing and start it unless running; waits until it answers PING."""
    proc.ensure_binaries(["redis-server"], ["redis-server"])
    paths.redis_dir().mkdir(parents=True, exist_ok=True)
    if pid() is None:
        proc.ensure_free([paths.REDIS_PORT], "Redis")
        binary = shutil.which("redis-server") or "redis-server"
        argv = [
            binary,
            "--port",
            str(paths.REDIS_PORT),
            "--bind",
            paths.HOST,
            "--daemonize",
            "no",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(paths.redis_dir()),
        ]
        started = proc.spawn_detached(argv, log_file(), cwd=paths.redis_dir())
        proc.wait_until(lambda: ready() or not proc.is_running(started), 20.0, "Redis to answer PING", 0.05)
        if not ready():
            raise proc.StackError(f"Redis exited at start; see {log_file()}")
        proc.write_pid(pid_file(), started, _marker())
    proc.wait_until(ready, 20.0, "Redis to answer PING", 0.05)


def ready() -> bool:
    """True if Redis answers PING with PONG."""
    try:
        with socket.create_connection((paths.HOST, paths.REDIS_PORT), timeout=1.0) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def stop() -> None:
    """SIGTERM the recorded Redis pid (SIGKILL after 10 s); returns once it has exited (port released)."""
    running = pid()
    if running is not None:
        proc.signal_pid(running, signal.SIGCONT)  # a paused (SIGSTOPped) Redis cannot act on SIGTERM
        proc.terminate([running], grace=10.0)


def send_signal(sig: int) -> None:
    """Send ``sig`` to the recorded Redis pid (e.g. SIGSTOP/SIGCONT to pause it); no-op if not running."""
    running = pid()
    if running is not None:
        proc.signal_pid(running, sig)
