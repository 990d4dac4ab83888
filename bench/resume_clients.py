"""Load generator of resuming SSE clients: what a browser's ``EventSource`` does, many thousand per process.

Unlike ``bench.loadgen`` (which only scans for one marker), every client here parses the stream: it
de-chunks the HTTP body, splits SSE events, remembers the last ``id:`` it saw and sends it back as
``Last-Event-ID`` when it reconnects, obeys ``retry:`` hints, and on a refused open (429/503) retries
after the ``Retry-After`` header (counting the refusal by status). A stream that ends without the client
asking for it is reopened after the ``retry:`` delay, as ``EventSource`` does.

Each MESSAGE whose data carries a numbered tag (``<tag>#000123``) is recorded per client: the time it was
first seen and a hash of the SSE id it came under. A later event for the same number is a *raw repeat*;
when it came under another SSE id it is also a *duplicate shown* (dedupe by SSE id would not hide it).

A worker process (``multiprocessing``, uvloop) holds its clients as bare ``asyncio.Protocol`` objects (a
task exists only while a client is connecting) and is driven by the parent over a pipe:
``open`` → (``drop`` | ``churn``) → ``progress``/``report`` → ``close``. ``Publisher`` is the matching
numbered-broadcast thread (steady pace, records each broadcast's acknowledgement time).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
import time
from array import array
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import httpx

from bench.loadgen import DEV_AUTH, reset
from bench.workers import WorkerPool
from broadcast.auth.tokens import mint
from devstack.sse_frames import Frame, FrameReader

DEFAULT_RETRY_S = 3.0  # EventSource's reconnection time until the server sends ``retry:``
ERROR_RETRY_S = 1.0  # after a socket error or a timeout while opening
DIGITS = 6  # the broadcast number after ``<tag>#``, zero-padded
ADMIN_TOKEN = mint(DEV_AUTH, "admin", ["admin"], ttl_seconds=86_400)
FILLER = (
    "Scheduled maintenance tonight from 22:00 to 23:30 UTC: the reporting dashboard will be read-only and "
    "exports queued meanwhile will run afterwards. Thank you for your patience."
)


@dataclass(frozen=True)
class Setup:
    """What every client of a worker shares."""

    host: str
    path: str  # formatted with ``user=<user id>``
    tag: str  # numbered broadcasts carry ``<tag>#<number>`` in their content
    bearer: bool = True  # send each user's development bearer token
    wait_s: float = 120.0  # how long one open may take until CONNECTED before it is aborted and retried


@dataclass
class Client:
    """One simulated ``EventSource``: its identity, resume cursor and what it has seen."""

    user: str
    port: int
    source: str
    prefix: bytes  # the request without Last-Event-ID and the final CRLF
    last_id: str = ""
    retry_s: float = DEFAULT_RETRY_S
    wanted: bool = True  # False once the client closed for good
    connecting: bool = False
    conn: Conn | None = None
    back_at: float = 0.0  # first CONNECTED after the storm's drop
    first: array[float] = field(default_factory=lambda: array("d"))  # number -> first receipt (0: never)
    ids: array[int] = field(default_factory=lambda: array("q"))  # number -> hash of its first SSE id
    messages: int = 0
    raw_repeats: int = 0
    dups_shown: int = 0
    resyncs: int = 0
    limit_events: int = 0
    server_drops: int = 0
    timeouts: int = 0
    refusals: dict[int, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)

    @property
    def up(self) -> bool:
        return self.conn is not None and self.conn.ready and not self.conn.lost

    def request(self) -> bytes:
        resume = f"Last-Event-ID: {self.last_id}\r\n".encode() if self.last_id else b""
        return self.prefix + resume + b"\r\n"

    def record(self, number: int, event_id: str | None, now: float) -> None:
        if number >= len(self.first):
            grow = number + 64 - len(self.first)
            self.first.extend([0.0] * grow)
            self.ids.extend([0] * grow)
        marker = hash(event_id) | 1 if event_id else 1
        self.messages += 1
        if self.first[number]:
            self.raw_repeats += 1
            if self.ids[number] != marker:
                self.dups_shown += 1
            return
        self.first[number] = now
        self.ids[number] = marker

    def has(self, number: int) -> bool:
        return number < len(self.first) and self.first[number] > 0


class Conn(asyncio.Protocol):
    """One connection attempt of a client: the HTTP head, then a de-chunked SSE stream."""

    def __init__(self, worker: Worker, client: Client, waiter: asyncio.Future[float | None]) -> None:
        self.worker, self.client, self.waiter = worker, client, waiter
        self.transport: asyncio.Transport | None = None
        self.head = b""
        self.headed = False
        self.chunked = False
        self.raw = b""  # undecoded chunk framing
        self.left = 0  # bytes left in the current chunk
        self.skip = 0  # CRLF bytes left after a chunk
        self.frames = FrameReader()  # dechunked bytes not yet ending an event wait in here
        self.ready = False
        self.lost = False
        self.deliberate = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are not subclasses
        self.transport.write(self.client.request())  # type: ignore[union-attr]

    def data_received(self, data: bytes) -> None:
        if not self.headed:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            head, data = self.head[:end], self.head[end + 4 :]
            self.head, self.headed = b"", True
            if not self._accept(head):
                self.worker.samples.setdefault(head[9:12].decode("latin-1"), data[:300].decode("latin-1"))
                return
        body = self._dechunk(data) if self.chunked else data
        if body:
            self._events(body)

    def _accept(self, head: bytes) -> bool:
        """Parse the response head; a refusal is counted and retried after its ``Retry-After``."""
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        if status == 200:
            self.chunked = "chunked" in headers.get("transfer-encoding", "").lower()
            return True
        refusals = self.client.refusals
        refusals[status] = refusals.get(status, 0) + 1
        hint = headers.get("retry-after", "")
        self._settle(float(hint) if hint.replace(".", "", 1).isdigit() else self.client.retry_s)
        self.abort(deliberate=True)
        return False

    def _dechunk(self, data: bytes) -> bytes:
        buf, pos, out = self.raw + data, 0, []
        while pos < len(buf):
            if self.left:
                take = min(self.left, len(buf) - pos)
                out.append(buf[pos : pos + take])
                pos += take
                self.left -= take
                if self.left:
                    break
                self.skip = 2
            if self.skip:
                n = min(self.skip, len(buf) - pos)
                pos += n
                self.skip -= n
                if self.skip:
                    break
                continue
            end = buf.find(b"\r\n", pos)
            if end < 0:
                break
            size = int(buf[pos:end].split(b";", 1)[0] or b"0", 16)
            pos = end + 2
            if size == 0:
                break  # the last chunk: the server ends the stream
            self.left = size
        self.raw = buf[pos:]
        return b"".join(out)

    def _events(self, body: bytes) -> None:
        for frame in self.frames.feed(body):
            self._event(frame)

    def _event(self, frame: Frame) -> None:
        name, event_id, client = frame.event, frame.id, self.client
        if frame.retry_ms is not None:
            client.retry_s = frame.retry_ms / 1000
        if event_id:
            client.last_id = event_id  # EventSource: every event with an id moves Last-Event-ID
        if name == "MESSAGE" and frame.data is not None:
            number = self.worker.number(frame.data)
            if number is not None:
                client.record(number, event_id, time.time())
        elif name == "CONNECTED":
            self.ready = True
            self.worker.connected(client)
            self._settle(None)
        elif name == "RESYNC":
            client.resyncs += 1
        elif name == "CONNECTION_LIMIT_REACHED":
            client.limit_events += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.waiter.done():
            self.worker.lost(self)
        else:
            self._settle(self.client.retry_s)  # ended before CONNECTED (e.g. over the per-user limit)

    def _settle(self, outcome: float | None) -> None:
        if not self.waiter.done():
            self.waiter.set_result(outcome)

    def abort(self, deliberate: bool = False) -> None:
        self.deliberate = self.deliberate or deliberate
        reset(self.transport)


class Worker:
    """The clients of one process and the commands the parent sends."""

    def __init__(self, setup: Setup) -> None:
        self.setup = setup
        self.mark = f"{setup.tag}#"
        self.clients: deque[Client] = deque()
        self.drop_at = 0.0
        self.tasks: set[asyncio.Task[None]] = set()
        self.rng = random.Random(0)
        self.pending: set[int] = set()  # clients of the running ``open`` not yet CONNECTED
        self.all_open = asyncio.Event()
        self.samples: dict[str, str] = {}  # status -> the start of the first refusal's body

    def number(self, data: str) -> int | None:
        at = data.find(self.mark)
        if at < 0:
            return None
        digits = data[at + len(self.mark) : at + len(self.mark) + DIGITS]
        return int(digits) if digits.isdigit() else None

    def client(self, user: str, port: int, source: str) -> Client:
        auth = f"Authorization: Bearer {mint(DEV_AUTH, user, ttl_seconds=86_400)}\r\n" if self.setup.bearer else ""
        prefix = (
            f"GET {self.setup.path.format(user=user)} HTTP/1.1\r\nHost: {self.setup.host}:{port}\r\n"
            f"{auth}Accept: text/event-stream\r\nCache-Control: no-cache\r\n"
        ).encode()
        return Client(user, port, source, prefix)

    # -- connecting -------------------------------------------------------------------------------------

    def start(self, client: Client, delay: float, gate: asyncio.Semaphore | None) -> None:
        if client.connecting or not client.wanted:
            return
        client.connecting = True
        task = asyncio.get_running_loop().create_task(self._connect(client, delay, gate))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _connect(self, client: Client, delay: float, gate: asyncio.Semaphore | None) -> None:
        try:
            if delay > 0:
                await asyncio.sleep(delay)
            while client.wanted:
                if gate is None:
                    wait = await self._attempt(client)
                else:
                    async with gate:
                        wait = await self._attempt(client)
                if wait is None:
                    return
                await asyncio.sleep(wait)
        finally:
            client.connecting = False

    async def _attempt(self, client: Client) -> float | None:
        """One open; None once CONNECTED arrived, else the seconds to wait before the next one."""
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[float | None] = loop.create_future()
        conn = Conn(self, client, waiter)
        client.conn = conn
        try:
            await loop.create_connection(lambda: conn, self.setup.host, client.port, local_addr=(client.source, 0))
            outcome = await asyncio.wait_for(waiter, self.setup.wait_s)
        except TimeoutError:
            client.timeouts += 1
            conn.abort(deliberate=True)
            return ERROR_RETRY_S
        except OSError as exc:
            key = f"{type(exc).__name__}[{exc.errno}]"
            client.errors[key] = client.errors.get(key, 0) + 1
            conn.abort(deliberate=True)
            return ERROR_RETRY_S
        if outcome is not None or not client.wanted:
            conn.abort(deliberate=True)
        return outcome

    def connected(self, client: Client) -> None:
        if self.pending:
            self.pending.discard(id(client))
            if not self.pending:
                self.all_open.set()
        if self.drop_at and not client.back_at:
            client.back_at = time.time()

    def lost(self, conn: Conn) -> None:
        """A stream ended after CONNECTED: unless the client asked, reopen it after ``retry:`` (EventSource)."""
        client = conn.client
        if conn.deliberate or not conn.ready or client.conn is not conn or not client.wanted:
            return
        client.server_drops += 1
        self.start(client, client.retry_s, None)

    # -- commands ---------------------------------------------------------------------------------------

    async def open(self, specs: list[tuple[str, int, str]], concurrency: int, deadline_s: float) -> dict[str, Any]:
        """Open one stream per (user, port, source address); wait until all are CONNECTED or the deadline."""
        gate = asyncio.Semaphore(concurrency)
        fresh = [self.client(*spec) for spec in specs]
        self.clients.extend(fresh)
        started = time.time()
        self.pending, self.all_open = {id(c) for c in fresh}, asyncio.Event()
        for client in fresh:
            self.start(client, 0.0, gate)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.all_open.wait(), deadline_s)
        failed = [c for c in fresh if not c.up]
        for client in failed:  # given up: not part of the run
            self.close_client(client)
            self.clients.remove(client)
        return {"connected": len(fresh) - len(failed), "failed": len(failed), "seconds": time.time() - started}

    def close_client(self, client: Client) -> None:
        client.wanted = False
        if client.conn is not None:
            client.conn.abort(deliberate=True)

    def drop(self, jitter_s: float) -> float:
        """Every client aborts its stream at once, then reconnects after a uniform 0..jitter_s delay."""
        self.drop_at = time.time()
        for client in self.clients:
            client.back_at = 0.0
            if client.conn is not None:
                client.conn.abort(deliberate=True)
        for client in self.clients:  # one still busy opening (a refusal's wait) carries on by itself
            self.start(client, self.rng.uniform(0, jitter_s), None)
        return self.drop_at

    async def churn(self, duration_s: float, per_minute: float, prefix: str) -> dict[str, Any]:
        """For ``duration_s``: close the oldest stream and open a new user's, ``per_minute`` of them a minute."""
        count = len(self.clients)
        interval = 60.0 / max(count * per_minute, 1e-9)
        started = time.monotonic()
        replaced = 0
        while True:
            due = started + (replaced + 1) * interval
            if due - started > duration_s:
                break
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            old = self.clients.popleft()
            self.close_client(old)
            new = self.client(f"{prefix}{replaced}", old.port, old.source)
            self.clients.append(new)
            self.start(new, 0.0, None)
            replaced += 1
        await asyncio.sleep(max(0.0, started + duration_s - time.monotonic()))
        return {"replaced": replaced, **self.counters()}

    def counters(self) -> dict[str, Any]:
        refusals: dict[int, int] = {}
        errors: dict[str, int] = {}
        for c in self.clients:
            for status, n in c.refusals.items():
                refusals[status] = refusals.get(status, 0) + n
            for key, n in c.errors.items():
                errors[key] = errors.get(key, 0) + n
        return {
            "clients": len(self.clients),
            "up": sum(1 for c in self.clients if c.up),
            "messages": sum(c.messages for c in self.clients),
            "refusals": refusals,
            "errors": errors,
            "timeouts": sum(c.timeouts for c in self.clients),
            "server_drops": sum(c.server_drops for c in self.clients),
            "resyncs": sum(c.resyncs for c in self.clients),
            "limit_events": sum(c.limit_events for c in self.clients),
            "refusal_bodies": self.samples,
        }

    def progress(self, numbers: list[int]) -> dict[str, Any]:
        """How many clients are back since the drop and how many hold every one of ``numbers``."""
        complete = sum(1 for c in self.clients if all(c.has(n) for n in numbers))
        back = sum(1 for c in self.clients if c.back_at)
        return {"back": back, "complete": complete, "messages": sum(c.messages for c in self.clients)}

    def report(self, acks: list[tuple[int, float]]) -> dict[str, Any]:
        """Per-client back and caught-up times (seconds after the drop), losses and repeats."""
        back: list[float] = []
        caught: list[float] = []
        lost = clients_lost = 0
        for client in self.clients:
            missing = sum(1 for n, _ in acks if not client.has(n))
            lost += missing
            clients_lost += 1 if missing else 0
            if not client.back_at:
                continue
            back.append(client.back_at - self.drop_at)
            owed = [n for n, acked in acks if acked <= client.back_at]  # published before it was back
            if all(client.has(n) for n in owed):
                latest = max((client.first[n] for n in owed), default=self.drop_at)
                caught.append(max(latest, self.drop_at) - self.drop_at)
        return {
            "drop_at": self.drop_at,
            "back": back,
            "caught": caught,
            "lost": lost,
            "clients_lost": clients_lost,
            "raw_repeats": sum(c.raw_repeats for c in self.clients),
            "dups_shown": sum(c.dups_shown for c in self.clients),
            **self.counters(),
        }

    def close(self) -> None:
        for client in self.clients:
            self.close_client(client)
        self.clients.clear()


