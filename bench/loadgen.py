"""Load generator for SSE benchmarks: many idle streaming HTTP connections held by one worker process.

Each stream is a bare ``asyncio.Protocol`` (no task, no ``StreamReader``, no HTTP client object): it
writes one ``GET … HTTP/1.1`` request, waits for the server's first event (``ready`` bytes, e.g.
``CONNECTED``) and from then on only scans what arrives for the marker of the broadcast being
measured, recording ``time.time()`` the first time it sees it. On 2 cores this holds 10k+ connections
per process for a few MB and very little CPU.

A worker runs in its own process (``multiprocessing``) so its CPU is not charged to the server, and is
driven by the parent over a pipe: ``connect`` → ``arm`` → ``collect`` → ``close``.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time
from dataclasses import dataclass
from typing import Any

from bench.workers import WorkerPool
from broadcast.settings import AuthSettings
from broadcast.tokens import mint

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


class Stream(asyncio.Protocol):
    __slots__ = ("buffer", "closed", "ready", "received_at", "request", "tail", "transport", "waiter", "worker")

    def __init__(self, worker: Worker, request: bytes, waiter: asyncio.Future[bool]) -> None:
        self.worker = worker
        self.request = request
        self.transport: asyncio.Transport | None = None
        self.ready = False
        self.closed = False
        self.buffer = b""
        self.tail = b""
        self.received_at = 0.0
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
        marker = self.worker.marker
        if marker and not self.received_at:
            seen = self.tail + data
            if marker in seen:
                self.received_at = time.time()
                self.worker.received += 1
                self.worker.check()
            else:
                self.tail = data[-len(marker) :]

    def connection_lost(self, exc: Exception | None) -> None:
        self._settle(False)
        self.closed = True
        if self.ready and not self.received_at:
            self.worker.lost += 1
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
        self.marker = b""
        self.received = 0
        self.lost = 0
        self.done = asyncio.Event()

    def check(self) -> None:
        if self.marker and self.received + self.lost >= len(self.streams):
            self.done.set()

    def arm(self, marker: bytes) -> None:
        self.streams = [s for s in self.streams if not s.closed]
        for stream in self.streams:
            stream.received_at, stream.tail = 0.0, b""
        self.marker, self.received, self.lost = marker, 0, 0
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
                f"GET {self.target.path.format(user=user)} HTTP/1.1\r\nHost: {self.target.host}:{self.target.port}\r\n"
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
        times = [s.received_at for s in self.streams if s.received_at]
        return {"times": times, "missing": len(self.streams) - len(times), "lost": self.lost}

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

    def arm(self, marker: bytes) -> None:
        self.all("arm", marker)

    def send_collect(self, timeout: float) -> None:
        self.send("collect", [(timeout,)] * self.size)

    def results(self) -> list[dict[str, Any]]:
        return self.receive()
