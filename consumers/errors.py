"""The error-handler seam of the listener container (Spring's ``CommonErrorHandler``).

When a handler raises, the container asks its ``ErrorHandler`` what to do with the record and obeys:

- ``ErrorOutcome.RETRY``: the container seeks the partition back to the failed record, drops the rest of
  that partition's fetched batch and commits nothing past it, so the record is fetched and handled again
  before anything after it (per-key order holds). The container does the seek itself, so an error handler
  cannot ask for a retry and forget to rewind.
- ``ErrorOutcome.SKIP``: the record counts as handled — the handler recovered it (logged it, or published
  it to a dead-letter topic) — and the container commits past it.

The container counts the attempts (1 on the first failure of a record; it starts again when another
offset of the partition fails or the record is handled), so error handlers stay stateless.

``LoggingErrorHandler`` is the temporary default: bounded retries with a short backoff, then an ERROR log
and a skip. The DLT issue replaces it with ``DefaultErrorHandler`` + ``DeadLetterPublishingRecoverer``
(exponential backoff with paused partitions, dead letters with Spring's headers) behind this same seam.
"""

from __future__ import annotations

import asyncio
import logging
from enum import StrEnum
from typing import Protocol

from broadcast.errors import ValidationError
from broadcast.ports import EventRecord

log = logging.getLogger(__name__)


class ErrorOutcome(StrEnum):
    """What the container does with a record whose handler raised."""

    RETRY = "RETRY"
    SKIP = "SKIP"


class ErrorHandler(Protocol):
    """Decides the fate of a failed record; may await (backoff, publishing a dead letter).

    ``attempt`` is how many times this record has failed in a row on this member, counting this one.
    An exception raised here is logged and treated as ``RETRY``: a record is never skipped by accident.
    """

    async def handle(self, record: EventRecord, exc: Exception, attempt: int) -> ErrorOutcome: ...


class LoggingErrorHandler:
    """Retry a failed record up to ``max_attempts`` deliveries, then log it at ERROR and skip it.

    Exceptions of a ``not_retryable`` type (by default ``ValidationError``: the same input fails the same
    way) are skipped on the first failure. Before each retry it sleeps ``backoff_s * 2**(attempt-1)``,
    capped at ``max_backoff_s``; the sleep holds the member's other partitions, so both stay small (the
    defaults cost at most 0.3 s per poison record) — long backoffs need paused partitions, which is the
    DLT issue's ``DefaultErrorHandler``. Until then a skipped record exists only in this log line.
    """

    def __init__(
        self,
        max_attempts: int = 3,
        backoff_s: float = 0.1,
        max_backoff_s: float = 1.0,
        not_retryable: tuple[type[Exception], ...] = (ValidationError,),
    ) -> None:
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        self.max_attempts = max_attempts
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.not_retryable = not_retryable

    async def handle(self, record: EventRecord, exc: Exception, attempt: int) -> ErrorOutcome:
        where = f"{record.topic}-{record.partition}@{record.offset}"
        if isinstance(exc, self.not_retryable) or attempt >= self.max_attempts:
            reason = "not retryable" if isinstance(exc, self.not_retryable) else f"failed {attempt} times"
            log.error("skipping record %s (%s): %r", where, reason, exc, exc_info=exc)
            return ErrorOutcome.SKIP
        delay = min(self.backoff_s * 2 ** (attempt - 1), self.max_backoff_s)
        log.warning(
            "record %s failed (attempt %d of %d), retrying in %.2f s: %r", where, attempt, self.max_attempts, delay, exc
        )
        await asyncio.sleep(delay)
        return ErrorOutcome.RETRY