class ResumeClients(WorkerPool):
    """The parent's handle on its worker processes; each command goes to every worker with its own args."""

    def __init__(self, setup: Setup, processes: int) -> None:
        super().__init__(Worker, setup, processes)

    def open(self, specs: list[list[tuple[str, int, str]]], concurrency: int, deadline_s: float) -> list[Any]:
        self.send("open", [(s, concurrency, deadline_s) for s in specs])
        return self.receive()


@dataclass
class Published:
    number: int
    sent_at: float
    acked_at: float | None  # every target answered 201
    statuses: list[int | None]


class Publisher(threading.Thread):
    """Numbered ALL broadcasts at a steady pace until ``stop()``; ``fan_out`` posts each to every URL
    (the naive fleet of baselines), otherwise round-robin over them (a balancer in front of our fleet)."""

    def __init__(self, urls: list[str], tag: str, interval_s: float, fan_out: bool = False) -> None:
        super().__init__(daemon=True, name=f"publisher-{tag}")
        self.urls, self.tag, self.interval_s, self.fan_out = urls, tag, interval_s, fan_out
        self.sent: list[Published] = []
        self._halt = threading.Event()
        self._lock = threading.Lock()

    def run(self) -> None:
        headers = {"Authorization": f"Bearer {ADMIN_TOKEN}", "X-Dev-User": "admin"}
        started = time.monotonic()
        with httpx.Client(headers=headers, timeout=30.0) as http:
            number = 0
            while not self._halt.is_set():
                number += 1
                body = {"content": f"{self.tag}#{number:0{DIGITS}d} {FILLER}"[:200], "targetType": "ALL"}
                targets = self.urls if self.fan_out else [self.urls[(number - 1) % len(self.urls)]]
                sent_at = time.time()
                statuses = [self._post(http, url, body) for url in targets]
                acked = time.time() if all(s == 201 for s in statuses) else None
                with self._lock:
                    self.sent.append(Published(number, sent_at, acked, statuses))
                self._halt.wait(max(0.0, started + number * self.interval_s - time.monotonic()))

    @staticmethod
    def _post(http: httpx.Client, url: str, body: dict[str, Any]) -> int | None:
        try:
            return http.post(url, json=body).status_code
        except httpx.HTTPError:
            return None

    def acks(self) -> list[tuple[int, float]]:
        """(number, acknowledged at) of every broadcast the API acknowledged so far."""
        with self._lock:
            return [(p.number, p.acked_at) for p in self.sent if p.acked_at is not None]

    def refused(self) -> int:
        with self._lock:
            return sum(1 for p in self.sent if p.acked_at is None)

    def stop(self) -> None:
        self._halt.set()
        self.join(60)
