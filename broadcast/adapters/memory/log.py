"""The in-process partitioned event log used by the embedded default and unit tests.

It mirrors the parts of Kafka the listener code relies on: topics with a fixed number of partitions,
key-hashed partitioning (same key, same partition, so per-key order holds), consumer groups whose members
share partitions, explicit committed offsets, and seek. Rebalances are eager, as aiokafka's: every member's
``on_revoked`` is awaited with its whole assignment (commits still count then), partitions move, positions
restart at the committed offsets, then every ``on_assigned`` is awaited; fetches return nothing meanwhile.
A commit for a partition the member does not hold raises ``CommitFailedError``, as Kafka's does. Records
live in memory only: the embedded default loses unconsumed records on restart, which the outbox covers
because it republishes unpublished rows.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import zlib
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager

from broadcast.core.ports.log import EventRecord, OutgoingRecord, RebalanceCallback, RecordPosition, TopicPartition
from broadcast.errors import CommitFailedError, PublishError

log = logging.getLogger(__name__)


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
        self._wake()
        return RecordPosition(topic, partition, record.offset)

    async def publish_many(self, records: Sequence[OutgoingRecord]) -> list[RecordPosition | PublishError]:
        return [await self.publish(r.topic, r.key, r.value, r.headers, r.partition) for r in records]

    # -- consuming
    @asynccontextmanager
    async def subscribe(
        self,
        topics: Iterable[str],
        group_id: str,
        *,
        on_revoked: RebalanceCallback | None = None,
        on_assigned: RebalanceCallback | None = None,
    ) -> AsyncIterator[MemorySubscription]:
        names = tuple(topics)
        for name in names:
            self._topic(name)
        group = self._groups.setdefault(group_id, _Group(self))
        member = MemorySubscription(self, group, names, on_revoked, on_assigned)
        group.members.append(member)
        try:
            await group.rebalance()
            yield member
        finally:
            # as aiokafka's close: the leaver's callbacks are not called; the others' are
            group.members.remove(member)
            member.positions = {}
            await group.rebalance()

    async def lag(self, group_id: str, topics: Sequence[str]) -> dict[TopicPartition, int]:
        committed = self._groups[group_id].committed if group_id in self._groups else {}
        return {
            tp: len(self._topic(tp.topic)[tp.partition]) - committed.get(tp, 0) for tp in self._all_partitions(topics)
        }

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _records(self, tp: TopicPartition, start: int, limit: int) -> list[EventRecord]:
        return self._topic(tp.topic)[tp.partition][start : start + limit]

    def _all_partitions(self, topics: Iterable[str]) -> list[TopicPartition]:
        return sorted(TopicPartition(t, p) for t in set(topics) for p in range(len(self._topic(t))))


class _Group:
    """Members and committed offsets of one consumer group; assignment is round-robin, eager, serialised."""

    def __init__(self, log: MemoryEventLog) -> None:
        self.log = log
        self.members: list[MemorySubscription] = []
        self.committed: dict[TopicPartition, int] = {}
        self.rebalancing = False
        self._lock = asyncio.Lock()

    async def rebalance(self) -> None:
        async with self._lock:
            self.rebalancing = True
            try:
                members = list(self.members)
                for member in members:
                    await _call(member.on_revoked, member.assignment(), "on_revoked")
                # Round-robin per topic among the members subscribed to it (as Kafka's assignors do), so
                # members of one group with different subscriptions still cover every partition.
                assigned: dict[int, list[TopicPartition]] = {id(m): [] for m in self.members}
                for tp in self.log._all_partitions(t for m in self.members for t in m.topics):
                    takers = [m for m in self.members if tp.topic in m.topics]
                    assigned[id(takers[tp.partition % len(takers)])].append(tp)
                for member in self.members:
                    member.positions = {tp: self.committed.get(tp, 0) for tp in assigned[id(member)]}
                    member.paused = set()
                members = list(self.members)
            finally:
                self.rebalancing = False
                self.log._wake()
            for member in members:
                await _call(member.on_assigned, member.assignment(), "on_assigned")


async def _call(callback: RebalanceCallback | None, partitions: frozenset[TopicPartition], name: str) -> None:
    """Run a rebalance callback; like aiokafka, log its failure and go on with the rebalance."""
    if callback is None:
        return
    try:
        await callback(partitions)
    except Exception:
        log.exception("rebalance callback %s failed", name)


class MemorySubscription:
    """One group member; reads from its assigned partitions, commits explicitly."""

    def __init__(
        self,
        log: MemoryEventLog,
        group: _Group,
        topics: tuple[str, ...],
        on_revoked: RebalanceCallback | None,
        on_assigned: RebalanceCallback | None,
    ) -> None:
        self.log = log
        self.topics = topics
        self.on_revoked = on_revoked
        self.on_assigned = on_assigned
        self._group = group
        self.positions: dict[TopicPartition, int] = {}
        self.paused: set[TopicPartition] = set()

    async def fetch(self, max_records: int = 500, timeout_s: float = 1.0) -> list[EventRecord]:
        deadline = time.monotonic() + timeout_s
        while True:
            changed = self.log._changed
            batch: list[EventRecord] = []
            held = [] if self._group.rebalancing else list(self.positions.items())
            for tp, position in [(tp, p) for tp, p in held if tp not in self.paused]:
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
        if foreign := set(offsets) - set(self.positions):
            raise CommitFailedError(f"partitions {sorted(foreign)} are not assigned to this member")
        self._group.committed.update(offsets)

    async def committed(self, partition: TopicPartition) -> int | None:
        return self._group.committed.get(partition)

    def assignment(self) -> frozenset[TopicPartition]:
        return frozenset(self.positions)

    def seek(self, partition: TopicPartition, offset: int) -> None:
        if partition not in self.positions:
            raise KeyError(f"{partition} is not assigned to this member")
        self.positions[partition] = offset

    def pause(self, partitions: Iterable[TopicPartition]) -> None:
        self.paused.update(tp for tp in partitions if tp in self.positions)

    def resume(self, partitions: Iterable[TopicPartition]) -> None:
        self.paused.difference_update(partitions)
        self.log._wake()
