"""Initial schema: users and roles, broadcasts, per-user rows, outbox, dead letters, statistics.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

# Frozen here on purpose: changing the number of lanes needs a migration of its own.
OUTBOX_LANES = 32

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _ts(name: str, *, nullable: bool = True, default_now: bool = False) -> sa.Column[object]:
    return sa.Column(
        name, sa.DateTime(timezone=True), nullable=nullable, server_default=sa.func.now() if default_now else None
    )


def upgrade() -> None:
    op.create_table(
        "users",
        sa.Column("id", sa.String(128), nullable=False),
        sa.Column("display_name", sa.String(200), nullable=False, server_default=""),
        _ts("created_at", nullable=False, default_now=True),
        _ts("updated_at", nullable=False, default_now=True),
        sa.PrimaryKeyConstraint("id", name="pk_users"),
    )
    op.create_table(
        "user_roles",
        sa.Column("user_id", sa.String(128), nullable=False),
        sa.Column("role", sa.String(64), nullable=False),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], name="fk_user_roles_user_id_users", ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("user_id", "role", name="pk_user_roles"),
    )
    op.create_index("ix_user_roles_role_user_id", "user_roles", ["role", "user_id"])
    op.create_table(
        "broadcast_messages",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("sender_id", sa.String(128), nullable=False),
        sa.Column("content", sa.Text(), nullable=False),
        sa.Column("target_type", sa.String(16), nullable=False),
        sa.Column("target_roles", sa.JSON(), nullable=False),
        sa.Column("priority", sa.String(16), nullable=False),
        sa.Column("category", sa.String(100), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("fire_and_forget", sa.Boolean(), nullable=False, server_default="0"),
        sa.Column("targeted_count", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("idempotency_key", sa.String(200), nullable=True),
        sa.Column("request_hash", sa.String(64), nullable=True),
        sa.Column("correlation_id", sa.String(200), nullable=True),
        _ts("scheduled_at"),
        _ts("expires_at"),
        _ts("created_at", nullable=False, default_now=True),
        _ts("updated_at", nullable=False, default_now=True),
        sa.PrimaryKeyConstraint("id", name="pk_broadcast_messages"),
        sa.UniqueConstraint("idempotency_key", name="uq_broadcast_messages_idempotency_key"),
    )
    for cols in (["status", "created_at"], ["status", "scheduled_at"], ["status", "expires_at"]):
        op.create_index(f"ix_broadcast_messages_{'_'.join(cols)}", "broadcast_messages", cols)
    op.create_table(
        "user_broadcast_messages",
        sa.Column("id", BigId, nullable=False, autoincrement=True),
        sa.Column("broadcast_id", sa.String(36), nullable=False),
        sa.Column("user_id", sa.String(128), nullable=False),
        sa.Column("delivery_status", sa.String(16), nullable=False),
        sa.Column("read_status", sa.String(16), nullable=False, server_default="UNREAD"),
        _ts("delivered_at"),
        _ts("read_at"),
        _ts("created_at", nullable=False, default_now=True),
        _ts("updated_at", nullable=False, default_now=True),
        sa.ForeignKeyConstraint(
            ["broadcast_id"],
            ["broadcast_messages.id"],
            name="fk_user_broadcast_messages_broadcast_id_broadcast_messages",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name="pk_user_broadcast_messages"),
        sa.UniqueConstraint("broadcast_id", "user_id", name="uq_user_broadcast_messages_broadcast_id_user_id"),
    )
    op.create_index("ix_user_broadcast_messages_user_id_id", "user_broadcast_messages", ["user_id", "id"])
    op.create_table(
        "outbox_events",
        sa.Column("id", BigId, nullable=False, autoincrement=True),
        sa.Column("lane", sa.SmallInteger(), nullable=False),
        sa.Column("topic", sa.String(255), nullable=False),
        sa.Column("partition_key", sa.String(255), nullable=False),
        sa.Column("event_type", sa.String(16), nullable=False),
        sa.Column("payload", sa.LargeBinary(), nullable=False),
        sa.Column("headers", sa.JSON(), nullable=False),
        sa.Column("broadcast_id", sa.String(36), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("last_error", sa.Text(), nullable=True),
        _ts("not_before"),
        _ts("published_at"),
        _ts("created_at", nullable=False, default_now=True),
        sa.PrimaryKeyConstraint("id", name="pk_outbox_events"),
    )
    unpublished = sa.text("published_at IS NULL")
    op.create_index(
        "ix_outbox_events_unpublished",
        "outbox_events",
        ["lane", "id"],
        postgresql_where=unpublished,
        sqlite_where=unpublished,
    )
    op.create_index(
        "ix_outbox_events_broadcast_unpublished",
        "outbox_events",
        ["broadcast_id"],
        postgresql_where=unpublished,
        sqlite_where=unpublished,
    )
    published = sa.text("published_at IS NOT NULL")
    op.create_index(
        "ix_outbox_events_published",
        "outbox_events",
        ["published_at"],
        postgresql_where=published,
        sqlite_where=published,
    )
    lanes = op.create_table(
        "outbox_lanes",
        sa.Column("lane", sa.SmallInteger(), nullable=False, autoincrement=False),
        sa.Column("owner", sa.String(200), nullable=True),
        _ts("lease_until"),
        sa.PrimaryKeyConstraint("lane", name="pk_outbox_lanes"),
    )
    op.bulk_insert(lanes, [{"lane": lane} for lane in range(OUTBOX_LANES)])
    op.create_table(
        "dlt_messages",
        sa.Column("id", BigId, nullable=False, autoincrement=True),
        sa.Column("dlt_topic", sa.String(255), nullable=False),
        sa.Column("dlt_partition", sa.Integer(), nullable=False),
        sa.Column("dlt_offset", sa.BigInteger(), nullable=False),
        sa.Column("original_topic", sa.String(255), nullable=False),
        sa.Column("original_partition", sa.Integer(), nullable=True),
        sa.Column("original_offset", sa.BigInteger(), nullable=True),
        sa.Column("record_key", sa.LargeBinary(), nullable=True),
        sa.Column("record_value", sa.LargeBinary(), nullable=True),
        sa.Column("headers", sa.JSON(), nullable=False),
        sa.Column("exception_fqcn", sa.String(255), nullable=True),
        sa.Column("exception_cause_fqcn", sa.String(255), nullable=True),
        sa.Column("exception_message", sa.Text(), nullable=True),
        sa.Column("stacktrace", sa.Text(), nullable=True),
        sa.Column("consumer_group", sa.String(255), nullable=True),
        sa.Column("broadcast_id", sa.String(36), nullable=True),
        sa.Column("user_id", sa.String(128), nullable=True),
        sa.Column("status", sa.String(16), nullable=False, server_default="NEW"),
        _ts("received_at", nullable=False, default_now=True),
        sa.PrimaryKeyConstraint("id", name="pk_dlt_messages"),
        sa.UniqueConstraint(
            "dlt_topic", "dlt_partition", "dlt_offset", name="uq_dlt_messages_dlt_topic_dlt_partition_dlt_offset"
        ),
    )
    for cols in (["original_topic", "received_at"], ["exception_fqcn"], ["broadcast_id"]):
        op.create_index(f"ix_dlt_messages_{'_'.join(cols)}", "dlt_messages", cols)
    op.create_table(
        "broadcast_statistics",
        sa.Column("broadcast_id", sa.String(36), nullable=False),
        sa.Column("targeted", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("delivered", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("read", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("failed", sa.BigInteger(), nullable=False, server_default="0"),
        _ts("updated_at", nullable=False, default_now=True),
        sa.ForeignKeyConstraint(
            ["broadcast_id"],
            ["broadcast_messages.id"],
            name="fk_broadcast_statistics_broadcast_id_broadcast_messages",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("broadcast_id", name="pk_broadcast_statistics"),
    )


def downgrade() -> None:
    for table in (
        "broadcast_statistics",
        "dlt_messages",
        "outbox_lanes",
        "outbox_events",
        "user_broadcast_messages",
        "broadcast_messages",
        "user_roles",
        "users",
    ):
        op.drop_table(table)
