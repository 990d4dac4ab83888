"""The embedded default starts quietly: its listeners' partition assignments (the one member takes all ten
partitions of each topic) are logged at DEBUG, not as three long INFO lines; on Kafka they stay INFO."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest
from pydantic import SecretStr

from broadcast.core.ports.log import TopicPartition
from broadcast.core.settings import DatabaseSettings, Settings
from broadcast.runtime.app import create_app
from consumers.container import _spans
from tests.faults.harness import last_assignment


async def test_the_embedded_default_logs_partition_assignments_at_debug_only(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = Settings(database=DatabaseSettings(url=SecretStr(f"sqlite+aiosqlite:///{tmp_path}/b.db")))
    assert settings.embedded
    app = create_app(settings)
    with caplog.at_level(logging.DEBUG, logger="consumers.container"):
        async with app.router.lifespan_context(app):
            for _ in range(200):
                if sum("assigned" in r.getMessage() for r in caplog.records) >= 3:
                    break
                await asyncio.sleep(0.05)
    assignments = [r for r in caplog.records if "assigned" in r.getMessage()]
    assert len(assignments) >= 3, "the delivery and dead-letter listeners never logged their assignment"
    assert {r.levelno for r in assignments} == {logging.DEBUG}, [r.getMessage() for r in assignments]
    assert all(len(r.getMessage()) < 200 for r in assignments), [r.getMessage() for r in assignments]


def test_partitions_are_logged_as_ranges_per_topic() -> None:
    parts = [TopicPartition("a", p) for p in (0, 1, 2, 3, 7, 9)] + [TopicPartition("b", 5)]
    assert _spans(frozenset(parts)) == "a[0-3,7,9] b[5]"
    assert _spans(frozenset()) == "no partitions"


def test_the_fault_harness_reads_back_what_the_container_logs(tmp_path: Path) -> None:
    """The fault suite finds each instance's partitions in its log: the two must keep agreeing."""
    parts = frozenset(TopicPartition("p.broadcast-user-service-selected", p) for p in (0, 1, 2, 5, 9))
    log = tmp_path / "server.log"
    log.write_text(f"listener delivery-selected member 0: assigned {_spans(parts)}\n")
    assert last_assignment(log) == {0, 1, 2, 5, 9}
