"""One behavioural suite for the bus and presence: in-process and Redis must agree."""

from __future__ import annotations

import asyncio

from broadcast.ports import Bus, BusMessage, Presence
from tests.contract.support import PRESENCE_TTL_S


async def test_a_message_reaches_every_subscriber_of_its_channel_only(bus_presence: tuple[Bus, Presence]) -> None:
    bus, _ = bus_presence
    async with bus.subscribe(["instance:a", "group"]) as a, bus.subscribe(["instance:b", "group"]) as b:
        assert await bus.publish("group", b"to-all") == 2
        assert await bus.publish("instance:a", b"to-a") == 1
        assert await a.get(5) == BusMessage("group", b"to-all")
        assert await b.get(5) == BusMessage("group", b"to-all")
        assert await a.get(5) == BusMessage("instance:a", b"to-a")
        assert await b.get(0.3) is None


async def test_nobody_receives_after_unsubscribing(bus_presence: tuple[Bus, Presence]) -> None:
    bus, _ = bus_presence
    async with bus.subscribe(["group"]) as sub:
        assert await bus.publish("group", b"x") == 1
        assert await sub.get(5) == BusMessage("group", b"x")
    assert await bus.publish("group", b"y") == 0


async def test_payload_bytes_arrive_unchanged_and_in_order(bus_presence: tuple[Bus, Presence]) -> None:
    bus, _ = bus_presence
    payloads = [bytes([i, 0, 255]) * (i + 1) for i in range(50)]
    async with bus.subscribe(["group"]) as sub:
        for p in payloads:
            await bus.publish("group", p)
        got = [await sub.get(5) for _ in payloads]
    assert [m.payload if m else None for m in got] == payloads


async def test_presence_tracks_instances_until_they_leave(bus_presence: tuple[Bus, Presence]) -> None:
    _, presence = bus_presence
    assert await presence.instances("alice") == frozenset()
    await presence.heartbeat("alice", "i1")
    await presence.heartbeat_many(["alice", "bob"], "i2")
    assert await presence.instances("alice") == {"i1", "i2"}
    await presence.leave("alice", "i1")
    assert await presence.instances("alice") == {"i2"}
    assert await presence.instances("bob") == {"i2"}


async def test_presence_expires_without_heartbeats(bus_presence: tuple[Bus, Presence]) -> None:
    _, presence = bus_presence
    await presence.heartbeat("alice", "i1")
    await asyncio.sleep(PRESENCE_TTL_S / 2)
    await presence.heartbeat("alice", "i2")
    await asyncio.sleep(PRESENCE_TTL_S * 0.7)
    assert await presence.instances("alice") == {"i2"}
    await asyncio.sleep(PRESENCE_TTL_S * 0.6)
    assert await presence.instances("alice") == frozenset()
