"""One behavioural suite for the event log: the in-process log and real Kafka must agree."""

from __future__ import annotations

import asyncio
import time

from broadcast.ports import EventRecord, EventSubscription, TopicPartition
from tests.contract.support import PARTITIONS, LogUnderTest

DEADLINE_S = 45.0


async def drain(sub: EventSubscription, count: int, timeout_s: float = DEADLINE_S) -> list[EventRecord]:
    """Fetch until ``count`` records arrived (or fail after ``timeout_s``)."""
    records: list[EventRecord] = []
    deadline = time.monotonic() + timeout_s
    while len(records) < count:
        assert time.monotonic() < deadline, f"only {len(records)} of {count} records within {timeout_s} s"
        records.extend(await sub.fetch(max_records=500, timeout_s=0.5))
    return records


async def publish_numbered(under: LogUnderTest, count: int, keys: int = 4) -> list[tuple[bytes, bytes]]:
    sent = []
    publisher = under.log.publisher()
    for i in range(count):
        key, value = f"user-{i % keys}".encode(), f"message-{i}".encode()
        await publisher.publish(under.topics[0], key, value, headers=[("n", str(i).encode()), ("empty", b"")])
        sent.append((key, value))
    return sent


async def test_same_key_lands_on_one_partition_with_increasing_offsets(event_log: LogUnderTest) -> None:
    publisher = event_log.log.publisher()
    assert await publisher.partitions_for(event_log.topics[0]) == 3
    seen: dict[bytes, set[int]] = {}
    last_offset: dict[int, int] = {}
    for i in range(24):
        key = f"user-{i % 6}".encode()
        position = await publisher.publish(event_log.topics[0], key, b"v")
        assert position.topic == event_log.topics[0]
        seen.setdefault(key, set()).add(position.partition)
        assert position.offset > last_offset.get(position.partition, -1)
        last_offset[position.partition] = position.offset
    assert all(len(partitions) == 1 for partitions in seen.values()), seen


async def test_a_new_group_reads_every_record_in_key_order_with_bytes_and_headers_intact(
    event_log: LogUnderTest, unique_name: str
) -> None:
    sent = await publish_numbered(event_log, 40)
    async with event_log.log.subscribe([event_log.topics[0]], f"{unique_name}-g") as sub:
        records = await drain(sub, 40)
    assert sorted((r.key, r.value) for r in records) == sorted(sent)
    for key in {k for k, _ in sent}:
        in_key_order = [r.value for r in records if r.key == key]
        assert in_key_order == [v for k, v in sent if k == key]
    first = next(r for r in records if r.value == b"message-0")
    assert dict(first.headers) == {"n": b"0", "empty": b""}
    assert first.timestamp_ms > 0


async def test_a_member_resumes_at_the_committed_offset(event_log: LogUnderTest, unique_name: str) -> None:
    publisher = event_log.log.publisher()
    topic, group = event_log.topics[0], f"{unique_name}-g"
    for i in range(10):
        await publisher.publish(topic, b"one-key", f"m{i}".encode())
    async with event_log.log.subscribe([topic], group) as sub:
        records = await drain(sub, 10)
        tp = TopicPartition(topic, records[0].partition)
        await sub.commit({tp: records[5].offset + 1})  # m0..m5 handled, m6.. not
        assert await sub.committed(tp) == records[5].offset + 1
    await publisher.publish(topic, b"one-key", b"m10")
    async with event_log.log.subscribe([topic], group) as sub:
        again = await drain(sub, 5)
    assert [r.value for r in again] == [b"m6", b"m7", b"m8", b"m9", b"m10"]


async def test_every_group_sees_every_record(event_log: LogUnderTest, unique_name: str) -> None:
    await publish_numbered(event_log, 12)
    async with (
        event_log.log.subscribe([event_log.topics[0]], f"{unique_name}-one") as one,
        event_log.log.subscribe([event_log.topics[0]], f"{unique_name}-two") as two,
    ):
        first, second = await asyncio.gather(drain(one, 12), drain(two, 12))
    assert sorted(r.value or b"" for r in first) == sorted(r.value or b"" for r in second)
    assert len(first) == 12


async def test_members_of_one_group_share_partitions_without_overlap(event_log: LogUnderTest, unique_name: str) -> None:
    topic, group = event_log.topics[0], f"{unique_name}-g"
    async with event_log.log.subscribe([topic], group) as a, event_log.log.subscribe([topic], group) as b:
        deadline = time.monotonic() + DEADLINE_S

        def settled() -> bool:  # both members hold partitions, none twice, all covered
            mine, theirs = a.assignment(), b.assignment()
            return bool(mine and theirs and not mine & theirs and len(mine | theirs) == PARTITIONS)

        while not settled():
            assert time.monotonic() < deadline, "group never settled on a shared assignment"
            await asyncio.gather(a.fetch(timeout_s=0.2), b.fetch(timeout_s=0.2))
        sent = await publish_numbered(event_log, 30, keys=9)
        got_a: list[EventRecord] = []
        got_b: list[EventRecord] = []
        while len(got_a) + len(got_b) < 30:
            assert time.monotonic() < deadline + DEADLINE_S, f"{len(got_a) + len(got_b)} of 30"
            ra, rb = await asyncio.gather(a.fetch(timeout_s=0.3), b.fetch(timeout_s=0.3))
            got_a += ra
            got_b += rb
    assert {r.partition for r in got_a}.isdisjoint({r.partition for r in got_b})
    assert sorted(r.value or b"" for r in got_a + got_b) == sorted(v for _, v in sent)


async def test_seek_rereads_from_an_offset(event_log: LogUnderTest, unique_name: str) -> None:
    topic = event_log.topics[1]
    publisher = event_log.log.publisher()
    for i in range(5):
        await publisher.publish(topic, b"k", f"m{i}".encode())
    async with event_log.log.subscribe([topic], f"{unique_name}-g") as sub:
        records = await drain(sub, 5)
        sub.seek(TopicPartition(topic, records[0].partition), records[2].offset)
        again = await drain(sub, 3)
    assert [r.value for r in again] == [b"m2", b"m3", b"m4"]


async def test_members_with_different_topics_in_one_group_each_get_all_their_partitions(
    event_log: LogUnderTest, unique_name: str
) -> None:
    first, second = event_log.topics
    group = f"{unique_name}-g"
    async with event_log.log.subscribe([first], group) as a, event_log.log.subscribe([second], group) as b:
        deadline = time.monotonic() + DEADLINE_S
        while not (len(a.assignment()) == PARTITIONS and len(b.assignment()) == PARTITIONS):
            assert time.monotonic() < deadline, f"assignments {a.assignment()} / {b.assignment()}"
            await asyncio.gather(a.fetch(timeout_s=0.2), b.fetch(timeout_s=0.2))
        assert {tp.topic for tp in a.assignment()} == {first}
        assert {tp.topic for tp in b.assignment()} == {second}
