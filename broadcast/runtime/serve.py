"""Serving with uvicorn, shutdown driven by one signal-set event.

SIGTERM or SIGINT sets the event; the server then stops accepting, drains, runs the lifespan shutdown
(which closes every component in reverse order) and the process exits 0. A second signal forces exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import signal
from collections.abc import Iterator
from typing import cast

import uvicorn
from starlette.types import ASGIApp, Receive, Scope, Send

from broadcast.core import constants
from broadcast.observability import heap

# parameters whose value is a credential, whatever it looks like
_SECRET_QUERY = re.compile(
    r"\b(ticket|token|access_token|id_token|refresh_token|jwt|bearer|authorization|api_?key|password|secret)=[^&\s]*",
    re.IGNORECASE,
)
# a JWT (JWS compact form: a base64url JSON header, always starting ``eyJ``, a payload and a signature), whatever
# the parameter it came in, in a path segment, or percent-encoded after ``Bearer%20``
_JWT = re.compile(r"eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")


class RedactSecrets(logging.Filter):
    """Access-log lines without credentials: the value of ``?ticket=`` (single use, but still a credential) and
    the like, and any JWT-shaped value wherever it appears in the URL."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(_redacted(a) if isinstance(a, str) else a for a in record.args)
        return True


def _redacted(text: str) -> str:
    return _JWT.sub("[redacted-jwt]", _SECRET_QUERY.sub(r"\1=[redacted]", text))


def run(config: uvicorn.Config) -> bool:
    """Serve on uvicorn's preferred loop (uvloop when installed); returns whether the server had started."""
    logging.getLogger("uvicorn.access").addFilter(RedactSecrets())
    with asyncio.Runner(loop_factory=config.get_loop_factory()) as runner:
        return runner.run(serve(config))


def _keeping_raw_send(app: ASGIApp) -> ASGIApp:
    """Put the server's own ``send`` in the scope, so a stream can reach its socket (see ``sse/stream.py``)."""

    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            scope[constants.RAW_SEND_SCOPE_KEY] = send
        await app(scope, receive, send)

    return wrapped


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """Signals are ours (see ``serve``), not uvicorn's, which re-raises them after shutdown."""
        yield


async def serve(config: uvicorn.Config) -> bool:
    """Serve until SIGTERM/SIGINT; returns whether the server had started."""
    app = config.app
    config.app = _keeping_raw_send(cast(ASGIApp, app))
    server = _Server(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        if stop.is_set():
            server.force_exit = True
        else:
            hook = getattr(getattr(app, "state", None), "begin_shutdown", None)
            if callable(hook):
                hook()  # e.g. SERVER_SHUTDOWN to every open stream, which then ends
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)

    async def watch() -> None:
        await stop.wait()
        server.should_exit = True

    async def settle_when_started() -> None:
        while not server.started:  # noqa: ASYNC110  # uvicorn sets a flag, no event
            await asyncio.sleep(0.05)
        heap.settle()  # the start-up objects are the process's own, kept to the end: never scanned again
        await heap.sweep()  # the old generation's cycles: see heap.py

    watcher = asyncio.create_task(watch())
    settler = asyncio.create_task(settle_when_started())
    try:
        await server.serve()
    finally:
        watcher.cancel()
        settler.cancel()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    return server.started
