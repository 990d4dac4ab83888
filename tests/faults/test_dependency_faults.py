"""PostgreSQL, Redis and bad records failing under load (scenarios 6, 7 and 9 of the fault suite).

Two app instances (all roles) on the real stack, numbered broadcasts flowing, EventSource-like
subscribers on both instances. Whatever a test stops is started again in ``finally``; the
``healthy_stack`` fixture checks the stack is whole afterwards.
"""

from __future__ import annotations

import asyncio
import os
import signal
import statistics
import time
from pathlib import Path
from typing import Any, Literal

import httpx
import pytest
from aiokafka import AIOKafkaProducer
from redis.asyncio import Redis

from broadcast.core import constants
from devstack import postgres
from devstack.servers import Server
from devstack.stack import StackInfo, pause_redis, resume_redis, start_redis, stop_redis
from tests.faults.harness import (
    ADMIN,
    POOLS,
    Audience,
    Fleet,
    Probe,
    Publisher,
    alternating,
    close_all,
    latencies,
    percentile,
    report,
    samples,
    settled,
    subscribe,
)

USERS = ["alice", "bob", "carol", "dave", "erin", "frank"]
PROBLEM = "application/problem+json"


def in_threes(seq: int) -> Audience:
    """SELECTED to three users at a time (a half-written broadcast would show fewer rows), every 4th ALL."""
    return None if seq % 4 == 3 else frozenset(USERS[(seq + k) % len(USERS)] for k in range(3))


async def all_broadcasts(base: str) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    cursor: str | None = None
    async with httpx.AsyncClient(timeout=15) as http:
        while True:
            params = {"cursor": cursor} if cursor else {}
            page = (await http.get(base + "/api/admin/broadcasts", params=params, headers=ADMIN)).json()
            found += page["items"]
            if not (cursor := page.get("nextCursor")):
                return found


async def targeted(base: str, broadcast_id: str) -> int:
    async with httpx.AsyncClient(timeout=15) as http:
        response = await http.get(f"{base}/api/admin/broadcasts/{broadcast_id}/stats", headers=ADMIN)
    return int(response.json()["targeted"])


@pytest.mark.parametrize("mode", ["fast", "immediate"])
async def test_a_postgresql_restart_during_writes_relay_and_consumption(
    mode: Literal["fast", "immediate"], env: dict[str, str], tmp_path: Path, server_factory: list[Server]
) -> None:
    fleet = Fleet.of(env, tmp_path, server_factory, "app-a", "app-b")
    pids = {s.proc.pid for s in fleet.live()}
    probe = Probe(fleet.servers["app-a"])
    baseline = await probe.snapshot()
    subs = await subscribe(fleet, USERS)
    publisher = Publisher(fleet, in_threes, 0.05).start()
    try:
        await publisher.reached(40)
        await asyncio.to_thread(postgres.stop, mode)
        stopped = time.monotonic()
        await asyncio.sleep(3)  # requests meet the outage
        outage_refusals = len(publisher.refused)
    finally:
        await asyncio.to_thread(postgres.start)
    down_for = time.monotonic() - stopped
    mark = publisher.attempted
    await publisher.reached(mark + 60)
    publisher.halt()
    await publisher.finish()
    result = await settled(publisher, subs, 60)
    await close_all(subs)
    after = await probe.back_to(baseline, pools=POOLS)
    base = fleet.bases()[0]
    stored = await all_broadcasts(base)
    selected = [b for b in stored if b["targetType"] == "SELECTED"]
    short = [b["id"] for b in selected if await targeted(base, b["id"]) != 3]
    refusals = publisher.answered_statuses()
    same_processes = pids == {s.proc.pid for s in fleet.live()}
    after_restart = [r for r in publisher.refused if r.seq >= mark + 20]  # well after the restart
    report(
        f"PostgreSQL {mode} restart",
        f"pg_ctl stop -m {mode} during API writes, relay and consumption; down {down_for:.1f} s",
        result,
        f"refusals by status {refusals} ({outage_refusals} during the outage); {len(stored)} broadcasts stored, "
        f"{len(short)} SELECTED ones short of their 3 rows; same app processes: {same_processes}; app-a "
        f"{baseline} -> {after}",
    )
    assert outage_refusals > 0, "the outage must have met API writes"
    assert all(r.status == 503 and r.content_type.startswith(PROBLEM) for r in publisher.refused), publisher.refused[:3]
    assert not short, f"half-written broadcasts: {short[:5]}"
    assert not after_restart, f"the pools did not recover without a restart: {after_restart[:3]}"
    assert same_processes and len(pids) == 2
    result.assert_clean()


async def deliveries_by_path(fleet: Fleet) -> dict[str, float]:
    totals: dict[str, float] = {}
    for labels, value in await samples(fleet, "broadcast_deliveries_total"):
        totals[labels["path"]] = totals.get(labels["path"], 0.0) + value
    return totals


