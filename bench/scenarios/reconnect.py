"""Reconnect storm: every client drops its stream at once and comes back with ``Last-Event-ID``.

Ours is a fleet of two ``broadcast-server run`` instances (all roles) on the real stack, sharing one
schema, consumer group and Redis bus; the baseline is two ``bench/baseline/server.py`` processes, each
with its own queues (the naive fleet: the publisher posts every broadcast to both). Each server gets
``per_server`` clients (10k; smoke 100) held by its own client process (``bench.resume_clients``:
``EventSource``-like, parses every event, resumes with ``Last-Event-ID``; the baseline gets the same
header and ignores it). Numbered ALL broadcasts flow at a steady 2/s (round-robin over our instances)
before, during and after the storm.

Measured per run, from the drop (``time.time()`` when the client processes abort every socket, RST):

- all back: until the last client has its ``CONNECTED`` event again (reconnects start after a uniform
  0-0.5 s jitter; refused opens are retried after their ``Retry-After`` and counted).
- all caught up: until the last client holds every broadcast acknowledged (201) before its own
  ``CONNECTED`` — everything up to the drop and what was published while it was away (NaN when some
  client never gets them all, as the baseline, which does not replay).
- lost: (client, broadcast) pairs acknowledged while the client was subscribed or reconnecting and never
  shown, counted after publishing stopped and deliveries went quiet.
- duplicates shown: the same broadcast a second time under another SSE id (an SSE-id dedupe would not
  hide it); raw repeats: every second receipt of a broadcast, also those under the same SSE id (ours
  replays the last 30 s of group broadcasts on resume; the client drops them by id).

No peer column here: Centrifugo's unidirectional SSE ignores ``Last-Event-ID``; its recovery needs channel
history and the last ``offset``/``epoch`` in a new ``cf_connect`` command, which this client does not speak.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bench.resume_clients import Publisher, ResumeClients, Setup
from bench.servers import Baseline, ours, stack_env
from bench.sse_fanout import SOURCES
from bench.suite import Context, Measure, Outcome, Series, median, percentile

SSE_PATH = "/api/user/sse/connect?devUser={user}"  # ours reads the bearer token; the baseline this
SERVERS = 2


@dataclass(frozen=True)
class Size:
    per_server: int
    pre_s: float  # broadcasts flowing before the drop
    tail_s: float  # broadcasts still flowing after every client is back
    back_timeout_s: float
    quiet_s: float  # deliveries stopped for this long: the run is drained
    drain_timeout_s: float
    open_timeout_s: float
    interval_s: float = 0.5
    jitter_s: float = 0.5
    concurrency: int = 200  # opens in flight per client process before the storm


FULL = Size(10_000, pre_s=10, tail_s=5, back_timeout_s=360, quiet_s=10, drain_timeout_s=120, open_timeout_s=300)
SMOKE = Size(100, pre_s=3, tail_s=2, back_timeout_s=20, quiet_s=2, drain_timeout_s=10, open_timeout_s=30)


@dataclass(frozen=True)
class Fleet:
    """Where the clients go and where the publisher posts."""

    ports: list[int]
    urls: list[str]
    fan_out: bool
    pids: list[int]


def reconnect(ctx: Context) -> Outcome:
    size = SMOKE if ctx.smoke else FULL
    runs: dict[str, list[dict[str, Any]]] = {"ours": [], "baseline": []}
    for r in range(ctx.repeat):  # interleaved so machine noise hits both alike
        runs["ours"].append(_with_ours(ctx, size, r))
        runs["baseline"].append(_with_baseline(ctx, size, r))
    return _outcome(size, runs)


def _with_ours(ctx: Context, size: Size, r: int) -> dict[str, Any]:
    env = stack_env(ctx, "reconnect")
    servers = []
    try:
        for k in range(SERVERS):
            servers.append(ours(env, ctx, f"reconnect-ours-{r}-{k}"))
        fleet = Fleet(
            [s.port for s in servers],
            [s.base + "/api/admin/broadcasts" for s in servers],
            False,
            [s.proc.pid for s in servers],
        )
        return _storm(fleet, size, f"rc{r}o")
    finally:
        for server in servers:
            server.stop()


def _with_baseline(ctx: Context, size: Size, r: int) -> dict[str, Any]:
    servers: list[Baseline] = []
    try:
        for k in range(SERVERS):
            servers.append(Baseline(ctx, f"reconnect-baseline-{r}-{k}"))
        fleet = Fleet(
            [s.port for s in servers], [s.base + "/publish" for s in servers], True, [s.proc.pid for s in servers]
        )
        return _storm(fleet, size, f"rc{r}b")
    finally:
        for server in servers:
            server.stop()


def _storm(fleet: Fleet, size: Size, tag: str) -> dict[str, Any]:
    """One run: connect, publish, drop everything, wait until back and drained, then count."""
    clients = ResumeClients(Setup("127.0.0.1", SSE_PATH, tag), processes=len(fleet.ports))
    publisher = Publisher(fleet.urls, tag, size.interval_s, fan_out=fleet.fan_out)
    try:
        specs = [
            [(f"{tag}-{k}-{i}", port, SOURCES[i % len(SOURCES)]) for i in range(size.per_server)]
            for k, port in enumerate(fleet.ports)
        ]
        opened = clients.open(specs, size.concurrency, size.open_timeout_s)
        total = sum(int(o["connected"]) for o in opened)
        time.sleep(1.0)
        publisher.start()
        time.sleep(size.pre_s)
        drop_at = min(clients.all("drop", size.jitter_s))
        curve = _wait_back(clients, total, drop_at, size.back_timeout_s)
        time.sleep(size.tail_s)
        publisher.stop()
        drained_s = _drain(clients, publisher, total, size)
        reports = clients.all("report", publisher.acks())
    finally:
        if publisher.is_alive():
            publisher.stop()
        clients.close()
    return _summary(opened, reports, publisher, curve, drained_s, total)


def _wait_back(clients: ResumeClients, total: int, drop_at: float, timeout_s: float) -> list[tuple[float, int]]:
    """Poll until every client is CONNECTED again; (seconds after the drop, clients back) samples."""
    curve: list[tuple[float, int]] = []
    while True:
        back = sum(int(p["back"]) for p in clients.all("progress", []))
        elapsed = time.time() - drop_at
        curve.append((elapsed, back))
        if back >= total or elapsed > timeout_s:
            return curve
        time.sleep(0.25)


def _drain(clients: ResumeClients, publisher: Publisher, total: int, size: Size) -> float:
    """After publishing stopped: wait until every client has everything, or nothing arrived for quiet_s."""
    numbers = [n for n, _ in publisher.acks()]
    started = last_change = time.monotonic()
    last_messages = -1
    while time.monotonic() - started < size.drain_timeout_s:
        progress = clients.all("progress", numbers)
        messages = sum(int(p["messages"]) for p in progress)
        if sum(int(p["complete"]) for p in progress) >= total:
            break
        if messages != last_messages:
            last_messages, last_change = messages, time.monotonic()
        elif time.monotonic() - last_change >= size.quiet_s:
            break
        time.sleep(0.5)
    return time.monotonic() - started


def _summary(
    opened: list[dict[str, Any]],
    reports: list[dict[str, Any]],
    publisher: Publisher,
    curve: list[tuple[float, int]],
    drained_s: float,
    total: int,
) -> dict[str, Any]:
    back = sorted(t for r in reports for t in r["back"])
    caught = sorted(t for r in reports for t in r["caught"])
    refusals: dict[str, int] = {}
    errors: dict[str, int] = {}
    for report in reports:
        for status, n in report["refusals"].items():
            refusals[str(status)] = refusals.get(str(status), 0) + n
        for key, n in report["errors"].items():
            errors[key] = errors.get(key, 0) + n
    counted = ("lost", "clients_lost", "raw_repeats", "dups_shown", "timeouts", "server_drops", "resyncs")
    return {
        "clients": total,
        "open_failed": sum(int(o["failed"]) for o in opened),
        "open_s": max(float(o["seconds"]) for o in opened),
        "published": len(publisher.sent),
        "acknowledged": len(publisher.acks()),
        "publish_refused": publisher.refused(),
        "back": len(back),
        "caught_up": len(caught),
        "all_back_s": back[-1] if back and len(back) >= total else math.nan,
        "p50_back_s": percentile(back, 0.5),
        "all_caught_s": caught[-1] if caught and len(caught) >= total else math.nan,
        "p50_caught_s": percentile(caught, 0.5),
        **{key: sum(int(r[key]) for r in reports) for key in counted},
        "limit_events": sum(int(r["limit_events"]) for r in reports),
        "refused_opens": sum(refusals.values()),
        "refusals": refusals,
        "refusal_bodies": {k: v for r in reports for k, v in r["refusal_bodies"].items()},
        "errors": errors,
        "drained_s": drained_s,
        "progress": curve,
        "back_curve": _curve(back),
        "caught_curve": _curve(caught),
    }


def _curve(values: list[float], points: int = 200) -> list[tuple[float, int]]:
    """(time, how many by then) for at most ``points`` evenly spaced entries of a sorted list, and its last."""
    if not values:
        return []
    step = max(1, len(values) // points)
    picks = sorted({*range(0, len(values), step), len(values) - 1})
    return [(values[i], i + 1) for i in picks]


def _outcome(size: Size, runs: dict[str, list[dict[str, Any]]]) -> Outcome:
    def figure(key: str) -> Callable[[str], float]:
        return lambda variant: median([float(r[key]) for r in runs[variant]])

    def measure(metric: str, unit: str, key: str, **options: Any) -> Measure:
        value = figure(key)
        return Measure(metric, unit, value("ours"), value("baseline"), **options)

    measures = [
        measure("all clients back after the drop", "s", "all_back_s"),
        measure("all caught up after the drop", "s", "all_caught_s", must=20.0, goal=5.0),
        measure("p50 caught up after the drop", "s", "p50_caught_s"),
        measure("clients missing a broadcast", "count", "clients_lost", note="at the end, after the drain"),
        measure("lost deliveries", "count", "lost", must=0.0, note="issue: must be 0"),
        measure("duplicates shown", "count", "dups_shown", must=0.0, note="issue: must be 0"),
        measure("raw repeats (same SSE id)", "count", "raw_repeats", note="dropped by an SSE-id dedupe"),
        measure("refused opens (429/503)", "count", "refused_opens"),
    ]
    series = []
    for variant in ("ours", "baseline"):
        first = runs[variant][0]
        for key, label in (("back_curve", "back"), ("caught_curve", "caught up")):
            curve = first[key]
            series.append(Series(f"{variant}: {label}", [float(t) for t, _ in curve], [float(n) for _, n in curve]))
    ours_run = runs["ours"][0]
    notes = [
        f"{SERVERS} servers x {size.per_server:,} clients (2 client processes, one per server); numbered ALL "
        f"broadcasts every {size.interval_s:g} s from {size.pre_s:g} s before the drop until {size.tail_s:g} s "
        "after the last client is back; ours round-robin over its 2 instances (one fleet: Kafka + Redis "
        "bus), the baseline's to both of its processes (each its own queues).",
        f"drop: every client aborts its socket (RST) at once and reconnects after a uniform 0-{size.jitter_s:g} s "
        "jitter with Last-Event-ID = the last SSE id it saw; refused opens retried after Retry-After.",
        "back = CONNECTED again; caught up = holds every broadcast acknowledged (201) before its own CONNECTED; "
        "'all' = the last client (NaN when some client never does: the baseline does not replay).",
        "lost = acknowledged broadcasts a client never showed (clients connected before the first one); duplicates "
        "shown = a broadcast again under another SSE id; raw repeats = every repeat, also same-id ones.",
        f"ours, first run: {ours_run['clients']:,} clients, {ours_run['acknowledged']} broadcasts acknowledged "
        f"({ours_run['publish_refused']} refused), refused opens {ours_run['refusals'] or 0}, server-side drops "
        f"{ours_run['server_drops']}, RESYNC {ours_run['resyncs']}, open timeouts {ours_run['timeouts']}.",
        "servers, client processes, the publisher and the stack share the same 2 cores: client parsing "
        "competes with the servers during the storm.",
    ]
    return Outcome(
        "reconnect",
        f"reconnect storm: {SERVERS * size.per_server:,} clients drop at once and resume",
        measures,
        series=series,
        x_label="seconds after the drop",
        y_label="clients",
        notes=notes,
        details={"size": size.__dict__, "runs": runs},
    )
