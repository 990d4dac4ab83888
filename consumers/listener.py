"""A declared listener: what a ``ListenerContainer`` consumes and how it acknowledges (Spring's ``@KafkaListener``).

A listener names its topics, its consumer group, how many group members to run (``concurrency``) and its
ack mode. The handler's shape follows the ack mode, and the type checker sees which one a listener has:

- ``AckMode.RECORD``: ``handler(record)``; the container commits a record's offset once the handler
  returned (coalesced to one commit per partition per fetched batch, never past an unhandled record).
- ``AckMode.MANUAL_IMMEDIATE``: ``acknowledging_handler(record, ack)``; the offset is committed at once
  when the handler awaits ``ack.acknowledge()``, and never otherwise (a record that fails and is skipped
  by the error handler is committed by the container, as Spring does after recovery).
- ``AckMode.BATCH``: ``batch_handler(records)``, a batch listener: the records of one partition fetched
  together, in offset order; the partitions of a fetch are handled concurrently. The handler raises
  ``BatchListenerFailedError(index)`` (``consumers.errors``) to name the record that failed: the records
  before it count as handled, that one is retried or recovered as a record listener's would be, then the
  rest goes on (Spring's ``BatchListenerFailedException``). One commit per fetch, past what was handled.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from broadcast.core.ports.log import EventRecord
from broadcast.errors import ConfigurationError


class AckMode(StrEnum):
    """When the container commits a record's offset (the subset of Spring's ack modes we need)."""

    RECORD = "RECORD"
    MANUAL_IMMEDIATE = "MANUAL_IMMEDIATE"
    BATCH = "BATCH"


class Acknowledgment(Protocol):
    """Handed to a ``MANUAL_IMMEDIATE`` handler with each record.

    ``acknowledge`` commits the offset after this record right away (Kafka offsets are positions: it
    also covers earlier records of the partition that were not acknowledged). A commit that fails — the
    group rebalanced — is logged, not raised: the record is then delivered again, which is safe because
    processing is idempotent.
    """

    async def acknowledge(self) -> None: ...


RecordHandler = Callable[[EventRecord], Awaitable[None]]
AcknowledgingHandler = Callable[[EventRecord, Acknowledgment], Awaitable[None]]
BatchHandler = Callable[[Sequence[EventRecord]], Awaitable[None]]  # the records of one partition, in order


@dataclass(frozen=True)
class Listener:
    """One listener declaration; exactly the handler that matches ``ack_mode`` is set.

    Invariants (checked at construction, ``ConfigurationError`` otherwise): at least one topic,
    ``concurrency >= 1``, ``max_poll_records >= 1``, ``poll_timeout_s > 0``. ``poll_timeout_s`` also bounds
    how long a member takes to notice a stop request while idle.
    """

    name: str
    topics: tuple[str, ...]
    group_id: str
    handler: RecordHandler | None = None
    acknowledging_handler: AcknowledgingHandler | None = None
    batch_handler: BatchHandler | None = None
    ack_mode: AckMode = AckMode.RECORD
    concurrency: int = 1
    max_poll_records: int = 500
    poll_timeout_s: float = 1.0

    def __post_init__(self) -> None:
        problems = []
        if not self.topics:
            problems.append("no topics")
        if self.concurrency < 1:
            problems.append(f"concurrency {self.concurrency} < 1")
        if self.max_poll_records < 1:
            problems.append(f"max_poll_records {self.max_poll_records} < 1")
        if self.poll_timeout_s <= 0:
            problems.append(f"poll_timeout_s {self.poll_timeout_s} <= 0")
        given = {
            name
            for name, handler in (
                ("handler", self.handler),
                ("acknowledging_handler", self.acknowledging_handler),
                ("batch_handler", self.batch_handler),
            )
            if handler is not None
        }
        wanted = {
            AckMode.RECORD: "handler",
            AckMode.MANUAL_IMMEDIATE: "acknowledging_handler",
            AckMode.BATCH: "batch_handler",
        }[self.ack_mode]
        if given != {wanted}:
            problems.append(f"ack mode {self.ack_mode.value} takes `{wanted}` and no other handler")
        if problems:
            raise ConfigurationError(f"listener {self.name!r}: {'; '.join(problems)}")
