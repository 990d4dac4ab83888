"""A connection remembers the broadcasts it wrote for minutes (repeats skipped), then forgets them; memory
per connection stays bounded whatever the broadcast rate; a stream does not keep its catch-up."""

from __future__ import annotations

import asyncio
import gc
import sys
import tracemalloc
from collections.abc import MutableMapping
from typing import Any

from sse.hub import Hub, Outgoing
from sse.seen import BUS_GAP, DELIVERY_MARKS, SEEN_LIMIT, SeenClock, SeenIds
from sse.stream import SseStream


class FakeTime:
    def __init__(self) -> None:
        self.now = 900.0  # the start of a 300 s generation

    def __call__(self) -> float:
        return self.now


def later(time: FakeTime, clock: SeenClock, seconds: float) -> None:
    """Time passes, then an event is fanned out (the hub ticks the clock once per event)."""
    time.now += seconds
    clock.tick()


def test_an_id_is_refused_for_at_least_one_period_and_forgotten_after_two() -> None:
    time = FakeTime()
    clock = SeenClock(300, time)
    seen = SeenIds(clock)
    assert seen.first_time("b1") and not seen.first_time("b1")
    later(time, clock, 299)
    assert not seen.first_time("b1"), "within the period: a repeat"
    later(time, clock, 300)
    assert seen.first_time("b2") and "b1" in seen, "one period later: still known"
    later(time, clock, 300)
    assert seen.first_time("b3") and "b1" not in seen and "b2" in seen
    later(time, clock, 1_000)
    assert seen.first_time("b4") and len(seen) == 1, "a long silence forgets everything before it"


def test_a_held_clock_forgets_nothing_until_every_hold_is_released_and_then_goes_on_from_there() -> None:
    time = FakeTime()
    clock = SeenClock(300, time)
    seen = SeenIds(clock)
    seen.first_time("before the gap")
    clock.hold(BUS_GAP)
    clock.hold(DELIVERY_MARKS)
    later(time, clock, 3_600)
    assert seen.first_time("replayed") and not seen.first_time("before the gap")
    clock.release(BUS_GAP)
    later(time, clock, 600)
    assert not seen.first_time("before the gap"), "the marks' hold still stands"
    clock.release(DELIVERY_MARKS)
    # a replayed broadcast can still come live (the consumer publishes its backlog once Redis is back):
    # releasing after a long hold must not forget what the replay just wrote
    assert seen.first_time("new after the release") and not seen.first_time("replayed")
    later(time, clock, 300)
    assert seen.first_time("a period later") and not seen.first_time("replayed")
    later(time, clock, 300)
    assert seen.first_time("two periods later") and "before the gap" not in seen and "replayed" not in seen
    assert clock.held == frozenset()


def test_many_broadcasts_in_one_period_stay_within_the_limit_and_the_latest_are_known() -> None:
    seen = SeenIds(SeenClock(300, FakeTime()))
    ids = [f"b{n}" for n in range(10 * SEEN_LIMIT)]
    assert all(seen.first_time(i) for i in ids)
    assert len(seen) <= SEEN_LIMIT
    assert not any(seen.first_time(i) for i in ids[-SEEN_LIMIT // 2 :]), "the latest half-limit is always known"


async def test_a_stream_lets_go_of_its_catch_up_once_written() -> None:
    """200 streams with 100 catch-up messages of 2 KB each (40 MB): once written, they must not stay."""
    hub = Hub(queue_size=64, max_per_user=5)
    gone, all_started = asyncio.Event(), asyncio.Event()
    started = 0

    async def send(message: MutableMapping[str, Any]) -> None:
        nonlocal started
        started += message["type"] == "http.response.start"
        if started == 200:
            all_started.set()

    async def receive() -> dict[str, Any]:
        await gone.wait()
        return {"type": "http.disconnect"}

    async def ended() -> None:
        return None

    # The ids are made (and interned, as the streams' seen-id sets do) before measuring: in a long test
    # session the interpreter's table of interned strings is large, and growing it inside the window counted
    # megabytes that no stream holds (the full suite once measured 10.1 MB here; the test alone holds 1.4 MB).
    ids = [[sys.intern(f"b{n}-{i}") for i in range(100)] for n in range(200)]
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        tasks = []
        for n in range(200):
            items = [Outgoing(bytes(2_048), ids[n][i], counts=True) for i in range(100)]
            stream = SseStream(hub.open(f"u{n}", frozenset()), b"head", items, ended)
            del items
            tasks.append(asyncio.create_task(stream({"type": "http"}, receive, send)))
            del stream
        await all_started.wait()
        await asyncio.sleep(0)  # the last stream's start() after its response.start
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
        gone.set()
        await asyncio.gather(*tasks)
    assert held < 8_000_000, f"{held / 1e6:.1f} MB still held by 200 open streams after their catch-up"


async def test_catch_up_ids_cost_a_connection_its_dict_slots_not_a_copy_of_each_id() -> None:
    """Each connection's catch-up reads its own copies of the broadcast ids from the database; remembering
    them must not keep a copy per connection (500 connections x 120 ids: 14 KB each before interning)."""
    hub = Hub(queue_size=64, max_per_user=5)

    async def send(message: MutableMapping[str, Any]) -> None:
        return None

    ids = [f"{n:08d}-0000-4000-8000-{n:012d}" for n in range(120)]
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for user in range(500):
            items = [Outgoing(b"x", "".join(list(i)), counts=True) for i in ids]  # fresh strings, equal values
            hub.open(f"u{user}", frozenset()).start(send, None, b"head", items)
            del items
        gc.collect()
        per_connection = (tracemalloc.get_traced_memory()[0] - before) / 500
    finally:
        tracemalloc.stop()
    assert per_connection < 8_000, f"{per_connection / 1024:.1f} KB per connection for 120 catch-up ids"


def test_the_hub_turns_its_connections_generations_as_it_fans_out() -> None:
    time = FakeTime()
    hub = Hub(queue_size=64, max_per_user=5, seen_clock=SeenClock(300, time))
    written: list[bytes] = []

    async def send(message: MutableMapping[str, Any]) -> None:
        written.append(message["body"])

    hub.open("alice", frozenset()).start(send, None, b"head", [])
    hub.to_matching(None, Outgoing(b"#1", "b1", counts=True))
    hub.to_matching(None, Outgoing(b"#1", "b1", counts=True))
    time.now += 700  # more than two periods, with no event meanwhile
    hub.to_matching(None, Outgoing(b"#2", "b2", counts=True))
    hub.to_matching(None, Outgoing(b"#1", "b1", counts=True))
    assert written == [b"head", b"#1", b"#2", b"#1"], "a repeat skipped at once, forgotten 700 s later"
