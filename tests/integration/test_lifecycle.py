"""Lifecycle transitions on the real stack: scheduling, expiry, cancel, idempotency, all-or-nothing writes."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, func, select

from broadcast.adapters.sql import engine as sql_engine
from broadcast.adapters.sql import group_create
from broadcast.adapters.sql import migrate as sql_migrate
from broadcast.adapters.sql.broadcasts import COPY_FROM, SqlBroadcastStore
from broadcast.adapters.sql.tables import broadcast_messages, outbox_events, user_broadcast_messages
from broadcast.core import constants, envelope
from broadcast.core.domain import Broadcast, BroadcastStatus, EventType, NewBroadcast, OutboxEvent, Priority, TargetType
from broadcast.core.event_shapes import EventShapes
from broadcast.core.ports.log import OutgoingRecord, RecordPosition
from broadcast.core.settings import KafkaSettings
from broadcast.errors import ConflictError, NotFoundError, ValidationError
from broadcast.lifecycle.scheduler import Scheduler
from broadcast.observability.loops import LOOP_SLICE
from devstack.stack import StackInfo
from tests.databases import empty_database
from tests.integration.conftest import Pipeline
from tests.topics import read_topic

NOW = datetime(2026, 12, 6, tzinfo=UTC)
SAMPLE = Broadcast(
    "b", "admin", "bulk", TargetType.SELECTED, (), Priority.NORMAL, None, BroadcastStatus.ACTIVE, False, 0, NOW, NOW
)


async def count(pipeline: Pipeline, table: object) -> int:
    async with pipeline.engine.connect() as conn:
        return int((await conn.execute(select(func.count()).select_from(table))).scalar_one())  # type: ignore[arg-type]


async def group_events(pipeline: Pipeline, stack: StackInfo, expected: int) -> list[envelope.MessageDeliveryEvent]:
    records = await read_topic(stack.kafka_bootstrap, pipeline.topic(constants.GROUP_TOPIC), expected)
    return [envelope.decode(r.value) for r in sorted(records, key=lambda r: (r.partition, r.offset))]


async def test_cancel_and_expire_each_emit_one_group_event(pipeline: Pipeline, stack: StackInfo) -> None:
    soon = datetime.now(UTC) + timedelta(seconds=1)
    cancelled, _ = await pipeline.lifecycle.create(NewBroadcast("c", TargetType.ALL), sender_id="admin")
    expiring, _ = await pipeline.lifecycle.create(
        NewBroadcast("e", TargetType.SELECTED, ("alice",), expires_at=soon), sender_id="admin"
    )
    await pipeline.lifecycle.cancel(cancelled.id)
    with pytest.raises(ConflictError):
        await pipeline.lifecycle.cancel(cancelled.id)
    await asyncio.sleep(1.1)
    scheduler = Scheduler(pipeline.lifecycle, pipeline.broadcasts, tick_seconds=0.5)
    assert await scheduler.tick() == (0, 1)
    assert await scheduler.tick() == (0, 0)
    await pipeline.publish_all()
    events = await group_events(pipeline, stack, 2)
    kinds = sorted((e.broadcast_id, e.event_type) for e in events)
    assert kinds == sorted([(cancelled.id, EventType.CANCELLED), (expiring.id, EventType.EXPIRED)]), (
        "the cancelled ALL broadcast's CREATED was never published, so only CANCELLED went out"
    )
    assert (await pipeline.lifecycle.get(expiring.id)).status is BroadcastStatus.EXPIRED
    assert (await pipeline.lifecycle.get(cancelled.id)).status is BroadcastStatus.CANCELLED


async def test_a_scheduled_broadcast_activates_within_one_tick_and_publishes_when_due(
    pipeline: Pipeline, stack: StackInfo
) -> None:
    due = datetime.now(UTC) + timedelta(seconds=1.5)
    scheduled, _ = await pipeline.lifecycle.create(
        NewBroadcast("later", TargetType.SELECTED, ("alice", "bob"), scheduled_at=due), sender_id="admin"
    )
    assert scheduled.status is BroadcastStatus.SCHEDULED
    assert await pipeline.relay().run_once() == 0, "nothing is due before scheduledAt"
    stop = asyncio.Event()
    scheduler = Scheduler(pipeline.lifecycle, pipeline.broadcasts, tick_seconds=0.5)
    relay = pipeline.relay()
    tasks = [asyncio.create_task(scheduler.run(stop)), asyncio.create_task(relay.run(stop))]
    try:
        while (await pipeline.lifecycle.get(scheduled.id)).status is BroadcastStatus.SCHEDULED:
            assert datetime.now(UTC) < due + timedelta(seconds=0.5 + 1.0), "not activated within one tick"
            await asyncio.sleep(0.05)
        activated_at = datetime.now(UTC)
        assert activated_at >= due
        records = await read_topic(stack.kafka_bootstrap, pipeline.topic(constants.SELECTED_TOPIC), 2)
    finally:
        stop.set()
        await asyncio.gather(*tasks)
    assert sorted(r.key or b"" for r in records) == [b"alice", b"bob"]
    assert all(r.timestamp_ms >= due.timestamp() * 1000 for r in records)


async def test_cancelling_a_scheduled_broadcast_drops_its_undelivered_events(
    pipeline: Pipeline, stack: StackInfo
) -> None:
    later = datetime.now(UTC) + timedelta(hours=1)
    b, _ = await pipeline.lifecycle.create(
        NewBroadcast("never", TargetType.SELECTED, ("alice", "bob"), scheduled_at=later), sender_id="admin"
    )
    assert await pipeline.outbox.backlog() == 2
    await pipeline.lifecycle.cancel(b.id)
    assert await pipeline.outbox.backlog() == 1
    await pipeline.publish_all()
    [event] = await group_events(pipeline, stack, 1)
    assert (event.broadcast_id, event.event_type) == (b.id, EventType.CANCELLED)


async def test_only_one_scheduler_leads_at_a_time(pipeline: Pipeline) -> None:
    one = Scheduler(pipeline.lifecycle, pipeline.broadcasts, tick_seconds=1)
    async with pipeline.broadcasts.leadership("broadcast-scheduler") as leader:
        assert leader
        assert await one.tick() is None  # another holder (a second connection) is refused
    assert await one.tick() == (0, 0)


async def test_idempotency_key_replays_and_refuses_a_different_request(pipeline: Pipeline) -> None:
    request = NewBroadcast("once", TargetType.SELECTED, ("alice", "bob"))
    first, created = await pipeline.lifecycle.create(request, sender_id="admin", idempotency_key="k-1")
    again, created_again = await pipeline.lifecycle.create(request, sender_id="admin", idempotency_key="k-1")
    assert created and not created_again and again.id == first.id
    with pytest.raises(ConflictError):
        await pipeline.lifecycle.create(
            NewBroadcast("other", TargetType.SELECTED, ("alice",)), sender_id="admin", idempotency_key="k-1"
        )
    results = await asyncio.gather(
        *(pipeline.lifecycle.create(request, sender_id="admin", idempotency_key="k-2") for _ in range(5))
    )
    assert len({b.id for b, _ in results}) == 1 and sum(c for _, c in results) == 1
    assert await count(pipeline, broadcast_messages) == 2
    assert await count(pipeline, user_broadcast_messages) == 4
    assert await pipeline.outbox.backlog() == 4


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (NewBroadcast("   ", TargetType.ALL), "content must not be empty"),
        (NewBroadcast("x" * 10_001, TargetType.ALL), "content exceeds"),
        (NewBroadcast("x", TargetType.ALL, ("alice",)), "must be empty when targetType is ALL"),
        (NewBroadcast("x", TargetType.SELECTED), "needs at least one targetId"),
        (NewBroadcast("x", TargetType.SELECTED, ("a",) * 10_001), "upload a CSV"),
        (NewBroadcast("x", TargetType.ROLE, ("",)), "invalid target id"),
        (NewBroadcast("x", TargetType.ALL, expires_at=datetime(2020, 1, 1, tzinfo=UTC)), "expiresAt is in the past"),
        (
            NewBroadcast(
                "x",
                TargetType.ALL,
                scheduled_at=datetime.now(UTC) + timedelta(hours=2),
                expires_at=datetime.now(UTC) + timedelta(hours=1),
            ),
            "expiresAt must be after scheduledAt",
        ),
    ],
)
async def test_invalid_requests_write_nothing(pipeline: Pipeline, request_: NewBroadcast, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        await pipeline.lifecycle.create(request_, sender_id="admin")
    assert await count(pipeline, broadcast_messages) == 0
    assert await count(pipeline, outbox_events) == 0


async def test_a_large_audience_is_written_in_one_transaction_with_copy(pipeline: Pipeline) -> None:
    recipients = [f"user-{n}" for n in range(50_000)] + ["user-1", "user-2"]
    started = time.perf_counter()
    b, _ = await pipeline.lifecycle.create(
        NewBroadcast("big", TargetType.SELECTED), sender_id="a", recipients=recipients
    )
    assert time.perf_counter() - started < 60
    assert b.targeted_count == 50_000, "duplicates collapse"
    assert await count(pipeline, user_broadcast_messages) == 50_000
    assert await pipeline.outbox.backlog() == 50_000
    stats = await pipeline.lifecycle.stats(b.id)
    assert (stats.targeted, stats.delivered, stats.pending) == (50_000, 0, 50_000)
    page = await pipeline.lifecycle.deliveries(b.id, None, 500)
    assert len(page.items) == 500 and page.next_cursor is not None
    second = await pipeline.lifecycle.deliveries(b.id, page.next_cursor, 500)
    assert {d.user_id for d in page.items}.isdisjoint({d.user_id for d in second.items})
    with pytest.raises(NotFoundError):
        await pipeline.lifecycle.stats("00000000-0000-0000-0000-000000000000")


async def test_listing_pages_through_every_broadcast_once(pipeline: Pipeline) -> None:
    made = [
        (await pipeline.lifecycle.create(NewBroadcast(f"b{n}", TargetType.ALL), sender_id="a"))[0].id for n in range(7)
    ]
    await pipeline.lifecycle.cancel(made[0])
    seen, cursor = [], None
    while True:
        page = await pipeline.lifecycle.list_broadcasts(None, cursor, 3)
        seen += [b.id for b in page.items]
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    assert seen == list(reversed(made))
    cancelled = await pipeline.lifecycle.list_broadcasts(BroadcastStatus.CANCELLED, None, 10)
    assert [b.id for b in cancelled.items] == [made[0]]
    with pytest.raises(ValidationError):
        await pipeline.lifecycle.list_broadcasts(None, "not-a-cursor", 3)


async def test_a_targeted_message_is_written_in_one_statement_with_its_rows_events_and_stats(
    pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    statements: list[str] = []

    def seen(_conn: object, _cursor: object, statement: str, *_: object) -> None:  # through SQLAlchemy
        statements.append(statement.split(None, 1)[0].upper())

    on_the_driver(monkeypatch, statements)
    event.listen(pipeline.engine.sync_engine, "before_cursor_execute", seen)
    try:
        request = NewBroadcast("quick", TargetType.SELECTED, ("alice", "bob"), category="ops")
        b, created = await pipeline.lifecycle.create(request, sender_id="admin", idempotency_key="k-one")
    finally:
        event.remove(pipeline.engine.sync_engine, "before_cursor_execute", seen)
        monkeypatch.undo()
    assert created and statements == ["WITH"], statements
    assert await pipeline.lifecycle.get(b.id) == b, "the broadcast as it was built"
    stats = await pipeline.lifecycle.stats(b.id)
    assert (stats.targeted, stats.delivered, stats.pending) == (2, 0, 2)
    claimed = await pipeline.outbox.claim("probe", 100, timedelta(seconds=30), 10)
    rows = [row for lane_rows in claimed.values() for row in lane_rows]
    assert sorted(r.event.key for r in rows) == ["alice", "bob"]
    expected = pipeline.lifecycle.events.headers(EventType.CREATED, b.correlation_id)
    assert all(r.event.headers == expected and r.event.broadcast_id == b.id for r in rows), "headers intact"
    replay, again = await pipeline.lifecycle.create(request, sender_id="admin", idempotency_key="k-one")
    assert replay.id == b.id and not again
    assert await count(pipeline, user_broadcast_messages) == 2 and await pipeline.outbox.backlog() == 2


def on_the_driver(monkeypatch: pytest.MonkeyPatch, statements: list[str]) -> None:
    """Record the first word of every statement run on the driver (``DriverStatement``) into ``statements``."""
    driver_run = sql_engine.DriverStatement._run

    async def recorded(self: sql_engine.DriverStatement, conn: Any, params: Any, all_rows: bool) -> Any:
        statements.append(self.sql.split(None, 1)[0].upper())
        return await driver_run(self, conn, params, all_rows)

    monkeypatch.setattr(sql_engine.DriverStatement, "_run", recorded)


async def test_concurrent_targeted_messages_share_statements_and_each_is_written_whole(
    pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    statements: list[str] = []
    on_the_driver(monkeypatch, statements)
    requests = [NewBroadcast(f"m{i}", TargetType.SELECTED, (f"u{i}", f"v{i}")) for i in range(40)]
    results = await asyncio.gather(*(pipeline.lifecycle.create(r, sender_id="admin") for r in requests))
    monkeypatch.undo()
    assert all(created for _, created in results)
    assert 1 <= len(statements) < len(requests), f"{len(statements)} statements for {len(requests)} messages"
    for (b, _), request in zip(results, requests, strict=True):
        assert await pipeline.lifecycle.get(b.id) == b and b.content == request.content
        deliveries = await pipeline.lifecycle.deliveries(b.id, None, 10)
        assert sorted(d.user_id for d in deliveries.items) == sorted(request.target_ids)
        assert (await pipeline.lifecycle.stats(b.id)).targeted == 2
    claimed = await pipeline.outbox.claim("probe", 1_000, timedelta(seconds=30), 100)
    rows = [row for lane_rows in claimed.values() for row in lane_rows]
    assert sorted((r.event.broadcast_id, r.event.key) for r in rows) == sorted(
        (b.id, u) for (b, _), request in zip(results, requests, strict=True) for u in request.target_ids
    )


async def test_a_targeted_message_the_database_refuses_fails_alone_in_its_batch(pipeline: Pipeline) -> None:
    """A value only the database refuses (a NUL byte in text: the API refuses it first, the store must not rely
    on that) fails its own create, not the creates sharing its statement."""
    shapes = pipeline.lifecycle.events
    bad_at = 3
    made = []
    for i in range(8):
        content = "bad\x00one" if i == bad_at else f"fine {i}"
        b = replace(SAMPLE, id=str(uuid.uuid4()), content=content, targeted_count=1)
        made.append((b, shapes.created_for_users(b, ["alice"])))
    outcomes = await asyncio.gather(
        *(pipeline.broadcasts.create(b, ["alice"], events, None, "h") for b, events in made), return_exceptions=True
    )
    assert isinstance(outcomes[bad_at], ValidationError), outcomes[bad_at]
    assert all(o == (b, True) for i, (o, (b, _)) in enumerate(zip(outcomes, made, strict=True)) if i != bad_at)
    assert await count(pipeline, broadcast_messages) == 7
    assert await pipeline.outbox.backlog() == 7


async def test_an_urgent_message_does_not_wait_behind_normal_ones_whose_statements_are_stuck(
    pipeline: Pipeline,
) -> None:
    """NORMAL creates whose statements wait on a lock (another transaction holds their idempotency key)
    take every slot of their group; an URGENT message still goes through, in a group of its own."""
    request = NewBroadcast("held", TargetType.SELECTED, ("alice",))
    async with pipeline.engine.connect() as holder:
        transaction = await holder.begin()
        await holder.execute(
            broadcast_messages.insert().values(
                id=str(uuid.uuid4()),
                sender_id="admin",
                content="holder",
                target_type="SELECTED",
                target_roles=[],
                priority="NORMAL",
                status="ACTIVE",
                idempotency_key="held",
                request_hash="x",
                created_at=NOW,
                updated_at=NOW,
            )
        )
        stuck = []
        for _ in range(group_create.IN_FLIGHT + 2):  # one at a time: each in a statement (and slot) of its own
            stuck.append(
                asyncio.create_task(pipeline.lifecycle.create(request, sender_id="admin", idempotency_key="held"))
            )
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.5)
        assert not any(t.done() for t in stuck), "the NORMAL creates wait on the held key"
        urgent = NewBroadcast("now", TargetType.SELECTED, ("bob",), priority=Priority.URGENT)
        async with asyncio.timeout(10):
            b, created = await pipeline.lifecycle.create(urgent, sender_id="admin")
        assert created and (await pipeline.lifecycle.get(b.id)).priority is Priority.URGENT
        await transaction.rollback()
    results = await asyncio.gather(*stuck)
    assert len({b.id for b, _ in results}) == 1 and sum(c for _, c in results) == 1, "one written, the rest replay it"


class LoopTurns:
    """Counts turns of the event loop (a task that only yields), and, for the items a long step consumes,
    the longest run of them consumed within one turn: how long that step held the loop, in items."""

    def __init__(self) -> None:
        self.turns = 0
        self.longest = 0
        self._run = (-1, 0)  # (turn, items consumed in it)
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> LoopTurns:
        self._task = asyncio.create_task(self._count())
        await asyncio.sleep(0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._task is not None
        await self._task

    async def _count(self) -> None:
        while not self._stop.is_set():
            self.turns += 1
            await asyncio.sleep(0)

    def consumed(self) -> None:
        turn, run = self._run
        self._run = (self.turns, run + 1 if turn == self.turns else 1)
        self.longest = max(self.longest, self._run[1])


class Watched(list[OutgoingRecord]):
    """Records that tell ``LoopTurns`` each time the event log reads one."""

    def __init__(self, items: list[OutgoingRecord], turns: LoopTurns) -> None:
        super().__init__(items)
        self.turns = turns

    def __iter__(self) -> Iterator[OutgoingRecord]:
        for item in super().__iter__():
            self.turns.consumed()
            yield item

    def __getitem__(self, index: Any) -> Any:
        self.turns.consumed()
        return super().__getitem__(index)


async def test_a_bulk_write_and_its_publish_hand_the_event_loop_back_every_slice(pipeline: Pipeline) -> None:
    """A bulk broadcast's COPY and the publish of its records are long synchronous steps unless they yield:
    the API's other requests, the priority relay and the consumers would wait behind them (URGENT messages
    queued for seconds behind a 1M CSV upload, issue 20). Counted in items, not time: at most about
    ``LOOP_SLICE`` events are consumed per turn of the loop (before: a 20,000-row chunk at once)."""
    users = [f"user-{n:05d}" for n in range(20_000)]
    broadcast = replace(SAMPLE, id=str(uuid.uuid4()), targeted_count=len(users))
    events = list(EventShapes(pipeline.settings.kafka, lambda: NOW).created_for_users(broadcast, users))
    async with LoopTurns() as turns:

        def watched() -> Iterator[OutboxEvent]:
            for event in events:
                turns.consumed()
                yield event

        await pipeline.broadcasts.create(broadcast, users, watched(), None, "hash")
    assert turns.longest <= LOOP_SLICE + COPY_FROM, f"{turns.longest} outbox rows written within one turn"

    records = [OutgoingRecord(e.topic, e.key.encode(), e.payload, e.headers) for e in events]
    async with LoopTurns() as turns:
        outcomes = await pipeline.log.publish_many(Watched(records, turns))
    assert all(isinstance(o, RecordPosition) for o in outcomes)
    assert turns.longest <= 2 * LOOP_SLICE, f"{turns.longest} records handled within one turn"
    assert await count(pipeline, outbox_events) == len(users) == await count(pipeline, user_broadcast_messages)


async def test_a_bulk_copy_is_bounded_by_its_own_timeout_not_the_statement_timeout(
    request: pytest.FixtureRequest, unique_name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bulk broadcast is one streamed COPY per table, its rows built as it goes (a 1M CSV: tens of seconds
    on a busy box). The sessions' statement timeout must not cut it: here 0.3 s, and the rows take longer to
    come. Before the fix the COPY failed after 0.3 s (503, all rolled back, and so on every retry)."""
    monkeypatch.setattr(sql_engine, "COMMAND_TIMEOUT_S", 0.3)
    async with empty_database("postgresql", request, unique_name, tmp_path) as (engine, database):
        await sql_migrate.upgrade(engine, database)
        users = [f"user-{n:04d}" for n in range(2_000)]
        broadcast = replace(SAMPLE, id=str(uuid.uuid4()), targeted_count=len(users))
        events = list(EventShapes(KafkaSettings(), lambda: NOW).created_for_users(broadcast, users))

        def slow() -> Iterator[OutboxEvent]:
            for n, event in enumerate(events):
                if n == 1_000:
                    time.sleep(0.6)  # a slow producer of rows (a busy loop, a big upload's encoding)
                yield event

        await SqlBroadcastStore(engine).create(broadcast, users, slow(), None, "hash")
        async with engine.connect() as conn:
            written = (await conn.execute(select(func.count()).select_from(outbox_events))).scalar_one()
        assert written == len(users)
