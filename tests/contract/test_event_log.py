"""One behavioural suite for the event log: the in-process log and real Kafka must agree."""

from __future__ import annotations

import asyncio
import time

import pytest

from broadcast.core.ports.log import EventRecord, EventSubscription, OutgoingRecord, TopicPartition
from broadcast.errors import CommitFailedError, PublishError
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


class Rebalances:
    """Records a member's rebalance callbacks; optionally commits what it read when partitions are revoked."""

    def __init__(self, commit_on_revoke: bool = False) -> None:
        self.events: list[tuple[str, frozenset[TopicPartition]]] = []
        self.read: dict[TopicPartition, int] = {}  # next offset after the records this member fetched
        self.sub: EventSubscription | None = None
        self._commit_on_revoke = commit_on_revoke

    async def on_revoked(self, partitions: frozenset[TopicPartition]) -> None:
        self.events.append(("revoked", partitions))
        if self._commit_on_revoke and self.sub is not None:
            await self.sub.commit({tp: o for tp, o in self.read.items() if tp in partitions})

    async def on_assigned(self, partitions: frozenset[TopicPartition]) -> None:
        self.events.append(("assigned", partitions))

    def note(self, records: list[EventRecord]) -> list[EventRecord]:
        for r in records:
            self.read[TopicPartition(r.topic, r.partition)] = r.offset + 1
        return records


async def settle(a: EventSubscription, b: EventSubscription, rebalances: list[Rebalances]) -> list[EventRecord]:
    """Fetch on both members until they hold disjoint, non-empty assignments covering every partition."""
    got: list[EventRecord] = []
    deadline = time.monotonic() + DEADLINE_S
    while True:
        mine, theirs = a.assignment(), b.assignment()
        if mine and theirs and not mine & theirs and len(mine | theirs) == PARTITIONS:
            return got
        assert time.monotonic() < deadline, "group never settled on a shared assignment"
        ra, rb = await asyncio.gather(a.fetch(timeout_s=0.2), b.fetch(timeout_s=0.2))
        got += rebalances[0].note(ra) + rebalances[1].note(rb)


async def test_a_second_member_joining_revokes_the_first_members_assignment_then_assigns_anew(
    event_log: LogUnderTest, unique_name: str
) -> None:
    topic, group = event_log.topics[0], f"{unique_name}-g"
    everything = frozenset(TopicPartition(topic, p) for p in range(PARTITIONS))
    first, second = Rebalances(), Rebalances()
    async with event_log.log.subscribe([topic], group, on_revoked=first.on_revoked, on_assigned=first.on_assigned) as a:
        deadline = time.monotonic() + DEADLINE_S
        while a.assignment() != everything:
            assert time.monotonic() < deadline, "the only member never got every partition"
            await a.fetch(timeout_s=0.2)
        assert first.events == [("revoked", frozenset()), ("assigned", everything)]
        async with event_log.log.subscribe(
            [topic], group, on_revoked=second.on_revoked, on_assigned=second.on_assigned
        ) as b:
            deadline = time.monotonic() + DEADLINE_S
            while True:  # Kafka may rebalance more than once; wait until the callbacks agree with assignment()
                await settle(a, b, [first, second])
                if first.events[-1] == ("assigned", a.assignment()) and second.events[-1] == (
                    "assigned",
                    b.assignment(),
                ):
                    break
                assert time.monotonic() < deadline, f"callbacks never settled: {first.events} {second.events}"
                await asyncio.gather(a.fetch(timeout_s=0.2), b.fetch(timeout_s=0.2))
            assert first.events[2] == ("revoked", everything)  # eager: the whole old assignment
            assert second.events[0] == ("revoked", frozenset())
            assert all(kind == "revoked" for kind, _ in first.events[2::2])  # strictly alternating
            assert all(kind == "assigned" for kind, _ in first.events[1::2])


