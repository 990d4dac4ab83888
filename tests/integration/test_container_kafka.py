"""The listener container on the real 3-broker cluster: at-least-once across restarts and rebalances."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest

from broadcast.adapters.kafka.admin import ensure_topics
from broadcast.adapters.kafka.log import KafkaEventLog
from broadcast.core.ports.log import EventRecord, TopicPartition
from broadcast.core.settings import KafkaSettings
from broadcast.errors import PublishError
from consumers.container import ListenerContainer
from consumers.errors import BackOff, BatchListenerFailedError, DefaultErrorHandler
from consumers.listener import AckMode, Acknowledgment, Listener
from devstack.stack import StackInfo

PARTITIONS = 3
DEADLINE_S = 90.0
WARMUP = b"warmup"


@dataclass
class Topic:
    log: KafkaEventLog
    name: str
    group: str
    ends: dict[int, int] = field(default_factory=dict)  # log-end offset per partition, from acknowledgements

    async def publish(self, count: int, start: int = 0) -> list[bytes]:
        values = [f"m{i}".encode() for i in range(start, start + count)]
        for i, value in enumerate(values):
            position = await self.log.publish(self.name, f"user-{(start + i) % 12}".encode(), value)
            self.ends[position.partition] = max(self.ends.get(position.partition, 0), position.offset + 1)
        return values

    async def committed(self) -> dict[int, int | None]:
        """The group's committed offsets, read by a member of the group once the containers stopped."""
        async with self.log.subscribe([self.name], self.group) as sub:
            return {p: await sub.committed(TopicPartition(self.name, p)) for p in range(PARTITIONS)}


@pytest.fixture
async def topic(stack: StackInfo, unique_name: str) -> AsyncIterator[Topic]:
    settings = KafkaSettings(bootstrap_servers=stack.kafka_bootstrap, partitions=PARTITIONS, client_id=unique_name)
    reports = await ensure_topics(settings, [unique_name])
    assert all(r.ok for r in reports), reports
    async with KafkaEventLog(settings) as log:
        under = Topic(log, unique_name, f"{unique_name}-g")
        await warm_up(under)
        yield under


async def warm_up(topic: Topic) -> None:
    """One record per partition, retried until acknowledged: a fresh topic's leaders can take a while."""
    deadline = time.monotonic() + DEADLINE_S
    for partition in range(PARTITIONS):
        while True:
            try:
                position = await topic.log.publish(topic.name, None, WARMUP, partition=partition)
                topic.ends[partition] = max(topic.ends.get(partition, 0), position.offset + 1)
                break
            except PublishError:
                assert time.monotonic() < deadline, f"partition {partition} of {topic.name} never took a record"


async def until(condition: Callable[[], bool], what: str, timeout_s: float = DEADLINE_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout_s} s: {what}"
        await asyncio.sleep(0.05)


def spec(topic: Topic, handler: Callable[[EventRecord], None], **options: Any) -> Listener:
    """A RECORD listener on the test topic whose handler skips the warm-up records."""

    async def handle(record: EventRecord) -> None:
        if record.value != WARMUP:
            handler(record)

    return Listener("it", (topic.name,), topic.group, handler=handle, poll_timeout_s=0.2, **options)


async def test_every_record_is_handled_at_least_once_across_a_restart_and_committed_ones_are_not_redelivered(
    topic: Topic,
) -> None:
    sent = await topic.publish(60)
    first: list[bytes] = []
    blocked = asyncio.Event()

    async def handle_until_25(record: EventRecord) -> None:
        if record.value == WARMUP:
            return
        if len(first) == 25:  # the process "dies" on its 26th record: it never finishes it
            blocked.set()
            await asyncio.sleep(3600)
        first.append(record.value or b"")

    async with asyncio.timeout(2 * DEADLINE_S):
        dying = Listener("it", (topic.name,), topic.group, handler=handle_until_25, poll_timeout_s=0.2)
        async with ListenerContainer(topic.log, dying, finish_timeout_s=0.5):
            await asyncio.wait_for(blocked.wait(), DEADLINE_S)
        second: list[bytes] = []
        async with ListenerContainer(topic.log, spec(topic, lambda r: second.append(r.value or b""))):
            await until(lambda: len(set(first) | set(second)) == 60, "every record handled")
            await asyncio.sleep(1.0)  # anything redelivered would show up now
        committed = await topic.committed()
    assert len(first) == 25
    assert sorted(set(first) | set(second)) == sorted(sent)
    assert not set(first) & set(second), "records committed by the first container were handled again"
    assert len(second) == len(set(second)) == 35
    assert committed == {p: topic.ends.get(p) for p in range(PARTITIONS)}


