"""Alembic migrations; applied by ``broadcast-server migrate`` (and by ``run`` in embedded mode)."""
