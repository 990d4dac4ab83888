"""The SSE hub: writes from the fan-out loop, bounded backlogs, slow clients dropped, per-user caps."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import orjson
import pytest

from broadcast.adapters.memory.bus import MemoryBus, MemoryPresence, MemorySubscriptionQueue
from broadcast.adapters.memory.sessions import MemorySlots
from broadcast.core import constants
from broadcast.core.domain import Broadcast, BroadcastStatus, InboxItem, Priority, TargetType
from broadcast.core.ports.stores import GroupPage, InboxStore
from broadcast.core.settings import LimitsSettings
from broadcast.errors import ConflictError, UnavailableError
from sse.admission import Admission
from sse.fanout import BusGaps, BusListener, DeliveredMarker, Heartbeat, PresenceKeeper, Reconciler
from sse.frames import HEARTBEAT, Cursor, frame, parse_cursor
from sse.hub import Connection, Hub, Outgoing
from sse.messages import item_frame
from sse.seen import BUS_GAP, DELIVERY_MARKS, SeenClock
from tests.waiting import wait_until


class Socket:
    """A fake ASGI ``send``: records body chunks; while ``paused`` a write waits, like a full socket buffer."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        self.ended = False
        self.writable = asyncio.Event()
        self.writable.set()
        self.aborted = False

    async def send(self, message: dict[str, Any]) -> None:
        await self.writable.wait()
        self.bodies.append(message["body"])
        self.ended = self.ended or not message["more_body"]

    def abort(self) -> None:
        self.aborted = True


def started(hub: Hub, user: str, roles: frozenset[str] = frozenset()) -> tuple[Connection, Socket]:
    connection, socket = hub.open(user, roles), Socket()
    connection.start(socket.send, socket.abort, b"head", [])
    return connection, socket


async def test_bytes_are_written_during_the_offer_and_the_same_object_reaches_every_connection() -> None:
    hub = Hub(queue_size=4, max_per_user=5)
    (_, alice), (_, bob) = started(hub, "alice"), started(hub, "bob")
    item = Outgoing(b"event: MESSAGE\ndata: {}\n\n")
    assert hub.to_matching(None, item) == 2
    assert alice.bodies[-1] is item.data and bob.bodies[-1] is item.data, "written at once, not queued"


async def test_a_blocked_socket_queues_coalesces_and_marks_delivered_only_once_written() -> None:
    marked: list[tuple[str, str, bool]] = []
    hub = Hub(queue_size=4, max_per_user=5, delivered=lambda *mark: marked.append(mark))
    connection, socket = started(hub, "alice")
    socket.writable.clear()
    hub.to_user("alice", Outgoing(b"1", "b1", counts=True))
    hub.to_user("alice", Outgoing(b"2", "b2", counts=True))
    hub.to_user("alice", Outgoing(b"3", "b3", counts=True, group=True))
    assert socket.bodies == [b"head"] and marked == []
    socket.writable.set()
    await asyncio.sleep(0.01)
    assert socket.bodies == [b"head", b"1", b"23"], "what queued behind a blocked write goes out in one chunk"
    assert marked == [("b1", "alice", False), ("b2", "alice", False), ("b3", "alice", True)]
    assert not connection.closed


async def test_a_connection_whose_backlog_overflows_is_dropped_and_others_keep_receiving() -> None:
    hub = Hub(queue_size=3, max_per_user=5)
    (slow, slow_socket), (fast, fast_socket) = started(hub, "alice"), started(hub, "bob")
    slow_socket.writable.clear()
    frame = Outgoing(b"x")
    for _ in range(4):  # one in flight + 3 queued
        assert hub.to_matching(None, frame) == 2
    assert hub.to_matching(None, frame) == 1
    assert slow.dropped and slow_socket.aborted and hub.dropped == 1
    assert len(fast_socket.bodies) == 6 and not fast.closed
    slow_socket.writable.set()
    await asyncio.sleep(0.01)
    assert slow_socket.bodies == [b"head"], "nothing more is written to a dropped connection"


