"""Idle connections and fan-out: N streams held open, then one ALL broadcast to all of them.

One run per (N, variant) serves both scenarios (``idle`` and ``fanout`` share the runs when both are
asked for). The per-process descriptor limit (20,000 here, not raisable) means one process holds fewer
than 20k streams, so N is split over ``ceil(N / PER_PROCESS)`` server processes, each with its own
client process:

- ``ours``: that many instances of ``broadcast-server run`` (all roles) on the real stack, one fleet (one
  consumer group, Redis bus, 3 Kafka brokers, acks=all).
- ``baseline``: that many ``bench/baseline/server.py`` processes (sse-starlette, a queue and generator per
  connection, JSON per connection); its broadcast is a ``POST /publish`` to each process in turn.

Measured, per run:

- RSS per connection: the servers' VmRSS after all N streams are connected and idle, minus before, over N.
- accept rate: streams/s from the first connect to the last stream's first event.
- idle CPU per 10k streams: the servers' CPU over one heartbeat period (15 s) with N idle streams.
- fan-out: for ours, from the Kafka record's timestamp (read back from the group topic) to each client's
  receipt; for the baseline, which has no record, from its first POST. p50/p99/max, deliveries/s over the
  first→last client spread, and the servers' CPU µs per delivery (from the POST until every client has it).
"""

from __future__ import annotations

import asyncio
import json
import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx

from bench.loadgen import Clients, Target
from bench.servers import Baseline, cpu_s, ours, rss_kb, stack_env
from bench.suite import Context, Measure, Outcome, Series, median, percentile

PER_PROCESS = 15_000  # streams per server process (and per client process), under the fd limit
SIZES = [10_000, 20_000, 40_000]
SMOKE_SIZES = [200]
SOURCES = [f"127.0.0.{i}" for i in range(1, 9)]
SSE_PATH = "/api/user/sse/connect?devUser={user}"  # ours reads the bearer token, the baseline devUser
FILLER = (
    "Scheduled maintenance tonight from 22:00 to 23:30 UTC: the reporting dashboard will be read-only and "
    "exports queued meanwhile will run afterwards. Thank you for your patience."
)
_RUNS: dict[tuple[int, int], dict[str, dict[str, Any]]] = {}  # (n, repeat index) -> variant -> result


@dataclass
class Fleet:
    bases: list[str]
    pids: list[int]
    stop: Callable[[], None]
    publish_path: str
    record_times: Callable[[str], float | None]  # broadcast id -> Kafka record timestamp (s), ours only


def _admin_headers() -> dict[str, str]:
    from bench.sse_fanout import ADMIN_TOKEN

    return {"Authorization": f"Bearer {ADMIN_TOKEN}", "X-Dev-User": "admin"}


def _ours(ctx: Context, processes: int) -> Fleet:
    env = stack_env(ctx, "fanout", BROADCAST_SSE__MAX_CONNECTIONS_PER_USER="5")
    servers = []
    try:
        for i in range(processes):
            servers.append(ours(env, ctx, f"ours-{i}"))
    except BaseException:
        for s in servers:
            s.stop()
        raise
    topic = env["BROADCAST_KAFKA__TOPIC_PREFIX"] + "broadcast-user-service-group"

    def stop() -> None:
        for s in servers:
            s.stop()

    return Fleet(
        [s.base for s in servers],
        [s.proc.pid for s in servers],
        stop,
        "/api/admin/broadcasts",
        lambda broadcast_id: asyncio.run(_record_time(ctx, topic, broadcast_id)),
    )


async def _record_time(ctx: Context, topic: str, broadcast_id: str) -> float | None:
    """The timestamp of the group-topic record of ``broadcast_id`` (producer CreateTime), in seconds."""
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=ctx.stack().kafka_bootstrap, auto_offset_reset="earliest", enable_auto_commit=False
    )
    await consumer.start()
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=1000)
            for records in batches.values():
                for record in records:
                    if record.value is not None and broadcast_id.encode() in record.value:
                        return float(record.timestamp) / 1000
        return None
    finally:
        await consumer.stop()


