"""The batch listener (``AckMode.BATCH``) on the in-process event log: Spring's ``BatchListenerFailedException``
semantics, partitions handled concurrently, backoff pausing one partition, a member joining mid-stream."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence

import pytest

from broadcast.adapters.memory.log import MemoryEventLog
from broadcast.core.ports.log import EventRecord, TopicPartition
from broadcast.errors import ConfigurationError, ValidationError
from broadcast.runtime.workers import slowed
from consumers.container import ListenerContainer
from consumers.errors import BackOff, BatchListenerFailedError, DefaultErrorHandler
from consumers.listener import AckMode, Listener
from tests.unit.test_container import GROUP, TOPIC, committed, ends, publish, until

BatchHandler = Callable[[Sequence[EventRecord]], Awaitable[None]]


def batch_listener(handler: BatchHandler, concurrency: int = 1) -> Listener:
    return Listener(
        "batch", (TOPIC,), GROUP, batch_handler=handler, ack_mode=AckMode.BATCH, concurrency=concurrency,
        poll_timeout_s=0.05,
    )  # fmt: skip


class Recorder:
    """A recoverer that remembers what it was given: (record value, the exception's class)."""

    def __init__(self) -> None:
        self.recovered: list[tuple[bytes, str]] = []

    async def __call__(self, record: EventRecord, exc: Exception) -> None:
        self.recovered.append((record.value or b"", type(exc).__name__))


def committed_now(log: MemoryEventLog, partition: int = 0) -> int | None:
    """The group's committed offset of ``partition`` while the container runs (a probe member would rebalance)."""
    return log._groups[GROUP].committed.get(TopicPartition(TOPIC, partition))


def failing_at(values: set[bytes], handled: list[bytes], make: Callable[[], Exception]) -> BatchHandler:
    """A batch handler that handles records in order and raises ``BatchListenerFailedError`` at the first
    one whose value is in ``values`` (from ``make()``); ``handled`` gets what it handled."""

    async def handle(records: Sequence[EventRecord]) -> None:
        for index, record in enumerate(records):
            if record.value in values:
                raise BatchListenerFailedError(index) from make()
            handled.append(record.value or b"")

    return handle


async def test_each_partitions_records_come_as_one_ordered_batch_and_are_committed() -> None:
    log = MemoryEventLog(partitions=4)
    await publish(log, 40)
    batches: list[list[tuple[int, int]]] = []

    async def handle(records: Sequence[EventRecord]) -> None:
        batches.append([(r.partition, r.offset) for r in records])

    async with ListenerContainer(log, batch_listener(handle)) as container:
        await until(lambda: sum(len(b) for b in batches) == 40)
    assert all(len({p for p, _ in b}) == 1 for b in batches), "a batch holds one partition's records"
    assert all([o for _, o in b] == sorted(o for _, o in b) for b in batches), "in offset order"
    assert len(batches) < 40, f"records came in batches: {[len(b) for b in batches]}"
    assert container.handled == 40
    assert await committed(log) == ends(log)


async def test_a_record_failing_mid_batch_commits_those_before_it_is_retried_and_recovered_then_the_rest_goes_on() -> (
    None
):
    log = MemoryEventLog(partitions=1)
    await publish(log, 6, keys=1)
    handled: list[bytes] = []
    recoverer = Recorder()
    backoff = BackOff(max_attempts=3, initial_s=0.3, multiplier=1.0)
    handler = failing_at({b"m2"}, handled, lambda: RuntimeError("poison"))
    seen_during_backoff: list[int | None] = []
    async with ListenerContainer(log, batch_listener(handler), DefaultErrorHandler(recoverer, backoff)) as container:
        await until(lambda: handled == [b"m0", b"m1"])
        await asyncio.sleep(0.15)  # m2 in its first backoff
        seen_during_backoff.append(committed_now(log))
        await until(lambda: len(handled) == 5, timeout_s=10)
    assert handled == [b"m0", b"m1", b"m3", b"m4", b"m5"], "nothing after m2 before it was given up; order kept"
    assert seen_during_backoff == [2], "the records before the failed one are committed while it waits"
    assert recoverer.recovered == [(b"m2", "RuntimeError")], "the error handler sees the cause, after 3 attempts"
    assert container.handled == 5
    assert await committed(log, 1) == {0: 6}


async def test_a_not_retryable_failure_is_recovered_at_once_and_the_rest_of_the_same_batch_is_handled() -> None:
    log = MemoryEventLog(partitions=1)
    await publish(log, 5, keys=1)
    handled: list[bytes] = []
    recoverer = Recorder()
    calls: list[list[bytes]] = []
    inner = failing_at({b"m1", b"m3"}, handled, lambda: ValidationError("bad payload"))

    async def handle(records: Sequence[EventRecord]) -> None:
        calls.append([r.value or b"" for r in records])
        await inner(records)

    async with ListenerContainer(log, batch_listener(handle), DefaultErrorHandler(recoverer, BackOff(5))):
        await until(lambda: len(handled) == 3)
    assert handled == [b"m0", b"m2", b"m4"]
    assert recoverer.recovered == [(b"m1", "ValidationError"), (b"m3", "ValidationError")]
    assert calls == [[b"m0", b"m1", b"m2", b"m3", b"m4"], [b"m2", b"m3", b"m4"], [b"m4"]], "no refetch"
    assert await committed(log, 1) == {0: 5}


async def test_an_exception_without_an_index_is_a_failure_of_the_first_record() -> None:
    log = MemoryEventLog(partitions=1)
    await publish(log, 3, keys=1)
    failures = [ConnectionError("transient")]
    handled: list[bytes] = []

    async def handle(records: Sequence[EventRecord]) -> None:
        if failures:
            raise failures.pop()
        handled.extend(r.value or b"" for r in records)

    fast = DefaultErrorHandler(backoff=BackOff(max_attempts=3, initial_s=0.01))
    async with ListenerContainer(log, batch_listener(handle), fast):
        await until(lambda: len(handled) == 3)
    assert handled == [b"m0", b"m1", b"m2"], "the whole batch again, from its first record"
    assert await committed(log, 1) == {0: 3}


async def test_partitions_are_handled_concurrently_and_a_backoff_holds_up_only_its_own() -> None:
    log = MemoryEventLog(partitions=2)
    await log.publish(TOPIC, None, b"a0", partition=0)
    await log.publish(TOPIC, None, b"b0", partition=1)
    b_done = asyncio.Event()
    handled: list[bytes] = []
    failed_once: set[bytes] = set()
    waited_out: list[bytes] = []

    async def handle(records: Sequence[EventRecord]) -> None:
        for index, record in enumerate(records):
            value = record.value or b""
            if value == b"a0":
                try:  # b0 can only be handled meanwhile if partition 1's batch runs concurrently
                    await asyncio.wait_for(b_done.wait(), 2)
                except TimeoutError:
                    waited_out.append(value)
            if value == b"a1" and value not in failed_once:
                failed_once.add(value)
                raise BatchListenerFailedError(index) from ConnectionError("retry me later")
            handled.append(value)
            if value == b"b0":
                b_done.set()

    backoff = BackOff(max_attempts=3, initial_s=1.0)
    async with ListenerContainer(log, batch_listener(handle), DefaultErrorHandler(backoff=backoff)):
        await until(lambda: handled[-2:] == [b"b0", b"a0"] or handled[:2] == [b"b0", b"a0"])
        await log.publish(TOPIC, None, b"a1", partition=0)
        await until(lambda: b"a1" in failed_once)
        for n in range(1, 4):  # partition 0 waits out its backoff, partition 1 flows meanwhile
            await log.publish(TOPIC, None, f"b{n}".encode(), partition=1)
        await until(lambda: b"b3" in handled, timeout_s=0.8)
        assert b"a1" not in handled
        await until(lambda: b"a1" in handled, timeout_s=5)
    assert not waited_out, "partition 0's batch waited in vain for partition 1's: they ran one after the other"


async def test_a_member_joining_mid_stream_takes_over_partitions_and_nothing_is_handled_twice() -> None:
    log = MemoryEventLog(partitions=4)
    counts: dict[tuple[int, int], int] = {}

    async def handle(records: Sequence[EventRecord]) -> None:
        for record in records:
            counts[record.partition, record.offset] = counts.get((record.partition, record.offset), 0) + 1
        await asyncio.sleep(0.005)

    listener = batch_listener(handle)
    async with ListenerContainer(log, listener) as one:
        await publish(log, 100, keys=16)
        await until(lambda: len(counts) >= 30)
        async with ListenerContainer(log, listener) as two:
            await publish(log, 100, keys=16)
            await until(lambda: len(counts) == 200, timeout_s=10)
            assert one.assignments()[0] and two.assignments()[0]
    assert sum(counts.values()) == 200, "on_revoked waited for the batches in hand and committed them"
    assert await committed(log) == ends(log)


def test_a_batch_listener_takes_a_batch_handler_and_nothing_else() -> None:
    async def batch(records: Sequence[EventRecord]) -> None: ...

    async def plain(record: EventRecord) -> None: ...

    with pytest.raises(ConfigurationError, match="BATCH takes `batch_handler`"):
        Listener("x", (TOPIC,), GROUP, handler=plain, ack_mode=AckMode.BATCH)
    with pytest.raises(ConfigurationError, match="RECORD takes `handler`"):
        Listener("x", (TOPIC,), GROUP, handler=plain, batch_handler=batch)
    assert Listener("x", (TOPIC,), GROUP, batch_handler=batch, ack_mode=AckMode.BATCH).batch_handler is batch


async def test_the_slowed_failpoint_hands_slices_over_and_names_a_failure_by_its_index_in_the_whole_batch() -> None:
    seen: list[int] = []

    async def handle(records: Sequence[EventRecord]) -> None:
        for index, record in enumerate(records):
            if record.offset == 57:
                raise BatchListenerFailedError(index) from ValidationError("bad")
            seen.append(record.offset)

    records = [EventRecord(TOPIC, 0, offset, None, b"", (), 0) for offset in range(120)]
    with pytest.raises(BatchListenerFailedError) as failed:
        await slowed(handle, per_record_ms=0)(records)
    assert failed.value.index == 57 and isinstance(failed.value.__cause__, ValidationError)
    assert seen == list(range(57))
