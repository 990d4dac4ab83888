"""The outbox relay: the one write path from the database to Kafka.

Each round it leases a few lanes of the outbox and reads their due rows in id order (one short
transaction: ``FOR UPDATE SKIP LOCKED`` on the lane rows, then one statement for all their rows), publishes
them pipelined with the idempotent ``acks=all`` producer — holding no transaction or lock while it awaits
Kafka — then marks every acknowledged row published (an acknowledged row is never published again) and
gives the lanes back (one more transaction). One
owner per lane keeps per-key order; several relays (processes) share the lanes. Lanes come in two classes
(``constants.NORMAL_LANES``, ``PRIORITY_LANES``), each worked by a relay loop of its own, so a HIGH or URGENT
row never waits for a bulk round. A key's records go to one
partition in order, so a failure (a broker outage, a leader change) fails them together and they are
retried together. A row the event log refuses for itself (too large, corrupt: ``PublishError.poison``) is
a suspect: its lane is then published one row at a time up to it, and after ``poison_attempts`` refusals
it moves to the dead state (admins list and redrive it) and the lane goes on. Published rows are purged
after a retention period by a loop of their own (``OutboxPurger``), in small batches, so a large purge
never holds up publishing.

A crash between the acknowledgement and the mark leaves acknowledged rows unmarked: the relay that takes
the lane over (after the lease) publishes them again, so the topic may hold a record twice; consumers are
idempotent and clients drop an SSE id they already have. The fault suite puts a crash exactly there with
``testing.relay_exit_after_acks`` (off by default).
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import NoReturn

from broadcast.core.domain import ClaimedOutboxEvent
from broadcast.core.ports.log import EventPublisher, OutgoingRecord, RecordPosition
from broadcast.core.ports.stores import OutboxStore
from broadcast.core.settings import RelaySettings
from broadcast.errors import BroadcastError, PublishError
from broadcast.observability.loops import pause
from broadcast.observability.metrics import NO_METRICS, Metrics

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
        exit_after_acks: int | None = None,
        exit_process: Callable[[int], NoReturn] = os._exit,
        lanes: Sequence[int] | None = None,
    ) -> None:
        """``lanes``: the only lanes this relay claims (one class, ``constants.NORMAL_LANES`` or
        ``PRIORITY_LANES``); None: any."""
        self._metrics = metrics
        self._exit_after_acks = exit_after_acks  # the failpoint (``testing.relay_exit_after_acks``); None: off
        self._exit_process = exit_process
        self._acks = 0
        self._outbox = outbox
        self._publisher = publisher
        self._settings = settings
        self._owner = owner
        self._wakeup = wakeup or asyncio.Event()
        self._lease = timedelta(seconds=settings.lease_seconds)
        self._lanes = lanes
        self.published = 0

    def wake(self) -> None:
        """Called after a commit that wrote outbox rows, so the relay need not wait for its poll."""
        self._wakeup.set()

    async def run_once(self) -> int:
        """One round: returns how many rows were published (0 when there was nothing due). Two transactions
        when all goes well: ``claim`` (lanes and their due rows) and ``finish`` (marks and lane release)."""
        s = self._settings
        claimed = await self._outbox.claim(self._owner, s.lanes_per_claim, self._lease, s.batch_size, self._lanes)
        if not claimed:
            return 0
        lanes = sorted(claimed)
        acknowledged: list[int] = []  # filled as the event log acknowledges, marked even if the round fails
        try:
            published = await self._publish_lanes([claimed[lane] for lane in lanes], acknowledged)
        finally:
            await self._outbox.finish(self._owner, lanes, acknowledged)
        self.published += published
        return published

    async def _publish_lanes(self, batches: list[list[ClaimedOutboxEvent]], acknowledged: list[int]) -> int:
        """Publish the lanes' due rows: one pipelined call for the lanes without a suspect row; a lane
        holding a row the event log refused (poison) goes one row at a time up to its last suspect. How
        many were published; the pipelined call's acknowledged ids go to ``acknowledged`` (to be marked)."""
        together: list[ClaimedOutboxEvent] = []
        published = 0
        for batch in batches:
            suspects = 1 + max((i for i, r in enumerate(batch) if r.poison_attempts), default=-1)
            alone, lane_goes_on = await self._one_by_one(batch[:suspects])
            published += alone
            if lane_goes_on:
                together += batch[suspects:]
        return published + await self._together(together, acknowledged)

    async def _together(self, rows: list[ClaimedOutboxEvent], acknowledged: list[int]) -> int:
        """One pipelined publish; the acknowledged rows' ids go to ``acknowledged`` (the round's end marks
        them: none is ever published twice), each failed one is counted, and the ones the event log refused
        become suspects for the next round. How many were acknowledged."""
        if not rows:
            return 0
        outcomes = await self._publisher.publish_many([_record(r) for r in rows])
        self._count(rows, outcomes)
        ids = [r.id for r, o in zip(rows, outcomes, strict=True) if not isinstance(o, PublishError)]
        self._failpoint(len(ids))
        acknowledged += ids
        failed = [(r, o) for r, o in zip(rows, outcomes, strict=True) if isinstance(o, PublishError)]
        for poison in (False, True):
            group = [(r, o) for r, o in failed if o.poison is poison]
            if group:
                log.warning("%d rows not published, they wait for the next round: %s", len(group), group[0][1])
                await self._outbox.record_failure([r.id for r, _ in group], str(group[0][1]), poison=poison)
        return len(ids)

    async def _one_by_one(self, rows: list[ClaimedOutboxEvent]) -> tuple[int, bool]:
        """Publish ``rows`` alone each, in order, so a poison row fails alone: one refused
        ``poison_attempts`` times leaves its lane (dead) and the lane goes on. How many were published, and
        False when a row must wait (the rest of its lane waits too, keeping per-key order)."""
        published = 0
        for row in rows:
            [outcome] = await self._publisher.publish_many([_record(row)])
            self._count([row], [outcome])
            if not isinstance(outcome, PublishError):
                self._failpoint(1)
                await self._outbox.mark_published([row.id])
                published += 1
                continue
            await self._outbox.record_failure([row.id], str(outcome), poison=outcome.poison)
            if not outcome.poison or row.poison_attempts + 1 < self._settings.poison_attempts:
                return published, False
            await self._outbox.bury([row.id])
            self._metrics.outbox_buried.inc()
            log.error(
                "outbox row %d (%s, key %s) refused %d times, moved to the dead state: %s",
                row.id, row.event.topic, row.event.key, row.poison_attempts + 1, outcome,
            )  # fmt: skip
        return published, True

    def _failpoint(self, acknowledged: int) -> None:
        """The fault suite's crash between the acknowledgement and the mark: once ``exit_after_acks`` records
        were acknowledged in all, the process ends at once, leaving this round's rows acknowledged and not
        marked published (no ``finally``, no lane release, no shutdown: as a SIGKILL would)."""
        if self._exit_after_acks is None or not acknowledged:
            return
        self._acks += acknowledged
        if self._acks >= self._exit_after_acks:
            log.critical(
                "failpoint testing.relay_exit_after_acks=%d: exiting after %d acknowledged records, %d of them "
                "not marked published",
                self._exit_after_acks, self._acks, acknowledged,
            )  # fmt: skip
            for handler in logging.getLogger().handlers:
                handler.flush()
            self._exit_process(137)

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


class DelayedPublisher:
    """The fault suite's random per-publish delay (``testing.relay_publish_delay_ms``): waits 0..``max_ms``
    before handing each publish to ``inner``, so racing relays interleave in every possible way."""

    def __init__(self, inner: EventPublisher, max_ms: int) -> None:
        self._inner = inner
        self._max_s = max_ms / 1000

    async def publish(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        headers: Sequence[tuple[str, bytes]] = (),
        partition: int | None = None,
    ) -> RecordPosition:
        await asyncio.sleep(random.uniform(0, self._max_s))
        return await self._inner.publish(topic, key, value, headers, partition)

    async def publish_many(self, records: Sequence[OutgoingRecord]) -> list[RecordPosition | PublishError]:
        await asyncio.sleep(random.uniform(0, self._max_s))
        return await self._inner.publish_many(records)

    async def partitions_for(self, topic: str) -> int:
        return await self._inner.partitions_for(topic)


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


def _record(row: ClaimedOutboxEvent) -> OutgoingRecord:
    e = row.event
    return OutgoingRecord(e.topic, e.key.encode(), e.payload, e.headers)
