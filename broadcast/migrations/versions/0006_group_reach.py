"""Group reach: who an ALL/ROLE broadcast reached, as roaring bitmaps of user numbers (``group_reach``,
``user_numbers``), instead of a DELIVERED row per connected user (DESIGN.md §2). Rows written that way before
this revision still count (the stats add the users holding a row to the bitmaps' union).

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "user_numbers",
        sa.Column("number", sa.Integer(), nullable=False, autoincrement=True),
        sa.Column("user_id", sa.String(128), nullable=False),
        sa.PrimaryKeyConstraint("number", name="pk_user_numbers"),
        sa.UniqueConstraint("user_id", name="uq_user_numbers_user_id"),
    )
    op.create_table(
        "group_reach",
        sa.Column("broadcast_id", sa.String(36), nullable=False),
        sa.Column("tally", sa.String(200), nullable=False),
        sa.Column("users", sa.LargeBinary(), nullable=False),
        sa.Column("reached", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.ForeignKeyConstraint(
            ["broadcast_id"],
            ["broadcast_messages.id"],
            name="fk_group_reach_broadcast_id_broadcast_messages",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("broadcast_id", "tally", name="pk_group_reach"),
    )


def downgrade() -> None:
    op.drop_table("group_reach")
    op.drop_table("user_numbers")
