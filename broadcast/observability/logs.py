"""Structured logs: one JSON object per line, with the correlation id, broadcast id and user id in scope.

The ids live in context variables: the HTTP middleware binds the request's correlation id and caller,
the listener container binds a record's ``correlation_id`` header, handlers bind the broadcast and user
they work on. ``asyncio`` copies the context into every task, so a line logged anywhere below carries
them without being passed along. ``configure`` installs the one root handler (uvicorn's loggers too).
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Literal

import orjson

correlation_id: ContextVar[str | None] = ContextVar("correlation_id", default=None)
broadcast_id: ContextVar[str | None] = ContextVar("broadcast_id", default=None)
user_id: ContextVar[str | None] = ContextVar("user_id", default=None)
_FIELDS = (("correlation_id", correlation_id), ("broadcast_id", broadcast_id), ("user_id", user_id))
_STANDARD = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName", "color_message"}

LogFormat = Literal["auto", "json", "text"]


@contextlib.contextmanager
def bound(*, correlation: str | None = None, broadcast: str | None = None, user: str | None = None) -> Iterator[None]:
    """Bind the given ids (those not None) for the duration of the block."""
    tokens = [
        (var, var.set(value))
        for var, value in ((correlation_id, correlation), (broadcast_id, broadcast), (user_id, user))
        if value is not None
    ]
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)


class JsonFormatter(logging.Formatter):
    """``{"ts", "level", "logger", "message", correlation_id?, broadcast_id?, user_id?, extra…, "exc"?}``."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name, var in _FIELDS:
            value = record.__dict__.get(name) or var.get()
            if value is not None:
                line[name] = value
        for key, value in record.__dict__.items():  # ``extra={...}`` of the call
            if key not in _STANDARD and key not in line:
                line[key] = value
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(line, default=str).decode()


class TextFormatter(logging.Formatter):
    """The human form, for a terminal: the ids in scope follow the message."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        ids = [f"{name}={value}" for name, var in _FIELDS if (value := record.__dict__.get(name) or var.get())]
        return f"{text} [{' '.join(ids)}]" if ids else text


class _Stderr(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is at the time (it may be replaced, e.g. by a test runner)."""

    @property
    def stream(self) -> object:
        return sys.stderr

    @stream.setter
    def stream(self, _: object) -> None:
        pass


def configure(log_format: LogFormat = "auto", level: str = "info") -> None:
    """Our one stderr handler on the root logger (replacing an earlier one of ours; others stay);
    ``auto`` is text on a terminal, JSON otherwise."""
    use_json = log_format == "json" or (log_format == "auto" and not sys.stderr.isatty())
    handler = _Stderr()
    handler.setFormatter(JsonFormatter() if use_json else TextFormatter())
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _Stderr)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        named = logging.getLogger(name)
        named.handlers.clear()
        named.propagate = True
    logging.getLogger("alembic").setLevel(logging.WARNING)
