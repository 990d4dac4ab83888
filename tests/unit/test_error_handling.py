"""DefaultErrorHandler, the dead-letter recoverer's headers, the DLT record reader, and paused retries."""

from __future__ import annotations

import asyncio
import struct
import time
from datetime import UTC, datetime

import pytest

from broadcast.adapters.memory.log import MemoryEventLog
from broadcast.core import constants, envelope
from broadcast.core.domain import EventType
from broadcast.core.ports.log import EventRecord, TopicPartition
from broadcast.errors import PublishError, RejectedByDatabaseError, UnavailableError, ValidationError
from consumers.container import ListenerContainer
from consumers.errors import RECOVERED, BackOff, DefaultErrorHandler, Retry
from consumers.listener import Listener
from dlt.consumer import read_dead_letter
from dlt.recoverer import DeadLetterPublishingRecoverer, dead_letter_headers

RECORD = EventRecord("orders", 7, 1234, b"alice", b"\xff\xfe not json", (("trace", b"t-1"),), 1_700_000_000_123)


class Recorder:
    def __init__(self, fail: bool = False) -> None:
        self.calls: list[tuple[EventRecord, Exception]] = []
        self.fail = fail

    async def __call__(self, record: EventRecord, exc: Exception) -> None:
        if self.fail:
            raise PublishError("the DLT is not there")
        self.calls.append((record, exc))


async def test_retryable_errors_back_off_exponentially_then_are_recovered() -> None:
    recoverer = Recorder()
    handler = DefaultErrorHandler(recoverer, BackOff(max_attempts=4, initial_s=1, multiplier=3, max_interval_s=5))
    exc = RuntimeError("bug")
    decisions = [await handler.handle(RECORD, exc, attempt) for attempt in (1, 2, 3)]
    assert decisions == [Retry(1), Retry(3), Retry(5)]  # 1, 3, 9 capped at 5
    assert recoverer.calls == []
    assert await handler.handle(RECORD, exc, 4) is RECOVERED
    assert recoverer.calls == [(RECORD, exc)]
    assert handler.counters.retries == 3 and handler.counters.recovered == {"RuntimeError": 1}


async def test_not_retryable_errors_are_recovered_on_the_first_failure_even_when_wrapped() -> None:
    recoverer = Recorder()
    handler = DefaultErrorHandler(recoverer, BackOff(max_attempts=10))
    assert await handler.handle(RECORD, ValidationError("bad"), 1) is RECOVERED
    assert await handler.handle(RECORD, RejectedByDatabaseError("too long"), 1) is RECOVERED
    try:
        raise RuntimeError("wrapper") from ValidationError("inner")
    except RuntimeError as wrapped:
        assert await handler.handle(RECORD, wrapped, 1) is RECOVERED
    assert len(recoverer.calls) == 3


async def test_transient_errors_are_retried_past_the_attempt_budget_and_never_recovered() -> None:
    recoverer = Recorder()
    handler = DefaultErrorHandler(recoverer, BackOff(max_attempts=2, initial_s=0.5, max_interval_s=4))
    decisions = [await handler.handle(RECORD, UnavailableError("database down"), n) for n in range(1, 50)]
    assert all(isinstance(d, Retry) for d in decisions)
    assert decisions[-1] == Retry(4)
    assert recoverer.calls == []


async def test_a_recoverer_that_fails_means_retry_never_skip() -> None:
    handler = DefaultErrorHandler(Recorder(fail=True), BackOff(max_attempts=1, initial_s=0.2))
    assert await handler.handle(RECORD, ValidationError("bad"), 1) == Retry(0.2)
    assert handler.counters.recovery_failures == 1 and handler.counters.recovered == {}


def test_backoff_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        BackOff(max_attempts=0)


def test_dead_letter_headers_use_springs_names_and_encodings_and_keep_the_originals() -> None:
    try:
        try:
            raise KeyError("inner")
        except KeyError as inner:
            raise ValidationError("record is not JSON") from inner
    except ValidationError as exc:
        headers = dead_letter_headers(RECORD, exc, "broadcast-delivery")
    named = dict(headers)
    assert headers[0] == ("trace", b"t-1")
    assert named[constants.DLT_EXCEPTION_FQCN] == b"broadcast.errors.ValidationError"
    assert named[constants.DLT_EXCEPTION_CAUSE_FQCN] == b"KeyError"
    assert named[constants.DLT_EXCEPTION_MESSAGE] == b"record is not JSON"
    assert b"Traceback" in named[constants.DLT_EXCEPTION_STACKTRACE]
    assert b"raise ValidationError" in named[constants.DLT_EXCEPTION_STACKTRACE]
    assert named[constants.DLT_ORIGINAL_TOPIC] == b"orders"
    assert named[constants.DLT_ORIGINAL_PARTITION] == struct.pack(">i", 7)
    assert named[constants.DLT_ORIGINAL_OFFSET] == struct.pack(">q", 1234)
    assert named[constants.DLT_ORIGINAL_TIMESTAMP] == struct.pack(">q", 1_700_000_000_123)
    assert named[constants.DLT_ORIGINAL_TIMESTAMP_TYPE] == b"CreateTime"
    assert named[constants.DLT_ORIGINAL_CONSUMER_GROUP] == b"broadcast-delivery"


