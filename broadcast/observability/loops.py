"""Helpers for background loops that stop promptly when the shutdown event is set."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)


# Items a long step (a million-row COPY, a relay round's rows, a publish) handles between two turns of the
# event loop: whatever it carries, it never holds the loop (the API, the other relay, the consumers) for
# more than a few milliseconds at a time.
LOOP_SLICE = 1_000


async def hand_back(count: int) -> None:
    """Let the event loop run other tasks once every ``LOOP_SLICE`` items (``count``: items done so far)."""
    if count % LOOP_SLICE == 0:
        await asyncio.sleep(0)


class Wakeups:
    """One signal, several sleepers: ``set`` sets the event of every loop that asked for one (``event``), and
    each loop clears only its own, so one loop's clear never swallows another's wake-up."""

    def __init__(self) -> None:
        self._events: list[asyncio.Event] = []

    def event(self) -> asyncio.Event:
        event = asyncio.Event()
        self._events.append(event)
        return event

    def set(self) -> None:
        for event in self._events:
            event.set()


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


class Supervisor:
    """Keeps the background loops running until ``stop``: a loop that ends early, returning or raising anything
    but a process exit or a cancellation of its task, is logged at ERROR with why, and started again after a
    backoff (``initial_s`` doubling to ``max_s``; back to ``initial_s`` after a run of ``healthy_s``). ``down``
    names the loops waiting to restart, and why, for readiness."""

    def __init__(self, stop: asyncio.Event, initial_s: float = 1.0, max_s: float = 30.0, healthy_s: float = 60.0):
        self.stop = stop
        self.initial_s, self.max_s, self.healthy_s = initial_s, max_s, healthy_s
        self.down: dict[str, str] = {}
        self.restarts = 0

    async def run(self, name: str, loop: Callable[[asyncio.Event], Awaitable[None]]) -> None:
        delay = self.initial_s
        while not self.stop.is_set():
            started = time.monotonic()
            why = await self._run_once(name, loop)
            if why is None:
                return
            delay = self.initial_s if time.monotonic() - started > self.healthy_s else delay
            log.error("background loop %s %s; restarting it in %.1f s", name, why, delay)
            self.down[name] = why
            await pause(self.stop, delay)
            self.down.pop(name, None)
            self.restarts += 1
            delay = min(delay * 2, self.max_s)

    async def _run_once(self, name: str, loop: Callable[[asyncio.Event], Awaitable[None]]) -> str | None:
        """None when the loop ended because ``stop`` was set; else why it ended."""
        try:
            await loop(self.stop)
        except (KeyboardInterrupt, SystemExit):
            raise
        except asyncio.CancelledError as exc:
            task = asyncio.current_task()
            if task is not None and task.cancelling() > 0:
                raise
            log.error("background loop %s: cancelled from inside", name, exc_info=exc)
            return "was cancelled from inside"
        except BaseException as exc:
            log.error("background loop %s crashed", name, exc_info=exc)
            return f"crashed ({type(exc).__name__}: {exc})"
        return None if self.stop.is_set() else "returned while the server runs"
