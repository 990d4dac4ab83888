"""Server processes for the benchmark scenarios: ours on the real stack, ours embedded, and the baseline.

Ours on the stack reuses the test suite's isolation (``devstack.servers``): a schema, topics, consumer group and
Redis prefix of its own, migrated and provisioned before the process starts. Production loop timings are
kept (the tests' 1 s reconciliation and 50 ms relay poll are put back to the defaults).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

import httpx

from bench.suite import ROOT, Context
from broadcast.core.settings import RelaySettings, SseSettings
from devstack.servers import Server, clean_env, free_port, isolated_env

DEFAULTS = {
    "BROADCAST_SSE__RECONCILE_SECONDS": str(SseSettings().reconcile_seconds),
    "BROADCAST_RELAY__IDLE_POLL_SECONDS": str(RelaySettings().idle_poll_seconds),
    "BROADCAST_SERVER__LOG_LEVEL": "warning",  # no access-log line per request or connection
    "BROADCAST_SERVER__SHUTDOWN_GRACE_SECONDS": "15",  # inside Server.stop's 20 s wait, even with 10k streams
}


def stack_env(ctx: Context, name: str, **overrides: str) -> dict[str, str]:
    """Variables for servers of one scenario run on the real stack (fresh schema, topics, group, prefix)."""
    unique = f"bench_{name.replace('-', '_')}_{uuid.uuid4().hex[:8]}"
    ctx.names.add(unique)  # its topics go when the scenario ends (Context.tidy)
    return isolated_env(ctx.stack(), unique, ctx.scratch, **{**DEFAULTS, **overrides})


class BenchServer(Server):
    """A ``devstack.servers.Server`` whose ``stop`` never raises: a server slower than the wait is killed, and
    the scenario's other servers are still stopped (the first full run leaked one that way)."""

    def stop(self) -> int:
        try:
            return super().stop()
        except subprocess.TimeoutExpired:
            return self.proc.wait()  # killed by Server.stop's own clean-up


def ours(env: dict[str, str], ctx: Context, name: str, roles: str | None = None, prefix: Sequence[str] = ()) -> Server:
    """One live ``broadcast-server run`` process (``Server.base``, ``.proc.pid``, ``.stop()``); ``prefix``
    execs it (``nice -n 10``)."""
    server = BenchServer(env, ctx.scratch, roles=roles, name=name, prefix=prefix)
    server.wait_live()
    return server


class Baseline:
    """The naive baseline (``bench/baseline/server.py``) under uvicorn, in its own process."""

    def __init__(self, ctx: Context, name: str = "baseline", *args: str, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = ctx.scratch / f"{name}-{self.port}.log"
        self._out = self.log.open("ab")
        variables = clean_env(PYTHONPATH=str(ROOT), **(env or {}))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.baseline.server", "--port", str(self.port), *args],
            cwd=ROOT,
            env=variables,
            stdout=self._out,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the baseline exited: {self.log.read_text()[-2000:]}")
            try:
                if httpx.get(self.base + "/health/live", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the baseline did not start: {self.log}")
            time.sleep(0.2)

    def stop(self) -> None:
        stop_process(self.proc)
        self._out.close()


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL after 20 s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))
