"""Publishing scenarios: targeted end-to-end latency (``targeted``) and the admin publish API (``publish-api``).

Both drive ``POST /api/admin/broadcasts`` open-loop from the bench process (its own process, not the
server's): every request is started at its planned time (``i / rate`` after the start) whether or not the
earlier ones have been answered, over a pool of raw keep-alive HTTP/1.1 connections (bare asyncio
Protocols on uvloop, a new connection opened when none is idle, at most ``MAX_IN_FLIGHT``; a request that
waits for a connection has the wait in its latency). A request's send time is ``time.time()`` when its
turn comes, before any wait for a connection.

- ``targeted``: one SSE client for one user, in a separate client process (a raw asyncio Protocol on
  uvloop, like ``bench/loadgen.py``'s), records ``time.time()`` on receipt of each ``MESSAGE`` by the
  marker (tag + sequence number) in its content. The publisher sends SELECTED broadcasts to that user at
  10, 100 and 1000 messages/s for ``WINDOW_S`` each (smoke: 10 and 100 for 2 s). Per rate: p50/p99/max of
  send → receipt (ms), the achieved delivery rate ((received - 1) / (last receipt - first receipt)), and
  the lost (answered 201 but not received within ``DRAIN_S`` after the last answer).
- ``publish-api``: 50 requests/s for 30 s (smoke 5 s), SELECTED to 3 users nobody has connected as; p50/p99
  of send → complete response (ms), and errors (transport errors and any status but 201).

``ours`` is one ``broadcast-server run`` process with every role on the real stack (3 KRaft brokers, acks=all,
PostgreSQL, Redis; a fresh schema, topics and group per run), so its latency includes the outbox, the
relay, Kafka and the consumer hop. The ``baseline`` is ``bench/baseline/server.py`` with ``--database-url``
on the same PostgreSQL (own schema): one transaction with an ``INSERT`` for the broadcast and one per
recipient, then the connections' ``asyncio.Queue``s; it checks no token. Both get 20 warm-up requests
(not measured) after start. Runs alternate ours/baseline per repeat; figures are medians over repeats.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re
import resource
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, Literal

from bench.loadgen import DEV_AUTH
from bench.servers import Baseline, ours, stack_env
from bench.sse_fanout import ADMIN_TOKEN, FILLER
from bench.suite import Context, Measure, Outcome, Series, median, percentile
from broadcast.auth.tokens import mint

Kind = Literal["ours", "baseline"]

RATES = (10, 100, 1000)
SMOKE_RATES = (10, 100)
WINDOW_S = 10.0
SMOKE_WINDOW_S = 2.0
DRAIN_S = 10.0
SMOKE_DRAIN_S = 5.0
API_RATE = 50
API_WINDOW_S = 30.0
SMOKE_API_WINDOW_S = 5.0
WARMUP = 20
MAX_IN_FLIGHT = 256
REQUEST_TIMEOUT_S = 30.0  # counted as an error (status -1)
IDLE_REUSE_S = 2.0  # a pooled connection idle longer is closed, not reused (servers' keep-alive is 5 s)

USER = "bench-target"
OFFLINE_USERS = ["bench-offline-1", "bench-offline-2", "bench-offline-3"]
SSE_PATH = "/api/user/sse/connect?devUser={user}"  # ours reads the bearer token; the baseline devUser
PUBLISH_PATH = "/api/admin/broadcasts"
MARKER = re.compile(rb"mk[0-9a-f]{8}n\d+z")
TAIL = 64  # bytes kept between reads so a marker split across two reads is still found

TARGETED_MUST, TARGETED_GOAL = 250.0, 50.0  # DESIGN §7, p99 ms
API_MUST, API_GOAL = 50.0, 20.0


# --- the SSE client (its own process) ---------------------------------------------------------------------


class Listener(asyncio.Protocol):
    """One SSE stream: waits for ``CONNECTED``, then records the first receipt time of every marker."""

    def __init__(self, request: bytes, ready: asyncio.Future[bool]) -> None:
        self.request = request
        self.ready: asyncio.Future[bool] | None = ready
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.tail = b""
        self.seen: dict[bytes, float] = {}
        self.wanted: set[bytes] = set()
        self.missing = 0
        self.done = asyncio.Event()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are not subclasses
        self.transport.write(self.request)  # type: ignore[union-attr]

    def data_received(self, data: bytes) -> None:
        now = time.time()
        if self.ready is not None:
            self.buffer += data
            if b"CONNECTED" not in self.buffer:
                return
            self._settle(self.buffer.startswith(b"HTTP/1.1 200"))
            data, self.buffer = self.buffer, b""
        chunk = self.tail + data
        for marker in MARKER.findall(chunk):
            if marker not in self.seen:
                self.seen[marker] = now
                if marker in self.wanted:
                    self._count()
        self.tail = chunk[-TAIL:]

    def connection_lost(self, exc: Exception | None) -> None:
        self._settle(False)
        self.done.set()  # a collector must not wait for a stream that is gone

    def want(self, markers: Sequence[bytes]) -> None:
        self.wanted = set(markers)
        self.missing = len(self.wanted - self.seen.keys())
        self.done.clear()
        if not self.missing:
            self.done.set()

    def _count(self) -> None:
        self.missing -= 1
        if self.missing <= 0:
            self.done.set()

    def _settle(self, ok: bool) -> None:
        if self.ready is not None and not self.ready.done():
            self.ready.set_result(ok)
        self.ready = None


async def _open(port: int, user: str, wait_s: float) -> tuple[Listener, bool]:
    """One SSE stream for ``user`` (development bearer token and ``devUser``), once its first event is in."""
    loop = asyncio.get_running_loop()
    token = mint(DEV_AUTH, user, ttl_seconds=86_400)
    request = (
        f"GET {SSE_PATH.format(user=user)} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Authorization: Bearer {token}\r\nAccept: text/event-stream\r\nCache-Control: no-cache\r\n\r\n"
    ).encode()
    ready: asyncio.Future[bool] = loop.create_future()
    listener = Listener(request, ready)
    await loop.create_connection(lambda: listener, "127.0.0.1", port)
    return listener, await asyncio.wait_for(ready, wait_s)


async def _listen(pipe: Connection) -> None:
    loop = asyncio.get_running_loop()
    listener: Listener | None = None
    while True:
        command, args = await loop.run_in_executor(None, pipe.recv)
        if command == "connect":
            listener, ok = await _open(*args)
            pipe.send(ok)
        elif command == "collect" and listener is not None:
            markers, wait_s = args
            listener.want([m.encode() for m in markers])
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(listener.done.wait(), wait_s)
            pipe.send({m.decode(): t for m, t in listener.seen.items() if m in listener.wanted})
        elif command == "close":
            if listener is not None and listener.transport is not None:
                listener.transport.abort()
            pipe.send("closed")
            return


def listener_main(pipe: Connection) -> None:
    """Process entry point of the SSE client: obey the parent's commands until ``close``."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    import uvloop

    uvloop.run(_listen(pipe))


