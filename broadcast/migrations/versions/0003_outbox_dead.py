"""The outbox's dead state: rows the event log refuses for good (too large, corrupt) leave their lane.

``outbox_events.poison_attempts`` counts refusals of the record itself (not broker outages); after
``relay.poison_attempts`` of them the row moves to ``outbox_dead``, where admins list, redrive or purge it.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _ts(name: str, *, nullable: bool = True, default_now: bool = False) -> sa.Column[object]:
    return sa.Column(
        name, sa.DateTime(timezone=True), nullable=nullable, server_default=sa.func.now() if default_now else None
    )


def upgrade() -> None:
    with op.batch_alter_table("outbox_events") as batch:
        batch.add_column(sa.Column("poison_attempts", sa.Integer(), nullable=False, server_default="0"))
    op.create_table(
        "outbox_dead",
        sa.Column("id", BigId, nullable=False, autoincrement=True),
        sa.Column("outbox_id", sa.BigInteger(), nullable=False),
        sa.Column("topic", sa.String(255), nullable=False),
        sa.Column("partition_key", sa.String(255), nullable=False),
        sa.Column("event_type", sa.String(16), nullable=False),
        sa.Column("payload", sa.LargeBinary(), nullable=False),
        sa.Column("headers", sa.JSON(), nullable=False),
        sa.Column("broadcast_id", sa.String(36), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        _ts("created_at", nullable=False),
        _ts("dead_at", nullable=False, default_now=True),
        sa.PrimaryKeyConstraint("id", name="pk_outbox_dead"),
    )


def downgrade() -> None:
    op.drop_table("outbox_dead")
    with op.batch_alter_table("outbox_events") as batch:
        batch.drop_column("poison_attempts")
