"""The supervisor of background loops: a loop that ends early is logged at ERROR and started again; only a
stop, a process exit or a cancellation of its task ends it."""

from __future__ import annotations

import asyncio
import logging

import pytest

from broadcast.errors import UnavailableError
from broadcast.observability.loops import Supervisor
from broadcast.runtime.observe import LoopsHealth


class Fatal(BaseException):
    pass


async def test_a_loop_that_crashes_or_returns_early_is_restarted_and_readiness_says_so_meanwhile(
    caplog: pytest.LogCaptureFixture,
) -> None:
    stop = asyncio.Event()
    supervisor = Supervisor(stop, initial_s=0.2, max_s=0.4)
    runs = 0

    async def loop(stop: asyncio.Event) -> None:
        nonlocal runs
        runs += 1
        if runs == 1:
            raise Fatal("boom")
        if runs == 2:
            raise asyncio.CancelledError  # from inside, not a cancellation of the task
        if runs == 3:
            return  # ended on its own while the server runs
        await stop.wait()

    task = asyncio.create_task(supervisor.run("relay", loop))
    health = LoopsHealth([task], supervisor.down)
    await asyncio.sleep(0.05)
    with pytest.raises(UnavailableError, match=r"relay .*restarting"):
        await health.check()
    for _ in range(100):
        if runs == 4:
            break
        await asyncio.sleep(0.05)
    assert runs == 4 and supervisor.restarts == 3
    await health.check()  # running again: ready
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any("crashed" in m and "Fatal" in m for m in errors), errors
    assert any("cancelled from inside" in m for m in errors), errors
    assert any("returned while the server runs" in m for m in errors), errors
    stop.set()
    await asyncio.wait_for(task, 1)


async def test_stop_and_a_cancellation_of_the_task_end_the_loop_for_good() -> None:
    stop = asyncio.Event()
    supervisor = Supervisor(stop, initial_s=0.01)

    async def loop(stop: asyncio.Event) -> None:
        await stop.wait()

    task = asyncio.create_task(supervisor.run("sampler", loop))
    await asyncio.sleep(0.02)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert supervisor.restarts == 0
