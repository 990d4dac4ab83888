"""What observability costs on the hot paths, each beside a baseline measured in the same run.

``python -m bench.observability_overhead [--rounds R] [--connections N]`` prints a table (medians of R
rounds) and writes ``bench/results/observability-<date>.json``:

1. **SSE fan-out**: one MESSAGE offered to N connections through the hub (sockets that complete at once),
   µs per delivery with the delivery counters and the live latency histogram, beside the same hub whose
   stats record nothing (the baseline: the hub as it was before metrics).
2. **A log line**: ``JsonFormatter`` with three context ids bound, beside the plain text formatter.
3. **The listener's per-record cost**: binding the record's correlation id and counting it
   (``records_consumed``), beside a bare loop over the same records.
4. **API request**: one trivial route through ASGI, bare and with ``Correlation`` + ``RequestTimer``.

In-process and single-threaded: it measures our code, not the network; the machine is recorded.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import platform
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Message

from broadcast.core.ports.log import EventRecord
from broadcast.http.observe import Correlation, RequestTimer
from broadcast.observability import logs
from broadcast.observability.metrics import Metrics, StreamStats
from consumers.container import _correlation_id
from sse.hub import Hub, Outgoing

RESULTS = Path(__file__).parent / "results"


class _Silent(StreamStats):
    def delivered(self, path: str, created: float = 0.0) -> None:
        return None


async def _send(message: dict[str, Any]) -> None:
    return None


def fanout_us(stats: StreamStats, n: int, repeats: int = 20) -> float:
    hub = Hub(queue_size=256, max_per_user=5, stats=stats)
    for i in range(n):
        hub.open(f"u{i}", frozenset()).start(_send, None, b"", [])
    best = []
    for r in range(repeats):
        item = Outgoing(b"event: MESSAGE\ndata: {}\n\n", f"b{r}", counts=True, created=time.time())
        started = time.perf_counter()
        hub.to_matching(None, item)
        best.append((time.perf_counter() - started) / n * 1e6)
    return statistics.median(best)


def log_us(formatter: logging.Formatter, n: int = 20_000) -> float:
    record = logging.LogRecord(
        "consumers.delivery", logging.INFO, __file__, 1, "delivery %s %s", ("CREATED", "b"), None
    )
    with logs.bound(correlation="c" * 32, broadcast="b" * 36, user="alice"):
        started = time.perf_counter()
        for _ in range(n):
            formatter.format(record)
        return (time.perf_counter() - started) / n * 1e6


def record_us(observed: bool, n: int = 50_000) -> float:
    metrics = Metrics()
    headers = (("correlation_id", b"c" * 32), ("event_type", b"CREATED"))
    started = time.perf_counter()
    for _ in range(n):
        if observed:
            with logs.bound(correlation=_correlation_id_of(headers)):
                metrics.records_consumed.labels("topic").inc()
    return (time.perf_counter() - started) / n * 1e6


def _correlation_id_of(headers: tuple[tuple[str, bytes], ...]) -> str | None:
    return _correlation_id(EventRecord("t", 0, 0, None, None, headers, 0))


async def request_us(app: Callable[..., Any], n: int = 3_000) -> float:
    scope = {
        "type": "http",
        "method": "GET",
        "path": "/api/x",
        "raw_path": b"/api/x",
        "root_path": "",
        "query_string": b"",
        "headers": [(b"x-correlation-id", b"abc")],
        "app": app,
    }

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        return None

    started = time.perf_counter()
    for _ in range(n):
        await app(dict(scope), receive, send)
    return (time.perf_counter() - started) / n * 1e6


def _app(observed: bool, metrics: Metrics) -> Starlette:
    async def ok(request: Request) -> Response:
        return Response(b"ok")

    middleware = [Middleware(Correlation), Middleware(RequestTimer, metrics=metrics)] if observed else []
    return Starlette(routes=[Route("/api/x", ok)], middleware=middleware)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--connections", type=int, default=5_000)
    args = parser.parse_args()
    metrics = Metrics()
    rows: dict[str, list[tuple[float, float]]] = {"fanout": [], "log": [], "record": [], "request": []}
    bare, observed = _app(False, metrics), _app(True, metrics)
    for _ in range(args.rounds):
        rows["fanout"].append((fanout_us(Metrics().stream, args.connections), fanout_us(_Silent(), args.connections)))
        rows["log"].append((log_us(logs.JsonFormatter()), log_us(logs.TextFormatter())))
        rows["record"].append((record_us(True), record_us(False)))
        rows["request"].append((asyncio.run(request_us(observed)), asyncio.run(request_us(bare))))
    names = {
        "fanout": f"SSE fan-out, µs per delivery (N={args.connections})",
        "log": "one log line, µs (JSON with 3 ids / text)",
        "record": "listener per-record observability, µs (bind + count / nothing)",
        "request": "API request through ASGI, µs (correlation + timer / bare)",
    }
    print(f"machine: {os.cpu_count()} cores, Python {platform.python_version()}, {platform.platform()}")
    print(f"{'what':<66} {'ours':>9} {'baseline':>9} {'ratio':>7}")
    result: dict[str, Any] = {"date": datetime.now(UTC).isoformat(), "rounds": args.rounds, "rows": {}}
    for key, pairs in rows.items():
        ours, base = statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs)
        print(f"{names[key]:<66} {ours:>9.2f} {base:>9.2f} {ours / base if base else float('inf'):>7.2f}")
        result["rows"][key] = {"what": names[key], "ours_us": ours, "baseline_us": base, "added_us": ours - base}
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"observability-{datetime.now(UTC):%Y-%m-%d}.json"
    out.write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
    print(f"written {out}")


if __name__ == "__main__":
    main()