def test_a_second_failure_replaces_the_previous_exception_headers() -> None:
    first = dead_letter_headers(RECORD, RuntimeError("first"), "g")
    again = EventRecord("orders-redriven", 2, 5, RECORD.key, RECORD.value, tuple(first), 1)
    headers = dead_letter_headers(again, ValueError("second"), "g")
    names = [k for k, _ in headers]
    assert names.count(constants.DLT_EXCEPTION_FQCN) == 1 and names.count(constants.DLT_ORIGINAL_TOPIC) == 1
    named = dict(headers)
    assert named[constants.DLT_EXCEPTION_MESSAGE] == b"second"
    assert named[constants.DLT_ORIGINAL_TOPIC] == b"orders-redriven"
    assert constants.DLT_EXCEPTION_CAUSE_FQCN not in named
    assert ("trace", b"t-1") in headers


async def test_the_recoverer_publishes_the_original_bytes_to_the_same_partition_of_the_dlt() -> None:
    log = MemoryEventLog(partitions=10)
    log._topic("orders")
    log._topic("orders-dlt")
    recoverer = DeadLetterPublishingRecoverer(log.publisher(), "g")
    await recoverer(RECORD, ValidationError("bad"))
    [letter] = [r for p in log._topic("orders-dlt") for r in p]
    assert (letter.partition, letter.key, letter.value) == (7, b"alice", RECORD.value)
    read = read_dead_letter(letter)
    assert read is not None
    assert (read.original_topic, read.original_partition, read.original_offset) == ("orders", 7, 1234)
    assert read.exception_fqcn == "broadcast.errors.ValidationError" and read.consumer_group == "g"
    assert read.original_timestamp is not None and read.original_timestamp.timestamp() == 1_700_000_000.123
    assert read.broadcast_id is None  # the value is not an event


def test_the_dlt_reader_skips_tombstones_and_survives_records_without_headers() -> None:
    assert read_dead_letter(EventRecord("orders-dlt", 0, 1, b"k", None, (), 0)) is None
    bare = read_dead_letter(
        EventRecord("orders-dlt", 0, 2, None, b"\x00\x01", (("kafka_dlt-original-offset", b"x"),), 0)
    )
    assert bare is not None
    assert (bare.original_topic, bare.original_offset, bare.exception_fqcn) == ("orders", None, None)


async def test_a_long_backoff_pauses_only_the_failing_partition() -> None:
    """A retry due in 1.5 s must not hold the member: the other partitions keep flowing meanwhile."""
    log = MemoryEventLog(partitions=2)
    await log.publish("orders", b"a", b"poison", partition=0)
    handled: dict[bytes, float] = {}
    started = time.monotonic()
    failures = 0

    async def handle(record: EventRecord) -> None:
        nonlocal failures
        if record.value == b"poison" and failures == 0:
            failures += 1
            raise RuntimeError("once")
        handled[record.value or b""] = time.monotonic() - started

    handler = DefaultErrorHandler(backoff=BackOff(max_attempts=3, initial_s=1.5))
    listener = Listener("t", ("orders",), "g", handle, poll_timeout_s=0.05)
    async with ListenerContainer(log, listener, handler):
        await asyncio.sleep(0.2)
        for i in range(5):
            await log.publish("orders", b"b", f"good-{i}".encode(), partition=1)
        deadline = time.monotonic() + 5
        while b"poison" not in handled:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
    assert all(handled[f"good-{i}".encode()] < 1.0 for i in range(5)), handled
    assert 1.4 < handled[b"poison"] < 3.0, handled
    async with log.subscribe(["orders"], "g") as sub:
        assert await sub.committed(TopicPartition("orders", 0)) == 1


def test_backoff_stays_capped_however_long_an_outage_lasts() -> None:
    assert BackOff(initial_s=1, multiplier=2, max_interval_s=30).delay(100_000) == 30


def test_the_dlt_reader_never_fails_on_absurd_headers() -> None:
    absurd = (
        (constants.DLT_ORIGINAL_PARTITION, struct.pack(">q", 2**40)),
        (constants.DLT_ORIGINAL_TIMESTAMP, struct.pack(">q", 2**62)),
    )
    foreign = envelope.MessageDeliveryEvent(
        event_id="e", event_type=EventType.READ, broadcast_id="b" * 60, user_id="u", occurred_at=datetime.now(UTC)
    )  # a valid event, but its broadcast id is longer than any of ours (the column holds 36)
    read = read_dead_letter(EventRecord("orders-dlt", 0, 1, b"k", envelope.encode(foreign), absurd, 0))
    assert read is not None
    assert (read.original_partition, read.original_timestamp) == (None, None)
    assert (read.event_type, read.broadcast_id, read.user_id) == ("READ", None, None)