class SseClient:
    """The parent's handle on the SSE client process (``main``: its entry point, obeying the commands)."""

    def __init__(self, main: Callable[[Connection], None] = listener_main) -> None:
        import multiprocessing

        spawn = multiprocessing.get_context("spawn")
        self._pipe, child = spawn.Pipe()
        self._proc = spawn.Process(target=main, args=(child,), daemon=True)
        self._proc.start()

    def connect(self, port: int, user: str, wait_s: float = 30.0) -> None:
        self._pipe.send(("connect", (port, user, wait_s)))
        if self._pipe.recv() is not True:
            raise RuntimeError(f"the SSE stream for {user} did not open")

    def collect(self, markers: Sequence[str], wait_s: float) -> dict[str, float]:
        """Receipt times of ``markers``, waiting until all are in or ``wait_s`` has passed."""
        self._pipe.send(("collect", (list(markers), wait_s)))
        received: dict[str, float] = self._pipe.recv()
        return received

    def close(self) -> None:
        with contextlib.suppress(OSError, EOFError):
            self._pipe.send(("close", ()))
            self._pipe.recv()
        self._proc.join(10)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join()


# --- the open-loop publisher (the bench process) ------------------------------------------------------------


def _response_end(buffer: bytes) -> tuple[int, int] | None:
    """(status, length) of the first complete HTTP/1.1 response in ``buffer``, or None if incomplete."""
    head_end = buffer.find(b"\r\n\r\n")
    if head_end < 0:
        return None
    head = buffer[:head_end].lower()
    status = int(head[9:12])
    body = head_end + 4
    length = re.search(rb"\r\ncontent-length:\s*(\d+)", head)
    if length:
        end = body + int(length.group(1))
        return (status, end) if len(buffer) >= end else None
    if b"\r\ntransfer-encoding: chunked" not in head:
        return status, body
    position = body
    while True:
        line_end = buffer.find(b"\r\n", position)
        if line_end < 0:
            return None
        size = int(buffer[position:line_end].split(b";")[0], 16)
        position = line_end + 2 + size + 2
        if len(buffer) < position:
            return None
        if size == 0:
            return status, position


