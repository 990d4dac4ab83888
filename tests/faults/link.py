"""A link between an app process and the real stack that a test can slow down and cut (RELIABILITY #5).

No ``tc netem`` here (this kernel has no netem or prio qdisc) and Kafka brokers advertise
``127.0.0.1:<port>``, so a plain TCP proxy in front of them would be bypassed after the first metadata
answer. Instead the app runs in a network namespace of the test's own (``ip netns exec``), whose loopback
has nothing but what ``LinkProxy`` puts there: listeners on the stack's ports (the three brokers,
PostgreSQL, Redis) forwarding to the same ports on the host's loopback. Whatever address a broker
advertises, the app reaches it through the proxy. The app's HTTP port is forwarded the other way, from a
host port, so clients and the test reach it as usual.

The proxy runs on a thread with an event loop of its own, so a test's synchronous waits do not stall it.
That thread enters the namespace (``setns``, per thread) only while it creates a socket there: a socket
keeps the namespace it was created in.

A ``Shape`` degrades a forward, in both directions: added latency per chunk, a byte rate (as a 3 Mbit/s
link) and a cut. A cut holds the data (it is neither read nor written on), as a dead link would: TCP
neither delivers nor resets, and the peers time out on their own. When the cut heals, what was held flows.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import socket
import subprocess
import threading
import uuid
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

CLONE_NEWNET = 0x40000000
CHUNK = 64 * 1024
IN_FLIGHT = 32  # chunks read ahead of the shaped writer, per direction (then the reader waits)
_libc = ctypes.CDLL(None, use_errno=True)
T = TypeVar("T")


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))


@contextlib.contextmanager
def entered(namespace: str) -> Iterator[None]:
    """The calling thread in network namespace ``namespace`` (``/run/netns/<name>``) for the block."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(f"/run/netns/{namespace}", os.O_RDONLY)
        try:
            _setns(target)
            try:
                yield
            finally:
                _setns(home)
        finally:
            os.close(target)
    finally:
        os.close(home)


@contextlib.contextmanager
def namespace() -> Iterator[str]:
    """A new network namespace with its loopback up; deleted afterwards (with whatever still runs in it
    losing its network, so stop those processes first)."""
    name = f"bl-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True, timeout=10)
    try:
        subprocess.run(
            ["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"], check=True, capture_output=True, timeout=10
        )
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False, capture_output=True, timeout=10)


@dataclass
class Shape:
    """How a forward degrades the link (read by the proxy thread as it moves each chunk)."""

    delay_s: float = 0.0
    rate_bytes_s: float | None = None
    cut: bool = False

    def clear(self) -> None:
        self.delay_s, self.rate_bytes_s, self.cut = 0.0, None, False


class LinkProxy:
    """Forwards between the host's loopback and one network namespace's, on a thread of its own."""

    def __init__(self, netns: str) -> None:
        self.netns = netns
        self.connections = 0  # accepted so far, every forward
        self._loop = asyncio.new_event_loop()
        self._servers: list[asyncio.Server] = []
        self._handlers: set[asyncio.Task[None]] = set()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"link-{netns}", daemon=True)

    def __enter__(self) -> LinkProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._call(self._close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def _call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(30)

    def into_namespace(self, port: int, shape: Shape | None = None) -> None:
        """Listen on the namespace's 127.0.0.1:``port``; forward to the host's 127.0.0.1:``port``."""
        self._call(self._listen_inside(port, shape))

    def out_of_namespace(self, port: int) -> int:
        """Listen on a free host port; forward to the namespace's 127.0.0.1:``port``. The host port."""
        return self._call(self._listen_outside(port))

    async def _listen_inside(self, port: int, shape: Shape | None) -> None:
        with entered(self.netns):
            sock = socket.create_server(("127.0.0.1", port), backlog=512)
        sock.setblocking(False)

        async def upstream() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
            return await asyncio.open_connection("127.0.0.1", port, limit=CHUNK)

        self._servers.append(await asyncio.start_server(self._handler(upstream, shape), sock=sock, limit=CHUNK))

    async def _listen_outside(self, port: int) -> int:
        async def upstream() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
            with entered(self.netns):
                sock = socket.socket()
            sock.setblocking(False)
            try:
                await self._loop.sock_connect(sock, ("127.0.0.1", port))
            except OSError:
                sock.close()
                raise
            return await asyncio.open_connection(sock=sock, limit=CHUNK)

        server = await asyncio.start_server(self._handler(upstream, None), "127.0.0.1", 0, limit=CHUNK)
        self._servers.append(server)
        return int(server.sockets[0].getsockname()[1])

    def _handler(
        self,
        upstream: Any,
        shape: Shape | None,
    ) -> Any:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            me = asyncio.current_task()
            assert me is not None
            self._handlers.add(me)
            me.add_done_callback(self._handlers.discard)
            try:
                up_reader, up_writer = await upstream()
            except OSError:
                writer.close()
                return
            pumps = [
                asyncio.create_task(_pump(reader, up_writer, shape)),
                asyncio.create_task(_pump(up_reader, writer, shape)),
            ]
            try:
                await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            except asyncio.CancelledError:
                pass  # the proxy closes (3.11's start_server would log a cancelled handler as an error)
            finally:
                for task in pumps:
                    task.cancel()
                await asyncio.gather(*pumps, return_exceptions=True)
                for w in (writer, up_writer):
                    w.close()

        return handle

    async def _close(self) -> None:
        for server in self._servers:
            server.close()
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, shape: Shape | None) -> None:
    """Copy ``reader`` to ``writer`` until EOF or an error, shaped: each chunk is written ``delay_s`` after
    it was read, no faster than ``rate_bytes_s``, and nothing moves while ``cut``."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue(IN_FLIGHT)

    async def held() -> None:
        while shape is not None and shape.cut:  # noqa: ASYNC110 - set from the test's thread, not this loop
            await asyncio.sleep(0.05)

    async def send() -> None:
        while (item := await queue.get()) is not None:
            due, data = item
            await held()
            if (wait := due - loop.time()) > 0:
                await asyncio.sleep(wait)
            await held()
            writer.write(data)
            await writer.drain()

    sender = asyncio.create_task(send())
    free_at = 0.0  # when the shaped link has sent what it was given so far
    try:
        while data := await reader.read(CHUNK):
            await held()
            now = loop.time()
            rate = shape.rate_bytes_s if shape is not None else None
            free_at = max(now, free_at) + (len(data) / rate if rate else 0.0)
            await queue.put((free_at + (shape.delay_s if shape is not None else 0.0), data))
        await queue.put(None)
        await sender
    except (OSError, asyncio.IncompleteReadError):
        pass
    finally:
        sender.cancel()
        await asyncio.gather(sender, return_exceptions=True)
