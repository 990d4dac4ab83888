"""Helpers for background loops that stop promptly when the shutdown event is set."""

from __future__ import annotations

import asyncio


async def pause(stop: asyncio.Event, seconds: float, wakeup: asyncio.Event | None = None) -> None:
    """Wait ``seconds``, returning early when ``stop`` (or ``wakeup``, if given) is set."""
    waiters = [asyncio.ensure_future(stop.wait())]
    if wakeup is not None:
        waiters.append(asyncio.ensure_future(wakeup.wait()))
    try:
        await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
