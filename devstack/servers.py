"""Real server processes on 127.0.0.1, as the test suite and the benchmark start them: ``python -m broadcast run``
on a free port, with the stack's variables isolated per test or scenario (a schema, topics, a consumer group and
a Redis prefix of its own). Standard library only: it needs nothing beyond the server's own dependencies."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from broadcast.core.settings import ServerSettings
from devstack.stack import StackInfo

START_TIMEOUT_S = 60.0
DEFAULT_GRACE_S = ServerSettings().shutdown_grace_seconds  # the server's own default budget (25 s)
STOP_SLACK_S = 10.0


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


def isolated_env(info: StackInfo, unique_name: str, cwd: Path, **overrides: str) -> dict[str, str]:
    """Variables for servers on the real stack with a schema, topics, consumer group and Redis prefix of
    their own (migrated and provisioned here), and fast loops; ``overrides`` add or replace variables."""
    variables = clean_env(
        **{
            **info.env(),
            "BROADCAST_DATABASE__SCHEMA_NAME": unique_name,
            "BROADCAST_KAFKA__TOPIC_PREFIX": f"{unique_name}.",
            "BROADCAST_KAFKA__CONSUMER_GROUP": f"{unique_name}-delivery",
            "BROADCAST_REDIS__KEY_PREFIX": f"{unique_name}:",
            "BROADCAST_SSE__RECONCILE_SECONDS": "1",
            "BROADCAST_RELAY__IDLE_POLL_SECONDS": "0.05",
            **overrides,
        }
    )
    for command in ("migrate", "topics"):
        done = cli(command, env=variables, cwd=cwd)
        assert done.returncode == 0, done.stdout + done.stderr
    return variables


class Server:
    """One ``broadcast-server run`` process; ``roles`` as for ``--roles`` (default: all)."""

    def __init__(
        self,
        env: dict[str, str],
        cwd: Path,
        roles: str | None = None,
        name: str = "server",
        prefix: Sequence[str] = (),
    ) -> None:
        """``prefix`` goes before the command (as ``ip netns exec <name>``: it must exec the command, so
        that ``proc`` is the server's own process)."""
        self._grace_s = float(env.get("BROADCAST_SERVER__SHUTDOWN_GRACE_SECONDS", DEFAULT_GRACE_S))
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = cwd / f"{name}.log"
        self._out = self.log.open("a")
        role_args = ["--roles", roles] if roles else []
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, "-m", "broadcast", "run", "--port", str(self.port), *role_args],
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
                with urllib.request.urlopen(self.base + "/health/live", timeout=1) as answer:  # noqa: S310 (our URL)
                    if answer.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                time.sleep(0.2)
        raise AssertionError(f"server not live within {START_TIMEOUT_S} s:\n{self.log.read_text()}")

    def stop(self) -> int:
        """SIGTERM, then wait as long as the server may take by its own shutdown budget (plus slack for a
        loaded machine) before a SIGKILL: a wait shorter than the budget failed teardowns of servers that were
        still within it (consumers leaving their group after a broker outage)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=self._grace_s + STOP_SLACK_S)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            self._out.close()
