"""The dead-letter routes' view of the composition root (``sse/context.py`` says why routes take a view)."""

from __future__ import annotations

from typing import Protocol

from starlette.requests import Request

from broadcast.core.dead_letters import DeadLetterStore, DrillStore
from broadcast.core.settings import Settings
from dlt.service import DeadLetterService


class DeadLetterContext(Protocol):
    settings: Settings
    dead_letter_store: DeadLetterStore
    dead_letters: DeadLetterService
    drills: DrillStore


def dead_letter_context(request: Request) -> DeadLetterContext:
    """The components the lifespan opened for this app, as the dead-letter routes see them."""
    found: DeadLetterContext = request.app.state.components
    return found