async def test_a_second_container_joining_mid_stream_takes_over_partitions_and_loses_nothing(topic: Topic) -> None:
    counts: Counter[bytes] = Counter()

    async def count(record: EventRecord) -> None:
        if record.value != WARMUP:
            counts[record.value or b""] += 1
            await asyncio.sleep(0.02)  # slow enough that the rebalance lands in the middle of a fetched batch

    listener = Listener("it", (topic.name,), topic.group, handler=count, poll_timeout_s=0.2)
    async with asyncio.timeout(3 * DEADLINE_S):
        async with ListenerContainer(topic.log, listener) as one:
            sent = await topic.publish(150)
            await until(lambda: len(counts) >= 40, "the first container handles records")
            before = one.assignments()[0]
            async with ListenerContainer(topic.log, listener) as two:
                sent += await topic.publish(150, start=150)
                await until(lambda: len(counts) == 300, "all 300 records handled")
                await until(lambda: bool(two.assignments()[0]), "the second container is assigned partitions")
                after, theirs = one.assignments()[0], two.assignments()[0]
                await asyncio.sleep(1.0)
        committed = await topic.committed()
    duplicates = sum(counts.values()) - len(counts)
    assert sorted(counts) == sorted(sent), "a record was lost"
    assert len(before) == PARTITIONS and after and theirs and not after & theirs and len(after | theirs) == PARTITIONS
    # on_revoked committed what the first container had handled of its batch (without that, the rest of the
    # batch handled so far comes again: dozens); only records fetched while the group was rebalancing may
    assert duplicates <= 5, f"{duplicates} records handled twice"
    assert committed == {p: topic.ends.get(p) for p in range(PARTITIONS)}


async def test_a_commit_refused_after_a_rebalance_does_not_crash_the_container(topic: Topic) -> None:
    """Acknowledgments held across a rebalance: committing a partition that moved away is refused by Kafka."""
    stashed: list[tuple[int, Acknowledgment]] = []
    handled: Counter[bytes] = Counter()
    holding = True

    async def handle(record: EventRecord, ack: Acknowledgment) -> None:
        handled[record.value or b""] += 1
        if holding:
            stashed.append((record.partition, ack))
        else:
            await ack.acknowledge()

    manual = Listener(
        "it",
        (topic.name,),
        topic.group,
        acknowledging_handler=handle,
        ack_mode=AckMode.MANUAL_IMMEDIATE,
        poll_timeout_s=0.2,
    )

    def shared(one: ListenerContainer, two: ListenerContainer) -> bool:
        mine, theirs = one.assignments()[0], two.assignments()[0]
        return bool(mine and theirs and not mine & theirs and len(mine | theirs) == PARTITIONS)

    async with asyncio.timeout(3 * DEADLINE_S):
        sent = await topic.publish(30)
        async with ListenerContainer(topic.log, manual) as one:
            await until(lambda: {p for p, _ in stashed} == set(range(PARTITIONS)), "a record held on every partition")
            async with ListenerContainer(topic.log, manual) as two:
                await until(lambda: shared(one, two), "both containers hold partitions")
                holding = False
                for _, ack in stashed:  # at least one of these partitions now belongs to the other container
                    await ack.acknowledge()
                assert one.commit_failures >= 1
                handled_before = one.handled
                sent += await topic.publish(30, start=30)
                await until(lambda: set(handled) >= set(sent), "every record handled after the failed commit")
                await until(lambda: one.handled > handled_before, "the first container goes on handling")
                assert two.handled > 0
        committed = await topic.committed()
    assert committed == {p: topic.ends.get(p) for p in range(PARTITIONS)}


