"""A stand-alone SSE reader process, the client of the frozen-client scenario: the test SIGSTOPs it.

``python -m tests.faults.reader <port> <bearer token> <out file>``: connects to 127.0.0.1:<port> with a
small receive buffer (so a stopped reader's socket fills at once), writes its local port to
``<out>.port``, then appends everything the server sends to ``<out>`` until the server ends the stream.
"""

from __future__ import annotations

import contextlib
import socket
import sys
from pathlib import Path


def main(port: int, bearer: str, out: Path) -> None:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: a small window
    sock.connect(("127.0.0.1", port))
    out.with_suffix(".port").write_text(str(sock.getsockname()[1]))
    request = (
        f"GET /api/user/sse/connect HTTP/1.0\r\nAuthorization: Bearer {bearer}\r\nAccept: text/event-stream\r\n\r\n"
    )
    sock.sendall(request.encode())
    with out.open("ab", buffering=0) as received, contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            received.write(chunk)


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2], Path(sys.argv[3]))