async def test_offsets_committed_in_on_revoked_are_where_the_new_owner_starts(
    event_log: LogUnderTest, unique_name: str
) -> None:
    topic, group = event_log.topics[0], f"{unique_name}-g"
    sent = await publish_numbered(event_log, 30, keys=9)
    first, second = Rebalances(commit_on_revoke=True), Rebalances(commit_on_revoke=True)
    async with event_log.log.subscribe([topic], group, on_revoked=first.on_revoked, on_assigned=first.on_assigned) as a:
        first.sub = a
        read = first.note(await drain(a, 30))
        async with event_log.log.subscribe(
            [topic], group, on_revoked=second.on_revoked, on_assigned=second.on_assigned
        ) as b:
            second.sub = b
            again = await settle(a, b, [first, second])
            more = await publish_numbered(event_log, 9, keys=9)
            deadline = time.monotonic() + DEADLINE_S
            while len(again) < 9:
                assert time.monotonic() < deadline, f"{len(again)} of 9 new records"
                ra, rb = await asyncio.gather(a.fetch(timeout_s=0.3), b.fetch(timeout_s=0.3))
                again += ra + rb
    assert sorted(r.value or b"" for r in read) == sorted(v for _, v in sent)
    # nothing read before the rebalance came again: the revoked partitions' commits counted
    assert sorted(r.value or b"" for r in again) == sorted(v for _, v in more)


async def test_committing_a_partition_the_member_does_not_hold_raises_commit_failed(
    event_log: LogUnderTest, unique_name: str
) -> None:
    topic = event_log.topics[0]
    async with event_log.log.subscribe([topic], f"{unique_name}-g") as sub:
        deadline = time.monotonic() + DEADLINE_S
        while len(sub.assignment()) < PARTITIONS:
            assert time.monotonic() < deadline, "the member never got its partitions"
            await sub.fetch(timeout_s=0.2)
        with pytest.raises(CommitFailedError):
            await sub.commit({TopicPartition(event_log.topics[1], 0): 1})


async def test_a_paused_partition_is_not_fetched_until_resumed_and_explicit_partitions_are_honoured(
    event_log: LogUnderTest, unique_name: str
) -> None:
    topic = event_log.topics[0]
    publisher = event_log.log.publisher()
    async with event_log.log.subscribe([topic], unique_name) as sub:
        await drain(sub, 0)
        deadline = time.monotonic() + DEADLINE_S
        while len(sub.assignment()) < PARTITIONS:
            assert time.monotonic() < deadline, "no assignment"
            await sub.fetch(timeout_s=0.2)
        paused = TopicPartition(topic, 0)
        sub.pause([paused])
        for partition in range(PARTITIONS):
            position = await publisher.publish(topic, b"same-key", f"p{partition}".encode(), partition=partition)
            assert position.partition == partition
        flowing = await drain(sub, PARTITIONS - 1)
        assert sorted(r.partition for r in flowing) == list(range(1, PARTITIONS))
        assert await sub.fetch(timeout_s=1.0) == []  # nothing from the paused partition
        sub.resume([paused])
        [late] = await drain(sub, 1)
        assert (late.partition, late.value) == (0, b"p0")
    many = await publisher.publish_many([OutgoingRecord(topic, b"k", b"x", partition=2)])
    assert not isinstance(many[0], PublishError) and many[0].partition == 2


async def test_lag_is_end_minus_committed_per_partition(event_log: LogUnderTest, unique_name: str) -> None:
    publisher = event_log.log.publisher()
    topic, other, group = event_log.topics[0], event_log.topics[1], f"{unique_name}-lag"
    for i in range(7):
        await publisher.publish(topic, b"k", f"m{i}".encode(), partition=i % 2)
    lag = await event_log.log.lag(group, [topic, other])
    expected = {TopicPartition(topic, 0): 4, TopicPartition(topic, 1): 3, TopicPartition(topic, 2): 0}
    assert lag == {**expected, **{TopicPartition(other, p): 0 for p in range(PARTITIONS)}}  # nothing committed yet
    async with event_log.log.subscribe([topic], group) as sub:
        records = await drain(sub, 7)
        await sub.commit({TopicPartition(topic, 0): 4, TopicPartition(topic, 1): 1})
    assert {r.value for r in records} == {f"m{i}".encode() for i in range(7)}
    after = await event_log.log.lag(group, [topic])
    assert after == {TopicPartition(topic, 0): 0, TopicPartition(topic, 1): 2, TopicPartition(topic, 2): 0}
