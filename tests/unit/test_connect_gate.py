"""The connect gate: a reconnect storm waits in a bounded queue, and what cannot wait is refused with a hint."""

from __future__ import annotations

import asyncio

import pytest

from broadcast.http.problems import HttpProblem
from sse.admission import RETRY_SPREAD_S, ConnectGate


async def refusal(gate: ConnectGate) -> HttpProblem:
    with pytest.raises(HttpProblem) as refused:
        async with gate.admit():
            pass
    return refused.value


async def test_connects_past_the_queue_or_the_wait_are_refused_with_a_spread_retry_hint() -> None:
    gate = ConnectGate(concurrency=1, queue=1, max_wait_s=0.2)
    holding, release = asyncio.Event(), asyncio.Event()

    async def hold() -> None:
        async with gate.admit():
            holding.set()
            await release.wait()

    holder = asyncio.create_task(hold())
    await holding.wait()
    waiter = asyncio.create_task(refusal(gate))  # waits its turn, then gives up after max_wait_s
    await asyncio.sleep(0)
    at_once = await refusal(gate)  # the queue is full: no waiting at all
    assert gate.waiting == 1
    timed_out = await waiter
    for refused in (at_once, timed_out):
        assert refused.status == 503
        assert 1 <= int(refused.headers["Retry-After"]) <= RETRY_SPREAD_S
    release.set()
    await holder
    async with gate.admit():  # free again: admitted at once
        assert gate.refused == 2 and gate.waiting == 0


async def test_a_waiting_connect_is_admitted_when_a_turn_frees() -> None:
    gate = ConnectGate(concurrency=1, queue=5, max_wait_s=5)
    order: list[int] = []

    async def connect(n: int) -> None:
        async with gate.admit():
            order.append(n)
            await asyncio.sleep(0.01)

    await asyncio.gather(*(connect(n) for n in range(5)))
    assert sorted(order) == list(range(5)) and gate.refused == 0