def _baseline(ctx: Context, processes: int) -> Fleet:
    servers = []
    try:
        for i in range(processes):
            servers.append(Baseline(ctx, f"baseline-{i}"))
    except BaseException:
        for b in servers:
            b.stop()
        raise

    def stop() -> None:
        for b in servers:
            b.stop()

    return Fleet([b.base for b in servers], [b.proc.pid for b in servers], stop, "/publish", lambda _: None)


def one_run(ctx: Context, variant: str, n: int) -> dict[str, Any]:
    processes = max(1, math.ceil(n / PER_PROCESS))
    settle, idle_window = (1.0, 2.0) if ctx.smoke else (3.0, 15.0)
    fleet = (_ours if variant == "ours" else _baseline)(ctx, processes)
    clients: list[Clients] = []
    try:
        for base in fleet.bases:
            port = int(base.rsplit(":", 1)[1])
            clients.append(Clients(Target("127.0.0.1", port, SSE_PATH, b"CONNECTED"), 1))
        time.sleep(settle)
        rss0 = sum(rss_kb(pid) for pid in fleet.pids)
        users = [f"u{i}" for i in range(n)]
        for index, c in enumerate(clients):  # every server's share at once
            c.start_connect(users[index :: len(clients)], SOURCES, 100, 120.0)
        connects = [r for c in clients for r in c.results()]
        connected = sum(r["connected"] for r in connects)
        ramp = max(r["last_ready"] for r in connects) - min(r["started"] for r in connects)
        time.sleep(settle)
        rss1 = sum(rss_kb(pid) for pid in fleet.pids)
        idle0 = sum(cpu_s(pid) for pid in fleet.pids)
        time.sleep(idle_window)
        idle_cpu = (sum(cpu_s(pid) for pid in fleet.pids) - idle0) / idle_window

        marker = f"bench{uuid.uuid4().hex[:12]}"
        for c in clients:
            c.arm(marker.encode())
        body = {"content": f"{marker} {FILLER}"[:250], "targetType": "ALL"}
        cpu0 = sum(cpu_s(pid) for pid in fleet.pids)
        sent = time.time()
        ids = []
        with httpx.Client(timeout=60, headers=_admin_headers()) as http:
            for base in fleet.bases if variant == "baseline" else fleet.bases[:1]:
                response = http.post(base + fleet.publish_path, json=body)
                response.raise_for_status()
                ids.append(response.json().get("id") or response.json().get("broadcastId"))
        for c in clients:
            c.send_collect(120.0)
        collected = [r for c in clients for r in c.results()]
        cpu1 = sum(cpu_s(pid) for pid in fleet.pids)
        origin = fleet.record_times(str(ids[0])) if variant == "ours" else None
    finally:
        for c in clients:
            c.close()
        fleet.stop()
    times = sorted(t for r in collected for t in r["times"])
    received = len(times)
    start = origin if origin is not None else sent
    latency = [(t - start) * 1000 for t in times]
    spread = times[-1] - times[0] if received > 1 else float("nan")
    return {
        "variant": variant,
        "n": n,
        "processes": processes,
        "connected": connected,
        "connect_errors": [r["errors"] for r in connects],
        "rss_per_conn_kb": (rss1 - rss0) / max(connected, 1),
        "accept_per_s": connected / ramp if ramp > 0 else float("nan"),
        "idle_cpu_pct_per_10k": idle_cpu * 100 * 10_000 / max(connected, 1),
        "received": received,
        "missing": sum(r["missing"] for r in collected),
        "latency_from": "kafka record" if origin is not None else "POST",
        "record_after_post_ms": (origin - sent) * 1000 if origin is not None else float("nan"),
        "p50_ms": percentile(latency, 0.50),
        "p99_ms": percentile(latency, 0.99),
        "max_ms": max(latency) if latency else float("nan"),
        "spread_ms": spread * 1000,
        "deliveries_per_s": received / spread if received > 1 and spread > 0 else float("nan"),
        "cpu_us_per_delivery": (cpu1 - cpu0) / received * 1e6 if received else float("nan"),
    }


