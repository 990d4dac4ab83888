"""Priority lanes: outbox lanes 32-39 hold HIGH and URGENT broadcasts' events, worked by a relay loop of
their own (ARCHITECTURE.md, "Priority lanes").

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

# as of this revision (constants.PRIORITY_LANES may change later; a migration never does)
PRIORITY_LANES = range(32, 40)
outbox_lanes = sa.table("outbox_lanes", sa.column("lane", sa.SmallInteger()))


def upgrade() -> None:
    op.bulk_insert(outbox_lanes, [{"lane": lane} for lane in PRIORITY_LANES])


def downgrade() -> None:
    # rows left in the priority lanes go back to no lane a relay serves; drain them before downgrading
    op.execute(outbox_lanes.delete().where(outbox_lanes.c.lane.in_(list(PRIORITY_LANES))))
