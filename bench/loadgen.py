"""Load generator for SSE benchmarks: many idle streaming HTTP connections held by one worker process.

Each stream is a bare ``asyncio.Protocol`` (no task, no ``StreamReader``, no HTTP client object): it
writes one ``GET … HTTP/1.1`` request, waits for the server's first event (``ready`` bytes, e.g.
``CONNECTED``) and from then on only scans what arrives for the markers of the broadcasts being
measured (one, or a burst of several), recording ``time.time()`` the first time it sees each. On 2 cores
this holds 10k+ connections per process for a few MB and very little CPU.

The same program drives every server: ours and the baseline (``path`` with ``{user}``, a bearer token),
and Centrifugo's unidirectional SSE (``Target.paths`` builds each user's ``cf_connect`` URL with its
connection JWT; ready at its ``connect`` push; a publication frame carries the marker in its data).

A worker runs in its own process (``multiprocessing``) so its CPU is not charged to the server, and is
driven by the parent over a pipe: ``connect`` → ``arm`` → ``collect`` → ``close``.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bench.workers import WorkerPool
from broadcast.auth.tokens import mint
from broadcast.core.settings import AuthSettings

DEV_AUTH = AuthSettings()

LINGER_RESET = struct.pack("ii", 1, 0)  # close with RST: no TIME_WAIT left on the client's ports


def reset(transport: asyncio.Transport | None) -> None:
    """Close a client connection at once with RST (SO_LINGER 0), unless it is already closing."""
    if transport is not None and not transport.is_closing():
        sock = transport.get_extra_info("socket")
        with contextlib.suppress(OSError, AttributeError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
        transport.abort()


@dataclass(frozen=True)
class Target:
    host: str
    port: int
    path: str  # formatted with ``user=<user id>``
    ready: bytes  # bytes of the server's first event; the stream counts as connected once seen
    bearer: bool = True  # send each user's development bearer token (minted with the dev secret)
    paths: Callable[[str], str] | None = None  # user -> request path, instead of ``path`` (picklable)

    def path_of(self, user: str) -> str:
        return self.paths(user) if self.paths is not None else self.path.format(user=user)


class Stream(asyncio.Protocol):
    __slots__ = ("buffer", "closed", "pending", "ready", "request", "tail", "times", "transport", "waiter", "worker")

    def __init__(self, worker: Worker, request: bytes, waiter: asyncio.Future[bool]) -> None:
        self.worker = worker
        self.request = request
        self.transport: asyncio.Transport | None = None
        self.ready = False
        self.closed = False
        self.buffer = b""
        self.tail = b""
        self.times: list[float] = []  # marker index -> first receipt (0: not yet)
        self.pending = 0  # markers armed and not seen yet
        self.waiter: asyncio.Future[bool] | None = waiter

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are not subclasses
        self.transport.write(self.request)  # type: ignore[union-attr]

    def data_received(self, data: bytes) -> None:
        if not self.ready:
            self.buffer += data
            if self.worker.target.ready in self.buffer:
                self.ready = self.buffer.startswith(b"HTTP/1.1 200")
                self._settle(self.ready)
                self.buffer = b""
            return
        if not self.pending:
            return
        seen = self.tail + data
        now = 0.0
        for index, marker in enumerate(self.worker.markers):
            if not self.times[index] and marker in seen:
                now = now or time.time()
                self.times[index] = now
                self.pending -= 1
                self.worker.received += 1
        self.tail = seen[-self.worker.longest :]
        if now:
            self.worker.check()

    def connection_lost(self, exc: Exception | None) -> None:
        self._settle(False)
        self.closed = True
        if self.ready and self.pending:
            self.worker.lost += 1
            self.worker.missed += self.pending
            self.worker.check()  # a collector waiting for this stream must not wait for ever

    def _settle(self, ok: bool) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(ok)
        self.waiter = None

    def abort(self) -> None:
        reset(self.transport)


class Worker:
    def __init__(self, target: Target) -> None:
        self.target = target
        self.streams: list[Stream] = []
        self.markers: list[bytes] = []
        self.longest = 0
        self.received = 0  # (stream, marker) receipts
        self.missed = 0  # markers still pending on streams that were lost
        self.lost = 0  # streams closed before they had every marker
        self.done = asyncio.Event()

    def check(self) -> None:
        if self.markers and self.received + self.missed >= len(self.streams) * len(self.markers):
            self.done.set()

    def arm(self, markers: list[bytes]) -> None:
        self.streams = [s for s in self.streams if not s.closed]
        for stream in self.streams:
            stream.times, stream.pending, stream.tail = [0.0] * len(markers), len(markers), b""
        self.markers, self.longest = markers, max(len(m) for m in markers)
        self.received, self.missed, self.lost = 0, 0, 0
        self.done.clear()

    async def connect(self, users: list[str], sources: list[str], concurrency: int, wait_s: float) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        gate = asyncio.Semaphore(concurrency)
        errors: dict[str, int] = {}
        first_ready = last_ready = 0.0

        async def one(i: int, user: str) -> None:
            nonlocal first_ready, last_ready
            auth = f"Authorization: Bearer {mint(DEV_AUTH, user, ttl_seconds=86_400)}\r\n" if self.target.bearer else ""
            request = (
                f"GET {self.target.path_of(user)} HTTP/1.1\r\nHost: {self.target.host}:{self.target.port}\r\n"
                f"{auth}Accept: text/event-stream\r\nCache-Control: no-cache\r\n\r\n"
            ).encode()
            async with gate:
                waiter: asyncio.Future[bool] = loop.create_future()
                stream = Stream(self, request, waiter)
                try:
                    await loop.create_connection(
                        lambda: stream, self.target.host, self.target.port, local_addr=(sources[i % len(sources)], 0)
                    )
                    ok = await asyncio.wait_for(waiter, wait_s)
                except (OSError, TimeoutError) as exc:
                    key = type(exc).__name__ + (f"[{exc.errno}]" if isinstance(exc, OSError) else "")
                    errors[key] = errors.get(key, 0) + 1
                    stream.abort()
                    return
                if not ok:
                    errors["refused-or-closed"] = errors.get("refused-or-closed", 0) + 1
                    stream.abort()
                    return
                now = time.time()
                first_ready = first_ready or now
                last_ready = max(last_ready, now)
                self.streams.append(stream)

        started = time.time()
        await asyncio.gather(*(one(i, u) for i, u in enumerate(users)))
        return {
            "connected": len(self.streams),
            "errors": errors,
            "started": started,
            "first_ready": first_ready,
            "last_ready": last_ready,
        }

    async def collect(self, wait_s: float) -> dict[str, Any]:
        self.check()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.done.wait(), wait_s)
        by_marker = [[s.times[i] for s in self.streams if s.times[i]] for i in range(len(self.markers))]
        return {
            "times": [t for times in by_marker for t in times],  # every receipt, of every marker
            "by_marker": by_marker,
            "missing": sum(s.pending for s in self.streams),  # (stream, marker) pairs never seen
            "lost": self.lost,
        }

    def close(self) -> None:
        for stream in self.streams:
            stream.abort()
        self.streams.clear()


class Clients(WorkerPool):
    """The parent's handle on its worker processes; users are split evenly between them."""

    def __init__(self, target: Target, processes: int) -> None:
        super().__init__(Worker, target, processes)

    def connect(self, users: list[str], sources: list[str], concurrency: int, timeout: float) -> list[dict[str, Any]]:
        self.start_connect(users, sources, concurrency, timeout)
        return self.results()

    def start_connect(self, users: list[str], sources: list[str], concurrency: int, timeout: float) -> None:
        """Start connecting without waiting (several ``Clients`` can then connect at once); ``results()``."""
        k = self.size
        self.send("connect", [(users[i::k], sources, concurrency, timeout) for i in range(k)])

    def arm(self, *markers: bytes) -> None:
        """Scan for these markers from now on (a burst: several, each timed on its own)."""
        self.all("arm", list(markers))

    def send_collect(self, timeout: float) -> None:
        self.send("collect", [(timeout,)] * self.size)

    def results(self) -> list[dict[str, Any]]:
        return self.receive()
