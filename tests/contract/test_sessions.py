"""One behavioural suite for SSE tickets and connection slots: in-process and Redis must agree."""

from __future__ import annotations

import asyncio

from broadcast.core.domain import Principal
from broadcast.core.ports.bus import ConnectionSlots, TicketStore
from tests.contract.support import PRESENCE_TTL_S

ALICE = Principal("alice", frozenset({"ops", "admin"}), 1_900_000_000.5)


async def test_a_ticket_is_redeemed_once_for_its_principal(sessions: tuple[TicketStore, ConnectionSlots]) -> None:
    tickets, _ = sessions
    first, second = await tickets.issue(ALICE, 30), await tickets.issue(ALICE, 30)
    assert first != second and len(first) >= 40
    assert await tickets.redeem(first) == ALICE
    assert await tickets.redeem(first) is None, "single use"
    assert await tickets.redeem(second) == ALICE
    assert await tickets.redeem("made-up") is None


async def test_a_ticket_expires(sessions: tuple[TicketStore, ConnectionSlots]) -> None:
    tickets, _ = sessions
    ticket = await tickets.issue(ALICE, 1)
    await asyncio.sleep(1.2)
    assert await tickets.redeem(ticket) is None


async def test_slots_cap_a_user_until_one_is_released(sessions: tuple[TicketStore, ConnectionSlots]) -> None:
    _, slots = sessions
    assert await slots.acquire("alice", "i1/1", 2)
    assert await slots.acquire("alice", "i2/1", 2)
    assert not await slots.acquire("alice", "i1/2", 2), "the third across instances is refused"
    assert await slots.acquire("bob", "i1/3", 2), "other users are not affected"
    await slots.release("alice", "i2/1")
    assert await slots.acquire("alice", "i1/2", 2)


async def test_unrefreshed_slots_expire_and_refreshed_ones_stay(sessions: tuple[TicketStore, ConnectionSlots]) -> None:
    _, slots = sessions
    assert await slots.acquire("alice", "live", 2)
    assert await slots.acquire("alice", "crashed", 2)
    for _ in range(3):
        await asyncio.sleep(PRESENCE_TTL_S / 2)
        await slots.refresh([("alice", "live")])
    assert await slots.acquire("alice", "new", 2), "the crashed instance's slot aged out"
    assert not await slots.acquire("alice", "another", 2), "the refreshed one still counts"


async def test_concurrent_acquires_never_exceed_the_limit(sessions: tuple[TicketStore, ConnectionSlots]) -> None:
    _, slots = sessions
    taken = await asyncio.gather(*(slots.acquire("carol", f"s{i}", 5) for i in range(40)))
    assert sum(taken) == 5


async def test_a_ticket_redeemed_concurrently_is_granted_once(sessions: tuple[TicketStore, ConnectionSlots]) -> None:
    tickets, _ = sessions
    ticket = await tickets.issue(ALICE, 30)
    granted = await asyncio.gather(*(tickets.redeem(ticket) for _ in range(20)))
    assert [g for g in granted if g is not None] == [ALICE]


async def test_refresh_brings_back_a_slot_lost_in_an_outage(sessions: tuple[TicketStore, ConnectionSlots]) -> None:
    _, slots = sessions
    assert await slots.acquire("erin", "kept", 2)
    await slots.refresh([("erin", "kept"), ("erin", "taken-while-redis-was-down")])
    assert not await slots.acquire("erin", "third", 2), "both live streams count again"