async def test_a_write_blocked_longer_than_the_send_timeout_drops_the_connection() -> None:
    hub = Hub(queue_size=100, max_per_user=5, send_timeout=0.05)
    connection, socket = started(hub, "alice")
    socket.writable.clear()
    hub.to_user("alice", Outgoing(b"1"))
    await asyncio.sleep(0.02)
    assert not connection.dropped
    await asyncio.sleep(0.08)
    assert connection.dropped and socket.aborted


async def test_connections_per_user_are_capped_and_freed_on_close() -> None:
    hub = Hub(queue_size=4, max_per_user=2)
    first = hub.open("alice", frozenset())
    hub.open("alice", frozenset())
    with pytest.raises(ConflictError):
        hub.open("alice", frozenset())
    assert hub.close(first) is False
    hub.open("alice", frozenset())
    assert hub.users() == ["alice"]


async def test_a_broadcast_is_written_once_per_connection() -> None:
    hub = Hub(queue_size=4, max_per_user=2)
    _, socket = started(hub, "alice")
    item = Outgoing(b"x", "b1", counts=True)
    assert hub.to_user("alice", item) == 1
    assert hub.to_user("alice", item) == 1  # accepted, but not written twice
    assert socket.bodies == [b"head", b"x"]


async def test_live_items_during_catch_up_follow_it_and_keep_catch_up_order() -> None:
    """A message pushed live while the catch-up was read is sent once, in its catch-up place (creation
    order), not after the catch-up: found by the e2e resume test (#12 and #13 of 50 arrived last)."""
    hub = Hub(queue_size=4, max_per_user=2)
    connection, socket = hub.open("alice", frozenset()), Socket()
    hub.to_user("alice", Outgoing(b"live-b2", "b2"))
    hub.to_user("alice", Outgoing(b"live-b3", "b3"))
    hub.to_user("alice", Outgoing(b"live-b3-again", "b3"))
    backlog = [Outgoing(b"old-b1", "b1"), Outgoing(b"old-b2", "b2")]
    connection.start(socket.send, socket.abort, b"head|", backlog)
    assert socket.bodies == [b"head|old-b1old-b2live-b3"]


async def test_shutdown_sends_the_farewell_after_what_is_queued_then_ends_the_response() -> None:
    hub = Hub(queue_size=4, max_per_user=2)
    (_, idle), (_, busy) = started(hub, "alice"), started(hub, "bob")
    busy.writable.clear()
    hub.to_user("bob", Outgoing(b"1"))
    hub.to_user("bob", Outgoing(b"2"))
    hub.shutdown(b"bye")
    assert idle.bodies == [b"head", b"bye"] and idle.ended
    assert hub.to_user("alice", Outgoing(b"late")) == 0
    busy.writable.set()
    await asyncio.sleep(0.01)
    assert busy.bodies[-2:] == [b"1", b"2bye"] and busy.ended


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (None, None),
        ("", None),
        ("s42", Cursor(row_id=42)),
        ("g1700000000000000", Cursor(group_micros=1700000000000000)),
        ("g253402214400000000", Cursor(group_micros=253402214400000000)),
        (f"s{2**63 - 1}", Cursor(row_id=2**63 - 1)),
    ],
)
def test_cursors_parse(raw: str | None, expected: Cursor | None) -> None:
    assert parse_cursor(raw) == expected


FOREIGN = ["x1", "s", "s-1", "s²", "g1.5", "s" + "9" * 30, "g253402214400000001", "g" + "9" * 19, f"s{2**63}"]


@pytest.mark.parametrize("raw", FOREIGN)
def test_foreign_cursors_are_refused(raw: str) -> None:
    with pytest.raises(ValueError, match="not a resumable event id"):
        parse_cursor(raw)


async def test_every_open_stream_gets_a_heartbeat_each_interval() -> None:
    hub = Hub(queue_size=4, max_per_user=2)
    (_, alice), (_, bob) = started(hub, "alice"), started(hub, "bob")
    stop = asyncio.Event()
    beating = asyncio.create_task(Heartbeat(hub, 0.02).run(stop))
    await asyncio.sleep(0.07)
    stop.set()
    await beating
    for socket in (alice, bob):
        assert 2 <= socket.bodies.count(HEARTBEAT) <= 4, socket.bodies


