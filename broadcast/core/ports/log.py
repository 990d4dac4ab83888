"""The event log's port (Kafka, or the in-memory log): records, positions, publishing and subscribing.

Each port has an in-memory adapter (embedded default, unit tests) and a real one (Kafka, SQL, Redis);
``tests/contract`` runs one behavioural suite against both. No vendor type crosses these signatures.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Protocol

from broadcast.errors import PublishError


@dataclass(frozen=True, slots=True, order=True)
class TopicPartition:
    topic: str
    partition: int


@dataclass(frozen=True, slots=True)
class RecordPosition:
    """Where an acknowledged record landed."""

    topic: str
    partition: int
    offset: int


@dataclass(frozen=True, slots=True)
class OutgoingRecord:
    topic: str
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...] = ()
    partition: int | None = None  # None: the default partitioner picks it from the key


@dataclass(frozen=True, slots=True)
class EventRecord:
    """A record as a consumer sees it: original key/value bytes and headers, untouched."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...]
    timestamp_ms: int
    log_append_time: bool = False  # the timestamp is the broker's append time, not the producer's


class EventPublisher(Protocol):
    """Publishes records durably; ``publish`` returns only once the log acknowledged the record."""

    async def publish(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        headers: Sequence[tuple[str, bytes]] = (),
        partition: int | None = None,
    ) -> RecordPosition: ...

    async def publish_many(self, records: Sequence[OutgoingRecord]) -> list[RecordPosition | PublishError]:
        """Publish in order, pipelined; one result per record, failures as ``PublishError`` values."""
        ...

    async def partitions_for(self, topic: str) -> int: ...


class EventSubscription(Protocol):
    """One member of a consumer group; offsets are committed explicitly, never automatically."""

    async def fetch(self, max_records: int = 500, timeout_s: float = 1.0) -> list[EventRecord]: ...

    async def commit(self, offsets: Mapping[TopicPartition, int]) -> None:
        """Commit, per partition, the offset of the *next* record to read.

        Raises ``CommitFailedError`` when the commit did not happen (the group rebalanced, or a partition
        is not assigned to this member): the records are then delivered again, to this member or another.
        """
        ...

    async def committed(self, partition: TopicPartition) -> int | None: ...

    def assignment(self) -> frozenset[TopicPartition]: ...

    def seek(self, partition: TopicPartition, offset: int) -> None: ...

    def pause(self, partitions: Iterable[TopicPartition]) -> None:
        """Stop fetching ``partitions`` (the member stays in the group); a rebalance resumes them."""
        ...

    def resume(self, partitions: Iterable[TopicPartition]) -> None: ...


RebalanceCallback = Callable[[frozenset[TopicPartition]], Awaitable[None]]
"""Told the partitions a member gives up (``on_revoked``) or receives (``on_assigned``) in a rebalance."""


class EventLog(Protocol):
    """A partitioned, replicated log with consumer groups (Kafka, or the in-process version)."""

    def publisher(self) -> EventPublisher: ...

    def subscribe(
        self,
        topics: Iterable[str],
        group_id: str,
        *,
        on_revoked: RebalanceCallback | None = None,
        on_assigned: RebalanceCallback | None = None,
    ) -> AbstractAsyncContextManager[EventSubscription]:
        """Join ``group_id``; the member leaves the group when the block exits.

        Rebalances are eager, as with Kafka's default assignors: ``on_revoked`` is awaited with the
        member's whole previous assignment (empty on the first join) *before* partitions move, while its
        commits still count — the place to commit processed offsets — and ``on_assigned`` with the new
        assignment afterwards. Positions of assigned partitions restart at the committed offsets.
        Callbacks run in whatever task drives the rebalance; their exceptions are logged, not raised.
        """
        ...

    async def lag(self, group_id: str, topics: Sequence[str]) -> dict[TopicPartition, int]:
        """Per partition of ``topics``: end offset minus ``group_id``'s committed offset (minus the log
        start where the group has committed nothing). Raises ``UnavailableError`` when it cannot tell."""
        ...
