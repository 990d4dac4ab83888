"""SQLAlchemy Core table models; the Alembic migrations create exactly these (a test compares them).

Types are portable between PostgreSQL and SQLite. Timestamps are timezone-aware UTC.
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    SmallInteger,
    String,
    Table,
    Text,
    UniqueConstraint,
    func,
    text,
)

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

UNPUBLISHED = text("published_at IS NULL")
PUBLISHED = text("published_at IS NOT NULL")  # inserts (NULL) skip this index; only the purge uses it

# BIGINT ids on PostgreSQL; INTEGER on SQLite so the column is the auto-incrementing rowid.
BigId = BigInteger().with_variant(Integer(), "sqlite")


def _ts(name: str, *, nullable: bool = True, default_now: bool = False) -> Column[object]:
    return Column(name, DateTime(timezone=True), nullable=nullable, server_default=func.now() if default_now else None)


users = Table(
    "users",
    metadata,
    Column("id", String(128), primary_key=True),
    Column("display_name", String(200), nullable=False, server_default=""),
    _ts("created_at", nullable=False, default_now=True),
    _ts("updated_at", nullable=False, default_now=True),
)

user_roles = Table(
    "user_roles",
    metadata,
    Column("user_id", String(128), ForeignKey("users.id", ondelete="CASCADE"), primary_key=True),
    Column("role", String(64), primary_key=True),
    Index(None, "role", "user_id"),
)

broadcast_messages = Table(
    "broadcast_messages",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("sender_id", String(128), nullable=False),
    Column("content", Text, nullable=False),
    Column("target_type", String(16), nullable=False),
    Column("target_roles", JSON, nullable=False),
    Column("priority", String(16), nullable=False),
    Column("category", String(100), nullable=True),
    Column("status", String(16), nullable=False),
    Column("fire_and_forget", Boolean, nullable=False, server_default="0"),
    Column("targeted_count", BigInteger, nullable=False, server_default="0"),
    Column("idempotency_key", String(200), nullable=True, unique=True),
    Column("request_hash", String(64), nullable=True),
    Column("correlation_id", String(200), nullable=True),
    _ts("scheduled_at"),
    _ts("expires_at"),
    _ts("created_at", nullable=False, default_now=True),
    _ts("updated_at", nullable=False, default_now=True),
    Index(None, "status", "created_at"),
    Index(None, "status", "scheduled_at"),
    Index(None, "status", "expires_at"),
)

user_broadcast_messages = Table(
    "user_broadcast_messages",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("broadcast_id", String(36), ForeignKey("broadcast_messages.id", ondelete="CASCADE"), nullable=False),
    Column("user_id", String(128), nullable=False),
    Column("delivery_status", String(16), nullable=False),
    Column("read_status", String(16), nullable=False, server_default="UNREAD"),
    _ts("delivered_at"),
    _ts("read_at"),
    _ts("created_at", nullable=False, default_now=True),
    _ts("updated_at", nullable=False, default_now=True),
    UniqueConstraint("broadcast_id", "user_id"),  # also serves per-broadcast lookups (stats, deliveries)
    Index(None, "user_id", "id"),  # a user's inbox and pending rows, in order
)

# Who a group (ALL/ROLE) broadcast reached, without a row per user (broadcast/core/reach.py): each user holds a
# small number once, and each process saves, per group broadcast it wrote to streams, a roaring bitmap of
# the numbers of the users it reached, under a tally key of its own (one row per broadcast and process
# lifetime, rewritten as the bitmap grows).
user_numbers = Table(
    "user_numbers",
    metadata,
    Column("number", Integer, primary_key=True, autoincrement=True),
    Column("user_id", String(128), nullable=False, unique=True),
)

group_reach = Table(
    "group_reach",
    metadata,
    Column("broadcast_id", String(36), ForeignKey("broadcast_messages.id", ondelete="CASCADE"), primary_key=True),
    Column("tally", String(200), primary_key=True),
    Column("users", LargeBinary, nullable=False),
    Column("reached", BigInteger, nullable=False),
    _ts("updated_at", nullable=False, default_now=True),
)

outbox_events = Table(
    "outbox_events",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("lane", SmallInteger, nullable=False),
    Column("topic", String(255), nullable=False),
    Column("partition_key", String(255), nullable=False),
    Column("event_type", String(16), nullable=False),
    Column("payload", LargeBinary, nullable=False),
    Column("headers", JSON, nullable=False),
    Column("broadcast_id", String(36), nullable=True),
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("last_error", Text, nullable=True),
    _ts("not_before"),
    _ts("published_at"),
    _ts("created_at", nullable=False, default_now=True),
    # refusals of the record itself (too large, corrupt), not broker outages: past relay.poison_attempts the
    # row moves to outbox_dead
    Column("poison_attempts", Integer, nullable=False, server_default="0"),
    Index("ix_outbox_events_unpublished", "lane", "id", postgresql_where=UNPUBLISHED, sqlite_where=UNPUBLISHED),
    Index(
        "ix_outbox_events_broadcast_unpublished", "broadcast_id", postgresql_where=UNPUBLISHED, sqlite_where=UNPUBLISHED
    ),
    Index("ix_outbox_events_published", "published_at", postgresql_where=PUBLISHED, sqlite_where=PUBLISHED),
)

outbox_lanes = Table(
    "outbox_lanes",
    metadata,
    Column("lane", SmallInteger, primary_key=True, autoincrement=False),
    Column("owner", String(200), nullable=True),
    _ts("lease_until"),
)

outbox_dead = Table(
    "outbox_dead",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("outbox_id", BigInteger, nullable=False),
    Column("topic", String(255), nullable=False),
    Column("partition_key", String(255), nullable=False),
    Column("event_type", String(16), nullable=False),
    Column("payload", LargeBinary, nullable=False),
    Column("headers", JSON, nullable=False),
    Column("broadcast_id", String(36), nullable=True),
    Column("attempts", Integer, nullable=False),
    Column("last_error", Text, nullable=True),
    _ts("created_at", nullable=False),
    _ts("dead_at", nullable=False, default_now=True),
)

dlt_messages = Table(
    "dlt_messages",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("dlt_topic", String(255), nullable=False),
    Column("dlt_partition", Integer, nullable=False),
    Column("dlt_offset", BigInteger, nullable=False),
    Column("original_topic", String(255), nullable=False),
    Column("original_partition", Integer, nullable=True),
    Column("original_offset", BigInteger, nullable=True),
    Column("record_key", LargeBinary, nullable=True),
    Column("record_value", LargeBinary, nullable=True),
    Column("headers", JSON, nullable=False),
    Column("exception_fqcn", String(255), nullable=True),
    Column("exception_cause_fqcn", String(255), nullable=True),
    Column("exception_message", Text, nullable=True),
    Column("stacktrace", Text, nullable=True),
    Column("consumer_group", String(255), nullable=True),
    Column("broadcast_id", String(36), nullable=True),
    Column("user_id", String(128), nullable=True),
    Column("status", String(16), nullable=False, server_default="NEW"),
    _ts("received_at", nullable=False, default_now=True),
    _ts("original_timestamp"),
    Column("event_type", String(16), nullable=True),
    UniqueConstraint("dlt_topic", "dlt_partition", "dlt_offset"),
    # one letter per failed record and group: a dead letter published twice (the commit after the DLT ack
    # failed) is stored once
    UniqueConstraint(
        "consumer_group",
        "original_topic",
        "original_partition",
        "original_offset",
        name="uq_dlt_messages_original_record",
    ),
    Index(None, "original_topic", "received_at"),
    Index(None, "exception_fqcn"),
    Index(None, "broadcast_id"),
)

dlt_audit = Table(
    "dlt_audit",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    _ts("at", nullable=False, default_now=True),
    Column("actor", String(128), nullable=False),
    Column("action", String(32), nullable=False),
    Column("dlt_message_id", BigInteger, nullable=True),
    Column("outcome", String(32), nullable=False),
    Column("detail", JSON, nullable=False),
    Index(None, "dlt_message_id"),
)

fault_drills = Table(
    "fault_drills",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("broadcast_id", String(36), nullable=True),
    Column("armed_by", String(128), nullable=False),
    _ts("armed_at", nullable=False, default_now=True),
    _ts("expires_at", nullable=False),
    _ts("bound_at"),
    Column("fail_redrives", Boolean, nullable=False, server_default="0"),
    Index(None, "broadcast_id"),
)

broadcast_statistics = Table(
    "broadcast_statistics",
    metadata,
    Column("broadcast_id", String(36), ForeignKey("broadcast_messages.id", ondelete="CASCADE"), primary_key=True),
    Column("targeted", BigInteger, nullable=False, server_default="0"),
    Column("delivered", BigInteger, nullable=False, server_default="0"),
    Column("read", BigInteger, nullable=False, server_default="0"),
    Column("failed", BigInteger, nullable=False, server_default="0"),
    _ts("updated_at", nullable=False, default_now=True),
)