class HttpConn(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection carrying one request at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.waiter: asyncio.Future[int] | None = None
        self.closed = False
        self.last_used = time.monotonic()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def send(self, request: bytes) -> asyncio.Future[int]:
        assert self.transport is not None
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        return self.waiter

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        parsed = _response_end(self.buffer)
        if parsed is None:
            return
        status, end = parsed
        self.buffer = self.buffer[end:]
        self.last_used = time.monotonic()
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(status)
        self.waiter = None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError(f"connection lost: {exc!r}"))

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()


class Pool:
    """Idle keep-alive connections, most recently used first; a new one when none is idle."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.idle: list[HttpConn] = []
        self.gate = asyncio.Semaphore(MAX_IN_FLIGHT)
        self.opened = 0

    async def _take(self) -> HttpConn:
        while self.idle:
            conn = self.idle.pop()
            if not conn.closed and time.monotonic() - conn.last_used < IDLE_REUSE_S:
                return conn
            conn.close()
        _, conn = await asyncio.get_running_loop().create_connection(HttpConn, "127.0.0.1", self.port)
        self.opened += 1
        return conn

    async def request(self, data: bytes) -> int:
        async with self.gate:
            conn = await self._take()
            try:
                status = await asyncio.wait_for(conn.send(data), REQUEST_TIMEOUT_S)
            except TimeoutError:
                conn.close()  # its answer may still come: never reuse it
                raise
            self.idle.append(conn)
            return status

    def close(self) -> None:
        for conn in self.idle:
            conn.close()
        self.idle.clear()


@dataclass
class Shot:
    """One request: its marker, planned and actual send time, answer time (epoch s) and status (-1: error)."""

    marker: str
    planned: float
    sent: float
    answered: float
    status: int
    error: str = ""


def _request(port: int, body: dict[str, Any]) -> bytes:
    payload = json.dumps(body).encode()
    return (
        f"POST {PUBLISH_PATH} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\n"
        f"X-Dev-User: admin\r\nContent-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
    ).encode() + payload


async def _shoot(pool: Pool, marker: str, data: bytes, planned: float) -> Shot:
    sent = time.time()
    try:
        status, error = await pool.request(data), ""
    except (OSError, ConnectionError) as exc:
        status, error = -1, repr(exc)
    return Shot(marker, planned, sent, time.time(), status, error)


async def _drive(port: int, requests: Sequence[tuple[str, bytes]], rate: float) -> list[Shot]:
    """Start request i at ``start + i / rate`` (open loop), then wait for every answer."""
    loop = asyncio.get_running_loop()
    pool = Pool(port)
    try:
        warm = [await pool._take() for _ in range(min(32, max(2, math.ceil(rate / 50))))]
        pool.idle.extend(warm)
        start_loop, start_wall = loop.time() + 0.05, time.time() + 0.05
        tasks: list[asyncio.Task[Shot]] = []
        for i, (marker, data) in enumerate(requests):
            delay = start_loop + i / rate - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(_shoot(pool, marker, data, start_wall + i / rate)))
        return list(await asyncio.gather(*tasks))
    finally:
        pool.close()


def publish(port: int, requests: Sequence[tuple[str, bytes]], rate: float) -> list[Shot]:
    import uvloop

    return uvloop.run(_drive(port, requests, rate))


def _targeted_requests(port: int, count: int, users: list[str]) -> list[tuple[str, bytes]]:
    tag = uuid.uuid4().hex[:8]
    out = []
    for i in range(count):
        marker = f"mk{tag}n{i}z"
        body = {"content": f"{marker} {FILLER}"[:200], "targetType": "SELECTED", "targetIds": users}
        out.append((marker, _request(port, body)))
    return out


# --- servers ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _server(kind: Kind, ctx: Context, name: str) -> Iterator[int]:
    """The port of a live server of ``kind`` for one run; stopped on exit."""
    if kind == "ours":
        server = ours(stack_env(ctx, name), ctx, f"{name}-ours")
        try:
            yield server.port
        finally:
            server.stop()
        return
    schema = f"bench_{name.replace('-', '_')}_base_{uuid.uuid4().hex[:8]}"
    baseline = Baseline(ctx, f"{name}-baseline", "--database-url", ctx.stack().postgres_url, "--schema", schema)
    try:
        yield baseline.port
    finally:
        baseline.stop()


def _order(r: int) -> list[Kind]:
    return ["ours", "baseline"] if r % 2 == 0 else ["baseline", "ours"]


def _ms(values: Sequence[float]) -> dict[str, float]:
    return {
        "p50_ms": percentile(values, 0.50),
        "p99_ms": percentile(values, 0.99),
        "max_ms": max(values) if values else float("nan"),
    }


def _errors(shots: Sequence[Shot]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for shot in shots:
        if shot.status != 201:
            key = shot.error.split("(")[0] if shot.status < 0 else str(shot.status)
            counts[key] = counts.get(key, 0) + 1
    return counts


def _send_rate(shots: Sequence[Shot]) -> float:
    span = shots[-1].sent - shots[0].sent if len(shots) > 1 else 0.0
    return (len(shots) - 1) / span if span > 0 else float("nan")


# --- targeted ---------------------------------------------------------------------------------------------


def _targeted_rate(port: int, client: SseClient, rate: int, window_s: float, drain_s: float) -> dict[str, Any]:
    shots = publish(port, _targeted_requests(port, max(2, round(rate * window_s)), [USER]), rate)
    ok = [s for s in shots if s.status == 201]
    received = client.collect([s.marker for s in ok], drain_s)
    latencies = [(received[s.marker] - s.sent) * 1000 for s in ok if s.marker in received]
    times = sorted(received.values())
    spread = times[-1] - times[0] if len(times) > 1 else 0.0
    return {
        "rate": rate,
        "planned": len(shots),
        "ok": len(ok),
        "errors": _errors(shots),
        "error_count": len(shots) - len(ok),
        "received": len(received),
        "lost": len(ok) - len(received),
        **_ms(latencies),
        "achieved_per_s": (len(times) - 1) / spread if spread > 0 else float("nan"),
        "send_rate_per_s": _send_rate(shots),
        "post_p99_ms": percentile([(s.answered - s.sent) * 1000 for s in shots], 0.99),
        "send_lag_max_ms": max((s.sent - s.planned) * 1000 for s in shots),
    }


def median_at(runs: Sequence[dict[str, Any]], kind: Kind, rate: int, key: str) -> float:
    """The median over ``kind``'s runs of ``key`` at ``rate`` (runs as ``{"kind", "rates": [{"rate", key}]}``)."""
    return median([x[key] for run in runs if run["kind"] == kind for x in run["rates"] if x["rate"] == rate])


