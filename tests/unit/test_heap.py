"""``broadcast.observability.heap``: a started server freezes its start-up heap, raises the thresholds."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import weakref
from collections.abc import Iterator

import pytest
import uvicorn
from starlette.types import Receive, Scope, Send

from broadcast.observability import heap
from broadcast.runtime.serve import serve


@pytest.fixture
def restored_collector() -> Iterator[None]:
    """The test process's own collector settings back after the test (``settle`` changes them globally)."""
    previous = gc.get_threshold()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*previous)


@pytest.mark.usefixtures("restored_collector")
def test_settle_freezes_what_lives_now_and_sets_the_thresholds() -> None:
    gc.unfreeze()
    heap.settle()
    assert gc.get_freeze_count() > 0
    assert gc.get_threshold() == heap.THRESHOLDS
    assert heap.THRESHOLDS[0] > 10 * 700  # far above CPython's default gen-0 threshold


async def _app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        while (message := await receive())["type"] != "lifespan.shutdown":
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})


@pytest.mark.usefixtures("restored_collector")
async def test_serve_settles_the_heap_once_the_server_has_started() -> None:
    gc.unfreeze()
    gc.set_threshold(700, 10, 10)
    config = uvicorn.Config(_app, host="127.0.0.1", port=0, log_level="warning")
    serving = asyncio.create_task(serve(config))
    try:
        async with asyncio.timeout(20):
            while gc.get_threshold() != heap.THRESHOLDS:  # noqa: ASYNC110  # a global, no event
                await asyncio.sleep(0.05)
        assert gc.get_freeze_count() > 0
    finally:
        os.kill(os.getpid(), signal.SIGINT)  # serve's own handler: stop accepting, shut down
        assert await asyncio.wait_for(serving, 20) is True


class _Node:
    def __init__(self) -> None:
        self.other: _Node | None = None


def _promoted_cycle() -> weakref.ref[_Node]:
    """A two-object cycle, promoted to the oldest generation while alive (as a long stream's objects are),
    then dropped: garbage only a full collection frees."""
    a, b = _Node(), _Node()
    a.other, b.other = b, a
    gc.collect(0)
    gc.collect(1)  # now in generation 2, and generation 2 counts one promotion
    return weakref.ref(a)


@pytest.mark.usefixtures("restored_collector")
def test_a_cycle_promoted_to_the_old_generation_is_freed_by_the_sweep_not_left_to_the_thresholds() -> None:
    gc.collect()
    gc.set_threshold(*heap.THRESHOLDS)
    gone = _promoted_cycle()
    for _ in range(5_000):  # ordinary allocation: far below what the thresholds wait for
        _ = [object()]
    assert gone() is not None, "the thresholds alone leave it"
    assert heap.sweep_once() >= 2, "the two objects of the cycle, at least"
    assert gone() is None


@pytest.mark.usefixtures("restored_collector")
async def test_the_sweep_runs_every_period() -> None:
    gc.collect()
    gc.set_threshold(*heap.THRESHOLDS)
    gone = _promoted_cycle()
    sweeping = asyncio.create_task(heap.sweep(every_s=0.01))
    try:
        async with asyncio.timeout(5):
            while gone() is not None:  # noqa: ASYNC110  # a weak reference, no event
                await asyncio.sleep(0.01)
    finally:
        sweeping.cancel()