def runs(ctx: Context) -> dict[int, dict[str, list[dict[str, Any]]]]:
    """Every (N, variant) run, interleaved per repeat; cached so the two scenarios share them."""
    out: dict[int, dict[str, list[dict[str, Any]]]] = {}
    for n in SMOKE_SIZES if ctx.smoke else SIZES:
        for r in range(ctx.repeat):
            if (n, r) not in _RUNS:
                _RUNS[(n, r)] = {}
                for variant in ("ours", "baseline"):
                    result = one_run(ctx, variant, n)
                    print(json.dumps({k: (round(v, 2) if isinstance(v, float) else v) for k, v in result.items()}))
                    _RUNS[(n, r)][variant] = result
            for variant, result in _RUNS[(n, r)].items():
                out.setdefault(n, {}).setdefault(variant, []).append(result)
    return out


def _m(per: dict[str, list[dict[str, Any]]], key: str) -> tuple[float, float]:
    return median([r[key] for r in per["ours"]]), median([r[key] for r in per["baseline"]])


def _series(by_n: dict[int, dict[str, list[dict[str, Any]]]], key: str, what: str) -> list[Series]:
    sizes = sorted(by_n)
    return [
        Series(f"{variant} {what}", [float(n) for n in sizes], [_m(by_n[n], key)[i] for n in sizes])
        for i, variant in enumerate(("ours", "baseline"))
    ]


def idle(ctx: Context) -> Outcome:
    by_n = runs(ctx)
    measures = []
    for n, per in by_n.items():
        kb = _m(per, "rss_per_conn_kb")
        measures.append(Measure(f"RSS per idle stream, N={n}", "KB", *kb, must=30, goal=15))
        measures.append(Measure(f"accept rate, N={n}", "streams/s", *_m(per, "accept_per_s"), better="higher"))
        measures.append(Measure(f"idle CPU per 10k streams, N={n}", "% of a core", *_m(per, "idle_cpu_pct_per_10k")))
        connected = _m(per, "connected")
        measures.append(Measure(f"streams held, N={n}", "streams", *connected, better="higher", must=n))
    return Outcome(
        "idle",
        "N idle SSE streams: memory, accept rate, idle CPU",
        measures,
        _series(by_n, "rss_per_conn_kb", "KB/stream"),
        "streams",
        "RSS per stream (KB)",
        [
            f"N is split over ceil(N/{PER_PROCESS}) server processes (fd limit 20,000 per process), one client "
            "process each; ours is a fleet on the real stack (Redis bus, presence), the baseline separate processes",
            "RSS per stream = (sum of the servers' VmRSS with N idle streams - before) / N; idle CPU over one 15 s "
            "heartbeat period, scaled to 10k streams",
        ],
        {"runs": {str(n): per for n, per in by_n.items()}},
    )


def fanout(ctx: Context) -> Outcome:
    by_n = runs(ctx)
    measures = []
    for n, per in by_n.items():
        p99 = _m(per, "p99_ms")
        goal = (1000.0, 300.0) if n == 20_000 else (None, None)
        measures.append(Measure(f"p50 to each client, N={n}", "ms", *_m(per, "p50_ms")))
        measures.append(Measure(f"p99 to each client, N={n}", "ms", *p99, must=goal[0], goal=goal[1]))
        measures.append(Measure(f"max (last client), N={n}", "ms", *_m(per, "max_ms")))
        measures.append(
            Measure(f"deliveries/s, N={n}", "deliveries/s", *_m(per, "deliveries_per_s"), "higher", 30_000, 150_000)
        )
        measures.append(Measure(f"server CPU per delivery, N={n}", "µs", *_m(per, "cpu_us_per_delivery")))
        measures.append(Measure(f"not received, N={n}", "clients", *_m(per, "missing")))
    return Outcome(
        "fanout",
        "one ALL broadcast to N connected streams",
        measures,
        _series(by_n, "p99_ms", "p99 ms"),
        "connected streams",
        "p99 latency (ms)",
        [
            "ours: from the group-topic record's timestamp (read back from Kafka) to each client's receipt; the "
            "baseline has no record: from its first POST (it fans out inside the request)",
            "deliveries/s over the first->last client spread; CPU = the servers' utime+stime from the POST until "
            "every client has it, over N; ~250-byte content",
        ],
        {"runs": {str(n): per for n, per in by_n.items()}},
    )
