"""Observability end to end: metrics, consumer lag, readiness, correlation ids, ``broadcast-server status``,
on real server processes and the real stack (3 Kafka brokers, PostgreSQL, Redis)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from devstack import postgres
from devstack.servers import Server, isolated_env
from devstack.stack import StackInfo
from tests.auth import bearer
from tests.servers import fast_retries
from tests.sse_client import SseClient
from tests.waiting import wait_until

ADMIN = bearer("admin", "admin")
Samples = list[tuple[str, dict[str, str], float]]


@pytest.fixture
def env(stack: StackInfo, unique_name: str, tmp_path: Path) -> Iterator[dict[str, str]]:
    fast = fast_retries(2, max_backoff_s=0.5)
    yield isolated_env(
        stack,
        unique_name,
        tmp_path,
        BROADCAST_OBSERVABILITY__SAMPLE_SECONDS="0.5",
        BROADCAST_OBSERVABILITY__LOG_FORMAT="json",
        BROADCAST_TESTING__FAULT_DRILL_ENABLED="true",
        **fast,
    )


async def scrape(base: str) -> Samples:
    """Every sample of ``GET /metrics``, parsed by prometheus-client's own parser."""
    async with httpx.AsyncClient(timeout=10) as http:
        response = await http.get(base + "/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return [
        (s.name, dict(s.labels), float(s.value))
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    ]


def value(samples: Samples, name: str, **labels: str) -> float:
    return sum(v for n, ls, v in samples if n == name and all(ls.get(k) == w for k, w in labels.items()))


async def eventually(base: str, check: Callable[[Samples], bool], what: str, timeout_s: float = 30.0) -> Samples:
    deadline = time.monotonic() + timeout_s
    while True:
        samples = await scrape(base)
        if check(samples):
            return samples
        if time.monotonic() > deadline:
            relevant = [s for s in samples if not s[0].endswith("_bucket")]
            raise AssertionError(f"{what} not seen within {timeout_s} s: {relevant}")
        await asyncio.sleep(0.25)


