"""The batch listener (``AckMode.BATCH``) on both event logs, in-process and Kafka: a record failing in the
middle of a batch, the backoff that pauses only its partition, and a rebalance while batches are in hand."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from broadcast.core.ports.log import EventRecord
from consumers.container import ListenerContainer
from consumers.errors import BackOff, BatchListenerFailedError, DefaultErrorHandler
from consumers.listener import AckMode, BatchHandler, Listener
from tests.contract.support import PARTITIONS, LogUnderTest
from tests.waiting import wait_until

DEADLINE_S = 30.0


def batch(name: str, topic: str, group: str, handle: BatchHandler) -> Listener:
    return Listener(name, (topic,), group, batch_handler=handle, ack_mode=AckMode.BATCH, poll_timeout_s=0.2)


async def uncommitted(log: LogUnderTest, group: str, topic: str) -> dict[int, int]:
    return {tp.partition: n for tp, n in (await log.log.lag(group, [topic])).items()}


async def test_a_record_failing_mid_batch_commits_those_before_it_and_waits_its_backoff_alone(
    event_log: LogUnderTest, unique_name: str
) -> None:
    topic, group = event_log.topics[0], f"{unique_name}-g"
    publisher = event_log.log.publisher()
    for i in range(6):
        await publisher.publish(topic, b"k", f"m{i}".encode(), partition=0)
    handled: list[bytes] = []
    failures = {b"m2": 2}  # fails twice (transient), then goes through

    async def handle(records: Sequence[EventRecord]) -> None:
        for index, record in enumerate(records):
            value = record.value or b""
            if failures.get(value, 0):
                failures[value] -= 1
                raise BatchListenerFailedError(index) from ConnectionError("try again")
            handled.append(value)

    backoff = DefaultErrorHandler(backoff=BackOff(max_attempts=5, initial_s=1.5, multiplier=1.0))
    async with ListenerContainer(event_log.log, batch("contract-batch", topic, group, handle), backoff):
        await wait_until(lambda: failures[b"m2"] == 1, DEADLINE_S, "the first failure of m2")
        for i in range(4):  # while partition 0 waits out its backoff, partition 1 flows
            await publisher.publish(topic, b"k", f"o{i}".encode(), partition=1)
        await wait_until(lambda: handled.count(b"o3") == 1, DEADLINE_S, "partition 1 handled during the backoff")
        assert await uncommitted(event_log, group, topic) == {0: 4, 1: 0, 2: 0}, "m0 and m1 committed, m2.. not"
        assert b"m3" not in handled, "nothing after the failed record is handled before it"
        await wait_until(lambda: handled.count(b"m5") == 1, DEADLINE_S, "the rest of partition 0")
    assert [v for v in handled if v.startswith(b"m")] == [b"m0", b"m1", b"m2", b"m3", b"m4", b"m5"]
    assert failures == {b"m2": 0}
    assert await uncommitted(event_log, group, topic) == dict.fromkeys(range(PARTITIONS), 0)


async def test_a_member_joining_while_batches_are_in_hand_takes_partitions_over_and_nothing_is_lost(
    event_log: LogUnderTest, unique_name: str
) -> None:
    topic, group = event_log.topics[1], f"{unique_name}-g"
    publisher = event_log.log.publisher()
    handled: dict[str, list[bytes]] = {"a": [], "b": []}

    def slow(member: str) -> BatchHandler:
        async def handle(records: Sequence[EventRecord]) -> None:
            await asyncio.sleep(0.2)  # a batch in hand long enough for the rebalance to meet it
            handled[member] += [r.value or b"" for r in records]

        return handle

    sent = [f"r{i}".encode() for i in range(90)]
    for i, value in enumerate(sent[:45]):
        await publisher.publish(topic, f"k{i % 9}".encode(), value)
    async with ListenerContainer(event_log.log, batch("contract-a", topic, group, slow("a"))):
        await wait_until(lambda: bool(handled["a"]), DEADLINE_S, "member a handling")
        async with ListenerContainer(event_log.log, batch("contract-b", topic, group, slow("b"))) as b:
            await wait_until(lambda: bool(b.assignments()[0]), DEADLINE_S, "member b assigned partitions")
            for i, value in enumerate(sent[45:], start=45):
                await publisher.publish(topic, f"k{i % 9}".encode(), value)
            everything = set(sent)
            await wait_until(lambda: set(handled["a"] + handled["b"]) == everything, DEADLINE_S, "all handled")
    assert handled["b"], "the joining member handled some"
    assert await uncommitted(event_log, group, topic) == dict.fromkeys(range(PARTITIONS), 0)
    for member in ("a", "b"):
        mine = handled[member]
        per_key = {k: [v for v in mine if int(v[1:]) % 9 == k] for k in range(9)}
        assert all(v == sorted(v, key=lambda x: int(x[1:])) for v in per_key.values()), "order kept per key"
