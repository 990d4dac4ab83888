"""The verifying harness of the fault suite: numbered broadcasts in, what each client saw out.

* ``Fleet``: the live app instances (real ``broadcast-server run`` processes); clients and the publisher
  pick their instance from it, so a killed instance's clients move to another one, as behind a balancer.
* ``Publisher``: numbered broadcasts (``#<seq>``), SELECTED to some users or ALL, at a steady pace,
  round-robin over the live instances; remembers which ones the API acknowledged (201) and how every
  other one was refused (status, content type), since a refusal is owed nothing but a clear answer.
* ``Subscriber``: what a browser's ``EventSource`` does, over a bare socket so a thousand of them are
  cheap: it reconnects on its own after the stream ends or fails, sends ``Last-Event-ID``, and on
  ``RESYNC`` refetches its inbox. It records every MESSAGE with its SSE id.
* ``verdict``: every acknowledged broadcast reached every entitled subscriber exactly once as the client
  sees it (after dropping repeats of an SSE id it already has), SELECTED ones in per-user order. Repeats
  the server sent under the same id are counted separately (``resent``): a client drops them.
* ``Probe``: a process's RSS, file descriptors, event-loop tasks and open streams, to check they return
  to their baseline.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import random
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
from prometheus_client.parser import text_string_to_metric_families

from devstack.servers import Server
from devstack.sse_frames import parse_frame
from tests.auth import bearer, token

ADMIN = bearer("admin", "admin")
Audience = frozenset[str] | None  # None: ALL


class Fleet:
    """The app instances of a scenario, by name; ``live()`` those whose process still runs."""

    def __init__(self, env: dict[str, str], cwd: Path, factory: list[Server]) -> None:
        self.env, self.cwd, self.factory = env, cwd, factory
        self.servers: dict[str, Server] = {}

    def start(self, name: str, roles: str | None = None, **overrides: str) -> Server:
        server = Server({**self.env, **overrides}, self.cwd, roles=roles, name=name)
        self.factory.append(server)
        server.wait_live()
        self.servers[name] = server  # in rotation once it answers
        return server

    @classmethod
    def of(cls, env: dict[str, str], cwd: Path, factory: list[Server], *names: str) -> Fleet:
        """A fleet with an instance (all roles) started for each of ``names``."""
        fleet = cls(env, cwd, factory)
        for name in names:
            fleet.start(name)
        return fleet

    def retire(self, name: str) -> int:
        """Take ``name`` out of rotation (as a balancer does first), then SIGTERM it; its exit code."""
        server = self.servers.pop(name)
        return server.stop()

    def live(self) -> list[Server]:
        # a snapshot first: ``retire`` runs in a worker thread (asyncio.to_thread) and may pop an instance
        # while the publisher, on the event loop, asks for the live ones ("dictionary changed size")
        servers = list(self.servers.values())
        return [s for s in servers if s.proc.poll() is None]

    def bases(self) -> list[str]:
        return [s.base for s in self.live()]


def last_assignment(log: Path, listener: str = "delivery-selected") -> set[int] | None:
    """The partitions the last "assigned" line of ``listener`` in a server log names (None: none yet)."""
    lines = [line for line in log.read_text().splitlines() if f"listener {listener} member 0: assigned" in line]
    if not lines:
        return None
    return set().union(*assigned_spans(lines[-1].split(": assigned ", 1)[1]).values())


def assigned_spans(spans: str) -> dict[str, set[int]]:
    """An "assigned" line's partitions per topic: it names them as ranges, ``topic[0-3,7] other[1]``
    (``consumers.container._spans``)."""
    found: dict[str, set[int]] = {}
    for topic, runs in re.findall(r"(\S+?)\[([0-9,\-]*)\]", spans):
        numbers = found.setdefault(topic, set())
        for run in filter(None, runs.split(",")):
            first, _, last = run.partition("-")
            numbers.update(range(int(first), int(last or first) + 1))
    return found


@dataclass(frozen=True)
class Sent:
    seq: int
    id: str
    audience: Audience
    acked_at: float

    def entitles(self, user: str) -> bool:
        return self.audience is None or user in self.audience


@dataclass(frozen=True)
class Refusal:
    seq: int
    status: int | None  # None: no HTTP answer (connection refused or reset, timeout)
    content_type: str
    detail: str


@dataclass(frozen=True)
class Refused:
    """A stream connect the server refused: its status, its ``Retry-After`` hint (None: none given) and
    the start of its body."""

    status: int
    retry_after_s: int | None
    detail: str


Plan = Callable[[int], Audience]


def alternating(users: Sequence[str], all_every: int = 4) -> Plan:
    """Every ``all_every``-th broadcast goes to ALL, the others to one user each in turn."""
    return lambda seq: None if seq % all_every == all_every - 1 else frozenset([users[seq % len(users)]])


class Publisher:
    """Posts numbered broadcasts, one every ``interval_s``, to the fleet's live instances in turn; the
    numbers go on across ``run`` calls, so one publisher can cover the phases of a scenario."""

    def __init__(self, fleet: Fleet, plan: Plan, interval_s: float = 0.05, timeout_s: float = 15.0) -> None:
        self.fleet, self.plan, self.interval_s, self.timeout_s = fleet, plan, interval_s, timeout_s
        self.acked: list[Sent] = []
        self.refused: list[Refusal] = []
        self.task: asyncio.Task[None] | None = None
        self.next_seq = 0
        self._until = 0

    @property
    def attempted(self) -> int:
        return len(self.acked) + len(self.refused)

    def start(self, count: int = 1_000_000) -> Publisher:
        """Post ``count`` broadcasts in the background (until ``halt``)."""
        self.task = asyncio.create_task(self.run(count))
        return self

    def halt(self) -> None:
        """Post nothing after the broadcast in flight."""
        self._until = self.next_seq

    async def finish(self, timeout_s: float = 120.0) -> None:
        assert self.task is not None
        await asyncio.wait_for(self.task, timeout_s)

    async def run(self, count: int) -> None:
        self._until = self.next_seq + count
        turn = itertools.count()
        async with httpx.AsyncClient(timeout=self.timeout_s) as http:
            while self.next_seq < self._until:
                seq, self.next_seq = self.next_seq, self.next_seq + 1
                audience = self.plan(seq)
                body: dict[str, Any] = {"content": f"#{seq}", "targetType": "ALL"}
                if audience is not None:
                    body = {"content": f"#{seq}", "targetType": "SELECTED", "targetIds": sorted(audience)}
                bases = self.fleet.bases()
                if not bases:
                    self.refused.append(Refusal(seq, None, "", "no live instance"))
                else:
                    await self._post(http, bases[next(turn) % len(bases)], seq, audience, body)
                await asyncio.sleep(self.interval_s)

    async def _post(self, http: httpx.AsyncClient, base: str, seq: int, audience: Audience, body: Any) -> None:
        try:
            response = await http.post(base + "/api/admin/broadcasts", json=body, headers=ADMIN)
        except httpx.HTTPError as exc:
            self.refused.append(Refusal(seq, None, "", repr(exc)[:200]))
            return
        if response.status_code == 201:
            self.acked.append(Sent(seq, response.json()["id"], audience, time.monotonic()))
        else:
            kind = response.headers.get("content-type", "")
            self.refused.append(Refusal(seq, response.status_code, kind, response.text[:300]))

    async def reached(self, attempts: int, timeout_s: float = 90.0) -> None:
        deadline = time.monotonic() + timeout_s
        while self.attempted < attempts:
            assert time.monotonic() < deadline, f"only {self.attempted}/{attempts} posts within {timeout_s} s"
            if self.task is not None and self.task.done():
                failure = None if self.task.cancelled() else self.task.exception()
                raise AssertionError(f"publisher ended early at {self.attempted}/{attempts}: {failure!r}")
            await asyncio.sleep(0.02)

    def answered_statuses(self) -> dict[int | None, int]:
        counts: dict[int | None, int] = {}
        for refusal in self.refused:
            counts[refusal.status] = counts.get(refusal.status, 0) + 1
        return counts


@dataclass
class Seen:
    event_id: str
    broadcast_id: str
    connection: int
    at: float


@dataclass
class Subscriber:
    """One user's ``EventSource``: connects to ``fleet`` (its ``home`` instance first), reads events,
    reconnects by itself ``retry_s`` (jittered) after the stream ends, with ``Last-Event-ID``; a refused
    connect is retried after its ``Retry-After`` (jittered up by half, as clients spread a herd)."""

    fleet: Fleet
    user: str
    home: int = 0
    retry_s: float = 0.5
    seen: list[Seen] = field(default_factory=list)
    inbox_ids: set[str] = field(default_factory=set)
    events: dict[str, int] = field(default_factory=dict)  # event name -> count
    beats: list[float] = field(default_factory=list)  # when each heartbeat comment arrived
    connections: int = 0
    refusals: list[Refused] = field(default_factory=list)  # non-200 answers to a connect
    back_after_refusal_s: list[float] = field(default_factory=list)  # first refusal to connected, per streak
    last_event_id: str | None = None
    connected: asyncio.Event = field(default_factory=asyncio.Event)
    base: str | None = None  # the instance of the current connection
    _task: asyncio.Task[None] | None = None
    _refetches: set[asyncio.Task[None]] = field(default_factory=set)
    refetch_errors: list[str] = field(default_factory=list)
    _token: str = ""
    _hint_s: float | None = None  # the last refusal's Retry-After, for the next wait
    _refused_at: float | None = None  # the first refusal since the last stream was up

    def start(self) -> Subscriber:
        self._token = token(self.user)
        self._task = asyncio.create_task(self._run())
        return self

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def broadcast_ids(self) -> set[str]:
        return {s.broadcast_id for s in self.seen} | self.inbox_ids

    async def _run(self) -> None:
        attempt = 0
        while True:
            bases = self.fleet.bases()
            if bases:
                self.base = bases[(self.home + attempt) % len(bases)]
                with contextlib.suppress(OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                    if await self._stream(self.base):
                        attempt = -1  # the stream was up: after it ends, start from the first live instance
            self.connected.clear()
            attempt += 1
            await asyncio.sleep(self._next_wait())

    def _next_wait(self) -> float:
        hint, self._hint_s = self._hint_s, None
        if hint is not None:
            return hint * random.uniform(1.0, 1.5)
        return self.retry_s * random.uniform(0.5, 1.5)

    async def _stream(self, base: str) -> bool:
        host, port = base.removeprefix("http://").rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port), limit=1 << 20)
        try:
            resume = f"Last-Event-ID: {self.last_event_id}\r\n" if self.last_event_id else ""
            writer.write(
                f"GET /api/user/sse/connect HTTP/1.0\r\nHost: {host}\r\nAuthorization: Bearer {self._token}\r\n"
                f"Accept: text/event-stream\r\n{resume}\r\n".encode()
            )
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            if status != 200:
                self._refused(status, head, (await reader.read(300)).decode(errors="replace"))
                return False
            self.connections += 1
            if self._refused_at is not None:
                self.back_after_refusal_s.append(time.monotonic() - self._refused_at)
                self._refused_at = None
            while True:
                self._handle(await reader.readuntil(b"\n\n"), base)
        finally:
            writer.close()

    def _refused(self, status: int, head: bytes, body: str) -> None:
        hint = re.search(rb"\r\nretry-after: *(\d+)\r\n", head, re.IGNORECASE)
        retry_after = int(hint.group(1)) if hint else None
        self.refusals.append(Refused(status, retry_after, body))
        self._hint_s = retry_after
        if self._refused_at is None:
            self._refused_at = time.monotonic()

    def _handle(self, block: bytes, base: str) -> None:
        frame = parse_frame(block)  # chunk-size lines ("d\r") between frames are unknown fields, ignored
        name = frame.event
        if name is None:
            if frame.comment:
                self.beats.append(time.monotonic())
            return  # a heartbeat comment or the retry hint
        self.events[name] = self.events.get(name, 0) + 1
        if name == "CONNECTED":
            self.connected.set()
        elif name == "MESSAGE":
            if frame.id is None or frame.data is None:
                raise AssertionError(f"a MESSAGE without an id or data: {block!r}")
            event_id = frame.id
            self.seen.append(
                Seen(event_id, str(orjson.loads(frame.data)["broadcastId"]), self.connections, time.monotonic())
            )
            self.last_event_id = event_id
        elif name == "RESYNC":
            task = asyncio.get_running_loop().create_task(self._refetch(base))
            self._refetches.add(task)
            task.add_done_callback(self._refetches.discard)

    async def _refetch(self, base: str) -> None:
        """What a client does on RESYNC: read its whole inbox (every page); a failure is recorded."""
        cursor: str | None = None
        try:
            async with httpx.AsyncClient(timeout=15, headers={"Authorization": f"Bearer {self._token}"}) as http:
                while True:
                    params = {"cursor": cursor} if cursor else {}
                    response = await http.get(base + "/api/user/messages", params=params)
                    response.raise_for_status()
                    page = response.json()
                    self.inbox_ids.update(str(item["broadcastId"]) for item in page["items"])
                    if not (cursor := page.get("nextCursor")):
                        return
        except (httpx.HTTPError, KeyError, ValueError) as exc:
            self.refetch_errors.append(repr(exc)[:200])


async def subscribe(fleet: Fleet, users: Iterable[str], timeout_s: float = 60.0, **options: Any) -> list[Subscriber]:
    """Start a subscriber per user (spread over the live instances) and wait until each is connected."""
    subs = [Subscriber(fleet, user, home=n, **options).start() for n, user in enumerate(users)]
    await asyncio.wait_for(asyncio.gather(*(s.connected.wait() for s in subs)), timeout_s)
    return subs


async def close_all(subs: Iterable[Subscriber]) -> None:
    await asyncio.gather(*(s.close() for s in subs))


@dataclass
class Verdict:
    attempted: int
    acked: int
    refused: int
    expected: int  # deliveries owed: acknowledged broadcasts x entitled subscribers
    delivered: int  # distinct owed broadcasts the subscribers ended up with (live, on reconnect or inbox)
    lost: int
    duplicates: int  # the same broadcast shown twice: under two different SSE ids
    resent: int  # repeats of an SSE id the client already had (it drops them)
    out_of_order: int  # subscribers whose SELECTED messages arrived out of per-user order
    misdelivered: int  # broadcasts a subscriber got although not entitled to them
    via_inbox: int  # owed broadcasts found only through a RESYNC refetch
    resyncs: int  # RESYNC events (the server could not prove a resume complete)
    reconnects: int
    lost_examples: list[str]

    def line(self) -> str:
        return (
            f"sent {self.attempted} (acknowledged {self.acked}, refused {self.refused}); owed {self.expected} "
            f"deliveries, received {self.delivered}, lost {self.lost}, duplicated {self.duplicates}, "
            f"resent-and-dropped {self.resent}, out of order {self.out_of_order}, misdelivered "
            f"{self.misdelivered}, via inbox {self.via_inbox} (RESYNC {self.resyncs}), reconnects {self.reconnects}"
        )

    def assert_clean(self, resync_allowed: bool = False) -> None:
        """Nothing lost, nothing shown twice, per-user order kept, nobody got another's message; and,
        unless ``resync_allowed``, every stream proved its resumes complete (no RESYNC, nothing that only
        the inbox refetch found)."""
        assert (self.lost, self.duplicates, self.out_of_order, self.misdelivered) == (0, 0, 0, 0), (
            f"{self.line()}; lost e.g. {self.lost_examples[:5]}"
        )
        if not resync_allowed:
            assert (self.resyncs, self.via_inbox) == (0, 0), self.line()


def verdict(publisher: Publisher, subs: Sequence[Subscriber]) -> Verdict:
    acked = {s.id: s for s in publisher.acked}
    expected = delivered = lost = duplicates = resent = out_of_order = misdelivered = via_inbox = 0
    lost_examples: list[str] = []
    for sub in subs:
        by_event_id: dict[str, str] = {}
        for s in sub.seen:
            if s.event_id in by_event_id:
                resent += 1
            else:
                by_event_id[s.event_id] = s.broadcast_id
        shown = list(by_event_id.values())  # what the client shows, in arrival order
        duplicates += len(shown) - len(set(shown))
        owed = {i for i, s in acked.items() if s.entitles(sub.user)}
        got = set(shown) | sub.inbox_ids
        expected += len(owed)
        delivered += len(owed & got)
        via_inbox += len((owed & sub.inbox_ids) - set(shown))
        missing = owed - got
        lost += len(missing)
        lost_examples += [f"{sub.user}:#{acked[i].seq}" for i in sorted(missing, key=lambda i: acked[i].seq)[:2]]
        misdelivered += sum(1 for i in set(shown) if i in acked and not acked[i].entitles(sub.user))
        mine = [acked[i].seq for i in dict.fromkeys(shown) if i in acked and acked[i].audience is not None]
        out_of_order += mine != sorted(mine)
    return Verdict(
        publisher.attempted,
        len(publisher.acked),
        len(publisher.refused),
        expected,
        delivered,
        lost,
        duplicates,
        resent,
        out_of_order,
        misdelivered,
        via_inbox,
        sum(s.events.get("RESYNC", 0) for s in subs),
        sum(max(0, s.connections - 1) for s in subs),
        lost_examples,
    )


async def settled(publisher: Publisher, subs: Sequence[Subscriber], timeout_s: float) -> Verdict:
    """Wait until nothing acknowledged is missing (or ``timeout_s``), then a short quiet period in which a
    late repeat would show; the verdict then."""
    deadline = time.monotonic() + timeout_s
    while verdict(publisher, subs).lost and time.monotonic() < deadline:  # noqa: ASYNC110 - polling on purpose
        await asyncio.sleep(0.25)
    await asyncio.sleep(1.5)
    return verdict(publisher, subs)


def latencies(publisher: Publisher, subs: Sequence[Subscriber], seqs: range) -> list[float]:
    """Seconds from the API's answer to each entitled subscriber's first sight, for broadcasts ``seqs``."""
    first: dict[tuple[str, str], float] = {}
    for sub in subs:
        for seen in sub.seen:
            first.setdefault((sub.user, seen.broadcast_id), seen.at)
    return [
        first[(sub.user, s.id)] - s.acked_at
        for s in publisher.acked
        if s.seq in seqs
        for sub in subs
        if s.entitles(sub.user) and (sub.user, s.id) in first
    ]


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile of ``values`` (nearest rank)."""
    return sorted(values)[min(len(values) - 1, int(q * len(values)))]


