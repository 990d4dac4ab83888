"""The outbox relay: the one write path from the database to Kafka.

Each round it leases a few lanes of the outbox (a short transaction of its own, ``FOR UPDATE SKIP
LOCKED`` on the lane rows), reads their due rows in id order, publishes them pipelined with the
idempotent ``acks=all`` producer — holding no transaction or lock while it awaits Kafka — marks the
acknowledged prefix published and gives the lanes back. One owner per lane keeps per-key order; several
relays (processes) share the lanes. Rows after a failed one in the same lane wait for the next round, so
a key's later event never overtakes an earlier one. Published rows are purged after a retention period by a
loop of their own (``OutboxPurger``), in small batches, so a large purge never holds up publishing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import timedelta

from broadcast.domain import ClaimedOutboxEvent
from broadcast.errors import BroadcastError, PublishError
from broadcast.loops import pause
from broadcast.metrics import NO_METRICS, Metrics
from broadcast.ports import EventPublisher, OutboxStore, OutgoingRecord, RecordPosition
from broadcast.settings import RelaySettings

log = logging.getLogger(__name__)
PURGE_EVERY_S = 60.0
PURGE_BATCH = 2_000  # rows per DELETE: a short transaction, whatever the backlog of published rows
PURGE_PAUSE_S = 0.05  # between batches, so the relay's and the API's transactions interleave
ERROR_BACKOFF_S = 1.0


class OutboxRelay:
    """Moves outbox rows to the event log; ``run`` loops until ``stop`` is set."""

    def __init__(
        self,
        outbox: OutboxStore,
        publisher: EventPublisher,
        settings: RelaySettings,
        owner: str,
        wakeup: asyncio.Event | None = None,
        metrics: Metrics = NO_METRICS,
    ) -> None:
        self._metrics = metrics
        self._outbox = outbox
        self._publisher = publisher
        self._settings = settings
        self._owner = owner
        self._wakeup = wakeup or asyncio.Event()
        self._lease = timedelta(seconds=settings.lease_seconds)
        self.published = 0

    def wake(self) -> None:
        """Called after a commit that wrote outbox rows, so the relay need not wait for its poll."""
        self._wakeup.set()

    async def run_once(self) -> int:
        """One round: returns how many rows were published (0 when there was nothing due)."""
        lanes = await self._outbox.claim_lanes(self._owner, self._settings.lanes_per_claim, self._lease)
        if not lanes:
            return 0
        try:
            published = await self._publish_lanes(lanes)
        finally:
            await self._outbox.release_lanes(self._owner, lanes)
        self.published += published
        return published

    async def _publish_lanes(self, lanes: list[int]) -> int:
        """Publish the due rows of ``lanes`` in one pipelined call (few, full batches per partition)."""
        batches = [await self._outbox.due(lane, self._settings.batch_size) for lane in lanes]
        rows = [row for batch in batches for row in batch]
        if not rows:
            return 0
        results = iter(
            await self._publisher.publish_many(
                [OutgoingRecord(r.event.topic, r.event.key.encode(), r.event.payload, r.event.headers) for r in rows]
            )
        )
        acknowledged: list[int] = []
        for lane, batch in zip(lanes, batches, strict=True):
            outcomes = [next(results) for _ in batch]
            self._count(batch, outcomes)
            failed_at = next((i for i, o in enumerate(outcomes) if isinstance(o, PublishError)), len(batch))
            acknowledged += [r.id for r in batch[:failed_at]]  # a key's later rows never overtake a failed one
            if failed_at < len(batch):
                log.warning(
                    "lane %d: %d rows wait for the next round: %s", lane, len(batch) - failed_at, outcomes[failed_at]
                )
                await self._outbox.record_failure([batch[failed_at].id], str(outcomes[failed_at]))
        await self._outbox.mark_published(acknowledged)
        return len(acknowledged)

    def _count(self, rows: list[ClaimedOutboxEvent], outcomes: list[RecordPosition | PublishError]) -> None:
        by_topic: dict[str, list[int]] = {}
        for row, outcome in zip(rows, outcomes, strict=True):
            by_topic.setdefault(row.event.topic, [0, 0])[isinstance(outcome, PublishError)] += 1
        for topic, (acknowledged, failed) in by_topic.items():
            self._metrics.produced(topic, acknowledged, failed)

    async def run(self, stop: asyncio.Event) -> None:
        """Publish until ``stop`` is set; sleeps on the wake-up event when idle, backs off on errors."""
        while not stop.is_set():
            self._wakeup.clear()  # before the round: a commit during it wakes the next one at once
            try:
                published = await self.run_once()
            except BroadcastError as exc:
                log.warning("outbox relay round failed: %s", exc)
                published = 0
                await pause(stop, ERROR_BACKOFF_S)
            if published == 0:
                await pause(stop, self._settings.idle_poll_seconds, self._wakeup)


class OutboxPurger:
    """Deletes published outbox rows older than ``retention_seconds``: every ``PURGE_EVERY_S``, in batches of
    ``PURGE_BATCH`` rows, each its own short transaction, until none is left; off the relay's loop."""

    def __init__(self, outbox: OutboxStore, settings: RelaySettings, every_s: float = PURGE_EVERY_S) -> None:
        self._outbox = outbox
        self._retention = timedelta(seconds=settings.retention_seconds)
        self._every_s = every_s
        self.purged = 0

    async def run_once(self, stop: asyncio.Event) -> int:
        purged = 0
        while not stop.is_set():
            deleted = await self._outbox.purge_published(self._retention, PURGE_BATCH)
            purged += deleted
            if deleted < PURGE_BATCH:
                break
            await pause(stop, PURGE_PAUSE_S)
        self.purged += purged
        return purged

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await pause(stop, self._every_s)
            try:
                started = time.monotonic()
                if purged := await self.run_once(stop):
                    log.info("purged %d published outbox rows in %.1f s", purged, time.monotonic() - started)
            except BroadcastError as exc:
                log.warning("outbox purge failed: %s", exc)