async def ready_everywhere(fleet: Fleet, timeout_s: float) -> float:
    started = time.monotonic()
    async with httpx.AsyncClient(timeout=10) as http:
        for base in fleet.bases():
            while (await http.get(base + "/health/ready")).status_code != 200:
                assert time.monotonic() - started < timeout_s, f"{base} not ready within {timeout_s} s"
                await asyncio.sleep(0.25)
    return time.monotonic() - started


@pytest.mark.parametrize("fault", ["restart", "pause"])
async def test_redis_restarted_or_paused_during_fan_out(
    fault: str, env: dict[str, str], tmp_path: Path, server_factory: list[Server]
) -> None:
    fleet = Fleet.of(env, tmp_path, server_factory, "app-a", "app-b")
    probe = Probe(fleet.servers["app-a"])
    baseline = await probe.snapshot()
    subs = await subscribe(fleet, USERS)
    publisher = Publisher(fleet, alternating(USERS, all_every=3), 0.05).start()
    try:
        await publisher.reached(30)
        if fault == "restart":
            await asyncio.to_thread(stop_redis)  # no persistence: presence and subscriptions are gone too
            await asyncio.sleep(4)
        else:
            await asyncio.to_thread(pause_redis)  # SIGSTOP: connections stay open, nothing answers
            await asyncio.sleep(8)  # longer than the 5 s socket timeout
    finally:
        await asyncio.to_thread(start_redis if fault == "restart" else resume_redis)
    ready_after = await ready_everywhere(fleet, 60)
    await asyncio.sleep(2)  # presence re-registered, subscriptions back
    live_before = (await deliveries_by_path(fleet)).get("live", 0.0)
    first_late = publisher.attempted
    await publisher.reached(first_late + 40)
    publisher.halt()
    await publisher.finish()
    result = await settled(publisher, subs, 60)
    paths = await deliveries_by_path(fleet)
    late = [s for s in publisher.acked if s.seq >= first_late]
    owed_late = sum(1 for s in late for sub in subs if s.entitles(sub.user))
    resubscribed = sum("bus subscription lost, resubscribing" in s.log.read_text() for s in fleet.live())
    await close_all(subs)
    after = await probe.back_to(baseline, pools=POOLS)
    report(
        f"Redis {fault}",
        "Redis stopped and started again (state lost)" if fault == "restart" else "Redis SIGSTOPped for 8 s",
        result,
        f"ready {ready_after:.1f} s after; deliveries by path {paths}; live deliveries after recovery "
        f"{paths.get('live', 0) - live_before:.0f} of {owed_late} owed; instances that resubscribed {resubscribed}; "
        f"app-a {baseline} -> {after}",
    )
    result.assert_clean()
    assert result.refused == 0, publisher.refused[:3]  # the outbox is PostgreSQL: writes go on
    # the reconciler (every 1 s here) may win the race for a few rows; most must go the live way again
    assert paths.get("live", 0) - live_before >= 0.8 * owed_late, "live delivery must resume, not only reconciliation"


POISON = 40
FILLERS, FILLER_CHARS = 200, 100_000  # 20 MB: more than the stalled subscriber's socket buffers hold


async def test_poison_records_at_a_steady_rate_among_good_traffic(
    stack: StackInfo, env: dict[str, str], tmp_path: Path, server_factory: list[Server], fault_scale: int
) -> None:
    poison = POISON * fault_scale
    fleet = Fleet.of(env, tmp_path, server_factory, "app-a", "app-b")
    probe = Probe(fleet.servers["app-a"])
    baseline = await probe.snapshot()
    subs = await subscribe(fleet, USERS)
    topic = env["BROADCAST_KAFKA__TOPIC_PREFIX"] + constants.SELECTED_TOPIC
    publisher = Publisher(fleet, alternating(USERS, all_every=5), 0.05)
    await publisher.run(60)  # good traffic alone
    calm = range(0, 60)
    producer = AIOKafkaProducer(bootstrap_servers=stack.kafka_bootstrap, acks="all", enable_idempotence=True)
    await producer.start()
    try:
        publisher.start(100 * fault_scale)  # and the same with a poison record every 0.25 s on the users' partitions
        for n in range(poison):
            user = USERS[n % len(USERS)].encode()
            await producer.send_and_wait(topic, b"\xff not an event %d" % n, key=user)
            await asyncio.sleep(0.25)
    finally:
        await producer.stop()
    await publisher.finish()
    stormy = range(60, 60 + 100 * fault_scale)
    result = await settled(publisher, subs, 60)
    await close_all(subs)
    after = await probe.back_to(baseline, pools=POOLS)
    letters: list[dict[str, Any]] = []
    async with httpx.AsyncClient(timeout=15) as http:
        deadline = time.monotonic() + 60
        while len(letters) < poison and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
            page = await http.get(
                fleet.bases()[0] + "/api/admin/dlt/messages?limit=500", headers=ADMIN
            )  # one page: scale ≤ 12
            letters = page.json()["items"]
        await asyncio.sleep(2)  # a repeat would land by now
        letters = (await http.get(fleet.bases()[0] + "/api/admin/dlt/messages?limit=500", headers=ADMIN)).json()[
            "items"
        ]
    offsets = {(x["originalPartition"], x["originalOffset"]) for x in letters}
    before, during = latencies(publisher, subs, calm), latencies(publisher, subs, stormy)
    report(
        "poison records",
        f"{poison} undecodable records on {topic}, one every 0.25 s, keyed like the users' messages",
        result,
        f"dead letters {len(letters)} for {len(offsets)} distinct offsets; delivery latency p50/p99 "
        f"{statistics.median(before) * 1000:.0f}/{percentile(before, 0.99) * 1000:.0f} ms before, "
        f"{statistics.median(during) * 1000:.0f}/{percentile(during, 0.99) * 1000:.0f} ms among the poison; "
        f"app-a {baseline} -> {after}",
    )
    result.assert_clean()
    assert len(letters) == len(offsets) == poison, "each poison record dead-lettered exactly once"
    # a blocked partition (retries, backoff) would hold good records for seconds; not-retryable errors
    # go to the DLT on the first failure, so good traffic must not wait behind them
    assert percentile(during, 0.99) < 3.0, f"good traffic held up behind poison: p99 {percentile(during, 0.99):.1f} s"


