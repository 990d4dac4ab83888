"""What the stats of a broadcast say once it has ended, on SQLite and PostgreSQL: nothing is pending; the
targeted users it never reached are counted as ``cancelled`` (or ``expired``), so that targeted = delivered +
failed + pending + cancelled + expired, and delivered, read and failed stay what happened."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from broadcast.adapters.sql import migrate as sql_migrate
from broadcast.adapters.sql.broadcasts import SqlBroadcastStore
from broadcast.adapters.sql.inbox import SqlInboxStore
from broadcast.adapters.sql.stores import SqlUserStore
from broadcast.core.domain import NewBroadcast, TargetType, User
from broadcast.core.settings import KafkaSettings, LimitsSettings
from broadcast.lifecycle.service import Lifecycle
from tests.databases import empty_database


@pytest.fixture(params=["sqlite", "postgresql"])
async def stores(
    request: pytest.FixtureRequest, unique_name: str, tmp_path: Path
) -> AsyncIterator[tuple[Lifecycle, SqlInboxStore]]:
    async with empty_database(request.param, request, unique_name, tmp_path) as (engine, settings):
        await sql_migrate.upgrade(engine, settings)
        users = SqlUserStore(engine)
        await users.upsert([User(u, "", frozenset()) for u in ("ann", "bob", "cid")])
        yield Lifecycle(SqlBroadcastStore(engine), users, KafkaSettings(), LimitsSettings()), SqlInboxStore(engine)


def counts(stats: object) -> dict[str, int]:
    names = ("targeted", "delivered", "read", "failed", "pending", "cancelled", "expired")
    return {name: getattr(stats, name) for name in names}


async def test_a_cancelled_broadcast_has_nothing_pending(stores: tuple[Lifecycle, SqlInboxStore]) -> None:
    lifecycle, inbox = stores
    everyone, _ = await lifecycle.create(NewBroadcast("all", TargetType.ALL), sender_id="admin")
    some, _ = await lifecycle.create(NewBroadcast("some", TargetType.SELECTED, ("ann", "bob")), sender_id="admin")
    await inbox.mark_delivered([(some.id, "ann")])
    assert counts(await lifecycle.stats(some.id)) == dict(
        targeted=2, delivered=1, read=0, failed=0, pending=1, cancelled=0, expired=0
    )
    for b in (everyone, some):
        await lifecycle.cancel(b.id)
    assert counts(await lifecycle.stats(everyone.id)) == dict(
        targeted=3, delivered=0, read=0, failed=0, pending=0, cancelled=3, expired=0
    )
    assert counts(await lifecycle.stats(some.id)) == dict(
        targeted=2, delivered=1, read=0, failed=0, pending=0, cancelled=1, expired=0
    )


async def test_an_expired_broadcast_has_nothing_pending(stores: tuple[Lifecycle, SqlInboxStore]) -> None:
    lifecycle, _ = stores
    some, _ = await lifecycle.create(NewBroadcast("some", TargetType.SELECTED, ("ann",)), sender_id="admin")
    await lifecycle.expire(some.id)
    assert counts(await lifecycle.stats(some.id)) == dict(
        targeted=1, delivered=0, read=0, failed=0, pending=0, cancelled=0, expired=1
    )
