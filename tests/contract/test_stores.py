"""One behavioural suite for the database ports: memory, SQLite and PostgreSQL must agree."""

from __future__ import annotations

import asyncio
from datetime import timedelta

from broadcast.domain import EventType, OutboxEvent, User
from broadcast.ports import OutboxStore, UserStore

LEASE = timedelta(seconds=30)


def event(n: int, key: str = "k") -> OutboxEvent:
    return OutboxEvent(
        "topic", key, EventType.CREATED, f"payload-{n}".encode() + b"\x00\xff", (("correlation_id", b"c\xe9"),)
    )


async def test_users_round_trip_with_roles_and_are_counted(stores: tuple[UserStore, OutboxStore]) -> None:
    users, _ = stores
    await users.upsert([User("alice", "Alice", frozenset({"admin", "ops"})), User("bob", "", frozenset({"ops"}))])
    await users.upsert([User("carol")])
    assert await users.get("alice") == User("alice", "Alice", frozenset({"admin", "ops"}))
    assert await users.get("nobody") is None
    assert await users.count() == 3
    assert await users.count("ops") == 2
    assert await users.count("admin") == 1
    assert await users.count("missing-role") == 0


async def test_upserting_a_user_replaces_name_and_roles(stores: tuple[UserStore, OutboxStore]) -> None:
    users, _ = stores
    await users.upsert([User("alice", "Alice", frozenset({"admin"}))])
    await users.upsert([User("alice", "Alice B.", frozenset({"ops"}))])
    assert await users.get("alice") == User("alice", "Alice B.", frozenset({"ops"}))
    assert await users.count("admin") == 0
    assert await users.count() == 1


async def test_outbox_claims_oldest_first_and_keeps_bytes(stores: tuple[UserStore, OutboxStore]) -> None:
    _, outbox = stores
    ids = await outbox.append([event(i) for i in range(5)])
    assert ids == sorted(ids) and len(set(ids)) == 5
    assert await outbox.backlog() == 5
    claimed = await outbox.claim(3, LEASE)
    assert [c.id for c in claimed] == ids[:3]
    assert claimed[0].event == event(0)
    assert claimed[0].attempts == 1
    assert claimed[0].created_at.tzinfo is not None


async def test_a_leased_row_is_not_claimed_twice_until_released_or_expired(
    stores: tuple[UserStore, OutboxStore],
) -> None:
    _, outbox = stores
    ids = await outbox.append([event(i) for i in range(4)])
    first = await outbox.claim(2, LEASE)
    second = await outbox.claim(10, LEASE)
    assert [c.id for c in second] == ids[2:]
    assert await outbox.claim(10, LEASE) == []
    await outbox.release([first[0].id], "broker down")
    retried = await outbox.claim(10, LEASE)
    assert [c.id for c in retried] == [first[0].id]
    assert retried[0].attempts == 2
    short = await outbox.append([event(9)])
    await outbox.claim(10, timedelta(milliseconds=200))
    await asyncio.sleep(0.4)
    assert [c.id for c in await outbox.claim(10, LEASE)] == short


async def test_published_rows_leave_the_backlog(stores: tuple[UserStore, OutboxStore]) -> None:
    _, outbox = stores
    ids = await outbox.append([event(i) for i in range(3)])
    claimed = await outbox.claim(10, timedelta(milliseconds=100))
    await outbox.mark_published([c.id for c in claimed[:2]])
    assert await outbox.backlog() == 1
    await asyncio.sleep(0.2)
    assert [c.id for c in await outbox.claim(10, LEASE)] == ids[2:]


async def test_concurrent_claimers_never_share_a_row(stores: tuple[UserStore, OutboxStore]) -> None:
    _, outbox = stores
    await outbox.append([event(i, key=f"k{i % 7}") for i in range(200)])
    batches = await asyncio.gather(*(outbox.claim(25, LEASE) for _ in range(10)))
    claimed = [c.id for batch in batches for c in batch]
    assert len(claimed) == 200
    assert len(set(claimed)) == 200
