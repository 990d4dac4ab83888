"""The SQL ``InboxStore``: what each user has, has missed and has read.

SELECTED messages are the user's ``user_broadcast_messages`` rows (fan-out on write). ALL/ROLE messages
are the ACTIVE group broadcasts matching the user's roles (fan-out on read); a row for them is written
only when the user reads one. A message is visible while its broadcast is ACTIVE and not past expiry.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import BigInteger, String, and_, bindparam, column, func, or_, select, text, tuple_, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from broadcast.adapters.sql.engine import DriverStatement, driver_read, read_all, translate
from broadcast.adapters.sql.rows import broadcast_from_row, columns_of
from broadcast.adapters.sql.stores import dialect_insert, utc
from broadcast.adapters.sql.tables import broadcast_messages, group_reach, user_broadcast_messages, user_numbers
from broadcast.core.coalesce import Batched, FreshRead
from broadcast.core.domain import Broadcast, BroadcastStatus, DeliveryStatus, InboxItem, ReadStatus, TargetType
from broadcast.core.ports.stores import GroupPage
from broadcast.core.reach import ReachRow

GROUP_TYPES = (TargetType.ALL.value, TargetType.ROLE.value)
GROUP_SCAN_LIMIT = 1_000  # the newest visible group broadcasts one query looks at; past it, a page is incomplete
USERS_PER_QUERY = 500
ROWS_CHUNK = 500  # (broadcast id, user id) pairs per lookup
# A resume also replays the rows delivered since its cursor's row was created, less this margin for the
# clocks of different instances (``selected_after``); the client drops the ones it has by their SSE id.
DELIVERED_OVERLAP = timedelta(seconds=5)
MARK_CHUNK = 500  # rows per upsert: 7 parameters each, under SQLite's and asyncpg's parameter limits

b = broadcast_messages.c
u = user_broadcast_messages.c


def _visible(now: datetime) -> Any:
    return and_(b.status == BroadcastStatus.ACTIVE.value, or_(b.expires_at.is_(None), b.expires_at > now))


def matches(broadcast: Broadcast, roles: frozenset[str]) -> bool:
    """Whether a group broadcast targets a user holding ``roles``."""
    return broadcast.target_type is TargetType.ALL or bool(roles.intersection(broadcast.target_roles))


async def _numbers(conn: AsyncConnection, user_ids: Sequence[str]) -> dict[str, int]:
    found: dict[str, int] = {}
    for start in range(0, len(user_ids), ROWS_CHUNK):
        query = select(user_numbers.c.user_id, user_numbers.c.number)
        rows = await conn.execute(query.where(user_numbers.c.user_id.in_(user_ids[start : start + ROWS_CHUNK])))
        found.update({r.user_id: int(r.number) for r in rows})
    return found


async def _lookup(
    conn: AsyncConnection, pairs: Sequence[tuple[str, str]], read_only: bool = False
) -> dict[tuple[str, str], int]:
    """The ids of the existing rows of ``pairs`` (``read_only``: of those that are READ): on PostgreSQL a
    join with the two unnested arrays (one index probe per pair, two parameters whatever the count); on
    SQLite a row-value ``IN``."""
    found: dict[tuple[str, str], int] = {}
    for start in range(0, len(pairs), ROWS_CHUNK):
        chunk = pairs[start : start + ROWS_CHUNK]
        if conn.dialect.name == "postgresql":  # on the driver: no BEGIN/ROLLBACK around it outside a transaction
            statement = _PG_LOOKUP_READ_DRIVER if read_only else _PG_LOOKUP_DRIVER
            rows = await statement.fetch(conn, {"b": [p[0] for p in chunk], "u": [p[1] for p in chunk]})
        else:
            query = select(u.broadcast_id, u.user_id, u.id).where(tuple_(u.broadcast_id, u.user_id).in_(chunk))
            if read_only:
                query = query.where(u.read_status == ReadStatus.READ.value)
            rows = list((await conn.execute(query)).all())
        found.update({(r[0], r[1]): int(r[2]) for r in rows})
    return found


_PG_LOOKUP = (
    "SELECT m.broadcast_id, m.user_id, m.id FROM user_broadcast_messages m"
    " JOIN unnest(CAST(:b AS varchar[]), CAST(:u AS varchar[])) AS t(b, u)"
    " ON m.broadcast_id = t.b AND m.user_id = t.u"
)
_PG_LOOKUP_DRIVER = DriverStatement.of(text(_PG_LOOKUP))
_PG_LOOKUP_READ_DRIVER = DriverStatement.of(text(_PG_LOOKUP + f" WHERE m.read_status = '{ReadStatus.READ.value}'"))


_PG_MARK_DELIVERED = text("""
UPDATE user_broadcast_messages AS m
SET delivery_status = :delivered, delivered_at = :now, updated_at = :now
FROM unnest(CAST(:b AS varchar[]), CAST(:u AS varchar[])) AS t(b, u)
WHERE m.broadcast_id = t.b AND m.user_id = t.u AND m.delivery_status = :pending
""")


_BROADCAST_COLUMNS = ", ".join(f"b.{c.name}" for c in broadcast_messages.c)
# The newest PENDING rows of each of many users (at most :n each): one index walk per user (user_id, id).
# (S608: the column names come from the table model; every value is bound)
_PG_PENDING_MANY = text(f"""
SELECT t.user_id AS row_user, p.*
FROM unnest(CAST(:users AS varchar[])) AS t(user_id)
CROSS JOIN LATERAL (
    SELECT {_BROADCAST_COLUMNS}, u.id AS row_id, u.read_status
    FROM user_broadcast_messages u JOIN broadcast_messages b ON b.id = u.broadcast_id
    WHERE u.user_id = t.user_id AND u.delivery_status = :pending AND b.target_type = :selected
      AND b.status = :active AND (b.expires_at IS NULL OR b.expires_at > :now)
    ORDER BY u.id DESC
    LIMIT :n
) AS p
""")  # noqa: S608
_PG_PENDING_MANY_DRIVER = DriverStatement.of(_PG_PENDING_MANY)
# The newest visible group broadcasts (after :since): ``_newest_group`` on the driver, read at every batch of
# connects and resumes.
_PG_NEWEST_GROUP = f"""
SELECT {_BROADCAST_COLUMNS} FROM broadcast_messages b
WHERE b.status = :active AND (b.expires_at IS NULL OR b.expires_at > :now)
  AND b.target_type IN ('{TargetType.ALL.value}', '{TargetType.ROLE.value}'){{since}}
