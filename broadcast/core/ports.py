"""Ports: the small protocols the core needs from the outside world, in the project's own vocabulary.

Each port has an in-memory adapter (embedded default, unit tests) and a real one (Kafka, SQL, Redis);
``tests/contract`` runs one behavioural suite against both. No vendor type crosses these signatures.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

from broadcast.core.domain import (
    Broadcast,
    BroadcastStats,
    BroadcastStatus,
    ClaimedOutboxEvent,
    DeadOutboxRow,
    Delivery,
    InboxItem,
    OutboxEvent,
    Page,
    Principal,
    User,
)
from broadcast.core.reach import ReachRow
from broadcast.errors import PublishError


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


# --------------------------------------------------------------------------- database stores
class UserStore(Protocol):
    """Users and their roles, so that ALL and ROLE audiences can be counted."""

    async def upsert(self, users: Sequence[User]) -> None: ...

    async def get(self, user_id: str) -> User | None: ...

    async def get_many(self, user_ids: Sequence[str]) -> dict[str, User | None]:
        """``get`` for many users in one round trip: every id asked for is a key (None: no such user)."""
        ...

    async def count(self, roles: Sequence[str] | None = None) -> int:
        """All users, or the distinct users holding any of ``roles``."""
        ...


class OutboxStore(Protocol):
    """Events waiting to be published, split into lanes by key hash.

    A relay leases whole lanes (``claim_lanes``, ``FOR UPDATE SKIP LOCKED`` on the lane rows, committed at
    once), reads their due rows in id order and publishes them with no lock held; one owner per lane keeps
    per-key order while several relays share the work. ``among`` restricts a claim to a set of lanes (the
    normal or the priority class, ``constants.NORMAL_LANES``/``PRIORITY_LANES``); None: any lane.
    """

    async def append(self, events: Sequence[OutboxEvent]) -> list[int]: ...

    async def claim_lanes(
        self, owner: str, max_lanes: int, lease: timedelta, among: Sequence[int] | None = None
    ) -> list[int]:
        """Lease up to ``max_lanes`` lanes that have due rows and no live owner (least recently served first)."""
        ...

    async def release_lanes(self, owner: str, lanes: Sequence[int]) -> None: ...

    async def due(self, lane: int, limit: int) -> list[ClaimedOutboxEvent]:
        """The oldest unpublished rows of ``lane`` whose ``not_before`` has passed, in id order."""
        ...

    async def mark_published(self, ids: Sequence[int]) -> None: ...

    async def claim(
        self, owner: str, max_lanes: int, lease: timedelta, limit: int, among: Sequence[int] | None = None
    ) -> dict[int, list[ClaimedOutboxEvent]]:
        """``claim_lanes``, then ``due(lane, limit)`` of each lane it got, at once: the relay's round start."""
        ...

    async def finish(self, owner: str, lanes: Sequence[int], published: Sequence[int]) -> None:
        """``mark_published(published)`` and ``release_lanes(owner, lanes)`` at once (one transaction): the
        relay's round end."""
        ...

    async def record_failure(self, ids: Sequence[int], error: str, poison: bool = False) -> None:
        """Count a failed publish of each row (``poison``: the event log refused the record itself)."""
        ...

    async def bury(self, ids: Sequence[int]) -> int:
        """Move the rows to the dead state, out of their lanes (one transaction); how many moved."""
        ...

    async def dead(self, limit: int, before_id: int | None = None) -> list[DeadOutboxRow]:
        """Dead rows, newest first (ids below ``before_id``)."""
        ...

    async def dead_count(self) -> int: ...

    async def redrive_dead(self, dead_id: int) -> int | None:
        """Put a dead row back at the end of its lane, attempts reset; its new outbox id, None if unknown."""
        ...

    async def purge_dead(self, dead_id: int) -> bool: ...

    async def purge_published(self, older_than: timedelta, limit: int) -> int:
        """Delete at most ``limit`` rows published more than ``older_than`` ago; how many were deleted."""
        ...

    async def backlog(self) -> int: ...

    async def oldest_unpublished(self) -> datetime | None:
        """Since when the longest-waiting due row has been due (its ``not_before``, else when it was
        written); None when nothing due is unpublished. Rows scheduled for later are not waiting yet."""
        ...


