"""The local stack's PostgreSQL runs with the write-load settings of ``devstack/postgres.py``.

With PostgreSQL's defaults a 1M-recipient CSV upload checkpointed every ~12 s and each checkpoint made
the next write of every page log the whole page: URGENT messages committed beside it waited behind that
WAL (bench urgent-under-bulk, p99 5.1 s in the one-process topology; 0.57 s with these settings). The
settings must reach the server on every start, including a data dir made by an older initdb.
"""

from __future__ import annotations

from pydantic import SecretStr
from sqlalchemy import text

from broadcast.adapters.sql.engine import create_engine
from broadcast.core.settings import DatabaseSettings
from devstack.postgres import SERVER_SETTINGS
from devstack.stack import StackInfo


async def test_the_stack_server_runs_with_the_write_load_settings(stack: StackInfo) -> None:
    engine = create_engine(DatabaseSettings(url=SecretStr(stack.postgres_url)))
    try:
        async with engine.connect() as conn:
            shown = {
                name: (await conn.execute(text(f"SHOW {name}"))).scalar_one()  # names are our own constants
                for name in SERVER_SETTINGS
            }
    finally:
        await engine.dispose()
    assert shown == SERVER_SETTINGS
