"""The SSE hub: bounded queues, slow clients dropped, per-user caps, one encoding for every connection."""

from __future__ import annotations

import pytest

from broadcast.errors import ConflictError
from sse.frames import Cursor, parse_cursor
from sse.hub import CLOSE, Hub, Outgoing


def test_a_slow_connection_is_closed_when_its_queue_is_full_and_others_keep_receiving() -> None:
    hub = Hub(queue_size=3, max_per_user=5)
    slow, fast = hub.open("alice", frozenset()), hub.open("bob", frozenset())
    frame = Outgoing(b"event: MESSAGE\ndata: {}\n\n")
    for _ in range(3):
        assert hub.to_matching(lambda c: True, frame) == 2
        fast.queue.get_nowait()
    assert hub.to_matching(lambda c: True, frame) == 1
    assert slow.closed and hub.dropped == 1
    assert slow.queue.qsize() == 1 and slow.queue.get_nowait().data == CLOSE, "only the close sentinel is kept"
    assert fast.queue.get_nowait() is frame, "the same bytes object goes to every connection"


def test_connections_per_user_are_capped_and_freed_on_close() -> None:
    hub = Hub(queue_size=4, max_per_user=2)
    first = hub.open("alice", frozenset())
    hub.open("alice", frozenset())
    with pytest.raises(ConflictError):
        hub.open("alice", frozenset())
    assert hub.close(first) is False
    hub.open("alice", frozenset())
    assert hub.users() == ["alice"]


def test_a_broadcast_is_queued_once_per_connection() -> None:
    hub = Hub(queue_size=4, max_per_user=2)
    connection = hub.open("alice", frozenset())
    item = Outgoing(b"x", ("b1", "alice"), "b1")
    assert hub.to_user("alice", item) == 1
    assert hub.to_user("alice", item) == 1  # accepted, but not queued twice
    assert connection.queue.qsize() == 1


def test_shutdown_sends_the_farewell_then_closes() -> None:
    hub = Hub(queue_size=1, max_per_user=2)
    connection = hub.open("alice", frozenset())
    hub.to_user("alice", Outgoing(b"busy"))
    hub.shutdown(b"bye")
    assert connection.closed
    assert connection.queue.get_nowait().data == CLOSE  # queue was full: the sentinel still gets in


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (None, None),
        ("", None),
        ("s42", Cursor(row_id=42)),
        ("g1700000000000000", Cursor(group_micros=1700000000000000)),
    ],
)
def test_cursors_parse(raw: str | None, expected: Cursor | None) -> None:
    assert parse_cursor(raw) == expected


@pytest.mark.parametrize("raw", ["x1", "s", "s-1", "s²", "g1.5", "s" + "9" * 30])
def test_foreign_cursors_are_refused(raw: str) -> None:
    with pytest.raises(ValueError, match="not a resumable event id"):
        parse_cursor(raw)