async def post(base: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> httpx.Response:
    async with httpx.AsyncClient(timeout=20) as http:
        response = await http.post(base + "/api/admin/broadcasts", json=body, headers={**ADMIN, **(headers or {})})
    assert response.status_code == 201, response.text
    return response


def log_lines(server: Server) -> list[dict[str, Any]]:
    lines = []
    for raw in server.log.read_text().splitlines():
        assert raw.startswith("{"), f"not a JSON log line: {raw!r}"
        lines.append(orjson.loads(raw))
    return lines


def online_deliveries(samples: Samples) -> float:
    """Deliveries to a connected user: the live path or a reconciliation round (not a connect's catch-up)."""
    return value(samples, "broadcast_deliveries_total", path="live") + value(
        samples, "broadcast_deliveries_total", path="reconciliation"
    )


def delivery_lines(server: Server, broadcast_id: str) -> list[dict[str, Any]]:
    return [
        line
        for line in log_lines(server)
        if line["logger"] == "consumers.delivery" and line.get("broadcast_id") == broadcast_id
    ]


async def test_counters_and_histograms_observe_a_broadcast(server: Server, env: dict[str, str]) -> None:
    selected_topic = env["BROADCAST_KAFKA__TOPIC_PREFIX"] + "broadcast-user-service-selected"
    group_topic = env["BROADCAST_KAFKA__TOPIC_PREFIX"] + "broadcast-user-service-group"
    before = await scrape(server.base)
    assert value(before, "broadcast_broadcasts_created_total") == 0
    async with SseClient(server.base, "alice") as alice:
        selected = await post(server.base, {"content": "hi", "targetType": "SELECTED", "targetIds": ["alice", "bob"]})
        everyone = await post(server.base, {"content": "all", "targetType": "ALL"})
        await alice.wait_for(lambda e: e.event == "MESSAGE", count=2)
        # alice's SELECTED row may reach her by a reconciliation round (1 s here) before the Kafka consumer
        # pushes it on a slow machine: either way it is delivered once and counted once
        after = await eventually(
            server.base,
            lambda s: (
                online_deliveries(s) == 2
                and value(s, "broadcast_pending_deliveries") == 1
                and value(s, "broadcast_consumer_lag", topic=selected_topic) == 0
                and value(s, "broadcast_outbox_backlog") == 0
            ),
            "live deliveries, bob's pending row, an empty outbox and a drained selected topic",
        )
        assert value(after, "broadcast_sse_connections") == 1 and value(after, "broadcast_sse_users") == 1
    print(f"created SELECTED {selected.json()['id']} and ALL {everyone.json()['id']}; alice got both live")
    assert value(after, "broadcast_broadcasts_created_total", target_type="SELECTED") == 1
    assert value(after, "broadcast_broadcasts_created_total", target_type="ALL") == 1
    assert value(after, "broadcast_events_produced_total", topic=selected_topic) == 2  # one per recipient
    assert value(after, "broadcast_events_produced_total", topic=group_topic) == 1
    assert value(after, "broadcast_produce_errors_total") == 0
    assert value(after, "broadcast_records_consumed_total", topic=selected_topic) == 2
    assert value(after, "broadcast_records_consumed_total", topic=group_topic) == 1
    assert value(after, "broadcast_outbox_oldest_age_seconds") == 0
    # end-to-end latency: every live delivery observed (reconciliation is not timed), each well under the top
    live = value(after, "broadcast_deliveries_total", path="live")
    assert live >= 1  # the ALL broadcast has no row to reconcile: it can only go the live way
    assert value(after, "broadcast_delivery_latency_seconds_count") == live
    assert value(after, "broadcast_delivery_latency_seconds_bucket", le="10.0") == live
    assert 0 < value(after, "broadcast_delivery_latency_seconds_sum") < 20
    # admin API latency, by route template and status
    assert (
        value(after, "broadcast_http_request_duration_seconds_count", route="/api/admin/broadcasts", status="201") == 2
    )
    assert all(v == 1 for n, _, v in after if n == "broadcast_ready"), [s for s in after if s[0] == "broadcast_ready"]

    async with SseClient(server.base, "bob") as bob:  # offline until now: his SELECTED and the ALL on connect
        await bob.wait_for(lambda e: e.event == "MESSAGE", count=2)
        reconnected = await eventually(
            server.base,
            lambda s: (
                value(s, "broadcast_deliveries_total", path="reconnect") == 2
                and value(s, "broadcast_pending_deliveries") == 0
            ),
            "bob's delivery on connect and no pending row left",
        )
    assert value(reconnected, "broadcast_delivery_latency_seconds_count") == live  # only live deliveries are timed
    assert value(reconnected, "broadcast_dlt_letters", status="NEW") == 0


async def test_consumer_lag_grows_while_consumers_are_stopped_and_returns_to_zero(
    env: dict[str, str], tmp_path: Path, server_factory: list[Server]
) -> None:
    selected_topic = env["BROADCAST_KAFKA__TOPIC_PREFIX"] + "broadcast-user-service-selected"
    api = Server(env, tmp_path, roles="api,relay,scheduler", name="no-consumers")
    server_factory.append(api)
    api.wait_live()
    for n in range(5):
        await post(api.base, {"content": f"m{n}", "targetType": "SELECTED", "targetIds": ["u1", "u2"]})
    grown = await eventually(
        api.base,
        lambda s: (
            value(s, "broadcast_consumer_lag", topic=selected_topic) == 10 and value(s, "broadcast_outbox_backlog") == 0
        ),  # published, just not consumed
        "a lag of 10 records (5 broadcasts x 2 recipients) with no consumer running",
    )
    partitions = {ls["partition"] for n, ls, v in grown if n == "broadcast_consumer_lag" and v > 0}
    print(f"lag 10 on the selected topic over partitions {sorted(partitions)} with no consumer")
    consumers = Server(env, tmp_path, roles="consumers,dlt", name="consumers")
    server_factory.append(consumers)
    consumers.wait_live()
    await eventually(
        api.base, lambda s: value(s, "broadcast_consumer_lag") == 0, "the lag back at 0 after consumers start", 60
    )
    drained = await scrape(consumers.base)
    assert value(drained, "broadcast_records_consumed_total", topic=selected_topic) == 10


async def test_readiness_turns_red_while_postgresql_is_stopped_and_green_after(server: Server) -> None:
    async with httpx.AsyncClient(timeout=15) as http:
        assert (await http.get(server.base + "/health/ready")).status_code == 200
        await asyncio.to_thread(postgres.stop)
        try:
            down = await http.get(server.base + "/health/ready")
            body = down.json()
            print(f"PostgreSQL stopped: {down.status_code} {body}")
            assert down.status_code == 503 and body["status"] == "down" and "database" in body["failing"]
            assert body["checks"]["database"] != "ok" and body["checks"]["kafka"] == "ok"
            status = await asyncio.to_thread(status_command, server.base)
            assert status.returncode == 1 and "NOT READY" in status.stdout, status.stdout + status.stderr
        finally:
            await asyncio.to_thread(postgres.start)
        deadline = time.monotonic() + 30
        while (up := await http.get(server.base + "/health/ready")).status_code != 200:
            assert time.monotonic() < deadline, up.text
            await asyncio.sleep(0.5)
        print(f"PostgreSQL started again: {up.status_code} {up.json()}")
        # the pool recovered without a restart: the API writes again
        await post(server.base, {"content": "after the restart", "targetType": "ALL"})


def status_command(base: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "broadcast", "status", "--url", base], capture_output=True, text=True, timeout=60
    )


