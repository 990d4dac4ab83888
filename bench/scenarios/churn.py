"""Connection churn: RSS, file descriptors and event-loop tasks while 10 % of the streams turn over a minute.

Ours is one ``broadcast-server run`` instance (all roles) on the real stack; the baseline one
``bench/baseline/server.py`` process. Each holds ``connections`` streams (5,000; smoke 100) opened by two
client processes (``bench.resume_clients``). For ``duration_s`` (10 min, the short form of §7's hour;
smoke 20 s) every client process closes its oldest stream and opens a new user's in its place at an even
pace, 10 % of its streams a minute; one numbered ALL broadcast is published every 5 s. New users open
without ``Last-Event-ID`` (ours then sends them the unread ALL broadcasts as well).

Every 10 s (smoke 5 s) the server's VmRSS and open descriptors are read from /proc, and for ours
``broadcast_event_loop_tasks{origin="app"}`` from ``/metrics`` (the baseline exposes no task count).
Drift = (last sample - first sample after the warm-up (1 min; smoke 5 s)) / that first sample, in %
(signed: a shrink is negative). RSS per connection = (median RSS after the warm-up - RSS before any
stream) / connections. Ours and the baseline churn at the same time (drift is not a speed: running them
together halves the 20 minutes; each is sampled on its own process).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx

from bench.resume_clients import Publisher, ResumeClients, Setup
from bench.servers import Baseline, fds, ours, rss_kb, stack_env
from bench.sse_fanout import SOURCES
from bench.suite import Context, Measure, Outcome, Series, median

SSE_PATH = "/api/user/sse/connect?devUser={user}"  # ours reads the bearer token; the baseline this
TASKS = "broadcast_event_loop_tasks{"


@dataclass(frozen=True)
class Size:
    connections: int
    duration_s: float
    warmup_s: float
    sample_s: float = 10.0
    publish_s: float = 5.0
    per_minute: float = 0.10
    processes: int = 2
    concurrency: int = 200
    open_timeout_s: float = 180.0


FULL = Size(5_000, duration_s=600, warmup_s=60)
SMOKE = Size(100, duration_s=20, warmup_s=5, sample_s=5, open_timeout_s=30)


@dataclass
class Subject:
    """One server under churn, its clients, its publisher and what was sampled."""

    variant: str
    pid: int
    base: str
    publish_url: str
    metrics: bool
    tag: str
    idle_rss_kb: int = 0
    idle_fds: int = 0
    samples: list[dict[str, float]] = field(default_factory=list)


def churn(ctx: Context) -> Outcome:
    size = SMOKE if ctx.smoke else FULL
    runs: dict[str, list[dict[str, Any]]] = {"ours": [], "baseline": []}
    for r in range(ctx.repeat):
        groups = [["ours", "baseline"]]  # at the same time (see the module docstring)
        for variants in groups:
            for variant, result in _run(ctx, size, r, variants).items():
                runs[variant].append(result)
    return _outcome(size, runs)


def _run(ctx: Context, size: Size, r: int, variants: list[str]) -> dict[str, dict[str, Any]]:
    """Start the servers of ``variants``, churn their streams together for ``duration_s``, sample them."""
    with contextlib.ExitStack() as stack:
        subjects = [_start(ctx, stack, variant, r) for variant in variants]
        time.sleep(2.0)
        for subject in subjects:
            subject.idle_rss_kb, subject.idle_fds = rss_kb(subject.pid), fds(subject.pid)
        clients = [stack.enter_context(_clients(subject, size)) for subject in subjects]
        publishers = [Publisher([s.publish_url], s.tag, size.publish_s) for s in subjects]
        for publisher in publishers:
            publisher.start()
            stack.callback(publisher.stop)
        for subject, handle in zip(subjects, clients, strict=True):
            handle.send(
                "churn", [(size.duration_s, size.per_minute, f"{subject.tag}-{k}-n") for k in range(size.processes)]
            )
        _sample(subjects, size)
        churned = [handle.receive() for handle in clients]
        results = {s.variant: _result(s, size, c, p) for s, c, p in zip(subjects, churned, publishers, strict=True)}
    return results


def _start(ctx: Context, stack: contextlib.ExitStack, variant: str, r: int) -> Subject:
    tag = f"ch{r}{variant[0]}"
    if variant == "ours":
        server = ours(stack_env(ctx, "churn"), ctx, f"churn-ours-{r}")
        stack.callback(server.stop)
        return Subject(variant, server.proc.pid, server.base, server.base + "/api/admin/broadcasts", True, tag)
    baseline = Baseline(ctx, f"churn-baseline-{r}")
    stack.callback(baseline.stop)
    return Subject(variant, baseline.proc.pid, baseline.base, baseline.base + "/publish", False, tag)


@contextlib.contextmanager
def _clients(subject: Subject, size: Size) -> Iterator[ResumeClients]:
    port = int(subject.base.rsplit(":", 1)[1])
    handle = ResumeClients(Setup("127.0.0.1", SSE_PATH, subject.tag), size.processes)
    try:
        per = size.connections // size.processes
        specs = [
            [(f"{subject.tag}-{k}-{i}", port, SOURCES[i % len(SOURCES)]) for i in range(per)]
            for k in range(size.processes)
        ]
        opened = handle.open(specs, size.concurrency, size.open_timeout_s)
        failed = sum(int(o["failed"]) for o in opened)
        if failed:
            raise RuntimeError(f"{subject.variant}: {failed} of {size.connections} streams did not open")
        yield handle
    finally:
        handle.close()


def _sample(subjects: list[Subject], size: Size) -> None:
    """Every ``sample_s`` until ``duration_s``: RSS, descriptors and (ours) app tasks of every subject."""
    started = time.monotonic()
    count = int(size.duration_s // size.sample_s)
    with httpx.Client(timeout=10.0) as http:
        for i in range(count + 1):
            time.sleep(max(0.0, started + i * size.sample_s - time.monotonic()))
            for subject in subjects:
                sample = {"t": time.monotonic() - started, "rss_kb": rss_kb(subject.pid), "fds": fds(subject.pid)}
                if subject.metrics:
                    sample.update(_metrics(http, subject.base))
                subject.samples.append(sample)


def _metrics(http: httpx.Client, base: str) -> dict[str, float]:
    """``broadcast_event_loop_tasks{origin="app"}`` and ``broadcast_sse_connections`` (NaN when unreadable)."""
    found = {"tasks": float("nan"), "streams": float("nan")}
    try:
        text = http.get(base + "/metrics").text
    except httpx.HTTPError:
        return found
    for line in text.splitlines():
        if line.startswith(TASKS) and 'origin="app"' in line:
            found["tasks"] = float(line.rsplit(" ", 1)[1])
        elif line.startswith("broadcast_sse_connections{"):
            found["streams"] = float(line.rsplit(" ", 1)[1])
    return found


def _drift(samples: list[dict[str, float]], key: str, warmup_s: float) -> float:
    after = [s[key] for s in samples if s["t"] >= warmup_s and key in s]
    if len(after) < 2 or not after[0]:
        return float("nan")
    return (after[-1] - after[0]) / after[0] * 100


def _result(subject: Subject, size: Size, churned: list[dict[str, Any]], publisher: Publisher) -> dict[str, Any]:
    samples = subject.samples
    after = [s for s in samples if s["t"] >= size.warmup_s]
    rss_after = median([s["rss_kb"] for s in after])
    refusals: dict[str, int] = {}
    for c in churned:
        for status, n in c["refusals"].items():
            refusals[str(status)] = refusals.get(str(status), 0) + n
    return {
        "rss_drift_pct": _drift(samples, "rss_kb", size.warmup_s),
        "fd_drift_pct": _drift(samples, "fds", size.warmup_s),
        "fd_drift": after[-1]["fds"] - after[0]["fds"] if len(after) > 1 else float("nan"),
        "task_drift_pct": _drift(samples, "tasks", size.warmup_s) if subject.metrics else float("nan"),
        "rss_per_conn_kb": (rss_after - subject.idle_rss_kb) / size.connections,
        "idle_rss_kb": subject.idle_rss_kb,
        "idle_fds": subject.idle_fds,
        "replaced": sum(int(c["replaced"]) for c in churned),
        "up_at_end": sum(int(c["up"]) for c in churned),
        "messages": sum(int(c["messages"]) for c in churned),
        "refusals": refusals,
        "server_drops": sum(int(c["server_drops"]) for c in churned),
        "timeouts": sum(int(c["timeouts"]) for c in churned),
        "published": len(publisher.sent),
        "publish_refused": publisher.refused(),
        "samples": samples,
    }


def _outcome(size: Size, runs: dict[str, list[dict[str, Any]]]) -> Outcome:
    def value(key: str) -> Callable[[str], float]:
        return lambda variant: median([float(r[key]) for r in runs[variant]])

    rss, fd, tasks, per_conn = (
        value("rss_drift_pct"),
        value("fd_drift_pct"),
        value("task_drift_pct"),
        value("rss_per_conn_kb"),
    )
    measures = [
        Measure("RSS drift", "%", rss("ours"), rss("baseline"), must=5.0, goal=2.0, note="signed; §7: over 1 h"),
        Measure("fd drift", "%", fd("ours"), fd("baseline")),
        Measure("app task drift", "%", tasks("ours"), None, note="baseline exposes no task count"),
        Measure("RSS per connection", "KB", per_conn("ours"), per_conn("baseline")),
    ]
    series = [
        Series(
            variant,
            [s["t"] / 60 for s in runs[variant][0]["samples"]],
            [s["rss_kb"] / 1024 for s in runs[variant][0]["samples"]],
        )
        for variant in ("ours", "baseline")
    ]
    first = {v: runs[v][0] for v in ("ours", "baseline")}
    notes = [
        f"{size.connections:,} streams per server (2 client processes); for {size.duration_s / 60:g} min each client "
        f"process replaces its oldest stream by a new user's at an even pace, {size.per_minute:.0%} of them a minute; "
        f"one ALL broadcast every {size.publish_s:g} s; samples every {size.sample_s:g} s.",
        f"drift = (last sample - first sample after {size.warmup_s:g} s of warm-up) / first, signed; RSS and fds "
        'from /proc, tasks = broadcast_event_loop_tasks{origin="app"} (ours only).',
        "RSS per connection = (median RSS after the warm-up - RSS before any stream) / streams.",
        "every replacement is a new user id (no Last-Event-ID): per-user state a server keeps (e.g. ours' "
        "connect-rate buckets, bounded at 100k keys) legitimately grows with them, and ours sends each new "
        "stream the unread ALL broadcasts so far.",
        "first run: "
        + "; ".join(
            f"{v}: replaced {r['replaced']}, up at end {r['up_at_end']}, fd change {r['fd_drift']:+.0f}, "
            f"refused opens {r['refusals'] or 0}, server drops {r['server_drops']}, "
            f"broadcasts {r['published']} ({r['publish_refused']} refused)"
            for v, r in first.items()
        ),
        "ours and the baseline churned at the same time; servers, clients and the stack share 2 cores.",
    ]
    return Outcome(
        "churn",
        f"{size.per_minute:.0%}/min connection churn of {size.connections:,} streams for {size.duration_s / 60:g} min",
        measures,
        series=series,
        x_label="minutes",
        y_label="server RSS (MiB)",
        notes=notes,
        details={"size": size.__dict__, "runs": runs},
    )
