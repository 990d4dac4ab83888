"""What admins do with dead letters: redrive (one, or all matching a filter) and purge (one, or all).

Redrive writes the original record back to its original topic *through the outbox* (the relay stays
the only writer of the main topics), in the transaction that moves the letter NEW -> REDRIVEN, so a letter
is redriven at most once however often it is asked (twice -> delivered once). Only valid events headed
for one of our delivery topics are redriven: anything else would fail again or write somewhere it must
not. Purge writes a tombstone with the original key to the letter's DLT partition (so compacting tools
and other readers see it is gone), then deletes the row; the Kafka await happens before, never inside, the
database transaction. Every redrive and purge is audited (who, when, what, outcome).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

from broadcast.core import constants, envelope
from broadcast.core.dead_letters import DeadLetter, DeadLetterFilter, DeadLetterStatus, DeadLetterStore
from broadcast.core.domain import OutboxEvent
from broadcast.core.ports.log import EventPublisher, OutgoingRecord
from broadcast.core.settings import KafkaSettings
from broadcast.errors import NotFoundError, PublishError, UnavailableError, ValidationError
from broadcast.observability.metrics import NO_METRICS, Metrics

BULK_CHUNK = 500
MAX_REPORTED_FAILURES = 1_000


@dataclass
class BulkResult:
    """Totals of a bulk action and the letters it could not handle (id, reason), the first 1,000."""

    matched: int = 0
    done: int = 0
    skipped: int = 0
    failed: int = 0
    failures: list[tuple[int, str]] = field(default_factory=list)

    def fail(self, letter_id: int, reason: str) -> None:
        self.failed += 1
        if len(self.failures) < MAX_REPORTED_FAILURES:
            self.failures.append((letter_id, reason))


class DeadLetterService:
    def __init__(
        self,
        store: DeadLetterStore,
        publisher: EventPublisher,
        kafka: KafkaSettings,
        on_outbox: Callable[[], None] = lambda: None,
        metrics: Metrics = NO_METRICS,
    ) -> None:
        self._redrives = metrics.redrives
        self._store = store
        self._publisher = publisher
        self._targets = {kafka.topic(t) for t in constants.BASE_TOPICS}
        self._on_outbox = on_outbox

    async def letter(self, letter_id: int) -> DeadLetter:
        found = await self._store.get(letter_id)
        if found is None:
            raise NotFoundError(f"dead letter {letter_id} not found")
        return found

    def redrive_event(self, letter: DeadLetter) -> OutboxEvent:
        """The outbox event that puts ``letter`` back on its topic, or ``ValidationError`` saying why not."""
        if letter.original_topic not in self._targets:
            raise ValidationError(f"original topic {letter.original_topic!r} is not a delivery topic")
        try:
            event = envelope.decode(letter.value)
        except ValidationError as exc:
            raise ValidationError(f"not a valid event, it would fail again (purge it instead): {exc}") from exc
        try:
            key = (letter.key or b"").decode()
        except UnicodeDecodeError:
            key = ""
        if not key or len(key) > 255 or "\x00" in key:
            raise ValidationError("the record's key is missing or not a UTF-8 text of at most 255 characters")
        if len(event.broadcast_id) > 36:
            raise ValidationError("the event's broadcastId is not one of this server's ids")
        kept = tuple(
            (k, v)
            for k, v in letter.headers
            if not k.startswith(constants.DLT_HEADER_PREFIX) and k != constants.HEADER_REDRIVEN_FROM
        )
        return OutboxEvent(
            topic=letter.original_topic,
            key=key,
            event_type=event.event_type,
            payload=letter.value or b"",
            headers=(*kept, (constants.HEADER_REDRIVEN_FROM, str(letter.id).encode())),
            broadcast_id=event.broadcast_id,
        )

    async def redrive(self, letter_id: int, actor: str) -> bool:
        """True if redriven now, False if it already was; ``ValidationError`` if it cannot be."""
        letter = await self.letter(letter_id)
        try:
            event = self.redrive_event(letter)
        except ValidationError as exc:
            await self._store.audit(actor, "REDRIVE", letter_id, "REFUSED", {"reason": str(exc)})
            self._redrives.labels("refused").inc()
            raise
        done = await self._store.redrive(letter, event, actor)
        self._redrives.labels("redriven" if done else "already_redriven").inc()
        if done:
            self._on_outbox()
        return done

    async def redrive_all(self, where: DeadLetterFilter, actor: str) -> BulkResult:
        result = BulkResult()
        where = replace(where, status=DeadLetterStatus.NEW)
        after = 0
        while batch := await self._store.batch(where, after, BULK_CHUNK):
            after = batch[-1].id or after
            for letter in batch:
                assert letter.id is not None
                result.matched += 1
                try:
                    event = self.redrive_event(letter)
                except ValidationError as exc:
                    result.fail(letter.id, str(exc))
                    await self._store.audit(actor, "REDRIVE_ALL", letter.id, "REFUSED", {"reason": str(exc)})
                    self._redrives.labels("refused").inc()
                    continue
                try:
                    redriven = await self._store.redrive(letter, event, actor)
                except (ValidationError, UnavailableError) as exc:  # this one fails; the others still go
                    result.fail(letter.id, str(exc))
                    self._redrives.labels("failed").inc()
                    continue
                self._redrives.labels("redriven" if redriven else "already_redriven").inc()
                if redriven:
                    result.done += 1
                else:
                    result.skipped += 1
            self._on_outbox()
        return result

    async def purge(self, letter_id: int, actor: str) -> None:
        letter = await self.letter(letter_id)
        await self._publisher.publish(letter.dlt_topic, letter.key, None, partition=letter.dlt_partition)
        await self._store.delete([letter_id], actor, "PURGE")

    async def purge_all(self, where: DeadLetterFilter, actor: str) -> BulkResult:
        result = BulkResult()
        after = 0
        while batch := await self._store.batch(where, after, BULK_CHUNK):
            after = batch[-1].id or after
            result.matched += len(batch)
            tombstones = [OutgoingRecord(x.dlt_topic, x.key, None, partition=x.dlt_partition) for x in batch]
            outcomes = await self._publisher.publish_many(tombstones)
            written = []
            for letter, outcome in zip(batch, outcomes, strict=True):
                assert letter.id is not None
                if isinstance(outcome, PublishError):
                    result.fail(letter.id, f"tombstone not written: {outcome}")
                else:
                    written.append(letter.id)
            result.done += await self._store.delete(written, actor, "PURGE_ALL")
        return result