def _targeted_run(kind: Kind, ctx: Context, r: int, rates: Sequence[int], window_s: float) -> dict[str, Any]:
    drain_s = SMOKE_DRAIN_S if ctx.smoke else DRAIN_S
    with _server(kind, ctx, f"targeted-{r}") as port:
        client = SseClient()
        try:
            client.connect(port, USER)
            warm = _targeted_rate(port, client, 20, WARMUP / 20, drain_s)
            per_rate = [_targeted_rate(port, client, rate, window_s, drain_s) for rate in rates]
        finally:
            client.close()
    return {"kind": kind, "repeat": r, "warmup": warm, "rates": per_rate}


def targeted(ctx: Context) -> Outcome:
    rates = SMOKE_RATES if ctx.smoke else RATES
    window_s = SMOKE_WINDOW_S if ctx.smoke else WINDOW_S
    drain_s = SMOKE_DRAIN_S if ctx.smoke else DRAIN_S
    runs = [_targeted_run(kind, ctx, r, rates, window_s) for r in range(ctx.repeat) for kind in _order(r)]

    def med(kind: Kind, rate: int, key: str) -> float:
        return median_at(runs, kind, rate, key)

    measures: list[Measure] = []
    for rate in rates:
        tag = f"{rate} msg/s"
        measures.append(
            Measure(f"p50 POST→onmessage @ {tag}", "ms", med("ours", rate, "p50_ms"), med("baseline", rate, "p50_ms"))
        )
        measures.append(
            Measure(
                f"p99 POST→onmessage @ {tag}",
                "ms",
                med("ours", rate, "p99_ms"),
                med("baseline", rate, "p99_ms"),
                must=TARGETED_MUST,
                goal=TARGETED_GOAL,
            )
        )
        achieved = (med("ours", rate, "achieved_per_s"), med("baseline", rate, "achieved_per_s"))
        if any(not a >= 0.95 * rate for a in achieved):  # also when NaN
            measures.append(
                Measure(f"achieved rate @ {tag}", "msg/s", *achieved, better="higher", note="short of plan")
            )
        failed = (med("ours", rate, "error_count"), med("baseline", rate, "error_count"))
        if any(n != 0 for n in failed):
            measures.append(Measure(f"errors (not 201) @ {tag}", "requests", *failed, note="see details"))
        lost = (med("ours", rate, "lost"), med("baseline", rate, "lost"))
        if any(n != 0 for n in lost):
            measures.append(
                Measure(f"lost @ {tag}", "messages", *lost, note=f"201 but not received in {drain_s:.0f} s")
            )
    xs = [math.log10(rate) for rate in rates]
    series = [
        Series(f"{kind} {q}", xs, [med(kind, rate, f"{q}_ms") for rate in rates])
        for kind in ("ours", "baseline")
        for q in ("p99", "p50")
    ]
    return Outcome(
        scenario="targeted",
        title="targeted message, admin POST → SSE receipt, one user, open-loop rates",
        measures=measures,
        series=series,
        x_label="log10(messages/s): 1 = 10, 2 = 100, 3 = 1000",
        y_label="POST sent → MESSAGE received (ms)",
        notes=[
            f"open loop: SELECTED broadcasts to one connected user at {', '.join(map(str, rates))} msg/s for "
            f"{window_s:.0f} s each, raw keep-alive HTTP/1.1 from the bench process (≤ {MAX_IN_FLIGHT} in flight)",
            "latency = time.time() when the request's turn comes → time.time() in the SSE client process (its own "
            "process, raw asyncio Protocol) when the MESSAGE carrying the request's marker arrives",
            "ours: one server, all roles, on the real stack (3 KRaft brokers, RF 3, acks=all; PostgreSQL; Redis): "
            "outbox, relay, Kafka and consumer are all in the path",
            "baseline: bench/baseline/server.py --database-url (same PostgreSQL): one transaction with a broadcast "
            "INSERT and one INSERT per recipient, then the connections' asyncio.Queues; no auth checks at all",
            "achieved rate = (received - 1) / (last receipt - first receipt), shown only when short of 95 % of the "
            "plan; lost = answered 201 but not received within the drain window; errors = transport errors and "
            "statuses but 201 (lost and errors shown only when non-zero)",
            f"medians over {ctx.repeat} run(s) per server, ours/baseline order alternating; {WARMUP} warm-up "
            "messages per server start are not counted; plot x is log10 of the rate",
        ],
        details={"runs": runs},
    )


