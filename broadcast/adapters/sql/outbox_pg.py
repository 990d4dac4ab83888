"""The relay's two statements on PostgreSQL: a round's claim and its finish, one round trip each.

Through SQLAlchemy each was a transaction (``BEGIN``, two statements, ``COMMIT``: four round trips). Under
load every round trip waits one turn of an event loop busy with requests (tens of ms each), so a round's
eight became most of a targeted message's latency. Here each is one statement (data-modifying CTEs are
atomic on their own) run on the driver (``sql_engine.DriverStatement``). SQLite keeps the transactions
(``SqlOutboxStore``).

CLAIM locks free lanes that have due rows (``FOR UPDATE SKIP LOCKED``: a lane another relay is claiming
is skipped, not waited for), leases them, and reads each one's oldest ``lim`` due rows (one index range per
lane, ``ix_outbox_events_unpublished``). A claimed lane comes back even when no row of it is due any more
(a NULL row): the caller releases it. The statement reads one snapshot, taken before it locks: a row that
another relay marked published after that is read again only when that relay's lease had run out, the
case in which the transaction form also published it twice (at least once; consumers are idempotent).

Whether a lane has a due row is ``min(id)`` of its own range of that index, probed for the class's lanes
only: PostgreSQL plans a ``min`` under equality on the leading column as one index probe whatever its
statistics say. Written as ``EXISTS`` (and as a ``LIMIT 1`` subquery), the plan the relay's connection kept
(made while the table was young: "about one unpublished row") was one scan of a whole partial index, every
lane's entries. While a 1M-recipient CSV upload's transaction COPYs its rows into the normal lanes, those
entries are invisible yet visited: each priority claim took 0.5-2.5 s (auto_explain: one index scan, no
index condition, 155k buffers), and URGENT messages waited 2-5 s behind a bulk they have no lane in
(``tests/integration/test_outbox_claim.py``).

FINISH marks the acknowledged rows published and gives the lanes back, atomically, as ``finish`` did.
"""

from __future__ import annotations

from sqlalchemy import text

from broadcast.adapters.sql.engine import DriverStatement

CLAIM = DriverStatement.of(
    text("""
WITH free AS (
    SELECT l.lane FROM outbox_lanes l
    CROSS JOIN LATERAL (  -- the lane's oldest due row: one probe of its own range of (lane, id)
        SELECT min(o.id) AS first FROM outbox_events o
        WHERE o.lane = l.lane AND o.published_at IS NULL AND (o.not_before IS NULL OR o.not_before <= :now)
    ) due
    WHERE due.first IS NOT NULL AND (l.owner IS NULL OR l.lease_until < :now OR l.owner = :owner)
      AND (CAST(:among AS smallint[]) IS NULL OR l.lane = ANY(CAST(:among AS smallint[])))
    ORDER BY l.lease_until ASC NULLS FIRST, l.lane
    LIMIT :max_lanes
    FOR UPDATE OF l SKIP LOCKED
), claimed AS (
    UPDATE outbox_lanes SET owner = :owner, lease_until = :until
    WHERE lane IN (SELECT lane FROM free)
    RETURNING lane
)
SELECT r.lane, r.id, r.topic, r.partition_key, r.event_type, r.payload, r.headers, r.broadcast_id, r.not_before,
       r.created_at, r.attempts, r.poison_attempts, c.lane AS claimed_lane  -- sql_stores._claimed reads by position
FROM claimed c
LEFT JOIN LATERAL (
    SELECT o.lane, o.id, o.topic, o.partition_key, o.event_type, o.payload, CAST(o.headers AS text) AS headers,
           o.broadcast_id, o.not_before, o.created_at, o.attempts, o.poison_attempts
    FROM outbox_events o
    WHERE o.lane = c.lane AND o.published_at IS NULL AND (o.not_before IS NULL OR o.not_before <= :now)
    ORDER BY o.id
    LIMIT :lim
) r ON true
""")
)

FINISH = DriverStatement.of(
    text("""
WITH marked AS (  -- run to completion whether or not the main statement reads it (PostgreSQL's rule)
    UPDATE outbox_events SET published_at = :now WHERE id = ANY(CAST(:ids AS bigint[]))
)
UPDATE outbox_lanes SET owner = NULL, lease_until = :now
WHERE lane = ANY(CAST(:lanes AS smallint[])) AND owner = :owner
""")
)
