"""One behavioural suite for the bus and presence: in-process and Redis must agree."""

from __future__ import annotations

import asyncio

from broadcast.core.ports.bus import Bus, BusMessage, Presence
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


async def test_many_publishes_arrive_in_order_with_their_receiver_counts(bus_presence: tuple[Bus, Presence]) -> None:
    bus, _ = bus_presence
    messages = [("group" if i % 3 else "instance:a", f"m{i}".encode() * (i + 1)) for i in range(40)]
    async with bus.subscribe(["instance:a", "group"]) as a, bus.subscribe(["group"]) as b:
        counts = await bus.publish_many(messages)
        got_a = [await a.get(5) for _ in messages]
        got_b = [await b.get(5) for m in messages if m[0] == "group"]
    assert counts == [2 if channel == "group" else 1 for channel, _ in messages]
    assert got_a == [BusMessage(channel, payload) for channel, payload in messages], "all of them, in order"
    assert got_b == [BusMessage(c, p) for c, p in messages if c == "group"]
    assert await bus.publish_many([]) == []


async def test_presence_of_many_users_agrees_with_asking_one_by_one(bus_presence: tuple[Bus, Presence]) -> None:
    _, presence = bus_presence
    await presence.heartbeat_many(["alice", "bob"], "i1")
    await presence.heartbeat("alice", "i2")
    await presence.leave("bob", "i1")
    asked = ["alice", "bob", "carol", "alice"]
    many = await presence.instances_many(asked)
    assert many == {user: await presence.instances(user) for user in asked}
    assert many == {"alice": {"i1", "i2"}, "bob": frozenset(), "carol": frozenset()}
    assert await presence.instances_many([]) == {}
