"""What the stream and inbox routes need from the process: a narrow view of the composition root.

The routes ask for this Protocol, not for ``broadcast.runtime.components.Components``, so the ``sse`` package
depends on the kernel and on itself only (``Components`` satisfies it; ``broadcast.runtime.components`` checks
that with mypy).
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from starlette.requests import Request

from broadcast.core.ports.bus import Presence, TicketStore
from broadcast.core.ports.stores import InboxStore, OutboxStore, UserStore
from broadcast.core.settings import Settings
from broadcast.lifecycle.service import Lifecycle
from broadcast.observability.loops import Wakeups
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
