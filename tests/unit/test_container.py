"""The listener container on the in-process event log: commits, retries, ack modes, stop, concurrency."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import pytest

from broadcast.adapters.memory.log import MemoryEventLog
from broadcast.core.ports.log import EventRecord, EventSubscription, RebalanceCallback, TopicPartition
from broadcast.errors import CommitFailedError, ConfigurationError, ValidationError
from consumers.container import ListenerContainer
from consumers.errors import RECOVERED, BackOff, Decision, DefaultErrorHandler, Retry
from consumers.listener import AckMode, Acknowledgment, Listener

TOPIC, GROUP = "orders", "delivery"
FAST_RETRIES = DefaultErrorHandler(backoff=BackOff(max_attempts=3, initial_s=0.01))


async def publish(log: MemoryEventLog, count: int, keys: int = 4) -> None:
    for i in range(count):
        await log.publish(TOPIC, f"user-{i % keys}".encode(), f"m{i}".encode())


async def committed(log: MemoryEventLog, partitions: int = 4) -> dict[int, int | None]:
    """Committed offsets per partition, as a member of the group reads them once the container stopped."""
    async with log.subscribe([TOPIC], GROUP) as sub:
        return {p: await sub.committed(TopicPartition(TOPIC, p)) for p in range(partitions)}


def ends(log: MemoryEventLog, partitions: int = 4) -> dict[int, int | None]:
    """The log-end offset per partition, None for an empty one (what a fully committed group shows)."""
    return {p: len(log._topic(TOPIC)[p]) or None for p in range(partitions)}


async def until(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


def record_listener(handler: Callable[[EventRecord], Awaitable[None]], concurrency: int = 1) -> Listener:
    return Listener("test", (TOPIC,), GROUP, handler=handler, concurrency=concurrency, poll_timeout_s=0.05)


async def test_handled_records_are_committed() -> None:
    log = MemoryEventLog(partitions=4)
    await publish(log, 20)
    seen: list[bytes] = []

    async def handle(record: EventRecord) -> None:
        seen.append(record.value or b"")

    async with ListenerContainer(log, record_listener(handle), FAST_RETRIES) as container:
        await until(lambda: len(seen) == 20)
    assert sorted(seen) == sorted(f"m{i}".encode() for i in range(20))
    assert container.handled == 20
    assert await committed(log) == ends(log)


async def test_a_failing_record_is_retried_by_seek_then_skipped_and_the_partition_moves_on() -> None:
    log = MemoryEventLog(partitions=1)
    await publish(log, 5, keys=1)
    deliveries: list[bytes] = []

    async def handle(record: EventRecord) -> None:
        deliveries.append(record.value or b"")
        if record.value == b"m2":
            raise RuntimeError("poison")

    async with ListenerContainer(log, record_listener(handle), FAST_RETRIES):
        await until(lambda: b"m4" in deliveries)
    # m2 delivered max_attempts times, nothing after it handled before it was given up, order kept
    assert deliveries == [b"m0", b"m1", b"m2", b"m2", b"m2", b"m3", b"m4"]
    assert await committed(log, 1) == {0: 5}


async def test_a_record_that_succeeds_on_retry_is_committed_once_handled() -> None:
    log = MemoryEventLog(partitions=1)
    await publish(log, 3, keys=1)
    failures = {b"m1": 1}
    handled: list[bytes] = []

    async def handle(record: EventRecord) -> None:
        if failures.get(record.value or b"", 0) > 0:
            failures[record.value or b""] -= 1
            raise ConnectionError("transient")
        handled.append(record.value or b"")

    async with ListenerContainer(log, record_listener(handle), FAST_RETRIES):
        await until(lambda: len(handled) == 3)
    assert handled == [b"m0", b"m1", b"m2"]
    assert await committed(log, 1) == {0: 3}


async def test_validation_errors_are_not_retried() -> None:
    log = MemoryEventLog(partitions=1)
    await publish(log, 3, keys=1)
    deliveries: list[bytes] = []

    async def handle(record: EventRecord) -> None:
        deliveries.append(record.value or b"")
        if record.value == b"m1":
            raise ValidationError("bad payload")

    async with ListenerContainer(log, record_listener(handle), DefaultErrorHandler(backoff=BackOff(max_attempts=5))):
        await until(lambda: b"m2" in deliveries)
    assert deliveries == [b"m0", b"m1", b"m2"]
    assert await committed(log, 1) == {0: 3}


async def test_the_error_handler_sees_the_attempt_count_and_a_failing_error_handler_means_retry() -> None:
    log = MemoryEventLog(partitions=1)
    await publish(log, 2, keys=1)
    attempts: list[int] = []

    class Flaky:
        async def handle(self, record: EventRecord, exc: Exception, attempt: int) -> Decision:
            attempts.append(attempt)
            if attempt == 1:
                raise RuntimeError("the error handler itself failed")
            return RECOVERED if attempt >= 3 else Retry()

    async def handle(record: EventRecord) -> None:
        if record.value == b"m0":
            raise RuntimeError("poison")

    async with ListenerContainer(log, record_listener(handle), Flaky()) as container:
        await until(lambda: container.handled == 1, timeout_s=10)
    assert attempts == [1, 2, 3]
    assert await committed(log, 1) == {0: 2}


async def test_manual_immediate_commits_only_acknowledged_records() -> None:
    log = MemoryEventLog(partitions=1)
    await publish(log, 10, keys=1)
    seen: list[int] = []

    async def handle(record: EventRecord, ack: Acknowledgment) -> None:
        seen.append(record.offset)
        if record.offset < 4:
            await ack.acknowledge()
            acknowledged.append(await sub_committed())

    async def sub_committed() -> int | None:  # what the group holds right after acknowledge() returned
        return log._groups[GROUP].committed.get(TopicPartition(TOPIC, 0))

    acknowledged: list[int | None] = []

    listener = Listener(
        "manual", (TOPIC,), GROUP, acknowledging_handler=handle, ack_mode=AckMode.MANUAL_IMMEDIATE, poll_timeout_s=0.05
    )
    async with ListenerContainer(log, listener, FAST_RETRIES):
        await until(lambda: len(seen) == 10)
    assert acknowledged == [1, 2, 3, 4]  # immediate: committed before acknowledge() returned
    assert await committed(log, 1) == {0: 4}
    # a restarted container gets the unacknowledged records again
    seen.clear()
    async with ListenerContainer(log, listener, FAST_RETRIES):
        await until(lambda: len(seen) == 6)
    assert seen == [4, 5, 6, 7, 8, 9]


async def test_stop_finishes_the_record_in_hand_and_commits_it() -> None:
    log = MemoryEventLog(partitions=1)
    await publish(log, 10, keys=1)
    started, release = asyncio.Event(), asyncio.Event()
    handled: list[int] = []

    async def handle(record: EventRecord) -> None:
        if record.offset == 3:
            started.set()
            await release.wait()
        handled.append(record.offset)

    stop = asyncio.Event()
    container = ListenerContainer(log, record_listener(handle), FAST_RETRIES)
    run = asyncio.create_task(container.run(stop))
    await asyncio.wait_for(started.wait(), 5)
    stop.set()
    release.set()
    await asyncio.wait_for(run, 5)
    assert handled == [0, 1, 2, 3]  # the record in hand finished; nothing after it started
    assert await committed(log, 1) == {0: 4}


async def test_stop_does_not_wait_for_a_stuck_handler_beyond_the_finish_timeout() -> None:
    log = MemoryEventLog(partitions=1)
    await publish(log, 3, keys=1)
    stuck = asyncio.Event()

    async def handle(record: EventRecord) -> None:
        if record.offset == 1:
            stuck.set()
            await asyncio.sleep(3600)

    container = ListenerContainer(log, record_listener(handle), FAST_RETRIES, finish_timeout_s=0.2)
    stop = asyncio.Event()
    run = asyncio.create_task(container.run(stop))
    await asyncio.wait_for(stuck.wait(), 5)
    started = time.monotonic()
    stop.set()
    await asyncio.wait_for(run, 5)
    assert time.monotonic() - started < 1.0
    assert await committed(log, 1) == {0: 1}  # the stuck record is not committed


async def test_concurrency_two_shares_the_partitions() -> None:
    log = MemoryEventLog(partitions=4)
    await publish(log, 40, keys=8)
    seen: list[EventRecord] = []

    async def handle(record: EventRecord) -> None:
        seen.append(record)

    async with ListenerContainer(log, record_listener(handle, concurrency=2), FAST_RETRIES) as container:
        await until(lambda: len(seen) == 40)
        first, second = container.assignments()
        assert first and second and not first & second
        assert first | second == {TopicPartition(TOPIC, p) for p in range(4)}
    assert len({(r.partition, r.offset) for r in seen}) == 40
    assert await committed(log) == ends(log)


async def test_a_member_joining_mid_stream_takes_over_partitions_without_losing_records() -> None:
    log = MemoryEventLog(partitions=4)
    counts: dict[tuple[int, int], int] = {}

    async def handle(record: EventRecord) -> None:
        counts[record.partition, record.offset] = counts.get((record.partition, record.offset), 0) + 1
        await asyncio.sleep(0.001)

    listener = record_listener(handle)
    async with ListenerContainer(log, listener, FAST_RETRIES) as one:
        await publish(log, 100, keys=16)
        await until(lambda: len(counts) >= 30)
        async with ListenerContainer(log, listener, FAST_RETRIES) as two:
            await publish(log, 100, keys=16)
            await until(lambda: len(counts) == 200, timeout_s=10)
            assert one.assignments()[0] and two.assignments()[0]
    assert sum(counts.values()) == 200  # on_revoked committed what was handled: nothing handled twice
    assert await committed(log) == ends(log)


CommitFn = Callable[[Mapping[TopicPartition, int]], Awaitable[None]]


class WrappedCommits:
    """An event log whose subscriptions' commits go through ``around(commit, offsets)``."""

    def __init__(
        self, inner: MemoryEventLog, around: Callable[[CommitFn, Mapping[TopicPartition, int]], Awaitable[None]]
    ):
        self.inner, self.around = inner, around

    def publisher(self) -> MemoryEventLog:
        return self.inner

    async def lag(self, group_id: str, topics: Sequence[str]) -> dict[TopicPartition, int]:
        return await self.inner.lag(group_id, topics)

    @asynccontextmanager
    async def _subscribe(
        self,
        topics: Iterable[str],
        group_id: str,
        on_revoked: RebalanceCallback | None,
        on_assigned: RebalanceCallback | None,
    ) -> AsyncIterator[EventSubscription]:
        async with self.inner.subscribe(topics, group_id, on_revoked=on_revoked, on_assigned=on_assigned) as sub:
            original = sub.commit

            async def commit(offsets: Mapping[TopicPartition, int]) -> None:
                await self.around(original, offsets)

            sub.commit = commit  # type: ignore[method-assign]
            yield sub

    def subscribe(
        self,
        topics: Iterable[str],
        group_id: str,
        *,
        on_revoked: RebalanceCallback | None = None,
        on_assigned: RebalanceCallback | None = None,
    ) -> AbstractAsyncContextManager[EventSubscription]:
        return self._subscribe(topics, group_id, on_revoked, on_assigned)


