"""The loops that keep an instance's streams fed: bus listener, reconciliation, presence, delivery marks.

- ``BusListener``: subscribes to this instance's channel and the group channel, hands each message's
  pre-encoded frame to the hub; resubscribes on its own after a Redis outage, then names this instance in
  presence again (``rejoin``: a restarted Redis forgot it, and until then the delivery consumer leaves the
  users' messages PENDING) and runs a reconciliation round (``catch_up``) *before* it reads a live message:
  pub/sub dropped whatever was sent meanwhile, and a user's newer live messages must not overtake the older
  ones the round replays (per-user order, DESIGN invariant 4). Rejoining first matters: a message whose
  presence lookup came before it has its PENDING row written already, so the round finds it; one whose
  lookup came after it is published to the subscription, where Redis holds it until the round is done.
- ``Reconciler``: every few seconds, sends connected users their PENDING rows the live path missed; after
  the bus listener resubscribes (``BusGaps``), also the ALL/ROLE broadcasts created since shortly before
  the subscription was last known working, since group messages have no PENDING row to fall back on.
- ``Heartbeat``: a comment frame on every stream every ~15 s.
- ``PresenceKeeper``: heartbeats presence for every locally connected user (entries expire otherwise).
- ``DeliveredMarker``: batches "written to a live stream" marks into PENDING → DELIVERED updates (SELECTED)
  and group tallies (ALL/ROLE).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

import orjson

from broadcast.core import constants
from broadcast.core.ports.bus import Bus, BusMessage, Presence
from broadcast.core.ports.stores import InboxStore
from broadcast.core.reach import Reach
from broadcast.errors import BroadcastError
from broadcast.observability.loops import pause
from sse.admission import Admission
from sse.frames import HEARTBEAT, EventName, frame
from sse.hub import Connection, Hub, Matches, Outgoing
from sse.messages import item_frame
from sse.seen import BUS_GAP, DELIVERY_MARKS, SeenClock

log = logging.getLogger(__name__)
RECONCILE_BATCH = 5_000  # rows per sweep, oldest first, across every user connected here
# How far before the last working moment of a lost subscription group broadcasts are replayed: a group
# record consumed (and published to nobody) during the gap was usually created shortly before it.
GAP_LOOKBACK_S = 120.0
# How long live messages wait, after a resubscription, for the catch-up round: past it (the database is
# slow or down) live delivery goes on, and the reconciler's later rounds fill the gap (nothing is lost, but
# a replayed message can then arrive after a newer live one).
CATCH_UP_TIMEOUT_S = 10.0
DRAIN_MAX = 256  # bus messages taken at once when a burst has queued up
GAP_TOO_LONG = "live delivery was interrupted for longer than the server replays: the newest follow; refetch the inbox"


class BusGaps:
    """Since when the bus may have dropped group messages for this instance, and which connections were
    open then (ids up to ``upto``; newer ones had their own catch-up): the bus listener adds a gap when
    it resubscribes after losing its subscription; the reconciler takes it and replays."""

    def __init__(self) -> None:
        self.since: datetime | None = None
        self.upto = 0

    def add(self, since: datetime, upto: int) -> None:
        self.since = since if self.since is None else min(self.since, since)
        self.upto = max(self.upto, upto)

    def take(self) -> tuple[datetime, int] | None:
        if self.since is None:
            return None
        gap, self.since, self.upto = (self.since, self.upto), None, 0
        return gap


def _group_matches(target_type: str, roles: frozenset[str]) -> Matches | None:
    """None (everyone) for ALL; for ROLE, connections holding one of ``roles``."""
    if target_type == "ALL":
        return None
    return lambda connection: bool(connection.roles & roles)


def _holding(roles: frozenset[str], upto: int) -> Callable[[Connection], bool]:
    return lambda connection: connection.roles == roles and connection.id <= upto


class BusListener:
    def __init__(
        self,
        bus: Bus,
        hub: Hub,
        instance_id: str,
        reconcile_now: asyncio.Event,
        gaps: BusGaps | None = None,
        subscribed: asyncio.Event | None = None,
        catch_up: Callable[[], Awaitable[object]] | None = None,
        rejoin: Callable[[], Awaitable[object]] | None = None,
    ) -> None:
        self._bus = bus
        self._rejoin = rejoin  # presence (and connection slots) written again, after each resubscription
        self._catch_up = catch_up  # a reconciliation round, run after the rejoin
        self._hub = hub
        self._channels = [constants.instance_channel(instance_id), constants.REDIS_GROUP_CHANNEL]
        self._reconcile_now = reconcile_now
        self._gaps = gaps or BusGaps()
        self.subscribed = subscribed or asyncio.Event()  # set while the subscription is confirmed
        self._working_at: float | None = None  # wall time the subscription last answered

    async def run(self, stop: asyncio.Event) -> None:
        self._working_at = time.time()  # a first subscription that fails is a gap from here
        first = True
        while not stop.is_set():
            try:
                async with self._bus.subscribe(self._channels) as subscription:
                    if not first:  # a re-subscription: group messages may have been lost meanwhile
                        since = datetime.fromtimestamp(self._working_at - GAP_LOOKBACK_S, tz=UTC)
                        self._gaps.add(since, self._hub.last_id)
                    self.subscribed.set()
                    if first:
                        self._reconcile_now.set()
                    else:
                        await self._caught_up()
                    first = False
                    while not stop.is_set():
                        message = await subscription.get(timeout_s=1.0)
                        self._working_at = time.time()
                        if message is None:
                            continue
                        burst = [message]  # and whatever else has arrived meanwhile (a burst): one write each
                        while len(burst) < DRAIN_MAX and (more := await subscription.get(timeout_s=0)) is not None:
                            burst.append(more)
                        await self.dispatch_many(burst)
            except BroadcastError as exc:
                self.subscribed.clear()
                self._hub.seen_clock.hold(BUS_GAP)  # until the gap is replayed: connections forget nothing
                first = False
                log.warning("bus subscription lost, resubscribing: %s", exc)
                await pause(stop, 1.0)

    async def _caught_up(self) -> None:
        """Replay what the gap swallowed before any live message is read (see the module's docstring)."""
        if self._rejoin is not None:
            try:
                await asyncio.wait_for(self._rejoin(), CATCH_UP_TIMEOUT_S)
            except (BroadcastError, TimeoutError) as exc:
                log.warning("presence not written again after a bus gap: %r", exc)
        if self._catch_up is None:
            self._reconcile_now.set()
            return
        try:
            await asyncio.wait_for(self._catch_up(), CATCH_UP_TIMEOUT_S)
        except (BroadcastError, TimeoutError) as exc:
            self._reconcile_now.set()  # the reconciler's own rounds go on with the gap
            log.warning("catch-up after a bus gap failed, live delivery goes on: %r", exc)

    def dispatch(self, message: BusMessage) -> int:
        """Hand one message to the hub at once; returns how many connections took it."""
        parsed = _parse(message)
        if parsed is None:
            return 0
        user_id, matches, item = parsed
        return self._hub.to_user(user_id, item) if user_id is not None else self._hub.to_matching(matches, item)

    async def dispatch_many(self, messages: list[BusMessage]) -> int:
        """Hand messages to the hub in order; consecutive group messages go out as one fan-out, each
        connection getting the ones it matches in a single write (``Hub.fan_out``)."""
        offers = 0
        group: list[tuple[Matches | None, Outgoing]] = []
        for message in messages:
            parsed = _parse(message)
            if parsed is None:
                continue
            user_id, matches, item = parsed
            if user_id is None:
                group.append((matches, item))
                continue
            if group:
                offers += await self._hub.fan_out(group)
                group = []
            offers += self._hub.to_user(user_id, item)
        if group:
            offers += await self._hub.fan_out(group)
        return offers


def _parse(message: BusMessage) -> tuple[str | None, Matches | None, Outgoing] | None:
    """(user id, None, item) for one user's message; (None, matches, item) for the connections ``matches``
    accepts (None: every connection); None for a malformed message (logged, dropped)."""
    try:
        payload = orjson.loads(message.payload)
        data = payload["frame"].encode()
        created = float(payload.get("at") or 0.0)
        if payload["kind"] == "user":
            item = Outgoing(data, payload.get("broadcast"), counts=bool(payload.get("delivers")), created=created)
            return str(payload["user"]), None, item
        if payload["kind"] == "group":
            matches = _group_matches(payload["targetType"], frozenset(payload["roles"]))
            counts = payload.get("counts", True)
            return None, matches, Outgoing(data, payload["broadcast"], counts, created=created, group=True)
        return None, None, Outgoing(data)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        log.error("malformed bus message on %s dropped: %r", message.channel, exc)
        return None


class Reconciler:
    def __init__(
        self,
        inbox: InboxStore,
        hub: Hub,
        interval_s: float,
        now: asyncio.Event,
        gaps: BusGaps | None = None,
        subscribed: asyncio.Event | None = None,
        replay_limit: int = 1_000,
    ) -> None:
        self._inbox = inbox
        self._replay_limit = replay_limit
        self._hub = hub
        self._interval_s = interval_s
        self._now = now
        self._gaps = gaps or BusGaps()
        self._subscribed = subscribed  # the bus listener's: a gap is still open while it is clear
        self.pushed = 0

    async def run_once(self) -> int:
        """One query (per few hundred users) for the PENDING rows of everyone connected here; after a bus
        gap, one query per distinct role set for the group broadcasts since it."""
        pushed = 0
        # Only to the connections open before the query: a newer one read its own catch-up after it, so what
        # the query saw PENDING may since have been written to that user's closed stream and marked (its
        # client holds it, and a resume from its cursor leaves it out); offering it would show it twice.
        upto = self._hub.last_id
        for user_id, item in await self._inbox.pending_for(self._hub.users(), RECONCILE_BATCH):
            outgoing = Outgoing(item_frame(item), item.broadcast.id, counts=True, path="reconciliation")
            if self._hub.to_user(user_id, outgoing, upto):
                pushed += 1
        if (gap := self._gaps.take()) is not None:
            try:
                pushed += await self._replay_group(*gap)
            except BaseException:  # an error, or the listener's catch-up timed out: the next round tries again
                self._gaps.add(*gap)
                raise
            if self._gaps.since is None and (self._subscribed is None or self._subscribed.is_set()):
                self._hub.seen_clock.release(BUS_GAP)  # replayed, and no gap open since: forget old ids again
        self.pushed += pushed
        return pushed

    async def _replay_group(self, since: datetime, upto: int) -> int:
        """ALL/ROLE broadcasts created after ``since`` to the connections open during the gap (ids up to
        ``upto``) they match; a connection skips the ones it already has (``Connection.seen``), so only
        what the gap swallowed is written. More than ``replay_limit``: RESYNC first, then the newest."""
        pushed = 0
        for roles in {c.roles for c in self._hub.connections() if c.id <= upto}:
            holding = _holding(roles, upto)
            page = await self._inbox.group("", roles, since, self._replay_limit)
            if not page.complete:
                self._hub.to_matching(holding, Outgoing(frame(EventName.RESYNC, {"reason": GAP_TOO_LONG})))
                log.warning(
                    "a bus gap since %s swallowed more than %d group broadcasts: RESYNC", since, len(page.items)
                )
            for item in page.items:
                counts = not item.broadcast.fire_and_forget  # as on the live path
                outgoing = Outgoing(item_frame(item), item.broadcast.id, counts, "reconciliation", group=True)
                pushed += self._hub.to_matching(holding, outgoing)
        if pushed:
            log.info("replayed group broadcasts since %s after a bus gap (%d offers)", since.isoformat(), pushed)
        return pushed

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self._now.clear()
            try:
                await self.run_once()
            except BroadcastError as exc:
                log.warning("reconciliation failed: %s", exc)
            await pause(stop, self._interval_s, self._now)


class PresenceKeeper:
    """Refreshes this instance's presence entries and connection slots before they expire."""

    def __init__(self, presence: Presence, admission: Admission, hub: Hub, instance_id: str, interval_s: float) -> None:
        self._presence = presence
        self._admission = admission
        self._hub = hub
        self._instance_id = instance_id
        self._interval_s = interval_s

    async def beat(self) -> None:
        """One round: presence for every locally connected user, then their connection slots."""
        try:
            await self._presence.heartbeat_many(self._hub.users(), self._instance_id)
        except BroadcastError as exc:
            log.warning("presence heartbeat failed: %s", exc)
        try:
            await self._admission.refresh(list(self._hub.connections()))
        except BroadcastError as exc:
            log.warning("connection slot refresh failed: %s", exc)

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self.beat()
            await pause(stop, self._interval_s)


class Heartbeat:
    """A comment frame on every stream every few seconds, so proxies and browsers keep it open."""

    def __init__(self, hub: Hub, interval_s: float) -> None:
        self._hub = hub
        self._interval_s = interval_s

    async def run(self, stop: asyncio.Event) -> None:
        beat = Outgoing(HEARTBEAT)
        while not stop.is_set():
            await pause(stop, self._interval_s)
            self._hub.to_matching(None, beat)


class DeliveredMarker:
    """Batches what streams were written: SELECTED rows go PENDING → DELIVERED (``mark_delivered``); group
    broadcasts' deliveries are tallied per broadcast in this process's ``Reach`` and the tallies that grew
    are saved, one row per broadcast (``save_reach``): never a row per user."""

    def __init__(
        self, inbox: InboxStore, interval_s: float, seen_clock: SeenClock | None = None, reach: Reach | None = None
    ) -> None:
        self._inbox = inbox
        self._interval_s = interval_s
        self._seen_clock = seen_clock or SeenClock()  # held while marks fail (the rows stay PENDING)
        self._reach = reach or Reach("local")
        self._pending: set[tuple[str, str]] = set()
        self._groups: dict[str, set[str]] = {}
        self.marked = 0

    def add(self, broadcast_id: str, user_id: str, group: bool = False) -> None:
        if group:
            self._groups.setdefault(broadcast_id, set()).add(user_id)
        else:
            self._pending.add((broadcast_id, user_id))

    async def flush(self) -> None:
        await self._mark_rows()
        await self._tally_groups()

    async def _mark_rows(self) -> None:
        batch, self._pending = list(self._pending), set()
        if not batch:
            self._seen_clock.release(DELIVERY_MARKS)
            return
        try:
            self.marked += await self._inbox.mark_delivered(batch)
        except BroadcastError as exc:
            log.warning("could not mark %d deliveries, retrying: %s", len(batch), exc)
            self._pending.update(batch)
            # the reconciler will offer these rows again: their connections must not forget them meanwhile
            self._seen_clock.hold(DELIVERY_MARKS)
            return
        self._seen_clock.release(DELIVERY_MARKS)

    async def _tally_groups(self) -> None:
        groups, self._groups = self._groups, {}
        try:
            unknown = self._reach.unknown(u for users in groups.values() for u in users)
            numbers = await self._inbox.user_numbers(unknown) if unknown else {}
        except BroadcastError as exc:  # counted next time: the stats lag, nothing else waits on them
            log.warning("could not number %d users for the group tallies, retrying: %s", len(unknown), exc)
            for broadcast_id, users in groups.items():
                self._groups.setdefault(broadcast_id, set()).update(users)
            return
        self._reach.learn(numbers)
        for broadcast_id, users in groups.items():
            self._reach.add(broadcast_id, users, numbers)
        rows = self._reach.dirty()
        if not rows:
            return
        try:
            await self._inbox.save_reach(rows)
        except BroadcastError as exc:  # the tallies stay dirty: saved whole next time
            log.warning("could not save %d group tallies, retrying: %s", len(rows), exc)
            return
        self._reach.saved(rows)

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await pause(stop, self._interval_s)
            await self.flush()
        await self.flush()