# --- publish-api ------------------------------------------------------------------------------------------


def _api_run(kind: Kind, ctx: Context, r: int, window_s: float) -> dict[str, Any]:
    with _server(kind, ctx, f"publish-api-{r}") as port:
        warm = publish(port, _targeted_requests(port, WARMUP, OFFLINE_USERS), 20)
        shots = publish(port, _targeted_requests(port, round(API_RATE * window_s), OFFLINE_USERS), API_RATE)
    latencies = [(s.answered - s.sent) * 1000 for s in shots if s.status == 201]
    return {
        "kind": kind,
        "repeat": r,
        "requests": len(shots),
        "ok": len(latencies),
        "errors": _errors(shots),
        "error_count": len(shots) - len(latencies),
        **_ms(latencies),
        "send_rate_per_s": _send_rate(shots),
        "send_lag_max_ms": max((s.sent - s.planned) * 1000 for s in shots),
        "warmup_errors": _errors(warm),
    }


def publish_api(ctx: Context) -> Outcome:
    window_s = SMOKE_API_WINDOW_S if ctx.smoke else API_WINDOW_S
    runs = [_api_run(kind, ctx, r, window_s) for r in range(ctx.repeat) for kind in _order(r)]

    def med(kind: Kind, key: str) -> float:
        return median([run[key] for run in runs if run["kind"] == kind])

    tag = f"@ {API_RATE} req/s"
    return Outcome(
        scenario="publish-api",
        title=f"admin publish API, {API_RATE} req/s open loop, SELECTED to 3 offline users",
        measures=[
            Measure(f"p50 POST {tag}", "ms", med("ours", "p50_ms"), med("baseline", "p50_ms")),
            Measure(
                f"p99 POST {tag}", "ms", med("ours", "p99_ms"), med("baseline", "p99_ms"), must=API_MUST, goal=API_GOAL
            ),
            Measure(f"errors (not 201) {tag}", "requests", med("ours", "error_count"), med("baseline", "error_count")),
        ],
        notes=[
            f"open loop: {API_RATE} POST /api/admin/broadcasts per second for {window_s:.0f} s (SELECTED, 3 users "
            "nobody is connected as), raw keep-alive HTTP/1.1 from the bench process",
            "latency = time.time() when the request's turn comes → its complete response; errors = transport "
            "errors plus any status but 201",
            "ours: one server, all roles, on the real stack: the answer comes after the broadcast, its 3 rows "
            "and outbox events are committed in PostgreSQL (Kafka is after the answer, in the relay)",
            "baseline: bench/baseline/server.py --database-url: one transaction with a broadcast INSERT and one "
            "INSERT per recipient, no auth checks, no idempotency, no outbox",
            f"medians over {ctx.repeat} run(s) per server, order alternating; {WARMUP} warm-up requests per "
            "server start are not counted",
        ],
        details={"runs": runs},
    )
