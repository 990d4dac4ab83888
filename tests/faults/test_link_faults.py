"""RELIABILITY #5: a degraded link, then a cut, between the app and the Kafka brokers.

The app (all roles) runs in a network namespace of this test's own; every connection it makes to the
brokers, PostgreSQL and Redis goes through ``LinkProxy`` (``tests/faults/link.py``), and only the broker
forwards are shaped. Numbered broadcasts flow at 10/s throughout, EventSource-like clients listen:

1. baseline, 15 s;
2. degraded for 60 s: 100 ms added each way and 3 Mbit/s, on every broker connection;
3. cut for 60 s: nothing moves between the app and any broker (TCP neither delivers nor resets);
4. healed: the publisher goes on for 50 s more.

Passing means: the API answered 201 to every post throughout (writes go to PostgreSQL's outbox), the
streams' heartbeats kept coming (the app stayed responsive to its clients), nothing was lost, shown twice
or reordered after healing, and end-to-end latency came back: broadcasts posted from 30 s after the heal on
reach their clients with a p99 within ``max(3 x baseline p99, 1 s)``.
"""

from __future__ import annotations

import asyncio
import itertools
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from devstack import paths
from devstack.servers import Server
from devstack.stack import StackInfo
from tests.faults.harness import (
    Fleet,
    Publisher,
    alternating,
    close_all,
    latencies,
    percentile,
    report,
    settled,
    subscribe,
)
from tests.faults.link import LinkProxy, Shape, namespace

USERS = ["alice", "bob", "carol", "dave", "erin", "frank"]
HEARTBEAT_S = 2.0
BASELINE_S, DEGRADED_S, CUT_S, RECOVERY_S, AFTER_S = 15.0, 60.0, 60.0, 30.0, 20.0
DELAY_S, RATE_BYTES_S = 0.1, 3_000_000 / 8


@pytest.fixture
def link() -> Iterator[tuple[LinkProxy, Shape]]:
    """A namespace whose loopback forwards to the stack: the brokers' ports through one shared ``Shape``."""
    shape = Shape()
    with namespace() as name, LinkProxy(name) as proxy:
        for node in paths.KAFKA_NODES:
            proxy.into_namespace(paths.kafka_plain_port(node), shape)
        proxy.into_namespace(paths.POSTGRES_PORT)
        proxy.into_namespace(paths.REDIS_PORT)
        yield proxy, shape


async def during(seconds: float, publisher: Publisher) -> range:
    """Let ``seconds`` pass while the publisher posts; the sequence numbers it posted meanwhile."""
    first = publisher.attempted
    await asyncio.sleep(seconds)
    return range(first, publisher.attempted)


def longest_silence(beats: list[float], start: float, end: float) -> float:
    """The longest time without a heartbeat between ``start`` and ``end``."""
    inside = [start, *(t for t in beats if start < t < end), end]
    return max(b - a for a, b in itertools.pairwise(inside))


async def test_a_degraded_then_cut_link_to_the_brokers_loses_nothing_and_latency_recovers(
    link: tuple[LinkProxy, Shape], stack: StackInfo, env: dict[str, str], tmp_path: Path, server_factory: list[Server]
) -> None:  # ``link`` first: set up before the app starts, torn down after it stopped
    proxy, shape = link
    app_env = {**env, "BROADCAST_SSE__HEARTBEAT_SECONDS": str(HEARTBEAT_S)}
    fleet = Fleet(app_env, tmp_path, server_factory)
    app = Server(app_env, tmp_path, name="app-a", prefix=["ip", "netns", "exec", proxy.netns])
    server_factory.append(app)
    app.base = f"http://127.0.0.1:{proxy.out_of_namespace(app.port)}"
    await asyncio.to_thread(app.wait_live)
    fleet.servers["app-a"] = app
    subs = await subscribe(fleet, USERS)
    publisher = Publisher(fleet, alternating(USERS, all_every=4), 0.1).start()
    try:
        calm = await during(BASELINE_S, publisher)
        shape.delay_s, shape.rate_bytes_s = DELAY_S, RATE_BYTES_S
        degraded_at = time.monotonic()
        slow = await during(DEGRADED_S, publisher)
        shape.cut = True
        cut_at = time.monotonic()
        await during(CUT_S, publisher)
        shape.clear()
        healed_at = time.monotonic()
        await during(RECOVERY_S, publisher)
        after = await during(AFTER_S, publisher)
    finally:
        shape.clear()
    publisher.halt()
    await publisher.finish()
    result = await settled(publisher, subs, 120)
    await close_all(subs)
    before, degraded, recovered = (latencies(publisher, subs, seqs) for seqs in (calm, slow, after))
    silence = max(longest_silence(s.beats, degraded_at, healed_at) for s in subs)
    bound = max(3 * percentile(before, 0.99), 1.0)
    report(
        "degraded link, then a cut, app to brokers",
        f"{DELAY_S * 1000:.0f} ms each way and {RATE_BYTES_S * 8 / 1e6:.0f} Mbit/s for {DEGRADED_S:.0f} s, then "
        f"a {CUT_S:.0f} s cut, on every broker connection of the app ({proxy.connections} proxied connections)",
        result,
        f"latency p50/p99 {statistics.median(before) * 1000:.0f}/{percentile(before, 0.99) * 1000:.0f} ms before, "
        f"{statistics.median(degraded) * 1000:.0f}/{percentile(degraded, 0.99) * 1000:.0f} ms degraded, "
        f"{statistics.median(recovered) * 1000:.0f}/{percentile(recovered, 0.99) * 1000:.0f} ms from "
        f"{RECOVERY_S:.0f} s after the heal (bound {bound * 1000:.0f} ms); longest heartbeat silence "
        f"{silence:.1f} s (every {HEARTBEAT_S:.0f} s); cut lasted {healed_at - cut_at:.0f} s",
    )
    assert not publisher.refused, f"the API must keep answering 201: {publisher.answered_statuses()}"
    result.assert_clean()
    assert silence < 3 * HEARTBEAT_S, f"streams went {silence:.1f} s without a heartbeat: the app stalled"
    assert recovered and percentile(recovered, 0.99) <= bound, (
        f"latency did not recover within {RECOVERY_S:.0f} s of the heal: p99 {percentile(recovered, 0.99):.2f} s"
    )
