"""The per-instance SSE hub: which local connections each user has, and how bytes reach their sockets.

Fan-out hands the *same* pre-encoded bytes to each matching connection, and the connection writes them
at once from the fan-out loop: the ASGI ``send`` coroutine is stepped in place (it completes without
suspending unless the socket's buffer is full), so a delivery costs no task switch and no queue. Only
when a socket is not writable do later events wait, coalesced, in a bounded backlog; a connection whose
backlog overflows, or whose blocked write outlasts the send timeout, is dropped (its socket aborted) —
its client reconnects with ``Last-Event-ID`` and resumes — so memory per connection stays bounded.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from broadcast.errors import ConflictError
from broadcast.observability.metrics import NO_METRICS, StreamStats
from sse.seen import SeenClock, SeenIds

log = logging.getLogger(__name__)
Send = Callable[[dict[str, Any]], Awaitable[None]]
Delivered = Callable[[str, str, bool], None]  # (broadcast id, user id, a group broadcast?)
FANOUT_SLICE = 1_000  # connections written per turn of the loop during a fan-out
Matches = Callable[["Connection"], bool]  # which connections a group item is for


@dataclass(frozen=True, slots=True)
class Outgoing:
    """Bytes for connections; a MESSAGE names its broadcast, and ``counts`` when writing it is a delivery.

    ``path`` says how it came (``live``, ``reconnect`` catch-up, ``reconciliation``) and ``created`` is its
    broadcast's creation time (epoch seconds, 0 unknown), for the delivery metrics. ``group``: an ALL/ROLE
    broadcast, whose deliveries are tallied (``broadcast/core/reach.py``), not marked on a row.
    """

    data: bytes
    broadcast_id: str | None = None
    counts: bool = False
    path: str = "live"
    created: float = 0.0
    group: bool = False


def _ignore(broadcast_id: str, user_id: str, group: bool) -> None:
    return None


async def _awaiting(awaitable: Awaitable[None]) -> None:
    await awaitable


class Connection:
    """One open stream. ``offer`` writes now, or queues behind a blocked write, or drops the connection."""

    __slots__ = (
        "_abort",
        "_backlog",
        "_delivered",
        "_ended",
        "_finishing",
        "_inflight",
        "_inflight_delivers",
        "_limit",
        "_on_drop",
        "_send",
        "_send_timeout",
        "_stats",
        "_timer",
        "_waiting",
        "closed",
        "dropped",
        "id",
        "roles",
        "seen",
        "user_id",
    )

    def __init__(
        self,
        connection_id: int,
        user_id: str,
        roles: frozenset[str],
        limit: int,
        send_timeout: float,
        delivered: Delivered = _ignore,
        on_drop: Callable[[], None] = lambda: None,
        stats: StreamStats = NO_METRICS.stream,
        clock: SeenClock | None = None,
    ) -> None:
        self.id = connection_id
        self.user_id = user_id
        self.roles = roles
        self.closed = False
        self.dropped = False
        self.seen = SeenIds(clock or SeenClock())  # broadcasts written here lately (repeats are skipped)
        self._limit = limit
        self._send_timeout = send_timeout
        self._delivered = delivered
        self._on_drop = on_drop
        self._stats = stats
        self._send: Send | None = None
        self._abort: Callable[[], None] | None = None
        self._backlog: list[Outgoing] = []
        self._finishing = False
        self._ended = False
        self._inflight: Coroutine[Any, Any, None] | None = None
        self._inflight_delivers: list[Outgoing] = []
        self._waiting: asyncio.Future[Any] | None = None
        self._timer: asyncio.TimerHandle | None = None

    # ------------------------------------------------------------------ what the hub and the stream call
    def offer(self, item: Outgoing) -> bool:
        """Write or queue ``item``; False (and the connection is dropped) when the client cannot keep up."""
        if self.closed:
            return False
        started = self._send is not None
        # Already on this connection (catch-up, live path and reconciliation overlap)? Before the stream
        # starts, the check waits for ``start``: the catch-up's copy keeps its place in creation order.
        if started and item.broadcast_id is not None and not self._first_time(item.broadcast_id):
            return True
        if not started or self._inflight is not None:
            if len(self._backlog) >= self._limit:
                self.drop("backlog full", "backlog_full")
                return False
            self._backlog.append(item)
            return True
        self._write([item])
        return True

    def offer_many(self, items: list[Outgoing]) -> bool:
        """``offer`` for several items at once (a burst): what is new to the connection goes out in one
        write, or queues as one; False (dropped) when the backlog cannot take them."""
        if len(items) == 1:
            return self.offer(items[0])
        if self.closed:
            return False
        if self._send is not None:
            items = [i for i in items if i.broadcast_id is None or self._first_time(i.broadcast_id)]
            if not items:
                return True
        if self._send is None or self._inflight is not None:
            if len(self._backlog) + len(items) > self._limit:
                self.drop("backlog full", "backlog_full")
                return False
            self._backlog.extend(items)
            return True
        self._write(items)
        return True

    def start(self, send: Send, abort: Callable[[], None] | None, head: bytes, items: Iterable[Outgoing]) -> None:
        """The response has started: write ``head``, the catch-up ``items``, then what arrived live meanwhile
        and is not in the catch-up (so a message keeps its catch-up place, in creation order)."""
        self._send, self._abort = send, abort
        fresh = [i for i in items if i.broadcast_id is None or self._first_time(i.broadcast_id)]
        queued = [i for i in self._backlog if i.broadcast_id is None or self._first_time(i.broadcast_id)]
        self._backlog = []
        self._write([Outgoing(head), *fresh, *queued], final=self._finishing)

    def finish(self, farewell: bytes = b"") -> None:
        """End the stream gracefully after what is queued (and ``farewell``)."""
        if self.closed:
            return
        self.closed = self._finishing = True
        if farewell:
            self._backlog.append(Outgoing(farewell))
        if self._send is not None and self._inflight is None:
            queued, self._backlog = self._backlog, []
            self._write(queued, final=True)

    def drop(self, reason: str, kind: str = "backlog_full") -> None:
        """Abort a client that cannot keep up: its socket is closed at once, unsent bytes discarded.
        ``kind`` is the metrics' reason: ``backlog_full``, ``send_timeout`` or ``write_failed``."""
        if self.dropped:
            return
        log.warning("dropping slow connection %d of %s (%s)", self.id, self.user_id, reason)
        self._stats.dropped(kind)
        self.closed = self.dropped = True
        self._backlog.clear()
        self._discard_inflight()
        self._on_drop()
        if self._abort is not None:
            self._abort()

    def release(self) -> None:
        """The stream ended (client gone): forget anything in flight."""
        self.closed = True
        self._backlog.clear()
        self._discard_inflight()

    # ------------------------------------------------------------------ stepping the send coroutine in place
    def _first_time(self, broadcast_id: str) -> bool:
        return self.seen.first_time(broadcast_id)

    def _write(self, items: list[Outgoing], final: bool = False) -> None:
        assert self._send is not None
        body = items[0].data if len(items) == 1 else b"".join(i.data for i in items)
        self._ended = final
        self._inflight_delivers = [i for i in items if i.counts and i.broadcast_id]
        sending = self._send({"type": "http.response.body", "body": body, "more_body": not final})
        self._inflight = sending if isinstance(sending, Coroutine) else _awaiting(sending)
        self._step()

    def _step(self, _: object = None) -> None:
        coro = self._inflight
        if coro is None:
            return
        self._waiting = None
        try:
            yielded = coro.send(None)
        except StopIteration:
            self._written()
            return
        except Exception as exc:  # the transport refused the write: the client is gone
            self._inflight = None
            log.info("write to connection %d of %s failed: %r", self.id, self.user_id, exc)
            self.drop("write failed", "write_failed")
            return
        loop = asyncio.get_running_loop()
        if isinstance(yielded, asyncio.Future):  # e.g. waiting for the socket to drain
            yielded._asyncio_future_blocking = False
            yielded.add_done_callback(self._step)
            self._waiting = yielded
        else:  # a bare yield: try again on the next loop iteration
            loop.call_soon(self._step)
        if self._timer is None:
            self._timer = loop.call_later(
                self._send_timeout, self.drop, f"send timeout {self._send_timeout} s", "send_timeout"
            )

    def _written(self) -> None:
        self._inflight = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._inflight_delivers:
            self._report(self._inflight_delivers)
            self._inflight_delivers = []
        if self._backlog:
            queued, self._backlog = self._backlog, []
            self._write(queued, final=self._finishing)
        elif self._finishing and not self._ended:
            self._write([], final=True)

    def _report(self, items: list[Outgoing]) -> None:
        """Written: tell the delivered-marks batcher, count each delivery (and time the live ones)."""
        for item in items:
            assert item.broadcast_id is not None
            self._delivered(item.broadcast_id, self.user_id, item.group)
            self._stats.delivered(item.path, item.created)

    def _discard_inflight(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._waiting is not None:
            self._waiting.remove_done_callback(self._step)
            self._waiting = None
        if self._inflight is not None:
            self._inflight.close()
            self._inflight = None


class Hub:
    """All SSE connections of this process."""

    def __init__(
        self,
        queue_size: int,
        max_per_user: int,
        send_timeout: float = 10.0,
        delivered: Delivered = _ignore,
        stats: StreamStats = NO_METRICS.stream,
        seen_clock: SeenClock | None = None,
    ) -> None:
        self._stats = stats
        self._queue_size = queue_size
        self._max_per_user = max_per_user
        self._send_timeout = send_timeout
        self._delivered = delivered  # told of each MESSAGE written to a stream
        self._by_user: dict[str, set[Connection]] = {}
        self.seen_clock = seen_clock or SeenClock()  # held while repeats could come from further back
        self._ids = itertools.count(1)
        self.last_id = 0  # the id of the newest connection (ids grow: older connections have smaller ones)
        self.dropped = 0

    def _next_id(self) -> int:
        self.last_id = next(self._ids)
        return self.last_id

    def open(self, user_id: str, roles: frozenset[str]) -> Connection:
        connections = self._by_user.setdefault(user_id, set())
        if len(connections) >= self._max_per_user:
            if not connections:
                del self._by_user[user_id]
            raise ConflictError(f"user already has {self._max_per_user} open streams")
        connection = Connection(
            self._next_id(),
            user_id,
            roles,
            self._queue_size,
            self._send_timeout,
            self._delivered,
            self._count_drop,
            self._stats,
            self.seen_clock,
        )
        connections.add(connection)
        return connection

    def _count_drop(self) -> None:
        self.dropped += 1

    def close(self, connection: Connection) -> bool:
        """Forget ``connection``; True when it was the user's last one here."""
        connection.release()
        connections = self._by_user.get(connection.user_id, set())
        connections.discard(connection)
        if not connections:
            self._by_user.pop(connection.user_id, None)
            return True
        return False

    def users(self) -> list[str]:
        return list(self._by_user)

    def counts(self) -> tuple[int, int]:
        """(open streams, distinct users) on this instance."""
        return sum(len(cs) for cs in self._by_user.values()), len(self._by_user)

    def connections(self, user_id: str | None = None) -> tuple[Connection, ...]:
        if user_id is not None:
            return tuple(self._by_user.get(user_id, ()))
        return tuple(c for cs in self._by_user.values() for c in cs)

    def to_user(self, user_id: str, item: Outgoing, upto: int | None = None) -> int:
        """Offer ``item`` to every connection of ``user_id`` (with ``upto``: those whose id is at most
        ``upto``, the ones open at that moment); returns how many accepted it."""
        connections = self._by_user.get(user_id)
        if not connections:
            return 0
        if upto is None:  # the live path, once per event: no filter
            return self._offer(tuple(connections), item)
        return self._offer([c for c in connections if c.id <= upto], item)

    def to_matching(self, matches: Matches | None, item: Outgoing) -> int:
        """Offer ``item`` to every connection (``matches`` None) or to those ``matches`` accepts."""
        everyone = self.connections()
        return self._offer(everyone if matches is None else [c for c in everyone if matches(c)], item)

    def _offer(self, connections: Iterable[Connection], item: Outgoing) -> int:
        self.seen_clock.tick()  # once per event, so connections read the generation, not the clock
        accepted = 0
        for connection in connections:
            if connection.offer(item):
                accepted += 1
        return accepted

    async def fan_out(self, batch: Sequence[tuple[Matches | None, Outgoing]], slice_size: int = FANOUT_SLICE) -> int:
        """Offer each connection, in one write, the items of ``batch`` it matches (``None``: everyone), in
        order; the loop is handed back every ``slice_size`` connections, so accepts, heartbeats and the
        database replies of a busy instance are not held up behind a fan-out to every stream. Returns how
        many (connection, item) offers were taken."""
        self.seen_clock.tick()
        everyone = self.connections()
        accepted = 0
        for start in range(0, len(everyone), slice_size):
            for connection in everyone[start : start + slice_size]:
                items = [item for matches, item in batch if matches is None or matches(connection)]
                if items and connection.offer_many(items):
                    accepted += len(items)
            if start + slice_size < len(everyone):
                await asyncio.sleep(0)
        return accepted

    def shutdown(self, farewell: bytes) -> None:
        """Send ``farewell`` to every connection and end its stream."""
        for connection in self.connections():
            connection.finish(farewell)