def test_a_frame_is_one_data_line_whatever_the_content_holds() -> None:
    hostile = "a\nevent: admin\r\ndata: x\u2028y\u2029z\u0085w\x00<script>"
    encoded = frame("MESSAGE", {"content": hostile}, "s1")
    lines = encoded.decode().splitlines()  # the strictest splitter: also breaks at U+2028/9 and NEL
    assert lines == ["event: MESSAGE", "id: s1", lines[2], ""] and lines[2].startswith("data: {")
    assert orjson.loads(lines[2][6:]) == {"content": hostile}


class GroupOnly:
    """An inbox with only group broadcasts: what ``Reconciler`` reads after a bus gap."""

    def __init__(self, items: list[InboxItem]) -> None:
        self.items = items
        self.asked: list[tuple[frozenset[str], datetime | None]] = []

    async def pending_for(self, user_ids: Sequence[str], limit: int) -> list[tuple[str, InboxItem]]:
        return []

    async def group(self, user_id: str, roles: frozenset[str], since: datetime | None, limit: int) -> GroupPage:
        self.asked.append((roles, since))
        found = [i for i in self.items if since is None or i.broadcast.created_at > since]
        return GroupPage(found[-limit:], len(found) <= limit)


def group_item(n: int, created: datetime) -> InboxItem:
    broadcast = Broadcast(
        f"b{n}", "admin", f"#{n}", TargetType.ALL, (), Priority.NORMAL, None, BroadcastStatus.ACTIVE, False, 0,
        created, created,
    )  # fmt: skip
    return InboxItem(broadcast, None, False)


async def test_after_a_bus_gap_the_reconciler_replays_group_broadcasts_each_connection_lacks() -> None:
    now = datetime.now(UTC)
    old, missed = group_item(1, now - timedelta(minutes=10)), group_item(2, now - timedelta(seconds=5))
    hub = Hub(queue_size=8, max_per_user=5)
    (alice, alice_socket), (_, bob_socket) = started(hub, "alice"), started(hub, "bob", frozenset({"ops"}))
    alice.offer(Outgoing(item_frame(missed), "b2", counts=True))  # alice got it before the gap; bob did not
    inbox, gaps = GroupOnly([old, missed]), BusGaps()
    reconciler = Reconciler(cast(InboxStore, inbox), hub, 1.0, asyncio.Event(), gaps)
    await reconciler.run_once()
    assert inbox.asked == [], "no gap, no group query"
    hub.seen_clock.hold(BUS_GAP)  # what the bus listener does when it loses its subscription
    gaps.add(now - timedelta(seconds=60), hub.last_id)
    _, carol_socket = started(hub, "carol")  # connected after the resubscribe: her own catch-up covered her
    await reconciler.run_once()
    assert not hub.seen_clock.held, "replayed: connections may forget old ids again"
    assert [b"#2" in body for body in bob_socket.bodies] == [False, True], "bob gets what the gap swallowed"
    assert carol_socket.bodies == [b"head"], "a connection opened after the gap gets no replay"
    assert sum(b"#2" in body for body in alice_socket.bodies) == 1, "alice, who had it, gets no repeat"
    assert not any(b"#1" in body for body in alice_socket.bodies + bob_socket.bodies), "nothing before the gap"
    assert {roles for roles, _ in inbox.asked} == {frozenset(), frozenset({"ops"})}, "one query per role set"
    assert gaps.take() is None, "the gap is consumed"


async def test_a_bus_gap_that_swallowed_more_than_the_replay_limit_says_resync_and_replays_the_newest() -> None:
    now = datetime.now(UTC)
    missed = [group_item(n, now - timedelta(seconds=50 - n)) for n in range(10, 15)]
    hub = Hub(queue_size=16, max_per_user=5)
    _, socket = started(hub, "alice")
    gaps = BusGaps()
    reconciler = Reconciler(cast(InboxStore, GroupOnly(missed)), hub, 1.0, asyncio.Event(), gaps, replay_limit=3)
    hub.seen_clock.hold(BUS_GAP)
    gaps.add(now - timedelta(seconds=60), hub.last_id)
    await reconciler.run_once()
    events = [body for body in socket.bodies if body != b"head"]
    assert b"event: RESYNC" in events[0], "the gap was longer than the replay: the client must be told first"
    assert [b"#12" in e or b"#13" in e or b"#14" in e for e in events[1:]] == [True] * 3, "then the newest three"
    assert not any(b"#10" in e or b"#11" in e for e in events), "not the oldest"


