"""Process plumbing shared by the stack parts: detached spawning, pid records, signalling, ports, apt.

Every process the stack starts is recorded in a pid file as ``{"pid", "start_time", "marker"}``. A pid is
only ever signalled after checking it is still *that* process: same kernel start time, a command line
containing the marker, and not a zombie. Nothing here looks processes up by name.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

_apt_updated = False


class StackError(RuntimeError):
    """A stack part could not be installed, started or checked; the message says what to look at."""


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (index 0 = state), or None if gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw.rsplit(")", 1)[1].split()


def start_time(pid: int) -> int | None:
    """The kernel start time of ``pid`` in clock ticks, or None if no such process."""
    fields = _stat_fields(pid)
    return int(fields[19]) if fields else None


def cmdline(pid: int) -> str:
    """The command line of ``pid`` joined by spaces ('' if gone)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def is_running(pid: int, marker: str = "", started: int | None = None) -> bool:
    """True if ``pid`` exists, is not a zombie, its command line has ``marker`` and start time matches."""
    fields = _stat_fields(pid)
    if not fields or fields[0] in ("Z", "X"):
        return False
    if started is not None and int(fields[19]) != started:
        return False
    return marker in cmdline(pid)


def write_pid(path: Path, pid: int, marker: str) -> None:
    """Record ``pid`` (with its start time and identifying marker) in ``path``."""
    record = {"pid": pid, "start_time": start_time(pid), "marker": marker}
    path.write_text(json.dumps(record) + "\n")


def read_pid(path: Path) -> int | None:
    """The pid recorded in ``path`` if that process is still the one recorded, else None."""
    try:
        record = json.loads(path.read_text())
        pid, started, marker = int(record["pid"]), record.get("start_time"), str(record["marker"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return pid if is_running(pid, marker, started) else None


def spawn_detached(argv: Sequence[str], log: Path, cwd: Path, env: Mapping[str, str] | None = None) -> int:
    """Start ``argv`` in its own session, detached from this process (it outlives us); return its pid.

    A short-lived ``sh`` backgrounds the command and exits, so the command is re-parented to init and is
    never a zombie child of a long-running caller such as a pytest session. Output is appended to ``log``.
    """
    script = 'exec "$@" >>"$DEVSTACK_LOG" 2>&1 </dev/null'
    launcher = f"sh -c '{script}' devstack-launch \"$@\" & echo $!"
    full_env = dict(env if env is not None else os.environ)
    full_env["DEVSTACK_LOG"] = str(log)
    out = subprocess.run(
        ["sh", "-c", launcher, "devstack-spawn", *argv],
        cwd=cwd,
        env=full_env,
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        check=True,
        start_new_session=True,
        text=True,
    ).stdout
    pid = int(out.strip())
    # ``exec`` replaces the shell; wait until the pid shows the real command.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and argv[0] not in cmdline(pid).split(" ", 1)[0]:
        time.sleep(0.01)
    return pid


def signal_pid(pid: int, sig: int) -> None:
    """Send ``sig`` to ``pid``, ignoring a process that has just gone."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def wait_gone(pids: Iterable[int], timeout: float) -> list[int]:
    """Wait until none of ``pids`` runs (zombies count as gone); return those still running."""
    left = list(pids)
    deadline = time.monotonic() + timeout
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = [p for p in left if is_running(p)]
    return [p for p in left if is_running(p)]


def terminate(pids: Sequence[int], grace: float = 20.0) -> None:
    """SIGTERM all ``pids`` at once, wait up to ``grace`` seconds, then SIGKILL what is left."""
    for pid in pids:
        signal_pid(pid, signal.SIGTERM)
    for pid in wait_gone(pids, grace):
        signal_pid(pid, signal.SIGKILL)
    wait_gone(pids, 5.0)


def port_open(port: int, host: str = "127.0.0.1", timeout: float = 0.5) -> bool:
    """True if something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def ensure_free(ports: Iterable[int], what: str) -> None:
    """Fail clearly if any of ``ports`` is already taken by a process the stack did not record."""
    busy = [p for p in ports if port_open(p)]
    if busy:
        raise StackError(f"cannot start {what}: port(s) {busy} already in use by another process")


def apt_install(*packages: str) -> None:
    """``apt-get install -y`` the Debian ``packages`` (running ``apt-get update`` once per process)."""
    global _apt_updated
    if os.geteuid() != 0:
        raise StackError(f"missing software; as root run: apt-get install -y {' '.join(packages)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    if not _apt_updated:
        subprocess.run(["apt-get", "update"], check=True, env=env, stdout=subprocess.DEVNULL)
        _apt_updated = True
    subprocess.run(
        ["apt-get", "install", "-y", "--no-install-recommends", *packages],
        check=True,
        env=env,
        stdout=subprocess.DEVNULL,
    )


def ensure_binaries(binaries: Iterable[str], packages: Sequence[str]) -> None:
    """Install ``packages`` with apt if any of ``binaries`` is not on PATH."""
    if any(shutil.which(b) is None for b in binaries):
        apt_install(*packages)


def as_user(argv: Sequence[str], user: str | None) -> list[str]:
    """``argv`` prefixed to run as OS ``user`` via runuser when we are root (unchanged otherwise)."""
    if user and os.geteuid() == 0:
        return ["runuser", "-u", user, "--", *argv]
    return list(argv)


def wait_until(check: Callable[[], object], timeout: float, what: str, interval: float = 0.25) -> None:
    """Poll ``check`` until it returns truthy, else raise StackError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return
        if time.monotonic() > deadline:
            raise StackError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


@contextlib.contextmanager
def locked(directory: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``directory``/.lock so concurrent ``up``/``down`` calls take turns."""
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / ".lock").open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def run_async(factory: Callable[[], Awaitable[T]]) -> T:
    """Run the coroutine made by ``factory`` to completion from synchronous code.

    Works both from plain code and from inside a running event loop (e.g. an async test calling the sync
    stack API): there the coroutine runs on a fresh loop in a worker thread.
    """

    async def main() -> T:
        return await factory()

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(main())
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, main()).result()