def failing_commits(inner: MemoryEventLog, failures: int) -> WrappedCommits:
    """Subscriptions that refuse the first ``failures`` commits (as after a rebalance)."""
    left = [failures]

    async def around(commit: CommitFn, offsets: Mapping[TopicPartition, int]) -> None:
        if left[0] > 0:
            left[0] -= 1
            raise CommitFailedError("the group rebalanced")
        await commit(offsets)

    return WrappedCommits(inner, around)


async def test_records_go_on_being_handled_while_a_commit_is_slow_and_all_is_committed_in_the_end() -> None:
    """Commits go behind the fetches: a commit that takes long (a coordinator under load) does not hold
    the next records back, and what was handled meanwhile is committed by a later commit."""
    log = MemoryEventLog(partitions=1)
    gate, commits = asyncio.Event(), [0]

    async def around(commit: CommitFn, offsets: Mapping[TopicPartition, int]) -> None:
        commits[0] += 1
        if commits[0] == 1:
            await gate.wait()  # the first commit hangs until the test lets it go
        await commit(offsets)

    handled: list[int] = []

    async def handle(record: EventRecord) -> None:
        handled.append(record.offset)

    async with ListenerContainer(WrappedCommits(log, around), record_listener(handle), FAST_RETRIES):
        await publish(log, 3, keys=1)
        await until(lambda: commits[0] == 1)
        await publish(log, 3, keys=1)
        await until(lambda: len(handled) == 6)  # with the commit still hanging
        assert commits[0] == 1, "one commit in flight at a time"
        gate.set()
        await until(lambda: commits[0] >= 2)
    assert await committed(log, 1) == {0: 6}


