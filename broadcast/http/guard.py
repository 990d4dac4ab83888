"""The HTTP server's own guard on request heads, below the app: a size cap, a read deadline and a bound on the
connections still sending theirs.

uvicorn with httptools sets no limit on a request's head and no deadline for it. The app port is published
as it is (docker-compose), so the server defends itself against what no middleware can see, because the
app is only called once a head is complete:
- a head (request line and headers) over ``max_head_bytes`` gets ``431`` and the connection is closed,
  before the parser buffers more than one read past the cap;
- a head not complete ``head_timeout_s`` after its first byte (or after the connection opened) gets ``408``
  and is closed: a slowloris client holds a descriptor for seconds, not for ever;
- at most ``max_heads_in_flight`` connections may be sending a head at once (none of them has shown a
  credential yet); past that a new connection gets ``503`` with ``Retry-After`` and is closed at once.
Idle keep-alive connections between requests are uvicorn's own (``timeout_keep_alive``).
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

RETRY_AFTER_S = 1
# After a refusal the server stops sending (FIN) but reads and drops what the client still sends, for up to
# this long: closing with unread bytes would make the kernel reset the connection, and a reset can destroy
# the refusal before the client reads it (lingering close, as nginx does).
LINGER_S = 2.0


def _response(status: int, reason: str, headers: bytes = b"") -> bytes:
    body = f"{status} {reason}\n".encode()
    return (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: text/plain; charset=utf-8\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n".encode()
        + headers
        + b"\r\n"
        + body
    )


TOO_LARGE = _response(431, "Request Header Fields Too Large")
TIMEOUT = _response(408, "Request Timeout")
BUSY = _response(503, "Service Unavailable", f"retry-after: {RETRY_AFTER_S}\r\n".encode())


class HeadGate:
    """How many connections are sending a request head now, across this server's connections."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_flight = 0
        self.refused = 0

    def enter(self) -> bool:
        if self.in_flight >= self.limit:
            self.refused += 1
            return False
        self.in_flight += 1
        return True

    def leave(self) -> None:
        self.in_flight -= 1


def guarded_protocol(max_head_bytes: int, head_timeout_s: float, max_heads_in_flight: int) -> type[HttpToolsProtocol]:
    """uvicorn's httptools protocol with the guards above (``uvicorn.Config(http=...)``)."""
    gate = HeadGate(max_heads_in_flight)

    class GuardedHttpToolsProtocol(HttpToolsProtocol):
        heads = gate

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._head_bytes = 0
            self._in_head = False
            self._head_timer: asyncio.TimerHandle | None = None
            self._refused = False

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if not self._begin_head():
                self._refuse(BUSY)

        def connection_lost(self, exc: Exception | None) -> None:
            self._end_head()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self._refused:
                return  # lingering: read and dropped
            if self._in_head:
                self._head_bytes += len(data)
            super().data_received(data)
            if self._in_head and self._head_bytes > max_head_bytes and not self.transport.is_closing():
                self._refuse(TOO_LARGE)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            if not self._in_head and not self._begin_head():  # the next request on a kept-alive connection
                self._refuse(BUSY)

        def on_headers_complete(self) -> None:
            self._end_head()
            size = len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)
            if size > max_head_bytes:  # the whole head came in one read
                self._refuse(TOO_LARGE)
                return
            super().on_headers_complete()

        def on_body(self, body: bytes) -> None:
            if not self._refused:
                super().on_body(body)

        def on_message_complete(self) -> None:
            if not self._refused:
                super().on_message_complete()

        def _begin_head(self) -> bool:
            if not gate.enter():
                return False
            self._in_head, self._head_bytes = True, 0
            self._head_timer = self.loop.call_later(head_timeout_s, self._timed_out)
            return True

        def _end_head(self) -> None:
            if self._in_head:
                self._in_head = False
                gate.leave()
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _timed_out(self) -> None:
            self._head_timer = None
            if self._in_head and not self.transport.is_closing():
                self._refuse(TIMEOUT)

        def _refuse(self, response: bytes) -> None:
            self._end_head()
            self._refused = True
            self.transport.write(response)
            if self.transport.can_write_eof():
                self.transport.write_eof()
                self.loop.call_later(LINGER_S, self.transport.close)
            else:
                self.transport.close()

    return GuardedHttpToolsProtocol
