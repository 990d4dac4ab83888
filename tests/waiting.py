"""Waiting for a condition in a test, with a deadline that names what did not happen."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


async def wait_until(check: Callable[[], bool], timeout_s: float, what: str) -> float:
    """Poll ``check`` until true; how long it took. Fails with ``what`` after ``timeout_s``."""
    started = time.monotonic()
    while not check():
        assert time.monotonic() - started < timeout_s, f"{what} not within {timeout_s} s"
        await asyncio.sleep(0.2)
    return time.monotonic() - started
