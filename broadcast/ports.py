"""Ports: the small protocols the core needs from the outside world, in the project's own vocabulary.

Each port has an in-memory adapter (embedded default, unit tests) and a real one (Kafka, SQL, Redis);
``tests/contract`` runs one behavioural suite against both. No vendor type crosses these signatures.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import timedelta
from typing import Protocol

from broadcast.domain import ClaimedOutboxEvent, OutboxEvent, User


# --------------------------------------------------------------------------- event log (Kafka)
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
class EventRecord:
    """A record as a consumer sees it: original key/value bytes and headers, untouched."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...]
    timestamp_ms: int


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

    async def partitions_for(self, topic: str) -> int: ...


class EventSubscription(Protocol):
    """One member of a consumer group; offsets are committed explicitly, never automatically."""

    async def fetch(self, max_records: int = 500, timeout_s: float = 1.0) -> list[EventRecord]: ...

    async def commit(self, offsets: Mapping[TopicPartition, int]) -> None:
        """Commit, per partition, the offset of the *next* record to read."""
        ...

    async def committed(self, partition: TopicPartition) -> int | None: ...

    def assignment(self) -> frozenset[TopicPartition]: ...

    def seek(self, partition: TopicPartition, offset: int) -> None: ...


class EventLog(Protocol):
    """A partitioned, replicated log with consumer groups (Kafka, or the in-process version)."""

    def publisher(self) -> EventPublisher: ...

    def subscribe(self, topics: Iterable[str], group_id: str) -> AbstractAsyncContextManager[EventSubscription]: ...


# --------------------------------------------------------------------------- database stores
class UserStore(Protocol):
    """Users and their roles, so that ALL and ROLE audiences can be counted."""

    async def upsert(self, users: Sequence[User]) -> None: ...

    async def get(self, user_id: str) -> User | None: ...

    async def count(self, role: str | None = None) -> int:
        """All users, or those holding ``role``."""
        ...


class OutboxStore(Protocol):
    """Events waiting to be published; claims are leases so no lock is held while Kafka is awaited."""

    async def append(self, events: Sequence[OutboxEvent]) -> list[int]: ...

    async def claim(self, limit: int, lease: timedelta) -> list[ClaimedOutboxEvent]:
        """Lease up to ``limit`` unpublished rows that nobody else holds, oldest first."""
        ...

    async def mark_published(self, ids: Sequence[int]) -> None: ...

    async def release(self, ids: Sequence[int], error: str) -> None:
        """Give claimed rows back after a failed publish, recording why."""
        ...

    async def backlog(self) -> int: ...


# --------------------------------------------------------------------------- bus and presence (Redis)
@dataclass(frozen=True, slots=True)
class BusMessage:
    channel: str
    payload: bytes


class BusSubscription(Protocol):
    async def get(self, timeout_s: float = 1.0) -> BusMessage | None: ...


class Bus(Protocol):
    """At-most-once fan-out between instances (Redis pub/sub, or in-process)."""

    async def publish(self, channel: str, payload: bytes) -> int:
        """Send ``payload`` to current subscribers of ``channel``; returns how many received it."""
        ...

    def subscribe(self, channels: Sequence[str]) -> AbstractAsyncContextManager[BusSubscription]: ...


class Presence(Protocol):
    """Which instances hold live connections of a user; entries expire unless heartbeated."""

    async def heartbeat(self, user_id: str, instance_id: str) -> None: ...

    async def leave(self, user_id: str, instance_id: str) -> None: ...

    async def instances(self, user_id: str) -> frozenset[str]: ...


class Health(Protocol):
    """Anything readiness asks: raises ``UnavailableError`` (with a reason) when it cannot serve."""

    async def check(self) -> None: ...


TopicPartitionOffsets = Mapping[TopicPartition, int]
__all__ = [
    "Bus",
    "BusMessage",
    "BusSubscription",
    "EventLog",
    "EventPublisher",
    "EventRecord",
    "EventSubscription",
    "Health",
    "OutboxStore",
    "Presence",
    "RecordPosition",
    "TopicPartition",
    "TopicPartitionOffsets",
    "UserStore",
]
