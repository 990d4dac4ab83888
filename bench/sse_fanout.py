"""SSE fan-out: N idle streams, then one ALL broadcast, on our server and on a naive baseline, in one run.

Measured per server, each in its own process (clients in 2 other processes, raw asyncio protocols):

- RSS per connection: server VmRSS after all N streams are connected and idle, minus before, over N.
- accept rate: streams/s from the first connect to the last stream's first event (``CONNECTED``).
- idle CPU: server CPU % over one heartbeat period (15 s) with N idle streams (pings, background loops).
- one ALL broadcast: time from the admin POST's response to each client's receipt of the MESSAGE event
  (p50/p99/max), first→last client spread (pure fan-out), deliveries/s over that spread, and server
  CPU µs per delivery (utime+stime from before the POST until every client has it).

Variants: ``ours`` is the real app in embedded mode (``python -m broadcast run --roles
api,relay,consumers,scheduler``, no Kafka/Redis: SQLite, in-process log and bus), POST
``/api/admin/broadcasts`` — its latency includes the outbox relay and consumer hop. ``baseline`` is
``bench/baseline/server.py`` under ``uvicorn.run`` (uvloop), POST ``/publish``; ``baseline-asyncio`` is the
same on the stdlib loop (diagnostic: ours runs on uvloop too). ``ours-quiet`` (diagnostic, not
default) is ours with the reconciliation sweep made hourly.

Usage: ``python -m bench.sse_fanout [N ...] [--repeat R] [--variants a,b] [--smoke]`` (default 10000 20000,
R=1). N is capped by the per-process fd hard limit. Prints medians and ratios against ``baseline``,
writes ``bench/results/<date>-sse-fanout.json``. Asserts nothing.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.loadgen import DEV_AUTH, Clients, Target
from bench.servers import cpu_s, rss_kb
from bench.servers import stop_process as stop
from broadcast.auth.tokens import mint

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "results"
DEFAULT_VARIANTS = "ours,baseline,baseline-asyncio"
SOURCES = [f"127.0.0.{i}" for i in range(1, 9)]
SSE_PATH = "/api/user/sse/connect?devUser={user}"  # ours reads the bearer token; the baseline this
FILLER = (
    "Scheduled maintenance tonight from 22:00 to 23:30 UTC: the reporting dashboard will be read-only and "
    "exports queued meanwhile will run afterwards. Thank you for your patience."
)
CLK_TCK = os.sysconf("SC_CLK_TCK")
ADMIN_TOKEN = mint(DEV_AUTH, "admin", ["admin"], ttl_seconds=86_400)


@dataclass(frozen=True)
class Variant:
    name: str
    argv: Callable[[int], list[str]]
    publish_path: str
    embedded: bool  # needs a scratch directory for its SQLite file
    env: tuple[tuple[str, str], ...] = ()


def _ours(port: int) -> list[str]:
    return [sys.executable, "-m", "broadcast", "run", "--roles", "api,relay,consumers,scheduler", "--port", str(port)]


VARIANTS = {
    "ours": Variant("ours", _ours, "/api/admin/broadcasts", True),
    # diagnostic: the same server with the reconciler's per-user sweep made hourly (isolates its cost)
    "ours-quiet": Variant(
        "ours-quiet", _ours, "/api/admin/broadcasts", True, (("BROADCAST_SSE__RECONCILE_SECONDS", "3600"),)
    ),
    "baseline": Variant("baseline", lambda port: _baseline(port, "auto"), "/publish", False),
    # the baseline on the stdlib loop, as `python -m broadcast run` uses (asyncio.run, not uvicorn.run's uvloop)
    "baseline-asyncio": Variant("baseline-asyncio", lambda port: _baseline(port, "asyncio"), "/publish", False),
}


def _baseline(port: int, loop: str) -> list[str]:
    return [sys.executable, "-m", "bench.baseline.server", "--port", str(port), "--loop", loop]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def request(port: int, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        headers = {"Authorization": f"Bearer {ADMIN_TOKEN}", "X-Dev-User": "admin", "Content-Type": "application/json"}
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def start(variant: Variant, port: int, scratch: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROADCAST_")}
    env["BROADCAST_SERVER__LOG_LEVEL"] = "warning"  # no access log line per connection
    env["PYTHONPATH"] = str(ROOT)
    env.update(variant.env)
    log = (scratch / f"{variant.name}-{port}.log").open("wb")
    proc = subprocess.Popen(
        variant.argv(port), cwd=scratch if variant.embedded else ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{variant.name} exited: {log.name}")
        try:
            if request(port, "GET", "/health/live")[0] == 200:
                return proc
        except OSError:
            time.sleep(0.2)
    stop(proc)
    raise RuntimeError(f"{variant.name} did not become ready: {log.name}")


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))] if ordered else float("nan")


def one_run(variant: Variant, n: int, args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    port = free_port()
    proc = start(variant, port, scratch)
    clients = Clients(Target("127.0.0.1", port, SSE_PATH, b"CONNECTED"), args.client_procs)
    try:
        time.sleep(args.settle)
        rss0 = rss_kb(proc.pid)
        users = [f"u{i}" for i in range(n)]
        c0, k0, w0 = cpu_s(proc.pid), _clients_cpu(clients), time.time()
        connects = clients.connect(users, SOURCES, args.concurrency, 60.0)
        connect_cpu = (cpu_s(proc.pid) - c0, _clients_cpu(clients) - k0, time.time() - w0)
        connected = sum(c["connected"] for c in connects)
        errors: dict[str, int] = {}
        for c in connects:
            for key, count in c["errors"].items():
                errors[key] = errors.get(key, 0) + count
        ramp = max(c["last_ready"] for c in connects) - min(c["started"] for c in connects)
        time.sleep(args.settle)
        rss1 = rss_kb(proc.pid)
        idle0 = cpu_s(proc.pid)
        time.sleep(args.idle_window)
        idle_cpu = (cpu_s(proc.pid) - idle0) / args.idle_window

        marker = f"bench{uuid.uuid4().hex[:12]}"
        clients.arm(marker.encode())
        body = json.dumps({"content": f"{marker} {FILLER}"[:200], "targetType": "ALL"}).encode()
        cpu0, k0 = cpu_s(proc.pid), _clients_cpu(clients)
        sent = time.time()
        status, _ = request(port, "POST", variant.publish_path, body)
        answered = time.time()
        clients.send_collect(args.timeout)
        collected = clients.results()
        cpu1, k1, done = cpu_s(proc.pid), _clients_cpu(clients), time.time()
    finally:
        clients.close()
        stop(proc)
    times = sorted(t for c in collected for t in c["times"])
    received = len(times)
    lat = [(t - answered) * 1000 for t in times]
    spread = (times[-1] - times[0]) if received > 1 else float("nan")
    return {
        "variant": variant.name,
        "n": n,
        "connected": connected,
        "connect_errors": errors,
        "rss_before_kb": rss0,
        "rss_after_kb": rss1,
        "rss_per_conn_kb": (rss1 - rss0) / max(connected, 1),
        "accept_per_s": connected / ramp if ramp > 0 else float("nan"),
        "idle_cpu_pct": idle_cpu * 100,
        "post_status": status,
        "post_ms": (answered - sent) * 1000,
        "received": received,
        "missing": sum(c["missing"] for c in collected),
        "p50_ms": pct(lat, 0.50),
        "p99_ms": pct(lat, 0.99),
        "max_ms": max(lat) if lat else float("nan"),
        "first_ms": lat[0] if lat else float("nan"),
        "spread_ms": spread * 1000,
        "deliveries_per_s": received / spread if spread and spread == spread else float("nan"),
        "cpu_us_per_delivery": (cpu1 - cpu0) / received * 1e6 if received else float("nan"),
        "broadcast_wall_s": done - sent,
        "broadcast_server_cpu_s": cpu1 - cpu0,
        "broadcast_clients_cpu_s": k1 - k0,
        "connect_wall_s": connect_cpu[2],
        "connect_server_cpu_s": connect_cpu[0],
        "connect_clients_cpu_s": connect_cpu[1],
    }


def _clients_cpu(clients: Clients) -> float:
    return sum(cpu_s(pid) for pid in clients.pids)


COLUMNS = [  # key, header, format
    ("rss_per_conn_kb", "KB/conn", "{:>8.1f}"),
    ("accept_per_s", "accept/s", "{:>9.0f}"),
    ("idle_cpu_pct", "idle CPU%", "{:>9.1f}"),
    ("post_ms", "POST ms", "{:>8.1f}"),
    ("first_ms", "first ms", "{:>9.1f}"),
    ("p50_ms", "p50 ms", "{:>8.1f}"),
    ("p99_ms", "p99 ms", "{:>8.1f}"),
    ("max_ms", "max ms", "{:>8.1f}"),
    ("spread_ms", "spread ms", "{:>9.1f}"),
    ("deliveries_per_s", "deliv/s", "{:>8.0f}"),
    ("cpu_us_per_delivery", "CPU µs/dl", "{:>9.1f}"),
]


def median_row(runs: list[dict[str, Any]]) -> dict[str, Any]:
    row = {k: runs[0][k] for k in ("variant", "n")}
    extra = [k for k, v in runs[0].items() if isinstance(v, float | int) and k not in row]
    for key in extra:
        row[key] = statistics.median(r[key] for r in runs)
    return row


def print_table(rows: list[dict[str, Any]], repeat: int) -> None:
    print(f"\nSSE fan-out, one ALL broadcast to N idle streams — medians of {repeat} run(s); x = variant/baseline")
    print("latency is from the POST's 201 to each client's receipt; for `ours` it includes the outbox relay and")
    print("consumer hop (in-process log and bus); `spread` = first→last client = pure fan-out; deliv/s over spread")
    line = "{:>6} {:>18} {:>6} "
    print(
        (line + " ".join("{:>" + str(len(f.format(0))) + "}" for _, _, f in COLUMNS)).format(
            "N", "variant", "conn", *(h for _, h, _ in COLUMNS)
        )
    )
    for row in rows:
        print(
            line.format(row["n"], row["variant"], int(row["connected"]))
            + " ".join(f.format(row[k]) for k, _, f in COLUMNS)
        )
    for row in rows:
        base = next((r for r in rows if r["n"] == row["n"] and r["variant"] == "baseline"), None)
        if base and row is not base:
            ratios = [_ratio(row[k], base[k], len(f.format(0))) for k, _, f in COLUMNS]
            print(line.format(row["n"], row["variant"] + " x", "") + " ".join(ratios))


def _ratio(ours: float, base: float, width: int) -> str:
    text = f"{ours / base:.2f}x" if base > 0 and ours > 0 else "-"  # also False for NaN
    return text.rjust(width)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("sizes", nargs="*", type=int, default=[10_000, 20_000])
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--smoke", action="store_true", help="N=200, one repeat, short pauses (< 60 s)")
    parser.add_argument("--client-procs", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=100, help="connects in flight per client process")
    parser.add_argument("--settle", type=float, default=3.0, help="seconds of quiet before each RSS reading")
    parser.add_argument("--idle-window", type=float, default=15.0, help="idle CPU window (15 s = one ping period)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for every client to receive")
    parser.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"comma-separated, of {','.join(VARIANTS)}")
    args = parser.parse_args()
    variants = [VARIANTS[name] for name in args.variants.split(",")]
    if args.smoke:
        args.sizes, args.repeat, args.settle, args.idle_window = [200], 1, 1.0, 1.0
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # inherited by the servers and the clients
    cap = hard - 100
    sizes = [min(n, cap) for n in args.sizes]
    if sizes != args.sizes:
        print(f"note: the fd hard limit is {hard} per process (no CAP_SYS_RESOURCE to raise it): N capped at {cap}")
    runs: list[dict[str, Any]] = []
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="sse-fanout-") as tmp:
        for n in sizes:
            per_variant: dict[str, list[dict[str, Any]]] = {v.name: [] for v in variants}
            for r in range(args.repeat):  # interleaved so machine noise hits both alike
                for variant in variants:
                    scratch = Path(tmp) / f"{variant.name}-{n}-{r}"
                    scratch.mkdir()
                    result = one_run(variant, n, args, scratch)
                    print(json.dumps({k: (round(v, 2) if isinstance(v, float) else v) for k, v in result.items()}))
                    per_variant[variant.name].append(result)
                    runs.append(result)
            rows.extend(median_row(per_variant[v.name]) for v in variants)
    print_table(rows, args.repeat)
    RESULTS.mkdir(exist_ok=True)
    suffix = (
        "-smoke" if args.smoke else "" if args.variants == DEFAULT_VARIANTS else "-" + args.variants.replace(",", "+")
    )
    out = RESULTS / f"{datetime.now(UTC):%Y-%m-%d}-sse-fanout{suffix}.json"
    meta = {"command": " ".join(["python -m bench.sse_fanout", *sys.argv[1:]]), "fd_hard_limit": hard}
    meta |= {
        "variants": args.variants,
        "repeat": args.repeat,
        "client_procs": args.client_procs,
        "cpus": os.cpu_count(),
    }
    out.write_text(json.dumps({**meta, "medians": rows, "runs": runs}, indent=2))
    print(f"written {out}")


if __name__ == "__main__":
    main()
