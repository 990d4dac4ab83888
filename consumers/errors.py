"""Error handling for the listener container: Spring Kafka's ``CommonErrorHandler`` seam and ``DefaultErrorHandler``.

When a handler raises, the container asks its ``ErrorHandler`` what to do with the record and obeys:

- ``Retry(after_s)``: the container seeks the partition back to the failed record and drops the rest of
  that partition's fetched batch, so the record is handled again before anything after it (per-key order
  holds). With ``after_s > 0`` the partition is *paused* until then, while the member keeps fetching its
  other partitions: a long backoff never holds the member past ``max_poll_interval_ms`` and never blocks
  the partitions that are fine.
- ``RECOVERED``: the record was given up on purpose — published to a dead-letter topic, or logged — and
  the container commits past it.

The container counts the attempts (1 on the first failure of a record; it starts again when another
offset of the partition fails or the record is handled), so error handlers stay stateless.

``DefaultErrorHandler`` has Spring's semantics: exponential backoff up to ``max_attempts`` deliveries,
not-retryable exceptions (the same input fails the same way) recovered on the first failure, then the
recoverer. One addition: *transient* exceptions (``UnavailableError``: the database, Redis or Kafka cannot
serve now) are the dependency's fault, not the record's, so they are retried with backoff for as long as
they last and never dead-lettered (a database outage must not flood the DLT). The adapters raise
``RejectedByDatabaseError`` — a ``ValidationError`` — for data the database refuses, so a record that
always fails in the database is not mistaken for an outage and cannot block its partition. The
recoverer (``dlt.recoverer.DeadLetterPublishingRecoverer`` in the server). A recoverer that raises — the
dead-letter topic cannot be written — turns into another retry: a record is never skipped unrecovered.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Final, Protocol

from broadcast.core.ports.log import EventRecord
from broadcast.errors import UnavailableError, ValidationError, fqcn

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Retry:
    """Handle the record again, not before ``after_s`` seconds (its partition is paused meanwhile)."""

    after_s: float = 0.0


@dataclass(frozen=True, slots=True)
class Recovered:
    """The record was recovered (dead-lettered or logged); commit past it."""


RECOVERED: Final = Recovered()
Decision = Retry | Recovered


class BatchListenerFailedError(Exception):
    """Raised by a batch listener (``AckMode.BATCH``) for the record at ``index`` of the batch it was given,
    ``raise BatchListenerFailedError(i) from cause``: the records before it were handled; the error handler
    decides about that record from ``cause`` (Spring's ``BatchListenerFailedException``). Any other
    exception from a batch handler counts as a failure of the batch's first record (nothing was handled)."""

    def __init__(self, index: int, message: str = "") -> None:
        super().__init__(message or f"record {index} of the batch failed")
        self.index = index


class ErrorHandler(Protocol):
    """Decides the fate of a failed record; may await (publishing a dead letter), must not sleep long.

    ``attempt`` is how many times this record has failed in a row on this member, counting this one.
    An exception raised here is logged and treated as a retry: a record is never skipped by accident.
    """

    async def handle(self, record: EventRecord, exc: Exception, attempt: int) -> Decision: ...


Recoverer = Callable[[EventRecord, Exception], Awaitable[None]]
"""Gives a record up for good (Spring's ``ConsumerRecordRecoverer``); raises when it could not."""


def where(record: EventRecord) -> str:
    """``topic-partition@offset``, as records are named in logs."""
    return f"{record.topic}-{record.partition}@{record.offset}"


async def log_and_skip(record: EventRecord, exc: Exception) -> None:
    """The recoverer when there is no dead-letter topic: an ERROR log line is all that is left of the record."""
    log.error("giving up on record %s: %s", where(record), "".join(traceback.format_exception_only(exc)).strip())


@dataclass(frozen=True, slots=True)
class BackOff:
    """Exponential backoff (Spring's ``ExponentialBackOffWithMaxRetries``): ``max_attempts`` deliveries in all.

    The wait after failed attempt ``n`` is ``initial_s * multiplier**(n-1)``, capped at ``max_interval_s``.
    """

    max_attempts: int = 3
    initial_s: float = 1.0
    multiplier: float = 2.0
    max_interval_s: float = 10.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1 or self.initial_s < 0 or self.multiplier < 1 or self.max_interval_s < 0:
            raise ValueError(f"invalid backoff {self}")

    def delay(self, attempt: int) -> float:
        exponent = min(max(attempt - 1, 0), 64)  # past that the cap has long been reached (and no overflow)
        return float(min(self.initial_s * self.multiplier**exponent, self.max_interval_s))


@dataclass
class ErrorCounters:
    """What the error handler did, for metrics and tests: retries scheduled, records recovered by
    exception class, and recoveries that failed (the record was retried instead)."""

    retries: int = 0
    recovered: dict[str, int] = field(default_factory=dict)
    recovery_failures: int = 0


class DefaultErrorHandler:
    """Retry with exponential backoff, then recover; ``not_retryable`` exceptions are recovered at once."""

    def __init__(
        self,
        recoverer: Recoverer = log_and_skip,
        backoff: BackOff | None = None,
        not_retryable: tuple[type[BaseException], ...] = (ValidationError,),
        transient: tuple[type[BaseException], ...] = (UnavailableError,),
    ) -> None:
        self.recoverer = recoverer
        self.backoff = backoff or BackOff()
        self.not_retryable = not_retryable
        self.transient = transient
        self.counters = ErrorCounters()

    def retryable(self, exc: BaseException) -> bool:
        """False for a not-retryable exception, or one raised from (caused by) a not-retryable one."""
        return not _caused_by(exc, self.not_retryable)

    async def handle(self, record: EventRecord, exc: Exception, attempt: int) -> Decision:
        retryable, transient = self.retryable(exc), _caused_by(exc, self.transient)
        if retryable and (attempt < self.backoff.max_attempts or transient):
            delay = self.backoff.delay(attempt)
            self.counters.retries += 1
            log.warning(
                "record %s failed (attempt %d of %d%s), retrying in %.2f s: %r",
                where(record),
                attempt,
                self.backoff.max_attempts,
                ", transient: not counted" if transient else "",
                delay,
                exc,
            )
            return Retry(delay)
        try:
            await self.recoverer(record, exc)
        except Exception as failure:
            self.counters.recovery_failures += 1
            delay = self.backoff.delay(attempt)
            log.error(
                "record %s could not be recovered (%r); it stays uncommitted and is retried in %.2f s",
                where(record),
                failure,
                delay,
            )
            return Retry(delay)
        name = fqcn(exc)
        self.counters.recovered[name] = self.counters.recovered.get(name, 0) + 1
        reason = "not retryable" if not retryable else f"failed {attempt} times"
        log.warning("record %s recovered (%s): %r", where(record), reason, exc)
        return RECOVERED


def _caused_by(exc: BaseException, kinds: tuple[type[BaseException], ...]) -> bool:
    """``exc`` or an exception it was raised from is one of ``kinds``."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, kinds):
            return True
        seen = seen.__cause__
    return False
