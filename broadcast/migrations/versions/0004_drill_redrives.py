"""Fault drills that also fail redriven records: rehearse a redrive of a record that still fails.

``fault_drills.fail_redrives``: false for every drill armed before (a redriven record never failed then).

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("fault_drills") as batch:
        batch.add_column(sa.Column("fail_redrives", sa.Boolean(), nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("fault_drills") as batch:
        batch.drop_column("fail_redrives")