class BroadcastStore(Protocol):
    """Broadcasts, their recipients' rows and their outbox rows, each change in one transaction."""

    async def create(
        self,
        broadcast: Broadcast,
        recipients: Sequence[str],
        events: Iterable[OutboxEvent],
        idempotency_key: str | None,
        request_hash: str,
    ) -> tuple[Broadcast, bool]:
        """Write everything or nothing; an existing ``idempotency_key`` returns that broadcast and False."""
        ...

    async def get(self, broadcast_id: str) -> Broadcast | None: ...

    async def list_broadcasts(
        self, status: BroadcastStatus | None, cursor: str | None, limit: int
    ) -> Page[Broadcast]: ...

    async def transition(
        self,
        broadcast_id: str,
        allowed: frozenset[BroadcastStatus],
        to: BroadcastStatus,
        events: Callable[[Broadcast], Sequence[OutboxEvent]],
        drop_undelivered: bool,
    ) -> Broadcast:
        """Move to ``to`` if the status is in ``allowed`` (else ConflictError), writing ``events`` with it."""
        ...

    async def due(self, status: BroadcastStatus, now: datetime, limit: int) -> list[str]:
        """SCHEDULED broadcasts whose time has come, or ACTIVE ones past their expiry."""
        ...

    async def stats(self, broadcast_id: str) -> BroadcastStats | None: ...

    async def deliveries(self, broadcast_id: str, cursor: str | None, limit: int) -> Page[Delivery]: ...

    def leadership(self, name: str) -> AbstractAsyncContextManager[bool]:
        """True inside the block for exactly one holder across processes (advisory lock)."""
        ...


@dataclass(frozen=True, slots=True)
class GroupPage:
    """The newest group broadcasts a query matched, oldest first; ``complete`` is False when older ones were
    left out (more than the limit matched, or more than the store scans), so a reader must say so (RESYNC)."""

    items: list[InboxItem]
    complete: bool


class InboxStore(Protocol):
    """What each user has, has missed and has read (see ``adapters/sql_inbox.py``)."""

    async def row_for(self, broadcast_id: str, user_id: str) -> int: ...

    async def rows_for(self, pairs: Sequence[tuple[str, str]]) -> dict[tuple[str, str], int]:
        """``row_for`` for many (broadcast id, user id) pairs at once (repeats allowed): their row ids, the
        missing rows created PENDING, existing rows left unchanged. ``RejectedByDatabaseError`` when a pair
        cannot have a row (an unknown broadcast): then none of the batch's missing rows was created."""
        ...

    async def pending(self, user_id: str, limit: int) -> list[InboxItem]:
        """The user's newest ``limit`` PENDING rows, oldest first."""
        ...

    async def pending_for(self, user_ids: Sequence[str], limit: int) -> list[tuple[str, InboxItem]]:
        """PENDING rows of any of ``user_ids`` (user id, item), oldest first — one query for many users."""
        ...

    async def selected_after(self, user_id: str, row_id: int, since: datetime, limit: int) -> list[InboxItem]:
        """A resume's SELECTED rows: after the cursor row ``row_id`` (0: created after ``since``), PENDING, or
        delivered since the cursor's moment ``since`` (the priority class overtakes older rows), in row order."""
        ...

    async def row_created_at(self, user_id: str, row_id: int) -> datetime | None: ...

    async def group(self, user_id: str, roles: frozenset[str], since: datetime | None, limit: int) -> GroupPage:
        """The user's visible ALL/ROLE broadcasts created after ``since`` (None: the unread ones): the newest
        ``limit`` of them, oldest first, and whether that is all of them."""
        ...

    async def inbox(self, user_id: str, roles: frozenset[str]) -> list[InboxItem]: ...

    async def mark_read(self, user_id: str, roles: frozenset[str], broadcast_ids: Sequence[str]) -> list[str]:
        """Mark read only what the user received or is targeted by; returns the newly read ids."""
        ...

    async def mark_delivered(self, pairs: Sequence[tuple[str, str]]) -> int:
        """SELECTED rows written to a live stream, as (broadcast id, user id): PENDING → DELIVERED; a pair
        without a row changes nothing. Returns how many rows changed."""
        ...

    async def user_numbers(self, user_ids: Sequence[str]) -> dict[str, int]:
        """Each user's number for the group tallies, assigned on first use (``broadcast/core/reach.py``)."""
        ...

    async def save_reach(self, rows: Sequence[ReachRow]) -> int:
        """Store group tallies, each replacing its earlier version; returns how many were stored (a tally of
        a broadcast that no longer exists is left out)."""
        ...

    async def pending_count(self) -> int:
        """SELECTED rows still PENDING, across all users."""
        ...


