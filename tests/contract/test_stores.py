"""One behavioural suite for the database ports: memory, SQLite and PostgreSQL must agree."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import UTC, datetime, timedelta

from broadcast.core import constants
from broadcast.core.domain import PRIORITY_HEADER, EventType, OutboxEvent, User
from broadcast.core.ports.stores import OutboxStore, UserStore

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
    assert await users.count(["ops"]) == 2
    assert await users.count(["admin"]) == 1
    assert await users.count(["admin", "ops"]) == 2  # distinct users
    assert await users.count(["missing-role"]) == 0


async def test_many_users_are_read_at_once(stores: tuple[UserStore, OutboxStore]) -> None:
    users, _ = stores
    await users.upsert([User("alice", "Alice", frozenset({"admin", "ops"})), User("bob")])
    assert await users.get_many(["bob", "nobody", "alice", "bob"]) == {
        "alice": User("alice", "Alice", frozenset({"admin", "ops"})),
        "bob": User("bob"),
        "nobody": None,
    }
    assert await users.get_many([]) == {}


async def test_upserting_a_user_replaces_name_and_roles(stores: tuple[UserStore, OutboxStore]) -> None:
    users, _ = stores
    await users.upsert([User("alice", "Alice", frozenset({"admin"}))])
    await users.upsert([User("alice", "Alice B.", frozenset({"ops"}))])
    assert await users.get("alice") == User("alice", "Alice B.", frozenset({"ops"}))
    assert await users.count(["admin"]) == 0
    assert await users.count() == 1


async def drain(outbox: OutboxStore, owner: str = "relay-a") -> list[int]:
    """Everything due, lane by lane, in the order a relay would publish it."""
    ids: list[int] = []
    for lane in await outbox.claim_lanes(owner, 100, LEASE):
        ids += [c.id for c in await outbox.due(lane, 1000)]
    return ids


async def test_outbox_rows_come_back_whole_in_id_order_per_lane(stores: tuple[UserStore, OutboxStore]) -> None:
    _, outbox = stores
    ids = await outbox.append([event(i, key="same-key") for i in range(5)])
    assert ids == sorted(ids) and len(set(ids)) == 5
    assert await outbox.backlog() == 5
    [lane] = await outbox.claim_lanes("relay-a", 100, LEASE)
    rows = await outbox.due(lane, 3)
    assert [r.id for r in rows] == ids[:3]
    assert rows[0].event == event(0, key="same-key")
    assert rows[0].attempts == 0
    assert rows[0].created_at.tzinfo is not None


async def test_a_leased_lane_is_not_handed_to_another_relay(stores: tuple[UserStore, OutboxStore]) -> None:
    _, outbox = stores
    await outbox.append([event(i, key=f"k{i}") for i in range(40)])
    mine = await outbox.claim_lanes("relay-a", 3, LEASE)
    theirs = await outbox.claim_lanes("relay-b", 100, LEASE)
    assert len(mine) == 3
    assert mine and theirs and not set(mine) & set(theirs)
    assert await outbox.claim_lanes("relay-c", 100, LEASE) == []
    await outbox.release_lanes("relay-a", mine)
    assert sorted(await outbox.claim_lanes("relay-c", 100, LEASE)) == sorted(mine)


async def test_a_round_claims_lanes_with_their_due_rows_and_finishes_with_marks_and_release_at_once(
    stores: tuple[UserStore, OutboxStore],
) -> None:
    _, outbox = stores
    later = replace(event(99, key="k0"), not_before=datetime.now(UTC) + timedelta(hours=1))
    ids = await outbox.append([*(event(i, key=f"k{i % 3}") for i in range(9)), later])
    claimed = await outbox.claim("relay-a", 100, LEASE, 2)
    assert len(claimed) == 3, "the lanes of the three keys"
    assert all(len(rows) == 2 for rows in claimed.values()), "at most the limit per lane"
    for lane, rows in claimed.items():
        assert [r.id for r in rows] == [r.id for r in await outbox.due(lane, 2)], "the same as due(), in id order"
    assert await outbox.claim("relay-b", 100, LEASE, 2) == {}, "leased lanes go to no one else"

    published = [r.id for rows in claimed.values() for r in rows]
    await outbox.finish("relay-a", sorted(claimed), published)
    again = await outbox.claim("relay-b", 100, LEASE, 100)
    assert sorted(again) == sorted(claimed), "released: another relay takes them"
    left = sorted(r.id for rows in again.values() for r in rows)
    assert left == sorted(set(ids[:9]) - set(published)), "marked rows are gone, the not-yet-due one waits"
    await outbox.finish("relay-a", sorted(again), [])
    assert await outbox.claim("relay-c", 100, LEASE, 100) == {}, "finish releases only its own owner's lanes"


async def test_an_expired_lease_frees_the_lane(stores: tuple[UserStore, OutboxStore]) -> None:
    _, outbox = stores
    await outbox.append([event(1)])
    assert len(await outbox.claim_lanes("relay-a", 10, timedelta(milliseconds=200))) == 1
    assert await outbox.claim_lanes("relay-b", 10, LEASE) == []
    await asyncio.sleep(0.4)
    assert len(await outbox.claim_lanes("relay-b", 10, LEASE)) == 1


async def test_rows_not_yet_due_wait_and_published_rows_leave(stores: tuple[UserStore, OutboxStore]) -> None:
    _, outbox = stores
    later = datetime.now(UTC) + timedelta(hours=1)
    before = datetime.now(UTC)
    ids = await outbox.append([event(1, key="a"), replace(event(2, key="a"), not_before=later), event(3, key="b")])
    oldest = await outbox.oldest_unpublished()
    assert oldest is not None and before - timedelta(seconds=5) <= oldest <= datetime.now(UTC)
    due = await drain(outbox)
    assert sorted(due) == [ids[0], ids[2]]
    await outbox.mark_published(due)
    assert await outbox.backlog() == 1
    assert await outbox.oldest_unpublished() is None  # the one left is scheduled for later: not waiting
    assert await outbox.claim_lanes("relay-z", 100, LEASE) == []
    assert await outbox.purge_published(timedelta(hours=1), 10) == 0, "published just now: kept"
    assert await outbox.purge_published(timedelta(0), 1) == 1, "at most the batch"
    assert await outbox.purge_published(timedelta(0), 10) == 1
    assert await outbox.backlog() == 1


async def test_failures_are_counted(stores: tuple[UserStore, OutboxStore]) -> None:
    _, outbox = stores
    [row_id] = await outbox.append([event(1)])
    await outbox.record_failure([row_id], "broker down")
    [lane] = await outbox.claim_lanes("relay-a", 10, LEASE)
    [row] = await outbox.due(lane, 10)
    assert row.attempts == 1


async def test_concurrent_relays_never_share_a_lane(stores: tuple[UserStore, OutboxStore]) -> None:
    _, outbox = stores
    await outbox.append([event(i, key=f"k{i}") for i in range(300)])
    claims = await asyncio.gather(*(outbox.claim_lanes(f"relay-{n}", 4, LEASE) for n in range(10)))
    lanes = [lane for claim in claims for lane in claim]
    assert len(lanes) == len(set(lanes)) > 4


async def test_a_buried_row_leaves_its_lane_and_can_be_redriven_or_purged(
    stores: tuple[UserStore, OutboxStore],
) -> None:
    _, outbox = stores
    ids = await outbox.append([event(1, key="a"), event(2, key="a"), event(3, key="a")])
    await outbox.record_failure([ids[0]], "broker down")
    await outbox.record_failure([ids[0]], "MessageSizeTooLargeError", poison=True)
    [lane] = await outbox.claim_lanes("relay-a", 10, LEASE)
    first = (await outbox.due(lane, 10))[0]
    assert (first.id, first.attempts, first.poison_attempts) == (ids[0], 2, 1)

    assert await outbox.bury([ids[0]]) == 1
    assert [c.id for c in await outbox.due(lane, 10)] == ids[1:], "out of its lane; the rest go on"
    assert await outbox.backlog() == 2 and await outbox.dead_count() == 1
    [dead] = await outbox.dead(10)
    assert (dead.outbox_id, dead.attempts, dead.last_error) == (ids[0], 2, "MessageSizeTooLargeError")
    assert dead.event == event(1, key="a"), "the row's bytes and headers, as they were"
    assert await outbox.dead(10, before_id=dead.id) == []

    again = await outbox.redrive_dead(dead.id)
    assert again is not None and again > ids[2], "back at the end of its lane"
    assert await outbox.dead_count() == 0 and await outbox.redrive_dead(dead.id) is None
    assert [c.id for c in await outbox.due(lane, 10)][-1] == again
    assert (await outbox.due(lane, 10))[-1].poison_attempts == 0, "attempts reset"

    await outbox.bury([again])
    [dead] = await outbox.dead(10)
    assert await outbox.purge_dead(dead.id) and not await outbox.purge_dead(dead.id)
    assert await outbox.dead_count() == 0


async def test_priority_class_rows_have_lanes_of_their_own_that_only_a_priority_claim_gets(
    stores: tuple[UserStore, OutboxStore],
) -> None:
    """Priority lanes (issue 20): an event carrying the lane-class header sits in a priority lane, so a relay
    claiming the normal lanes never holds it up behind a bulk backlog; a redriven dead one goes back there."""
    _, outbox = stores
    bulk = await outbox.append([event(i, key=f"user-{i}") for i in range(200)])
    urgent = replace(event(900, key="user-7"), headers=(*event(900).headers, PRIORITY_HEADER))
    [urgent_id] = await outbox.append([urgent])

    normal = await outbox.claim("relay-bulk", 100, LEASE, 1_000, constants.NORMAL_LANES)
    assert set(normal) <= set(constants.NORMAL_LANES) and len(normal) == constants.OUTBOX_LANES
    assert sorted(r.id for rows in normal.values() for r in rows) == bulk, "every bulk row, not the urgent one"

    priority = await outbox.claim("relay-priority", 100, LEASE, 1_000, constants.PRIORITY_LANES)
    [(lane, rows)] = priority.items()
    assert lane in constants.PRIORITY_LANES, "while the bulk relay holds every normal lane"
    assert [r.id for r in rows] == [urgent_id] and rows[0].event == urgent

    assert await outbox.bury([urgent_id]) == 1
    [dead] = await outbox.dead(10)
    again = await outbox.redrive_dead(dead.id)
    await outbox.finish("relay-priority", [lane], [])
    [(lane_again, rows)] = (await outbox.claim("relay-priority", 100, LEASE, 10, constants.PRIORITY_LANES)).items()
    assert (lane_again, [r.id for r in rows]) == (lane, [again]), "the header kept its class"
