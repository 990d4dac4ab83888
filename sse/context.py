"""What the stream and inbox routes need from the process: a narrow view of the composition root.

The routes ask for this Protocol, not for ``broadcast.components.Components``, so the ``sse`` package
depends on the kernel and on itself only (``Components`` satisfies it; ``broadcast.components`` checks
that with mypy).
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from starlette.requests import Request

from broadcast.lifecycle import Lifecycle
from broadcast.loops import Wakeups
from broadcast.ports import InboxStore, OutboxStore, Presence, TicketStore, UserStore
from broadcast.settings import Settings
from sse.admission import Admission, ConnectGate
from sse.hub import Hub


class SseContext(Protocol):
    settings: Settings
    users: UserStore
    outbox: OutboxStore
    presence: Presence
    lifecycle: Lifecycle
    outbox_wakeup: Wakeups
    inbox: InboxStore
    hub: Hub
    tickets: TicketStore
    admission: Admission
    connect_gate: ConnectGate
    bus_subscribed: asyncio.Event


def sse_context(request: Request) -> SseContext:
    """The components the lifespan opened for this app, as the stream routes see them."""
    found: SseContext = request.app.state.components
    return found
