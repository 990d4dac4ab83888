"""The lifecycle on SQLite (the embedded default): concurrent transitions and non-UTC offsets."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from broadcast.adapters.sql import migrate as sql_migrate
from broadcast.adapters.sql.broadcasts import SqlBroadcastStore
from broadcast.adapters.sql.stores import SqlUserStore
from broadcast.core.domain import Broadcast, BroadcastStatus, NewBroadcast, TargetType
from broadcast.core.settings import KafkaSettings, LimitsSettings
from broadcast.errors import ConflictError
from broadcast.lifecycle.service import Lifecycle
from tests.databases import empty_database


@pytest.fixture
async def lifecycle(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Lifecycle]:
    async with empty_database("sqlite", request, "lifecycle", tmp_path) as (engine, settings):
        await sql_migrate.upgrade(engine, settings)
        yield Lifecycle(SqlBroadcastStore(engine), SqlUserStore(engine), KafkaSettings(), LimitsSettings())


async def test_a_cancel_racing_an_activation_always_sticks(lifecycle: Lifecycle) -> None:
    later = datetime.now(UTC) + timedelta(hours=1)
    for _ in range(5):
        b, _ = await lifecycle.create(
            NewBroadcast("x", TargetType.SELECTED, ("alice",), scheduled_at=later), sender_id="admin"
        )
        cancelled, activated = await asyncio.gather(
            lifecycle.cancel(b.id), lifecycle.activate(b.id), return_exceptions=True
        )
        # A cancel answered 200 must stick: activation either ran first (and was then cancelled) or lost.
        assert isinstance(cancelled, Broadcast) and cancelled.status is BroadcastStatus.CANCELLED
        assert isinstance(activated, ConflictError) or (
            isinstance(activated, Broadcast) and activated.status is BroadcastStatus.ACTIVE
        )
        assert (await lifecycle.get(b.id)).status is BroadcastStatus.CANCELLED


async def test_times_with_an_offset_are_kept_as_the_same_instant(lifecycle: Lifecycle) -> None:
    plus_five = timezone(timedelta(hours=5))
    at = (datetime.now(UTC) + timedelta(minutes=30)).astimezone(plus_five)
    b, _ = await lifecycle.create(NewBroadcast("x", TargetType.ALL, scheduled_at=at), sender_id="admin")
    stored = await lifecycle.get(b.id)
    assert stored.status is BroadcastStatus.SCHEDULED
    assert stored.scheduled_at == at
    activate, _ = await lifecycle.due(datetime.now(UTC) + timedelta(minutes=29))
    assert activate == []
    activate, _ = await lifecycle.due(datetime.now(UTC) + timedelta(minutes=31))
    assert activate == [b.id]