async def test_a_handler_slower_than_max_poll_interval_rejoins_boundedly_raises_the_alarm_and_loses_nothing(
    topic: Topic, stack: StackInfo, caplog: pytest.LogCaptureFixture
) -> None:
    """RELIABILITY #11: ``max_poll_interval_ms`` 10 s and one record's handling 15 s. The consumer is put out
    of its group and joins again, a bounded number of times (no rebalance storm); while the record is in hand
    the container says it is stalled (what readiness reports); no record is lost."""
    settings = KafkaSettings(
        bootstrap_servers=stack.kafka_bootstrap, partitions=PARTITIONS, client_id=f"{topic.name}-slow",
        max_poll_interval_ms=10_000,
    )  # fmt: skip
    sent = await topic.publish(40)
    handled: Counter[bytes] = Counter()
    slow = asyncio.Event()

    async def handle(record: EventRecord) -> None:
        if record.value == b"m5" and not slow.is_set():
            slow.set()
            await asyncio.sleep(15)
        if record.value != WARMUP:
            handled[record.value or b""] += 1

    alarms: list[str] = []
    with caplog.at_level(logging.INFO, logger="consumers.container"):
        async with KafkaEventLog(settings) as log, asyncio.timeout(3 * DEADLINE_S):
            listener = Listener("slow", (topic.name,), topic.group, handler=handle, poll_timeout_s=0.2)
            async with ListenerContainer(log, listener) as container:
                await asyncio.wait_for(slow.wait(), DEADLINE_S)
                await asyncio.sleep(12)  # past max_poll_interval_ms, the record still in hand
                alarms.append(container.stalled(stall_s=5) or "")
                await until(lambda: set(handled) == set(sent), "every record handled")
                await asyncio.sleep(3)  # a storm would go on rebalancing now
                joins = sum(": assigned " in r.getMessage() for r in caplog.records)
    assert set(handled) == set(sent), "a record was lost"
    assert "handling one record" in alarms[0], alarms
    assert 2 <= joins <= 4, f"{joins} assignments: the consumer must rejoin, a bounded number of times"


async def test_a_batch_listener_on_kafka_retries_mid_batch_with_a_paused_partition_and_a_joining_member(
    topic: Topic,
) -> None:
    """The batch listener (``AckMode.BATCH``) on the real cluster: one record of the first fetch fails twice
    (``BatchListenerFailedError``; its partition pauses for the 1 s backoff while the others flow), then
    succeeds; a second container joins the group mid-stream and takes partitions over. Every record is
    handled (at least once, as across any rebalance), the failed one exactly once after its two failures;
    once both stop, the group has committed every partition to its end."""
    counts: Counter[bytes] = Counter()
    failures = Counter[bytes]()
    poisoned = b"m5"

    async def handle(records: Sequence[EventRecord]) -> None:
        for index, record in enumerate(records):
            if record.value == WARMUP:
                continue
            if record.value == poisoned and failures[poisoned] < 2:
                failures[poisoned] += 1
                raise BatchListenerFailedError(index) from ConnectionError("try again")
            counts[record.value or b""] += 1

    listener = Listener(
        "it-batch", (topic.name,), topic.group, batch_handler=handle, ack_mode=AckMode.BATCH, poll_timeout_s=0.2
    )
    handler = DefaultErrorHandler(backoff=BackOff(max_attempts=5, initial_s=1.0, multiplier=1.0))
    first = await topic.publish(60)
    async with ListenerContainer(topic.log, listener, handler):
        await until(lambda: failures[poisoned] == 2 and len(counts) >= 30, "the failures and some progress")
        async with ListenerContainer(topic.log, listener, handler) as two:
            await until(lambda: bool(two.assignments()[0]), "the joining member assigned partitions")
            second = await topic.publish(60, start=60)
            await until(lambda: len(counts) == 120, "every record handled")
            assert two.handled > 0, "the joining member handled some"
    assert set(counts) == set(first + second)
    assert counts[poisoned] == 1
    assert await topic.committed() == {p: topic.ends[p] for p in range(PARTITIONS)}
