"""FreshRead: one query for callers that arrived before it started; never an answer older than the call."""

from __future__ import annotations

import asyncio

import pytest

from broadcast.core.coalesce import FreshRead


async def test_callers_arriving_together_share_one_read_and_later_ones_get_a_newer_read() -> None:
    version = 0
    reads: list[int] = []
    release = asyncio.Event()

    async def read() -> int:
        seen = version  # what the database held when the query ran
        reads.append(seen)
        await release.wait()
        return seen

    fresh = FreshRead(read)
    first = [asyncio.create_task(fresh.get()) for _ in range(50)]
    await asyncio.sleep(0.01)
    assert len(reads) == 1, "fifty callers, one read"
    version = 1  # something changed after the running read started
    late = [asyncio.create_task(fresh.get()) for _ in range(50)]
    await asyncio.sleep(0.01)
    assert len(reads) == 1, "late callers wait for the next read, they do not join the running one"
    release.set()
    assert await asyncio.gather(*first) == [0] * 50
    assert await asyncio.gather(*late) == [1] * 50, "a caller never gets a read that started before it arrived"
    assert reads == [0, 1]


async def test_a_failed_read_fails_its_callers_and_the_next_read_runs_again() -> None:
    calls = 0

    async def read() -> int:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise OSError("database gone")
        return calls

    fresh = FreshRead(read)
    with pytest.raises(OSError, match="database gone"):
        await fresh.get()
    assert await fresh.get() == 2
