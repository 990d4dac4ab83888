"""The delivery consumers' batch handlers on SQLite and the in-process bus: a batch costs one row lookup, one
presence round trip and one publish pipeline; a bad record ends the batch at its index, after the records
before it were pushed; a failing shared step names the first record."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import orjson
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from broadcast.adapters.memory.bus import MemoryBus, MemoryPresence
from broadcast.adapters.sql import migrate as sql_migrate
from broadcast.adapters.sql.broadcasts import SqlBroadcastStore
from broadcast.adapters.sql.inbox import SqlInboxStore
from broadcast.adapters.sql.stores import SqlUserStore
from broadcast.core import constants
from broadcast.core.domain import Broadcast, EventType, NewBroadcast, OutboxEvent, TargetType
from broadcast.core.event_shapes import EventShapes
from broadcast.core.ports.bus import BusMessage
from broadcast.core.ports.log import EventRecord
from broadcast.core.settings import KafkaSettings, LimitsSettings
from broadcast.errors import RejectedByDatabaseError, UnavailableError, ValidationError
from broadcast.lifecycle.service import Lifecycle
from consumers.delivery import DeliveryHandlers
from consumers.errors import BatchListenerFailedError
from sse.frames import EventName
from tests.databases import empty_database

SHAPES = EventShapes(KafkaSettings(), lambda: datetime.now(UTC))
GROUP_CHANNEL = constants.REDIS_GROUP_CHANNEL


@dataclass
class Counting:
    """The adapters, with a count of the calls the handlers make."""

    inbox: SqlInboxStore
    engine: AsyncEngine
    presence: MemoryPresence = field(default_factory=MemoryPresence)
    bus: MemoryBus = field(default_factory=MemoryBus)
    calls: list[str] = field(default_factory=list)
    bus_down: bool = False

    async def rows_for(self, pairs: Sequence[tuple[str, str]]) -> dict[tuple[str, str], int]:
        self.calls.append("rows_for")
        return await self.inbox.rows_for(pairs)

    async def row_for(self, broadcast_id: str, user_id: str) -> int:
        self.calls.append("row_for")
        return await self.inbox.row_for(broadcast_id, user_id)

    async def instances_many(self, user_ids: Sequence[str]) -> dict[str, frozenset[str]]:
        self.calls.append("instances_many")
        return await self.presence.instances_many(user_ids)

    async def publish_many(self, messages: Sequence[tuple[str, bytes]]) -> list[int]:
        self.calls.append("publish_many")
        if self.bus_down:
            raise UnavailableError("redis publish failed")
        return await self.bus.publish_many(messages)


@pytest.fixture
async def world(request: pytest.FixtureRequest, unique_name: str, tmp_path: Path) -> AsyncIterator[Counting]:
    async with empty_database("sqlite", request, unique_name, tmp_path) as (engine, settings):
        await sql_migrate.upgrade(engine, settings)
        yield Counting(SqlInboxStore(engine), engine)


def handlers(w: Counting) -> DeliveryHandlers:
    return DeliveryHandlers(w, w, w)  # type: ignore[arg-type]  # the counting proxy stands in for all three


async def created(w: Counting, new: NewBroadcast) -> Broadcast:
    lifecycle = Lifecycle(SqlBroadcastStore(w.engine), SqlUserStore(w.engine), KafkaSettings(), LimitsSettings())
    broadcast, _ = await lifecycle.create(new, sender_id="admin")
    return broadcast


def records(events: Sequence[OutboxEvent | bytes]) -> list[EventRecord]:
    return [
        EventRecord("t", 0, offset, None, e if isinstance(e, bytes) else e.payload, (), 1_700_000_000_000)
        for offset, e in enumerate(events)
    ]


async def drained(sub: object, timeout_s: float = 0.2) -> list[dict[str, object]]:
    got = []
    while (message := await sub.get(timeout_s)) is not None:  # type: ignore[attr-defined]
        assert isinstance(message, BusMessage)
        got.append(orjson.loads(message.payload))
    return got


async def test_a_batch_costs_one_row_lookup_one_presence_round_trip_and_one_publish_pipeline(world: Counting) -> None:
    w = world
    one = await created(w, NewBroadcast("one", TargetType.SELECTED, ("alice", "bob", "carol")))
    two = await created(w, NewBroadcast("two", TargetType.SELECTED, ("alice",)))
    await w.presence.heartbeat("alice", "i1")
    await w.presence.heartbeat("alice", "i2")
    await w.presence.heartbeat("bob", "i1")
    batch = [
        *SHAPES.created_for_users(one, ["alice", "bob", "carol"]),
        SHAPES.read(one.id, "bob"),
        *SHAPES.created_for_users(two, ["alice"]),
    ]
    rows = await w.inbox.rows_for([(one.id, "alice"), (one.id, "bob"), (two.id, "alice")])
    async with w.bus.subscribe([constants.instance_channel("i1")]) as i1:
        await handlers(w).on_selected_batch(records(batch))
        got = await drained(i1)

    assert w.calls == ["rows_for", "instances_many", "publish_many"]
    assert [(m["user"], m["broadcast"]) for m in got] == [
        ("alice", one.id),
        ("bob", one.id),
        ("bob", None),
        ("alice", two.id),
    ], "each present user's frames, in record order; carol is offline"
    assert f"id: s{rows[(one.id, 'alice')]}\n" in str(got[0]["frame"]), "the SSE id is the user's row"
    assert f"id: s{rows[(two.id, 'alice')]}\n" in str(got[3]["frame"])
    assert f"event: {EventName.READ_RECEIPT}" in str(got[2]["frame"])
    assert [p.broadcast.id for _, p in await w.inbox.pending_for(["carol"], 10)] == [one.id], "carol's row stays"


async def test_a_malformed_record_mid_batch_fails_at_its_index_after_the_ones_before_it_were_pushed(
    world: Counting,
) -> None:
    w = world
    one = await created(w, NewBroadcast("one", TargetType.SELECTED, ("alice", "bob")))
    await w.presence.heartbeat_many(["alice", "bob"], "i1")
    alice, bob = SHAPES.created_for_users(one, ["alice", "bob"])
    async with w.bus.subscribe([constants.instance_channel("i1")]) as i1:
        with pytest.raises(BatchListenerFailedError) as failed:
            await handlers(w).on_selected_batch(records([alice, b"{not json", bob]))
        got = await drained(i1)
    assert failed.value.index == 1
    assert isinstance(failed.value.__cause__, ValidationError), "the cause decides: not retryable"
    assert [m["user"] for m in got] == ["alice"], "before it: pushed; after it: left for the next call"


async def test_a_row_the_database_refuses_is_found_record_by_record(world: Counting) -> None:
    w = world
    one = await created(w, NewBroadcast("one", TargetType.SELECTED, ("alice", "bob")))
    gone = await created(w, NewBroadcast("gone", TargetType.SELECTED, ("carol",)))
    await w.presence.heartbeat_many(["alice", "bob", "carol"], "i1")
    async with w.engine.begin() as conn:  # the broadcast is gone: its rows can't be created
        await conn.exec_driver_sql("DELETE FROM broadcast_messages WHERE id = ?", (gone.id,))
    batch = [*SHAPES.created_for_users(one, ["alice"]), *SHAPES.created_for_users(gone, ["carol"])]
    batch += SHAPES.created_for_users(one, ["bob"])
    async with w.bus.subscribe([constants.instance_channel("i1")]) as i1:
        with pytest.raises(BatchListenerFailedError) as failed:
            await handlers(w).on_selected_batch(records(batch))
        got = await drained(i1)
    assert failed.value.index == 1, "the refused record, not the first of the batch"
    assert isinstance(failed.value.__cause__, RejectedByDatabaseError)
    assert w.calls == ["rows_for", "row_for", "row_for", "instances_many", "publish_many"]
    assert [m["user"] for m in got] == ["alice"]


async def test_fire_and_forget_records_get_no_row_and_no_sse_id(world: Counting) -> None:
    w = world
    quick = await created(w, NewBroadcast("quick", TargetType.SELECTED, ("alice",), fire_and_forget=True))
    await w.presence.heartbeat("alice", "i1")
    async with w.bus.subscribe([constants.instance_channel("i1")]) as i1:
        await handlers(w).on_selected_batch(records(list(SHAPES.created_for_users(quick, ["alice"]))))
        got = await drained(i1)
    assert w.calls == ["instances_many", "publish_many"]
    assert got[0]["delivers"] is None and "id:" not in str(got[0]["frame"])


async def test_a_failing_shared_step_names_the_first_record_whatever_the_bad_record_later(world: Counting) -> None:
    w = world
    one = await created(w, NewBroadcast("one", TargetType.SELECTED, ("alice", "bob")))
    await w.presence.heartbeat_many(["alice", "bob"], "i1")
    w.bus_down = True
    with pytest.raises(BatchListenerFailedError) as failed:
        await handlers(w).on_selected_batch(records([*SHAPES.created_for_users(one, ["alice"]), b"bad"]))
    assert failed.value.index == 0, "nothing of the batch counts as handled"
    assert isinstance(failed.value.__cause__, UnavailableError), "so it is retried, never dead-lettered"


async def test_group_records_go_out_in_one_pipeline_and_a_bad_one_ends_the_batch_at_its_index(world: Counting) -> None:
    w = world
    one = await created(w, NewBroadcast("to all", TargetType.ALL))
    two = await created(w, NewBroadcast("to admins", TargetType.ROLE, ("admin",)))
    batch: list[OutboxEvent | bytes] = [SHAPES.group(one, EventType.CREATED), SHAPES.group(two, EventType.CREATED)]
    batch += [SHAPES.group(one, EventType.CANCELLED), b"[]", SHAPES.group(two, EventType.EXPIRED)]
    async with w.bus.subscribe([GROUP_CHANNEL]) as group:
        with pytest.raises(BatchListenerFailedError) as failed:
            await handlers(w).on_group_batch(records(batch))
        got = await drained(group)
    assert failed.value.index == 3 and isinstance(failed.value.__cause__, ValidationError)
    assert w.calls == ["publish_many"]
    assert [(m["kind"], m.get("broadcast")) for m in got] == [("group", one.id), ("group", two.id), ("all", None)]
    assert f"event: {EventName.MESSAGE_REMOVED}" in str(got[2]["frame"])
