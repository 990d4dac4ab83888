"""Dead letters: the original record's timestamp, the admin audit trail, and fault drills.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _ts(name: str, *, nullable: bool = True, default_now: bool = False) -> sa.Column[object]:
    return sa.Column(
        name, sa.DateTime(timezone=True), nullable=nullable, server_default=sa.func.now() if default_now else None
    )


def upgrade() -> None:
    with op.batch_alter_table("dlt_messages") as batch:
        batch.add_column(_ts("original_timestamp"))
        batch.add_column(sa.Column("event_type", sa.String(16), nullable=True))
        batch.create_unique_constraint(
            "uq_dlt_messages_original_record",
            ["consumer_group", "original_topic", "original_partition", "original_offset"],
        )
    op.create_table(
        "dlt_audit",
        sa.Column("id", BigId, nullable=False, autoincrement=True),
        _ts("at", nullable=False, default_now=True),
        sa.Column("actor", sa.String(128), nullable=False),
        sa.Column("action", sa.String(32), nullable=False),
        sa.Column("dlt_message_id", sa.BigInteger(), nullable=True),
        sa.Column("outcome", sa.String(32), nullable=False),
        sa.Column("detail", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_dlt_audit"),
    )
    op.create_index("ix_dlt_audit_dlt_message_id", "dlt_audit", ["dlt_message_id"])
    op.create_table(
        "fault_drills",
        sa.Column("id", BigId, nullable=False, autoincrement=True),
        sa.Column("broadcast_id", sa.String(36), nullable=True),
        sa.Column("armed_by", sa.String(128), nullable=False),
        _ts("armed_at", nullable=False, default_now=True),
        _ts("expires_at", nullable=False),
        _ts("bound_at"),
        sa.PrimaryKeyConstraint("id", name="pk_fault_drills"),
    )
    op.create_index("ix_fault_drills_broadcast_id", "fault_drills", ["broadcast_id"])


def downgrade() -> None:
    op.drop_table("fault_drills")
    op.drop_table("dlt_audit")
    with op.batch_alter_table("dlt_messages") as batch:
        batch.drop_constraint("uq_dlt_messages_original_record", type_="unique")
        batch.drop_column("event_type")
        batch.drop_column("original_timestamp")