ORDER BY b.created_at DESC, b.id DESC
LIMIT :n
"""  # noqa: S608
# When each of many (row id, user id) rows was written: the moments of a batch of resumes' ``s<row>`` cursors.
_PG_ROW_MOMENTS = DriverStatement.of(
    text(
        "SELECT m.id, m.user_id, m.created_at FROM user_broadcast_messages m"
        " JOIN unnest(CAST(:ids AS bigint[]), CAST(:users AS varchar[])) AS t(id, u) ON m.id = t.id AND m.user_id = t.u"
    )
)
_PG_NEWEST_GROUP_DRIVER = DriverStatement.of(text(_PG_NEWEST_GROUP.format(since="")))
_PG_NEWEST_GROUP_SINCE_DRIVER = DriverStatement.of(text(_PG_NEWEST_GROUP.format(since=" AND b.created_at > :since")))


# A resume's SELECTED rows for each of many (user, cursor row, cursor moment): see ``selected_after``.
_PG_AFTER_MANY = text(f"""
SELECT t.ord, p.*
FROM unnest(CAST(:users AS varchar[]), CAST(:rows AS bigint[]), CAST(:sinces AS timestamptz[]))
    WITH ORDINALITY AS t(user_id, row_id, since, ord)
CROSS JOIN LATERAL (
    SELECT {_BROADCAST_COLUMNS}, u.id AS row_id, u.read_status
    FROM user_broadcast_messages u JOIN broadcast_messages b ON b.id = u.broadcast_id
    WHERE u.user_id = t.user_id AND u.delivery_status <> :failed AND b.target_type = :selected
      AND b.status = :active AND (b.expires_at IS NULL OR b.expires_at > :now) AND u.id <> t.row_id
      AND (CASE WHEN t.row_id > 0 THEN u.id > t.row_id ELSE u.created_at > t.since END
           OR u.delivery_status = :pending OR u.delivered_at >= t.since - CAST(:overlap AS interval))
    ORDER BY u.id
    LIMIT :n
) AS p
ORDER BY t.ord, p.row_id
""").columns(  # noqa: S608
    column("ord", BigInteger()), *broadcast_messages.c, column("row_id", BigInteger()), column("read_status", String())
)
AfterKey = tuple[str, int, datetime, int]  # user, cursor row (0: none), cursor moment, limit
SinceKey = tuple[str, frozenset[str], datetime, int]  # user, roles, since, limit


class SqlInboxStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._active_group = FreshRead(self._read_active_group)  # many connects at once: one query
        # many connects at once: one PENDING query, and one read-marks query, for all of them
        self._pending_batch: Batched[tuple[str, int], list[InboxItem]] = Batched(self._pending_batched)
        self._unread_batch: Batched[tuple[str, frozenset[str], int], GroupPage] = Batched(self._unread_batched)
        # many resumes at once: one statement for their SELECTED rows, one scan for their group broadcasts
        self._after_batch: Batched[AfterKey, list[InboxItem]] = Batched(self._selected_after_batched)
        self._since_batch: Batched[SinceKey, GroupPage] = Batched(self._since_batched)
        self._moment_batch: Batched[tuple[str, int], datetime | None] = Batched(self._row_moments)

    async def _read_active_group(self) -> list[Broadcast]:
        return await self._newest_group(None)

    async def _newest_group(self, since: datetime | None) -> list[Broadcast]:
        """The newest visible group broadcasts (after ``since``), newest first: at most one more than
        ``GROUP_SCAN_LIMIT``, so that a caller can tell the scan left older ones out."""
        now = datetime.now(UTC)
        if self._engine.dialect.name == "postgresql":
            params = {"active": BroadcastStatus.ACTIVE.value, "now": now, "since": since, "n": GROUP_SCAN_LIMIT + 1}
            statement = _PG_NEWEST_GROUP_DRIVER if since is None else _PG_NEWEST_GROUP_SINCE_DRIVER
            return [broadcast_from_row(r) for r in await driver_read(self._engine, statement, params)]
        query = select(broadcast_messages).where(_visible(now), b.target_type.in_(GROUP_TYPES))
        if since is not None:
            query = query.where(b.created_at > since)
        newest_first = query.order_by(b.created_at.desc(), b.id.desc()).limit(GROUP_SCAN_LIMIT + 1)
        return [broadcast_from_row(r) for r in await read_all(self._engine, newest_first)]

    def _selected(self, user_id: str, now: datetime) -> Any:
        """The user's SELECTED rows of visible broadcasts, except FAILED ones: a delivery that went to the
        dead-letter topic is not shown, replayed or listed until an admin redrives it (row back to PENDING)."""
        return (
            select(broadcast_messages, u.id.label("row_id"), u.read_status)
            .join(user_broadcast_messages, u.broadcast_id == b.id)
            .where(
                u.user_id == user_id,
                b.target_type == TargetType.SELECTED.value,
                u.delivery_status != DeliveryStatus.FAILED.value,
                _visible(now),
            )
        )

    @staticmethod
    def _items(rows: Sequence[Any]) -> list[InboxItem]:
        return [
            InboxItem(broadcast_from_row(m), m["row_id"], m["read_status"] == ReadStatus.READ.value)
            for m in map(columns_of, rows)
        ]

    async def row_for(self, broadcast_id: str, user_id: str) -> int:
        """The user's row for a broadcast, created PENDING if missing (idempotent)."""
        return (await self.rows_for([(broadcast_id, user_id)]))[(broadcast_id, user_id)]

    async def rows_for(self, pairs: Sequence[tuple[str, str]]) -> dict[tuple[str, str], int]:
        """The rows of (broadcast id, user id) ``pairs``: one lookup per ``ROWS_CHUNK`` pairs, then, only when
        some are missing (a SELECTED broadcast writes its recipients' rows when it is created), one
        transaction that inserts those PENDING (a concurrent insert wins quietly) and looks them up."""
        wanted = list(dict.fromkeys(pairs))
        try:
            async with self._engine.connect() as conn:
                found = await _lookup(conn, wanted)
            missing = [pair for pair in wanted if pair not in found]
            if missing:
                now = datetime.now(UTC)
                rows = [
                    {
                        "broadcast_id": broadcast_id,
                        "user_id": user_id,
                        "delivery_status": DeliveryStatus.PENDING.value,
                        "read_status": ReadStatus.UNREAD.value,
                        "created_at": now,
                        "updated_at": now,
                    }
                    for broadcast_id, user_id in missing
                ]
                async with self._engine.begin() as conn:
                    await conn.execute(dialect_insert(conn)(user_broadcast_messages).on_conflict_do_nothing(), rows)
                    found.update(await _lookup(conn, missing))
        except (SQLAlchemyError, OSError) as exc:
            raise translate(exc) from exc
        return found

    async def pending(self, user_id: str, limit: int) -> list[InboxItem]:
        """The user's newest ``limit`` PENDING rows, oldest first; on PostgreSQL, concurrent callers share
        one query (``pending_many``)."""
        if self._engine.dialect.name == "postgresql":
            return await self._pending_batch.get((user_id, limit))
        return await self._pending_one(user_id, limit)

    async def _pending_batched(self, keys: list[tuple[str, int]]) -> dict[tuple[str, int], list[InboxItem]]:
        found: dict[tuple[str, int], list[InboxItem]] = {}
        for limit in {n for _, n in keys}:
            pending = await self.pending_many([user_id for user_id, n in keys if n == limit], limit)
            found.update({(user_id, limit): items for user_id, items in pending.items()})
        return found

    async def _pending_one(self, user_id: str, limit: int) -> list[InboxItem]:
        now = datetime.now(UTC)
        query = self._selected(user_id, now).where(u.delivery_status == DeliveryStatus.PENDING.value)
        return self._items(await read_all(self._engine, query.order_by(u.id.desc()).limit(limit)))[::-1]

    async def pending_many(self, user_ids: Sequence[str], limit: int) -> dict[str, list[InboxItem]]:
        """``pending`` for many users at once (a storm of connects): one statement on PostgreSQL."""
        wanted = list(dict.fromkeys(user_ids))
        if self._engine.dialect.name != "postgresql":
            return {user_id: await self._pending_one(user_id, limit) for user_id in wanted}
        params = {
            "users": wanted,
            "n": limit,
            "now": datetime.now(UTC),
            "pending": DeliveryStatus.PENDING.value,
            "selected": TargetType.SELECTED.value,
            "active": BroadcastStatus.ACTIVE.value,
        }
        rows = await driver_read(self._engine, _PG_PENDING_MANY_DRIVER, params)
        found: dict[str, list[InboxItem]] = {user_id: [] for user_id in wanted}
        for row, item in zip(rows, self._items(rows), strict=True):
            found[row["row_user"]].append(item)
        return {user_id: items[::-1] for user_id, items in found.items()}  # oldest first

    async def _unread_batched(
        self, keys: list[tuple[str, frozenset[str], int]]
    ) -> dict[tuple[str, frozenset[str], int], GroupPage]:
        found: dict[tuple[str, frozenset[str], int], GroupPage] = {}
        for limit in {n for _, _, n in keys}:
            pages = await self.unread_group_many({user_id: roles for user_id, roles, n in keys if n == limit}, limit)
            found.update({key: pages[key[0]] for key in keys if key[2] == limit})
        return found

    async def unread_group_many(self, users: Mapping[str, frozenset[str]], limit: int) -> dict[str, GroupPage]:
        """``group(user, roles, None, limit)`` for many users at once: the shared scan of visible group
        broadcasts, and one query for which of them each user has read."""
        scanned = await self._active_group.get()
        complete = len(scanned) <= GROUP_SCAN_LIMIT
        visible = scanned[:GROUP_SCAN_LIMIT]
        mine = {user_id: [c for c in visible if matches(c, roles)] for user_id, roles in users.items()}
        read = await self._read_pairs([(c.id, user_id) for user_id, cs in mine.items() for c in cs])
        pages: dict[str, GroupPage] = {}
        for user_id, candidates in mine.items():
            wanted = [InboxItem(c, None, False) for c in candidates if (c.id, user_id) not in read]
            pages[user_id] = GroupPage(wanted[:limit][::-1], complete and len(wanted) <= limit)
        return pages

    async def _read_pairs(self, pairs: Sequence[tuple[str, str]]) -> set[tuple[str, str]]:
        """Which (broadcast id, user id) pairs are read."""
        if not pairs:
            return set()
        try:
            async with self._engine.connect() as conn:
                rows = await _lookup(conn, pairs, read_only=True)
        except (SQLAlchemyError, OSError) as exc:
            raise translate(exc) from exc
        return set(rows)

    async def pending_for(self, user_ids: Sequence[str], limit: int) -> list[tuple[str, InboxItem]]:
        found: list[tuple[str, InboxItem]] = []
        now = datetime.now(UTC)
        for start in range(0, len(user_ids), USERS_PER_QUERY):
            chunk = list(user_ids[start : start + USERS_PER_QUERY])
            query = (
                select(broadcast_messages, u.id.label("row_id"), u.read_status, u.user_id.label("row_user"))
                .join(user_broadcast_messages, u.broadcast_id == b.id)
                .where(
                    u.user_id.in_(chunk),
                    u.delivery_status == DeliveryStatus.PENDING.value,
                    b.target_type == TargetType.SELECTED.value,
                    _visible(now),
                )
                .order_by(u.id)
                .limit(limit - len(found))
            )
            rows = await read_all(self._engine, query)
            found.extend(zip((r.row_user for r in rows), self._items(rows), strict=True))
            if len(found) >= limit:
                break
        return found

    async def selected_after(self, user_id: str, row_id: int, since: datetime, limit: int) -> list[InboxItem]:
        """A resume's SELECTED rows, in row order: after the cursor's row ``row_id`` (0: created after
        ``since``), every PENDING row, and every row delivered since ``since`` (the cursor's moment: its row's
        creation, or a group cursor's time), less ``DELIVERED_OVERLAP``; never the cursor's own row.

        Row ids do not give a user's delivery order: a priority-class row (HIGH, URGENT) overtakes the bulk
        rows written before it. A tab that saw the urgent row and then dropped must still get the older bulk
        row another tab was shown meanwhile (no longer PENDING, below the cursor): that is the third part.
        Such a row was shown after the urgent one, so marked after the urgent one was created; the overlap
        covers clocks of different instances."""
        if self._engine.dialect.name == "postgresql":  # concurrent resumes share one statement
            return await self._after_batch.get((user_id, row_id, since, limit))
        return await self._selected_after_one(user_id, row_id, since, limit)

    async def _selected_after_one(self, user_id: str, row_id: int, since: datetime, limit: int) -> list[InboxItem]:
        now = datetime.now(UTC)
        newer = u.id > row_id if row_id else u.created_at > since
        pending = u.delivery_status == DeliveryStatus.PENDING.value
        later = u.delivered_at >= since - DELIVERED_OVERLAP
        # never the cursor's own row: the client has it, even while its delivery mark is still on its way
        query = self._selected(user_id, now).where(u.id != row_id, or_(newer, pending, later))
        return self._items(await read_all(self._engine, query.order_by(u.id).limit(limit)))

    async def _selected_after_batched(self, keys: list[AfterKey]) -> dict[AfterKey, list[InboxItem]]:
        """``selected_after`` for every resume of a batch: one LATERAL statement per distinct limit."""
        found: dict[AfterKey, list[InboxItem]] = {}
        for limit in {key[3] for key in keys}:
            batch = [key for key in keys if key[3] == limit]
            params = {
                "users": [k[0] for k in batch],
                "rows": [k[1] for k in batch],
                "sinces": [k[2] for k in batch],
                "n": limit,
                "overlap": DELIVERED_OVERLAP,
                "now": datetime.now(UTC),
                "pending": DeliveryStatus.PENDING.value,
                "failed": DeliveryStatus.FAILED.value,
                "selected": TargetType.SELECTED.value,
                "active": BroadcastStatus.ACTIVE.value,
            }
            rows = await read_all(self._engine, _PG_AFTER_MANY.bindparams(**params))
            items: dict[int, list[InboxItem]] = {k: [] for k in range(len(batch))}
            for row, item in zip(rows, self._items(rows), strict=True):
                items[row.ord - 1].append(item)
            found.update({key: items[k] for k, key in enumerate(batch)})
        return found

    async def row_created_at(self, user_id: str, row_id: int) -> datetime | None:
        """When the user's row ``row_id`` was written (None if it is not this user's); on PostgreSQL,
        concurrent resumes share one query."""
        if self._engine.dialect.name == "postgresql":
            return await self._moment_batch.get((user_id, row_id))
        rows = await read_all(self._engine, select(u.created_at).where(u.id == row_id, u.user_id == user_id))
        return utc(rows[0].created_at) if rows else None

    async def _row_moments(self, keys: list[tuple[str, int]]) -> dict[tuple[str, int], datetime | None]:
        found: dict[tuple[str, int], datetime | None] = dict.fromkeys(keys)
        for start in range(0, len(keys), ROWS_CHUNK):
            chunk = keys[start : start + ROWS_CHUNK]
            params = {"ids": [row_id for _, row_id in chunk], "users": [user_id for user_id, _ in chunk]}
            for row_id, user_id, created_at in await driver_read(self._engine, _PG_ROW_MOMENTS, params):
                found[(user_id, row_id)] = utc(created_at)
        return found

    async def max_row_id(self, user_id: str) -> int:
        rows = await read_all(self._engine, select(func.max(u.id)).where(u.user_id == user_id))
        return int(rows[0][0] or 0)

    async def group(self, user_id: str, roles: frozenset[str], since: datetime | None, limit: int) -> GroupPage:
        """Visible ALL/ROLE broadcasts for the user: created after ``since``, or the unread ones; the newest
        ``limit``, oldest first. Incomplete when more matched, or the scan reached ``GROUP_SCAN_LIMIT``."""
        if since is None:
            return await self._unread_batch.get((user_id, roles, limit))
        return await self._since_batch.get((user_id, roles, since, limit))

    async def _since_batched(self, keys: list[SinceKey]) -> dict[SinceKey, GroupPage]:
        """``group(…, since, …)`` for every resume of a batch: one scan since the oldest ``since`` of them,
        each key taking the part after its own (a key older than a truncated scan reaches gets a scan of its
        own), and one lookup of what they read."""
        shared = await self._newest_group(min(key[2] for key in keys))
        kept = shared[:GROUP_SCAN_LIMIT]
        truncated = len(shared) > GROUP_SCAN_LIMIT
        scans: dict[SinceKey, tuple[list[Broadcast], bool]] = {}
        for key in keys:
            since = key[2]
            if not truncated or since >= kept[-1].created_at:
                scans[key] = ([c for c in kept if c.created_at > since], True)
            else:  # rare: a cursor older than the newest GROUP_SCAN_LIMIT of the batch's scan
                own = await self._newest_group(since)
                scans[key] = (own[:GROUP_SCAN_LIMIT], len(own) <= GROUP_SCAN_LIMIT)
        mine = {key: [c for c in scans[key][0] if matches(c, key[1])] for key in keys}
        read = await self._read_pairs([(c.id, key[0]) for key in keys for c in mine[key]])
        pages: dict[SinceKey, GroupPage] = {}
        for key in keys:
            wanted = [InboxItem(c, None, (c.id, key[0]) in read) for c in mine[key]]
            pages[key] = GroupPage(wanted[: key[3]][::-1], scans[key][1] and len(wanted) <= key[3])
        return pages

    async def _read_ids(self, user_id: str, broadcast_ids: Sequence[str]) -> set[str]:
        if not broadcast_ids:
            return set()
        query = select(u.broadcast_id).where(
            u.user_id == user_id, u.broadcast_id.in_(list(broadcast_ids)), u.read_status == ReadStatus.READ.value
        )
        return {r.broadcast_id for r in await read_all(self._engine, query)}

    async def inbox(self, user_id: str, roles: frozenset[str]) -> list[InboxItem]:
        """Everything visible to the user, newest first (SELECTED rows and matching group broadcasts)."""
        now = datetime.now(UTC)
        selected = self._items(
            await read_all(self._engine, self._selected(user_id, now).order_by(u.id.desc()).limit(500))
        )
        query = select(broadcast_messages).where(_visible(now), b.target_type.in_(GROUP_TYPES))
        group = [
            broadcast_from_row(r) for r in await read_all(self._engine, query.order_by(b.created_at.desc()).limit(500))
        ]
        mine = [g for g in group if matches(g, roles)]
        read = await self._read_ids(user_id, [g.id for g in mine])
        items = selected + [InboxItem(g, None, g.id in read) for g in mine]
        return sorted(items, key=lambda i: (i.broadcast.created_at, i.broadcast.id), reverse=True)

    async def mark_read(self, user_id: str, roles: frozenset[str], broadcast_ids: Sequence[str]) -> list[str]:
        """Mark the user's own messages read; returns the ids that were not read before.

        A SELECTED broadcast counts only where the user has a row (is a recipient); a group broadcast only
        when it targets the user (its row is created here). Any other id changes nothing.
        """
        now = datetime.now(UTC)
        newly: list[str] = []
        try:
            async with self._engine.begin() as conn:
                query = select(broadcast_messages).where(b.id.in_(list(broadcast_ids)), _visible(now))
                for broadcast in [broadcast_from_row(r) for r in await conn.execute(query)]:
                    if broadcast.target_type is not TargetType.SELECTED:
                        if not matches(broadcast, roles):
                            continue
                        await conn.execute(
                            dialect_insert(conn)(user_broadcast_messages)
                            .values(
                                broadcast_id=broadcast.id,
                                user_id=user_id,
                                delivery_status=DeliveryStatus.DELIVERED.value,
                                read_status=ReadStatus.UNREAD.value,
                                delivered_at=now,
                                created_at=now,
                                updated_at=now,
                            )
                            .on_conflict_do_nothing()
                        )
                    result = await conn.execute(
                        update(user_broadcast_messages)
                        .where(
                            u.broadcast_id == broadcast.id, u.user_id == user_id, u.read_status != ReadStatus.READ.value
                        )
                        .values(read_status=ReadStatus.READ.value, read_at=now, updated_at=now)
                    )
                    if result.rowcount:
                        newly.append(broadcast.id)
        except (SQLAlchemyError, OSError) as exc:
            raise translate(exc) from exc
        return newly

    async def pending_count(self) -> int:
        query = (
            select(func.count())
            .select_from(user_broadcast_messages)
            .where(u.delivery_status == DeliveryStatus.PENDING.value)
        )
        return int((await read_all(self._engine, query))[0][0])

    async def mark_delivered(self, pairs: Sequence[tuple[str, str]]) -> int:
        """(broadcast id, user id) pairs of SELECTED rows written to a live stream: PENDING → DELIVERED; a pair
        without a row changes nothing (group broadcasts have none: their deliveries are tallied, ``save_reach``),
        nor does a repeat. One statement per ``MARK_CHUNK`` pairs; returns how many rows changed."""
        if not pairs:
            return 0
        now = datetime.now(UTC)
        if self._engine.dialect.name == "postgresql":
            return await self._mark_delivered_pg(sorted(dict.fromkeys(pairs)), now)
        statement = (
            update(user_broadcast_messages)
            .where(
                u.broadcast_id == bindparam("b"),
                u.user_id == bindparam("u"),
                u.delivery_status == DeliveryStatus.PENDING.value,
            )
            .values(delivery_status=DeliveryStatus.DELIVERED.value, delivered_at=now, updated_at=now)
        )
        done = 0
        try:
            async with self._engine.begin() as conn:
                for broadcast_id, user_id in sorted(dict.fromkeys(pairs)):
                    done += (await conn.execute(statement, {"b": broadcast_id, "u": user_id})).rowcount
        except (SQLAlchemyError, OSError) as exc:
            raise translate(exc) from exc
        return done

    async def user_numbers(self, user_ids: Sequence[str]) -> dict[str, int]:
        """Each user's number (``broadcast/core/reach.py``), assigned on first use: a lookup, and for the users
        without one an insert (a concurrent insert wins quietly) and a second lookup."""
        wanted = list(dict.fromkeys(user_ids))
        try:
            async with self._engine.connect() as conn:
                found = await _numbers(conn, wanted)
            missing = sorted(set(wanted) - found.keys())
            if missing:
                async with self._engine.begin() as conn:
                    insert = dialect_insert(conn)(user_numbers).on_conflict_do_nothing()
                    for start in range(0, len(missing), ROWS_CHUNK):
                        await conn.execute(insert, [{"user_id": m} for m in missing[start : start + ROWS_CHUNK]])
                    found.update(await _numbers(conn, missing))
        except (SQLAlchemyError, OSError) as exc:
            raise translate(exc) from exc
        return found

    async def save_reach(self, rows: Sequence[ReachRow]) -> int:
        """Store tallies (each replaces its earlier version); one of a broadcast that no longer exists is
        left out. Returns how many were stored."""
        if not rows:
            return 0
        try:
            try:
                await self._save_reach(rows)
                return len(rows)
            except IntegrityError:  # a broadcast deleted since: store the others
                saved = 0
                for row in rows:
                    with contextlib.suppress(IntegrityError):
                        await self._save_reach([row])
                        saved += 1
                return saved
        except (SQLAlchemyError, OSError) as exc:
            raise translate(exc) from exc

    async def _save_reach(self, rows: Sequence[ReachRow]) -> None:
        now = datetime.now(UTC)
        async with self._engine.begin() as conn:
            statement = dialect_insert(conn)(group_reach)
            upsert = statement.on_conflict_do_update(
                index_elements=[group_reach.c.broadcast_id, group_reach.c.tally],
                set_={"users": statement.excluded.users, "reached": statement.excluded.reached, "updated_at": now},
            )
            fields = ("broadcast_id", "tally", "users", "reached")
            values = [{**{f: getattr(r, f) for f in fields}, "updated_at": now} for r in rows]
            await conn.execute(upsert, values)

    async def _mark_delivered_pg(self, pairs: Sequence[tuple[str, str]], now: datetime) -> int:
        """One statement with two array parameters, whatever the count: its plan is prepared once per
        session, where a multi-row ``VALUES`` of each new length is compiled and planned anew."""
        try:
            async with self._engine.begin() as conn:
                result = await conn.execute(
                    _PG_MARK_DELIVERED,
                    {
                        "b": [p[0] for p in pairs],
                        "u": [p[1] for p in pairs],
                        "now": now,
                        "delivered": DeliveryStatus.DELIVERED.value,
                        "unread": ReadStatus.UNREAD.value,
                        "pending": DeliveryStatus.PENDING.value,
                    },
                )
                return int(result.rowcount)
        except (SQLAlchemyError, OSError) as exc:
            raise translate(exc) from exc
