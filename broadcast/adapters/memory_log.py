"""The in-process partitioned event log used by the embedded default and unit tests.

It mirrors the parts of Kafka the listener code relies on: topics with a fixed number of partitions,
key-hashed partitioning (same key, same partition, so per-key order holds), consumer groups whose members
share partitions, explicit committed offsets, and seek. Records live in memory only: the embedded default
loses unconsumed records on restart, which the outbox covers because it republishes unpublished rows.
"""

from __future__ import annotations

import asyncio
import itertools
import time
import zlib
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager

from broadcast.errors import PublishError
from broadcast.ports import EventRecord, OutgoingRecord, RecordPosition, TopicPartition


class MemoryEventLog:
    """A single-process log; one instance is shared by every publisher and subscription."""

    def __init__(self, partitions: int = 10) -> None:
        self._default_partitions = partitions
        self._topics: dict[str, list[list[EventRecord]]] = {}
        self._groups: dict[str, _Group] = {}
        self._changed = asyncio.Event()
        self._round_robin = itertools.count()

    # -- topics and publishing
    def _topic(self, name: str) -> list[list[EventRecord]]:
        if name not in self._topics:
            self._topics[name] = [[] for _ in range(self._default_partitions)]
        return self._topics[name]

    def publisher(self) -> MemoryEventLog:
        return self

    async def partitions_for(self, topic: str) -> int:
        return len(self._topic(topic))

    async def publish(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        headers: Sequence[tuple[str, bytes]] = (),
        partition: int | None = None,
    ) -> RecordPosition:
        partitions = self._topic(topic)
        if partition is None:
            seed = zlib.crc32(key) if key is not None else next(self._round_robin)
            partition = seed % len(partitions)
        log = partitions[partition]
        record = EventRecord(topic, partition, len(log), key, value, tuple(headers), int(time.time() * 1000))
        log.append(record)
        self._changed.set()
        self._changed = asyncio.Event()
        return RecordPosition(topic, partition, record.offset)

    async def publish_many(self, records: Sequence[OutgoingRecord]) -> list[RecordPosition | PublishError]:
        return [await self.publish(r.topic, r.key, r.value, r.headers) for r in records]

    # -- consuming
    @asynccontextmanager
    async def subscribe(self, topics: Iterable[str], group_id: str) -> AsyncIterator[MemorySubscription]:
        names = tuple(topics)
        for name in names:
            self._topic(name)
        group = self._groups.setdefault(group_id, _Group())
        member = MemorySubscription(self, group, names)
        group.join(member)
        try:
            yield member
        finally:
            group.leave(member)

    def _records(self, tp: TopicPartition, start: int, limit: int) -> list[EventRecord]:
        return self._topic(tp.topic)[tp.partition][start : start + limit]

    def _all_partitions(self, topics: Iterable[str]) -> list[TopicPartition]:
        return sorted(TopicPartition(t, p) for t in set(topics) for p in range(len(self._topic(t))))


class _Group:
    """Members and committed offsets of one consumer group; assignment is round-robin, eager."""

    def __init__(self) -> None:
        self.members: list[MemorySubscription] = []
        self.committed: dict[TopicPartition, int] = {}

    def join(self, member: MemorySubscription) -> None:
        self.members.append(member)
        self._rebalance()

    def leave(self, member: MemorySubscription) -> None:
        self.members.remove(member)
        self._rebalance()

    def _rebalance(self) -> None:
        if not self.members:
            return
        log = self.members[0].log
        tps = log._all_partitions(t for m in self.members for t in m.topics)
        for index, member in enumerate(self.members):
            mine = [tp for i, tp in enumerate(tps) if i % len(self.members) == index]
            member.positions = {tp: self.committed.get(tp, 0) for tp in mine if tp.topic in member.topics}


class MemorySubscription:
    """One group member; reads from its assigned partitions, commits explicitly."""

    def __init__(self, log: MemoryEventLog, group: _Group, topics: tuple[str, ...]) -> None:
        self.log = log
        self.topics = topics
        self._group = group
        self.positions: dict[TopicPartition, int] = {}

    async def fetch(self, max_records: int = 500, timeout_s: float = 1.0) -> list[EventRecord]:
        deadline = time.monotonic() + timeout_s
        while True:
            changed = self.log._changed
            batch: list[EventRecord] = []
            for tp, position in list(self.positions.items()):
                records = self.log._records(tp, position, max_records - len(batch))
                if records:
                    batch.extend(records)
                    self.positions[tp] = records[-1].offset + 1
                if len(batch) >= max_records:
                    break
            remaining = deadline - time.monotonic()
            if batch or remaining <= 0:
                return batch
            try:
                await asyncio.wait_for(changed.wait(), remaining)
            except TimeoutError:
                return []

    async def commit(self, offsets: Mapping[TopicPartition, int]) -> None:
        self._group.committed.update(offsets)

    async def committed(self, partition: TopicPartition) -> int | None:
        return self._group.committed.get(partition)

    def assignment(self) -> frozenset[TopicPartition]:
        return frozenset(self.positions)

    def seek(self, partition: TopicPartition, offset: int) -> None:
        if partition not in self.positions:
            raise KeyError(f"{partition} is not assigned to this member")
        self.positions[partition] = offset
