"""SSE wire format: frames encoded once, as bytes, and the resume cursor carried in event ids.

Event ids of MESSAGE events name a position a reconnecting client can resume from:
``s<row id>`` for a SELECTED message (the user's ``user_broadcast_messages`` row) and ``g<µs>`` for an
ALL/ROLE message (its broadcast's creation time in microseconds since the epoch) — the same bytes for
every connection that receives it. Other events carry no id, so they do not move the browser's
``Last-Event-ID``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime

import orjson

RETRY_MS = 3_000
RETRY = f"retry: {RETRY_MS}\n\n".encode()
HEARTBEAT = b": heartbeat\n\n"
MAX_GROUP_MICROS = 253_402_214_400_000_000  # 9999-12-31T00:00Z, safely below datetime.max
MAX_ROW_ID = 2**63 - 1  # a BIGINT row id


class EventName:
    CONNECTED = "CONNECTED"
    MESSAGE = "MESSAGE"
    READ_RECEIPT = "READ_RECEIPT"
    MESSAGE_REMOVED = "MESSAGE_REMOVED"
    RESYNC = "RESYNC"
    SERVER_SHUTDOWN = "SERVER_SHUTDOWN"
    CONNECTION_LIMIT_REACHED = "CONNECTION_LIMIT_REACHED"
    TOKEN_EXPIRED = "TOKEN_EXPIRED"  # noqa: S105 - an event name


# Characters JSON may carry raw that some line readers (e.g. Python's ``str.splitlines``) treat as line
# breaks; SSE itself only breaks at CR/LF, which orjson always escapes. Escaped, every reader sees one line.
_LINE_BREAKERS = ((b"\xc2\x85", b"\\u0085"), (b"\xe2\x80\xa8", b"\\u2028"), (b"\xe2\x80\xa9", b"\\u2029"))


def frame(event: str, data: object, event_id: str | None = None) -> bytes:
    """One complete SSE event; ``data`` is JSON-encoded on one line (no CR, LF, NEL or U+2028/9 in it)."""
    head = f"event: {event}\n" + (f"id: {event_id}\n" if event_id else "")
    body = orjson.dumps(data)
    for raw, escaped in _LINE_BREAKERS:
        if raw in body:
            body = body.replace(raw, escaped)
    return head.encode() + b"data: " + body + b"\n\n"


def micros(moment: datetime) -> int:
    return int(moment.timestamp() * 1_000_000)


def from_micros(value: int) -> datetime:
    return datetime.fromtimestamp(value / 1_000_000, tz=UTC)


@dataclass(frozen=True)
class Cursor:
    """Where a client left off: a SELECTED row id, or a group broadcast's creation time."""

    row_id: int | None = None
    group_micros: int | None = None

    def format(self) -> str:
        return f"s{self.row_id}" if self.row_id is not None else f"g{self.group_micros}"


MAX_EVENT_ID_CHARS = 20
EVENT_ID_PATTERN = r"^[sg][0-9]+$"  # a Cursor: s<row id> or g<µs>, at most MAX_EVENT_ID_CHARS
EVENT_ID = re.compile(EVENT_ID_PATTERN)


def is_event_id(raw: str) -> bool:
    """Whether ``raw`` has the shape of an event id this server writes (what the OpenAPI document says)."""
    return len(raw) <= MAX_EVENT_ID_CHARS and EVENT_ID.fullmatch(raw) is not None


def parse_cursor(raw: str | None) -> Cursor | None:
    """The cursor in a ``Last-Event-ID``; None when absent; ValueError when it is not one of ours."""
    if raw is None or raw == "":
        return None
    digits = raw[1:]
    if len(raw) > MAX_EVENT_ID_CHARS or raw[:1] not in ("s", "g") or not (digits.isascii() and digits.isdigit()):
        raise ValueError(f"not a resumable event id: {raw[:40]!r}")
    value = int(raw[1:])
    if value > (MAX_GROUP_MICROS if raw[0] == "g" else MAX_ROW_ID):  # nothing this server could have sent
        raise ValueError(f"not a resumable event id: {raw[:40]!r}")
    return Cursor(row_id=value) if raw[0] == "s" else Cursor(group_micros=value)
