"""The SQL dead-letter store on both dialects, and data the database refuses (never mistaken for an outage)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from broadcast.adapters.sql import migrate as sql_migrate
from broadcast.adapters.sql.broadcasts import SqlBroadcastStore
from broadcast.adapters.sql.dlt import SqlDeadLetterStore
from broadcast.adapters.sql.inbox import SqlInboxStore
from broadcast.adapters.sql.stores import SqlUserStore
from broadcast.core.dead_letters import DeadLetter, DeadLetterFilter
from broadcast.core.domain import NewBroadcast, TargetType
from broadcast.core.settings import KafkaSettings, LimitsSettings
from broadcast.errors import RejectedByDatabaseError
from broadcast.lifecycle.service import Lifecycle
from tests.databases import empty_database


@pytest.fixture(params=["sqlite", "postgresql"])
async def engine(request: pytest.FixtureRequest, unique_name: str, tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    async with empty_database(request.param, request, unique_name, tmp_path) as (engine, settings):
        await sql_migrate.upgrade(engine, settings)
        yield engine


def letter(offset: int, **changes: object) -> DeadLetter:
    base = DeadLetter(
        dlt_topic="t-dlt",
        dlt_partition=3,
        dlt_offset=offset,
        original_topic="t",
        original_partition=3,
        original_offset=offset,
        original_timestamp=None,
        key=b"alice",
        value=b"\xff\x00 raw bytes",
        headers=(("kafka_dlt-original-partition", b"\x00\x00\x00\x03"), ("nul", b"\x00")),
        exception_fqcn="broadcast.errors.ValidationError",
        exception_cause_fqcn=None,
        exception_message="bad \x00 byte",
        stacktrace="Traceback ...",
        consumer_group="g",
        broadcast_id=None,
        user_id="alice",
        event_type="CREATED",
    )
    return replace(base, **changes)  # type: ignore[arg-type]


async def test_a_letter_is_stored_once_with_its_bytes_and_the_selected_row_marked_failed(engine: AsyncEngine) -> None:
    lifecycle = Lifecycle(SqlBroadcastStore(engine), SqlUserStore(engine), KafkaSettings(), LimitsSettings())
    broadcast, _ = await lifecycle.create(NewBroadcast("hi", TargetType.SELECTED, ("alice", "bob")), sender_id="admin")
    store = SqlDeadLetterStore(engine)
    assert await store.save(letter(7, broadcast_id=broadcast.id)) is True
    assert await store.save(letter(7, broadcast_id=broadcast.id)) is False  # the same DLT position again
    # the same failed record dead-lettered twice (the commit after the DLT ack failed): stored once
    assert await store.save(letter(7, broadcast_id=broadcast.id, dlt_offset=8)) is False
    [stored] = (await store.page(DeadLetterFilter(), None, 10)).items
    assert stored.value == b"\xff\x00 raw bytes" and stored.headers == letter(7).headers
    assert stored.exception_message == "bad \ufffd byte"
    stats = await lifecycle.stats(broadcast.id)
    assert (stats.failed, stats.pending) == (1, 1)
    [summary] = await store.summary(DeadLetterFilter(original_topic="t"))
    assert (summary.exception_fqcn, summary.count) == ("broadcast.errors.ValidationError", 1)


async def test_data_the_database_refuses_is_rejected_not_unavailable(engine: AsyncEngine) -> None:
    """A record naming a broadcast id that is too long (PostgreSQL) or unknown (SQLite's foreign key)
    must fail as bad data: the error handler dead-letters it instead of retrying it forever."""
    with pytest.raises(RejectedByDatabaseError):
        await SqlInboxStore(engine).row_for("x" * 40, "alice")