async def test_a_stalled_subscriber_past_redis_output_buffer_limit_resubscribes_and_misses_nothing(
    stack: StackInfo, env: dict[str, str], tmp_path: Path, server_factory: list[Server]
) -> None:
    """RELIABILITY #29, the slow subscriber: app-b stops reading (SIGSTOP) while fan-out goes on, so Redis
    closes its pub/sub connection past the output-buffer limit (lowered here to 8 KiB). On SIGCONT app-b
    notices, subscribes again on its own, and replays what the gap swallowed: no subscriber misses anything."""
    big = {"BROADCAST_LIMITS__MAX_CONTENT_CHARS": str(constants.ENVELOPE_MAX_CONTENT_CHARS)}
    fleet = Fleet({**env, **big}, tmp_path, server_factory)
    fleet.start("app-a")
    # an edge: everything it streams comes through its Redis subscription (on its instance channel)
    instance = f"slow-edge-{os.getpid()}"
    fleet.start("app-b", roles="api", BROADCAST_SERVER__INSTANCE_ID=instance)
    channel = env["BROADCAST_REDIS__KEY_PREFIX"] + constants.instance_channel(instance)
    subs = await subscribe(fleet, USERS)
    redis = Redis.from_url(stack.redis_url)
    original = str((await redis.config_get("client-output-buffer-limit"))["client-output-buffer-limit"])
    publisher = Publisher(fleet, alternating(USERS, all_every=2), 0.02).start()
    stalled = fleet.servers["app-b"]
    try:
        await publisher.reached(20)
        assert (await redis.pubsub_numsub(channel))[0][1] == 1, f"app-b listens on {channel}"
        await redis.config_set("client-output-buffer-limit", "pubsub 8kb 4kb 1")
        fleet.servers.pop("app-b")  # the publisher posts to app-a meanwhile
        os.kill(stalled.proc.pid, signal.SIGSTOP)
        stopped_at = publisher.attempted
        async with httpx.AsyncClient(timeout=30) as http:  # the sockets' own buffers hold megabytes: fill them
            for _ in range(FILLERS):
                filler = {"content": "f" * FILLER_CHARS, "targetType": "ALL"}
                response = await http.post(fleet.bases()[0] + "/api/admin/broadcasts", json=filler, headers=ADMIN)
                assert response.status_code == 201, response.text
        await publisher.reached(stopped_at + 60)
        # the fillers reach Redis through the outbox, Kafka and app-a's consumer: on a loaded machine that
        # takes a while, and app-b must not resume before Redis has actually closed its subscription
        for _ in range(240):
            if not (await redis.pubsub_numsub(channel))[0][1]:
                break
            await asyncio.sleep(0.5)
        else:
            raise AssertionError("Redis did not close app-b's subscription within 120 s")
    finally:
        os.kill(stalled.proc.pid, signal.SIGCONT)
        fleet.servers["app-b"] = stalled
        await redis.config_set("client-output-buffer-limit", original)
        await redis.aclose()
    await publisher.reached(publisher.attempted + 40)
    publisher.halt()
    await publisher.finish()
    result = await settled(publisher, subs, 60)
    log = stalled.log.read_text()
    resubscribed = log.count("bus subscription lost, resubscribing")
    replayed = next((line for line in log.splitlines() if "after a bus gap" in line), "no gap replay")[-80:]
    await close_all(subs)
    report(
        "slow Redis subscriber",
        f"app-b SIGSTOPped while {FILLERS} broadcasts of {FILLER_CHARS // 1000} kB and the numbered ones went out, "
        "Redis's pub/sub output-buffer limit lowered to 8 KiB",
        result,
        f"app-b lost its subscription and subscribed again {resubscribed} times; {replayed}",
    )
    assert resubscribed >= 1, "Redis dropped app-b's subscription: app-b must notice and subscribe again on its own"
    result.assert_clean()
