"""The per-instance SSE hub: which local connections each user has, and a bounded queue per connection.

Fan-out puts the *same* pre-encoded bytes into each matching connection's queue (``put_nowait``): no
per-connection encoding, no awaiting a slow socket. A connection whose queue is full is closed — its
client reconnects with ``Last-Event-ID`` and resumes — so memory per connection stays bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from broadcast.errors import ConflictError

log = logging.getLogger(__name__)
CLOSE = b""  # the sentinel a stream stops on


@dataclass(frozen=True)
class Outgoing:
    """Bytes for one connection, and the (broadcast id, user id) they deliver, if they are a MESSAGE."""

    data: bytes
    delivers: tuple[str, str] | None = None
    broadcast_id: str | None = None


@dataclass(eq=False)
class Connection:
    id: int
    user_id: str
    roles: frozenset[str]
    queue: asyncio.Queue[Outgoing]
    closed: bool = False
    sent_broadcasts: set[str] = field(default_factory=set)

    def offer(self, item: Outgoing) -> bool:
        """Queue ``item``; False (and the connection closes) when the client is too slow to keep up."""
        if self.closed:
            return False
        if item.broadcast_id is not None:
            if item.broadcast_id in self.sent_broadcasts:
                return True  # already sent on this connection (catch-up, live path and reconciliation overlap)
            self.sent_broadcasts.add(item.broadcast_id)
        try:
            self.queue.put_nowait(item)
        except asyncio.QueueFull:
            log.warning("dropping slow connection %d of %s (queue full)", self.id, self.user_id)
            self.close()
            return False
        return True

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            while not self.queue.empty():  # make room for the sentinel
                self.queue.get_nowait()
            self.queue.put_nowait(Outgoing(CLOSE))


class Hub:
    """All SSE connections of this process."""

    def __init__(self, queue_size: int, max_per_user: int) -> None:
        self._queue_size = queue_size
        self._max_per_user = max_per_user
        self._by_user: dict[str, set[Connection]] = {}
        self._ids = itertools.count(1)
        self.dropped = 0

    def open(self, user_id: str, roles: frozenset[str]) -> Connection:
        connections = self._by_user.setdefault(user_id, set())
        if len(connections) >= self._max_per_user:
            raise ConflictError(f"user already has {self._max_per_user} open streams")
        connection = Connection(next(self._ids), user_id, roles, asyncio.Queue(self._queue_size))
        connections.add(connection)
        return connection

    def close(self, connection: Connection) -> bool:
        """Forget ``connection``; True when it was the user's last one here."""
        connection.close()
        connections = self._by_user.get(connection.user_id, set())
        connections.discard(connection)
        if not connections:
            self._by_user.pop(connection.user_id, None)
            return True
        return False

    def users(self) -> list[str]:
        return list(self._by_user)

    def connections(self, user_id: str | None = None) -> Iterable[Connection]:
        if user_id is not None:
            return tuple(self._by_user.get(user_id, ()))
        return tuple(c for cs in self._by_user.values() for c in cs)

    def to_user(self, user_id: str, item: Outgoing) -> int:
        """Offer ``item`` to every connection of ``user_id``; returns how many accepted it."""
        return self._offer(self._by_user.get(user_id, ()), item)

    def to_matching(self, matches: Callable[[Connection], bool], item: Outgoing) -> int:
        return self._offer((c for cs in self._by_user.values() for c in cs if matches(c)), item)

    def _offer(self, connections: Iterable[Connection], item: Outgoing) -> int:
        accepted = 0
        for connection in tuple(connections):
            if connection.offer(item):
                accepted += 1
            else:
                self.dropped += 1
        return accepted

    def shutdown(self, farewell: bytes) -> None:
        """Send ``farewell`` to every connection and end its stream."""
        for connection in self.connections():
            if not connection.closed:
                with contextlib.suppress(asyncio.QueueFull):
                    connection.queue.put_nowait(Outgoing(farewell))
                connection.closed = True
                try:
                    connection.queue.put_nowait(Outgoing(CLOSE))
                except asyncio.QueueFull:
                    connection.queue.get_nowait()
                    connection.queue.put_nowait(Outgoing(CLOSE))