async def test_status_summarises_a_running_instance(server: Server) -> None:
    async with SseClient(server.base, "alice"), SseClient(server.base, "bob"):
        await eventually(server.base, lambda s: value(s, "broadcast_sse_connections") == 2, "two open streams")
        done = await asyncio.to_thread(status_command, server.base)
    print(done.stdout)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert "READY" in lines[0] and "NOT READY" not in lines[0]
    for check in ("database", "kafka", "redis", "loops", "consumers"):
        assert any(line.split()[:2] == [check, "ok"] for line in lines), (check, lines)
    assert any(line.split()[:3] == ["sse", "2", "connections,"] for line in lines), lines
    assert any(line.split()[:2] == ["outbox", "0"] for line in lines), lines
    assert any(line.strip().startswith("lag") and "unknown" not in line for line in lines), lines
    unreachable = await asyncio.to_thread(status_command, "http://127.0.0.1:9")
    assert unreachable.returncode == 2 and "unreachable" in unreachable.stdout


async def test_the_correlation_id_reaches_the_sse_event_the_delivery_log_and_the_dead_letter(
    server: Server,
) -> None:
    async with SseClient(server.base, "alice") as alice:
        response = await post(
            server.base,
            {"content": "traced", "targetType": "SELECTED", "targetIds": ["alice"]},
            {"X-Correlation-ID": "trace-7f3a"},
        )
        assert response.headers["x-correlation-id"] == "trace-7f3a"
        broadcast_id = response.json()["id"]
        [event] = await alice.wait_for(lambda e: e.event == "MESSAGE")
        # The stream stays open until the consumer has handled the record: the event can reach the browser
        # first (the consumer writes its line after the push returns, and on a loaded machine reconciliation
        # can deliver the PENDING row before the consumer group has even joined). Closing the stream at once
        # made the consumer rightly find alice gone ("user not connected").
        await wait_until(lambda: bool(delivery_lines(server, broadcast_id)), 30, "the delivery log line")
        await asyncio.sleep(0.5)  # long enough for a second line, if there were one
    assert event.data["broadcastId"] == broadcast_id and event.data["correlationId"] == "trace-7f3a"
    deliveries = delivery_lines(server, broadcast_id)
    assert len(deliveries) == 1, deliveries
    assert deliveries[0]["correlation_id"] == "trace-7f3a" and deliveries[0]["user_id"] == "alice"
    assert "pushed to 1 instance" in deliveries[0]["message"]
    print(f"delivery log line: {deliveries[0]}")

    async with httpx.AsyncClient(timeout=20) as http:  # any request gets an id, refusals too
        refused = await http.get(server.base + "/api/admin/broadcasts")
        assert refused.status_code == 401 and len(refused.headers["x-correlation-id"]) == 32
        replaced = await http.post(
            server.base + "/api/admin/broadcasts",
            json={"content": "x", "targetType": "ALL"},
            headers={**ADMIN, "X-Correlation-ID": "x" * 201},
        )  # an invalid correlation id is replaced, never refused
        assert replaced.status_code == 201 and len(replaced.headers["x-correlation-id"]) == 32
        assert replaced.json()["correlationId"] == replaced.headers["x-correlation-id"]

        # a failing delivery: the dead letter keeps the correlation header of the record it stands for
        drill = await http.post(
            server.base + "/api/admin/testing/kafka-consumer-failure", json={"expiresInSeconds": 60}, headers=ADMIN
        )
        assert drill.status_code == 201, drill.text
        failed = await post(
            server.base,
            {"content": "doomed", "targetType": "SELECTED", "targetIds": ["bob"]},
            {"X-Correlation-ID": "trace-dead-1"},
        )
        deadline = time.monotonic() + 30
        while True:
            page = await http.get(
                f"{server.base}/api/admin/dlt/messages?broadcastId={failed.json()['id']}", headers=ADMIN
            )
            if page.json()["items"] or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.25)
        [letter] = page.json()["items"]
        detail = (await http.get(f"{server.base}/api/admin/dlt/messages/{letter['id']}", headers=ADMIN)).json()
    headers = {h["key"]: h.get("text") for h in detail["headers"]}
    assert headers["correlation_id"] == "trace-dead-1", detail["headers"]
    stored = [line for line in log_lines(server) if line["message"].startswith("dead letter stored")]
    assert stored and stored[-1]["correlation_id"] == "trace-dead-1", stored
    samples = await eventually(
        server.base,
        lambda s: value(s, "broadcast_dlt_letters", status="NEW") == 1,
        "the dead letter in the sampled gauge",
    )
    assert value(samples, "broadcast_dlt_records_total", exception="dlt.drill.FaultDrillError") == 1