async def test_a_reconciliation_round_offers_nothing_to_a_stream_opened_while_it_read() -> None:
    """The CI failure of stop 31: a resume showed a message twice. Its row was read PENDING by a round that
    began before the delivery mark was written; the mark landed, alice reconnected with the row's id as her
    cursor (her catch-up left it out), and the round then offered the row to her new stream. A stream opened
    after the round's query ran its own catch-up later, so the round must leave it alone; streams open
    before the query still get the row (the live path may have missed it)."""
    selected = replace(group_item(5, datetime.now(UTC)).broadcast, target_type=TargetType.SELECTED)
    row = InboxItem(selected, 50, False)
    hub = Hub(queue_size=8, max_per_user=5)
    _, bob_socket = started(hub, "bob")
    reading, answer = asyncio.Event(), asyncio.Event()

    class Slow(GroupOnly):
        async def pending_for(self, user_ids: Sequence[str], limit: int) -> list[tuple[str, InboxItem]]:
            reading.set()
            await answer.wait()  # the query is slow; meanwhile alice reconnects
            return [("alice", row), ("bob", row)]

    reconciler = Reconciler(cast(InboxStore, Slow([])), hub, 60.0, asyncio.Event())
    round_ = asyncio.create_task(reconciler.run_once())
    await reading.wait()
    _, alice_socket = started(hub, "alice")
    answer.set()
    await round_
    assert alice_socket.bodies == [b"head"], "the stream opened after the query got no copy from the round"
    assert sum(b"#5" in body for body in bob_socket.bodies) == 1, "a stream open before it still gets the row"


def test_a_message_from_the_database_carries_the_correlation_id_as_the_live_one_does() -> None:
    """Reconciliation and catch-up frames are built from the stored broadcast; a browser tracing a broadcast
    must see the admin request's correlation id whichever way the message came."""

    def data(frame_bytes: bytes) -> Any:
        return orjson.loads(next(ln for ln in frame_bytes.decode().splitlines() if ln.startswith("data:"))[5:])

    created = datetime.now(UTC)
    traced = replace(group_item(3, created).broadcast, correlation_id="trace-9")
    assert data(item_frame(InboxItem(traced, 7, False)))["correlationId"] == "trace-9"
    assert data(item_frame(group_item(4, created)))["correlationId"] is None


async def test_the_seen_clock_stays_held_while_the_bus_is_down_again_after_a_replay() -> None:
    """Gap 1 is replayed while the subscription is lost a second time: the hold must outlast gap 2."""
    hub, gaps, subscribed = Hub(queue_size=8, max_per_user=5), BusGaps(), asyncio.Event()
    reconciler = Reconciler(cast(InboxStore, GroupOnly([])), hub, 1.0, asyncio.Event(), gaps, subscribed)
    hub.seen_clock.hold(BUS_GAP)
    gaps.add(datetime.now(UTC) - timedelta(seconds=60), hub.last_id)  # resubscribed, then lost again:
    await reconciler.run_once()  # ``subscribed`` is clear
    assert hub.seen_clock.held == {BUS_GAP}
    subscribed.set()
    gaps.add(datetime.now(UTC) - timedelta(seconds=30), hub.last_id)  # gap 2, resubscribed
    await reconciler.run_once()
    assert not hub.seen_clock.held


async def test_failing_delivery_marks_hold_the_seen_clock_until_a_flush_succeeds() -> None:
    class Flaky:
        fail = True

        async def mark_delivered(self, pairs: Sequence[tuple[str, str]]) -> int:
            if self.fail:
                raise UnavailableError("database down")
            return len(pairs)

    inbox, clock = Flaky(), SeenClock()
    marker = DeliveredMarker(cast(InboxStore, inbox), 0.2, clock)
    marker.add("b1", "alice")
    await marker.flush()
    assert clock.held == {DELIVERY_MARKS}, "the row stays PENDING: the reconciler will offer it again"
    inbox.fail = False
    await marker.flush()
    assert not clock.held and marker.marked == 1


