"""The SQL inbox on both dialects: the reconciler's one-query sweep of PENDING rows for many users."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from unittest import mock

import pytest

from broadcast.adapters.sql import inbox as sql_inbox
from broadcast.adapters.sql import migrate as sql_migrate
from broadcast.adapters.sql.broadcasts import SqlBroadcastStore
from broadcast.adapters.sql.inbox import SqlInboxStore
from broadcast.adapters.sql.stores import SqlUserStore
from broadcast.core.domain import NewBroadcast, Priority, TargetType
from broadcast.core.reach import Reach
from broadcast.core.settings import KafkaSettings, LimitsSettings
from broadcast.errors import RejectedByDatabaseError
from broadcast.lifecycle.service import Lifecycle
from sse.fanout import DeliveredMarker
from sse.frames import Cursor, micros
from sse.messages import item_frame
from sse.stream import TOO_MANY, UNKNOWN_CURSOR, bounded, catch_up, outgoing
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


async def test_deliveries_and_reads_count_for_selected_and_group_broadcasts_alike(
    stores: tuple[Lifecycle, SqlInboxStore],
) -> None:
    lifecycle, inbox = stores
    everyone, _ = await lifecycle.create(NewBroadcast("to all", TargetType.ALL), sender_id="admin")
    chosen, _ = await lifecycle.create(NewBroadcast("to two", TargetType.SELECTED, ("alice", "bob")), sender_id="admin")

    # two instances wrote the ALL broadcast to streams: alice has a tab on each (and two on the first)
    first, second = DeliveredMarker(inbox, 1.0, reach=Reach("i1")), DeliveredMarker(inbox, 1.0, reach=Reach("i2"))
    for marker, user in ((first, "alice"), (first, "alice"), (first, "bob"), (second, "alice")):
        marker.add(everyone.id, user, group=True)
    first.add(chosen.id, "alice")
    await first.flush()
    await second.flush()
    assert first.marked == 1, "the SELECTED row went PENDING -> DELIVERED"
    assert await inbox.mark_delivered([(chosen.id, "alice"), (everyone.id, "alice")]) == 0, (
        "marking again changes nothing; a group broadcast has no row to mark"
    )
    assert (await lifecycle.stats(everyone.id)).delivered == 2, "alice counts once, across tabs and instances"
    assert (await lifecycle.deliveries(everyone.id, None, 10)).items == (), "and no row per user was written"

    assert sorted(await inbox.mark_read("alice", frozenset(), [everyone.id, chosen.id])) == sorted(
        [everyone.id, chosen.id]
    )
    assert await inbox.mark_read("carol", frozenset(), [everyone.id]) == [everyone.id], "read without a delivery"
    assert await inbox.mark_read("carol", frozenset(), [chosen.id]) == [], "not a recipient: nothing to mark"
    ops, _ = await lifecycle.create(NewBroadcast("to ops", TargetType.ROLE, ("ops",)), sender_id="admin")
    assert await inbox.mark_read("carol", frozenset({"dev"}), [ops.id]) == [], "not in the role"
    assert await inbox.mark_read("carol", frozenset({"ops"}), [ops.id]) == [ops.id]

    group = await lifecycle.stats(everyone.id)
    assert (group.delivered, group.read) == (3, 2), "alice and bob got it; carol read it, so she got it too"
    assert [d.user_id for d in (await lifecycle.deliveries(everyone.id, None, 10)).items] == ["alice", "carol"], (
        "a group broadcast's rows are its readers'"
    )
    selected = await lifecycle.stats(chosen.id)
    assert (selected.delivered, selected.read) == (1, 1)

    second.add(everyone.id, "dave", group=True)  # a later delivery grows the same tally, saved whole again
    await second.flush()
    assert (await lifecycle.stats(everyone.id)).delivered == 4

    shown = [i.broadcast.id for i in await inbox.inbox("alice", frozenset())]
    assert sorted(shown) == sorted([everyone.id, chosen.id]), "a read or delivered ALL broadcast is listed once"
    assert [item.broadcast.id for item in await inbox.pending("bob", 10)] == [chosen.id], "group rows never pend"


async def test_user_numbers_are_stable_and_a_tally_of_a_deleted_broadcast_is_left_out(
    stores: tuple[Lifecycle, SqlInboxStore],
) -> None:
    lifecycle, inbox = stores
    numbers = await inbox.user_numbers(["alice", "bob", "alice"])
    assert sorted(numbers) == ["alice", "bob"] and len(set(numbers.values())) == 2
    assert await inbox.user_numbers(["bob", "carol"]) == {"bob": numbers["bob"], "carol": mock.ANY}
    everyone, _ = await lifecycle.create(NewBroadcast("to all", TargetType.ALL), sender_id="admin")
    reach = Reach("i1")
    reach.add(everyone.id, ["alice"], numbers)
    reach.add("no-such-broadcast", ["bob"], numbers)
    assert await inbox.save_reach(reach.dirty()) == 1
    assert (await lifecycle.stats(everyone.id)).delivered == 1


# ----------------------------------------------------------------- catch-up past the limits (invariant 3)


async def all_broadcasts(lifecycle: Lifecycle, count: int, label: str) -> list[str]:
    ids = []
    for n in range(count):
        created, _ = await lifecycle.create(NewBroadcast(f"{label} {n}", TargetType.ALL), sender_id="admin")
        ids.append(created.id)
    return ids


async def test_past_the_group_scan_a_new_user_gets_the_newest_and_a_resync(
    stores: tuple[Lifecycle, SqlInboxStore],
) -> None:
    """1,050 active ALL broadcasts, more than the store scans (1,000): a brand-new user's stream must carry
    the newest ones, and RESYNC to say the rest is in the inbox; a resume after missing them all too."""
    lifecycle, inbox = stores
    (seen,) = await all_broadcasts(lifecycle, 1, "seen")
    seen_at = (await lifecycle.get(seen)).created_at
    ids = await all_broadcasts(lifecycle, sql_inbox.GROUP_SCAN_LIMIT + 50, "missed")

    items, resync = await catch_up(inbox, "newbie", frozenset(), None, 1_000)
    sent = [i.broadcast.id for i in items]
    assert sent == ids[-1_000:], "the newest 1,000, in creation order"
    assert resync == TOO_MANY, "the stream cannot send everything: it must say so"

    cursor = Cursor(group_micros=micros(seen_at)).format()
    items, resync = await catch_up(inbox, "back", frozenset(), cursor, 1_000)
    assert [i.broadcast.id for i in items] == ids[-1_000:], "a resume after missing 1,050 gets the newest"
    assert resync == TOO_MANY


async def test_a_catch_up_is_bounded_to_the_newest_and_says_when_it_left_some_out(
    stores: tuple[Lifecycle, SqlInboxStore],
) -> None:
    lifecycle, inbox = stores
    selected = []
    for n in range(4):
        created, _ = await lifecycle.create(NewBroadcast(f"s{n}", TargetType.SELECTED, ("alice",)), sender_id="admin")
        selected.append(created.id)
    group = await all_broadcasts(lifecycle, 4, "g")
    everything = selected + group  # created in this order

    items, resync = await catch_up(inbox, "alice", frozenset(), None, 8)
    assert ([i.broadcast.id for i in items], resync) == (everything, None), "within the limit: all, no RESYNC"

    items, resync = await catch_up(inbox, "alice", frozenset(), None, 5)
    assert [i.broadcast.id for i in items] == everything[-5:] and resync == TOO_MANY
    assert [i.broadcast.id for i in await inbox.pending("alice", 2)] == selected[-2:], "newest PENDING rows"

    frames, trimmed = bounded(items, "alice", len(item_frame(items[-1])) + len(item_frame(items[-2])))
    assert trimmed and len(frames) == 2 and frames[-1].broadcast_id == everything[-1], "bytes bound keeps the newest"
    assert bounded(items[:1], "alice", 1_024) == ([outgoing(items[0], "alice")], False)

    first, _ = await catch_up(inbox, "alice", frozenset(), None, 8)
    cursor = Cursor(row_id=first[0].row_id).format()
    await inbox.mark_delivered([(i, "alice") for i in selected])
    items, resync = await catch_up(inbox, "alice", frozenset(), cursor, 3)
    assert resync == TOO_MANY and [i.broadcast.id for i in items] == group[-3:], "resume past the limit: newest"


@pytest.mark.parametrize("overlap_s", [0, 5])
async def test_a_tab_resuming_after_an_urgent_message_still_gets_the_older_bulk_one_another_tab_was_shown(
    stores: tuple[Lifecycle, SqlInboxStore], monkeypatch: pytest.MonkeyPatch, overlap_s: int
) -> None:
    """Priority lanes (issue 20) let an URGENT row overtake an older bulk row of the same user. Tab B is shown
    the urgent row, drops; tab A is then shown the bulk row (DELIVERED, below B's cursor). B's resume must
    still carry it: no silent gap. A row delivered before the cursor's row was created is not replayed
    (overlap 0), nor is the cursor's own row."""
    monkeypatch.setattr(sql_inbox, "DELIVERED_OVERLAP", timedelta(seconds=overlap_s))
    lifecycle, inbox = stores
    seen, _ = await lifecycle.create(NewBroadcast("seen", TargetType.SELECTED, ("alice",)), sender_id="admin")
    await inbox.mark_delivered([(seen.id, "alice")])  # both tabs had this one before
    await asyncio.sleep(0.01)
    bulk, _ = await lifecycle.create(NewBroadcast("bulk", TargetType.SELECTED, ("alice",)), sender_id="admin")
    urgent_request = NewBroadcast("urgent", TargetType.SELECTED, ("alice",), priority=Priority.URGENT)
    urgent, _ = await lifecycle.create(urgent_request, sender_id="admin")
    await inbox.mark_delivered([(urgent.id, "alice")])  # tab B is shown the urgent one, then drops
    [urgent_row] = [i.row_id for i in await inbox.inbox("alice", frozenset()) if i.broadcast.id == urgent.id]
    await inbox.mark_delivered([(bulk.id, "alice")])  # tab A is shown the bulk one meanwhile

    items, resync = await catch_up(inbox, "alice", frozenset(), Cursor(row_id=urgent_row).format(), 100)
    ids = [i.broadcast.id for i in items]
    assert resync is None and bulk.id in ids, "the bulk row tab B never saw"
    if overlap_s == 0:
        assert ids == [bulk.id], "neither the cursor's own row nor one delivered before it was created"


async def test_a_resume_leaves_out_the_cursors_own_row_even_before_its_delivery_mark_lands(
    stores: tuple[Lifecycle, SqlInboxStore],
) -> None:
    """Delivery marks are written in batches, after the frame went out. A tab that got a row, dropped and
    resumed with that row's id before the mark was written must not be shown the row again: the client
    holds whatever its cursor names, PENDING or not."""
    lifecycle, inbox = stores
    shown, _ = await lifecycle.create(NewBroadcast("shown", TargetType.SELECTED, ("alice",)), sender_id="admin")
    [row] = [i.row_id for i in await inbox.pending("alice", 10)]  # written to the stream, mark not yet flushed
    missed, _ = await lifecycle.create(NewBroadcast("missed", TargetType.SELECTED, ("alice",)), sender_id="admin")
    items, resync = await catch_up(inbox, "alice", frozenset(), Cursor(row_id=row).format(), 100)
    assert (resync, [i.broadcast.id for i in items]) == (None, [missed.id]), f"{shown.id} is the cursor's own row"


@pytest.mark.parametrize("scan_limit", [1_000, 3])
async def test_concurrent_resumes_share_their_reads_and_each_gets_what_it_alone_would(
    stores: tuple[Lifecycle, SqlInboxStore], monkeypatch: pytest.MonkeyPatch, scan_limit: int
) -> None:
    """A reconnect storm: resumes from different cursors are answered by one statement and one scan
    (PostgreSQL), each key taking its own part; with a scan shorter than the storm's span (scan_limit 3), the
    cursors it does not reach fall back to a scan of their own. Same answers as one resume at a time."""
    monkeypatch.setattr(sql_inbox, "GROUP_SCAN_LIMIT", scan_limit)
    lifecycle, inbox = stores
    moments, rows = [], {}
    for n in range(6):
        group, _ = await lifecycle.create(NewBroadcast(f"all {n}", TargetType.ALL), sender_id="admin")
        moments.append((await lifecycle.get(group.id)).created_at)
        for user in ("ann", "bob", "cid")[: n % 3 + 1]:
            chosen, _ = await lifecycle.create(NewBroadcast(f"{user} {n}", TargetType.SELECTED, (user,)), sender_id="a")
            rows[(user, n)] = (await inbox.rows_for([(chosen.id, user)]))[(chosen.id, user)]
        await asyncio.sleep(0.002)
    await inbox.mark_delivered([(b.id, "ann") for b in (await lifecycle.list_broadcasts(None, None, 100)).items])
    await inbox.mark_read("bob", frozenset(), [(await lifecycle.list_broadcasts(None, None, 100)).items[-1].id])
    cursors = [
        ("ann", Cursor(row_id=rows[("ann", 1)]).format()),
        ("bob", Cursor(group_micros=micros(moments[2])).format()),
        ("cid", Cursor(row_id=rows[("cid", 2)]).format()),
        ("bob", Cursor(group_micros=micros(moments[0])).format()),
        ("ann", None),
        ("cid", "not-a-cursor"),
        ("bob", Cursor(row_id=rows[("ann", 1)]).format()),  # another user's row: not a position of bob's
    ]
    alone = [await catch_up(inbox, user, frozenset(), cursor, 4) for user, cursor in cursors]
    together = await asyncio.gather(*(catch_up(inbox, user, frozenset(), cursor, 4) for user, cursor in cursors))
    assert together == alone
    assert any(items for items, _ in alone) and any(resync for _, resync in alone)
    assert alone[-1][1] == UNKNOWN_CURSOR


async def test_rows_of_many_pairs_come_back_and_only_missing_ones_are_created(
    stores: tuple[Lifecycle, SqlInboxStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    lifecycle, inbox = stores
    first, _ = await lifecycle.create(NewBroadcast("one", TargetType.SELECTED, ("alice", "bob")), sender_id="admin")
    second, _ = await lifecycle.create(NewBroadcast("two", TargetType.ALL), sender_id="admin")
    await inbox.mark_delivered([(first.id, "alice")])
    before = {(u, i.broadcast.id): i.row_id for u, i in await inbox.pending_for(["bob"], 10)}

    monkeypatch.setattr(sql_inbox, "ROWS_CHUNK", 2)  # several lookups: the result is the same
    pairs = [(first.id, "alice"), (first.id, "bob"), (second.id, "carol"), (first.id, "bob"), (first.id, "dave")]
    rows = await inbox.rows_for(pairs)

    assert set(rows) == set(pairs), "every pair asked about, repeats once"
    assert rows[(first.id, "bob")] == before[("bob", first.id)], "an existing row keeps its id"
    assert len(set(rows.values())) == 4, "one row per pair"
    assert rows == {pair: await inbox.row_for(*pair) for pair in pairs}, "the same as asking one by one"
    assert await inbox.rows_for(pairs) == rows, "asking again creates nothing"
    pending = {(u, i.broadcast.id) for u, i in await inbox.pending_for(["alice", "bob", "dave"], 10)}
    assert pending == {("bob", first.id), ("dave", first.id)}, "a created row is PENDING, a delivered one stays so"
    assert await inbox.rows_for([]) == {}


async def test_rows_for_an_unknown_broadcast_are_refused_and_none_of_the_batch_is_created(
    stores: tuple[Lifecycle, SqlInboxStore],
) -> None:
    lifecycle, inbox = stores
    known, _ = await lifecycle.create(NewBroadcast("one", TargetType.SELECTED, ("alice",)), sender_id="admin")
    with pytest.raises(RejectedByDatabaseError):
        await inbox.rows_for([(known.id, "bob"), ("00000000-0000-0000-0000-000000000000", "bob")])
    assert await inbox.pending_for(["bob"], 10) == [], "bob's row for the known broadcast was not created either"
