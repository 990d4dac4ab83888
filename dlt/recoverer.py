"""Spring Kafka's ``DeadLetterPublishingRecoverer``: a failed record goes to ``<topic>-dlt``, same partition.

The dead letter carries the original key and value bytes and the original headers, minus any
``kafka_dlt-*`` headers of an earlier failure (a redriven record that fails again gets one fresh set),
plus Spring's headers with Spring's encodings: partition as a 4-byte big-endian int, offset and timestamp
as 8-byte big-endian longs, everything else UTF-8. ``recover`` returns only once the dead-letter topic
acknowledged the record (``acks=all``) and raises ``PublishError`` otherwise; the error handler then
retries the record and the container commits nothing past it.
"""

from __future__ import annotations

import struct
import traceback
from collections.abc import Callable

from broadcast.core import constants
from broadcast.core.ports.log import EventPublisher, EventRecord
from broadcast.errors import PublishError, fqcn
from broadcast.observability.metrics import NO_METRICS, Metrics

MAX_MESSAGE_CHARS = 4_096
MAX_STACKTRACE_CHARS = 32_768


def int_header(value: int) -> bytes:
    return struct.pack(">i", value)


def long_header(value: int) -> bytes:
    return struct.pack(">q", value)


def header_int(raw: bytes | None) -> int | None:
    """A Spring int (4 bytes) or long (8 bytes) header value; None if absent or of another size."""
    if raw is None or len(raw) not in (4, 8):
        return None
    return int(struct.unpack(">i" if len(raw) == 4 else ">q", raw)[0])


def dead_letter_headers(record: EventRecord, exc: BaseException, group_id: str) -> list[tuple[str, bytes]]:
    """The record's own headers (earlier ``kafka_dlt-*`` ones stripped) followed by Spring's for ``exc``."""
    kept = [(k, v) for k, v in record.headers if not k.startswith(constants.DLT_HEADER_PREFIX)]
    stacktrace = "".join(traceback.format_exception(exc))
    added = [
        (constants.DLT_EXCEPTION_FQCN, fqcn(exc).encode()),
        (constants.DLT_EXCEPTION_MESSAGE, str(exc)[:MAX_MESSAGE_CHARS].encode()),
        (constants.DLT_EXCEPTION_STACKTRACE, stacktrace[-MAX_STACKTRACE_CHARS:].encode()),
        (constants.DLT_ORIGINAL_TOPIC, record.topic.encode()),
        (constants.DLT_ORIGINAL_PARTITION, int_header(record.partition)),
        (constants.DLT_ORIGINAL_OFFSET, long_header(record.offset)),
        (constants.DLT_ORIGINAL_TIMESTAMP, long_header(record.timestamp_ms)),
        (constants.DLT_ORIGINAL_TIMESTAMP_TYPE, b"LogAppendTime" if record.log_append_time else b"CreateTime"),
        (constants.DLT_ORIGINAL_CONSUMER_GROUP, group_id.encode()),
    ]
    cause = exc.__cause__
    if cause is not None:
        added.insert(1, (constants.DLT_EXCEPTION_CAUSE_FQCN, fqcn(cause).encode()))
    return kept + added


class DeadLetterPublishingRecoverer:
    """A ``Recoverer`` (see ``consumers.errors``) for the listeners of one consumer group."""

    def __init__(
        self,
        publisher: EventPublisher,
        group_id: str,
        destination: Callable[[str], str] = constants.dlt_topic,
        metrics: Metrics = NO_METRICS,
    ) -> None:
        self._publisher = publisher
        self._group_id = group_id
        self._destination = destination
        self._metrics = metrics
        self.published = 0

    async def __call__(self, record: EventRecord, exc: Exception) -> None:
        topic = self._destination(record.topic)
        try:
            await self._publisher.publish(
                topic, record.key, record.value, dead_letter_headers(record, exc, self._group_id), record.partition
            )
        except PublishError:
            self._metrics.produced(topic, 0, 1)
            raise
        self._metrics.produced(topic, 1)
        self.published += 1
