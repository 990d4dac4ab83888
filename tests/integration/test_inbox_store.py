"""The SQL inbox on both dialects: the reconciler's one-query sweep of PENDING rows for many users."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from broadcast.adapters import sql_inbox, sql_migrate
from broadcast.adapters.sql_broadcasts import SqlBroadcastStore
from broadcast.adapters.sql_inbox import SqlInboxStore
from broadcast.adapters.sql_stores import SqlUserStore
from broadcast.domain import NewBroadcast, TargetType
from broadcast.lifecycle import Lifecycle
from broadcast.settings import KafkaSettings, LimitsSettings
from tests.databases import empty_database


@pytest.fixture(params=["sqlite", "postgresql"])
async def stores(
    request: pytest.FixtureRequest, unique_name: str, tmp_path: Path
) -> AsyncIterator[tuple[Lifecycle, SqlInboxStore]]:
    async with empty_database(request.param, request, unique_name, tmp_path) as (engine, settings):
        await sql_migrate.upgrade(engine, settings)
        lifecycle = Lifecycle(SqlBroadcastStore(engine), SqlUserStore(engine), KafkaSettings(), LimitsSettings())
        yield lifecycle, SqlInboxStore(engine)


async def test_pending_rows_of_many_users_come_in_one_sweep_oldest_first(
    stores: tuple[Lifecycle, SqlInboxStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    lifecycle, inbox = stores
    first, _ = await lifecycle.create(NewBroadcast("one", TargetType.SELECTED, ("alice", "bob")), sender_id="admin")
    second, _ = await lifecycle.create(NewBroadcast("two", TargetType.SELECTED, ("bob", "carol")), sender_id="admin")
    await lifecycle.create(NewBroadcast("not yours", TargetType.SELECTED, ("dave",)), sender_id="admin")

    found = await inbox.pending_for(["alice", "bob", "carol", "nobody"], 100)
    pairs = [(user, item.broadcast.id) for user, item in found]
    assert sorted(pairs) == sorted(
        [("alice", first.id), ("bob", first.id), ("bob", second.id), ("carol", second.id)]
    ), "only the asked users' rows, each with its owner"
    assert [item.row_id for _, item in found] == sorted(item.row_id or 0 for _, item in found), "oldest first"

    await inbox.mark_delivered([(first.id, "alice"), (second.id, "bob")])
    left = await inbox.pending_for(["alice", "bob", "carol"], 100)
    assert sorted((u, i.broadcast.id) for u, i in left) == sorted([("bob", first.id), ("carol", second.id)])

    monkeypatch.setattr(sql_inbox, "USERS_PER_QUERY", 1)  # many chunks: the limit still holds across them
    assert len(await inbox.pending_for(["alice", "bob", "carol"], 1)) == 1
    assert len(await inbox.pending_for(["alice", "bob", "carol"], 100)) == 2
    assert await inbox.pending_for([], 100) == []