async def test_a_failed_commit_is_logged_and_the_container_carries_on() -> None:
    log = MemoryEventLog(partitions=1)
    flaky = failing_commits(log, failures=1)
    handled: list[int] = []

    async def handle(record: EventRecord) -> None:
        handled.append(record.offset)

    async with ListenerContainer(flaky, record_listener(handle), FAST_RETRIES) as container:
        await publish(log, 3, keys=1)
        await until(lambda: len(handled) == 3)
        await until(lambda: container.commit_failures == 1)
        await publish(log, 2, keys=1)
        await until(lambda: len(handled) == 5)
    assert await committed(log, 1) == {0: 5}


def test_a_listener_must_have_the_handler_its_ack_mode_calls() -> None:
    async def plain(record: EventRecord) -> None: ...

    with pytest.raises(ConfigurationError, match="MANUAL_IMMEDIATE takes `acknowledging_handler`"):
        Listener("x", (TOPIC,), GROUP, handler=plain, ack_mode=AckMode.MANUAL_IMMEDIATE)
    with pytest.raises(ConfigurationError, match="concurrency 0"):
        Listener("x", (TOPIC,), GROUP, handler=plain, concurrency=0)


class Escaping(BaseException):
    """What a careless handler may raise: not an Exception."""


@pytest.mark.parametrize("escape", [asyncio.CancelledError, Escaping])
async def test_a_handler_raising_a_base_exception_fails_its_record_and_the_listener_goes_on(
    escape: type[BaseException], caplog: pytest.LogCaptureFixture
) -> None:
    log = MemoryEventLog(partitions=4)
    await publish(log, 12)
    seen: list[bytes] = []
    raised = False

    async def handle(record: EventRecord) -> None:
        nonlocal raised
        if record.value == b"m5" and not raised:
            raised = True
            raise escape("handler bug")
        seen.append(record.value or b"")

    async with ListenerContainer(log, record_listener(handle), FAST_RETRIES) as container:
        await until(lambda: len(seen) == 12)
        assert container.running, "the listener is still running"
    assert sorted(seen) == sorted(f"m{i}".encode() for i in range(12)), "m5 retried and handled; none lost"
    assert any(r.levelname == "ERROR" and escape.__name__ in r.getMessage() for r in caplog.records)
    assert await committed(log) == ends(log)