class FlakyBus(MemoryBus):
    """Its first subscription fails (Redis down), the next ones work: the listener's next one is a resubscription."""

    failures = 1

    @asynccontextmanager
    async def subscribe(self, channels: Sequence[str]) -> AsyncIterator[MemorySubscriptionQueue]:
        if self.failures:
            self.failures -= 1
            raise UnavailableError("redis down")
        async with super().subscribe(channels) as sub:
            yield sub


async def test_a_lost_bus_subscription_holds_the_seen_clock_and_records_a_gap() -> None:
    hub, gaps, stop = Hub(queue_size=8, max_per_user=5), BusGaps(), asyncio.Event()
    listener = BusListener(FlakyBus(), hub, "i1", asyncio.Event(), gaps)
    running = asyncio.create_task(listener.run(stop))
    try:
        await asyncio.wait_for(listener.subscribed.wait(), 10)
    finally:
        stop.set()
        await running
    assert hub.seen_clock.held == {BUS_GAP}, "held from the loss until the reconciler replays the gap"
    assert gaps.take() is not None


async def test_after_a_resubscription_the_gap_is_replayed_before_newer_live_messages() -> None:
    """Per-user order across a bus gap: #1 was published while the subscription was lost (only its PENDING
    row is left), #2 is published the moment the listener is subscribed again. Alice must get #1 first:
    the listener runs a reconciliation round before it reads a live message (Redis keeps #2 meanwhile)."""
    selected = replace(group_item(1, datetime.now(UTC)).broadcast, target_type=TargetType.SELECTED)
    swallowed = InboxItem(selected, 41, False)

    live = orjson.dumps({"kind": "user", "user": "alice", "broadcast": "b2", "frame": "event: MESSAGE\nid: s2\n\n"})

    class LostOnce(MemoryBus):
        """The first subscription is closed by Redis once ``cut`` is set; #2 is published the moment the
        listener has subscribed again."""

        lost = False
        cut = asyncio.Event()

        @asynccontextmanager
        async def subscribe(self, channels: Sequence[str]) -> AsyncIterator[Any]:
            async with super().subscribe(channels) as sub:
                if self.lost:
                    await self.publish(channels[0], live)
                    yield sub
                else:
                    yield Closing(sub, self)

    class Closing:
        def __init__(self, sub: MemorySubscriptionQueue, bus: LostOnce) -> None:
            self.sub, self.bus = sub, bus

        async def get(self, timeout_s: float = 1.0) -> Any:
            if self.bus.cut.is_set():
                self.bus.lost = True
                raise UnavailableError("redis closed the connection (output buffer limit)")
            return await self.sub.get(0.02)

    bus = LostOnce()

    class SlowInbox(GroupOnly):
        async def pending_for(self, user_ids: Sequence[str], limit: int) -> list[tuple[str, InboxItem]]:
            rows = [("alice", swallowed)] if bus.lost and "alice" in user_ids else []
            await asyncio.sleep(0.05)  # a database round trip
            return rows

    hub, gaps, stop, now = Hub(queue_size=8, max_per_user=5), BusGaps(), asyncio.Event(), asyncio.Event()
    _, alice = started(hub, "alice")
    subscribed = asyncio.Event()
    reconciler = Reconciler(cast(InboxStore, SlowInbox([])), hub, 60.0, now, gaps, subscribed)
    listener = BusListener(bus, hub, "i1", now, gaps, subscribed, catch_up=reconciler.run_once)
    loops = [asyncio.create_task(listener.run(stop)), asyncio.create_task(reconciler.run(stop))]
    try:
        await asyncio.wait_for(subscribed.wait(), 5)
        await asyncio.sleep(0.2)  # the reconciler's first round: nothing missed yet
        bus.cut.set()
        await wait_until(lambda: any(b"s2" in body for body in alice.bodies), 10, "#2 after the resubscription")
    finally:
        stop.set()
        await asyncio.gather(*loops)
    messages = [body for body in alice.bodies if b"event: MESSAGE" in body]
    assert b'"broadcastId":"b1"' in messages[0] and b"s2" in messages[1], messages


