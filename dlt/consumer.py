"""The DLT consumer: stores each dead letter once and marks the delivery it stands for as failed.

Anything can arrive on a dead-letter topic — it holds the records that broke the delivery consumers —
so reading one never fails on its content: headers are read best-effort, the original bytes are stored
as they are, and the broadcast and user are taken from the value when it is a valid event. Tombstones
(no value and no ``kafka_dlt-original-topic``: what a purge writes) are skipped. Storing is idempotent on
the DLT position, so a record delivered twice is stored once and counted once.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime

from broadcast.core import constants, envelope
from broadcast.core.dead_letters import DeadLetter, DeadLetterStore
from broadcast.core.ports.log import EventRecord
from broadcast.errors import ValidationError
from broadcast.observability.metrics import NO_METRICS, Metrics
from dlt.recoverer import header_int

log = logging.getLogger(__name__)


def _text(raw: bytes | None) -> str | None:
    return None if raw is None else raw.decode("utf-8", errors="replace")


def _name(raw: bytes | None) -> str | None:
    """A header naming something (a class, a group): text of at most 255 characters, None when empty."""
    return (_text(raw) or "")[:255] or None


def read_dead_letter(record: EventRecord) -> DeadLetter | None:
    """The dead letter ``record`` carries, or None for a tombstone."""
    headers: dict[str, bytes] = {}
    for key, value in record.headers:
        headers.setdefault(key, value)  # the first occurrence, as Spring's lastHeader would after stripping
    original_topic = _text(headers.get(constants.DLT_ORIGINAL_TOPIC))
    if record.value is None and original_topic is None:
        return None
    if original_topic is None and record.topic.endswith(constants.DLT_SUFFIX):
        original_topic = record.topic[: -len(constants.DLT_SUFFIX)]
    timestamp = header_int(headers.get(constants.DLT_ORIGINAL_TIMESTAMP))
    try:
        original_time = datetime.fromtimestamp(timestamp / 1000, UTC) if timestamp is not None else None
    except (ValueError, OverflowError, OSError):
        original_time = None
    partition = header_int(headers.get(constants.DLT_ORIGINAL_PARTITION))
    broadcast_id = user_id = event_type = None
    try:
        event = envelope.decode(record.value)
        broadcast_id, user_id, event_type = event.broadcast_id, event.user_id, event.event_type.value
        if len(broadcast_id) > 36 or "\x00" in broadcast_id or (user_id is not None and "\x00" in user_id):
            broadcast_id = user_id = None  # not one of ours: keep the letter, mark nothing
    except ValidationError:
        pass
    return DeadLetter(
        dlt_topic=record.topic,
        dlt_partition=record.partition,
        dlt_offset=record.offset,
        original_topic=(original_topic or record.topic)[:255],
        original_partition=partition if partition is not None and 0 <= partition < 2**31 else None,
        original_offset=header_int(headers.get(constants.DLT_ORIGINAL_OFFSET)),
        original_timestamp=original_time,
        key=record.key,
        value=record.value,
        headers=record.headers,
        exception_fqcn=_name(headers.get(constants.DLT_EXCEPTION_FQCN)),
        exception_cause_fqcn=_name(headers.get(constants.DLT_EXCEPTION_CAUSE_FQCN)),
        exception_message=_text(headers.get(constants.DLT_EXCEPTION_MESSAGE)),
        stacktrace=_text(headers.get(constants.DLT_EXCEPTION_STACKTRACE)),
        consumer_group=_name(headers.get(constants.DLT_ORIGINAL_CONSUMER_GROUP)),
        broadcast_id=broadcast_id,
        user_id=user_id,
        event_type=event_type,
    )


class DeadLetterHandler:
    """The record handler of the DLT listener."""

    def __init__(self, store: DeadLetterStore, metrics: Metrics = NO_METRICS) -> None:
        self._store = store
        self._metrics = metrics
        self.stored = 0

    async def on_record(self, record: EventRecord) -> None:
        letter = read_dead_letter(record)
        if letter is None:
            return
        if await self._store.save(letter):
            self.stored += 1
            self._metrics.dlt_records.labels(record.topic, letter.exception_fqcn or "unknown").inc()
            log.warning(
                "dead letter stored: %s-%d@%d from %s (%s)",
                record.topic,
                record.partition,
                record.offset,
                letter.original_topic,
                letter.exception_fqcn,
            )
