"""URGENT messages while a bulk broadcast drains (``urgent-under-bulk``, issue 20's priority lanes).

Two topologies of ours on the real stack, each run in turn:

- ``one``: one ``broadcast-server run`` process with every role (and both priority classes);
- ``split``: the same, with ``SERVER__LANE_CLASSES=priority``, plus a second process at ``nice -n 10``
  with the relay and consumer roles for the normal class (the bulk work: ``SERVER__LANE_CLASSES=normal``).

``USERS`` users each hold one SSE stream (to the first process) in a client process (``sustained.Clients``).
Per run:

1. quiet: URGENT messages to the online users, one at a time in turn, at ``RATE`` msg/s for ``QUIET_S``:
   the latency with nothing else to do (the ``limit`` column);
2. the bulk: a NORMAL broadcast to ``BULK`` offline users, uploaded as a CSV (``POST .../csv``, the path an
   admin takes), from a thread of the bench process;
3. during the bulk, from the upload's start: URGENT and NORMAL messages alternating, each class at ``RATE``
   msg/s, for ``WINDOW_S``. The NORMAL ones take the lanes, topic and consumer the bulk takes: what an
   URGENT message would wait without the priority lanes (the ``baseline`` column). Both are collected for
   up to ``DRAIN_S`` after the last answer (the NORMAL ones arrive only once the bulk ahead of them drained).

Reported: p50/p99 POST sent → MESSAGE received of each class, the ones not received in the drain, and how
long the bulk upload took to be accepted (201: all its rows and outbox rows committed).
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any, Literal

import httpx

from bench.scenarios.publishing import (
    ADMIN_TOKEN,
    FILLER,
    PUBLISH_PATH,
    Shot,
    _errors,
    _ms,
    _request,
    publish,
)
from bench.scenarios.sustained import Clients
from bench.servers import ours, stack_env
from bench.suite import Context, Measure, Outcome, Series, median

BULK, SMOKE_BULK = 1_000_000, 2_000
USERS = 50
RATE = 5  # msg/s per class
QUIET_S, SMOKE_QUIET_S = 10.0, 2.0
WINDOW_S, SMOKE_WINDOW_S = 90.0, 3.0
DRAIN_S, SMOKE_DRAIN_S = 420.0, 30.0
URGENT_MUST, URGENT_GOAL = 250.0, 100.0  # issue 20: URGENT p99 while a 1M bulk drains


def _bodies(port: int, count: int, priorities: list[str]) -> list[tuple[str, str, bytes]]:
    """(marker, priority, request) for ``count`` messages, priorities and users in turn."""
    tag = uuid.uuid4().hex[:8]
    out = []
    for i in range(count):
        marker, priority = f"mk{tag}n{i}z", priorities[i % len(priorities)]
        body = {
            "content": f"{marker} {FILLER}"[:200],
            "targetType": "SELECTED",
            "targetIds": [f"urgent-{i % USERS:03d}"],
            "priority": priority,
        }
        out.append((marker, priority, _request(port, body)))
    return out


def _upload(port: int, n: int, into: dict[str, Any]) -> None:
    """POST the bulk CSV (``n`` offline users) and note when it was sent and accepted."""
    data = ("userId\n" + "".join(f"bulk-{i:07d}\n" for i in range(n))).encode()
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}", "X-Dev-User": "admin"}
    into["sent"] = time.time()
    with httpx.Client(timeout=600) as http:
        response = http.post(
            f"http://127.0.0.1:{port}{PUBLISH_PATH}/csv",
            headers=headers,
            data={"content": "bulk " + FILLER[:100], "priority": "NORMAL"},
            files={"file": ("bulk.csv", data, "text/csv")},
        )
    into["answered"], into["status"] = time.time(), response.status_code


Topology = Literal["one", "split"]
TOPOLOGIES: tuple[Topology, ...] = ("one", "split")


@contextlib.contextmanager
def _ours(ctx: Context, name: str, topology: Topology) -> Iterator[int]:
    """The port of the front process of ``topology`` (see the module); every process stopped on exit."""
    env = stack_env(ctx, name)
    if topology == "one":
        server = ours(env, ctx, f"{name}-one")
        try:
            yield server.port
        finally:
            server.stop()
        return
    front = ours({**env, "BROADCAST_SERVER__LANE_CLASSES": "priority"}, ctx, f"{name}-front")
    try:
        bulk_env = {**env, "BROADCAST_SERVER__LANE_CLASSES": "normal"}
        bulk = ours(bulk_env, ctx, f"{name}-bulk", roles="relay,consumers", prefix=("nice", "-n", "10"))
        try:
            yield front.port
        finally:
            bulk.stop()
    finally:
        front.stop()


def _latencies(shots: list[Shot], received: dict[str, float]) -> list[float]:
    return [(received[s.marker] - s.sent) * 1000 for s in shots if s.marker in received]


def _run(ctx: Context, r: int, topology: Topology) -> dict[str, Any]:
    bulk = SMOKE_BULK if ctx.smoke else BULK
    quiet_s, window_s = (SMOKE_QUIET_S, SMOKE_WINDOW_S) if ctx.smoke else (QUIET_S, WINDOW_S)
    drain_s = SMOKE_DRAIN_S if ctx.smoke else DRAIN_S
    with _ours(ctx, f"urgent-{r}", topology) as port:
        clients = Clients()
        try:
            clients.connect_all(port, [f"urgent-{i:03d}" for i in range(USERS)])
            quiet = _bodies(port, round(RATE * quiet_s), ["URGENT"])
            quiet_shots = publish(port, [(m, data) for m, _, data in quiet], RATE)
            quiet_ok = [s for s in quiet_shots if s.status == 201]
            quiet_received = clients.collect([s.marker for s in quiet_ok], 10.0)

            upload: dict[str, Any] = {}
            uploader = threading.Thread(target=_upload, args=(port, bulk, upload))
            uploader.start()
            planned = _bodies(port, round(2 * RATE * window_s), ["URGENT", "NORMAL"])
            shots = publish(port, [(m, data) for m, _, data in planned], 2 * RATE)
            uploader.join()
            priority = {m: p for m, p, _ in planned}
            ok = [s for s in shots if s.status == 201]
            received = clients.collect([s.marker for s in ok], drain_s)
        finally:
            clients.close()
    by_class = {p: [s for s in ok if priority[s.marker] == p] for p in ("URGENT", "NORMAL")}
    return {
        "repeat": r,
        "topology": topology,
        "bulk": bulk,
        "quiet": {**_ms(_latencies(quiet_ok, quiet_received)), "lost": len(quiet_ok) - len(quiet_received)},
        "upload_status": upload.get("status"),
        "upload_accepted_s": upload["answered"] - upload["sent"] if "answered" in upload else float("nan"),
        "errors": _errors(shots),
        **{
            cls.lower(): {
                **_ms(_latencies(sent, received)),
                "sent": len(sent),
                "lost": sum(s.marker not in received for s in sent),
                "last_after_upload_s": max((received[s.marker] for s in sent if s.marker in received), default=0.0)
                - upload.get("sent", 0.0),
                "series": [
                    (s.sent - upload.get("sent", 0.0), (received[s.marker] - s.sent) * 1000)
                    for s in sent
                    if s.marker in received
                ],
            }
            for cls, sent in by_class.items()
        },
    }


def urgent_under_bulk(ctx: Context) -> Outcome:
    runs = [_run(ctx, r, t) for r in range(1 if ctx.smoke else ctx.repeat) for t in TOPOLOGIES]
    bulk = runs[0]["bulk"]
    measures: list[Measure] = []
    for topology in TOPOLOGIES:
        measures += _measures([run for run in runs if run["topology"] == topology], bulk, topology)
    series = [
        Series(
            f"{cls.upper()} ({run['topology']})",
            [x for x, _ in run[cls]["series"]],
            [y for _, y in run[cls]["series"]],
        )
        for run in runs
        if run["repeat"] == 0
        for cls in ("urgent", "normal")
    ]
    return Outcome(
        scenario="urgent-under-bulk",
        title=f"URGENT targeted messages while a {bulk:,}-recipient bulk broadcast drains",
        measures=measures,
        series=series,
        x_label="s after the bulk upload started (message sent)",
        y_label="POST sent → MESSAGE received (ms)",
        notes=[
            f"{USERS} users with one SSE stream each; the bulk: a NORMAL CSV broadcast to {bulk:,} offline users; "
            f"during it URGENT and NORMAL messages to the online users, alternating, {RATE} msg/s each, for "
            f"{SMOKE_WINDOW_S if ctx.smoke else WINDOW_S:.0f} s from the upload's start",
            "one: one server process, all roles; split: the same process with SERVER__LANE_CLASSES=priority, and "
            "the normal class's relay and consumer (the bulk) in a second process at nice 10",
            "baseline = the NORMAL messages of the same run (the bulk's lanes, topic and consumer: what an URGENT "
            "message would wait without priority lanes); limit = URGENT messages before the bulk (no load)",
            f"not received = 201 but not in within {SMOKE_DRAIN_S if ctx.smoke else DRAIN_S:.0f} s of the last "
            f"answer; medians over {ctx.repeat if not ctx.smoke else 1} run(s) per topology",
            f"issue 20's target: URGENT p99 ≤ {URGENT_MUST:.0f} ms (must), ≤ {URGENT_GOAL:.0f} ms (goal) while a "
            "1M bulk drains",
        ],
        details={"runs": runs},
    )


def _measures(runs: list[dict[str, Any]], bulk: int, topology: Topology) -> list[Measure]:
    def med(*path: str) -> float:
        values = []
        for run in runs:
            value: Any = run
            for key in path:
                value = value[key]
            values.append(float(value))
        return median(values)

    tag = f"a {bulk:,}-recipient bulk drains, {topology}"
    return [
        Measure(
            f"URGENT p99 POST→onmessage while {tag}",
            "ms",
            med("urgent", "p99_ms"),
            med("normal", "p99_ms"),
            must=URGENT_MUST,
            goal=URGENT_GOAL,
            note="baseline: the same messages at NORMAL priority; limit: URGENT with no bulk",
            limit=med("quiet", "p99_ms"),
        ),
        Measure(
            f"URGENT p50 POST→onmessage while {tag}",
            "ms",
            med("urgent", "p50_ms"),
            med("normal", "p50_ms"),
            limit=med("quiet", "p50_ms"),
        ),
        Measure(
            f"not received within the drain (while {tag})", "messages", med("urgent", "lost"), med("normal", "lost")
        ),
        Measure(
            f"last message received, after the bulk upload started ({tag})",
            "s",
            med("urgent", "last_after_upload_s"),
            med("normal", "last_after_upload_s"),
        ),
        Measure(f"bulk CSV upload accepted (rows committed), {tag}", "s", med("upload_accepted_s"), None),
    ]