async def samples(fleet: Fleet, name: str) -> list[tuple[dict[str, str], float]]:
    """(labels, value) of every sample named ``name`` in the /metrics of the fleet's live instances."""
    found: list[tuple[dict[str, str], float]] = []
    for base in fleet.bases():
        found += await base_samples(base, name)
    return found


async def base_samples(base: str, *names: str) -> list[tuple[dict[str, str], float]]:
    """(labels, value) of every sample named one of ``names`` in one instance's /metrics."""
    async with httpx.AsyncClient(timeout=10) as http:
        text = (await http.get(base + "/metrics")).text
    return [
        ({**sample.labels, "__name__": sample.name}, sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name in names
    ]


def report(scenario: str, injected: str, result: Verdict, extra: str = "") -> None:
    print(f"\n[{scenario}] injected: {injected}\n[{scenario}] verified: {result.line()}{'; ' + extra if extra else ''}")


KAFKA_PORTS = ("11092", "12092", "13092")
POOLS = 32 + 20  # descriptors pools may keep: Redis's bound (redis.max_connections) + PostgreSQL's (20 + 0)


@dataclass(frozen=True)
class Snapshot:
    rss_mib: float
    fds: int
    tasks: int  # the app's own (the Kafka client's tasks come and go with fetches and connections)
    streams: int
    kafka: int  # connections to brokers (a failover leaves connections to more of them)

    def __str__(self) -> str:
        return (
            f"RSS {self.rss_mib:.1f} MiB, {self.fds} fds, {self.tasks} tasks, {self.streams} streams, "
            f"{self.kafka} Kafka connections"
        )


def peers(server: Server) -> dict[str, int]:
    """The process's TCP sockets by the port at the other end (e.g. 15432 PostgreSQL, 16379 Redis)."""
    pid = server.proc.pid
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    counts: dict[str, int] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            parts = line.split()
            if parts[9] in inodes:
                local, remote = (int(p.rsplit(":", 1)[1], 16) for p in parts[1:3])
                key = f"listen:{local}" if remote == 0 else str(remote if remote < 32768 else f"client->{local}")
                counts[key] = counts.get(key, 0) + 1
    return counts


class Probe:
    """Resource readings of one server process: /proc for RSS and descriptors, /metrics for the rest."""

    def __init__(self, server: Server) -> None:
        self.server = server

    async def snapshot(self) -> Snapshot:
        pid = self.server.proc.pid
        status = Path(f"/proc/{pid}/status").read_text()  # noqa: ASYNC240 - procfs answers at once
        rss_kib = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
        tasks = streams = 0.0
        for labels, value in await base_samples(
            self.server.base, "broadcast_event_loop_tasks", "broadcast_sse_connections"
        ):
            if labels["__name__"] == "broadcast_sse_connections":
                streams = value
            elif labels["origin"] == "app":
                tasks = value
        sockets = peers(self.server)
        return Snapshot(
            rss_kib / 1024,
            len(os.listdir(f"/proc/{pid}/fd")),
            int(tasks),
            int(streams),
            sum(sockets.get(port, 0) for port in KAFKA_PORTS),
        )

    async def back_to(self, baseline: Snapshot, timeout_s: float = 30.0, slack: int = 3, pools: int = 0) -> Snapshot:
        """Wait until streams are back to the baseline's, the app's tasks within ``slack`` of it (a sampler
        round may be in flight), and descriptors within ``slack + pools`` plus extra Kafka connections
        (pools that grew under load keep idle connections up to their bounds; a client that met a failover
        keeps connections to more brokers); fails naming the last reading and the sockets."""
        deadline = time.monotonic() + timeout_s
        while True:
            now = await self.snapshot()
            if (
                now.streams == baseline.streams
                and now.tasks <= baseline.tasks + slack
                and now.fds <= baseline.fds + slack + pools + max(0, now.kafka - baseline.kafka)
            ):
                return now
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"not back to baseline ({baseline}) within {timeout_s} s: {now}; {peers(self.server)}"
                )
            await asyncio.sleep(0.5)
