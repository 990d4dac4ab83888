"""Shared values and types of the contract suites."""

from __future__ import annotations

from broadcast.core.ports.log import EventLog

PARTITIONS = 3
PRESENCE_TTL_S = 1.0


class LogUnderTest:
    """An event log plus the concrete topic names a test may use."""

    def __init__(self, log: EventLog, topics: list[str]) -> None:
        self.log = log
        self.topics = topics