# --------------------------------------------------------------------------- bus and presence (Redis)
@dataclass(frozen=True, slots=True)
class BusMessage:
    channel: str
    payload: bytes


class BusSubscription(Protocol):
    async def get(self, timeout_s: float = 1.0) -> BusMessage | None:
        """The next message, or None after ``timeout_s`` (0: only one that has already arrived)."""
        ...


class Bus(Protocol):
    """At-most-once fan-out between instances (Redis pub/sub, or in-process)."""

    async def publish(self, channel: str, payload: bytes) -> int:
        """Send ``payload`` to current subscribers of ``channel``; returns how many received it."""
        ...

    async def publish_many(self, messages: Sequence[tuple[str, bytes]]) -> list[int]:
        """``publish`` for many (channel, payload) messages in one round trip, sent in order; the receiver
        counts in the same order. On ``UnavailableError`` some of them may have gone out."""
        ...

    def subscribe(self, channels: Sequence[str]) -> AbstractAsyncContextManager[BusSubscription]: ...


class Presence(Protocol):
    """Which instances hold live connections of a user; entries expire unless heartbeated."""

    async def heartbeat(self, user_id: str, instance_id: str) -> None: ...

    async def heartbeat_many(self, user_ids: Sequence[str], instance_id: str) -> None:
        """``heartbeat`` for many users in one round trip (an instance refreshing all its users)."""
        ...

    async def leave(self, user_id: str, instance_id: str) -> None: ...

    async def instances(self, user_id: str) -> frozenset[str]: ...

    async def instances_many(self, user_ids: Sequence[str]) -> dict[str, frozenset[str]]:
        """``instances`` of many users in one round trip: every user asked about is a key (empty: offline)."""
        ...


class TicketStore(Protocol):
    """Single-use SSE tickets: ``issue`` binds one to a principal for ``ttl_s``; ``redeem`` consumes it."""

    async def issue(self, principal: Principal, ttl_s: int) -> str: ...

    async def redeem(self, ticket: str) -> Principal | None:
        """The ticket's principal, once; None when unknown, used or expired. Raises ``UnavailableError``."""
        ...


class ConnectionSlots(Protocol):
    """Open streams per user across all instances; a slot expires unless refreshed (a crashed instance's
    slots free themselves)."""

    async def acquire(self, user_id: str, slot: str, limit: int) -> bool:
        """Take ``slot`` for ``user_id`` unless the user already holds ``limit`` live slots."""
        ...

    async def release(self, user_id: str, slot: str) -> None: ...

    async def refresh(self, slots: Sequence[tuple[str, str]]) -> None:
        """Keep ``(user_id, slot)`` pairs alive, re-adding any that expired (called periodically by the
        instance holding them: after an outage the count is true again)."""
        ...


class Health(Protocol):
    """Anything readiness asks: raises ``UnavailableError`` (with a reason) when it cannot serve."""

    async def check(self) -> None: ...