async def test_after_a_resubscription_presence_is_written_again_before_the_catch_up_reads() -> None:
    """A restarted Redis forgot presence: until this instance names itself again, the delivery consumer
    leaves its users' messages PENDING, and those the catch-up round has already read would reach them
    only after newer live ones. So the listener rejoins presence first, then runs the round."""
    hub, presence, stop = Hub(queue_size=8, max_per_user=5), MemoryPresence(), asyncio.Event()
    started(hub, "alice")  # connected before the restart; Redis (here: ``presence``) holds nothing of her
    keeper = PresenceKeeper(presence, Admission(LimitsSettings(), MemorySlots(), "i1", 5), hub, "i1", 3_600)
    seen_by_catch_up: list[frozenset[str]] = []

    async def catch_up() -> None:
        seen_by_catch_up.append(await presence.instances("alice"))

    listener = BusListener(FlakyBus(), hub, "i1", asyncio.Event(), catch_up=catch_up, rejoin=keeper.beat)
    running = asyncio.create_task(listener.run(stop))
    try:
        await wait_until(lambda: bool(seen_by_catch_up), 10, "the catch-up round after the resubscription")
    finally:
        stop.set()
        await running
    assert seen_by_catch_up == [frozenset({"i1"})], "presence names this instance before the round reads"


def group_message(broadcast_id: str, target: str = "ALL", roles: Sequence[str] = ()) -> bytes:
    frame_ = f"id: g1\nevent: MESSAGE\ndata: {broadcast_id}\n\n"
    body = {"kind": "group", "broadcast": broadcast_id, "frame": frame_, "targetType": target, "roles": list(roles)}
    return orjson.dumps(body)


async def test_a_burst_that_queued_up_goes_out_as_one_write_per_connection_in_order() -> None:
    """Ten group broadcasts arrived while the listener was busy: each stream gets them in one write (not ten
    fan-outs, each over every connection), each only the ones it matches, a user message keeping its place."""
    hub, bus, stop = Hub(queue_size=64, max_per_user=5), MemoryBus(), asyncio.Event()
    (_, alice), (_, ops) = started(hub, "alice"), started(hub, "olga", frozenset({"ops"}))
    listener = BusListener(bus, hub, "i1", asyncio.Event())
    loop = asyncio.create_task(listener.run(stop))
    await asyncio.wait_for(listener.subscribed.wait(), 5)
    for i in range(10):
        target = ("ROLE", ["ops"]) if i == 4 else ("ALL", [])
        await bus.publish(constants.REDIS_GROUP_CHANNEL, group_message(f"b{i}", *target))
    user = {"kind": "user", "user": "alice", "broadcast": "s1", "frame": "event: MESSAGE\ndata: s1\n\n"}
    await bus.publish(constants.instance_channel("i1"), orjson.dumps(user))
    await bus.publish(constants.REDIS_GROUP_CHANNEL, group_message("b10"))
    await wait_until(lambda: any(b"b10" in body for body in alice.bodies), 5, "the burst is written")
    stop.set()
    await loop
    assert len(alice.bodies) == 4, alice.bodies  # head, b0-b9 but b4, s1, b10
    assert alice.bodies[1] == b"".join(f"id: g1\nevent: MESSAGE\ndata: b{i}\n\n".encode() for i in range(10) if i != 4)
    assert alice.bodies[2:] == [b"event: MESSAGE\ndata: s1\n\n", b"id: g1\nevent: MESSAGE\ndata: b10\n\n"]
    assert b"data: b4\n" in ops.bodies[1] and ops.bodies[1].count(b"event: MESSAGE") == 10


async def test_a_fan_out_hands_the_loop_back_between_slices() -> None:
    hub = Hub(queue_size=4, max_per_user=5)
    for i in range(5):
        started(hub, f"u{i}")
    written_when_other_ran: list[int] = []

    async def other() -> None:
        written_when_other_ran.append(sum(len(c.seen) for c in hub.connections()))

    task = asyncio.create_task(other())
    assert await hub.fan_out([(None, Outgoing(b"x", "b1", counts=True))], slice_size=2) == 5
    await task
    assert 0 < written_when_other_ran[0] < 5, "another task ran in the middle of the fan-out"
